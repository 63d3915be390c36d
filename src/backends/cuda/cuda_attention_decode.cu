// Attention for one decode row with RoPE and the cache append folded in
// (Backend::fused_rope_attention): one kernel instead of rope, append, attention and merge.
//
// Each block takes one (head, slice of positions), flash-decoding style. Every lane rotates the 8
// dimensions of q it holds (and their rotate-half partners) as it loads them; the block whose
// slice ends at the new position rotates the new key the same way and uses it, and the new value,
// straight from the q/k/v buffers, and one block per KV head writes both to the cache (no other
// block of the launch reads that position). Slices are merged by the last block of each head to
// finish (a self-resetting counter), in slice order: deterministic, no second kernel.
#include <algorithm>
#include <cmath>

#include "backends/cuda/cuda_attention_common.cuh"

namespace qf::cuda {

namespace {

// Dimensions d0..d0+7 of a head vector after rotate-half RoPE at table row `pos`.
__device__ __forceinline__ void rope8(const float* __restrict__ v, int d0, int half, int64_t pos,
                                      const float* __restrict__ cos_t, const float* __restrict__ sin_t, float (&out)[8]) {
  const bool lo = d0 < half;
  const int i0 = lo ? d0 : d0 - half;
  const float* partner = v + (lo ? d0 + half : d0 - half);
  const float* c = cos_t + pos * half + i0;
  const float* s = sin_t + pos * half + i0;
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float a = v[d0 + i], b = partner[i];
    out[i] = lo ? a * c[i] - b * s[i] : a * c[i] + b * s[i];
  }
}

struct DecodeAttnArgs {
  const float* q;  // [n_heads * hd], not rotated
  const float* k;  // [n_kv * hd], not rotated
  const float* v;
  void* K;         // this layer's cache, [n_kv][cap][hd]
  void* V;
  float* out;
  float* part_o;   // [nh][nsplit][hd]
  float* part_ml;  // [nh][nsplit][2]
  int* counters;   // [nh]
  const float* cos_t;
  const float* sin_t;
  int64_t pos0, cap, window;
  int nh, nkv, hd, chunk, L;
  float scale;
};

// grid (n_heads, n_splits), kAttnWarps warps. Shared: scores[chunk], red[32], ored[kAttnWarps * hd], flag.
template <typename KT>
__global__ void __launch_bounds__(kAttnWarps * 32) rope_attn_decode_kernel(const __grid_constant__ DecodeAttnArgs a) {
  extern __shared__ float smem[];
  pdl_wait();
  float* sc = smem;
  float* red = smem + a.chunk;
  float* ored = red + 32;
  int* last = reinterpret_cast<int*>(ored + kAttnWarps * a.hd);
  const int h = blockIdx.x, split = blockIdx.y, nsplit = gridDim.y;
  const int hd = a.hd, half = hd / 2, L = a.L;
  const int kvh = h / (a.nh / a.nkv);
  const int64_t pos = a.pos0;
  const int64_t first = a.window > 0 ? max(static_cast<int64_t>(0), pos - a.window + 1) : 0;
  int64_t j0 = static_cast<int64_t>(split) * a.chunk;
  const int64_t j1 = min(j0 + a.chunk, pos + 1);
  j0 = max(j0, first);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int sub = lane % L, grp = lane / L, P = 32 / L;
  const bool active = sub < hd / 8;
  const int d0 = sub * 8;
  KT* Kh = static_cast<KT*>(a.K) + static_cast<size_t>(kvh) * a.cap * hd;
  KT* Vh = static_cast<KT*>(a.V) + static_cast<size_t>(kvh) * a.cap * hd;
  const bool has_new = j0 < j1 && j1 == pos + 1;  // this slice ends at the new position

  float m = -INFINITY, l = 0.f;
  float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  if (j0 < j1) {
    float qr[8], kn[8] = {}, vn[8] = {};
    if (active) {
      rope8(a.q + static_cast<size_t>(h) * hd, d0, half, pos, a.cos_t, a.sin_t, qr);
#pragma unroll
      for (int i = 0; i < 8; ++i) qr[i] *= a.scale;
      if (has_new) {
        rope8(a.k + static_cast<size_t>(kvh) * hd, d0, half, pos, a.cos_t, a.sin_t, kn);
        const float* vp = a.v + static_cast<size_t>(kvh) * hd + d0;
#pragma unroll
        for (int i = 0; i < 8; ++i) vn[i] = vp[i];
        // One block per KV head stores the new entry for the following steps.
        if (h % (a.nh / a.nkv) == 0 && warp == 0 && grp == 0) {
          KT* kd = Kh + pos * hd + d0;
          KT* vd = Vh + pos * hd + d0;
#pragma unroll
          for (int i = 0; i < 8; ++i) {
            kd[i] = from_float<KT>(kn[i]);
            vd[i] = from_float<KT>(vn[i]);
          }
        }
      }
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) qr[i] = 0.f;
    }
    // Scores.
    for (int64_t jb = j0 + warp * P; jb < j1; jb += kAttnWarps * P) {
      const int64_t j = jb + grp;
      float d = 0.f;
      if (active && j < j1) {
        float kf[8];
        if (j == pos) {
#pragma unroll
          for (int i = 0; i < 8; ++i) kf[i] = kn[i];
        } else {
          load8(Kh + j * hd + d0, kf);
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) d += kf[i] * qr[i];
      }
      for (int o = L / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
      if (sub == 0 && j < j1) sc[j - j0] = d;
    }
    __syncthreads();
    const int n = static_cast<int>(j1 - j0);
    for (int i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, sc[i]);
    m = block_reduce(m, true, red);
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
      const float e = __expf(sc[i] - m);
      sc[i] = e;
      l += e;
    }
    l = block_reduce(l, false, red);  // its barriers also publish sc
    // Weighted sum of values.
    for (int64_t jb = j0 + warp * P; jb < j1; jb += kAttnWarps * P) {
      const int64_t j = jb + grp;
      if (active && j < j1) {
        const float p = sc[j - j0];
        float vf[8];
        if (j == pos) {
#pragma unroll
          for (int i = 0; i < 8; ++i) vf[i] = vn[i];
        } else {
          load8(Vh + j * hd + d0, vf);
        }
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[i] = fmaf(p, vf[i], acc[i]);
      }
    }
    for (int o = L; o < 32; o <<= 1)
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[i] += __shfl_xor_sync(0xffffffffu, acc[i], o);
  }
  __syncthreads();
  if (grp == 0 && active)
#pragma unroll
    for (int i = 0; i < 8; ++i) ored[warp * hd + d0 + i] = acc[i];
  __syncthreads();
  float* out = a.out + static_cast<size_t>(h) * hd;
  if (nsplit == 1) {
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
      float s = 0.f;
      for (int w = 0; w < kAttnWarps; ++w) s += ored[w * hd + d];
      out[d] = l > 0.f ? s / l : 0.f;
    }
    return;
  }
  // Publish this slice; the last slice of the head to finish merges them all.
  const size_t pidx = static_cast<size_t>(h) * nsplit + split;
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float s = 0.f;
    for (int w = 0; w < kAttnWarps; ++w) s += ored[w * hd + d];
    a.part_o[pidx * hd + d] = s;
  }
  if (threadIdx.x == 0) {
    a.part_ml[2 * pidx] = m;
    a.part_ml[2 * pidx + 1] = l;
  }
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) *last = atomicAdd(a.counters + h, 1) == nsplit - 1;
  __syncthreads();
  if (!*last) return;
  __threadfence();
  if (threadIdx.x == 0) a.counters[h] = 0;
  const float* pml = a.part_ml + static_cast<size_t>(h) * nsplit * 2;
  const float* po = a.part_o + static_cast<size_t>(h) * nsplit * hd;
  float M = -INFINITY;
  for (int s = 0; s < nsplit; ++s) M = fmaxf(M, __ldcg(pml + 2 * s));
  float Ls = 0.f;
  for (int s = 0; s < nsplit; ++s) {
    const float ls = __ldcg(pml + 2 * s + 1);
    if (ls > 0.f) Ls += __expf(__ldcg(pml + 2 * s) - M) * ls;
  }
  for (int d = threadIdx.x; d < hd; d += blockDim.x) {
    float t = 0.f;
    for (int s = 0; s < nsplit; ++s) {
      const float ls = __ldcg(pml + 2 * s + 1);
      if (ls > 0.f) t += __expf(__ldcg(pml + 2 * s) - M) * __ldcg(po + static_cast<size_t>(s) * hd + d);
    }
    out[d] = t / Ls;
  }
}

}  // namespace

void rope_attention_decode(CudaBackend& b, const float* q, const float* k, const float* v, CudaKVCache& c,
                           int64_t layer, int64_t pos0, const AttentionParams& p, float* out) {
  QF_CHECK(p.n_kv_heads > 0 && p.n_heads % p.n_kv_heads == 0, "n_heads must be a multiple of n_kv_heads");
  QF_CHECK(c.head_dim == p.head_dim && c.n_kv_heads == p.n_kv_heads, "KV cache shape mismatch");
  const int nh = static_cast<int>(p.n_heads), nkv = static_cast<int>(p.n_kv_heads), hd = static_cast<int>(p.head_dim);
  const int64_t cap = c.capacity;
  const int64_t max_len = pos0 + 1;  // the history the row attends to
  int chunk = 256;
  while (chunk > 32 && nh * ((max_len + chunk - 1) / chunk) < 2 * b.sm_count()) chunk /= 2;
  chunk = static_cast<int>(std::max<int64_t>(chunk, (max_len + 1023) / 1024));
  const int nsplit = static_cast<int>((max_len + chunk - 1) / chunk);
  DecodeAttnArgs a{};
  a.q = q;
  a.k = k;
  a.v = v;
  const size_t layer_off = static_cast<size_t>(layer) * nkv * cap * hd * c.elem_size();
  a.K = static_cast<char*>(c.k) + layer_off;
  a.V = static_cast<char*>(c.v) + layer_off;
  a.out = out;
  const SplitPartials part = split_partials(b, 1, nh, hd, nsplit);
  a.part_o = part.o;
  a.part_ml = part.ml;
  if (nsplit > 1) a.counters = b.zeroed_counters(static_cast<size_t>(nh));
  a.cos_t = b.rope_cos();
  a.sin_t = b.rope_sin();
  a.pos0 = pos0;
  a.cap = cap;
  a.window = p.sliding_window;
  a.nh = nh;
  a.nkv = nkv;
  a.hd = hd;
  a.chunk = chunk;
  a.L = 1;
  while (a.L < hd / 8) a.L <<= 1;
  a.scale = p.scale;
  const size_t smem = (static_cast<size_t>(chunk) + 32 + static_cast<size_t>(kAttnWarps) * hd + 4) * 4;
  const dim3 grid(static_cast<unsigned>(nh), static_cast<unsigned>(nsplit));
  if (c.f32) launch(rope_attn_decode_kernel<float>, grid, dim3(kAttnWarps * 32), smem, stream_of(b), a);
  else launch(rope_attn_decode_kernel<__half>, grid, dim3(kAttnWarps * 32), smem, stream_of(b), a);
  QF_CUDA_LAUNCH();
}

}  // namespace qf::cuda
