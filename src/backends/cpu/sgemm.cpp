// Dense fp32 GEMM for prefill: OpenBLAS when the build found it (single-threaded per call, since
// our thread pool already splits the work), else the register-blocked kernel in gemm.cpp.
#include "backends/cpu/cpu_linear.h"
#ifdef QFORGE_HAVE_OPENBLAS
#include <cblas.h>

#include <mutex>
extern "C" void openblas_set_num_threads(int);
#endif

namespace qf {

void sgemm_xwt(const float* x, int64_t rows, int64_t in, const float* w, int64_t n_out, float* y,
               int64_t ldy) {
#ifdef QFORGE_HAVE_OPENBLAS
  static std::once_flag once;
  std::call_once(once, [] { openblas_set_num_threads(1); });
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
