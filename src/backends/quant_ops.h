// What the converter (qforge convert) asks of a device besides the forward pass: accumulating
// Hessians of layer inputs, factoring their damped inverse, and GPTQ with EXL2's scale codes.
// Every backend runs the same algorithm, step for step; the CPU one (backends/cpu/cpu_gptq.cpp)
// is the reference the others are tested against.
#pragma once
#include <cstdint>
#include <vector>

namespace qf {

// A run of consecutive rows (in processing order) quantized at one bit width, with one scale per
// output column. A matrix is a list of groups in descending bit width (EXL2's layout).
struct GptqGroup {
  int bits = 4;
  int64_t rows = 0;
};

// EXL2's per-group scale search (shared/reference/exl2-format.md, 1.3), per group of rows:
//   base[n]   = max_r |W[r][n]| / (maxq / 2)            (maxq = 2^bits - 1)
//   smax      = max_n base[n]
//   qs[n]     = clamp(round(16 * sqrt(base[n] / smax)), 1, 16)   (the stored 4-bit code is qs - 1)
//   p*        = argmin over p in {p_min + i (p_max - p_min) / p_grid, i = 0..p_grid} of
//               sum_{r,n} |W[r][n] - dq(W[r][n], qs[n]^2 / 256 * smax * p)|^norm
//   scale_max = fp16(smax * p*); the scale of column n is then exactly what the loader decodes,
//               float(qs[n]^2) * float(scale_max) / 256.
// dq(w, s) = (q - 2^(bits-1)) * s with q = clamp(rint(w / s) + 2^(bits-1), 0, maxq). Ties between
// grid points go to the lowest p.
struct ScaleSearch {
  float norm = 3.5f;
  float p_min = 0.70f, p_max = 1.20f;
  int p_grid = 96;
};

// The result of GPTQ on one matrix, on the host. Row r here is processing row r (the caller's
// permutation applied), column n is output feature n.
struct GptqCodes {
  int64_t K = 0, N = 0;
  std::vector<uint8_t> q;           // [K][N] codes, 0 .. 2^bits - 1 of the row's group
  std::vector<uint8_t> qscale;      // [groups][N] scale codes qs, 1 .. 16
  std::vector<uint16_t> scale_max;  // [groups] fp16 bit patterns
};

// Checks that `groups` (2..8 bits, positive rows) cover exactly K rows; returns the largest group's
// rows. Every backend's gptq_quantize starts with it.
int64_t check_gptq_groups(const std::vector<GptqGroup>& groups, int64_t K);

// The dequantized value of a code, computed exactly as the EXL2 loader does.
inline float exl2_scale(int qs, float scale_max) { return static_cast<float>(qs * qs) * scale_max / 256.0f; }

}  // namespace qf
