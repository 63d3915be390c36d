// One linear layer's weights as stored, before any backend touches them. Dense layers point into
// the mapped file; quantized ones (EXL2, GPTQ) carry their decoded tensor set in `quant`.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include "core/tensor.h"

namespace qf {

enum class LinearFormat { Dense, EXL2, GPTQ };
const char* linear_format_name(LinearFormat f);

struct QuantizedLinear;  // quant_linear.h: the format-specific, validated tensors

struct LinearWeight {
  std::string name;  // tensor prefix, e.g. "model.layers.0.self_attn.q_proj"
  LinearFormat format = LinearFormat::Dense;
  int64_t in_features = 0, out_features = 0;
  TensorView weight;                 // Dense: [out_features, in_features], F32/F16/BF16
  std::optional<TensorView> bias;    // [out_features]
  std::shared_ptr<const QuantizedLinear> quant;  // EXL2 / GPTQ

  double bits_per_weight() const;    // as ExLlamaV2 counts them (16 for fp16, 32 for fp32)
  size_t storage_bytes() const;      // bytes of every tensor of this layer
};

}  // namespace qf
