// The quantization pass: layer after layer, each block's Hessians are built from the states the
// already-quantized model produces (sequential GPTQ), its projections are quantized with the
// chosen mixes, and the quantized block then carries the states on. States live in host memory
// and pass through the device in fixed chunks of rows, so the device holds one layer at a time.
#pragma once
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "quant/block_quantizer.h"
#include "quant/exl2_pack.h"

namespace qf {

struct BlockReport {
  std::string key;                 // model.layers.N.self_attn / .mlp
  std::vector<LinearSpec> specs;   // per projection
  int64_t bits = 0;                // storage bits of the block
  int64_t weights = 0;             // weights of the block
  double measured_error = 0;       // from the measurement (reference inputs)
  double error = 0;                // in this pass (quantized inputs), over the first chunk of rows
};

struct QuantizedTensors {
  std::vector<std::pair<std::string, std::shared_ptr<const Exl2Tensors>>> linears;  // prefix, tensors
};

// Host states [rows * length, hidden], moved through the device `chunk_rows` rows at a time.
struct HostStates {
  std::vector<float> data;
  int64_t rows = 0;
};

// Embeddings of the calibration rows.
HostStates embed_rows(Backend& b, const TensorView& embed, const std::vector<std::vector<int32_t>>& rows,
                      int64_t length, int64_t hidden);

class SequentialQuantizer {
 public:
  SequentialQuantizer(BlockQuantizer& q, int64_t chunk_rows) : q_(q), chunk_rows_(chunk_rows) {}

  // Quantizes one block of the layer whose device copy is `l` (its linears are replaced by the
  // quantized ones) and advances `states` through it. `specs` per projection.
  BlockReport quantize_block(int64_t layer, BlockKind kind, const LayerWeights& w, DeviceLayer& l,
                             const std::vector<LinearSpec>& specs, HostStates& states, QuantizedTensors& out);

  // The head, from the final states through the final norm. Returns its packed tensors.
  std::shared_ptr<const Exl2Tensors> quantize_head(const LinearWeight& head, const TensorView& final_norm,
                                                   const LinearSpec& spec, const HostStates& states);

  // Perplexity of the calibration rows [0, rows) from their final states through final norm and
  // head (the model's own ability on its calibration text; a sanity check of the conversion).
  double calibration_perplexity(const DeviceLinear& head, const DeviceBuffer& final_norm, const HostStates& states,
                                const std::vector<std::vector<int32_t>>& tokens, int64_t rows);

 private:
  BlockQuantizer& q_;
  int64_t chunk_rows_;
};

}  // namespace qf
