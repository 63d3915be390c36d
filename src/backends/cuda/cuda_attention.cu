// Attention over the paged KV cache. A store kernel writes each row's key and value into its
// sequence's block (RoPE folded in where it can); then each block of the split kernel takes one
// (query row, head, slice of positions) and computes scores, a softmax and the weighted sum of
// values for its slice (flash-decoding: a long history is split over blocks so that it fills the
// GPU); a combine kernel merges the slices with their running max and sum. Each lane holds 8
// consecutive dimensions of q, so one 16-byte load of a cached fp16 key row feeds it. A prefill
// chunk over an fp16 cache with head_dim 64 or 128 goes through a contiguous copy of its history
// to the tensor-core kernel instead (cuda_flash_attention.cu).
#include <algorithm>
#include <cmath>
#include <type_traits>

#include "backends/cuda/cuda_attention_common.cuh"

namespace qf::cuda {

namespace {

// Where a launch's query rows are and where their histories live.
// Rows of many sequences over a paged cache: row r of the launch is batch row list[r] (or
// base + r), at position row_pos[..], its sequence's block table at tables + row_table[..]; the
// head row of (kv head, position j) is numbered [block][kv_head][slot].
struct PagedIndex {
  const int* list;
  int base;
  const int* row_pos;
  const int* row_table;
  const int32_t* tables;
  int bs, nkv;
  const int32_t* table;  // the bound row's block table (bind_row)
  __device__ int row(int r) const { return list ? list[r] : base + r; }
  __device__ int64_t pos(int r) const { return row_pos[row(r)]; }
  __device__ size_t head_row(int /*r*/, int kvh, int64_t j) const {
    const int jj = static_cast<int>(j), b = jj / bs;
    return (static_cast<size_t>(table[b]) * nkv + kvh) * bs + (jj - b * bs);
  }
};

// The launch's rows with row r's block table looked up once (a paged cache), not per key.
template <typename Rows>
__device__ Rows bind_row(Rows rows, int r) {
  if constexpr (std::is_base_of_v<PagedIndex, Rows>) rows.table = rows.tables + rows.row_table[rows.row(r)];
  return rows;
}

// A paged fp16/fp32 cache: head_dim values per head row.
template <typename KT>
struct PagedRows : PagedIndex {
  const KT* K;
  const KT* V;
  __device__ void load_k(int r, int kvh, int64_t j, int hd, int d0, float (&f)[8]) const {
    load8(K + head_row(r, kvh, j) * hd + d0, f);
  }
  __device__ void load_v(int r, int kvh, int64_t j, int hd, int d0, float (&f)[8]) const {
    load8(V + head_row(r, kvh, j) * hd + d0, f);
  }
};

// Dimensions d0..d0+7 of one head row of a quantized cache (backends/kv_quant.h): codes of the
// row at `codes`, its group scales at `scales`.
template <int BITS>
__device__ __forceinline__ void load8_q(const uint8_t* codes, const float* scales, int d0, float (&f)[8]) {
  const float s = scales[d0 / 32];
  if constexpr (BITS == 8) {
    const uint2 w = *reinterpret_cast<const uint2*>(codes + d0);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[i] = static_cast<float>(static_cast<int8_t>((w.x >> (8 * i)) & 255u)) * s;
      f[4 + i] = static_cast<float>(static_cast<int8_t>((w.y >> (8 * i)) & 255u)) * s;
    }
  } else {
    const uint32_t w = *reinterpret_cast<const uint32_t*>(codes + d0 / 2);
#pragma unroll
    for (int i = 0; i < 8; ++i) f[i] = static_cast<float>(static_cast<int>((w >> (4 * i)) & 15u) - 8) * s;
  }
}

// A paged quantized cache: K and V hold the codes, SK and SV the scales.
template <int BITS>
struct PagedQRows : PagedIndex {
  const uint8_t* K;
  const uint8_t* V;
  const float* SK;
  const float* SV;
  __device__ void load_k(int r, int kvh, int64_t j, int hd, int d0, float (&f)[8]) const {
    const size_t h = head_row(r, kvh, j);
    load8_q<BITS>(K + h * hd * BITS / 8, SK + h * (hd / 32), d0, f);
  }
  __device__ void load_v(int r, int kvh, int64_t j, int hd, int d0, float (&f)[8]) const {
    const size_t h = head_row(r, kvh, j);
    load8_q<BITS>(V + h * hd * BITS / 8, SV + h * (hd / 32), d0, f);
  }
};

// grid (n_heads, n_splits, rows), kAttnWarps warps. Shared: scores[chunk], red[32], ored[warps*hd].
// q and out are indexed by Rows::row(r); the partial results by r.
template <typename Rows>
__global__ void __launch_bounds__(kAttnWarps * 32)
    attn_split_kernel(const float* __restrict__ q, const Rows launch_rows, float* __restrict__ out, float* __restrict__ part_o,
                      float* __restrict__ part_ml, int nh, int nkv, int hd, float scale, int64_t window, int chunk, int L) {
  extern __shared__ float smem[];
  pdl_wait();
  float* sc = smem;
  float* red = smem + chunk;
  float* ored = red + 32;
  const int h = blockIdx.x, split = blockIdx.y, r = blockIdx.z, nsplit = gridDim.y;
  const Rows rows = bind_row(launch_rows, r);
  const int kvh = h / (nh / nkv);
  const int row = rows.row(r);
  const int64_t pos = rows.pos(r);
  const int64_t first = window > 0 ? max(static_cast<int64_t>(0), pos - window + 1) : 0;
  // This row's history spread evenly over the splits (at most `chunk` positions each, as the
  // launch sized them for the longest history it allows): a row shorter than that longest, as in
  // a captured graph launched for a bound, keeps every split busy instead of leaving some empty.
  const int64_t span = (pos + 1 - first + nsplit - 1) / nsplit;
  const int64_t per = min(static_cast<int64_t>(chunk), (span + 31) / 32 * 32);
  const int64_t j0 = first + static_cast<int64_t>(split) * per;
  const int64_t j1 = min(j0 + per, pos + 1);
  const size_t pidx = (static_cast<size_t>(r) * nh + h) * nsplit + split;
  if (j0 >= j1) {
    if (threadIdx.x == 0) {
      part_ml[2 * pidx] = -INFINITY;
      part_ml[2 * pidx + 1] = 0.f;
    }
    return;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int sub = lane % L, grp = lane / L, P = 32 / L;
  const bool active = sub < hd / 8;
  float qr[8];
  const float* qp = q + (static_cast<size_t>(row) * nh + h) * hd + sub * 8;
#pragma unroll
  for (int i = 0; i < 8; ++i) qr[i] = active ? qp[i] * scale : 0.f;

  // Scores, kUnroll keys per lane group at a time: their loads are in flight together rather than
  // one after the other (the same keys in the same order as one at a time).
  constexpr int kUnroll = 4;
  const int64_t stride = kAttnWarps * P;
  for (int64_t jb = j0 + warp * P; jb < j1; jb += kUnroll * stride) {
    float kf[kUnroll][8];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = jb + u * stride + grp;
      if (active && j < j1) rows.load_k(r, kvh, j, hd, sub * 8, kf[u]);
      else
#pragma unroll
        for (int i = 0; i < 8; ++i) kf[u][i] = 0.f;
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = jb + u * stride + grp;
      float d = 0.f;
#pragma unroll
      for (int i = 0; i < 8; ++i) d += kf[u][i] * qr[i];
      for (int o = L / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
      if (sub == 0 && j < j1) sc[j - j0] = d;
    }
  }
  __syncthreads();
  const int n = static_cast<int>(j1 - j0);
  float m = -INFINITY;
  for (int i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, sc[i]);
  m = block_reduce(m, true, red);
  float l = 0.f;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const float e = __expf(sc[i] - m);
    sc[i] = e;
    l += e;
  }
  l = block_reduce(l, false, red);  // its barriers also publish sc

  // Weighted sum of values.
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  for (int64_t jb = j0 + warp * P; jb < j1; jb += kUnroll * stride) {
    float vf[kUnroll][8], pw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = jb + u * stride + grp;
      pw[u] = 0.f;
      if (active && j < j1) {
        pw[u] = sc[j - j0];
        rows.load_v(r, kvh, j, hd, sub * 8, vf[u]);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = jb + u * stride + grp;
      if (active && j < j1)
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[i] += pw[u] * vf[u][i];
    }
  }
  for (int o = L; o < 32; o <<= 1)
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[i] += __shfl_xor_sync(0xffffffffu, acc[i], o);
  if (grp == 0 && active)
#pragma unroll
    for (int i = 0; i < 8; ++i) ored[warp * hd + sub * 8 + i] = acc[i];
  __syncthreads();
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float s = 0.f;
    for (int w = 0; w < kAttnWarps; ++w) s += ored[w * hd + d];
    if (nsplit == 1) out[(static_cast<size_t>(row) * nh + h) * hd + d] = s / l;
    else part_o[pidx * hd + d] = s;
  }
  if (threadIdx.x == 0 && nsplit > 1) {
    part_ml[2 * pidx] = m;
    part_ml[2 * pidx + 1] = l;
  }
}

// grid (n_heads, rows); merges the slices of one (row, head).
__global__ void attn_combine_kernel(const float* __restrict__ part_o, const float* __restrict__ part_ml,
                                    float* __restrict__ out, int nh, int hd, int nsplit, const int* __restrict__ list,
                                    int first) {
  pdl_wait();
  const int h = blockIdx.x, row = blockIdx.y, out_row = list ? list[row] : first + row;
  const size_t base = (static_cast<size_t>(row) * nh + h) * nsplit;
  float M = -INFINITY;
  for (int s = 0; s < nsplit; ++s) M = fmaxf(M, part_ml[2 * (base + s)]);
  float Ls = 0.f;
  for (int s = 0; s < nsplit; ++s) {
    const float l = part_ml[2 * (base + s) + 1];
    if (l > 0.f) Ls += __expf(part_ml[2 * (base + s)] - M) * l;
  }
  const float inv = 1.f / Ls;
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float acc = 0.f;
    for (int s = 0; s < nsplit; ++s) {
      const float l = part_ml[2 * (base + s) + 1];
      if (l > 0.f) acc += __expf(part_ml[2 * (base + s)] - M) * part_o[(base + s) * hd + d];
    }
    out[(static_cast<size_t>(out_row) * nh + h) * hd + d] = acc * inv;
  }
}

// Slices for decode: at most 256 positions, halved (down to 32) until `blocks` blocks per slice
// make about two per multiprocessor, and at most 1024 slices.
int decode_chunk(int64_t blocks, int64_t max_len, int sm_count) {
  int chunk = 256;
  while (chunk > 32 && blocks * ((max_len + chunk - 1) / chunk) < 2 * sm_count) chunk /= 2;
  return static_cast<int>(std::max<int64_t>(chunk, (max_len + 1023) / 1024));
}

// The split kernel over n rows at `where` (histories up to max_len, slices of `chunk` positions)
// and the merge of the slices; row r's output goes to row out_rows[r] of out (or out_base + r).
template <typename Rows>
void launch_split(CudaBackend& b, const float* q, const Rows& where, int64_t n, int64_t max_len, int chunk,
                  const AttentionParams& p, float* out, const int* out_rows, int out_base) {
  const int nh = static_cast<int>(p.n_heads), nkv = static_cast<int>(p.n_kv_heads), hd = static_cast<int>(p.head_dim);
  int L = 1;
  while (L < hd / 8) L <<= 1;
  const int nsplit = static_cast<int>((max_len + chunk - 1) / chunk);
  const SplitPartials part = split_partials(b, n, nh, hd, nsplit);
  const size_t smem = (static_cast<size_t>(chunk) + 32 + static_cast<size_t>(kAttnWarps) * hd) * 4;
  launch(attn_split_kernel<Rows>, dim3(nh, nsplit, static_cast<unsigned>(n)), dim3(kAttnWarps * 32), smem,
         stream_of(b), q, where, out, part.o, part.ml, nh, nkv, hd, p.scale, p.sliding_window, chunk, L);
  QF_CUDA_LAUNCH();
  if (nsplit > 1) attention_combine(part.o, part.ml, out, n, nh, hd, nsplit, stream_of(b), out_rows, out_base);
}

}  // namespace

SplitPartials split_partials(CudaBackend& b, int64_t rows, int n_heads, int head_dim, int n_splits) {
  if (n_splits <= 1) return {};
  const size_t n_part = static_cast<size_t>(rows) * n_heads * n_splits;
  return {static_cast<float*>(b.scratch(n_part * head_dim * 4, 1)), static_cast<float*>(b.scratch(n_part * 2 * 4, 2))};
}

void attention_combine(const float* part_o, const float* part_ml, float* out, int64_t rows, int n_heads,
                       int head_dim, int n_splits, cudaStream_t s, const int* out_rows, int out_base) {
  launch(attn_combine_kernel, dim3(n_heads, static_cast<unsigned>(rows)), dim3(std::max(32, std::min(head_dim, 256))),
         0, s, part_o, part_ml, out, n_heads, head_dim, n_splits, out_rows, out_base);
  QF_CUDA_LAUNCH();
}

// ---- many sequences over a paged cache ---------------------------------------------------------

namespace {

// Each row's keys and values into its slot: block tables[row_table[row] + pos / bs], slot pos % bs.
template <typename KT>
__global__ void paged_store_kernel(const float* __restrict__ k, const float* __restrict__ v, KT* __restrict__ K,
                                   KT* __restrict__ V, int rows, int nkv, int hd, int bs, const int* __restrict__ row_pos,
                                   const int* __restrict__ row_table, const int32_t* __restrict__ tables) {
  pdl_wait();
  const int64_t total = static_cast<int64_t>(rows) * nkv * hd;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int d = static_cast<int>(idx % hd);
    const int h = static_cast<int>((idx / hd) % nkv);
    const int t = static_cast<int>(idx / (static_cast<int64_t>(hd) * nkv));
    const int pos = row_pos[t];
    const int64_t blk = tables[row_table[t] + pos / bs];
    const size_t dst = ((static_cast<size_t>(blk) * nkv + h) * bs + pos % bs) * hd + d;
    K[dst] = from_float<KT>(k[idx]);
    V[dst] = from_float<KT>(v[idx]);
  }
}

// RoPE and the store in one pass: one thread per (row, head, i < half) pair. Query heads are
// rotated in place; a key head's pair is rotated, and it and the value's pair are written to the
// row's slot (the rotated key also back to k).
template <typename KT>
__global__ void paged_rope_store_kernel(float* __restrict__ q, float* __restrict__ k, const float* __restrict__ v,
                                        KT* __restrict__ K, KT* __restrict__ V, int rows, int nh, int nkv, int hd,
                                        int bs, const int* __restrict__ row_pos, const int* __restrict__ row_table,
                                        const int32_t* __restrict__ tables, const float* __restrict__ cos_t,
                                        const float* __restrict__ sin_t) {
  pdl_wait();
  const int half = hd / 2, heads = nh + nkv;
  const int64_t total = static_cast<int64_t>(rows) * heads * half;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int i = static_cast<int>(idx % half);
    const int h = static_cast<int>((idx / half) % heads);
    const int t = static_cast<int>(idx / (static_cast<int64_t>(half) * heads));
    const int pos = row_pos[t];
    const float c = cos_t[static_cast<int64_t>(pos) * half + i], sn = sin_t[static_cast<int64_t>(pos) * half + i];
    float* x = h < nh ? q + (static_cast<size_t>(t) * nh + h) * hd : k + (static_cast<size_t>(t) * nkv + (h - nh)) * hd;
    const float a = x[i], b = x[i + half];
    const float ra = a * c - b * sn, rb = b * c + a * sn;
    x[i] = ra;
    x[i + half] = rb;
    if (h < nh) continue;
    const int kvh = h - nh;
    const int64_t blk = tables[row_table[t] + pos / bs];
    const size_t dst = ((static_cast<size_t>(blk) * nkv + kvh) * bs + pos % bs) * hd;
    const float* vr = v + (static_cast<size_t>(t) * nkv + kvh) * hd;
    K[dst + i] = from_float<KT>(ra);
    K[dst + i + half] = from_float<KT>(rb);
    V[dst + i] = from_float<KT>(vr[i]);
    V[dst + i + half] = from_float<KT>(vr[i + half]);
  }
}

// One sequence's positions [0, len) out of its blocks into a contiguous [kv_head][len][hd] copy
// (what the tensor-core prefill kernel reads).
__global__ void paged_gather_kernel(const __half* __restrict__ K, const __half* __restrict__ V, __half* __restrict__ Kc,
                                    __half* __restrict__ Vc, int64_t len, int nkv, int hd, int bs,
                                    const int32_t* __restrict__ table) {
  pdl_wait();
  const int v8 = hd / 8;  // 16-byte vectors per head row
  const int64_t total = len * nkv * v8;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int c = static_cast<int>(idx % v8);
    const int64_t j = (idx / v8) % len;
    const int h = static_cast<int>(idx / (static_cast<int64_t>(v8) * len));
    const size_t src = ((static_cast<size_t>(table[j / bs]) * nkv + h) * bs + j % bs) * hd + c * 8;
    const size_t dst = (static_cast<size_t>(h) * len + j) * hd + c * 8;
    *reinterpret_cast<int4*>(Kc + dst) = *reinterpret_cast<const int4*>(K + src);
    *reinterpret_cast<int4*>(Vc + dst) = *reinterpret_cast<const int4*>(V + src);
  }
}

// Quantized rows (backends/kv_quant.h): one warp per (row, head, group of 32), keys and values.
template <int BITS>
__global__ void paged_store_q_kernel(const float* __restrict__ k, const float* __restrict__ v, uint8_t* __restrict__ K,
                                     uint8_t* __restrict__ V, float* __restrict__ SK, float* __restrict__ SV, int rows,
                                     int nkv, int hd, int bs, const int* __restrict__ row_pos,
                                     const int* __restrict__ row_table, const int32_t* __restrict__ tables) {
  pdl_wait();
  const int groups = hd / 32, lane = threadIdx.x & 31;
  const int64_t total = static_cast<int64_t>(rows) * nkv * groups;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * blockDim.x / 32;
  constexpr float qmax = BITS == 8 ? 127.f : 7.f;
  for (int64_t w = (blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x) / 32; w < total; w += warps) {
    const int g = static_cast<int>(w % groups), h = static_cast<int>((w / groups) % nkv);
    const int t = static_cast<int>(w / (static_cast<int64_t>(groups) * nkv));
    const int pos = row_pos[t];
    const size_t hr = (static_cast<size_t>(tables[row_table[t] + pos / bs]) * nkv + h) * bs + pos % bs;
    for (int which = 0; which < 2; ++which) {
      const float x = (which ? v : k)[(static_cast<int64_t>(t) * nkv + h) * hd + g * 32 + lane];
      float amax = fabsf(x);
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
      const float inv = amax > 0.f ? qmax / amax : 0.f;
      const int q = __float2int_rn(fminf(fmaxf(x * inv, -qmax), qmax));
      uint8_t* codes = (which ? V : K) + hr * hd * BITS / 8;
      if constexpr (BITS == 8) {
        codes[g * 32 + lane] = static_cast<uint8_t>(static_cast<int8_t>(q));
      } else {
        const int odd = __shfl_down_sync(0xffffffffu, q, 1);
        if ((lane & 1) == 0) codes[(g * 32 + lane) / 2] = static_cast<uint8_t>((q + 8) | ((odd + 8) << 4));
      }
      if (lane == 0) (which ? SV : SK)[hr * groups + g] = amax / qmax;
    }
  }
}

// paged_gather_kernel for a quantized cache: the history dequantized to fp16.
template <int BITS>
__global__ void paged_gather_q_kernel(const uint8_t* __restrict__ K, const uint8_t* __restrict__ V,
                                      const float* __restrict__ SK, const float* __restrict__ SV, __half* __restrict__ Kc,
                                      __half* __restrict__ Vc, int64_t len, int nkv, int hd, int bs,
                                      const int32_t* __restrict__ table) {
  pdl_wait();
  const int v8 = hd / 8;
  const int64_t total = len * nkv * v8;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int c = static_cast<int>(idx % v8);
    const int64_t j = (idx / v8) % len;
    const int h = static_cast<int>(idx / (static_cast<int64_t>(v8) * len));
    const size_t hr = (static_cast<size_t>(table[j / bs]) * nkv + h) * bs + j % bs;
    const size_t dst = (static_cast<size_t>(h) * len + j) * hd + c * 8;
    for (int which = 0; which < 2; ++which) {
      float f[8];
      load8_q<BITS>((which ? V : K) + hr * hd * BITS / 8, (which ? SV : SK) + hr * (hd / 32), c * 8, f);
      __half* o = (which ? Vc : Kc) + dst;
#pragma unroll
      for (int i = 0; i < 8; ++i) o[i] = __float2half_rn(f[i]);
    }
  }
}

// The split kernel over `n` rows of the batch (where.list, or from where.base) whose histories
// are at most max_len positions long.
template <typename Rows>
void paged_split(CudaBackend& b, const float* q, const Rows& where, int n, int64_t max_len, const AttentionParams& p,
                 float* out) {
  // Slices short enough for about two blocks per multiprocessor.
  const int chunk = decode_chunk(p.n_heads * n, max_len, b.sm_count());
  launch_split(b, q, where, n, max_len, chunk, p, out, where.list, where.base);
}

// After the store: the short rows through the split kernel, then each prefill chunk through a
// contiguous fp16 copy of its history (gather(sequence, table, len, Kc, Vc)) and the tensor-core
// kernel, or the split kernel where that does not apply. rows_from(list, base) makes the Rows.
template <typename RowsFrom, typename Gather>
void attend_paged(CudaBackend& b, const float* q, const DeviceBatch& batch, const AttentionParams& p, float* out,
                  const RowsFrom& rows_from, const Gather& gather) {
  if (batch.n_short > 0) paged_split(b, q, rows_from(batch.short_rows, 0), batch.n_short, batch.short_len, p, out);
  const int64_t qd = p.n_heads * p.head_dim;
  for (size_t i = 0; i < batch.seqs.size(); ++i) {
    const BatchSeq& sq = batch.seqs[i];
    if (sq.rows < kFlashMinRows) continue;
    const int64_t len = sq.pos0 + sq.rows;
    const size_t n = static_cast<size_t>(len) * p.n_kv_heads * p.head_dim;
    auto* Kc = static_cast<__half*>(b.scratch(n * 2, 6));
    auto* Vc = static_cast<__half*>(b.scratch(n * 2, 7));
    const bool gathered = gather(batch.tables + batch.seq_table[i], len, Kc, Vc);
    if (!gathered ||
        !flash_attention_prefill(b, q + sq.first_row * qd, Kc, Vc, len, sq.pos0, sq.rows, p, out + sq.first_row * qd))
      paged_split(b, q, rows_from(nullptr, static_cast<int>(sq.first_row)), static_cast<int>(sq.rows), len, p, out);
  }
}

// rope: q and k are not rotated yet; the store rotates them on the way (paged_rope_store_kernel).
template <typename KT>
void run_paged(CudaBackend& b, float* q, float* k, const float* v, CudaPagedKVCache& c, int64_t layer,
               const DeviceBatch& batch, const AttentionParams& p, float* out, bool rope) {
  cudaStream_t s = stream_of(b);
  const int nkv = static_cast<int>(p.n_kv_heads), hd = static_cast<int>(p.head_dim), bs = static_cast<int>(c.block_size);
  KT* K = static_cast<KT*>(c.k) + layer * c.layer_elems();
  KT* V = static_cast<KT*>(c.v) + layer * c.layer_elems();
  if (rope) {
    const int nh = static_cast<int>(p.n_heads);
    launch(paged_rope_store_kernel<KT>, dim3(grid_for(static_cast<int64_t>(batch.rows) * (nh + nkv) * (hd / 2), 256, 8192)),
           dim3(256), 0, s, q, k, v, K, V, batch.rows, nh, nkv, hd, bs, batch.row_pos, batch.row_table, batch.tables,
           b.rope_cos(), b.rope_sin());
  } else {
    launch(paged_store_kernel<KT>, dim3(grid_for(static_cast<int64_t>(batch.rows) * nkv * hd, 256, 8192)), dim3(256), 0, s,
           k, v, K, V, batch.rows, nkv, hd, bs, batch.row_pos, batch.row_table, batch.tables);
  }
  QF_CUDA_LAUNCH();
  const auto rows_from = [&](const int* list, int base) {
    return PagedRows<KT>{{list, base, batch.row_pos, batch.row_table, batch.tables, bs, nkv, nullptr}, K, V};
  };
  const auto gather = [&](const int32_t* table, int64_t len, __half* Kc, __half* Vc) {
    if constexpr (std::is_same_v<KT, __half>) {
      launch(paged_gather_kernel, dim3(grid_for(len * nkv * (hd / 8), 256, 8192)), dim3(256), 0, s, K, V, Kc, Vc, len,
             nkv, hd, bs, table);
      QF_CUDA_LAUNCH();
      return true;
    } else {
      return false;  // fp32 caches: the split kernel
    }
  };
  attend_paged(b, q, batch, p, out, rows_from, gather);
}

template <int BITS>
void run_paged_q(CudaBackend& b, const float* q, const float* k, const float* v, CudaPagedKVCache& c, int64_t layer,
                 const DeviceBatch& batch, const AttentionParams& p, float* out) {
  cudaStream_t s = stream_of(b);
  const int nkv = static_cast<int>(p.n_kv_heads), hd = static_cast<int>(p.head_dim), bs = static_cast<int>(c.block_size);
  const size_t head_rows = c.layer_head_rows() * static_cast<size_t>(layer);
  uint8_t* K = static_cast<uint8_t*>(c.k) + head_rows * hd * BITS / 8;
  uint8_t* V = static_cast<uint8_t*>(c.v) + head_rows * hd * BITS / 8;
  float* SK = c.sk + head_rows * (hd / 32);
  float* SV = c.sv + head_rows * (hd / 32);
  const int64_t warps = static_cast<int64_t>(batch.rows) * nkv * (hd / 32);
  launch(paged_store_q_kernel<BITS>, dim3(grid_for(warps * 32, 256, 8192)), dim3(256), 0, s, k, v, K, V, SK, SV, batch.rows,
         nkv, hd, bs, batch.row_pos, batch.row_table, batch.tables);
  QF_CUDA_LAUNCH();
  const auto rows_from = [&](const int* list, int base) {
    return PagedQRows<BITS>{{list, base, batch.row_pos, batch.row_table, batch.tables, bs, nkv, nullptr}, K, V, SK, SV};
  };
  const auto gather = [&](const int32_t* table, int64_t len, __half* Kc, __half* Vc) {
    launch(paged_gather_q_kernel<BITS>, dim3(grid_for(len * nkv * (hd / 8), 256, 8192)), dim3(256), 0, s, K, V, SK, SV, Kc,
           Vc, len, nkv, hd, bs, table);
    QF_CUDA_LAUNCH();
    return true;
  };
  attend_paged(b, q, batch, p, out, rows_from, gather);
}

}  // namespace

void paged_attention_forward(CudaBackend& b, float* q, float* k, const float* v, CudaPagedKVCache& cache,
                             int64_t layer, const DeviceBatch& batch, const AttentionParams& p, float* out, bool rope) {
  QF_CHECK(p.head_dim % 8 == 0 && p.head_dim <= 256, "CUDA attention supports head_dim multiple of 8 up to 256, not ",
           p.head_dim);
  QF_CHECK(p.n_kv_heads > 0 && p.n_heads % p.n_kv_heads == 0, "n_heads must be a multiple of n_kv_heads");
  QF_CHECK(cache.head_dim == p.head_dim && cache.n_kv_heads == p.n_kv_heads, "KV cache shape mismatch");
  QF_CHECK(layer >= 0 && layer < cache.n_layers, "paged attention: layer ", layer, " of ", cache.n_layers);
  if (rope && cache.format != KVFormat::Full) {  // the quantizing store works on whole rows: RoPE first
    launch_rope(b, q, k, batch.rows, p.n_heads, p.n_kv_heads, p.head_dim, 0, batch.row_pos);
    rope = false;
  }
  switch (cache.format) {
    case KVFormat::Q8: run_paged_q<8>(b, q, k, v, cache, layer, batch, p, out); break;
    case KVFormat::Q4: run_paged_q<4>(b, q, k, v, cache, layer, batch, p, out); break;
    default:
      if (cache.f32) run_paged<float>(b, q, k, v, cache, layer, batch, p, out, rope);
      else run_paged<__half>(b, q, k, v, cache, layer, batch, p, out, rope);
  }
}

}  // namespace qf::cuda
