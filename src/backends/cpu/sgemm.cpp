// Dense fp32 GEMM for prefill: OpenBLAS when the build found it (single-threaded per call, since
// our thread pool already splits the work), else the register-blocked kernel in gemm.cpp.
#include <algorithm>
#include <vector>

#include "backends/cpu/cpu_linear.h"
#ifdef QFORGE_HAVE_OPENBLAS
#include <cblas.h>

#include <mutex>
extern "C" void openblas_set_num_threads(int);
#endif

namespace qf {

namespace {
void blas_single_threaded() {
#ifdef QFORGE_HAVE_OPENBLAS
  static std::once_flag once;
  std::call_once(once, [] { openblas_set_num_threads(1); });
#endif
}
}  // namespace

void sgemm_rm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A, int64_t lda,
              const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
#ifdef QFORGE_HAVE_OPENBLAS
  blas_single_threaded();
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
              static_cast<int>(M), static_cast<int>(N), static_cast<int>(K), alpha, A, static_cast<int>(lda), B,
              static_cast<int>(ldb), beta, C, static_cast<int>(ldc));
#else
  std::vector<float> row(static_cast<size_t>(N));
  for (int64_t i = 0; i < M; ++i) {
    std::fill(row.begin(), row.end(), 0.f);
    for (int64_t k = 0; k < K; ++k) {
      const float a = trans_a ? A[k * lda + i] : A[i * lda + k];
      if (a == 0.f) continue;
      if (trans_b) {
        for (int64_t j = 0; j < N; ++j) row[static_cast<size_t>(j)] += a * B[j * ldb + k];
      } else {
        const float* b = B + k * ldb;
        for (int64_t j = 0; j < N; ++j) row[static_cast<size_t>(j)] += a * b[j];
      }
    }
    float* c = C + i * ldc;
    for (int64_t j = 0; j < N; ++j) c[j] = alpha * row[static_cast<size_t>(j)] + (beta == 0.f ? 0.f : beta * c[j]);
  }
#endif
}

void sgemm_xwt(const float* x, int64_t rows, int64_t in, const float* w, int64_t n_out, float* y,
               int64_t ldy) {
#ifdef QFORGE_HAVE_OPENBLAS
  blas_single_threaded();
  if (rows > 1) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(rows), static_cast<int>(n_out),
                static_cast<int>(in), 1.0f, x, static_cast<int>(in), w, static_cast<int>(in), 0.0f, y,
                static_cast<int>(ldy));
    return;
  }
#endif
  gemm_f32_rows(x, rows, in, w, in, 0, n_out, y, ldy);
}

}  // namespace qf
