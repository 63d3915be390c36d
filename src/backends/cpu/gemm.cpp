// Small hand-written fp32 kernels: register-blocked so that each loaded weight vector is used for
// two tokens and each activation vector for four weight rows. AVX2+FMA (+F16C) when the compiler
// targets it, plain loops otherwise; both give the same results up to summation order.
#include <cstdint>

#include "backends/cpu/cpu_linear.h"
#include "core/dtype.h"
#include "core/simd.h"

namespace qf {

#ifdef QF_AVX2
using simd::hsum;
#endif

float dot_f32(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#ifdef QF_AVX2
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  s = hsum(_mm256_add_ps(acc0, acc1));
#endif
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

float dot_f16_f32(const uint16_t* a, const float* b, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#if defined(QF_AVX2) && defined(__F16C__)
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  for (; i + 16 <= n; i += 16) {
    __m256 w0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + i)));
    __m256 w1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a + i + 8)));
    acc0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(b + i + 8), acc1);
  }
  s = hsum(_mm256_add_ps(acc0, acc1));
#endif
  for (; i < n; ++i) s += fp16_to_f32(a[i]) * b[i];
  return s;
}

float dot_bf16_f32(const uint16_t* a, const float* b, int64_t n) {
  int64_t i = 0;
  float s = 0.f;
#ifdef QF_AVX2
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a + i));
    __m256i w32 = _mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
    acc = _mm256_fmadd_ps(_mm256_castsi256_ps(w32), _mm256_loadu_ps(b + i), acc);
  }
  s = hsum(acc);
#endif
  for (; i < n; ++i) s += bf16_to_f32(a[i]) * b[i];
  return s;
}

void gemm_f32_rows(const float* x, int64_t rows, int64_t in, const float* w, int64_t ldw, int64_t o0,
                   int64_t o1, float* y, int64_t ldy) {
  int64_t o = o0;
#ifdef QF_AVX2
  if (in % 8 == 0) {
    for (; o + 4 <= o1; o += 4) {
      const float* w0 = w + (o + 0) * ldw;
      const float* w1 = w + (o + 1) * ldw;
      const float* w2 = w + (o + 2) * ldw;
      const float* w3 = w + (o + 3) * ldw;
      int64_t t = 0;
      for (; t + 2 <= rows; t += 2) {
        const float* xa = x + t * in;
        const float* xb = xa + in;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
               a3 = _mm256_setzero_ps(), b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps(),
               b2 = _mm256_setzero_ps(), b3 = _mm256_setzero_ps();
        for (int64_t i = 0; i < in; i += 8) {
          const __m256 va = _mm256_loadu_ps(xa + i), vb = _mm256_loadu_ps(xb + i);
          __m256 v = _mm256_loadu_ps(w0 + i);
          a0 = _mm256_fmadd_ps(v, va, a0);
          b0 = _mm256_fmadd_ps(v, vb, b0);
          v = _mm256_loadu_ps(w1 + i);
          a1 = _mm256_fmadd_ps(v, va, a1);
          b1 = _mm256_fmadd_ps(v, vb, b1);
          v = _mm256_loadu_ps(w2 + i);
          a2 = _mm256_fmadd_ps(v, va, a2);
          b2 = _mm256_fmadd_ps(v, vb, b2);
          v = _mm256_loadu_ps(w3 + i);
          a3 = _mm256_fmadd_ps(v, va, a3);
          b3 = _mm256_fmadd_ps(v, vb, b3);
        }
        float* ya = y + t * ldy + o;
        float* yb = ya + ldy;
        ya[0] = hsum(a0); ya[1] = hsum(a1); ya[2] = hsum(a2); ya[3] = hsum(a3);
        yb[0] = hsum(b0); yb[1] = hsum(b1); yb[2] = hsum(b2); yb[3] = hsum(b3);
      }
      for (; t < rows; ++t) {
        const float* xa = x + t * in;
        float* ya = y + t * ldy + o;
        ya[0] = dot_f32(w0, xa, in); ya[1] = dot_f32(w1, xa, in);
        ya[2] = dot_f32(w2, xa, in); ya[3] = dot_f32(w3, xa, in);
      }
    }
  }
#endif
  for (; o < o1; ++o)
    for (int64_t t = 0; t < rows; ++t) y[t * ldy + o] = dot_f32(w + o * ldw, x + t * in, in);
}

}  // namespace qf
