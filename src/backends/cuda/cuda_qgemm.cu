// Quantized GEMM for 2 to 64 activation rows (EXL2 and GPTQ, every bit width) on tensor cores:
// each weight is read once for all rows, so a batch of decode tokens costs about what one does.
//
// The codes stay in the device layout the decode GEMV reads (cuda_quant.cuh); what makes them fit
// mma.sync m16n8k16 is the order of K inside a 32-row unit. A unit is two k16 steps; in each, lane
// (g = lane / 4, t = lane % 4) supplies B[2t, 2t+1] and B[2t+8, 2t+9] of column g as two half2. For
// every width there are two codes in one word (or plane) exactly 16 bits apart, so one shift and
// one mask leave both in the low bits of the two halves; OR-ing in 0x6400 makes each half
// 1024 + q exactly, a subtraction of 1024 + z gives q - z exactly, and a multiply by the group
// scale times 2^10 gives the fp16 weight times 2^10 (small scales stay out of fp16's subnormal
// range; weights up to 64 in magnitude fit), the sums scaled back exactly at the end. Which unit rows those are
// (pair_row) depends only on the width, so x is written once per launch in that order
// (qgemm_prep_kernel): fp16, gathered through the act-order permutation, rows padded to 16.
//
// A block takes 32 columns and a slice of the units; its 4 warps split the slice and add their
// tiles in shared memory; slices are added by the last block of each column tile to arrive, in
// order (deterministic, as the GEMV). A row's result does not depend on the other rows.
#include <algorithm>
#include <array>
#include <cmath>

#include "backends/cuda/cuda_quant.cuh"
#include "backends/cuda/cuda_quant_codes.cuh"

namespace qf::cuda {

namespace {

constexpr int kQgWarps = 4;
constexpr int kQgCols = 32;  // columns per block: 4 n8 tiles, each warp all of them
constexpr int kQgMaxTiles = 4;  // 16-row tiles: up to 64 rows
constexpr float kQgPrescale = 1024.f;  // weights are formed times this in fp16
constexpr int kQgTab = 64;             // unit table entries a warp keeps in shared memory

// The unit row (0..31) in half e (0 low, 1 high) of pair p (0..3) of quad lane t: pair p of a
// unit feeds k16 step p / 2, register p % 2 (rows 2t, 2t+1 or 2t+8, 2t+9 of the step).
//   2, 3 bits: word t/2 of the 2-bit plane, fields 4 (t%2) + p and + 8 (bits 16 apart);
//   4, 5, 6:   word t of the 4-bit plane, nibbles p and p + 4;
//   8:         word 2t + p/2, bytes p%2 and p%2 + 2.
__host__ __device__ __forceinline__ int pair_row(int bits, int t, int p, int e) {
  if (bits == 2 || bits == 3) return 16 * (t >> 1) + 4 * (t & 1) + p + 8 * e;
  if (bits == 8 || bits == 7) return 8 * t + 4 * (p >> 1) + (p & 1) + 2 * e;
  return 8 * t + p + 4 * e;
}

// Both codes of pair p in the low bits of the two 16-bit halves; w0 is the low plane's word (or
// the 8-bit unit's first word), w1 the high plane's word (or the 8-bit unit's second). The planar
// layouts (cuda_quant_codes.cuh) put the high bits of the two rows 16 bits apart too.
template <int B>
__device__ __forceinline__ uint32_t pair_codes(uint32_t w0, uint32_t w1, int t, int p) {
  if constexpr (B == 2 || B == 3) {
    uint32_t c = (w0 >> (2 * (4 * (t & 1) + p))) & 0x00030003u;
    if constexpr (B == 3) c |= ((w1 >> (8 * (t & 1) + 4 * (t >> 1) + p)) & 0x00010001u) << 2;
    return c;
  } else if constexpr (B == 8) {
    return ((p >> 1 ? w1 : w0) >> (8 * (p & 1))) & 0x00FF00FFu;
  } else {
    uint32_t c = (w0 >> (4 * p)) & 0x000F000Fu;
    if constexpr (B == 5) c |= ((w1 >> (8 * (p >> 1) + 2 * t + (p & 1))) & 0x00010001u) << 4;
    if constexpr (B == 6) c |= ((w1 >> (8 * (p >> 1) + 4 * (t & 1) + 2 * (p & 1))) & 0x00030003u) << 4;
    return c;
  }
}

// Which words of a unit's column quad lane t reads (second -1: none).
__device__ __forceinline__ void pair_words(int bits, int t, int& i0, int& i1) {
  switch (bits) {
    case 2: i0 = t >> 1, i1 = -1; break;
    case 3: i0 = t >> 1, i1 = 2; break;
    case 4: i0 = t, i1 = -1; break;
    case 5: i0 = t, i1 = 4; break;
    case 6: i0 = t, i1 = 4 + (t >> 1); break;
    default: i0 = 2 * t, i1 = 2 * t + 1; break;
  }
}

__device__ __forceinline__ uint32_t weight_pair(uint32_t codes, __half2 z, __half2 s) {
  const uint32_t biased = codes | 0x64006400u;  // 1024 + q in each half, exactly
  const __half2 w = __hmul2(__hsub2(*reinterpret_cast<const __half2*>(&biased), z), s);
  return *reinterpret_cast<const uint32_t*>(&w);
}

__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

struct QGemmArgs {
  const uint32_t* qw;
  int64_t stride;
  const int2* tab;
  const uint32_t* qscale;
  int64_t qs_stride;
  const float* smax;
  const __half* scales;
  const uint8_t* zeros;
  const float* bias;
  const __half* xh;  // [16 MT][units * 32], each unit's rows in pair order
  float* y;          // [rows][N]
  int rows, N, units, ks;
  int accumulate;    // y += result instead of y = result
  float* partial;    // [tiles][ks][rows][kQgCols]
  int* counters;     // one per column tile, zero between launches
};

// x in pair order: xh[r][32 u + 16 s + 8 h + 2 t + e] = x[r][perm[32 u + pair_row(bits, t, 2 s + h, e)]],
// for up to three matrices at once (blockIdx.y; each its own permutation and widths). With `norm`
// the row is RMS-normalised first (x * norm * inv, inv from the whole row). One block per row;
// rows past `rows` (up to the 16-row padding) are zeros.
struct PrepArgs {
  const float* x;
  const float* norm;
  float eps;
  int rows, K, units;
  const int32_t* perm[3];
  const int2* tab[3];
  __half* xh[3];
};

__global__ void __launch_bounds__(256) qgemm_prep_kernel(const __grid_constant__ PrepArgs a) {
  __shared__ float red[8];
  pdl_wait();
  const int r = blockIdx.x, m = blockIdx.y;
  const int kx = a.units * 32;
  __half* out = a.xh[m] + static_cast<int64_t>(r) * kx;
  if (r >= a.rows) {
    for (int i = threadIdx.x; i < kx; i += blockDim.x) out[i] = __float2half_rn(0.f);
    return;
  }
  const float* x = a.x + static_cast<int64_t>(r) * a.K;
  float inv = 1.f;
  if (a.norm) {
    float ss = 0.f;
    for (int i = threadIdx.x; i < a.K; i += blockDim.x) ss = fmaf(x[i], x[i], ss);
    ss = warp_sum(ss);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = ss;
    __syncthreads();
    ss = 0.f;
    for (int w = 0; w < static_cast<int>(blockDim.x) / 32; ++w) ss += red[w];
    inv = rsqrtf(ss / static_cast<float>(a.K) + a.eps);
  }
  const int32_t* perm = a.perm[m];
  const int2* tab = a.tab[m];
  for (int i = threadIdx.x; i < kx; i += blockDim.x) {
    const int u = i >> 5, pos = i & 31;
    const int bits = __ldg(&tab[u].y) & 15;
    const int j = u * 32 + pair_row(bits, (pos >> 1) & 3, 2 * (pos >> 4) + ((pos >> 3) & 1), pos & 1);
    float v = 0.f;
    if (j < a.K) {
      const int k = perm ? __ldg(perm + j) : j;
      v = x[k] * (a.norm ? __ldg(a.norm + k) * inv : 1.f);
    }
    out[i] = __float2half_rn(v);
  }
}

// What a lane needs of one unit for its 4 columns, loaded ahead of use (the loop keeps two units
// in flight): the code words, and the group terms (EXL2: the q_scale word and q_scale_max; GPTQ:
// the fp16 scale in the low half and the zero point above it).
struct UnitRegs {
  uint32_t w0[4], w1[4], sc[4];
  float smax;
  int2 tb;
};

template <bool GPTQ>
__device__ __forceinline__ void load_unit(const QGemmArgs& a, int2 tb, int col0, int g, int t, UnitRegs& r) {
  const int grp = tb.y >> 8;
  int i0, i1;
  pair_words(tb.y & 15, t, i0, i1);
  const uint32_t* base = a.qw + static_cast<int64_t>(tb.x) * a.stride + col0 + g;
#pragma unroll
  for (int nt = 0; nt < 4; ++nt) {
    r.w0[nt] = __ldg(base + i0 * a.stride + nt * 8);
    r.w1[nt] = i1 >= 0 ? __ldg(base + i1 * a.stride + nt * 8) : 0u;
  }
#pragma unroll
  for (int nt = 0; nt < 4; ++nt) {
    const int col = col0 + nt * 8 + g;
    if constexpr (GPTQ) {
      const int64_t at = static_cast<int64_t>(grp) * a.stride + col;
      r.sc[nt] = static_cast<uint32_t>(__half_as_ushort(a.scales[at])) | (static_cast<uint32_t>(__ldg(a.zeros + at)) << 16);
    } else {
      r.sc[nt] = __ldg(a.qscale + static_cast<int64_t>(grp) * a.qs_stride + (col >> 3));
    }
  }
  r.smax = GPTQ ? 0.f : __ldg(a.smax + grp);
  r.tb = tb;
}

template <int B, bool GPTQ, int MT>
__device__ __forceinline__ void unit_mma(const QGemmArgs& a, int u, const UnitRegs& r, int col0, int g, int t,
                                         float (&acc)[MT][4][4]) {
  __half2 s2[4], z2[4];
#pragma unroll
  for (int nt = 0; nt < 4; ++nt) {
    float s, z;
    if constexpr (GPTQ) {
      s = __half2float(__ushort_as_half(static_cast<unsigned short>(r.sc[nt] & 0xFFFFu)));
      z = static_cast<float>(r.sc[nt] >> 16);
    } else {
      const int col = col0 + nt * 8 + g;
      const float q = static_cast<float>(((r.sc[nt] >> ((col & 7) * 4)) & 15u) + 1u);
      s = q * q * r.smax;
      z = static_cast<float>(1 << (B - 1));
    }
    s2[nt] = __float2half2_rn(s * kQgPrescale);
    z2[nt] = __float2half2_rn(1024.f + z);
  }
  const uint32_t* xw = reinterpret_cast<const uint32_t*>(a.xh);
  const int64_t row_words = static_cast<int64_t>(a.units) * 16;
#pragma unroll
  for (int step = 0; step < 2; ++step) {
    uint32_t af[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const uint32_t* r0 = xw + (mt * 16 + g) * row_words + u * 16 + step * 8 + t;
      const uint32_t* r1 = r0 + 8 * row_words;
      af[mt][0] = __ldg(r0);
      af[mt][1] = __ldg(r1);
      af[mt][2] = __ldg(r0 + 4);
      af[mt][3] = __ldg(r1 + 4);
    }
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
      const uint32_t b0 = weight_pair(pair_codes<B>(r.w0[nt], r.w1[nt], t, 2 * step), z2[nt], s2[nt]);
      const uint32_t b1 = weight_pair(pair_codes<B>(r.w0[nt], r.w1[nt], t, 2 * step + 1), z2[nt], s2[nt]);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) mma_16816(acc[mt][nt], af[mt], b0, b1);
    }
  }
}

template <bool GPTQ, int MT>
__device__ __forceinline__ void unit_any(const QGemmArgs& a, int u, const UnitRegs& r, int col0, int g, int t,
                                         float (&acc)[MT][4][4]) {
  switch (r.tb.y & 15) {
    case 2: unit_mma<2, GPTQ, MT>(a, u, r, col0, g, t, acc); break;
    case 3: unit_mma<3, GPTQ, MT>(a, u, r, col0, g, t, acc); break;
    case 4: unit_mma<4, GPTQ, MT>(a, u, r, col0, g, t, acc); break;
    case 5: unit_mma<5, GPTQ, MT>(a, u, r, col0, g, t, acc); break;
    case 6: unit_mma<6, GPTQ, MT>(a, u, r, col0, g, t, acc); break;
    default: unit_mma<8, GPTQ, MT>(a, u, r, col0, g, t, acc); break;
  }
}

template <bool GPTQ, int MT>
__global__ void __launch_bounds__(kQgWarps * 32) qgemm_kernel(const __grid_constant__ QGemmArgs a) {
  __shared__ float red[kQgWarps][MT * 16][kQgCols + 1];
  __shared__ int2 tabs[kQgWarps][kQgTab];
  __shared__ int last;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int tile = blockIdx.x / a.ks, ksi = blockIdx.x - tile * a.ks;
  const int col0 = tile * kQgCols;
  const int b0 = static_cast<int>(static_cast<int64_t>(a.units) * ksi / a.ks);
  const int b1 = static_cast<int>(static_cast<int64_t>(a.units) * (ksi + 1) / a.ks);
  const int u0 = b0 + (b1 - b0) * warp / kQgWarps, u1 = b0 + (b1 - b0) * (warp + 1) / kQgWarps;
  float acc[MT][4][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.f;
  // The warp's unit table in shared memory (one load each, in parallel), then weights streamed two
  // units ahead of the tensor cores; weights and tables are immutable, so the first two units are
  // requested before the wait for the previous kernel.
  const int cnt = u1 - u0;
  for (int j = lane; j < min(cnt, kQgTab); j += 32) tabs[warp][j] = __ldg(a.tab + u0 + j);
  __syncwarp();
  const auto tab_at = [&](int u) { return u - u0 < kQgTab ? tabs[warp][u - u0] : __ldg(a.tab + u); };
  UnitRegs r0, r1;
  if (cnt > 0) load_unit<GPTQ>(a, tab_at(u0), col0, g, t, r0);
  if (cnt > 1) load_unit<GPTQ>(a, tab_at(u0 + 1), col0, g, t, r1);
  pdl_wait();
  for (int u = u0; u < u1; ++u) {
    UnitRegs r2;
    if (u + 2 < u1) load_unit<GPTQ>(a, tab_at(u + 2), col0, g, t, r2);
    unit_any<GPTQ, MT>(a, u, r0, col0, g, t, acc);
    r0 = r1;
    r1 = r2;
  }
  // D fragment: rows g and g + 8 of each 16-row tile, columns 2t and 2t + 1 of each n8 tile.
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
      red[warp][mt * 16 + g][nt * 8 + 2 * t] = acc[mt][nt][0];
      red[warp][mt * 16 + g][nt * 8 + 2 * t + 1] = acc[mt][nt][1];
      red[warp][mt * 16 + g + 8][nt * 8 + 2 * t] = acc[mt][nt][2];
      red[warp][mt * 16 + g + 8][nt * 8 + 2 * t + 1] = acc[mt][nt][3];
    }
  __syncthreads();
  const int cells = a.rows * kQgCols;
  if (a.ks == 1) {
    for (int i = threadIdx.x; i < cells; i += blockDim.x) {
      const int r = i / kQgCols, c = i - r * kQgCols, n = col0 + c;
      float v = 0.f;
#pragma unroll
      for (int w = 0; w < kQgWarps; ++w) v += red[w][r][c];
      if (n < a.N) {
        float& out = a.y[static_cast<int64_t>(r) * a.N + n];
        out = (a.accumulate ? out : 0.f) + v * (1.f / kQgPrescale) + (a.bias ? a.bias[n] : 0.f);
      }
    }
    return;
  }
  float* part = a.partial + (static_cast<size_t>(tile) * a.ks + ksi) * cells;
  for (int i = threadIdx.x; i < cells; i += blockDim.x) {
    const int r = i / kQgCols, c = i - r * kQgCols;
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < kQgWarps; ++w) v += red[w][r][c];
    part[i] = v;
  }
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(a.counters + tile, 1) == a.ks - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  if (threadIdx.x == 0) a.counters[tile] = 0;  // ready for the next launch
  const float* p0 = a.partial + static_cast<size_t>(tile) * a.ks * cells;
  for (int i = threadIdx.x; i < cells; i += blockDim.x) {
    const int r = i / kQgCols, c = i - r * kQgCols, n = col0 + c;
    float v = 0.f;
    for (int k = 0; k < a.ks; ++k) v += __ldcg(p0 + static_cast<size_t>(k) * cells + i);
    if (n < a.N) {
      float& out = a.y[static_cast<int64_t>(r) * a.N + n];
      out = (a.accumulate ? out : 0.f) + v * (1.f / kQgPrescale) + (a.bias ? a.bias[n] : 0.f);
    }
  }
}

template <bool GPTQ>
void launch_qgemm(int mt, const QGemmArgs& a, int blocks, cudaStream_t s) {
  const dim3 grid(static_cast<unsigned>(blocks)), block(kQgWarps * 32);
  switch (mt) {
    case 1: launch(qgemm_kernel<GPTQ, 1>, grid, block, 0, s, a); break;
    case 2: launch(qgemm_kernel<GPTQ, 2>, grid, block, 0, s, a); break;
    case 3: launch(qgemm_kernel<GPTQ, 3>, grid, block, 0, s, a); break;
    default: launch(qgemm_kernel<GPTQ, 4>, grid, block, 0, s, a); break;
  }
  QF_CUDA_LAUNCH();
}

}  // namespace

namespace {

// The GEMM of one matrix over x already in pair order.
void gemm_one(CudaBackend& b, const CudaQuantLinear& w, const __half* xh, float* y, int64_t rows, bool accumulate) {
  const int mt = static_cast<int>((rows + 15) / 16);
  QGemmArgs a{};
  a.qw = w.qweight;
  a.stride = w.stride;
  a.tab = w.unit_tab;
  a.qscale = w.qscale;
  a.qs_stride = w.qscale_stride;
  a.smax = w.scale_max;
  a.scales = w.scales;
  a.zeros = w.zeros;
  a.bias = w.bias;
  a.xh = xh;
  a.y = y;
  a.rows = static_cast<int>(rows);
  a.N = static_cast<int>(w.out_features);
  a.units = w.units;
  a.accumulate = accumulate ? 1 : 0;
  const int tiles = static_cast<int>((w.out_features + kQgCols - 1) / kQgCols);
  // About four blocks per multiprocessor, at least four units per warp.
  static const int ks_env = env_int("QFORGE_QGEMM_KS", 0);
  a.ks = ks_env > 0 ? ks_env : static_cast<int>(std::lround(4.0 * b.sm_count() / tiles));
  a.ks = std::clamp(a.ks, 1, std::max(1, w.units / (4 * kQgWarps)));
  if (a.ks > 1) {
    a.partial = static_cast<float*>(b.scratch(static_cast<size_t>(tiles) * a.ks * rows * kQgCols * 4, 5));
    a.counters = b.zeroed_counters(static_cast<size_t>(tiles));
  }
  if (w.format == LinearFormat::GPTQ) launch_qgemm<true>(mt, a, tiles * a.ks, stream_of(b));
  else launch_qgemm<false>(mt, a, tiles * a.ks, stream_of(b));
}

// x (optionally RMS-normalised) in pair order for each of `count` matrices sharing it; returns the
// buffers (scratch slot 0).
std::array<__half*, 3> prepare_x(CudaBackend& b, const CudaQuantLinear* const* w, int count, const float* x,
                                 const float* norm, float eps, int64_t rows) {
  const int rows16 = static_cast<int>((rows + 15) / 16) * 16;
  const int64_t kx = static_cast<int64_t>(w[0]->units) * 32;
  auto* base = static_cast<__half*>(b.scratch(static_cast<size_t>(count * rows16 * kx) * 2, 0));
  PrepArgs p{};
  p.x = x;
  p.norm = norm;
  p.eps = eps;
  p.rows = static_cast<int>(rows);
  p.K = static_cast<int>(w[0]->in_features);
  p.units = w[0]->units;
  std::array<__half*, 3> xh{};
  for (int i = 0; i < count; ++i) {
    p.perm[i] = w[i]->perm;
    p.tab[i] = w[i]->unit_tab;
    p.xh[i] = xh[static_cast<size_t>(i)] = base + static_cast<int64_t>(i) * rows16 * kx;
  }
  launch(qgemm_prep_kernel, dim3(static_cast<unsigned>(rows16), static_cast<unsigned>(count)), dim3(256), 0,
         stream_of(b), p);
  QF_CUDA_LAUNCH();
  return xh;
}

bool small_batch_shape(const CudaQuantLinear& w, int64_t rows) {
  return rows >= 1 && rows <= kQgMaxTiles * 16 && w.stride % kQgCols == 0;
}

}  // namespace

bool quant_gemm_small(CudaBackend& b, const CudaQuantLinear& w, const float* x, float* y, int64_t rows) {
  if (!small_batch_shape(w, rows)) return false;
  const CudaQuantLinear* ws[1] = {&w};
  const auto xh = prepare_x(b, ws, 1, x, nullptr, 0.f, rows);
  gemm_one(b, w, xh[0], y, rows, false);
  return true;
}

bool quant_gemm_fused(CudaBackend& b, const FusedLinear& op, float* up_scratch) {
  if (op.rows < 2 || op.count < 1 || op.count > 3) return false;
  const CudaQuantLinear* q[3] = {};
  for (int i = 0; i < op.count; ++i) {
    q[i] = dynamic_cast<const CudaQuantLinear*>(op.w[i]);
    if (!q[i] || !small_batch_shape(*q[i], op.rows) || q[i]->in_features != q[0]->in_features ||
        q[i]->units != q[0]->units)
      return false;
  }
  const bool pair = op.output == FusedLinear::Output::SwiGLU;
  if (pair && (op.count != 2 || q[0]->out_features != q[1]->out_features)) return false;
  const auto xh = prepare_x(b, q, op.count, op.x, op.input == FusedLinear::Input::RmsNorm ? op.norm : nullptr, op.eps,
                            op.rows);
  if (pair) {
    // gate into y, up into the scratch, then y = silu(gate) * up.
    gemm_one(b, *q[0], xh[0], op.y[0], op.rows, false);
    gemm_one(b, *q[1], xh[1], up_scratch, op.rows, false);
    return true;
  }
  for (int i = 0; i < op.count; ++i)
    gemm_one(b, *q[i], xh[static_cast<size_t>(i)], op.y[i], op.rows, op.output == FusedLinear::Output::Accumulate);
  return true;
}

}  // namespace qf::cuda
