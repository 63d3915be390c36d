// EXL2 and GPTQ linear layers on the GPU (layout: cuda_quant.cuh).
//
// Decode (one row): qgemv4_kernel (below; 4 columns per thread with 16-byte loads, K split over
// the warps of a block and the blocks of a thread-block cluster, reduced through distributed
// shared memory) wherever the row stride is a multiple of 4 words; otherwise qgemv_kernel:
// a memory-bound GEMV. One thread per output column, 32 columns per warp, so
// every load of a warp is one 128-byte line of a packed row; the warps of a block split K (in
// 32-row units) and add up in shared memory, so no atomics and no zeroing of y are needed. The
// block gathers x through the permutation into shared memory once, with the sum of x over each
// unit. A code q of b bits is turned into a float with two integer instructions by placing it in
// the top of the mantissa of 1.0: f = 1 + q / 2^b (exact), so the unit's dot product is
//   sum (q - z) x = 2^b (sum f x - (1 + z / 2^b) sum x),
// one shift + one LOP3 + one FFMA per weight, fp32 throughout. The next unit's words are loaded
// while the current one is computed, and the first unit before the PDL wait.
// Prefill (several rows): dequantize to an fp16 [K (stored order), N] scratch matrix, gather and
// convert x to fp16 through the permutation, and multiply with cuBLAS (fp32 accumulate).
#include <cooperative_groups.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <numeric>
#include <random>
#include <vector>

#include "backends/cuda/cuda_quant.cuh"
#include "core/log.h"
#include "formats/exl2.h"
#include "formats/gptq.h"
#include "formats/quant_bits.h"

namespace qf::cuda {

namespace cg = cooperative_groups;

CudaQuantLinear::~CudaQuantLinear() {
  cudaFree(qweight);
  cudaFree(unit_tab);
  cudaFree(perm);
  cudaFree(qscale);
  cudaFree(scale_max);
  cudaFree(scales);
  cudaFree(zeros);
  cudaFree(bias);
}

namespace {

constexpr int kRowsPerGemv = 4;  // up to this many rows run the GEMV once per row

struct QArgs {
  const uint32_t* qw;
  int64_t stride;
  const int2* tab;
  const int32_t* perm;
  const uint32_t* qscale;
  int64_t qs_stride;
  const float* smax;
  const __half* scales;
  const uint8_t* zeros;
  const float* bias;
  int K, N, units;
};

__device__ __forceinline__ void load_unit(uint32_t (&r)[8], const QArgs& a, int2 t, int col) {
  const int bits = t.y & 15;
  const uint32_t* p = a.qw + static_cast<int64_t>(t.x) * a.stride + col;
#pragma unroll
  for (int j = 0; j < 8; ++j)
    if (j < bits) r[j] = __ldcs(p + j * a.stride);
}

// The code of row r (0..31) of a unit, placed at mantissa bits [23-B, 23) of 1.0f: f = 1 + q/2^B.
template <int B>
__device__ __forceinline__ float code_f(const uint32_t (&w)[8], int r) {
  constexpr int SH = 23 - B;
  constexpr uint32_t M = ((1u << B) - 1u) << SH;
  const int pos = r * B, wd = pos >> 5, off = pos & 31;
  uint32_t v;
  if (off + B <= 32)
    v = off >= SH ? (w[wd] >> (off - SH)) : (w[wd] << (SH - off));
  else
    v = __funnelshift_r(w[wd], w[wd + 1], off) << SH;
  return __uint_as_float((v & M) | 0x3F800000u);
}

// sum_r f_r x_r over the 32 rows of a unit; xs in shared memory (16-byte aligned).
template <int B>
__device__ __forceinline__ float unit_dot(const uint32_t (&w)[8], const float* xs) {
  float a0 = 0.f, a1 = 0.f;
#pragma unroll
  for (int r = 0; r < 32; r += 4) {
    const float4 xv = *reinterpret_cast<const float4*>(xs + r);
    a0 = fmaf(code_f<B>(w, r), xv.x, a0);
    a1 = fmaf(code_f<B>(w, r + 1), xv.y, a1);
    a0 = fmaf(code_f<B>(w, r + 2), xv.z, a0);
    a1 = fmaf(code_f<B>(w, r + 3), xv.w, a1);
  }
  return a0 + a1;
}

__device__ __forceinline__ float unit_dot_any(int bits, const uint32_t (&w)[8], const float* xs) {
  switch (bits) {
    case 2: return unit_dot<2>(w, xs);
    case 3: return unit_dot<3>(w, xs);
    case 4: return unit_dot<4>(w, xs);
    case 5: return unit_dot<5>(w, xs);
    case 6: return unit_dot<6>(w, xs);
    default: return unit_dot<8>(w, xs);
  }
}

// Scale (times 2^bits) and zero term (1 + z / 2^bits) of column `col` in group g.
template <bool GPTQ>
__device__ __forceinline__ void group_params(const QArgs& a, int g, int bits, int col, float& s, float& zt) {
  const float two_b = static_cast<float>(1 << bits);
  if constexpr (GPTQ) {
    s = __half2float(a.scales[static_cast<int64_t>(g) * a.N + col]) * two_b;
    zt = 1.0f + static_cast<float>(a.zeros[static_cast<int64_t>(g) * a.N + col]) / two_b;
  } else {
    const uint32_t word = __ldg(a.qscale + static_cast<int64_t>(g) * a.qs_stride + (col >> 3));
    const float q = static_cast<float>(((word >> ((col & 7) * 4)) & 15u) + 1u);
    s = q * q * __ldg(a.smax + g) * two_b;
    zt = 1.5f;
  }
}

// y[n] = sum_k W[n, k] x[k] (+ bias); grid.x = column tiles of 32, block = warps splitting K.
template <bool GPTQ>
__global__ void __launch_bounds__(1024) qgemv_kernel(QArgs a, const float* __restrict__ x, float* __restrict__ y) {
  extern __shared__ float4 smem4[];
  float* xs = reinterpret_cast<float*>(smem4);  // [units * 32] x in stored order
  float* xsum = xs + a.units * 32;              // [units]
  float* red = xsum + a.units;                  // [warps * 32]
  int* ps = reinterpret_cast<int*>(red + blockDim.x);  // [K] the permutation (when there is one)
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  const int n = blockIdx.x * 32 + lane;
  const int col = min(n, a.N - 1);
  const int u0 = static_cast<int>(static_cast<int64_t>(a.units) * warp / nw);
  const int u1 = static_cast<int>(static_cast<int64_t>(a.units) * (warp + 1) / nw);
  uint32_t cur[8], nxt[8];
  int2 tc = make_int2(0, 4);
  if (u0 < u1) {
    tc = __ldg(a.tab + u0);
    load_unit(cur, a, tc, col);
  }
  // Everything read so far is weights; the permutation too, so it is staged before the wait and
  // the gather after it costs one dependent load.
  if (a.perm)
    for (int j = threadIdx.x; j < a.K; j += blockDim.x) ps[j] = __ldg(a.perm + j);
  pdl_wait();
  __syncthreads();
  const int kpad = a.units * 32;
#pragma unroll 4
  for (int j = threadIdx.x; j < kpad; j += blockDim.x) xs[j] = j < a.K ? x[a.perm ? ps[j] : j] : 0.f;
  __syncthreads();
  for (int u = warp; u < a.units; u += nw) {
    float v = xs[u * 32 + lane];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) xsum[u] = v;
  }
  __syncthreads();
  float acc = 0.f;
  for (int u = u0; u < u1; ++u) {
    int2 tn = tc;
    if (u + 1 < u1) {
      tn = __ldg(a.tab + u + 1);
      load_unit(nxt, a, tn, col);
    }
    const int bits = tc.y & 15, g = tc.y >> 8;
    const float d = unit_dot_any(bits, cur, xs + u * 32);
    float s, zt;
    group_params<GPTQ>(a, g, bits, col, s, zt);
    acc = fmaf(s, d - zt * xsum[u], acc);
#pragma unroll
    for (int j = 0; j < 8; ++j) cur[j] = nxt[j];
    tc = tn;
  }
  red[warp * 32 + lane] = acc;
  __syncthreads();
  if (warp == 0) {
    float t = 0.f;
    for (int w = 0; w < nw; ++w) t += red[w * 32 + lane];
    if (n < a.N) y[n] = t + (a.bias ? a.bias[n] : 0.f);
  }
}

// ---- decode GEMV, 4 columns per thread (uint4 loads), split K over warps and a thread-block cluster ----
// Block: 128 columns (32 lanes x 4 consecutive columns), nw warps; cluster: cs blocks along grid.y.
// The nw * cs warps of a column tile take consecutive slices of the units; each warp stages the x
// of its own slice (through the permutation) and the unit table in shared memory (no block
// barrier before the main loop), streams its units through a two-stage register ring, and the
// partial sums are added in shared memory and then over the cluster through distributed shared
// memory by block rank 0, which writes y (+ bias). No atomics, no zeroing, deterministic.
// Needs stride % 4 == 0 (uint4 loads); otherwise the kernel above runs.
struct QStage {
  uint32_t w[4][8];  // [column][word of the unit]
  uint32_t p0, p1, p2;  // EXL2: q_scale word, smax bits; GPTQ: 4 fp16 scales (p0, p1), 4 zeros (p2)
};

template <bool GPTQ>
__device__ __forceinline__ void load_stage(QStage& st, const QArgs& a, int2 t, int col) {
  const int bits = t.y & 15, g = t.y >> 8;
  const uint4* p = reinterpret_cast<const uint4*>(a.qw + static_cast<int64_t>(t.x) * a.stride + col);
  const int64_t s4 = a.stride >> 2;
#pragma unroll
  for (int j = 0; j < 8; ++j)
    if (j < bits) {
      const uint4 v = __ldcs(p + j * s4);
      st.w[0][j] = v.x;
      st.w[1][j] = v.y;
      st.w[2][j] = v.z;
      st.w[3][j] = v.w;
    }
  if constexpr (GPTQ) {
    const uint2 sc = __ldg(reinterpret_cast<const uint2*>(a.scales + static_cast<int64_t>(g) * a.N + col));
    st.p0 = sc.x;
    st.p1 = sc.y;
    st.p2 = __ldg(reinterpret_cast<const uint32_t*>(a.zeros + static_cast<int64_t>(g) * a.N + col));
  } else {
    st.p0 = __ldg(a.qscale + static_cast<int64_t>(g) * a.qs_stride + (col >> 3));
    st.p1 = __float_as_uint(__ldg(a.smax + g));
    st.p2 = 0;
  }
}

// d[c] = sum_r f_r(column c) x_r over the 32 rows of a unit (same order as unit_dot).
template <int B>
__device__ __forceinline__ void unit_dot4(const uint32_t (&w)[4][8], const float* xs, float (&d)[4]) {
  float a0[4] = {0.f, 0.f, 0.f, 0.f}, a1[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int r = 0; r < 32; r += 4) {
    const float4 xv = *reinterpret_cast<const float4*>(xs + r);
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      a0[c] = fmaf(code_f<B>(w[c], r), xv.x, a0[c]);
      a1[c] = fmaf(code_f<B>(w[c], r + 1), xv.y, a1[c]);
      a0[c] = fmaf(code_f<B>(w[c], r + 2), xv.z, a0[c]);
      a1[c] = fmaf(code_f<B>(w[c], r + 3), xv.w, a1[c]);
    }
  }
#pragma unroll
  for (int c = 0; c < 4; ++c) d[c] = a0[c] + a1[c];
}

template <bool GPTQ>
__device__ __forceinline__ void consume_stage(const QStage& st, int2 t, int col, const float* xs, float xsum,
                                              float (&acc)[4]) {
  const int bits = t.y & 15;
  float d[4];
  switch (bits) {
    case 2: unit_dot4<2>(st.w, xs, d); break;
    case 3: unit_dot4<3>(st.w, xs, d); break;
    case 4: unit_dot4<4>(st.w, xs, d); break;
    case 5: unit_dot4<5>(st.w, xs, d); break;
    case 6: unit_dot4<6>(st.w, xs, d); break;
    default: unit_dot4<8>(st.w, xs, d); break;
  }
  const float two_b = static_cast<float>(1 << bits);
  if constexpr (GPTQ) {
    const __half2 h01 = *reinterpret_cast<const __half2*>(&st.p0), h23 = *reinterpret_cast<const __half2*>(&st.p1);
    const float sc[4] = {__low2float(h01), __high2float(h01), __low2float(h23), __high2float(h23)};
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const float s = sc[c] * two_b;
      const float zt = 1.0f + static_cast<float>((st.p2 >> (8 * c)) & 255u) / two_b;
      acc[c] = fmaf(s, d[c] - zt * xsum, acc[c]);
    }
  } else {
    const float smax = __uint_as_float(st.p1);
    const int sh = (col & 7) * 4;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const float q = static_cast<float>(((st.p0 >> (sh + 4 * c)) & 15u) + 1u);
      const float s = q * q * smax * two_b;
      acc[c] = fmaf(s, d[c] - 1.5f * xsum, acc[c]);
    }
  }
}

template <bool GPTQ>
__global__ void __launch_bounds__(512) qgemv4_kernel(QArgs a, const float* __restrict__ x, float* __restrict__ y, int upw) {
  extern __shared__ float4 smem4[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  const int cs = gridDim.y, rank = blockIdx.y;
  float* xs = reinterpret_cast<float*>(smem4) + warp * upw * 32;                 // [upw * 32]
  float* red = reinterpret_cast<float*>(smem4) + nw * upw * 32;                  // [nw * 128]
  int2* ts = reinterpret_cast<int2*>(red + nw * 128) + warp * upw;               // [upw]
  float* xsum = reinterpret_cast<float*>(reinterpret_cast<int2*>(red + nw * 128) + nw * upw) + warp * upw;  // [upw]
  const int n0 = blockIdx.x * 128 + lane * 4;
  const int col = min(n0, ((a.N - 1) >> 2) << 2);
  const int S = nw * cs, s = rank * nw + warp;
  const int u0 = static_cast<int>(static_cast<int64_t>(a.units) * s / S);
  const int u1 = static_cast<int>(static_cast<int64_t>(a.units) * (s + 1) / S);
  const int cnt = u1 - u0;
  for (int j = lane; j < cnt; j += 32) ts[j] = __ldg(a.tab + u0 + j);
  __syncwarp();
  QStage A, B;
  if (cnt > 0) load_stage<GPTQ>(A, a, ts[0], col);
  if (cnt > 1) load_stage<GPTQ>(B, a, ts[1], col);
  // Permutation of this warp's rows (immutable), staged before the wait as ints in xs.
  int* pi = reinterpret_cast<int*>(xs);
  for (int i = 0; i < cnt; ++i) {
    const int row = (u0 + i) * 32 + lane;
    pi[i * 32 + lane] = row < a.K ? (a.perm ? __ldg(a.perm + row) : row) : -1;
  }
  pdl_wait();
  for (int i = 0; i < cnt; ++i) {
    const int k = pi[i * 32 + lane];
    float v = k >= 0 ? x[k] : 0.f;
    xs[i * 32 + lane] = v;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) xsum[i] = v;
  }
  __syncwarp();
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int i = 0; i < cnt; i += 2) {
    consume_stage<GPTQ>(A, ts[i], col, xs + i * 32, xsum[i], acc);
    if (i + 2 < cnt) load_stage<GPTQ>(A, a, ts[i + 2], col);
    if (i + 1 < cnt) {
      consume_stage<GPTQ>(B, ts[i + 1], col, xs + (i + 1) * 32, xsum[i + 1], acc);
      if (i + 3 < cnt) load_stage<GPTQ>(B, a, ts[i + 3], col);
    }
  }
  *reinterpret_cast<float4*>(red + warp * 128 + lane * 4) = make_float4(acc[0], acc[1], acc[2], acc[3]);
  __syncthreads();
  for (int c = threadIdx.x; c < 128; c += blockDim.x) {
    float t = 0.f;
    for (int w = 0; w < nw; ++w) t += red[w * 128 + c];
    red[c] = t;
  }
  // Clusters exist from sm_90 on; the host plans cs == 1 on older devices (gemv4_plan).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (cs == 1) {
    __syncthreads();
  } else {
    cg::this_cluster().sync();
  }
#else
  if (cs > 1) __trap();
  __syncthreads();
#endif
  if (rank == 0) {
    for (int c = threadIdx.x; c < 128; c += blockDim.x) {
      const int n = blockIdx.x * 128 + c;
      float t = red[c];
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
      if (cs > 1) {
        cg::cluster_group cl = cg::this_cluster();
        for (int r = 1; r < cs; ++r) t += cl.map_shared_rank(red, r)[c];
      }
#endif
      if (n < a.N) y[n] = t + (a.bias ? a.bias[n] : 0.f);
    }
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (cs > 1) cg::this_cluster().sync();
#endif
}

// out[j, n] = W[n, perm[j]] in fp16 for stored rows j < K; grid (column tiles, unit blocks of 8),
// one warp per unit.
template <bool GPTQ>
__global__ void __launch_bounds__(256) qdequant_kernel(QArgs a, __half* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int u = blockIdx.y * 8 + (threadIdx.x >> 5);
  const int n = blockIdx.x * 32 + lane;
  pdl_wait();
  if (u >= a.units) return;
  const int col = min(n, a.N - 1);
  const int2 t = __ldg(a.tab + u);
  uint32_t w[8];
  load_unit(w, a, t, col);
  const int bits = t.y & 15, g = t.y >> 8;
  float s, zt;
  group_params<GPTQ>(a, g, bits, col, s, zt);
  if (n >= a.N) return;
  float v[32];
  switch (bits) {
#define QF_DQ(B)                                                \
  case B:                                                       \
    _Pragma("unroll") for (int r = 0; r < 32; ++r) v[r] = code_f<B>(w, r); \
    break;
    QF_DQ(2) QF_DQ(3) QF_DQ(4) QF_DQ(5) QF_DQ(6)
    default:
      _Pragma("unroll") for (int r = 0; r < 32; ++r) v[r] = code_f<8>(w, r);
#undef QF_DQ
  }
  const int rmax = min(32, a.K - u * 32);
#pragma unroll
  for (int r = 0; r < 32; ++r)
    if (r < rmax) out[static_cast<int64_t>(u * 32 + r) * a.N + n] = __float2half_rn((v[r] - zt) * s);
}

// xh[r, j] = x[r, perm[j]] in fp16.
__global__ void gather_half_kernel(const float* __restrict__ x, const int32_t* __restrict__ perm, __half* __restrict__ xh,
                                   int64_t rows, int K) {
  pdl_wait();
  const int64_t total = rows * K;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t r = i / K;
    const int j = static_cast<int>(i - r * K);
    xh[i] = __float2half_rn(x[r * K + (perm ? perm[j] : j)]);
  }
}

__global__ void fill_u32_kernel(uint32_t* dst, size_t n, uint64_t seed, uint32_t mask, uint32_t add) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const uint64_t z = mix64(seed * 0x9e3779b97f4a7c15ULL + i);
    dst[i] = (static_cast<uint32_t>(z) & mask) + add;
  }
}

QArgs args_of(const CudaQuantLinear& w) {
  QArgs a;
  a.qw = w.qweight;
  a.stride = w.stride;
  a.tab = w.unit_tab;
  a.perm = w.perm;
  a.qscale = w.qscale;
  a.qs_stride = w.qscale_stride;
  a.smax = w.scale_max;
  a.scales = w.scales;
  a.zeros = w.zeros;
  a.bias = w.bias;
  a.K = static_cast<int>(w.in_features);
  a.N = static_cast<int>(w.out_features);
  a.units = w.units;
  return a;
}

int smem_optin() {
  static int v = [] {
    int dev = 0, bytes = 48 << 10;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    cudaFuncSetAttribute(qgemv_kernel<false>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    cudaFuncSetAttribute(qgemv_kernel<true>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    return bytes;
  }();
  return v;
}

// Warps per block (they split K): enough that ~48 warps per SM are in flight over the grid of
// column tiles (QFORGE_QGEMV_WPS tunes it), at most 32, at most one per 32-row unit.
int gemv_warps(const CudaQuantLinear& w, int sms) {
  static const int per_sm = [] {
    const char* e = std::getenv("QFORGE_QGEMV_WPS");
    return e && std::atoi(e) > 0 ? std::atoi(e) : 48;
  }();
  const int tiles = static_cast<int>((w.out_features + 31) / 32);
  const int target = sms * per_sm;
  int nw = 4;
  while (nw < 32 && tiles * nw < target) nw *= 2;
  return std::max(1, std::min(nw, w.units));
}

size_t gemv_smem(const CudaQuantLinear& w, int nw) {
  return (static_cast<size_t>(w.units) * 33 + static_cast<size_t>(nw) * 32 + (w.perm ? static_cast<size_t>(w.in_features) : 0)) *
         sizeof(float);
}

// Plan of the 4-column GEMV: cluster size cs (K split over blocks) until there are >= 2 blocks per
// SM, then warps per block so that ~QFORGE_QGEMV4_WPS (default 16) warps per SM run over the
// grid; upw = units per warp (shared memory per warp: upw * 35 words). cs = 0: not usable.
struct Gemv4Plan { int cs = 0, nw = 0, upw = 0; size_t smem = 0; };

int env_int(const char* name, int def) {
  const char* e = std::getenv(name);
  return e && std::atoi(e) > 0 ? std::atoi(e) : def;
}

Gemv4Plan gemv4_plan(const CudaQuantLinear& w, int sms, int cc_major) {
  static const int enabled = [] { const char* e = std::getenv("QFORGE_QGEMV4"); return e && e[0] == '0' ? 0 : 1; }();
  static const int wps = env_int("QFORGE_QGEMV4_WPS", 16), env_cs = env_int("QFORGE_QGEMV4_CS", 8);
  const int max_cs = cc_major >= 9 ? env_cs : 1;  // thread-block clusters need sm_90
  Gemv4Plan p;
  if (!enabled || w.stride % 4 != 0 || (reinterpret_cast<uintptr_t>(w.qweight) & 15) != 0 || w.units < 1) return p;
  if (w.format == LinearFormat::GPTQ && w.stride != w.out_features) return p;
  const int64_t tiles = (w.out_features + 127) / 128;
  int cs = 1;
  while (cs < max_cs && cs * 2 <= w.units && tiles * cs < 2 * sms) cs *= 2;
  int nw = static_cast<int>(std::clamp<int64_t>(static_cast<int64_t>(sms) * wps / (tiles * cs), 1, 16));
  nw = std::min(nw, std::max(1, w.units / cs));
  const int upw = (w.units + nw * cs - 1) / (nw * cs);
  p.smem = (static_cast<size_t>(nw) * upw * 35 + static_cast<size_t>(nw) * 128) * sizeof(float);
  if (p.smem > 48u << 10) return p;
  p.cs = cs;
  p.nw = nw;
  p.upw = upw;
  return p;
}

template <bool GPTQ>
void launch_gemv4(const Gemv4Plan& p, const QArgs& a, const float* x, float* y, int64_t N, cudaStream_t s) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>((N + 127) / 128), static_cast<unsigned>(p.cs));
  cfg.blockDim = dim3(static_cast<unsigned>(p.nw * 32));
  cfg.dynamicSmemBytes = p.smem;
  cfg.stream = s;
  cudaLaunchAttribute attr[2];
  int na = 0;
  if (p.cs > 1) {
    attr[na].id = cudaLaunchAttributeClusterDimension;
    attr[na].val.clusterDim.x = 1;
    attr[na].val.clusterDim.y = static_cast<unsigned>(p.cs);
    attr[na].val.clusterDim.z = 1;
    ++na;
  }
  if (pdl_enabled()) {
    attr[na].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[na].val.programmaticStreamSerializationAllowed = 1;
    ++na;
  }
  cfg.attrs = attr;
  cfg.numAttrs = static_cast<unsigned>(na);
  QF_CUDA(cudaLaunchKernelEx(&cfg, qgemv4_kernel<GPTQ>, a, x, y, p.upw));
}

void launch_gemv(CudaBackend& b, const CudaQuantLinear& w, const float* x, float* y) {
  const QArgs a = args_of(w);
  if (const Gemv4Plan p = gemv4_plan(w, b.sm_count(), b.cc_major()); p.cs > 0) {
    if (w.format == LinearFormat::GPTQ)
      launch_gemv4<true>(p, a, x, y, w.out_features, stream_of(b));
    else
      launch_gemv4<false>(p, a, x, y, w.out_features, stream_of(b));
    return;
  }
  const int nw = gemv_warps(w, b.sm_count());
  const size_t smem = gemv_smem(w, nw);
  smem_optin();
  const dim3 grid(static_cast<unsigned>((w.out_features + 31) / 32));
  if (w.format == LinearFormat::GPTQ)
    launch(qgemv_kernel<true>, grid, dim3(nw * 32), smem, stream_of(b), a, x, y);
  else
    launch(qgemv_kernel<false>, grid, dim3(nw * 32), smem, stream_of(b), a, x, y);
  QF_CUDA_LAUNCH();
}

// ---- host-side construction ----------------------------------------------------------------------

template <typename T>
T* upload_vec(const std::vector<T>& v, size_t* allocated, size_t extra_bytes = 0) {
  T* p = nullptr;
  const size_t bytes = v.size() * sizeof(T);
  QF_CUDA(cudaMalloc(&p, std::max<size_t>(bytes + extra_bytes, 4)));
  if (bytes) QF_CUDA(cudaMemcpy(p, v.data(), bytes, cudaMemcpyHostToDevice));
  if (extra_bytes) QF_CUDA(cudaMemset(reinterpret_cast<char*>(p) + bytes, 0, extra_bytes));
  *allocated += bytes + extra_bytes;
  return p;
}

bool identity(const std::vector<int32_t>& p) {
  for (size_t j = 0; j < p.size(); ++j)
    if (p[j] != static_cast<int32_t>(j)) return false;
  return true;
}

void finish_common(CudaQuantLinear& l, const LinearWeight& w, const std::vector<int2>& tab,
                   const std::vector<int32_t>& perm) {
  l.units = static_cast<int>(tab.size());
  l.unit_tab = upload_vec(tab, &l.allocated);
  l.bytes += tab.size() * sizeof(int2);
  if (!perm.empty() && !identity(perm)) {
    l.perm = upload_vec(perm, &l.allocated);
    l.bytes += perm.size() * 4;
  }
  if (w.bias) {
    const std::vector<float> bv = to_f32(*w.bias);
    l.bias = upload_vec(bv, &l.allocated);
  }
}

// Dense fp16 fallback through the format's own dequantize().
std::unique_ptr<DeviceLinear> dense_fallback(CudaBackend& b, const LinearWeight& w, const std::string& why,
                                             int* fallbacks) {
  log_warn("linear layer '", w.name, "' (", linear_format_name(w.format), "): ", why,
           "; running it dequantized to fp16 on the GPU");
  if (fallbacks) ++*fallbacks;
  const int64_t K = w.in_features, N = w.out_features;
  std::vector<float> f(static_cast<size_t>(K * N));
  w.quant->dequantize(f.data());
  auto h = std::make_shared<std::vector<uint16_t>>(f.size());
  for (size_t i = 0; i < f.size(); ++i) (*h)[i] = f32_to_fp16(f[i]);
  LinearWeight d;
  d.name = w.name;
  d.in_features = K;
  d.out_features = N;
  d.bias = w.bias;
  d.weight = TensorView{DType::F16, {N, K}, h->data(), h};
  return b.make_linear(d);
}

bool smem_fits(int64_t K) {
  const int64_t units = (K + 31) / 32;
  return static_cast<int64_t>((units * 33 + 32 * 32 + K) * 4) <= smem_optin();
}

std::unique_ptr<DeviceLinear> make_exl2(CudaBackend& b, const LinearWeight& w, const Exl2Linear& q, int* fallbacks) {
  const int64_t K = w.in_features, N = w.out_features;
  const auto& groups = q.groups();
  std::vector<int2> tab;
  int64_t packed_rows = 0;
  for (size_t g = 0; g < groups.size(); ++g) {
    const Exl2Group& gr = groups[g];
    if (gr.row0 % 32 != 0 || (g + 1 < groups.size() && gr.rows % 32 != 0))
      return dense_fallback(b, w, str("group ", g, " (", gr.bits, "-bit, ", gr.rows, " rows) is not a whole number of 32-row units"), fallbacks);
    for (int64_t r = 0; r < gr.rows; r += 32)
      tab.push_back(make_int2(static_cast<int>(gr.word0 + r / 32 * gr.bits), static_cast<int>(g << 8) | gr.bits));
    packed_rows = std::max(packed_rows, gr.word0 + gr.words);
  }
  if (!smem_fits(K)) return dense_fallback(b, w, str(K, " input features exceed the GEMV's shared memory"), fallbacks);
  auto l = std::make_unique<CudaQuantLinear>();
  l->format = LinearFormat::EXL2;
  l->in_features = K;
  l->out_features = N;
  l->stride = q.packed_stride();
  l->packed_rows = packed_rows;
  l->groups = static_cast<int64_t>(groups.size());
  // q_weight as stored, plus 8 zero rows: a partial last unit reads whole units.
  const size_t qw_bytes = static_cast<size_t>(packed_rows * l->stride) * 4, slack = static_cast<size_t>(8 * l->stride) * 4;
  b.check_fits(qw_bytes + slack, str("the model (layer '", w.name, "')"));
  QF_CUDA(cudaMalloc(&l->qweight, qw_bytes + slack));
  QF_CUDA(cudaMemcpy(l->qweight, q.packed(), qw_bytes, cudaMemcpyHostToDevice));
  QF_CUDA(cudaMemset(reinterpret_cast<char*>(l->qweight) + qw_bytes, 0, slack));
  l->allocated += qw_bytes + slack;
  l->bytes += qw_bytes;
  // q_scale codes: recovered from the group scales (s = (qs+1)^2 * max / 256 exactly).
  l->qscale_stride = (N + 7) / 8;
  std::vector<uint32_t> qs(static_cast<size_t>(l->groups * l->qscale_stride), 0u);
  std::vector<float> smax(groups.size());
  float s[64];
  for (size_t g = 0; g < groups.size(); ++g) {
    smax[g] = groups[g].scale_max / 256.0f;
    for (int64_t n0 = 0; n0 < N; n0 += 64) {
      const int nt = static_cast<int>(std::min<int64_t>(64, N - n0));
      q.group_scales(g, n0, nt, s);
      for (int j = 0; j < nt; ++j) {
        const int64_t n = n0 + j;
        uint32_t code = 0;
        if (smax[g] > 0) {
          const double qq = std::sqrt(static_cast<double>(s[j]) / static_cast<double>(smax[g]));
          code = static_cast<uint32_t>(std::clamp(std::lround(qq) - 1, 0L, 15L));
        }
        qs[static_cast<size_t>(static_cast<int64_t>(g) * l->qscale_stride + n / 8)] |= code << (4 * (n % 8));
      }
    }
  }
  l->qscale = upload_vec(qs, &l->allocated);
  l->scale_max = upload_vec(smax, &l->allocated);
  l->bytes += qs.size() * 4 + smax.size() * 4;
  finish_common(*l, w, tab, q.perm());
  b.note_weight_bytes(l->allocated);
  return l;
}

std::unique_ptr<DeviceLinear> make_gptq(CudaBackend& b, const LinearWeight& w, const GptqLinear& q, int* fallbacks) {
  const int64_t K = w.in_features, N = w.out_features;
  const int bits = q.bits();
  const auto& gidx = q.g_idx();
  // Stored order: rows sorted by group (stable), so that groups are contiguous.
  std::vector<int32_t> order(static_cast<size_t>(K));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t c) { return gidx[static_cast<size_t>(a)] < gidx[static_cast<size_t>(c)]; });
  std::vector<int2> tab;
  for (int64_t j = 0; j < K; j += 32) {
    const int32_t g = gidx[static_cast<size_t>(order[static_cast<size_t>(j)])];
    for (int64_t r = j; r < std::min<int64_t>(K, j + 32); ++r)
      if (gidx[static_cast<size_t>(order[static_cast<size_t>(r)])] != g)
        return dense_fallback(b, w, "its groups are not whole 32-row units", fallbacks);
    tab.push_back(make_int2(static_cast<int>(j / 32 * bits), (g << 8) | bits));
  }
  if (!smem_fits(K)) return dense_fallback(b, w, str(K, " input features exceed the GEMV's shared memory"), fallbacks);
  auto l = std::make_unique<CudaQuantLinear>();
  l->format = LinearFormat::GPTQ;
  l->in_features = K;
  l->out_features = N;
  l->stride = N;
  l->packed_rows = (K * bits + 31) / 32;
  l->groups = q.n_groups();
  const size_t qw_words = static_cast<size_t>(l->packed_rows * N);
  const size_t slack = static_cast<size_t>(8 * N) * 4;
  b.check_fits(qw_words * 4 + slack, str("the model (layer '", w.name, "')"));
  QF_CUDA(cudaMalloc(&l->qweight, qw_words * 4 + slack));
  QF_CUDA(cudaMemset(reinterpret_cast<char*>(l->qweight) + qw_words * 4, 0, slack));
  l->allocated += qw_words * 4 + slack;
  l->bytes += qw_words * 4;
  if (identity(order)) {
    QF_CUDA(cudaMemcpy(l->qweight, q.packed(), qw_words * 4, cudaMemcpyHostToDevice));
  } else {
    // Act-order: re-pack the codes in the sorted row order (ExLlamaV2's make_sequential).
    std::vector<uint32_t> re(qw_words, 0u);
    const uint32_t* src = q.packed();
    for (int64_t j = 0; j < K; ++j) {
      const int64_t k = order[static_cast<size_t>(j)];
      const int64_t pos = j * bits;
      const int64_t wd = pos >> 5;
      const int off = static_cast<int>(pos & 31);
      for (int64_t n = 0; n < N; ++n) {
        const uint32_t v = read_packed(src + n, N, k * bits, bits);
        re[static_cast<size_t>(wd * N + n)] |= v << off;
        if (off + bits > 32) re[static_cast<size_t>((wd + 1) * N + n)] |= v >> (32 - off);
      }
    }
    QF_CUDA(cudaMemcpy(l->qweight, re.data(), qw_words * 4, cudaMemcpyHostToDevice));
  }
  std::vector<__half> sc(static_cast<size_t>(l->groups * N));
  std::vector<uint8_t> zr(static_cast<size_t>(l->groups * N));
  for (int64_t g = 0; g < l->groups; ++g)
    for (int64_t n = 0; n < N; ++n) {
      sc[static_cast<size_t>(g * N + n)] = __float2half_rn(q.scale(g, n));
      zr[static_cast<size_t>(g * N + n)] = static_cast<uint8_t>(q.zero(g, n));
    }
  l->scales = upload_vec(sc, &l->allocated);
  l->zeros = upload_vec(zr, &l->allocated);
  l->bytes += sc.size() * 2 + zr.size();
  finish_common(*l, w, tab, order);
  b.note_weight_bytes(l->allocated);
  return l;
}

}  // namespace

std::unique_ptr<DeviceLinear> make_quant_linear(CudaBackend& b, const LinearWeight& w, int* fallbacks) {
  QF_CHECK(w.quant, "linear layer '", w.name, "': ", linear_format_name(w.format), " layer without its tensors");
  if (w.in_features >= (1LL << 30) || w.out_features >= (1LL << 30))
    fail("linear layer '", w.name, "' is too large for the quantized kernels");
  if (const auto* e = dynamic_cast<const Exl2Linear*>(w.quant.get())) return make_exl2(b, w, *e, fallbacks);
  if (const auto* g = dynamic_cast<const GptqLinear*>(w.quant.get())) return make_gptq(b, w, *g, fallbacks);
  return dense_fallback(b, w, "unknown quantized layout", fallbacks);
}

void quant_linear_forward(CudaBackend& b, const CudaQuantLinear& w, const float* x, float* y, int64_t rows) {
  const int64_t K = w.in_features, N = w.out_features;
  if (rows <= kRowsPerGemv) {
    for (int64_t r = 0; r < rows; ++r) launch_gemv(b, w, x + r * K, y + r * N);
    return;
  }
  cudaStream_t s = stream_of(b);
  const QArgs a = args_of(w);
  auto* wt = static_cast<__half*>(b.scratch(static_cast<size_t>(K * N) * 2, 4));
  auto* xh = static_cast<__half*>(b.scratch(static_cast<size_t>(rows * K) * 2, 0));
  const dim3 dgrid(static_cast<unsigned>((N + 31) / 32), static_cast<unsigned>((w.units + 7) / 8));
  if (w.format == LinearFormat::GPTQ)
    launch(qdequant_kernel<true>, dgrid, dim3(256), 0, s, a, wt);
  else
    launch(qdequant_kernel<false>, dgrid, dim3(256), 0, s, a, wt);
  QF_CUDA_LAUNCH();
  const int ggrid = grid_for(rows * K, 256, 8192);
  launch(gather_half_kernel, dim3(ggrid), dim3(256), 0, s, x, static_cast<const int32_t*>(w.perm), xh, rows,
         static_cast<int>(K));
  QF_CUDA_LAUNCH();
  auto h = static_cast<cublasHandle_t>(b.cublas());
  const float alpha = 1.f, beta = 0.f;
  // Column-major: y^T [N, rows] = Wt [N, K] (ld N) * xh^T [K, rows] (ld K).
  QF_CUBLAS(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, static_cast<int>(N), static_cast<int>(rows), static_cast<int>(K),
                         &alpha, wt, CUDA_R_16F, static_cast<int>(N), xh, CUDA_R_16F, static_cast<int>(K), &beta, y,
                         CUDA_R_32F, static_cast<int>(N), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  if (w.bias) add_bias(y, w.bias, rows, N, s);
}

// ---- random layers for the benchmark -------------------------------------------------------------

namespace {

void fill_u32(uint32_t* dst, size_t n, uint64_t seed, uint32_t mask, uint32_t add, cudaStream_t s) {
  if (n == 0) return;
  const int grid = grid_for(static_cast<int64_t>(n), 256, 132 * 32);
  fill_u32_kernel<<<grid, 256, 0, s>>>(dst, n, seed, mask, add);
  QF_CUDA_LAUNCH();
}

std::vector<int32_t> random_perm(int64_t K, uint64_t seed) {
  std::vector<int32_t> p(static_cast<size_t>(K));
  std::iota(p.begin(), p.end(), 0);
  std::mt19937_64 rng(seed);
  std::shuffle(p.begin(), p.end(), rng);
  return p;
}

}  // namespace

}  // namespace qf::cuda

namespace qf {

using namespace qf::cuda;

std::unique_ptr<DeviceLinear> CudaBackend::make_random_exl2_linear(int64_t in, int64_t out,
                                                                   const std::vector<QuantMixPart>& mix,
                                                                   uint64_t seed, size_t* bytes_read) {
  QF_CHECK(in % 32 == 0, "random EXL2 layers need in_features % 32 == 0");
  auto l = std::make_unique<CudaQuantLinear>();
  l->format = LinearFormat::EXL2;
  l->in_features = in;
  l->out_features = out;
  l->stride = (out + 31) / 32 * 32;
  // Parts in descending bit width; rows of each part rounded to 32, the last takes the rest.
  std::vector<QuantMixPart> parts = mix;
  std::stable_sort(parts.begin(), parts.end(), [](const QuantMixPart& a, const QuantMixPart& c) { return a.bits > c.bits; });
  std::vector<int2> tab;
  std::vector<float> smax;
  int64_t row = 0, word = 0, g = 0;
  for (size_t p = 0; p < parts.size(); ++p) {
    int64_t rows = p + 1 == parts.size() ? in - row
                                         : std::min<int64_t>(in - row, std::llround(parts[p].frac * static_cast<double>(in) / 32.0) * 32);
    const int bits = parts[p].bits;
    const int64_t gs = std::max<int64_t>(32, parts[p].group / 32 * 32);
    for (int64_t r = 0; r < rows; r += gs, ++g) {
      const int64_t gr = std::min(gs, rows - r);
      for (int64_t u = 0; u < gr; u += 32) {
        tab.push_back(make_int2(static_cast<int>(word), static_cast<int>(g << 8) | bits));
        word += bits;
      }
      smax.push_back(1.0f / (std::sqrt(static_cast<float>(in)) * static_cast<float>(1 << (bits - 1))) / 256.0f);
    }
    row += rows;
  }
  l->packed_rows = word;
  l->groups = g;
  cudaStream_t s = stream_of(*this);
  const size_t qw_words = static_cast<size_t>(word * l->stride);
  check_fits(qw_words * 4 + static_cast<size_t>(8 * l->stride) * 4, "a random EXL2 layer");
  QF_CUDA(cudaMalloc(&l->qweight, qw_words * 4 + static_cast<size_t>(8 * l->stride) * 4));
  QF_CUDA(cudaMemsetAsync(l->qweight, 0, qw_words * 4 + static_cast<size_t>(8 * l->stride) * 4, s));
  fill_u32(l->qweight, qw_words, seed, 0xffffffffu, 0, s);
  l->qscale_stride = (out + 7) / 8;
  const size_t qs_words = static_cast<size_t>(g * l->qscale_stride);
  QF_CUDA(cudaMalloc(&l->qscale, qs_words * 4));
  fill_u32(l->qscale, qs_words, seed + 1, 0xffffffffu, 0, s);
  l->scale_max = upload_vec(smax, &l->allocated);
  l->bytes = qw_words * 4 + qs_words * 4 + smax.size() * 4;
  l->allocated += qw_words * 4 + qs_words * 4;
  LinearWeight dummy;
  finish_common(*l, dummy, tab, random_perm(in, seed + 2));
  note_weight_bytes(l->allocated);
  if (bytes_read) *bytes_read = l->bytes;
  return l;
}

std::unique_ptr<DeviceLinear> CudaBackend::make_random_gptq_linear(int64_t in, int64_t out, int bits, int64_t group,
                                                                   bool act_order, uint64_t seed, size_t* bytes_read) {
  QF_CHECK(in % 32 == 0 && (group < 0 || group % 32 == 0), "random GPTQ layers need in_features and group % 32 == 0");
  auto l = std::make_unique<CudaQuantLinear>();
  l->format = LinearFormat::GPTQ;
  l->in_features = in;
  l->out_features = out;
  l->stride = out;
  const int64_t gs = group < 0 ? in : group;
  l->groups = (in + gs - 1) / gs;
  l->packed_rows = in * bits / 32;
  std::vector<int2> tab;
  for (int64_t j = 0; j < in; j += 32)
    tab.push_back(make_int2(static_cast<int>(j / 32 * bits), static_cast<int>((j / gs) << 8) | bits));
  cudaStream_t s = stream_of(*this);
  const size_t qw_words = static_cast<size_t>(l->packed_rows * out);
  const size_t slack = static_cast<size_t>(8 * out) * 4;
  check_fits(qw_words * 4 + slack, "a random GPTQ layer");
  QF_CUDA(cudaMalloc(&l->qweight, qw_words * 4 + slack));
  QF_CUDA(cudaMemsetAsync(l->qweight, 0, qw_words * 4 + slack, s));
  fill_u32(l->qweight, qw_words, seed, 0xffffffffu, 0, s);
  const size_t gn = static_cast<size_t>(l->groups * out);
  QF_CUDA(cudaMalloc(&l->scales, gn * 2));
  fill_random(l->scales, DType::F16, gn, 1.0f / (8.0f * std::sqrt(static_cast<float>(in))), 0.2f / (8.0f * std::sqrt(static_cast<float>(in))), seed + 1, s);
  QF_CUDA(cudaMalloc(&l->zeros, gn));
  // Zeros 7..8 (random bytes masked), written as 32-bit words over the byte array.
  std::vector<uint8_t> z(gn);
  std::mt19937 rng(static_cast<uint32_t>(seed));
  const int mid = 1 << (bits - 1);
  for (auto& v : z) v = static_cast<uint8_t>(mid - static_cast<int>(rng() & 1u));
  QF_CUDA(cudaMemcpy(l->zeros, z.data(), gn, cudaMemcpyHostToDevice));
  l->bytes = qw_words * 4 + gn * 3;
  l->allocated += qw_words * 4 + slack + gn * 3;
  LinearWeight dummy;
  finish_common(*l, dummy, tab, act_order ? random_perm(in, seed + 2) : std::vector<int32_t>{});
  note_weight_bytes(l->allocated);
  if (bytes_read) *bytes_read = l->bytes;
  return l;
}

}  // namespace qf
