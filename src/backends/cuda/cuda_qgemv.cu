// Decode GEMV for EXL2 and GPTQ layers (one activation row), with the steps around a linear layer
// folded in (Backend::fused_linear): RMSNorm of the input, up to three matrices that share the
// input in one launch (q/k/v; gate/up), and the output stored, added to the residual stream, or
// combined as silu(gate) * up.
//
// Why it is shaped like this: at batch 1 a 4096 x 4096 4-bit layer is 8 MB, under 3 us of DRAM
// time, so the kernel must have many bytes in flight from its first cycle and leave room on each
// SM for the next kernel to start early (programmatic dependent launch: the next kernel's blocks
// issue their weight loads while this one drains).
//  - Tiles of 128 columns (each lane owns 4 consecutive columns, 16-byte loads of q_weight), and
//    K split into `ks` slices, one block of 4 warps per (tile, slice); the warps split the slice.
//  - Each warp streams its units through a ring of shared-memory stages filled by cp.async
//    (no registers held by loads in flight); every lane reads back only what it copied itself, so
//    the ring needs no barriers. The first stages are issued before the PDL wait.
//  - Units of every width multiply codes with x quantized to 16 bits per unit through byte dot
//    products (dp4a), under half the integer instructions of a float path; 3-, 5- and 6-bit units
//    are kept in a planar layout (cuda_quant_codes.cuh) so that their codes come out of the words
//    four at a time as well.
//  - x is gathered through the permutation into shared memory per warp after the wait. RMSNorm is
//    applied as rmsnorm(x) * g = inv * (x * g): the blocks gather x * g and the sum of x^2 of their
//    rows, and the factor inv is applied once the slices are added up.
//  - Slices are added by the last block of each tile to arrive (a self-resetting counter per
//    tile; partial sums in a scratch buffer), in a fixed order: deterministic, no atomics on y,
//    no zeroing. Gate and up tiles of one column range share a counter, so the last of their
//    blocks writes silu(gate) * up directly.
#include <algorithm>
#include <cmath>

#include "backends/cuda/cuda_quant.cuh"
#include "backends/cuda/cuda_quant_codes.cuh"

namespace qf::cuda {

namespace {

constexpr int kWarps = 4;   // per block; 128 threads = the 128 columns of a tile in the fixup
constexpr int kTile = 128;  // columns per tile

struct QSeg {
  const uint32_t* qw;
  const int2* tab;
  const int32_t* perm;
  const uint32_t* qscale;
  const float* smax;
  const __half* scales;
  const uint8_t* zeros;
  const float* bias;
  float* y;
  int64_t stride;  // words per packed row; a multiple of kTile
  int N;
  int tile_end;  // one past this segment's last tile in the launch
};

struct QGemvArgs {
  QSeg seg[3];
  int nseg;
  int K, units, ks;
  int sw;   // words per lane per stage: the widest unit of the launch
  int upw;   // most units a warp takes (shared memory per warp)
  int ring;  // stages allocated per warp: min(upw, the kernel's stages), as no warp uses more
  int output;  // 0 store, 1 accumulate, 2 silu(seg 0) * seg 1 into seg 0's y
  const float* x;
  const float* norm;
  float eps;
  float* partial;  // [tiles][ks][kTile + 1]: sums and the sum of x^2
  int* counters;   // one per tile (per gate/up pair), zero between launches
};

__device__ __forceinline__ uint32_t smem_u32(const void* p) { return static_cast<uint32_t>(__cvta_generic_to_shared(p)); }

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
#endif
}
__device__ __forceinline__ void cp_async8(uint32_t dst, const void* src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" ::"r"(dst), "l"(src) : "memory");
#endif
}
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(dst), "l"(src) : "memory");
#endif
}
__device__ __forceinline__ void cp_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void cp_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}

// Stage layout (per warp, per stage): sw slots of 32 lanes x 16 bytes for the unit's words, then
// one slot for the group terms. `st` is this lane's address in slot 0 of the stage.
template <bool GPTQ>
__device__ __forceinline__ void issue_unit(uint32_t st, int sw, const QSeg& S, int2 t, int col) {
  const int bits = t.y & 15, g = t.y >> 8;
  const uint32_t* p = S.qw + static_cast<int64_t>(t.x) * S.stride + col;
#pragma unroll
  for (int j = 0; j < 8; ++j)
    if (j < bits) cp_async16(st + j * 512, p + j * S.stride);
  const uint32_t pa = st + sw * 512;
  if constexpr (GPTQ) {
    cp_async8(pa, S.scales + static_cast<int64_t>(g) * S.stride + col);
    cp_async4(pa + 8, S.zeros + static_cast<int64_t>(g) * S.stride + col);
  } else {
    cp_async4(pa, S.qscale + static_cast<int64_t>(g) * (S.stride >> 3) + (col >> 3));
    cp_async4(pa + 4, S.smax + g);
  }
}

__device__ __forceinline__ float silu(float g) { return g / (1.0f + __expf(-g)); }

// Shared memory of one warp: its unit table; each unit's source rows of x; x as 16-bit integer
// parts (cuda_quant_codes.cuh); and per unit the integer scale and the sum of the quantized x.
struct WarpSmem {
  int pi_off, xq_off, xsum_off, bytes;
};
__host__ __device__ inline WarpSmem warp_smem(int upw) {
  WarpSmem w;
  w.pi_off = (upw * 8 + 15) / 16 * 16;
  w.xq_off = w.pi_off + upw * 128;
  w.xsum_off = w.xq_off + upw * 64;
  w.bytes = (w.xsum_off + upw * 8 + 15) / 16 * 16;
  return w;
}

// x of one unit (one row per lane) to the integer path's packed bytes: lanes 0..15 write xq[0..15].
__device__ __forceinline__ void quantize_unit_x(float v, int bits, int lane, int* xq, float* scale, float* xsum) {
  float m = fabsf(v);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
  const float inv = m > 0.f ? 32000.f / m : 0.f;
  const int X = __float2int_rn(v * inv);
  const int lo = ((X + 128) & 255) - 128, hi = (X - lo) >> 8;
  const int packed = (hi & 255) | ((lo & 255) << 8);
  int sum = X;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  uint32_t word = 0;
#pragma unroll
  for (int b = 0; b < 4; ++b) {
    bool hi_byte = false;
    const int src = xq_row(bits, lane & 15, b, hi_byte);
    const int p = __shfl_sync(0xffffffffu, packed, src);
    word |= static_cast<uint32_t>((hi_byte ? p : p >> 8) & 255) << (8 * b);
  }
  if (lane < 16) xq[lane] = static_cast<int>(word);
  if (lane == 0) {
    scale[0] = m / 32000.f;
    xsum[0] = static_cast<float>(sum) * (m / 32000.f);
  }
}

// kStages: units in flight per warp. (Capping registers at 80 for 6 blocks per SM measured 2%
// slower on EXL2 4.0, bench/NOTES.md.)
template <bool GPTQ, bool NORM, int kStages>
__global__ void __launch_bounds__(kWarps * 32) qgemv_fused_kernel(const __grid_constant__ QGemvArgs a) {
  extern __shared__ float4 smem4[];
  unsigned char* smem = reinterpret_cast<unsigned char*>(smem4);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int sw = a.sw;
  const int tile = blockIdx.x / a.ks, ksi = blockIdx.x - tile * a.ks;
  int si = 0;
  while (si + 1 < a.nseg && tile >= a.seg[si].tile_end) ++si;
  const QSeg& S = a.seg[si];
  const int tile_in = tile - (si > 0 ? a.seg[si - 1].tile_end : 0);
  const int col = tile_in * kTile + lane * 4;
  const int b0 = static_cast<int>(static_cast<int64_t>(a.units) * ksi / a.ks);
  const int b1 = static_cast<int>(static_cast<int64_t>(a.units) * (ksi + 1) / a.ks);
  const int u0 = b0 + (b1 - b0) * warp / kWarps, u1 = b0 + (b1 - b0) * (warp + 1) / kWarps;
  const int cnt = u1 - u0;

  const int stage_bytes = (sw + 1) * 512;
  unsigned char* ring = smem + warp * a.ring * stage_bytes;
  const WarpSmem ws = warp_smem(a.upw);
  unsigned char* mine = smem + kWarps * a.ring * stage_bytes + warp * ws.bytes;
  int2* ts = reinterpret_cast<int2*>(mine);
  int* xq = reinterpret_cast<int*>(mine + ws.xq_off);
  float* xsum = reinterpret_cast<float*>(mine + ws.xsum_off);  // [upw] scale, [upw] sum of quantized x
  float* red = reinterpret_cast<float*>(smem + kWarps * (a.ring * stage_bytes + ws.bytes));  // [kWarps][kTile]
  float* ssw = red + kWarps * kTile;                                                           // [kWarps]
  int* last = reinterpret_cast<int*>(ssw + kWarps);

  // Weights, tables and the permutation are immutable: all of it before the wait.
  for (int j = lane; j < cnt; j += 32) ts[j] = __ldg(S.tab + u0 + j);
  __syncwarp();
  const uint32_t st0 = smem_u32(ring) + lane * 16;
#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) {
    if (i < cnt) issue_unit<GPTQ>(st0 + i * stage_bytes, sw, S, ts[i], col);
    cp_commit();
  }
  int* pi = reinterpret_cast<int*>(mine + ws.pi_off);
  for (int i = 0; i < cnt; ++i) {
    const int row = (u0 + i) * 32 + lane;
    pi[i * 32 + lane] = row < a.K ? (S.perm ? __ldg(S.perm + row) : row) : -1;
  }
  pdl_wait();

  float ss = 0.f;
  for (int i = 0; i < cnt; ++i) {
    const int k = pi[i * 32 + lane];
    float v = 0.f;
    if (k >= 0) {
      v = a.x[k];
      if constexpr (NORM) {
        ss = fmaf(v, v, ss);
        v *= __ldg(a.norm + k);
      }
    }
    quantize_unit_x(v, ts[i].y & 15, lane, xq + i * 16, xsum + i, xsum + a.upw + i);
  }
  __syncwarp();

  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  for (int i = 0; i < cnt; ++i) {
    if (i + kStages - 1 < cnt)
      issue_unit<GPTQ>(st0 + ((i + kStages - 1) % kStages) * stage_bytes, sw, S, ts[i + kStages - 1], col);
    cp_commit();
    cp_wait<kStages - 1>();
    const uint4* sp = reinterpret_cast<const uint4*>(ring + (i % kStages) * stage_bytes) + lane;
    const int2 t = ts[i];
    const int bits = t.y & 15;
    uint32_t w[4][8];
#pragma unroll
    for (int j = 0; j < 8; ++j)
      if (j < bits) {
        const uint4 v = sp[j * 32];
        w[0][j] = v.x;
        w[1][j] = v.y;
        w[2][j] = v.z;
        w[3][j] = v.w;
      }
    const uint4 pv = sp[sw * 32];
    int t4[4];
    switch (bits) {
      case 2: unit_qdot4<2>(w, xq + i * 16, t4); break;
      case 3: unit_qdot4<3>(w, xq + i * 16, t4); break;
      case 4: unit_qdot4<4>(w, xq + i * 16, t4); break;
      case 5: unit_qdot4<5>(w, xq + i * 16, t4); break;
      case 6: unit_qdot4<6>(w, xq + i * 16, t4); break;
      default: unit_qdot4<8>(w, xq + i * 16, t4); break;
    }
    const float scale = xsum[i];
    float qx[4];
#pragma unroll
    for (int c = 0; c < 4; ++c) qx[c] = static_cast<float>(t4[c]) * scale;
    add_unit_q<GPTQ>(bits, col, pv.x, pv.y, pv.z, qx, xsum[a.upw + i], acc);
  }
  cp_wait<0>();

  // Block sum of the warps' partial tiles.
  *reinterpret_cast<float4*>(red + warp * kTile + lane * 4) = make_float4(acc[0], acc[1], acc[2], acc[3]);
  if constexpr (NORM) {
    ss = warp_sum(ss);
    if (lane == 0) ssw[warp] = ss;
  }
  __syncthreads();
  const int c = threadIdx.x;
  float p = 0.f, pss = 0.f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) p += red[w * kTile + c];
  if constexpr (NORM)
#pragma unroll
    for (int w = 0; w < kWarps; ++w) pss += ssw[w];

  const bool pair = a.output == 2;
  const int n = tile_in * kTile + c;
  if (a.ks == 1 && !pair) {
    if (n < S.N) {
      const float inv = NORM ? rsqrtf(pss / static_cast<float>(a.K) + a.eps) : 1.f;
      const float v = p * inv + (S.bias ? S.bias[n] : 0.f);
      if (a.output == 1) S.y[n] += v;
      else S.y[n] = v;
    }
    return;
  }
  // Split over blocks: publish the partial tile, and let the last block of the tile finish it.
  float* part = a.partial + (static_cast<size_t>(tile) * a.ks + ksi) * (kTile + 1);
  part[c] = p;
  if (c == 0) part[kTile] = pss;
  __threadfence();
  __syncthreads();
  const int ctr = pair ? tile_in : tile;
  const int arrivals = a.ks * (pair ? 2 : 1);
  if (threadIdx.x == 0) *last = atomicAdd(a.counters + ctr, 1) == arrivals - 1;
  __syncthreads();
  if (!*last) return;
  __threadfence();
  if (threadIdx.x == 0) a.counters[ctr] = 0;  // ready for the next launch
  // Sum the slices in order (deterministic).
  const int t0 = pair ? tile_in : tile;  // gate tile (pair) or this tile
  float s0 = 0.f, s1 = 0.f, sq = 0.f;
  for (int k = 0; k < a.ks; ++k) {
    const float* q0 = a.partial + (static_cast<size_t>(t0) * a.ks + k) * (kTile + 1);
    s0 += __ldcg(q0 + c);
    if constexpr (NORM) sq += __ldcg(q0 + kTile);
    if (pair) s1 += __ldcg(q0 + static_cast<size_t>(a.seg[0].tile_end) * a.ks * (kTile + 1) + c);
  }
  const float inv = NORM ? rsqrtf(sq / static_cast<float>(a.K) + a.eps) : 1.f;
  if (pair) {
    const QSeg& G = a.seg[0];
    const QSeg& U = a.seg[1];
    if (n < G.N) {
      const float g = s0 * inv + (G.bias ? G.bias[n] : 0.f);
      const float u = s1 * inv + (U.bias ? U.bias[n] : 0.f);
      G.y[n] = silu(g) * u;
    }
  } else if (n < S.N) {
    const float v = s0 * inv + (S.bias ? S.bias[n] : 0.f);
    if (a.output == 1) S.y[n] += v;
    else S.y[n] = v;
  }
}

template <bool GPTQ, bool NORM, int kStages>
void launch_fused(const QGemvArgs& a, int blocks, size_t smem, cudaStream_t s) {
  static const bool raised = [] {
    int dev = 0, optin = 48 << 10;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    cudaFuncSetAttribute(qgemv_fused_kernel<GPTQ, NORM, kStages>, cudaFuncAttributeMaxDynamicSharedMemorySize, optin);
    return true;
  }();
  (void)raised;
  launch(qgemv_fused_kernel<GPTQ, NORM, kStages>, dim3(static_cast<unsigned>(blocks)), dim3(kWarps * 32), smem, s, a);
  QF_CUDA_LAUNCH();
}

template <int kStages>
void launch_fused_any(bool gptq, bool norm, const QGemvArgs& a, int blocks, size_t smem, cudaStream_t s) {
  if (gptq) norm ? launch_fused<true, true, kStages>(a, blocks, smem, s) : launch_fused<true, false, kStages>(a, blocks, smem, s);
  else norm ? launch_fused<false, true, kStages>(a, blocks, smem, s) : launch_fused<false, false, kStages>(a, blocks, smem, s);
}

}  // namespace

bool quant_gemv_fused(CudaBackend& b, const FusedLinear& op) {
  if (op.rows != 1 || op.count < 1 || op.count > 3) return false;
  const CudaQuantLinear* q[3] = {};
  for (int i = 0; i < op.count; ++i) {
    q[i] = dynamic_cast<const CudaQuantLinear*>(op.w[i]);
    if (!q[i] || q[i]->format != q[0]->format || q[i]->in_features != q[0]->in_features) return false;
  }
  const bool pair = op.output == FusedLinear::Output::SwiGLU;
  if (pair && (op.count != 2 || q[0]->out_features != q[1]->out_features)) return false;
  QGemvArgs a{};
  a.nseg = op.count;
  a.K = static_cast<int>(q[0]->in_features);
  a.units = q[0]->units;
  int tiles = 0, sw = 0;
  float mean_bits = 0;
  for (int i = 0; i < op.count; ++i) {
    const CudaQuantLinear& l = *q[i];
    QSeg& s = a.seg[i];
    s.qw = l.qweight;
    s.tab = l.unit_tab;
    s.perm = l.perm;
    s.qscale = l.qscale;
    s.smax = l.scale_max;
    s.scales = l.scales;
    s.zeros = l.zeros;
    s.bias = l.bias;
    s.y = pair ? op.y[0] : op.y[i];
    s.stride = l.stride;
    s.N = static_cast<int>(l.out_features);
    tiles += static_cast<int>((l.out_features + kTile - 1) / kTile);
    s.tile_end = tiles;
    sw = std::max(sw, l.max_bits);
    mean_bits = std::max(mean_bits, l.mean_bits);
  }
  a.sw = sw;
  a.output = pair ? 2 : op.output == FusedLinear::Output::Accumulate ? 1 : 0;
  a.x = op.x;
  a.norm = op.input == FusedLinear::Input::RmsNorm ? op.norm : nullptr;
  a.eps = op.eps;

  // K slices per tile: about `bps` blocks per SM in one wave, at least one unit per warp, and few
  // enough units per warp for shared memory. Measured on the H100 (bench/NOTES.md): 4 blocks per
  // SM when no unit is wider than 3 bits; 2 when a few 7- or 8-bit units (ExLlamaV2's usual
  // 0.05:8b share of down_proj) size every stage for 8 words while most units are 2 or more bits
  // narrower; 3 otherwise (QFORGE_QGEMV_BPS overrides); units in flight per warp:
  // QFORGE_QGEMV_STAGES (4, or 8).
  static const int bps_env = env_int("QFORGE_QGEMV_BPS", 0);
  const bool few_wide = sw >= 7 && sw - mean_bits >= 2.f;
  const int bps = bps_env > 0 ? bps_env : (sw <= 3 ? 4 : few_wide ? 2 : 3);
  static const int stages = env_int("QFORGE_QGEMV_STAGES", 4) >= 8 ? 8 : 4;
  static const int ks_env = env_int("QFORGE_QGEMV_KS", 0);
  const int max_ks = std::max(1, a.units / kWarps);
  int ks = ks_env > 0 ? ks_env : static_cast<int>(std::lround(static_cast<double>(b.sm_count()) * bps / tiles));
  ks = std::clamp(ks, 1, max_ks);
  int optin = 0, dev = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
  size_t smem = 0;
  for (;; ++ks) {
    a.ks = ks;
    a.upw = ((a.units + ks - 1) / ks + kWarps - 1) / kWarps;
    a.ring = std::min(a.upw, stages);  // a smaller footprint lets the next kernel's blocks in early
    smem = static_cast<size_t>(kWarps) * (a.ring * (sw + 1) * 512 + warp_smem(a.upw).bytes) +
           (kWarps * kTile + kWarps + 4) * sizeof(float);
    if (smem <= static_cast<size_t>(optin) || ks >= a.units) break;
  }
  if (smem > static_cast<size_t>(optin)) return false;
  if (ks > 1 || pair) {
    a.partial = static_cast<float*>(b.scratch(static_cast<size_t>(tiles) * ks * (kTile + 1) * sizeof(float), 5));
    a.counters = b.zeroed_counters(static_cast<size_t>(tiles));
  }
  const int blocks = tiles * ks;
  cudaStream_t s = stream_of(b);
  const bool gptq = q[0]->format == LinearFormat::GPTQ, norm = a.norm != nullptr;
  if (stages == 8) launch_fused_any<8>(gptq, norm, a, blocks, smem, s);
  else launch_fused_any<4>(gptq, norm, a, blocks, smem, s);
  return true;
}

}  // namespace qf::cuda
