// The converter's quantization primitives on the GPU (Backend, "Quantization"). Every step mirrors
// the CPU reference (backends/cpu/cpu_gptq.cpp) expression for expression; where the order of a sum
// differs it is still fixed (no floating-point atomics), so a run is bit-identical to the next on
// the same GPU and toolkit.
//
//   hessian_accumulate   H += X^T X on TF32 tensor cores with fp32 accuracy ("3xTF32"): X = Xh + Xl
//                        with Xh = tf32(X), Xl = tf32(X - Xh), and one GEMM over the stacked rows
//                        [Xh; Xh; Xl]^T [Xl; Xh; Xh] = Xh'Xl + Xh'Xh + Xl'Xh (Xl'Xl, ~2^-22, dropped).
//   matrix_diagonal      one strided copy.
//   gptq_inverse_factor  B = J P H P^T J + damp (lower triangle, built in U's memory), cuSOLVER's
//                        fp32 Cholesky and triangular inverse in place, then U = J L^-1 J by one
//                        in-place reversal: no K x K temporary besides H and U.
//   gptq_quantize        per group of rows: column maxima (1 kernel), the scale search over the
//                        multiplier grid (1 kernel, partial sums per 32-column tile), the choice of
//                        the multiplier (1 small kernel), the rows one by one with the error fed to
//                        the rest of the group (1 kernel), and the later groups updated by one GEMM
//                        (fp32, or TF32 with set_gptq_tf32). No host synchronisation until the codes
//                        are copied back at the end.
//
// H200, bench/gptq_bench: X^T X 2048 x 4096 0.86 ms; inverse factor K=4096 12.8 ms, K=11008 88 ms;
// GPTQ 4-bit g128 4096x4096 8.1 ms, K=4096 N=11008 24.5 ms, K=11008 N=4096 31.5 ms. The scale search
// is ~2 ms of the first; for the 45 MB code arrays most of the time is the host's side (a fresh
// std::vector faulted in and zeroed, and the copy into pageable memory), which the GPU work overlaps.
#include <cusolverDn.h>

#include <algorithm>
#include <climits>
#include <vector>

#include "backends/cuda/cuda_internal.cuh"

#define QF_CUSOLVER(call)                                                                     \
  do {                                                                                        \
    cusolverStatus_t qf_st_ = (call);                                                         \
    if (qf_st_ != CUSOLVER_STATUS_SUCCESS)                                                    \
      ::qf::fail("cuSOLVER error ", static_cast<int>(qf_st_), " (", #call, ") at ", __FILE__, \
                 ":", __LINE__);                                                              \
  } while (0)

namespace qf::cuda {

namespace {

constexpr int kCols = 32;       // columns per warp (one per lane) in the GPTQ kernels
constexpr int kSlices = 8;      // warps per block in the column kernels
constexpr int kMaxRegRows = 256;  // group rows gptq_rows_kernel keeps in registers (8 slices x 32)
constexpr int64_t kHessianFloats = int64_t{8} << 20;  // bounds the split copy of X: 4 x rows x K <= 32M floats

// fp32 -> TF32 (round to nearest, ties away), kept in an fp32 register: the low 13 bits are zero.
__device__ __forceinline__ float round_tf32(float x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  uint32_t u;
  asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(u) : "f"(x));
  return __uint_as_float(u);
#else
  return x;
#endif
}

// The expressions of the CPU reference, with IEEE rounding spelled out so that nvcc fuses nothing.
struct SearchArgs {
  float norm, p_min, p_max;
  int p_grid, P;
  bool norm35;  // norm == 3.5: a^3 sqrt(a) instead of powf
};

__device__ __forceinline__ float err_pow(float e, const SearchArgs& sa) {
  const float a = fabsf(e);
  return sa.norm35 ? __fmul_rn(__fmul_rn(__fmul_rn(a, a), a), __fsqrt_rn(a)) : powf(a, sa.norm);
}

// clamp(rint(w / s) + z, 0, maxq), IEEE division.
__device__ __forceinline__ float code_of(float w, float s, float z, float maxq) {
  return fminf(fmaxf(__fadd_rn(rintf(__fdiv_rn(w, s)), z), 0.f), maxq);
}

// p_min + p (p_max - p_min) / p_grid
__device__ __forceinline__ float multiplier(const SearchArgs& sa, int p) {
  return __fadd_rn(sa.p_min, __fdiv_rn(__fmul_rn(static_cast<float>(p), __fsub_rn(sa.p_max, sa.p_min)),
                                       static_cast<float>(sa.p_grid)));
}

// exl2_scale(qs, scale_max) = float(qs^2) * scale_max / 256
__device__ __forceinline__ float exl2_scale_d(int qs, float scale_max) {
  return __fdiv_rn(__fmul_rn(static_cast<float>(qs * qs), scale_max), 256.0f);
}

// qs = clamp(rint(16 sqrt(base / smax)), 1, 16)
__device__ __forceinline__ int scale_code(float base, float smax) {
  return static_cast<int>(fminf(fmaxf(rintf(__fmul_rn(16.f, __fsqrt_rn(__fdiv_rn(base, smax)))), 1.f), 16.f));
}

// ---- Hessian and inverse factor ---------------------------------------------------------------

// The chunk of X [n = m * K floats] as T = [Xl; Xh; Xh; Xl] (each m x K): Xh = tf32(x), Xl =
// tf32(x - Xh) (x - Xh is exact). The GEMM then reads rows m.. (Xh; Xh; Xl) against rows 0.. (Xl;
// Xh; Xh).
__global__ void hessian_split_kernel(const float* __restrict__ x, float* __restrict__ T, int64_t n) {
  pdl_wait();
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float v = x[i];
    const float hi = round_tf32(v), lo = round_tf32(__fsub_rn(v, hi));
    T[i] = lo;
    T[n + i] = hi;
    T[2 * n + i] = hi;
    T[3 * n + i] = lo;
  }
}

// B[i][j] = H[perm[K-1-i]][perm[K-1-j]] for j <= i (zero diagonal entries count as 1, + damp on the
// diagonal), computed in double as the CPU does and stored in fp32. One block per row (strided).
__global__ void gptq_fill_kernel(const float* __restrict__ H, const int32_t* __restrict__ perm, int64_t K,
                                 double damp, float* __restrict__ B) {
  pdl_wait();
  for (int64_t i = blockIdx.x; i < K; i += gridDim.x) {
    const float* hr = H + static_cast<int64_t>(perm[K - 1 - i]) * K;
    float* br = B + i * K;
    for (int64_t j = threadIdx.x; j <= i; j += blockDim.x) {
      double v = hr[perm[K - 1 - j]];
      if (i == j) v = (v == 0.0 ? 1.0 : v) + damp;
      br[j] = static_cast<float>(v);
    }
  }
}

// M holds L^-1 in its row-major lower triangle; U[i][j] = M[K-1-i][K-1-j] for j >= i, else 0. Element
// p and element K*K-1-p trade places, so one pass works in place. Sets *bad on a non-finite entry.
__global__ void gptq_reverse_kernel(float* __restrict__ M, int64_t K, int* __restrict__ bad) {
  pdl_wait();
  const int64_t total = K * K, half = (total + 1) / 2;
  bool nonfinite = false;
  for (int64_t p = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; p < half;
       p += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t q = total - 1 - p;
    const int64_t i = p / K, j = p - i * K;  // p = (i, j), q = (K-1-i, K-1-j)
    const float mp = M[p], mq = M[q];
    const bool keep_p = j >= i, keep_q = i >= j;
    nonfinite |= (keep_p && !isfinite(mq)) || (keep_q && !isfinite(mp));
    M[p] = keep_p ? mq : 0.f;
    M[q] = keep_q ? mp : 0.f;
  }
  if (nonfinite) *bad = 1;
}

// ---- GPTQ: one group of rows [a, a + rows) ----------------------------------------------------

// base[n] = (max_r |W[r][n]| + 1e-12) / (maxq / 2); *smax_bits = max_n base[n] (float bits: the
// values are positive, so the integer maximum is the float maximum). Block: 32 columns x 8 slices
// of rows, the slices merged in shared memory.
__global__ void __launch_bounds__(kCols * kSlices)
    gptq_colmax_kernel(const float* __restrict__ W, int64_t N, int64_t a, int rows, float half_q,
                       float* __restrict__ base, unsigned* __restrict__ smax_bits) {
  pdl_wait();
  const int lane = threadIdx.x & 31, slice = threadIdx.x >> 5;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kCols + lane;
  float m = 0.f;
  if (n < N) {
    const float* col = W + a * N + n;
    for (int r = slice; r < rows; r += kSlices) m = fmaxf(m, fabsf(col[static_cast<int64_t>(r) * N]));
  }
  __shared__ float red[kSlices][kCols];
  red[slice][lane] = m;
  __syncthreads();
  if (slice != 0) return;
  for (int k = 1; k < kSlices; ++k) m = fmaxf(m, red[k][lane]);
  float v = 0.f;
  if (n < N) {
    v = __fdiv_rn(__fadd_rn(m, 1e-12f), half_q);
    base[n] = v;
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  if (lane == 0) atomicMax(smax_bits, __float_as_uint(v));
}

// The scale search. A task is (tile of 32 columns, grid point p), one warp each, lanes = columns:
// the sum over the group's rows and the tile's columns of err_pow(w - dq(w, s_n(p))) goes to
// partial[p][tile] (fp32 per lane over the rows, then a fixed shuffle tree in double). The tasks of
// a block's 8 warps are consecutive (mostly one tile), so the tile's rows are read from L1.
// Tasks with p == 0 also store the scale codes qs.
__global__ void __launch_bounds__(kCols * kSlices)
    gptq_search_kernel(const float* __restrict__ W, int64_t N, int64_t a, int rows, int bits,
                       const float* __restrict__ base, const unsigned* __restrict__ smax_bits, SearchArgs sa,
                       int64_t tiles, uint8_t* __restrict__ qscale, double* __restrict__ partial) {
  pdl_wait();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const float smax = __uint_as_float(*smax_bits);
  const float maxq = static_cast<float>((1 << bits) - 1), z = static_cast<float>(1 << (bits - 1));
  const int64_t tasks = tiles * sa.P;
  for (int64_t t = static_cast<int64_t>(blockIdx.x) * kSlices + warp; t < tasks;
       t += static_cast<int64_t>(gridDim.x) * kSlices) {
    const int64_t tile = t / sa.P;
    const int p = static_cast<int>(t - tile * sa.P);
    const int64_t n = tile * kCols + lane;
    float acc = 0.f;
    if (n < N) {
      const int qs = scale_code(base[n], smax);
      if (p == 0) qscale[n] = static_cast<uint8_t>(qs);
      const float s = exl2_scale_d(qs, __fmul_rn(smax, multiplier(sa, p)));
      const float* col = W + a * N + n;
#pragma unroll 4
      for (int r = 0; r < rows; ++r) {
        const float w = col[static_cast<int64_t>(r) * N];
        const float dq = __fmul_rn(__fsub_rn(code_of(w, s, z, maxq), z), s);
        acc = __fadd_rn(acc, err_pow(__fsub_rn(w, dq), sa));
      }
    }
    double v = acc;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) partial[static_cast<int64_t>(p) * tiles + tile] = v;
  }
}

// One block: tot[p] = sum over tiles of partial[p][tile] (fixed order, double), the first minimum,
// then scale_max = fp16(smax * p*) (0 -> the bit pattern 1), its fp32 value for the scales, and the
// fp32 product for the error message should it overflow (checked by the host at the end).
__global__ void __launch_bounds__(256)
    gptq_pick_kernel(const double* __restrict__ partial, int64_t tiles, const unsigned* __restrict__ smax_bits,
                     SearchArgs sa, double* tot, float* __restrict__ smf, uint16_t* __restrict__ sm16,
                     float* __restrict__ sval) {
  pdl_wait();
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
  for (int p = warp; p < sa.P; p += nw) {
    double s = 0.0;
    for (int64_t t = lane; t < tiles; t += 32) s += partial[static_cast<int64_t>(p) * tiles + t];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (lane == 0) tot[p] = s;
  }
  __syncthreads();
  if (threadIdx.x != 0) return;
  int best = 0;
  double best_err = 0.0;
  for (int p = 0; p < sa.P; ++p) {
    const double e = tot[p];
    if (p == 0 || e < best_err) best = p, best_err = e;
  }
  const float v = __fmul_rn(__uint_as_float(*smax_bits), multiplier(sa, best));
  unsigned short h = __half_as_ushort(__float2half_rn(v));
  if (h == 0) h = 1;  // an all-zero group: the smallest positive scale keeps w / s finite
  *sval = v;
  *sm16 = h;
  *smf = __half2float(__ushort_as_half(h));
}

struct RowArgs {
  float* W;
  const float* U;
  int64_t K, N, a;
  int rows, bits;
  const uint8_t* qscale;  // the group's [N] scale codes
  const float* smf;       // the group's scale_max, as fp32
  uint8_t* q;             // [K][N] codes
  float* E;               // [rows][N] scaled errors (they only feed the GEMM)
  bool tf32;              // the GEMM runs on TF32: E is rounded to nearest here, not truncated there
};

// Row t of the group: its code, dequantized value and scaled error, as the CPU computes them.
__device__ __forceinline__ float quantize_one(const RowArgs& g, int64_t n, int t, float w, float s, float d,
                                              float z, float maxq, bool live) {
  const float c = code_of(w, s, z, maxq);
  const float dq = __fmul_rn(__fsub_rn(c, z), s);
  const float e = __fdiv_rn(__fsub_rn(w, dq), d);
  if (live) {
    const int64_t r = g.a + t;
    g.W[r * g.N + n] = dq;
    g.q[r * g.N + n] = static_cast<uint8_t>(c);
    g.E[static_cast<int64_t>(t) * g.N + n] = g.tf32 ? round_tf32(e) : e;
  }
  return e;
}

__device__ __forceinline__ int tri_off(int t, int rows) { return t * rows - t * (t - 1) / 2; }

// The group's rows in order. Block: 32 columns (lanes) x 8 slices (warps); slice s holds rows
// s, s+8, s+16, ... of its column in registers (w[j] = row s + 8j, MAXR >= rows / 8). The upper
// triangle of U[a:b, a:b] is staged in shared memory (packed, row t from column t). Row t: its
// owner slice rounds it and publishes the scaled error e through shared memory (double buffered:
// one barrier per row), then every slice subtracts e * U[t][t2] from its rows t2 > t.
template <int MAXR>
__global__ void __launch_bounds__(kCols * kSlices) gptq_rows_kernel(const RowArgs g) {
  extern __shared__ float tri[];
  __shared__ float es[2][kCols];
  pdl_wait();
  const int lane = threadIdx.x & 31, slice = threadIdx.x >> 5;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kCols + lane;
  const bool live = n < g.N;
  const int rows = g.rows;
  const float maxq = static_cast<float>((1 << g.bits) - 1), z = static_cast<float>(1 << (g.bits - 1));
  const float s = live ? exl2_scale_d(g.qscale[n], *g.smf) : 1.f;
  for (int t = slice; t < rows; t += kSlices) {
    const float* src = g.U + (g.a + t) * g.K + g.a + t;
    float* dst = tri + tri_off(t, rows);
    for (int c = lane; c < rows - t; c += 32) dst[c] = src[c];
  }
  float w[MAXR];
#pragma unroll
  for (int j = 0; j < MAXR; ++j) {
    const int t = slice + kSlices * j;
    w[j] = live && t < rows ? g.W[(g.a + t) * g.N + n] : 0.f;
  }
  __syncthreads();
#pragma unroll
  for (int j = 0; j < MAXR; ++j) {
    if (kSlices * j >= rows) break;
    for (int o = 0; o < kSlices; ++o) {
      const int t = kSlices * j + o;
      if (t >= rows) break;
      const float* ut = tri + tri_off(t, rows) - t;  // ut[t2] = U[a+t][a+t2] for t2 >= t
      float u[MAXR];
#pragma unroll
      for (int j2 = j; j2 < MAXR; ++j2) {
        const int t2 = slice + kSlices * j2;
        u[j2] = t2 > t && t2 < rows ? ut[t2] : 0.f;
      }
      if (slice == o) es[t & 1][lane] = quantize_one(g, n, t, w[j], s, ut[t], z, maxq, live);
      __syncthreads();
      const float e = es[t & 1][lane];
#pragma unroll
      for (int j2 = j; j2 < MAXR; ++j2) w[j2] = fmaf(-e, u[j2], w[j2]);  // u = 0: rows not after t
    }
  }
}

// The same for groups too tall for the register kernel: one thread per column, the group's rows
// updated in global memory (the same fmaf in the same order, so the results are identical).
__global__ void __launch_bounds__(128) gptq_rows_global_kernel(const RowArgs g) {
  pdl_wait();
  const int64_t n = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (n >= g.N) return;
  const float maxq = static_cast<float>((1 << g.bits) - 1), z = static_cast<float>(1 << (g.bits - 1));
  const float s = exl2_scale_d(g.qscale[n], *g.smf);
  for (int t = 0; t < g.rows; ++t) {
    const float* ut = g.U + (g.a + t) * g.K + g.a;
    const float e = quantize_one(g, n, t, g.W[(g.a + t) * g.N + n], s, ut[t], z, maxq, true);
    for (int t2 = t + 1; t2 < g.rows; ++t2) {
      float* p = g.W + (g.a + t2) * g.N + n;
      *p = fmaf(-e, ut[t2], *p);
    }
  }
}

template <int MAXR>
void launch_rows(const RowArgs& g, size_t smem, cudaStream_t s) {
  auto kernel = gptq_rows_kernel<MAXR>;
  if (smem > (48u << 10))
    QF_CUDA(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  launch(kernel, dim3(static_cast<unsigned>((g.N + kCols - 1) / kCols)), dim3(kCols * kSlices), smem, s, g);
}

// Device memory for one call, carved into 256-byte aligned pieces; freed on every path.
class Workspace {
 public:
  size_t take(size_t bytes) {
    const size_t off = bytes_;
    bytes_ += (bytes + 255) & ~static_cast<size_t>(255);
    return off;
  }
  size_t bytes() const { return bytes_; }
  void allocate(CudaBackend& b, const char* what) {
    b.check_fits(bytes_, what);
    QF_CUDA(cudaMalloc(&p_, std::max<size_t>(bytes_, 1)));
    owned_ = true;
  }
  void use(void* p) { p_ = p; }  // memory someone else owns
  template <typename T>
  T* at(size_t off) const {
    return reinterpret_cast<T*>(static_cast<char*>(p_) + off);
  }
  Workspace() = default;
  Workspace(const Workspace&) = delete;
  Workspace& operator=(const Workspace&) = delete;
  ~Workspace() {
    if (owned_) cudaFree(p_);
  }

 private:
  void* p_ = nullptr;
  bool owned_ = false;
  size_t bytes_ = 0;
};

}  // namespace

}  // namespace qf::cuda

namespace qf {

using namespace qf::cuda;

void CudaBackend::hessian_accumulate(float* H, const float* X, int64_t rows, int64_t K) {
  if (rows <= 0 || K <= 0) return;
  QF_CHECK(K <= INT_MAX / 4, "internal: Hessian of ", K, " inputs is too large for cuBLAS");
  cudaStream_t s = stream_of(*this);
  auto h = static_cast<cublasHandle_t>(cublas());
  const int64_t chunk = std::max<int64_t>(1, std::min(rows, kHessianFloats / K));
  auto* T = static_cast<float*>(scratch(static_cast<size_t>(4 * chunk * K) * sizeof(float), 4));
  const float one = 1.f;
  for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
    const int64_t m = std::min(chunk, rows - r0), n = m * K;
    launch(hessian_split_kernel, dim3(grid_for(n, 256, sm_count() * 16)), dim3(256), 0, s, X + r0 * K, T, n);
    QF_CUDA_LAUNCH();
    // Column-major, T^T is K x 4m (ld K): H (K x K) += T^T[:, m:4m] (T^T[:, 0:3m])^T. H is symmetric,
    // so its row-major and column-major readings are the same matrix.
    QF_CUBLAS(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_T, static_cast<int>(K), static_cast<int>(K),
                           static_cast<int>(3 * m), &one, T + n, CUDA_R_32F, static_cast<int>(K), T, CUDA_R_32F,
                           static_cast<int>(K), &one, H, CUDA_R_32F, static_cast<int>(K),
                           CUBLAS_COMPUTE_32F_FAST_TF32, CUBLAS_GEMM_DEFAULT));
  }
}

std::vector<float> CudaBackend::matrix_diagonal(const float* H, int64_t K) {
  std::vector<float> d(static_cast<size_t>(std::max<int64_t>(K, 0)));
  if (K <= 0) return d;
  cudaStream_t s = stream_of(*this);
  QF_CUDA(cudaMemcpy2DAsync(d.data(), sizeof(float), H, static_cast<size_t>(K + 1) * sizeof(float), sizeof(float),
                            static_cast<size_t>(K), cudaMemcpyDeviceToHost, s));
  QF_CUDA(cudaStreamSynchronize(s));
  return d;
}

bool CudaBackend::gptq_inverse_factor(const float* H, const std::vector<int32_t>& perm, int64_t K, double damp,
                                      float* U) {
  QF_CHECK(static_cast<int64_t>(perm.size()) == K, "internal: permutation of ", perm.size(), " rows for ", K);
  if (K == 0) return true;
  QF_CHECK(K <= INT_MAX, "internal: Hessian of ", K, " inputs is too large for cuSOLVER");
  cudaStream_t s = stream_of(*this);
  if (!cusolver_) {
    cusolverDnHandle_t h = nullptr;
    QF_CUSOLVER(cusolverDnCreate(&h));
    // Owned from here on; detached from the stream before it goes (the backend's stream may be gone).
    std::shared_ptr<void> owner(h, [](void* p) {
      auto hh = static_cast<cusolverDnHandle_t>(p);
      cusolverDnSetStream(hh, nullptr);
      cusolverDnDestroy(hh);
    });
    QF_CUSOLVER(cusolverDnSetStream(h, s));
    QF_CUSOLVER(cusolverDnSetDeterministicMode(h, CUSOLVER_DETERMINISTIC_RESULTS));
    cusolver_ = std::move(owner);
  }
  auto h = static_cast<cusolverDnHandle_t>(cusolver_.get());
  const int k = static_cast<int>(K);

  // Workspace sizes (potrf and trtri run one after the other and share the device buffer).
  int lwork = 0;
  QF_CUSOLVER(cusolverDnSpotrf_bufferSize(h, CUBLAS_FILL_MODE_UPPER, k, U, k, &lwork));
  size_t tri_dev = 0, tri_host = 0;
  QF_CUSOLVER(cusolverDnXtrtri_bufferSize(h, CUBLAS_FILL_MODE_UPPER, CUBLAS_DIAG_NON_UNIT, K, CUDA_R_32F, U, K,
                                          &tri_dev, &tri_host));
  Workspace ws;
  const size_t o_perm = ws.take(static_cast<size_t>(K) * sizeof(int32_t));
  const size_t o_info = ws.take(3 * sizeof(int));
  const size_t work_bytes = std::max(static_cast<size_t>(std::max(lwork, 1)) * sizeof(float), tri_dev);
  const size_t o_work = ws.take(work_bytes);
  ws.allocate(*this, "the inverse Hessian factor's workspace");
  std::vector<char> host_work(std::max<size_t>(tri_host, 1));
  int32_t* d_perm = ws.at<int32_t>(o_perm);
  int* d_info = ws.at<int>(o_info);  // potrf, trtri, non-finite result

  QF_CUDA(cudaMemcpyAsync(d_perm, perm.data(), static_cast<size_t>(K) * sizeof(int32_t), cudaMemcpyHostToDevice, s));
  QF_CUDA(cudaMemsetAsync(d_info, 0, 3 * sizeof(int), s));
  // B (row-major, lower triangle) in U's memory: read column-major it is the upper triangle of the
  // same symmetric matrix, which potrf factors as R^T R, R = L^T; trtri then leaves R^-1 = (L^-1)^T
  // there, i.e. L^-1 in the row-major lower triangle.
  launch(gptq_fill_kernel, dim3(static_cast<unsigned>(std::min<int64_t>(K, sm_count() * 16))), dim3(256), 0, s, H,
         static_cast<const int32_t*>(d_perm), K, damp, U);
  QF_CUDA_LAUNCH();
  QF_CUSOLVER(cusolverDnSpotrf(h, CUBLAS_FILL_MODE_UPPER, k, U, k, ws.at<float>(o_work), std::max(lwork, 1), d_info));
  int info[3] = {0, 0, 0};
  QF_CUDA(cudaMemcpyAsync(info, d_info, sizeof(int), cudaMemcpyDeviceToHost, s));
  QF_CUDA(cudaStreamSynchronize(s));
  QF_CHECK(info[0] >= 0, "internal: cusolverDnSpotrf rejected argument ", -info[0]);
  if (info[0] > 0) return false;  // not positive definite: the caller damps more
  QF_CUSOLVER(cusolverDnXtrtri(h, CUBLAS_FILL_MODE_UPPER, CUBLAS_DIAG_NON_UNIT, K, CUDA_R_32F, U, K,
                               ws.at<void>(o_work), tri_dev, host_work.data(), tri_host, d_info + 1));
  launch(gptq_reverse_kernel, dim3(grid_for((K * K + 1) / 2, 256, sm_count() * 16)), dim3(256), 0, s, U, K, d_info + 2);
  QF_CUDA_LAUNCH();
  QF_CUDA(cudaMemcpyAsync(info + 1, d_info + 1, 2 * sizeof(int), cudaMemcpyDeviceToHost, s));
  QF_CUDA(cudaStreamSynchronize(s));
  QF_CHECK(info[1] >= 0, "internal: cusolverDnXtrtri rejected argument ", -info[1]);
  return info[1] == 0 && info[2] == 0;  // a zero pivot or a non-finite entry: not positive definite in fp32
}

void* CudaBackend::gptq_workspace(size_t bytes) {
  if (bytes <= gptq_ws_bytes_) return gptq_ws_.get();
  QF_CUDA(cudaStreamSynchronize(stream_of(*this)));
  gptq_ws_.reset();
  gptq_ws_bytes_ = 0;
  const size_t want = std::max<size_t>(bytes, 1 << 20);
  check_fits(want, "GPTQ's working memory");
  void* p = nullptr;
  QF_CUDA(cudaMalloc(&p, want));
  gptq_ws_ = std::shared_ptr<void>(p, [](void* q) { cudaFree(q); });
  gptq_ws_bytes_ = want;
  return p;
}

GptqCodes CudaBackend::gptq_quantize(float* W, const float* U, int64_t K, int64_t N,
                                     const std::vector<GptqGroup>& groups, const ScaleSearch& ss) {
  const int64_t max_rows = check_gptq_groups(groups, K);
  QF_CHECK(N > 0 && K <= INT_MAX && N <= INT_MAX, "internal: GPTQ of a ", K, "x", N, " matrix");
  QF_CHECK(ss.p_grid >= 1 && ss.p_grid <= (1 << 20), "internal: scale search grid of ", ss.p_grid, " steps");
  const size_t G = groups.size();
  const int P = ss.p_grid + 1;
  const int64_t tiles = (N + kCols - 1) / kCols;
  const SearchArgs sa{ss.norm, ss.p_min, ss.p_max, ss.p_grid, P, ss.norm == 3.5f};
  cudaStream_t s = stream_of(*this);
  auto h = static_cast<cublasHandle_t>(cublas());

  Workspace ws;  // carved out of the buffer kept between calls (the converter quantizes ~40 times per layer)
  const size_t o_q = ws.take(static_cast<size_t>(K * N));
  const size_t o_qs = ws.take(G * static_cast<size_t>(N));
  const size_t o_sm16 = ws.take(G * sizeof(uint16_t));
  const size_t o_smf = ws.take(G * sizeof(float));
  const size_t o_sval = ws.take(G * sizeof(float));
  const size_t o_smax = ws.take(G * sizeof(unsigned));
  const size_t o_base = ws.take(static_cast<size_t>(N) * sizeof(float));
  const size_t o_E = ws.take(static_cast<size_t>(max_rows * N) * sizeof(float));
  const size_t o_part = ws.take(static_cast<size_t>(P) * static_cast<size_t>(tiles) * sizeof(double));
  const size_t o_tot = ws.take(static_cast<size_t>(P) * sizeof(double));
  ws.use(gptq_workspace(ws.bytes()));
  uint8_t* d_q = ws.at<uint8_t>(o_q);
  uint8_t* d_qs = ws.at<uint8_t>(o_qs);
  uint16_t* d_sm16 = ws.at<uint16_t>(o_sm16);
  float* d_smf = ws.at<float>(o_smf);
  float* d_sval = ws.at<float>(o_sval);
  unsigned* d_smax = ws.at<unsigned>(o_smax);
  float* d_base = ws.at<float>(o_base);
  float* d_E = ws.at<float>(o_E);
  double* d_part = ws.at<double>(o_part);
  double* d_tot = ws.at<double>(o_tot);
  QF_CUDA(cudaMemsetAsync(d_smax, 0, G * sizeof(unsigned), s));

  int dev = 0, optin = 48 << 10;
  QF_CUDA(cudaGetDevice(&dev));
  QF_CUDA(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  const int col_blocks = static_cast<int>(tiles);
  const int search_blocks =
      static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((tiles * P + kSlices - 1) / kSlices, sm_count() * 8)));
  const float minus_one = -1.f, one = 1.f;

  int64_t a = 0;
  for (size_t g = 0; g < G; ++g) {
    const int bits = groups[g].bits;
    const int rows = static_cast<int>(groups[g].rows);
    const int64_t b = a + rows;
    const float half_q = static_cast<float>((1 << bits) - 1) / 2.f;
    uint8_t* qs = d_qs + g * static_cast<size_t>(N);

    launch(gptq_colmax_kernel, dim3(col_blocks), dim3(kCols * kSlices), 0, s, static_cast<const float*>(W), N, a, rows,
           half_q, d_base, d_smax + g);
    QF_CUDA_LAUNCH();
    launch(gptq_search_kernel, dim3(search_blocks), dim3(kCols * kSlices), 0, s, static_cast<const float*>(W), N, a,
           rows, bits, static_cast<const float*>(d_base), static_cast<const unsigned*>(d_smax + g), sa, tiles, qs,
           d_part);
    QF_CUDA_LAUNCH();
    launch(gptq_pick_kernel, dim3(1), dim3(256), 0, s, static_cast<const double*>(d_part), tiles,
           static_cast<const unsigned*>(d_smax + g), sa, d_tot, d_smf + g, d_sm16 + g, d_sval + g);
    QF_CUDA_LAUNCH();

    const RowArgs ra{W, U, K, N, a, rows, bits, qs, d_smf + g, d_q, d_E, gptq_tf32_};
    const size_t smem = static_cast<size_t>(rows) * (rows + 1) / 2 * sizeof(float);
    if (rows <= kMaxRegRows && smem + 2 * kCols * sizeof(float) <= static_cast<size_t>(optin)) {
      if (rows <= 32) launch_rows<4>(ra, smem, s);
      else if (rows <= 64) launch_rows<8>(ra, smem, s);
      else if (rows <= 128) launch_rows<16>(ra, smem, s);
      else launch_rows<32>(ra, smem, s);
    } else {
      launch(gptq_rows_global_kernel, dim3(static_cast<unsigned>((N + 127) / 128)), dim3(128), 0, s, ra);
    }
    QF_CUDA_LAUNCH();

    // The later groups: W[b:K] -= U[a:b, b:K]^T E. Column-major: W' (N x (K-b), ld N) -= E' (N x rows,
    // ld N) * op_T(U' ((K-b) x rows at U + a K + b, ld K)).
    if (b < K)
      QF_CUBLAS(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_T, static_cast<int>(N), static_cast<int>(K - b), rows,
                             &minus_one, d_E, CUDA_R_32F, static_cast<int>(N), U + a * K + b, CUDA_R_32F,
                             static_cast<int>(K), &one, W + b * N, CUDA_R_32F, static_cast<int>(N),
                             gptq_tf32_ ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    a = b;
  }

  GptqCodes out;
  out.K = K;
  out.N = N;
  out.q.resize(static_cast<size_t>(K * N));
  out.qscale.resize(G * static_cast<size_t>(N));
  out.scale_max.resize(G);
  std::vector<float> sval(G);
  QF_CUDA(cudaMemcpyAsync(out.q.data(), d_q, out.q.size(), cudaMemcpyDeviceToHost, s));
  QF_CUDA(cudaMemcpyAsync(out.qscale.data(), d_qs, out.qscale.size(), cudaMemcpyDeviceToHost, s));
  QF_CUDA(cudaMemcpyAsync(out.scale_max.data(), d_sm16, G * sizeof(uint16_t), cudaMemcpyDeviceToHost, s));
  QF_CUDA(cudaMemcpyAsync(sval.data(), d_sval, G * sizeof(float), cudaMemcpyDeviceToHost, s));
  QF_CUDA(cudaStreamSynchronize(s));
  for (size_t g = 0; g < G; ++g)
    QF_CHECK((out.scale_max[g] & 0x7c00) != 0x7c00, "weights too large for EXL2's fp16 scales (group maximum ",
             sval[g], ")");
  return out;
}

}  // namespace qf
