// Dense linear layers on the GPU. One row (decode): a memory-bound GEMV, one warp per output
// feature, 16-byte streaming loads of the weight row with four loads in flight per lane, fp32
// accumulation against the fp32 activation. Several rows (prefill): the activations are converted
// to the weight dtype and cuBLAS multiplies with fp32 accumulation and fp32 output.
#include <algorithm>

#include "backends/cuda/cuda_internal.cuh"

namespace qf::cuda {

namespace {

template <typename T>
__device__ __forceinline__ float dot_chunk(const int4& w, const float* __restrict__ x);

// 8 halves against 8 floats.
template <>
__device__ __forceinline__ float dot_chunk<__half>(const int4& w, const float* __restrict__ x) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(x));
  const float4 b = __ldg(reinterpret_cast<const float4*>(x) + 1);
  const __half2* h = reinterpret_cast<const __half2*>(&w);
  const float2 f0 = __half22float2(h[0]), f1 = __half22float2(h[1]), f2 = __half22float2(h[2]),
               f3 = __half22float2(h[3]);
  return f0.x * a.x + f0.y * a.y + f1.x * a.z + f1.y * a.w + f2.x * b.x + f2.y * b.y + f3.x * b.z + f3.y * b.w;
}

template <>
__device__ __forceinline__ float dot_chunk<__nv_bfloat16>(const int4& w, const float* __restrict__ x) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(x));
  const float4 b = __ldg(reinterpret_cast<const float4*>(x) + 1);
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&w);
  const float2 f0 = __bfloat1622float2(h[0]), f1 = __bfloat1622float2(h[1]), f2 = __bfloat1622float2(h[2]),
               f3 = __bfloat1622float2(h[3]);
  return f0.x * a.x + f0.y * a.y + f1.x * a.z + f1.y * a.w + f2.x * b.x + f2.y * b.y + f3.x * b.z + f3.y * b.w;
}

// 4 floats against 4 floats.
template <>
__device__ __forceinline__ float dot_chunk<float>(const int4& w, const float* __restrict__ x) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(x));
  const float4 f = *reinterpret_cast<const float4*>(&w);
  return f.x * a.x + f.y * a.y + f.z * a.z + f.w * a.w;
}

template <typename T>
__device__ __forceinline__ float to_f(T v) {
  if constexpr (std::is_same_v<T, float>) return v;
  else if constexpr (std::is_same_v<T, __half>) return __half2float(v);
  else return __bfloat162float(v);
}

constexpr int kGemvWarps = 4;  // rows per block: small blocks spread a layer evenly over the SMs

// y[o] = sum_i W[o, i] x[i] (+ bias[o]); one warp per output row. The first weight chunks are
// loaded before waiting on the previous kernel (they do not depend on it), then each lane keeps
// 2 x U 16-byte loads in flight.
template <typename T>
__global__ void __launch_bounds__(kGemvWarps * 32) gemv_kernel(const T* __restrict__ W, const float* __restrict__ x,
                                                               const float* __restrict__ bias, float* __restrict__ y,
                                                               int in, int out) {
  const int row = blockIdx.x * kGemvWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= out) {
    pdl_wait();
    return;
  }
  const T* w = W + static_cast<size_t>(row) * in;
  constexpr int E = 16 / sizeof(T);  // elements per 16-byte chunk
  constexpr int U = 4;
  float acc = 0.f;
  if ((in % E) == 0) {
    const int4* w4 = reinterpret_cast<const int4*>(w);
    const int nc = in / E;
    int c = lane;
    int4 r[U];
#pragma unroll
    for (int u = 0; u < U; ++u) r[u] = c + 32 * u < nc ? __ldcs(w4 + c + 32 * u) : make_int4(0, 0, 0, 0);
    pdl_wait();
    if ((reinterpret_cast<uintptr_t>(x) & 15) == 0) {
      for (;;) {
        const int cn = c + 32 * U;
        int4 nx[U];
#pragma unroll
        for (int u = 0; u < U; ++u) nx[u] = cn + 32 * u < nc ? __ldcs(w4 + cn + 32 * u) : make_int4(0, 0, 0, 0);
#pragma unroll
        for (int u = 0; u < U; ++u)
          if (c + 32 * u < nc) acc += dot_chunk<T>(r[u], x + (c + 32 * u) * E);
        if (cn >= nc) break;
        c = cn;
#pragma unroll
        for (int u = 0; u < U; ++u) r[u] = nx[u];
      }
    } else {
      for (int i = lane; i < in; i += 32) acc += to_f(w[i]) * x[i];
    }
  } else {
    pdl_wait();
    for (int i = lane; i < in; i += 32) acc += to_f(w[i]) * x[i];
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (lane == 0) y[row] = acc + (bias ? bias[row] : 0.f);
}

template <typename T>
__global__ void convert_kernel(const float* __restrict__ x, T* __restrict__ out, int64_t n) {
  pdl_wait();
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = from_float<T>(x[i]);
}

__global__ void add_bias_kernel(float* __restrict__ y, const float* __restrict__ bias, int64_t rows, int64_t out) {
  pdl_wait();
  const int64_t n = rows * out;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    y[i] += bias[i % out];
}

template <typename T>
void launch_gemv(const CudaLinear& w, const float* x, float* y, cudaStream_t s) {
  const int out = static_cast<int>(w.out_features), in = static_cast<int>(w.in_features);
  const int blocks = (out + kGemvWarps - 1) / kGemvWarps;
  launch(gemv_kernel<T>, dim3(blocks), dim3(kGemvWarps * 32), 0, s, static_cast<const T*>(w.weight), x,
         static_cast<const float*>(w.bias), y, in, out);
  QF_CUDA_LAUNCH();
}

template <typename T>
void launch_convert(const float* x, T* out, int64_t n, cudaStream_t s) {
  const int grid = grid_for(n, 256, 8192);
  launch(convert_kernel<T>, dim3(grid), dim3(256), 0, s, x, out, n);
  QF_CUDA_LAUNCH();
}

}  // namespace

void linear_forward(CudaBackend& b, const CudaLinear& w, const float* x, float* y, int64_t rows) {
  cudaStream_t s = stream_of(b);
  const int64_t in = w.in_features, out = w.out_features;
  // Vector loads read x in 16/32-byte pieces: x must be 16-byte aligned (rows of scratch buffers
  // are, as long as in % 4 == 0; otherwise the scalar path of the kernel is taken).
  if (rows == 1) {
    switch (w.dtype) {
      case DType::F16: launch_gemv<__half>(w, x, y, s); break;
      case DType::BF16: launch_gemv<__nv_bfloat16>(w, x, y, s); break;
      default: launch_gemv<float>(w, x, y, s); break;
    }
    return;
  }
  auto h = static_cast<cublasHandle_t>(b.cublas());
  const float alpha = 1.f, beta = 0.f;
  // Column-major view: y^T [out, rows] = W [in, out]^T * x^T [in, rows].
  if (w.dtype == DType::F32) {
    QF_CUBLAS(cublasSgemm(h, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(out), static_cast<int>(rows),
                          static_cast<int>(in), &alpha, static_cast<const float*>(w.weight), static_cast<int>(in), x,
                          static_cast<int>(in), &beta, y, static_cast<int>(out)));
  } else {
    const cudaDataType dt = w.dtype == DType::F16 ? CUDA_R_16F : CUDA_R_16BF;
    void* xh = b.scratch(static_cast<size_t>(rows * in) * 2, 0);
    if (w.dtype == DType::F16) launch_convert(x, static_cast<__half*>(xh), rows * in, s);
    else launch_convert(x, static_cast<__nv_bfloat16*>(xh), rows * in, s);
    QF_CUBLAS(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(out), static_cast<int>(rows),
                           static_cast<int>(in), &alpha, w.weight, dt, static_cast<int>(in), xh, dt,
                           static_cast<int>(in), &beta, y, CUDA_R_32F, static_cast<int>(out), CUBLAS_COMPUTE_32F,
                           CUBLAS_GEMM_DEFAULT));
  }
  if (w.bias) add_bias(y, w.bias, rows, out, s);
}

void add_bias(float* y, const float* bias, int64_t rows, int64_t out, cudaStream_t s) {
  launch(add_bias_kernel, dim3(grid_for(rows * out, 256, 8192)), dim3(256), 0, s, y, bias, rows, out);
  QF_CUDA_LAUNCH();
}

}  // namespace qf::cuda
