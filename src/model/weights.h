// The tensors of a Llama-family decoder, located by the architecture table and shape-checked
// against the config before anything runs.
#pragma once
#include <array>
#include <vector>

#include "formats/quant_linear.h"
#include "formats/safetensors.h"
#include "model/config.h"
#include "formats/linear_weight.h"

namespace qf {

struct LayerWeights {
  TensorView attn_norm, ffn_norm;
  LinearWeight q, k, v, o, gate, up, down;
  // The seven linear layers in forward order (for accounting and reports).
  std::array<const LinearWeight*, 7> linears() const { return {&q, &k, &v, &o, &gate, &up, &down}; }
};

struct ModelWeights {
  TensorView embed;  // [vocab, hidden]
  std::vector<LayerWeights> layers;
  TensorView final_norm;
  LinearWeight head;  // may alias embed (tied)
};

struct WeightLoadOptions {
  // Scan the large float tensors (embedding, dense linear layers) for NaN/inf as well; the small
  // ones (norms, biases, quantization scales) are always checked. See weights.cpp for the cost.
  bool scan_large = true;
};

// Every tensor the config implies, shape- and dtype-checked, plus: no tensor of a layer past
// num_hidden_layers, no NaN/inf weights. Throws one line naming the tensor.
ModelWeights load_weights(const ModelConfig& config, const TensorStore& store, const WeightLoadOptions& opt = {});

// Finds the format of the linear layer at `prefix` by its tensor names, as ExLlamaV2's loader
// does, and returns it validated against the expected shape (a missing .bias is an error when
// expect_bias says so).
LinearWeight load_linear(const TensorStore& store, const std::string& prefix, int64_t in_features,
                         int64_t out_features, bool expect_bias, const QuantHints& hints = {});
// The quantization hints of a config (bits, group size, GPTQ checkpoint format).
QuantHints quant_hints(const QuantConfig& q);

}  // namespace qf
