// GPTQ linear layers as AutoGPTQ / GPTQModel write them (shared/reference/exl2-format.md, section 3):
//   qweight int32 [K*bits/32, N]   codes packed along K, one little-endian bit stream per column
//                                  (3-bit: 32 codes in 3 words, codes 10 and 21 straddle words)
//   qzeros  int32 [G, N*bits/32]   zero points packed along N; "gptq" (v1) files store zero-1,
//                                  "gptq_v2" files the zero itself
//   scales  fp16  [G, N]
//   g_idx   int32 [K]              group of each input row (arbitrary under act-order)
// A weight decodes as (q - zero[g_idx[k], n]) * scale[g_idx[k], n].
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "formats/quant_linear.h"

namespace qf {

class GptqLinear final : public QuantizedLinear {
 public:
  // Reads and validates the tensors of the layer at `prefix` (which must have .qweight).
  static std::shared_ptr<const GptqLinear> load(const TensorStore& store, const std::string& prefix,
                                                int64_t in_features, int64_t out_features,
                                                const QuantHints& hints);

  size_t storage_bytes() const override;
  void dequantize(float* out) const override;
  std::string describe() const override;

  int bits() const { return bits_; }
  const uint32_t* packed() const { return qw_; }  // qweight words, row stride out_features
  int64_t n_groups() const { return groups_; }
  const std::vector<int32_t>& g_idx() const { return g_idx_; }
  bool v2() const { return v2_; }
  int zero(int64_t g, int64_t n) const;   // the real zero point (v1 offset applied)
  float scale(int64_t g, int64_t n) const;

  // Kernel helpers. tile_params fills scales[g * ld + j] and zeros[g * ld + j] for every group and
  // the output columns [n0, n0 + nt); decode_tile then writes the weights of input rows [k0, k1)
  // transposed: buf[(k - k0) * ld + j] = W[n0 + j][k], for nt <= ld.
  void tile_params(int64_t n0, int nt, float* scales, int32_t* zeros, int64_t ld) const;
  void decode_tile(int64_t n0, int nt, int64_t k0, int64_t k1, const float* scales, const int32_t* zeros,
                   float* buf, int64_t ld) const;

 private:
  GptqLinear() = default;

  TensorView qweight_, qzeros_, scales_, g_idx_view_;
  const uint32_t* qw_ = nullptr;
  const uint32_t* qz_ = nullptr;
  int bits_ = 0;
  int64_t groups_ = 0, zeros_width_ = 0;
  bool v2_ = false, sym_ = true, act_order_ = false;
  int64_t group_size_ = 0;  // rows per group when g_idx is i / group_size, else 0
  std::vector<int32_t> g_idx_;
};

}  // namespace qf
