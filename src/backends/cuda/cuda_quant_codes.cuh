// Device helpers shared by the quantized kernels (cuda_quant.cu: dequantize; cuda_qgemv.cu: the
// decode GEMV): turning packed codes into floats and the per-group scale/zero terms.
//
// Float path (any width): a code q of b bits becomes a float with two integer instructions by
// placing it in the top of the mantissa of 1.0: f = 1 + q / 2^b (exact), so over a 32-row unit
//   sum q x = 2^b (sum f x - sum x),
// one shift + one LOP3 + one FFMA per weight, fp32 throughout (the dequantize kernel). Integer
// path (the decode GEMV, every width): below. Either way a unit adds s (sum q x - z sum x) to each
// column.
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

// ---- the device layout of 3-, 5- and 6-bit units ("planar") --------------------------------------
// On disk (EXL2 and GPTQ) the 32 codes of a unit are one little-endian stream of B words (row r at
// bit B r). The device keeps 2-, 4- and 8-bit units so and splits 3-, 5- and 6-bit units at load
// (to_planar) into a low plane laid out as the 2- or 4-bit stream and a plane of high bits placed
// where the low plane's byte extraction finds them: one shift and mask of each plane then yield
// four whole codes in byte lanes for dp4a, as for 2 and 4 bits. Same words, same bytes:
//   3 bits: words 0-1 = the low 2 bits as the 2-bit stream (row r at word r/16, bit 2 (r%16));
//           word 2 = the high bit of row r = 16j + 4b + i at bit 8b + 4j + i.
//   5 bits: words 0-3 = the low 4 bits as the 4-bit stream (row r at word r/8, bit 4 (r%8));
//           word 4 = the high bit of row r = 8j + 2b + p at bit 8b + 2j + p.
//   6 bits: words 0-3 as for 5 bits; the high 2 bits of row r = 8j + 2b + p in word 4 + j/2 at
//           bit 8b + 4 (j%2) + 2p.
__host__ __device__ constexpr bool planar_bits(int bits) { return bits == 3 || bits == 5 || bits == 6; }

// Row r's code from the on-disk stream.
template <int B>
__device__ __forceinline__ uint32_t stream_code(const uint32_t (&w)[8], int r) {
  const int pos = r * B, wd = pos >> 5, off = pos & 31;
  uint32_t v = w[wd] >> off;
  if (off + B > 32) v |= w[wd + 1] << (32 - off);
  return v & ((1u << B) - 1u);
}

// Row r's code from the planar layout (B = 3, 5, 6).
template <int B>
__device__ __forceinline__ uint32_t planar_code(const uint32_t (&w)[8], int r) {
  if constexpr (B == 3) {
    const int j = r >> 4, b = (r >> 2) & 3, i = r & 3;
    return ((w[j] >> (2 * (r & 15))) & 3u) | (((w[2] >> (8 * b + 4 * j + i)) & 1u) << 2);
  } else {
    const int j = r >> 3, b = (r >> 1) & 3, p = r & 1;
    const uint32_t lo = (w[j] >> (4 * (r & 7))) & 15u;
    if constexpr (B == 5) return lo | (((w[4] >> (8 * b + 2 * j + p)) & 1u) << 4);
    else return lo | (((w[4 + (j >> 1)] >> (8 * b + 4 * (j & 1) + 2 * p)) & 3u) << 4);
  }
}

// The unit's B words from the stream layout to the planar one, in place.
template <int B>
__device__ __forceinline__ void to_planar(uint32_t (&w)[8]) {
  uint32_t o[8] = {0u, 0u, 0u, 0u, 0u, 0u, 0u, 0u};
#pragma unroll
  for (int r = 0; r < 32; ++r) {
    const uint32_t q = stream_code<B>(w, r);
    if constexpr (B == 3) {
      const int j = r >> 4, b = (r >> 2) & 3, i = r & 3;
      o[j] |= (q & 3u) << (2 * (r & 15));
      o[2] |= (q >> 2) << (8 * b + 4 * j + i);
    } else {
      const int j = r >> 3, b = (r >> 1) & 3, p = r & 1;
      o[j] |= (q & 15u) << (4 * (r & 7));
      if constexpr (B == 5) o[4] |= (q >> 4) << (8 * b + 2 * j + p);
      else o[4 + (j >> 1)] |= (q >> 4) << (8 * b + 4 * (j & 1) + 2 * p);
    }
  }
#pragma unroll
  for (int j = 0; j < 8; ++j) w[j] = o[j];
}

// ---- integer path (every width) ------------------------------------------------------------------
// The unit's x is quantized to 16 bits (X = round(x / scale), |X| <= 32000, scale = max|x| / 32000,
// relative error under 2^-16 of the unit's largest input) and split as X = 256 hi + lo into two
// signed bytes, so that sum q X is two byte dot products (dp4a) per 4 codes: codes are masked out
// of a word four at a time, a 4-bit word takes 1 shift, 2 masks and 4 dp4a for 8 weights instead of
// 8 x (shift + mask + FFMA). xq holds 16 packed words per unit whose byte order follows the codes'
// byte lanes (xq_row below). 3-bit units take the 2-bit order, 5- and 6-bit units the 4-bit one
// (their planar layout keeps the low plane so and ORs the high bits into each byte lane).

// Row (0..31) of the unit whose x part fills byte b of xq[L], and whether it is the high byte.
__device__ __forceinline__ int xq_row(int bits, int L, int b, bool& hi) {
  if (bits == 4 || bits == 5 || bits == 6) {  // xq[4j + {hi even, hi odd, lo even, lo odd}]: word j, nibbles 2b (+1)
    hi = (L & 3) < 2;
    return 8 * (L >> 2) + 2 * b + (L & 1);
  }
  if (bits == 8) {  // xq[2j + {hi, lo}]: word j, byte b
    hi = (L & 1) == 0;
    return 4 * (L >> 1) + b;
  }
  hi = (L & 1) == 0;  // 2- and 3-bit: xq[8j + 2i + {hi, lo}]: word j shifted by 2i, byte b
  return 16 * (L >> 3) + 4 * b + ((L >> 1) & 3);
}

__device__ __forceinline__ int dp4a_us(uint32_t a, int b, int c) {
  int d;
  asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// The high plane's bits for one extraction: bit s (s+1) of each byte lane of v, moved above the low
// plane's bits (bit 2 for 3-bit units, bits 4-5 for 5- and 6-bit ones) and masked. s is a
// constant once the callers' loops are unrolled.
template <int B>
__device__ __forceinline__ uint32_t high_bit(uint32_t v, int s) {
  constexpr int d = B == 3 ? 2 : 4;
  constexpr uint32_t mask = B == 3 ? 0x04040404u : (B == 5 ? 0x10101010u : 0x30303030u);
  return (s >= d ? v >> (s - d) : v << (d - s)) & mask;
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
    if constexpr (B == 4 || B == 5 || B == 6) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        uint32_t e = w[c][j] & 0x0F0F0F0Fu, o = (w[c][j] >> 4) & 0x0F0F0F0Fu;
        if constexpr (B == 5) {  // the high bit of rows 8j + 2b + p sits at bit 2j + p of lane b
          e |= high_bit<5>(w[c][4], 2 * j);
          o |= high_bit<5>(w[c][4], 2 * j + 1);
        } else if constexpr (B == 6) {  // the high 2 bits at bits 4 (j%2) + 2p of lane b of word 4 + j/2
          e |= high_bit<6>(w[c][4 + (j >> 1)], 4 * (j & 1));
          o |= high_bit<6>(w[c][4 + (j >> 1)], 4 * (j & 1) + 2);
        }
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
    } else {  // 2 and 3 bits
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          uint32_t m = (w[c][j] >> (2 * i)) & 0x03030303u;
          if constexpr (B == 3) m |= high_bit<3>(w[c][2], 4 * j + i);  // rows 16j + 4b + i: bit 4j + i
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
