// Causal attention for prefill on tensor cores, FlashAttention-2 style. A block takes 64 query
// rows of one head (16 per warp), keeps their fp16 Q fragments in registers and walks the key
// tiles of 64 positions that its rows can see; S = Q·K^T and O += P·V run as mma.sync m16n8k16
// (fp16 operands, fp32 accumulators) and the softmax is computed online in registers, so scores
// never leave the SM. K/V tiles are staged in shared memory with cp.async, double-buffered.
// When the row tiles alone give too few blocks for a long history (a short chunk after a long
// prompt), the key range is also split over blocks and the slices merged by the combine kernel.
#include <cmath>
#include <cstdlib>

#include "backends/cuda/cuda_internal.cuh"

namespace qf::cuda {

namespace {

constexpr int kBM = 64;  // query rows per block
constexpr int kBN = 64;  // keys per tile
constexpr int kFlashWarps = kBM / 16;
constexpr int kFlashThreads = kFlashWarps * 32;

// Rows of a shared tile are padded by 16 bytes so the 8 rows one ldmatrix reads fall on different
// banks. A tile holds kBN (= kBM) rows; K and V have two stages each.
template <int HD>
struct FlashTile {
  static constexpr int kStride = HD + 8;  // halves
  static constexpr int kHalves = kBN * kStride;
  static constexpr size_t kSmemBytes = 4 * kHalves * sizeof(__half);
};
static_assert(kBM == kBN, "the Q tile reuses a K stage");

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// d += a (16x16, row-major fragment) * b (16x8, column-major fragment), fp16 in, fp32 accumulate.
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float fast_exp2(float x) {  // ex2(-inf) = 0, which masking relies on
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

__device__ __forceinline__ uint32_t pack_half2(float a, float b) {
  const __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// grid (row tiles * n_heads, n_splits), kFlashThreads threads, FlashTile<HD>::kSmemBytes shared.
// Row r (0-based in this call) sits at position pos0 + r and sees keys
// [max(0, pos - window + 1), pos]. With n_splits > 1 each block handles one share of its key tiles
// and writes unnormalized partial sums (part_o) with their max (natural log units) and sum
// (part_ml) in the layout attn_combine_kernel reads; otherwise it writes normalized rows to out.
// Blocks per SM: head_dim 128 takes ~210 registers at two blocks (8 warps) per SM; capping them at
// 168 for a third block spilled on sm_90 and measured ~5% slower on a 16k-token prefill (H100).
template <int HD>
__global__ void __launch_bounds__(kFlashThreads, HD == 128 ? 2 : 4)
    flash_prefill_kernel(const float* __restrict__ q, const __half* __restrict__ K, const __half* __restrict__ V,
                         float* __restrict__ out, float* __restrict__ part_o, float* __restrict__ part_ml, int rows,
                         int nh, int nkv, int64_t cap, float scale_log2, int window, int pos0) {
  pdl_wait();
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800  // mma.sync m16n8k16 needs sm_80
  using T = FlashTile<HD>;
  constexpr int kStride = T::kStride;
  extern __shared__ __align__(16) unsigned char flash_smem[];
  __half* sm = reinterpret_cast<__half*>(flash_smem);
  const int ntiles = (rows + kBM - 1) / kBM;
  const int h = static_cast<int>(blockIdx.x % nh);
  // Blocks are dispatched in index order: the last row tiles have the longest histories, go first.
  const int tile = ntiles - 1 - static_cast<int>(blockIdx.x / nh);
  const int split = blockIdx.y, nsplit = gridDim.y;
  const int kvh = h / (nh / nkv);
  const int row0 = tile * kBM;
  const int nvalid = min(kBM, rows - row0);
  // Positions fit in int (checked by the launcher).
  const int p_lo = pos0 + row0;        // position of the tile's first row
  const int p_hi = p_lo + nvalid - 1;  // and of its last real row
  const int k_first = window > 0 ? max(0, p_lo - window + 1) : 0;
  int t_begin = k_first / kBN, t_end = p_hi / kBN + 1;  // key tiles [t_begin, t_end)
  if (nsplit > 1) {
    const int per = (t_end - t_begin + nsplit - 1) / nsplit;
    t_begin += split * per;
    t_end = min(t_end, t_begin + per);
  }

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const __half* Kh = K + static_cast<size_t>(kvh) * cap * HD;
  const __half* Vh = V + static_cast<size_t>(kvh) * cap * HD;

  auto load_kv = [&](int t, int stage) {
    __half* dk = sm + stage * T::kHalves;
    __half* dv = sm + (2 + stage) * T::kHalves;
    constexpr int kPieces = kBN * HD / 8;  // 16-byte pieces per tile
#pragma unroll
    for (int it = 0; it < kPieces / kFlashThreads; ++it) {
      const int i = it * kFlashThreads + threadIdx.x;
      const int r = i / (HD / 8), c = (i % (HD / 8)) * 8;
      const int key = t * kBN + r;
      // Keys past the last row's position may be unwritten (or past the cache): zeros instead, so
      // that masked scores meet finite values.
      const bool ok = key <= p_hi;
      const size_t off = ok ? static_cast<size_t>(key) * HD + c : 0;
      cp_async16(smem_addr(dk + r * kStride + c), Kh + off, ok ? 16 : 0);
      cp_async16(smem_addr(dv + r * kStride + c), Vh + off, ok ? 16 : 0);
    }
  };

  if (t_begin < t_end) load_kv(t_begin, 0);
  cp_async_commit();

  // Q tile (fp32 -> fp16) into the second K stage, which the first key tile does not use.
  __half* sq = sm + T::kHalves;
  {
    const size_t qstride = static_cast<size_t>(nh) * HD;
    const float* qb = q + static_cast<size_t>(row0) * qstride + static_cast<size_t>(h) * HD;
#pragma unroll 4
    for (int it = 0; it < kBM * HD / 4 / kFlashThreads; ++it) {
      const int i = it * kFlashThreads + threadIdx.x;
      const int r = i / (HD / 4), c = (i % (HD / 4)) * 4;
      float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
      if (r < nvalid) v = *reinterpret_cast<const float4*>(qb + r * qstride + c);
      uint2 packed;
      packed.x = pack_half2(v.x, v.y);
      packed.y = pack_half2(v.z, v.w);
      *reinterpret_cast<uint2*>(sq + r * kStride + c) = packed;
    }
  }
  __syncthreads();
  uint32_t qf[HD / 16][4];
#pragma unroll
  for (int kk = 0; kk < HD / 16; ++kk)
    ldmatrix_x4(qf[kk], smem_addr(sq + (warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * kStride + kk * 16 +
                                  (lane >> 4) * 8));
  __syncthreads();  // the second key tile overwrites sq

  float o[HD / 8][4];
#pragma unroll
  for (int d = 0; d < HD / 8; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // rows r_lo and r_lo + 8 (partial sums per lane)
  const int r_lo = warp * 16 + (lane >> 2);

  for (int t = t_begin; t < t_end; ++t) {
    const int stage = (t - t_begin) & 1;
    if (t + 1 < t_end) {
      load_kv(t + 1, stage ^ 1);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const __half* sk = sm + stage * T::kHalves;
    const __half* sv = sm + (2 + stage) * T::kHalves;

    float s[kBN / 8][4];
#pragma unroll
    for (int n = 0; n < kBN / 8; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < HD / 16; ++kk) {
#pragma unroll
      for (int n = 0; n < kBN / 8; n += 2) {
        uint32_t b[4];  // keys n*8.. and (n+1)*8.., dims kk*16.. and kk*16+8..
        ldmatrix_x4(b, smem_addr(sk + (n * 8 + (lane & 7) + (lane >> 4) * 8) * kStride + kk * 16 +
                                 ((lane >> 3) & 1) * 8));
        mma16816(s[n], qf[kk], b[0], b[1]);
        mma16816(s[n + 1], qf[kk], b[2], b[3]);
      }
    }

    // Scale into log2 units; mask only tiles that cross the diagonal or the window's edge.
    const int kbase = t * kBN;
    const bool need_mask = kbase + kBN - 1 > p_lo || (window > 0 && kbase <= p_hi - window);
    // key - row position of element (n, e): rel + n*8 + (e&1) - (e>>1)*8.
    const int rel = kbase - p_lo - r_lo + (lane & 3) * 2;
#pragma unroll
    for (int n = 0; n < kBN / 8; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float x = s[n][e] * scale_log2;
        if (need_mask) {
          const int d = rel + n * 8 + (e & 1) - (e >> 1) * 8;
          if (d > 0 || (window > 0 && d <= -window)) x = -INFINITY;
        }
        s[n][e] = x;
      }

    float tmax[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < kBN / 8; ++n) {
      tmax[0] = fmaxf(tmax[0], fmaxf(s[n][0], s[n][1]));
      tmax[1] = fmaxf(tmax[1], fmaxf(s[n][2], s[n][3]));
    }
    float mu[2], alpha[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      tmax[i] = fmaxf(tmax[i], __shfl_xor_sync(0xffffffffu, tmax[i], 1));
      tmax[i] = fmaxf(tmax[i], __shfl_xor_sync(0xffffffffu, tmax[i], 2));
      const float mn = fmaxf(m[i], tmax[i]);
      mu[i] = mn == -INFINITY ? 0.f : mn;  // a row with nothing visible yet: keep exp2 finite
      alpha[i] = fast_exp2(m[i] - mu[i]);
      m[i] = mn;
    }

    // P in fp16 A-fragment order (the accumulator layout of two n-tiles is one k-step of A).
    // The sums use the rounded values so numerator and denominator see the same weights.
    uint32_t pa[kBN / 16][4];
    float rs[2] = {0.f, 0.f};
#pragma unroll
    for (int n = 0; n < kBN / 8; ++n) {
      const __half2 h01 = __floats2half2_rn(fast_exp2(s[n][0] - mu[0]), fast_exp2(s[n][1] - mu[0]));
      const __half2 h23 = __floats2half2_rn(fast_exp2(s[n][2] - mu[1]), fast_exp2(s[n][3] - mu[1]));
      const float2 f01 = __half22float2(h01), f23 = __half22float2(h23);
      rs[0] += f01.x + f01.y;
      rs[1] += f23.x + f23.y;
      pa[n / 2][(n & 1) * 2] = *reinterpret_cast<const uint32_t*>(&h01);
      pa[n / 2][(n & 1) * 2 + 1] = *reinterpret_cast<const uint32_t*>(&h23);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) l[i] = l[i] * alpha[i] + rs[i];
#pragma unroll
    for (int d = 0; d < HD / 8; ++d) {
      o[d][0] *= alpha[0];
      o[d][1] *= alpha[0];
      o[d][2] *= alpha[1];
      o[d][3] *= alpha[1];
    }
#pragma unroll
    for (int kk = 0; kk < kBN / 16; ++kk) {
#pragma unroll
      for (int d = 0; d < HD / 8; d += 2) {
        uint32_t b[4];  // keys kk*16.. and kk*16+8.., dims d*8.. and (d+1)*8.. (transposed: V is [key][dim])
        ldmatrix_x4_trans(b, smem_addr(sv + (kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * kStride + d * 8 +
                                       (lane >> 4) * 8));
        mma16816(o[d], pa[kk], b[0], b[1]);
        mma16816(o[d + 1], pa[kk], b[2], b[3]);
      }
    }
    __syncthreads();  // the next iteration refills this stage
  }

#pragma unroll
  for (int i = 0; i < 2; ++i) {
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
  }
  const int col = (lane & 3) * 2;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int r = r_lo + 8 * i;
    if (r >= nvalid) continue;
    const size_t orow = static_cast<size_t>(row0 + r) * nh + h;
    if (nsplit == 1) {
      const float inv = 1.f / l[i];  // > 0: every real row sees at least its own key
#pragma unroll
      for (int d = 0; d < HD / 8; ++d)
        *reinterpret_cast<float2*>(out + orow * HD + d * 8 + col) = make_float2(o[d][2 * i] * inv, o[d][2 * i + 1] * inv);
    } else {
      const size_t pidx = orow * nsplit + split;
#pragma unroll
      for (int d = 0; d < HD / 8; ++d)
        *reinterpret_cast<float2*>(part_o + pidx * HD + d * 8 + col) = make_float2(o[d][2 * i], o[d][2 * i + 1]);
      if ((lane & 3) == 0) {
        part_ml[2 * pidx] = m[i] == -INFINITY ? -INFINITY : m[i] * 0.69314718f;  // log2 -> natural units
        part_ml[2 * pidx + 1] = l[i];
      }
    }
  }
#endif
}

template <int HD>
void launch_flash(CudaBackend& b, const float* q, const __half* K, const __half* V, int64_t cap, int64_t pos0,
                  int64_t rows, const AttentionParams& p, float* out) {
  cudaStream_t s = stream_of(b);
  const int nh = static_cast<int>(p.n_heads), nkv = static_cast<int>(p.n_kv_heads);
  constexpr size_t smem = FlashTile<HD>::kSmemBytes;
  // Over 48 KiB of dynamic shared memory needs an opt-in (per device; cheap, so on every call).
  QF_CUDA(cudaFuncSetAttribute(flash_prefill_kernel<HD>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(smem)));
  const int64_t ntiles = (rows + kBM - 1) / kBM;
  const int64_t blocks = ntiles * nh;
  // Key tiles the longest row sees.
  int64_t hist = pos0 + rows;
  if (p.sliding_window > 0) hist = std::min(hist, p.sliding_window + kBM);
  const int64_t hist_tiles = (hist + kBN - 1) / kBN;
  // Fewer blocks than multiprocessors over a long history: split the keys too (at least 4 tiles
  // per slice), aiming at two blocks per multiprocessor.
  int nsplit = 1;
  if (blocks < b.sm_count() && hist_tiles >= 8)
    nsplit = static_cast<int>(std::min<int64_t>({(2 * b.sm_count() + blocks - 1) / blocks, hist_tiles / 4, 16}));
  const SplitPartials part = split_partials(b, rows, nh, HD, nsplit);
  const float scale_log2 = p.scale * 1.4426950408889634f;
  // A window longer than every row's history is no window (and keeps the value in int range).
  const int window = p.sliding_window > 0 && p.sliding_window < pos0 + rows ? static_cast<int>(p.sliding_window) : 0;
  launch(flash_prefill_kernel<HD>, dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(nsplit)),
         dim3(kFlashThreads), smem, s, q, K, V, out, part.o, part.ml, static_cast<int>(rows), nh, nkv, cap,
         scale_log2, window, static_cast<int>(pos0));
  QF_CUDA_LAUNCH();
  if (nsplit > 1) attention_combine(part.o, part.ml, out, rows, nh, HD, nsplit, s);
}

bool flash_enabled() {
  static const bool on = [] {
    const char* e = std::getenv("QFORGE_FLASH_ATTN");
    return !(e && e[0] == '0');
  }();
  return on;
}

}  // namespace

bool flash_attention_prefill(CudaBackend& b, const float* q, const __half* K, const __half* V, int64_t cap,
                             int64_t pos0, int64_t rows, const AttentionParams& p, float* out) {
  if (!flash_enabled() || b.cc_major() < 8 || rows < kFlashMinRows) return false;
  if (pos0 + rows + kBN > (int64_t{1} << 30)) return false;  // positions are int in the kernel
  // Q rows are read as float4 and outputs written as float2.
  if (reinterpret_cast<uintptr_t>(q) % 16 != 0 || reinterpret_cast<uintptr_t>(out) % 8 != 0) return false;
  switch (p.head_dim) {
    case 64: launch_flash<64>(b, q, K, V, cap, pos0, rows, p, out); return true;
    case 128: launch_flash<128>(b, q, K, V, cap, pos0, rows, p, out); return true;
    default: return false;
  }
}

}  // namespace qf::cuda
