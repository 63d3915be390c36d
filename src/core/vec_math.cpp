#include "core/vec_math.h"

#include <algorithm>
#include <cmath>
#include "core/simd.h"

namespace qf {

#ifdef QF_AVX2
namespace {
// exp(x) for x <= 0 via 2^(x*log2e): integer part into the exponent, a degree-6 polynomial for
// the fraction (Cephes-style coefficients); inputs below -87 flush to 0.
inline __m256 exp256(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.0f);
  x = _mm256_max_ps(x, lo);
  const __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f));
  const __m256 fi = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_fmadd_ps(fi, _mm256_set1_ps(-0.693359375f), x);
  const __m256 r = _mm256_fmadd_ps(fi, _mm256_set1_ps(2.12194440e-4f), f);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fi), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
}  // namespace
#endif

float max_f32(const float* x, int64_t n) {
  float m = -INFINITY;
  int64_t i = 0;
#ifdef QF_AVX2
  if (n >= 8) {
    __m256 v = _mm256_loadu_ps(x);
    for (i = 8; i + 8 <= n; i += 8) v = _mm256_max_ps(v, _mm256_loadu_ps(x + i));
    float tmp[8];
    _mm256_storeu_ps(tmp, v);
    for (float t : tmp) m = std::max(m, t);
  }
#endif
  for (; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

float sum_exp_f32(const float* x, int64_t n, float shift) {
  int64_t i = 0;
  float s = 0.f;
#ifdef QF_AVX2
  const __m256 sh = _mm256_set1_ps(shift);
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) acc = _mm256_add_ps(acc, exp256(_mm256_sub_ps(_mm256_loadu_ps(x + i), sh)));
  s = simd::hsum(acc);
#endif
  for (; i < n; ++i) s += std::exp(x[i] - shift);
  return s;
}

}  // namespace qf
