// EXL2 linear layers as ExLlamaV2 writes them (see shared/reference/exl2-format.md, section 1):
//   q_weight    int32 [sum_g rows_g*bits_g/32, N (padded to 32)]  codes packed along K, per column
//   q_scale     int32 [G, N/8]   4-bit scale codes qs, 8 per word (column n at nibble n%8)
//   q_scale_max fp16  [G]        per-group maximum scale
//   q_groups    int16 [2G]       (bits, first packed row) per group
//   q_invperm   int32 [K]        inverse of the act-order permutation (q_perm = argsort(q_invperm))
// Stored row j (in the permuted order) holds input feature perm[j]. A weight decodes as
// (q - 2^(bits-1)) * (qs+1)^2 * q_scale_max[g] / 256.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "formats/quant_linear.h"

namespace qf {

struct Exl2Group {
  int bits = 0;
  int64_t row0 = 0, rows = 0;    // stored (permuted) rows [row0, row0 + rows)
  int64_t word0 = 0, words = 0;  // packed rows of q_weight holding them
  float scale_max = 0;
};

class Exl2Linear final : public QuantizedLinear {
 public:
  // Reads and validates the tensors of the layer at `prefix` (which must have .q_weight).
  static std::shared_ptr<const Exl2Linear> load(const TensorStore& store, const std::string& prefix,
                                                int64_t in_features, int64_t out_features);

  size_t storage_bytes() const override;
  void dequantize(float* out) const override;
  std::string describe() const override;

  const std::vector<Exl2Group>& groups() const { return groups_; }
  // Stored row j holds input feature perm()[j]: a kernel gathers x through it.
  const std::vector<int32_t>& perm() const { return perm_; }

  // Raw access for kernels: q_weight words (row stride packed_stride()), and the scales of group g
  // for output columns [n0, n0 + nt).
  const uint32_t* packed() const { return qw_; }
  int64_t packed_stride() const { return width_; }
  void group_scales(size_t g, int64_t n0, int nt, float* s) const;

  // Kernel helper: writes the weights of stored rows [k0, k1) and output columns [n0, n0 + nt)
  // transposed, buf[(k - k0) * ld + j] = W[n0 + j][perm[k]], for nt <= 64.
  void decode_tile(int64_t n0, int nt, int64_t k0, int64_t k1, float* buf, int64_t ld) const;

 private:
  Exl2Linear() = default;
  float scale(size_t g, int64_t n) const;

  TensorView q_weight_, q_scale_, q_scale_max_, q_groups_, q_invperm_;
  const uint32_t* qw_ = nullptr;
  const uint32_t* qs_ = nullptr;
  int64_t width_ = 0;     // q_weight columns (N, or N padded to a multiple of 32)
  int64_t qs_width_ = 0;  // q_scale columns
  std::vector<Exl2Group> groups_;
  std::vector<int32_t> perm_;
};

}  // namespace qf
