// AVX2/FMA helpers shared by the CPU kernels. QF_AVX2 is defined when the compiler targets them;
// every user keeps a plain-C++ path for other machines.
#pragma once
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define QF_AVX2 1

namespace qf::simd {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}

}  // namespace qf::simd
#endif
