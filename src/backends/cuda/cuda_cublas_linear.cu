// Linear layers over several rows through cuBLAS (prompt chunks; batches of dense layers): the
// activations are converted to the weights' type once per op, with the RMSNorm folded into that
// pass, for all (up to three) matrices that share them; dense weights are multiplied as stored,
// quantized ones after dequantization to an fp16 [K, N] scratch matrix in input-feature order (so x
// needs no permutation); the residual is added by the GEMM itself (beta = 1). Sums are fp32.
#include "backends/cuda/cuda_quant.cuh"

namespace qf::cuda {

namespace {

constexpr int kRowThreads = 256;

// out[r] = x[r] (times norm * rsqrt(mean(x[r]^2) + eps) when NORM) as T; one block per row.
template <typename T, bool NORM>
__global__ void __launch_bounds__(kRowThreads)
    rows_to_kernel(const float* __restrict__ x, const float* __restrict__ norm, float eps, int K, T* __restrict__ out) {
  pdl_wait();
  const float* xr = x + static_cast<int64_t>(blockIdx.x) * K;
  T* o = out + static_cast<int64_t>(blockIdx.x) * K;
  float inv = 1.f;
  if constexpr (NORM) inv = block_inv_rms<kRowThreads>(xr, K, eps);
  for (int i = threadIdx.x; i < K; i += kRowThreads) o[i] = from_float<T>(NORM ? xr[i] * inv * norm[i] : xr[i]);
}

template <typename T>
void launch_rows_to(const FusedLinear& op, int64_t K, T* out, cudaStream_t s) {
  const dim3 grid(static_cast<unsigned>(op.rows)), block(kRowThreads);
  if (op.input == FusedLinear::Input::RmsNorm)
    launch(rows_to_kernel<T, true>, grid, block, 0, s, op.x, op.norm, op.eps, static_cast<int>(K), out);
  else
    launch(rows_to_kernel<T, false>, grid, block, 0, s, op.x, op.norm, op.eps, static_cast<int>(K), out);
  QF_CUDA_LAUNCH();
}

// The type the activations take for `w` (what cuBLAS multiplies): the dense layer's dtype, fp16 for
// a quantized layer.
DType gemm_dtype(const DeviceLinear& w) {
  if (const auto* d = dynamic_cast<const CudaLinear*>(&w)) return d->dtype;
  return DType::F16;
}

// y (= or +=) x W^T for x [rows, K] already in gemm_dtype(w).
void gemm_into(CudaBackend& b, const DeviceLinear& w, const void* x, float* y, int64_t rows, bool accumulate) {
  auto h = static_cast<cublasHandle_t>(b.cublas());
  const int N = static_cast<int>(w.out_features), K = static_cast<int>(w.in_features), M = static_cast<int>(rows);
  const float alpha = 1.f, beta = accumulate ? 1.f : 0.f;
  const float* bias = nullptr;
  // Column-major views: y^T [N, rows] = W^T x^T.
  if (const auto* d = dynamic_cast<const CudaLinear*>(&w)) {
    bias = d->bias;
    if (d->dtype == DType::F32) {
      QF_CUBLAS(cublasSgemm(h, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &alpha, static_cast<const float*>(d->weight), K,
                            static_cast<const float*>(x), K, &beta, y, N));
    } else {
      const cudaDataType dt = d->dtype == DType::F16 ? CUDA_R_16F : CUDA_R_16BF;
      QF_CUBLAS(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &alpha, d->weight, dt, K, x, dt, K, &beta, y,
                             CUDA_R_32F, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    }
  } else {
    const auto& q = static_cast<const CudaQuantLinear&>(w);
    bias = q.bias;
    auto* wt = static_cast<__half*>(b.scratch(static_cast<size_t>(K) * N * 2, 4));
    dequantize_half(b, q, wt);  // [K, N] row-major: column-major [N, K]
    QF_CUBLAS(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, N, M, K, &alpha, wt, CUDA_R_16F, N, x, CUDA_R_16F, K, &beta, y,
                           CUDA_R_32F, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }
  if (bias) add_bias(y, bias, rows, N, stream_of(b));
}

}  // namespace

bool cublas_linear_fused(CudaBackend& b, const FusedLinear& op, float* up_scratch) {
  if (op.rows < 1 || op.rows > 0x7fffffff || op.count < 1 || op.count > 3) return false;
  const int64_t K = op.w[0]->in_features;
  const DType dt = gemm_dtype(*op.w[0]);
  for (int i = 0; i < op.count; ++i) {
    const DeviceLinear* w = op.w[i];
    if (!dynamic_cast<const CudaLinear*>(w) && !dynamic_cast<const CudaQuantLinear*>(w)) return false;
    if (w->in_features != K || gemm_dtype(*w) != dt) return false;  // one conversion of x serves them all
  }
  const bool pair = op.output == FusedLinear::Output::SwiGLU;
  if (pair && (op.count != 2 || op.w[0]->out_features != op.w[1]->out_features || !up_scratch)) return false;
  cudaStream_t s = stream_of(b);
  const void* x = op.x;
  if (dt != DType::F32 || op.input == FusedLinear::Input::RmsNorm) {
    void* xc = b.scratch(static_cast<size_t>(op.rows * K) * dtype_size(dt), 0);
    switch (dt) {
      case DType::F16: launch_rows_to(op, K, static_cast<__half*>(xc), s); break;
      case DType::BF16: launch_rows_to(op, K, static_cast<__nv_bfloat16*>(xc), s); break;
      default: launch_rows_to(op, K, static_cast<float*>(xc), s); break;
    }
    x = xc;
  }
  // SwiGLU: gate into y[0], up into the scratch (the caller then forms y = silu(gate) * up).
  for (int i = 0; i < op.count; ++i)
    gemm_into(b, *op.w[i], x, pair && i == 1 ? up_scratch : op.y[i], op.rows,
              op.output == FusedLinear::Output::Accumulate);
  return true;
}

}  // namespace qf::cuda
