// Attention over the KV cache. New keys/values are appended by a small kernel; then each block
// takes one (query row, head, slice of positions) and computes scores, a softmax and the weighted
// sum of values for its slice (flash-decoding: the sequence is split over blocks so a long context
// fills the GPU); a combine kernel merges the slices with their running max and sum. Each lane
// holds 8 consecutive dimensions of q, so one 16-byte load of a cached fp16 key row feeds it.
// Prefill over an fp16 cache with head_dim 64 or 128 goes to the tensor-core kernel instead
// (cuda_flash_attention.cu); decode, fp32 caches and other head sizes stay here.
#include <algorithm>
#include <cmath>

#include "backends/cuda/cuda_attention_common.cuh"

namespace qf::cuda {

namespace {

template <typename KT>
__global__ void kv_append_kernel(const float* __restrict__ k, const float* __restrict__ v, KT* __restrict__ K,
                                 KT* __restrict__ V, int64_t rows, int nkv, int hd, int64_t cap, int64_t pos0,
                                 const int* __restrict__ dpos) {
  pdl_wait();
  const int64_t total = rows * nkv * hd;
  const int64_t base = dpos ? *dpos : pos0;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int d = static_cast<int>(idx % hd);
    const int h = static_cast<int>((idx / hd) % nkv);
    const int64_t t = idx / (static_cast<int64_t>(hd) * nkv);
    const size_t dst = (static_cast<size_t>(h) * cap + base + t) * hd + d;
    K[dst] = from_float<KT>(k[idx]);
    V[dst] = from_float<KT>(v[idx]);
  }
}

// Where a launch's query rows are and where their histories live.
// One sequence in a [kv_head][cap][head_dim] cache: row r is at position pos0 + r (or the device
// position + r).
template <typename KT>
struct ContiguousRows {
  const KT* K;
  const KT* V;
  int64_t cap, pos0;
  const int* dpos;
  __device__ int row(int r) const { return r; }
  __device__ int64_t pos(int r) const { return (dpos ? *dpos : pos0) + r; }
  __device__ size_t at(int r, int kvh, int64_t j, int hd) const { return (static_cast<size_t>(kvh) * cap + j) * hd; }
};
// Rows of many sequences over a paged [block][kv_head][slot][head_dim] cache: row r of the launch
// is batch row list[r] (or base + r), at position row_pos[..], its sequence's block table at
// tables + row_table[..].
template <typename KT>
struct PagedRows {
  const KT* K;
  const KT* V;
  const int* list;
  int base;
  const int* row_pos;
  const int* row_table;
  const int32_t* tables;
  int bs, nkv;
  __device__ int row(int r) const { return list ? list[r] : base + r; }
  __device__ int64_t pos(int r) const { return row_pos[row(r)]; }
  __device__ size_t at(int r, int kvh, int64_t j, int hd) const {
    const int64_t blk = tables[row_table[row(r)] + j / bs];
    return ((static_cast<size_t>(blk) * nkv + kvh) * bs + j % bs) * hd;
  }
};

// grid (n_heads, n_splits, rows), kAttnWarps warps. Shared: scores[chunk], red[32], ored[warps*hd].
// q and out are indexed by Rows::row(r); the partial results by r.
template <typename KT, typename Rows>
__global__ void __launch_bounds__(kAttnWarps * 32)
    attn_split_kernel(const float* __restrict__ q, const Rows rows, float* __restrict__ out, float* __restrict__ part_o,
                      float* __restrict__ part_ml, int nh, int nkv, int hd, float scale, int64_t window, int chunk, int L) {
  extern __shared__ float smem[];
  pdl_wait();
  float* sc = smem;
  float* red = smem + chunk;
  float* ored = red + 32;
  const int h = blockIdx.x, split = blockIdx.y, r = blockIdx.z, nsplit = gridDim.y;
  const int kvh = h / (nh / nkv);
  const int row = rows.row(r);
  const int64_t pos = rows.pos(r);
  const int64_t first = window > 0 ? max(static_cast<int64_t>(0), pos - window + 1) : 0;
  int64_t j0 = static_cast<int64_t>(split) * chunk;
  const int64_t j1 = min(j0 + chunk, pos + 1);
  j0 = max(j0, first);
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

  // Scores.
  for (int64_t jb = j0 + warp * P; jb < j1; jb += kAttnWarps * P) {
    const int64_t j = jb + grp;
    float d = 0.f;
    if (active && j < j1) {
      float kf[8];
      load8(rows.K + rows.at(r, kvh, j, hd) + sub * 8, kf);
#pragma unroll
      for (int i = 0; i < 8; ++i) d += kf[i] * qr[i];
    }
    for (int o = L / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
    if (sub == 0 && j < j1) sc[j - j0] = d;
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
  for (int64_t jb = j0 + warp * P; jb < j1; jb += kAttnWarps * P) {
    const int64_t j = jb + grp;
    if (active && j < j1) {
      const float p = sc[j - j0];
      float vf[8];
      load8(rows.V + rows.at(r, kvh, j, hd) + sub * 8, vf);
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] += p * vf[i];
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

template <typename KT>
void run_attention(CudaBackend& b, const float* q, const float* k, const float* v, CudaKVCache& c, int64_t layer,
                   int64_t pos0, int64_t rows, const AttentionParams& p, float* out) {
  cudaStream_t s = stream_of(b);
  const int nh = static_cast<int>(p.n_heads), nkv = static_cast<int>(p.n_kv_heads), hd = static_cast<int>(p.head_dim);
  const int64_t cap = c.capacity;
  KT* K = static_cast<KT*>(c.k) + static_cast<size_t>(layer) * nkv * cap * hd;
  KT* V = static_cast<KT*>(c.v) + static_cast<size_t>(layer) * nkv * cap * hd;
  const int* dpos = b.device_pos();
  {
    const int64_t total = rows * nkv * hd;
    const int grid = grid_for(total, 256, 8192);
    launch(kv_append_kernel<KT>, dim3(grid), dim3(256), 0, s, k, v, K, V, rows, nkv, hd, cap, pos0, dpos);
    QF_CUDA_LAUNCH();
  }
  // Prefill over an fp16 cache: the tensor-core kernel where it applies.
  if constexpr (std::is_same_v<KT, __half>) {
    if (!dpos && rows > 1 && flash_attention_prefill(b, q, K, V, cap, pos0, rows, p, out)) return;
  }
  int L = 1;
  while (L < hd / 8) L <<= 1;

  // Query rows are processed in groups so the partial results stay small.
  constexpr int64_t kRowGroup = 1024;
  for (int64_t r0 = 0; r0 < rows; r0 += kRowGroup) {
    const int64_t nr = std::min(kRowGroup, rows - r0);
    // Longest history any row of this group attends to; with device inputs, the whole cache.
    const int64_t max_len = dpos ? std::min(cap, b.device_max_len() > 0 ? b.device_max_len() : cap) : pos0 + r0 + nr;
    int chunk = 256;
    if (dpos) {
      chunk = static_cast<int>(std::max<int64_t>(256, (max_len + 255) / 256));
    } else if (nr > 1) {
      // Prefill: enough blocks come from the rows; fewer, longer slices.
      chunk = static_cast<int>(std::clamp<int64_t>(max_len, 256, 4096));
    } else {
      // Decode: aim for at least two blocks per multiprocessor.
      while (chunk > 32 && nh * ((max_len + chunk - 1) / chunk) < 2 * b.sm_count()) chunk /= 2;
      chunk = static_cast<int>(std::max<int64_t>(chunk, (max_len + 1023) / 1024));
    }
    const int nsplit = static_cast<int>((max_len + chunk - 1) / chunk);
    float* part_o = nullptr;
    float* part_ml = nullptr;
    if (nsplit > 1) {
      const size_t n_part = static_cast<size_t>(nr) * nh * nsplit;
      part_o = static_cast<float*>(b.scratch(n_part * hd * 4, 1));
      part_ml = static_cast<float*>(b.scratch(n_part * 2 * 4, 2));
    }
    const size_t smem = (static_cast<size_t>(chunk) + 32 + static_cast<size_t>(kAttnWarps) * hd) * 4;
    dim3 grid(nh, nsplit, static_cast<unsigned>(nr));
    const ContiguousRows<KT> where{K, V, cap, pos0 + r0, dpos};
    launch(attn_split_kernel<KT, ContiguousRows<KT>>, grid, dim3(kAttnWarps * 32), smem, s, q + r0 * nh * hd, where,
           out + r0 * nh * hd, part_o, part_ml, nh, nkv, hd, p.scale, p.sliding_window, chunk, L);
    QF_CUDA_LAUNCH();
    if (nsplit > 1) attention_combine(part_o, part_ml, out + r0 * nh * hd, nr, nh, hd, nsplit, s);
  }
}

}  // namespace

void attention_combine(const float* part_o, const float* part_ml, float* out, int64_t rows, int n_heads,
                       int head_dim, int n_splits, cudaStream_t s, const int* out_rows, int out_base) {
  launch(attn_combine_kernel, dim3(n_heads, static_cast<unsigned>(rows)), dim3(std::max(32, std::min(head_dim, 256))),
         0, s, part_o, part_ml, out, n_heads, head_dim, n_splits, out_rows, out_base);
  QF_CUDA_LAUNCH();
}

void attention_forward(CudaBackend& b, const float* q, const float* k, const float* v, CudaKVCache& cache,
                       int64_t layer, int64_t pos0, int64_t rows, const AttentionParams& p, float* out) {
  QF_CHECK(p.head_dim % 8 == 0 && p.head_dim <= 256, "CUDA attention supports head_dim multiple of 8 up to 256, not ",
           p.head_dim);
  QF_CHECK(p.n_kv_heads > 0 && p.n_heads % p.n_kv_heads == 0, "n_heads must be a multiple of n_kv_heads");
  QF_CHECK(cache.head_dim == p.head_dim && cache.n_kv_heads == p.n_kv_heads, "KV cache shape mismatch");
  if (b.device_pos()) QF_CHECK(rows == 1, "device inputs need a single row");
  if (cache.f32) run_attention<float>(b, q, k, v, cache, layer, pos0, rows, p, out);
  else run_attention<__half>(b, q, k, v, cache, layer, pos0, rows, p, out);
}

// ---- many sequences over a paged cache ---------------------------------------------------------

namespace {

__global__ void rope_rows_kernel(float* __restrict__ q, float* __restrict__ k, int rows, int n_heads, int n_kv_heads,
                                 int head_dim, const int* __restrict__ row_pos, const float* __restrict__ cos_t,
                                 const float* __restrict__ sin_t) {
  pdl_wait();
  const int half = head_dim / 2, heads = n_heads + n_kv_heads;
  const int64_t total = static_cast<int64_t>(rows) * heads * half;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int i = static_cast<int>(idx % half);
    const int h = static_cast<int>((idx / half) % heads);
    const int64_t t = idx / (static_cast<int64_t>(half) * heads);
    float* v = h < n_heads ? q + (t * n_heads + h) * head_dim : k + (t * n_kv_heads + (h - n_heads)) * head_dim;
    const int64_t pos = row_pos[t];
    const float c = cos_t[pos * half + i], s = sin_t[pos * half + i];
    const float a = v[i], b = v[i + half];
    v[i] = a * c - b * s;
    v[i + half] = b * c + a * s;
  }
}

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

// The split kernel over `n` rows of the batch (batch rows list[r], or base + r) whose histories
// are at most max_len positions long.
template <typename KT>
void paged_split(CudaBackend& b, const float* q, const KT* K, const KT* V, const DeviceBatch& batch, const int* list,
                 int base, int n, int64_t max_len, int bs, const AttentionParams& p, float* out) {
  const int nh = static_cast<int>(p.n_heads), nkv = static_cast<int>(p.n_kv_heads), hd = static_cast<int>(p.head_dim);
  int L = 1;
  while (L < hd / 8) L <<= 1;
  // As for decode over one sequence: slices short enough for about two blocks per multiprocessor.
  int chunk = 256;
  while (chunk > 32 && static_cast<int64_t>(nh) * n * ((max_len + chunk - 1) / chunk) < 2 * b.sm_count()) chunk /= 2;
  chunk = static_cast<int>(std::max<int64_t>(chunk, (max_len + 1023) / 1024));
  const int nsplit = static_cast<int>((max_len + chunk - 1) / chunk);
  float* part_o = nullptr;
  float* part_ml = nullptr;
  if (nsplit > 1) {
    const size_t n_part = static_cast<size_t>(n) * nh * nsplit;
    part_o = static_cast<float*>(b.scratch(n_part * hd * 4, 1));
    part_ml = static_cast<float*>(b.scratch(n_part * 2 * 4, 2));
  }
  const PagedRows<KT> where{K, V, list, base, batch.row_pos, batch.row_table, batch.tables, bs, nkv};
  const size_t smem = (static_cast<size_t>(chunk) + 32 + static_cast<size_t>(kAttnWarps) * hd) * 4;
  launch(attn_split_kernel<KT, PagedRows<KT>>, dim3(nh, nsplit, static_cast<unsigned>(n)), dim3(kAttnWarps * 32), smem,
         stream_of(b), q, where, out, part_o, part_ml, nh, nkv, hd, p.scale, p.sliding_window, chunk, L);
  QF_CUDA_LAUNCH();
  if (nsplit > 1) attention_combine(part_o, part_ml, out, n, nh, hd, nsplit, stream_of(b), list, base);
}

template <typename KT>
void run_paged(CudaBackend& b, const float* q, const float* k, const float* v, CudaPagedKVCache& c, int64_t layer,
               const DeviceBatch& batch, const AttentionParams& p, float* out) {
  cudaStream_t s = stream_of(b);
  const int nkv = static_cast<int>(p.n_kv_heads), hd = static_cast<int>(p.head_dim), bs = static_cast<int>(c.block_size);
  KT* K = static_cast<KT*>(c.k) + layer * c.layer_elems();
  KT* V = static_cast<KT*>(c.v) + layer * c.layer_elems();
  launch(paged_store_kernel<KT>, dim3(grid_for(static_cast<int64_t>(batch.rows) * nkv * hd, 256, 8192)), dim3(256), 0, s,
         k, v, K, V, batch.rows, nkv, hd, bs, batch.row_pos, batch.row_table, batch.tables);
  QF_CUDA_LAUNCH();
  if (batch.n_short > 0)
    paged_split<KT>(b, q, K, V, batch, batch.short_rows, 0, batch.n_short, batch.short_len, bs, p, out);
  // Prefill chunks: a contiguous copy of the sequence's history and the tensor-core kernel.
  const int64_t qd = p.n_heads * p.head_dim;
  for (const BatchSeq& sq : batch.seqs) {
    if (sq.rows < kFlashMinRows) continue;
    const int64_t len = sq.pos0 + sq.rows;
    bool done = false;
    if constexpr (std::is_same_v<KT, __half>) {
      if (hd % 8 == 0) {
        const size_t n = static_cast<size_t>(len) * nkv * hd;
        auto* Kc = static_cast<__half*>(b.scratch(n * 2, 6));
        auto* Vc = static_cast<__half*>(b.scratch(n * 2, 7));
        const int32_t* table = batch.tables + batch.seq_table[static_cast<size_t>(&sq - batch.seqs.data())];
        launch(paged_gather_kernel, dim3(grid_for(len * nkv * (hd / 8), 256, 8192)), dim3(256), 0, s, K, V, Kc, Vc, len,
               nkv, hd, bs, table);
        QF_CUDA_LAUNCH();
        done = flash_attention_prefill(b, q + sq.first_row * qd, Kc, Vc, len, sq.pos0, sq.rows, p, out + sq.first_row * qd);
      }
    }
    if (!done)
      paged_split<KT>(b, q, K, V, batch, nullptr, static_cast<int>(sq.first_row), static_cast<int>(sq.rows), len, bs, p,
                      out);
  }
}

}  // namespace

void rope_rows(CudaBackend& b, const DeviceBatch& batch, float* q, float* k, int n_heads, int n_kv_heads, int head_dim) {
  const int64_t total = static_cast<int64_t>(batch.rows) * (n_heads + n_kv_heads) * (head_dim / 2);
  launch(rope_rows_kernel, dim3(grid_for(total, 256, 8192)), dim3(256), 0, stream_of(b), q, k, batch.rows, n_heads,
         n_kv_heads, head_dim, batch.row_pos, b.rope_cos(), b.rope_sin());
  QF_CUDA_LAUNCH();
}

void paged_attention_forward(CudaBackend& b, const float* q, const float* k, const float* v, CudaPagedKVCache& cache,
                             int64_t layer, const DeviceBatch& batch, const AttentionParams& p, float* out) {
  QF_CHECK(p.head_dim % 8 == 0 && p.head_dim <= 256, "CUDA attention supports head_dim multiple of 8 up to 256, not ",
           p.head_dim);
  QF_CHECK(p.n_kv_heads > 0 && p.n_heads % p.n_kv_heads == 0, "n_heads must be a multiple of n_kv_heads");
  QF_CHECK(cache.head_dim == p.head_dim && cache.n_kv_heads == p.n_kv_heads, "KV cache shape mismatch");
  QF_CHECK(layer >= 0 && layer < cache.n_layers, "paged attention: layer ", layer, " of ", cache.n_layers);
  if (cache.f32) run_paged<float>(b, q, k, v, cache, layer, batch, p, out);
  else run_paged<__half>(b, q, k, v, cache, layer, batch, p, out);
}

}  // namespace qf::cuda
