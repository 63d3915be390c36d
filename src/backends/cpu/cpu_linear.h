// Linear layers on the CPU: one implementation per weight format, all computing y = x W^T + b
// with fp32 accumulation, multi-threaded over output features.
#pragma once
#include <memory>
#include <vector>

#include "backends/backend.h"
#include "core/thread_pool.h"

namespace qf {

class CpuLinear : public DeviceLinear {
 public:
  // x: [rows, in_features], y: [rows, out_features].
  virtual void forward(const float* x, float* y, int64_t rows, ThreadPool& pool) const = 0;
  std::vector<float> bias;  // empty when the layer has none

 protected:
  void add_bias(float* y, int64_t rows) const;
};

std::unique_ptr<CpuLinear> make_dense_cpu_linear(const LinearWeight& w);
// EXL2 / GPTQ layers (backends/cpu/linear_quant.cpp).
std::unique_ptr<CpuLinear> make_quant_cpu_linear(const LinearWeight& w);

// Kernels shared by the linear implementations (backends/cpu/gemm.cpp).
// y[t][o] (+)= sum_i x[t][i] * w[o][i] for o in [o0, o1), w fp32 with row stride `ldw`.
void gemm_f32_rows(const float* x, int64_t rows, int64_t in, const float* w, int64_t ldw,
                   int64_t o0, int64_t o1, float* y, int64_t ldy);
// y[t][o] = sum_i x[t][i] * w[o][i] for o in [0, n_out): w is [n_out, in] fp32, y has row
// stride ldy. BLAS-backed when available (backends/cpu/sgemm.cpp).
void sgemm_xwt(const float* x, int64_t rows, int64_t in, const float* w, int64_t n_out, float* y,
               int64_t ldy);
// General row-major C = alpha op(A) op(B) + beta C, op(A) [M][K], op(B) [K][N]: single-threaded
// OpenBLAS when available, plain loops otherwise (the callers split the work over the pool).
void sgemm_rm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
              const float* B, int64_t ldb, float beta, float* C, int64_t ldc);
float dot_f32(const float* a, const float* b, int64_t n);
float dot_f16_f32(const uint16_t* a, const float* b, int64_t n);
float dot_bf16_f32(const uint16_t* a, const float* b, int64_t n);

}  // namespace qf
