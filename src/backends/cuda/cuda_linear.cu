// Dense linear layers on the GPU. One row (decode): a memory-bound GEMV, one warp per output
// feature, 16-byte streaming loads of the weight row with four loads in flight per lane, fp32
// accumulation against the fp32 activation; the same kernel runs fused decode ops
// (Backend::fused_linear: RMSNorm of the input, q/k/v in one launch, the residual add, SwiGLU).
// Several rows: cuBLAS (cuda_cublas_linear.cu).
#include <algorithm>

#include "backends/cuda/cuda_internal.cuh"

namespace qf::cuda {

namespace {

template <typename T>
__device__ __forceinline__ float to_f(T v) {
  if constexpr (std::is_same_v<T, float>) return v;
  else if constexpr (std::is_same_v<T, __half>) return __half2float(v);
  else return __bfloat162float(v);
}

constexpr int kGemvWarps = 4;  // rows per block: small blocks spread a layer evenly over the SMs

// Up to three matrices of one dtype sharing the input; rows of the launch are numbered across
// them (segment i owns rows [seg[i-1].rows_end, seg[i].rows_end)). SwiGLU: segments 0 and 1 are
// gate and up of equal size, each warp computes one row of both.
struct DenseSeg {
  const void* W;
  const float* bias;
  float* y;
  int rows_end;
};
struct DenseGemvArgs {
  DenseSeg seg[3];
  int nseg;
  int in;
  int rows;    // warps with work: total rows, or gate rows for SwiGLU
  int output;  // 0 store, 1 accumulate, 2 silu(seg 0) * seg 1 into seg 0's y
  const float* x;
  const float* norm;
  float eps;
};

// One 16-byte chunk of R weight rows against 8 (or 4 for fp32) inputs: acc[r] += w_r . (x * g),
// and ss += x^2 when the input is normalized (rmsnorm(x) * g = inv * (x * g), inv applied last).
template <typename T, int R, bool NORM>
__device__ __forceinline__ void dot_rows(const int4 (&w)[R], const float* __restrict__ x, const float* __restrict__ g,
                                         float (&acc)[R], float& ss) {
  constexpr int E = 16 / sizeof(T);
  float xv[E];
#pragma unroll
  for (int i = 0; i < E; i += 4) {
    const float4 a = __ldg(reinterpret_cast<const float4*>(x + i));
    xv[i] = a.x, xv[i + 1] = a.y, xv[i + 2] = a.z, xv[i + 3] = a.w;
  }
  if constexpr (NORM) {
#pragma unroll
    for (int i = 0; i < E; i += 4) {
      const float4 b = __ldg(reinterpret_cast<const float4*>(g + i));
      ss = fmaf(xv[i], xv[i], ss), ss = fmaf(xv[i + 1], xv[i + 1], ss);
      ss = fmaf(xv[i + 2], xv[i + 2], ss), ss = fmaf(xv[i + 3], xv[i + 3], ss);
      xv[i] *= b.x, xv[i + 1] *= b.y, xv[i + 2] *= b.z, xv[i + 3] *= b.w;
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const T* h = reinterpret_cast<const T*>(&w[r]);
#pragma unroll
    for (int i = 0; i < E; ++i) acc[r] = fmaf(to_f(h[i]), xv[i], acc[r]);
  }
}

__device__ __forceinline__ float silu_f(float g) { return g / (1.0f + __expf(-g)); }

// y = W x for one activation row; one warp per output row (R = 2: the same row of gate and up).
// The first weight chunks are loaded before waiting on the previous kernel (they do not depend
// on it), then each lane keeps 2 x LOADS 16-byte loads in flight.
template <typename T, int R, bool NORM, int LOADS>
__global__ void __launch_bounds__(kGemvWarps * 32) gemv_kernel(const __grid_constant__ DenseGemvArgs a) {
  const int row = blockIdx.x * kGemvWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= a.rows) {
    pdl_wait();
    return;
  }
  int si = 0;
  while (R == 1 && si + 1 < a.nseg && row >= a.seg[si].rows_end) ++si;
  const int local = row - (si > 0 ? a.seg[si - 1].rows_end : 0);
  const T* w[R];
#pragma unroll
  for (int r = 0; r < R; ++r) w[r] = static_cast<const T*>(a.seg[si + r].W) + static_cast<size_t>(local) * a.in;
  constexpr int E = 16 / sizeof(T);  // elements per 16-byte chunk
  constexpr int U = LOADS / R;
  float acc[R] = {}, ss = 0.f;
  const bool vec = (a.in % E) == 0 && (reinterpret_cast<uintptr_t>(a.x) & 15) == 0 &&
                   (!NORM || (reinterpret_cast<uintptr_t>(a.norm) & 15) == 0);
  if (vec) {
    const int nc = a.in / E;
    int c = lane;
    int4 cur[U][R];
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int r = 0; r < R; ++r)
        cur[u][r] = c + 32 * u < nc ? __ldcs(reinterpret_cast<const int4*>(w[r]) + c + 32 * u) : make_int4(0, 0, 0, 0);
    pdl_wait();
    for (;;) {
      const int cn = c + 32 * U;
      int4 nx[U][R];
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int r = 0; r < R; ++r)
          nx[u][r] = cn + 32 * u < nc ? __ldcs(reinterpret_cast<const int4*>(w[r]) + cn + 32 * u) : make_int4(0, 0, 0, 0);
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (c + 32 * u < nc) dot_rows<T, R, NORM>(cur[u], a.x + (c + 32 * u) * E, a.norm + (NORM ? (c + 32 * u) * E : 0), acc, ss);
      if (cn >= nc) break;
      c = cn;
#pragma unroll
      for (int u = 0; u < U; ++u)
#pragma unroll
        for (int r = 0; r < R; ++r) cur[u][r] = nx[u][r];
    }
  } else {
    pdl_wait();
    for (int i = lane; i < a.in; i += 32) {
      float xv = a.x[i];
      if constexpr (NORM) {
        ss = fmaf(xv, xv, ss);
        xv *= a.norm[i];
      }
#pragma unroll
      for (int r = 0; r < R; ++r) acc[r] = fmaf(to_f(w[r][i]), xv, acc[r]);
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], o);
    if constexpr (NORM) ss += __shfl_xor_sync(0xffffffffu, ss, o);
  }
  if (lane != 0) return;
  const float inv = NORM ? rsqrtf(ss / static_cast<float>(a.in) + a.eps) : 1.f;
  float v[R];
#pragma unroll
  for (int r = 0; r < R; ++r) v[r] = acc[r] * inv + (a.seg[si + r].bias ? a.seg[si + r].bias[local] : 0.f);
  float* y = a.seg[si].y + local;
  if constexpr (R == 2) *y = silu_f(v[0]) * v[1];
  else if (a.output == 1) *y += v[0];
  else *y = v[0];
}

__global__ void add_bias_kernel(float* __restrict__ y, const float* __restrict__ bias, int64_t rows, int64_t out) {
  pdl_wait();
  const int64_t n = rows * out;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    y[i] += bias[i % out];
}

template <typename T, int LOADS>
void launch_dense_gemv(const DenseGemvArgs& a, cudaStream_t s) {
  const dim3 grid(static_cast<unsigned>((a.rows + kGemvWarps - 1) / kGemvWarps)), block(kGemvWarps * 32);
  if (a.output == 2) {
    if (a.norm) launch(gemv_kernel<T, 2, true, LOADS>, grid, block, 0, s, a);
    else launch(gemv_kernel<T, 2, false, LOADS>, grid, block, 0, s, a);
  } else {
    if (a.norm) launch(gemv_kernel<T, 1, true, LOADS>, grid, block, 0, s, a);
    else launch(gemv_kernel<T, 1, false, LOADS>, grid, block, 0, s, a);
  }
  QF_CUDA_LAUNCH();
}

template <typename T>
void launch_dense_gemv(const DenseGemvArgs& a, cudaStream_t s) {
  // 16-byte loads in flight per lane and step (QFORGE_GEMV_LOADS: 4 or 8).
  static const int loads = env_int("QFORGE_GEMV_LOADS", 4) >= 8 ? 8 : 4;
  if (loads == 8) launch_dense_gemv<T, 8>(a, s);
  else launch_dense_gemv<T, 4>(a, s);
}

void run_dense_gemv(DType dt, const DenseGemvArgs& a, cudaStream_t s) {
  switch (dt) {
    case DType::F16: launch_dense_gemv<__half>(a, s); break;
    case DType::BF16: launch_dense_gemv<__nv_bfloat16>(a, s); break;
    default: launch_dense_gemv<float>(a, s); break;
  }
}

}  // namespace

void linear_forward(CudaBackend& b, const CudaLinear& w, const float* x, float* y, int64_t rows) {
  cudaStream_t s = stream_of(b);
  const int64_t in = w.in_features, out = w.out_features;
  // Vector loads read x in 16/32-byte pieces: x must be 16-byte aligned (rows of scratch buffers
  // are, as long as in % 4 == 0; otherwise the scalar path of the kernel is taken).
  if (rows == 1) {
    DenseGemvArgs a{};
    a.seg[0] = DenseSeg{w.weight, w.bias, y, static_cast<int>(out)};
    a.nseg = 1;
    a.in = static_cast<int>(in);
    a.rows = static_cast<int>(out);
    a.x = x;
    run_dense_gemv(w.dtype, a, s);
    return;
  }
  QF_CHECK(cublas_linear_fused(b, FusedLinear::single(w, x, y, rows), nullptr), "internal: no GEMM for dense layer rows");
}

bool dense_gemv_fused(CudaBackend& b, const FusedLinear& op) {
  if (op.rows != 1 || op.count < 1 || op.count > 3) return false;
  const CudaLinear* l[3] = {};
  for (int i = 0; i < op.count; ++i) {
    l[i] = dynamic_cast<const CudaLinear*>(op.w[i]);
    if (!l[i] || l[i]->dtype != l[0]->dtype || l[i]->in_features != l[0]->in_features) return false;
  }
  const bool pair = op.output == FusedLinear::Output::SwiGLU;
  if (pair && (op.count != 2 || l[0]->out_features != l[1]->out_features)) return false;
  DenseGemvArgs a{};
  a.nseg = op.count;
  a.in = static_cast<int>(l[0]->in_features);
  int rows = 0;
  for (int i = 0; i < op.count; ++i) {
    rows += static_cast<int>(l[i]->out_features);
    a.seg[i] = DenseSeg{l[i]->weight, l[i]->bias, pair ? op.y[0] : op.y[i], rows};
  }
  a.rows = pair ? static_cast<int>(l[0]->out_features) : rows;
  a.output = pair ? 2 : op.output == FusedLinear::Output::Accumulate ? 1 : 0;
  a.x = op.x;
  a.norm = op.input == FusedLinear::Input::RmsNorm ? op.norm : nullptr;
  a.eps = op.eps;
  run_dense_gemv(l[0]->dtype, a, stream_of(b));
  return true;
}

void add_bias(float* y, const float* bias, int64_t rows, int64_t out, cudaStream_t s) {
  launch(add_bias_kernel, dim3(grid_for(rows * out, 256, 8192)), dim3(256), 0, s, y, bias, rows, out);
  QF_CUDA_LAUNCH();
}

}  // namespace qf::cuda
