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
// range; weights up to 64 in magnitude fit), the sums scaled back exactly at the end. Which unit rows
// those are (pair_row) depends only on the width, so x is written once per launch in that order,
// already as the A fragments (qgemm_prep_kernel): one 16-byte load per lane, tile and step.
// The columns of a warp's four n8 tiles interleave (tile nt, column c: colw + 4 c + nt), so a
// lane's four B columns are adjacent words and its codes arrive in one 16-byte load per plane.
#include <algorithm>
#include <array>
#include <cmath>

#include "backends/cuda/cuda_quant.cuh"
#include "backends/cuda/cuda_quant_codes.cuh"

namespace qf::cuda {

namespace {

constexpr int kQgColGroups = 4;                  // warps side by side, 32 columns each
constexpr int kQgKGroups = 2;                    // warps splitting a block's units
constexpr int kQgThreads = kQgColGroups * kQgKGroups * 32;
constexpr int kQgCols = kQgColGroups * 32;       // columns per block
constexpr int kQgMaxTiles = 4;                   // 16-row tiles: up to 64 rows
constexpr float kQgPrescale = 1024.f;            // weights are formed times this in fp16
constexpr int kQgTab = 64;                       // unit table entries a block keeps in shared memory
constexpr int kPrepThreads = 256;

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
  const uint4* xf;   // x as A fragments: [units][2 k16 steps][MT][32 lanes], 4 registers each
  float* y;          // [rows][N]
  int rows, N, units, ks;
  int accumulate;    // y += result instead of y = result
  float* partial;    // [tiles][ks][rows][kQgCols], summed by qgemm_reduce_kernel
};

// x as the A fragments of mma.m16n8k16, for up to three matrices at once (each its own permutation
// and widths): lane (g, t) of 16-row tile mt finds its four registers for k16 step s of unit u in
// one 16-byte word, xf[u][s][mt][4 g + t]; register 2 h + hi holds rows 16 mt + g + 8 hi, unit rows
// pair_row(bits, t, 2 s + h, e) for e = 0, 1 (through the act-order permutation). With `norm` the
// row is RMS-normalised first (x * norm * inv, inv from the whole row). Rows past `rows` (up to the
// 16-row padding) are zeros. Grid: chunks of kPrepThreads unit rows (one element per thread) x
// rows x matrices.
struct PrepArgs {
  const float* x;
  const float* norm;
  float eps;
  int rows, K, units, mtiles;
  const int32_t* perm[3];
  const int2* tab[3];
  __half* xh[3];
};

__global__ void __launch_bounds__(kPrepThreads) qgemm_prep_kernel(const __grid_constant__ PrepArgs a) {
  pdl_wait();
  const int r = blockIdx.y, m = blockIdx.z;
  const int mt = r >> 4, g = r & 7, hi = (r >> 3) & 1;
  const bool live = r < a.rows;
  const float* x = a.x + static_cast<int64_t>(live ? r : 0) * a.K;
  // Every chunk of the row computes the row's norm (one read of it, in parallel).
  const float inv = a.norm && live ? block_inv_rms<kPrepThreads>(x, a.K, a.eps) : 1.f;
  // One element per thread: the unit table, the permutation and x are dependent loads, so each
  // thread does them once rather than in a loop.
  const int i = blockIdx.x * kPrepThreads + threadIdx.x;
  if (i >= a.units * 32) return;
  const int u = i >> 5, pos = i & 31;
  const int s = pos >> 4, h = (pos >> 3) & 1, t = (pos >> 1) & 3, e = pos & 1;
  float v = 0.f;
  if (live) {
    const int j = u * 32 + pair_row(__ldg(&a.tab[m][u].y) & 15, t, 2 * s + h, e);
    if (j < a.K) {
      const int k = a.perm[m] ? __ldg(a.perm[m] + j) : j;
      v = x[k] * (a.norm ? __ldg(a.norm + k) * inv : 1.f);
    }
  }
  const int64_t word = ((static_cast<int64_t>(u) * 2 + s) * a.mtiles + mt) * 32 + 4 * g + t;
  a.xh[m][(word * 4 + 2 * h + hi) * 2 + e] = __float2half_rn(v);
}

// What a lane needs of one unit for its 4 columns (colw + 4 g .. + 3), loaded ahead of use (the
// loop keeps two units in flight): the code words of both planes as one 16-byte load each, and
// the group terms (EXL2: the q_scale word and q_scale_max; GPTQ: four fp16 scales, four zeros).
struct UnitRegs {
  uint4 w0, w1;
  uint32_t s0, s1;  // EXL2: the q_scale word; GPTQ: four fp16 scales
  uint32_t zeros;   // GPTQ: four 8-bit zero points
  float smax;       // EXL2: q_scale_max
  int2 tb;
};

template <bool GPTQ>
__device__ __forceinline__ void load_unit(const QGemmArgs& a, int2 tb, int colw, int g, int t, UnitRegs& r) {
  const int grp = tb.y >> 8;
  int i0, i1;
  pair_words(tb.y & 15, t, i0, i1);
  const int col = colw + 4 * g;
  const uint32_t* base = a.qw + static_cast<int64_t>(tb.x) * a.stride + col;
  r.w0 = __ldg(reinterpret_cast<const uint4*>(base + i0 * a.stride));
  r.w1 = i1 >= 0 ? __ldg(reinterpret_cast<const uint4*>(base + i1 * a.stride)) : make_uint4(0, 0, 0, 0);
  if constexpr (GPTQ) {
    const int64_t at = static_cast<int64_t>(grp) * a.stride + col;
    const uint2 sc = __ldg(reinterpret_cast<const uint2*>(a.scales + at));
    r.s0 = sc.x;
    r.s1 = sc.y;
    r.zeros = __ldg(reinterpret_cast<const uint32_t*>(a.zeros + at));
    r.smax = 0.f;
  } else {
    r.s0 = __ldg(a.qscale + static_cast<int64_t>(grp) * a.qs_stride + (col >> 3));
    r.s1 = r.zeros = 0;
    r.smax = __ldg(a.smax + grp);
  }
  r.tb = tb;
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int i) {
  return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));
}

// One 32-row unit into the warp's tiles: n8 tile nt holds columns colw + 4 c + nt (c = 0..7), so a
// lane's four B columns are adjacent in memory.
template <int B, bool GPTQ, int MT>
__device__ __forceinline__ void unit_mma(const QGemmArgs& a, int u, const UnitRegs& r, int g, int t, int lane,
                                         float (&acc)[MT][4][4]) {
  __half2 s2[4], z2[4];
#pragma unroll
  for (int nt = 0; nt < 4; ++nt) {
    float s, z;
    if constexpr (GPTQ) {
      const uint32_t sw = nt < 2 ? r.s0 : r.s1;
      s = __half2float(__ushort_as_half(static_cast<unsigned short>(sw >> (16 * (nt & 1)))));
      z = static_cast<float>((r.zeros >> (8 * nt)) & 0xFFu);
    } else {
      const float q = static_cast<float>(((r.s0 >> (4 * (4 * (g & 1) + nt))) & 15u) + 1u);
      s = q * q * r.smax;
      z = static_cast<float>(1 << (B - 1));
    }
    s2[nt] = __float2half2_rn(s * kQgPrescale);
    z2[nt] = __float2half2_rn(1024.f + z);
  }
  const uint4* xf = a.xf + static_cast<int64_t>(u) * 2 * MT * 32 + lane;
#pragma unroll
  for (int step = 0; step < 2; ++step) {
    uint4 af[MT];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) af[mt] = __ldg(xf + (step * MT + mt) * 32);
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
      const uint32_t w0 = word_of(r.w0, nt), w1 = word_of(r.w1, nt);
      const uint32_t b0 = weight_pair(pair_codes<B>(w0, w1, t, 2 * step), z2[nt], s2[nt]);
      const uint32_t b1 = weight_pair(pair_codes<B>(w0, w1, t, 2 * step + 1), z2[nt], s2[nt]);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const uint32_t fa[4] = {af[mt].x, af[mt].y, af[mt].z, af[mt].w};
        mma_16816(acc[mt][nt], fa, b0, b1);
      }
    }
  }
}

template <bool GPTQ, int MT>
__device__ __forceinline__ void unit_any(const QGemmArgs& a, int u, const UnitRegs& r, int g, int t, int lane,
                                         float (&acc)[MT][4][4]) {
  switch (r.tb.y & 15) {
    case 2: unit_mma<2, GPTQ, MT>(a, u, r, g, t, lane, acc); break;
    case 3: unit_mma<3, GPTQ, MT>(a, u, r, g, t, lane, acc); break;
    case 4: unit_mma<4, GPTQ, MT>(a, u, r, g, t, lane, acc); break;
    case 5: unit_mma<5, GPTQ, MT>(a, u, r, g, t, lane, acc); break;
    case 6: unit_mma<6, GPTQ, MT>(a, u, r, g, t, lane, acc); break;
    default: unit_mma<8, GPTQ, MT>(a, u, r, g, t, lane, acc); break;
  }
}

// The value of column colw + 8 t + j (j = 0..7) of row g + 8 hi of tile mt in a lane's D fragments.
template <int MT>
__device__ __forceinline__ float d_value(const float (&acc)[MT][4][4], int mt, int hi, int j) {
  return j < 4 ? acc[mt][j][2 * hi] : acc[mt][j - 4][2 * hi + 1];
}

// A block: kQgColGroups warps side by side over kQgCols columns, times kQgKGroups warps that split
// the block's slice of units; the column-group warps read the same x fragments (L1), the K-groups
// are added in shared memory, the slices of different blocks by qgemm_reduce_kernel, in order
// (deterministic, as the GEMV). A row's result does not depend on other rows.
// Up to three matrices over the same rows in one launch (q, k and v; gate and up): their blocks
// follow each other, so one matrix's tail runs beside the next one's start.
struct QGemmSet {
  QGemmArgs m[3];
  int end[3];  // one past the last block of matrix i
  int count;
};

template <bool GPTQ, int MT>
__global__ void __launch_bounds__(kQgThreads, 2) qgemm_kernel(const __grid_constant__ QGemmSet set) {
  __shared__ float red[MT * 16][kQgCols + 4];
  __shared__ int2 tabs[kQgTab];
  int mi = 0;
  while (mi + 1 < set.count && static_cast<int>(blockIdx.x) >= set.end[mi]) ++mi;
  const QGemmArgs& a = set.m[mi];
  const int bid = static_cast<int>(blockIdx.x) - (mi > 0 ? set.end[mi - 1] : 0);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int cg = warp % kQgColGroups, kg = warp / kQgColGroups;
  const int tile = bid / a.ks, ksi = bid - tile * a.ks;
  const int col0 = tile * kQgCols, colw = col0 + cg * 32;
  const bool active = colw < a.N;  // stride is a multiple of 32, so the warp's 32 columns are stored
  const int b0 = static_cast<int>(static_cast<int64_t>(a.units) * ksi / a.ks);
  const int b1 = static_cast<int>(static_cast<int64_t>(a.units) * (ksi + 1) / a.ks);
  const int u0 = b0 + (b1 - b0) * kg / kQgKGroups, u1 = b0 + (b1 - b0) * (kg + 1) / kQgKGroups;
  float acc[MT][4][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.f;
  // The slice's unit table in shared memory, then weights streamed two units ahead of the tensor
  // cores; weights and tables are immutable, so the first two are requested before the PDL wait.
  for (int j = threadIdx.x; j < min(b1 - b0, kQgTab); j += kQgThreads) tabs[j] = __ldg(a.tab + b0 + j);
  __syncthreads();
  const auto tab_at = [&](int u) { return u - b0 < kQgTab ? tabs[u - b0] : __ldg(a.tab + u); };
  const int cnt = active ? u1 - u0 : 0;
  UnitRegs r0, r1;
  if (cnt > 0) load_unit<GPTQ>(a, tab_at(u0), colw, g, t, r0);
  if (cnt > 1) load_unit<GPTQ>(a, tab_at(u0 + 1), colw, g, t, r1);
  pdl_wait();
  for (int u = u0; u < u0 + cnt; ++u) {
    UnitRegs r2;
    if (u + 2 < u0 + cnt) load_unit<GPTQ>(a, tab_at(u + 2), colw, g, t, r2);
    unit_any<GPTQ, MT>(a, u, r0, g, t, lane, acc);
    r0 = r1;
    r1 = r2;
  }
  // K-group 1 hands its tiles to K-group 0 (D fragment: rows g and g + 8 of each tile).
  static_assert(kQgKGroups == 2, "the shared-memory sum adds two K-groups");
  if (kg == 1 && active) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int hi = 0; hi < 2; ++hi)
#pragma unroll
        for (int j = 0; j < 8; ++j) red[mt * 16 + g + 8 * hi][cg * 32 + 8 * t + j] = d_value(acc, mt, hi, j);
  }
  __syncthreads();
  float* part = a.ks > 1 ? a.partial + (static_cast<size_t>(tile) * a.ks + ksi) * a.rows * kQgCols : nullptr;
  if (kg == 0 && active) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int hi = 0; hi < 2; ++hi) {
        const int row = mt * 16 + g + 8 * hi;
        if (row >= a.rows) continue;
        float v[8];
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] = d_value(acc, mt, hi, j) + red[row][cg * 32 + 8 * t + j];
        if (part) {
          float4* p = reinterpret_cast<float4*>(part + static_cast<size_t>(row) * kQgCols + cg * 32 + 8 * t);
          p[0] = make_float4(v[0], v[1], v[2], v[3]);
          p[1] = make_float4(v[4], v[5], v[6], v[7]);
          continue;
        }
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const int n = colw + 8 * t + j;
          if (n >= a.N) continue;
          float& out = a.y[static_cast<int64_t>(row) * a.N + n];
          out = (a.accumulate ? out : 0.f) + v[j] * (1.f / kQgPrescale) + (a.bias ? a.bias[n] : 0.f);
        }
      }
  }
}

// The split-K sum (deterministic: the slices in order), spread over the whole GPU: one thread per
// four adjacent outputs of one row; matrices of a set one after another (blocks up to rend[i]).
// The last slice's block used to do its tile's sum alone, which at 64 rows read 256 KB with
// one block's loads in flight.
struct ReduceSet {
  QGemmArgs m[3];
  int rend[3];  // one past the last reduce block of matrix i (matrices with one slice have none)
  int count;
};

__global__ void __launch_bounds__(256) qgemm_reduce_kernel(const __grid_constant__ ReduceSet set) {
  pdl_wait();
  int mi = 0;
  while (mi + 1 < set.count && static_cast<int>(blockIdx.x) >= set.rend[mi]) ++mi;
  const QGemmArgs& a = set.m[mi];
  const int64_t i = static_cast<int64_t>(blockIdx.x - (mi > 0 ? set.rend[mi - 1] : 0)) * 256 + threadIdx.x;
  const int tiles = (a.N + kQgCols - 1) / kQgCols;
  const int64_t quads = static_cast<int64_t>(a.rows) * tiles * (kQgCols / 4);
  if (i >= quads) return;
  const int r = static_cast<int>(i / (tiles * (kQgCols / 4)));
  const int rest = static_cast<int>(i - static_cast<int64_t>(r) * tiles * (kQgCols / 4));
  const int tile = rest / (kQgCols / 4), c = 4 * (rest - tile * (kQgCols / 4));
  const float4* p = reinterpret_cast<const float4*>(a.partial + (static_cast<size_t>(tile) * a.ks * a.rows + r) * kQgCols + c);
  const size_t slice = static_cast<size_t>(a.rows) * kQgCols / 4;  // float4s between slices
  float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int k = 0; k < a.ks; ++k) {
    const float4 q = __ldcg(p + k * slice);
    v.x += q.x, v.y += q.y, v.z += q.z, v.w += q.w;
  }
  const float vv[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const int n = tile * kQgCols + c + e;
    if (n >= a.N) continue;
    float& out = a.y[static_cast<int64_t>(r) * a.N + n];
    out = (a.accumulate ? out : 0.f) + vv[e] * (1.f / kQgPrescale) + (a.bias ? a.bias[n] : 0.f);
  }
}

template <bool GPTQ>
void launch_qgemm(int mt, const QGemmSet& a, int blocks, cudaStream_t s) {
  const dim3 grid(static_cast<unsigned>(blocks)), block(kQgThreads);
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

// The GEMMs of `count` matrices (one format) over the same rows, x already in fragment order,
// in one launch.
void gemm_set(CudaBackend& b, const CudaQuantLinear* const* w, const std::array<__half*, 3>& xh, float* const* y,
              int count, int64_t rows, bool accumulate) {
  const int mt = static_cast<int>((rows + 15) / 16);
  QGemmSet set{};
  set.count = count;
  int tiles[3] = {}, blocks = 0;
  size_t partial_floats = 0;
  static const int ks_env = env_int("QFORGE_QGEMM_KS", 0);
  for (int i = 0; i < count; ++i) {
    QGemmArgs& a = set.m[i];
    a.qw = w[i]->qweight;
    a.stride = w[i]->stride;
    a.tab = w[i]->unit_tab;
    a.qscale = w[i]->qscale;
    a.qs_stride = w[i]->qscale_stride;
    a.smax = w[i]->scale_max;
    a.scales = w[i]->scales;
    a.zeros = w[i]->zeros;
    a.bias = w[i]->bias;
    a.xf = reinterpret_cast<const uint4*>(xh[static_cast<size_t>(i)]);
    a.y = y[i];
    a.rows = static_cast<int>(rows);
    a.N = static_cast<int>(w[i]->out_features);
    a.units = w[i]->units;
    a.accumulate = accumulate ? 1 : 0;
    tiles[i] = static_cast<int>((w[i]->out_features + kQgCols - 1) / kQgCols);
    // About two blocks per multiprocessor, at least two units per warp; the same for every row
    // count, so that a row's sums are added in the same order whatever else is in the batch.
    a.ks = ks_env > 0 ? ks_env : static_cast<int>(std::lround(2.0 * b.sm_count() / tiles[i]));
    a.ks = std::clamp(a.ks, 1, std::max(1, w[i]->units / (2 * kQgKGroups)));
    blocks += tiles[i] * a.ks;
    set.end[i] = blocks;
    if (a.ks > 1) partial_floats += static_cast<size_t>(tiles[i]) * a.ks * rows * kQgCols;
  }
  ReduceSet red{};
  int rblocks = 0;
  if (partial_floats > 0) {
    auto* partial = static_cast<float*>(b.scratch(partial_floats * 4, 5));
    for (int i = 0; i < count; ++i) {
      QGemmArgs& a = set.m[i];
      if (a.ks > 1) {
        a.partial = partial;
        partial += static_cast<size_t>(tiles[i]) * a.ks * rows * kQgCols;
        red.m[red.count] = a;
        rblocks += static_cast<int>((rows * tiles[i] * (kQgCols / 4) + 255) / 256);
        red.rend[red.count++] = rblocks;
      }
    }
  }
  if (w[0]->format == LinearFormat::GPTQ) launch_qgemm<true>(mt, set, blocks, stream_of(b));
  else launch_qgemm<false>(mt, set, blocks, stream_of(b));
  if (rblocks > 0) {
    launch(qgemm_reduce_kernel, dim3(static_cast<unsigned>(rblocks)), dim3(256), 0, stream_of(b), red);
    QF_CUDA_LAUNCH();
  }
}

// x (optionally RMS-normalised) as A fragments for each of `count` matrices sharing it; returns
// the buffers (scratch slot 0).
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
  p.mtiles = rows16 / 16;
  std::array<__half*, 3> xh{};
  for (int i = 0; i < count; ++i) {
    p.perm[i] = w[i]->perm;
    p.tab[i] = w[i]->unit_tab;
    p.xh[i] = xh[static_cast<size_t>(i)] = base + static_cast<int64_t>(i) * rows16 * kx;
  }
  const auto chunks = static_cast<unsigned>((kx + kPrepThreads - 1) / kPrepThreads);
  launch(qgemm_prep_kernel, dim3(chunks, static_cast<unsigned>(rows16), static_cast<unsigned>(count)),
         dim3(kPrepThreads), 0, stream_of(b), p);
  QF_CUDA_LAUNCH();
  return xh;
}

bool small_batch_shape(const CudaQuantLinear& w, int64_t rows) {
  return rows >= 1 && rows <= kQgMaxTiles * 16 && w.stride % 32 == 0;
}

}  // namespace

bool quant_gemm_small(CudaBackend& b, const CudaQuantLinear& w, const float* x, float* y, int64_t rows) {
  if (!small_batch_shape(w, rows)) return false;
  const CudaQuantLinear* ws[1] = {&w};
  const auto xh = prepare_x(b, ws, 1, x, nullptr, 0.f, rows);
  float* ys[1] = {y};
  gemm_set(b, ws, xh, ys, 1, rows, false);
  return true;
}

bool quant_gemm_fused(CudaBackend& b, const FusedLinear& op, float* up_scratch) {
  if (op.rows < 2 || op.count < 1 || op.count > 3) return false;
  const CudaQuantLinear* q[3] = {};
  for (int i = 0; i < op.count; ++i) {
    q[i] = dynamic_cast<const CudaQuantLinear*>(op.w[i]);
    if (!q[i] || !small_batch_shape(*q[i], op.rows) || q[i]->in_features != q[0]->in_features ||
        q[i]->units != q[0]->units || q[i]->format != q[0]->format)
      return false;
  }
  const bool pair = op.output == FusedLinear::Output::SwiGLU;
  if (pair && (op.count != 2 || q[0]->out_features != q[1]->out_features)) return false;
  const auto xh = prepare_x(b, q, op.count, op.x, op.input == FusedLinear::Input::RmsNorm ? op.norm : nullptr, op.eps,
                            op.rows);
  // SwiGLU: gate into y, up into the scratch (the caller then forms y = silu(gate) * up).
  float* ys[3] = {op.y[0], pair ? up_scratch : op.y[1], op.y[2]};
  gemm_set(b, q, xh, ys, op.count, op.rows, op.output == FusedLinear::Output::Accumulate);
  return true;
}

}  // namespace qf::cuda
