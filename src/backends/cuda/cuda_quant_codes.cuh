// Device helpers shared by the quantized kernels (cuda_quant.cu: dequantize; cuda_qgemv.cu: the
// decode GEMV): turning packed codes into floats and the per-group scale/zero terms.
//
// Float path (any width): a code q of b bits becomes a float with two integer instructions by
// placing it in the top of the mantissa of 1.0: f = 1 + q / 2^b (exact), so over a 32-row unit
//   sum q x = 2^b (sum f x - sum x),
// one shift + one LOP3 + one FFMA per weight, fp32 throughout. Integer path (2, 4, 8 bits): below.
// Either way a unit adds s (sum q x - z sum x) to each column.
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

// ---- integer path for 2-, 4- and 8-bit units ----------------------------------------------------
// The unit's x is quantized to 16 bits (X = round(x / scale), |X| <= 32000, scale = max|x| / 32000,
// relative error under 2^-16 of the unit's largest input) and split as X = 256 hi + lo into two
// signed bytes, so that sum q X is two byte dot products (dp4a) per 4 codes: codes are masked out
// of a word four at a time, a 4-bit word takes 1 shift, 2 masks and 4 dp4a for 8 weights instead of
// 8 x (shift + mask + FFMA). xq holds 16 packed words per unit whose byte order follows the codes'
// byte lanes (xq_row below).
__device__ __forceinline__ bool int_unit(int bits) { return bits == 4 || bits == 8 || bits == 2; }

// Row (0..31) of the unit whose x part fills byte b of xq[L], and whether it is the high byte.
__device__ __forceinline__ int xq_row(int bits, int L, int b, bool& hi) {
  if (bits == 4) {  // xq[4j + {hi even, hi odd, lo even, lo odd}]: word j, nibbles 2b (+1)
    hi = (L & 3) < 2;
    return 8 * (L >> 2) + 2 * b + (L & 1);
  }
  if (bits == 8) {  // xq[2j + {hi, lo}]: word j, byte b
    hi = (L & 1) == 0;
    return 4 * (L >> 1) + b;
  }
  hi = (L & 1) == 0;  // 2-bit: xq[8j + 2i + {hi, lo}]: word j shifted by 2i, byte b
  return 16 * (L >> 3) + 4 * b + ((L >> 1) & 3);
}

__device__ __forceinline__ int dp4a_us(uint32_t a, int b, int c) {
  int d;
  asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// t[c] = sum_r q_r(column c) X_r over the unit, exactly, for 4 columns.
template <int B>
__device__ __forceinline__ void unit_qdot4(const uint32_t (&w)[4][8], const int* __restrict__ xq, int (&t)[4]) {
  int x[16];
#pragma unroll
  for (int i = 0; i < 16; i += 4) {
    const int4 v = *reinterpret_cast<const int4*>(xq + i);
    x[i] = v.x, x[i + 1] = v.y, x[i + 2] = v.z, x[i + 3] = v.w;
  }
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    int sh = 0, sl = 0;
    if constexpr (B == 4) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint32_t e = w[c][j] & 0x0F0F0F0Fu, o = (w[c][j] >> 4) & 0x0F0F0F0Fu;
        sh = dp4a_us(e, x[4 * j], sh);
        sh = dp4a_us(o, x[4 * j + 1], sh);
        sl = dp4a_us(e, x[4 * j + 2], sl);
        sl = dp4a_us(o, x[4 * j + 3], sl);
      }
    } else if constexpr (B == 8) {
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        sh = dp4a_us(w[c][j], x[2 * j], sh);
        sl = dp4a_us(w[c][j], x[2 * j + 1], sl);
      }
    } else {
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const uint32_t m = (w[c][j] >> (2 * i)) & 0x03030303u;
          sh = dp4a_us(m, x[8 * j + 2 * i], sh);
          sl = dp4a_us(m, x[8 * j + 2 * i + 1], sl);
        }
    }
    t[c] = sh * 256 + sl;
  }
}

// The group terms of 4 consecutive columns col..col+3 (col % 4 == 0), as the GEMV stages them:
//   EXL2: p0 = the q_scale word holding their 4-bit codes, p1 = the bits of q_scale_max / 256;
//   GPTQ: p0, p1 = their 4 fp16 scales, p2 = their 4 uint8 zero points.
// acc[c] += s_c (qx_c - z_c xsum), the unit's contribution, from qx_c = sum_r q_r x_r.
template <bool GPTQ>
__device__ __forceinline__ void add_unit_q(int bits, int col, uint32_t p0, uint32_t p1, uint32_t p2, const float (&qx)[4],
                                           float xsum, float (&acc)[4]) {
  if constexpr (GPTQ) {
    const __half2 h01 = *reinterpret_cast<const __half2*>(&p0), h23 = *reinterpret_cast<const __half2*>(&p1);
    const float sc[4] = {__low2float(h01), __high2float(h01), __low2float(h23), __high2float(h23)};
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const float z = static_cast<float>((p2 >> (8 * c)) & 255u);
      acc[c] = fmaf(sc[c], fmaf(-z, xsum, qx[c]), acc[c]);
    }
  } else {
    const float smax = __uint_as_float(p1), z = static_cast<float>(1 << (bits - 1));
    const int sh = (col & 7) * 4;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const float q = static_cast<float>(((p0 >> (sh + 4 * c)) & 15u) + 1u);
      acc[c] = fmaf(q * q * smax, fmaf(-z, xsum, qx[c]), acc[c]);
    }
  }
}

}  // namespace qf::cuda
