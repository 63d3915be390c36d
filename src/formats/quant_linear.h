// Quantized linear layers as published (EXL2, GPTQ): the validated tensors of one layer, plus the
// plain dequantize-to-float oracle that every kernel is tested against.
#pragma once
#include <cstdint>
#include <memory>
#include <string>

#include "formats/safetensors.h"
#include "formats/linear_weight.h"

namespace qf {

struct QuantizedLinear {
  LinearFormat format = LinearFormat::Dense;
  int64_t in_features = 0, out_features = 0;
  virtual ~QuantizedLinear() = default;
  virtual size_t storage_bytes() const = 0;
  // Writes the [out_features, in_features] weight matrix (row-major, like a dense .weight).
  virtual void dequantize(float* out) const = 0;
  // Short summary of the bit mix, e.g. "4b:60% 5b:40%" or "4-bit g128 act-order".
  virtual std::string describe() const = 0;
};

// What the model's config says about its quantization (config.json "quantization_config" or
// quantize_config.json). Everything is optional: EXL2 layers describe themselves completely, and
// GPTQ layers infer bits and group size from their tensor shapes when these are unset.
struct QuantHints {
  std::string method;             // "", "exl2", "gptq", "awq", ...
  int bits = 0;                   // GPTQ: 2, 3, 4 or 8 (0 = infer from the shapes)
  int64_t group_size = 0;         // GPTQ: -1 = one group over all of K (0 = infer)
  bool desc_act = false;          // GPTQ act-order (informational; g_idx is what counts)
  std::string checkpoint_format;  // GPTQ: "gptq" (v1, zeros stored minus one) or "gptq_v2"
};

// Returns the quantized layer at `prefix` if its tensors are there (EXL2: .q_weight, GPTQ:
// .qweight), nullptr for a dense layer. Throws a one-line error naming the tensor when the
// quantized tensors are inconsistent.
std::shared_ptr<const QuantizedLinear> detect_quantized_linear(const TensorStore& store,
                                                               const std::string& prefix,
                                                               int64_t in_features,
                                                               int64_t out_features,
                                                               const QuantHints& hints = {});

inline size_t quant_storage_bytes(const QuantizedLinear& q) { return q.storage_bytes(); }

}  // namespace qf
