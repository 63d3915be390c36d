// Device helpers shared by the quantized kernels (cuda_quant.cu: dequantize; cuda_qgemv.cu: the
// decode GEMV): turning packed codes into floats and the per-group scale/zero terms.
//
// A code q of b bits becomes a float with two integer instructions by placing it in the top of
// the mantissa of 1.0: f = 1 + q / 2^b (exact), so the dot product of a 32-row unit is
//   sum (q - z) x = 2^b (sum f x - (1 + z / 2^b) sum x),
// one shift + one LOP3 + one FFMA per weight, fp32 throughout.
#pragma once
#include "backends/cuda/cuda_internal.cuh"

namespace qf::cuda {

// The code of row r (0..31) of a unit, placed at mantissa bits [23-B, 23) of 1.0f: f = 1 + q/2^B.
template <int B>
__device__ __forceinline__ float code_f(const uint32_t (&w)[8], int r) {
  constexpr int SH = 23 - B;
  constexpr uint32_t M = ((1u << B) - 1u) << SH;
  const int pos = r * B, wd = pos >> 5, off = pos & 31;
  uint32_t v;
  if (off + B <= 32)
    v = off >= SH ? (w[wd] >> (off - SH)) : (w[wd] << (SH - off));
  else
    v = __funnelshift_r(w[wd], w[wd + 1], off) << SH;
  return __uint_as_float((v & M) | 0x3F800000u);
}

// d[c] = sum_r f_r(column c) x_r over the 32 rows of a unit, for 4 columns; xs 16-byte aligned.
template <int B>
__device__ __forceinline__ void unit_dot4(const uint32_t (&w)[4][8], const float* xs, float (&d)[4]) {
  float a0[4] = {0.f, 0.f, 0.f, 0.f}, a1[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int r = 0; r < 32; r += 4) {
    const float4 xv = *reinterpret_cast<const float4*>(xs + r);
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      a0[c] = fmaf(code_f<B>(w[c], r), xv.x, a0[c]);
      a1[c] = fmaf(code_f<B>(w[c], r + 1), xv.y, a1[c]);
      a0[c] = fmaf(code_f<B>(w[c], r + 2), xv.z, a0[c]);
      a1[c] = fmaf(code_f<B>(w[c], r + 3), xv.w, a1[c]);
    }
  }
#pragma unroll
  for (int c = 0; c < 4; ++c) d[c] = a0[c] + a1[c];
}

__device__ __forceinline__ void unit_dot4_any(int bits, const uint32_t (&w)[4][8], const float* xs, float (&d)[4]) {
  switch (bits) {
    case 2: unit_dot4<2>(w, xs, d); break;
    case 3: unit_dot4<3>(w, xs, d); break;
    case 4: unit_dot4<4>(w, xs, d); break;
    case 5: unit_dot4<5>(w, xs, d); break;
    case 6: unit_dot4<6>(w, xs, d); break;
    default: unit_dot4<8>(w, xs, d); break;
  }
}

// The group terms of 4 consecutive columns col..col+3 (col % 4 == 0), as the GEMV stages them:
//   EXL2: p0 = the q_scale word holding their 4-bit codes, p1 = the bits of q_scale_max / 256;
//   GPTQ: p0, p1 = their 4 fp16 scales, p2 = their 4 uint8 zero points.
// acc[c] += s_c (2^b) (d_c - (1 + z_c / 2^b) xsum), the unit's contribution (see the top).
template <bool GPTQ>
__device__ __forceinline__ void add_unit(int bits, int col, uint32_t p0, uint32_t p1, uint32_t p2, const float (&d)[4],
                                         float xsum, float (&acc)[4]) {
  const float two_b = static_cast<float>(1 << bits);
  if constexpr (GPTQ) {
    const __half2 h01 = *reinterpret_cast<const __half2*>(&p0), h23 = *reinterpret_cast<const __half2*>(&p1);
    const float sc[4] = {__low2float(h01), __high2float(h01), __low2float(h23), __high2float(h23)};
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const float zt = 1.0f + static_cast<float>((p2 >> (8 * c)) & 255u) / two_b;
      acc[c] = fmaf(sc[c] * two_b, d[c] - zt * xsum, acc[c]);
    }
  } else {
    const float smax = __uint_as_float(p1) * two_b;
    const int sh = (col & 7) * 4;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const float q = static_cast<float>(((p0 >> (sh + 4 * c)) & 15u) + 1u);
      acc[c] = fmaf(q * q * smax, d[c] - 1.5f * xsum, acc[c]);
    }
  }
}

}  // namespace qf::cuda
