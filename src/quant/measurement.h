// The measurement: for every attention and MLP block of the model, every candidate option's
// storage bits and its accuracy (1 - the mean relative error of the block's output when only
// that block is quantized, on unquantized inputs). Read and written in ExLlamaV2's
// measurement.json layout, so a measurement is reusable for any bit rate (--measurement).
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "core/json_file.h"
#include "model/config.h"
#include "quant/options.h"

namespace qf {

class BlockQuantizer;
struct DeviceLayer;
struct LayerWeights;
class Progress;

struct OptionResult {
  std::vector<LinearSpec> specs;  // one per projection (block_projections order)
  int64_t total_bits = 0;         // over the block's projections
  double accuracy = 0;            // 1 - mean relative error
  double error() const { return 1.0 - accuracy; }
};

// "model.layers.3.self_attn" / "model.layers.3.mlp"
std::string block_key(int64_t layer, BlockKind kind);

struct Measurement {
  std::map<std::string, std::vector<OptionResult>> blocks;
  int64_t layers = 0;  // layers measured (both blocks)

  json to_json() const;
  // Checks that every block of `config`'s decoder is there, that each option's specs parse and
  // that its bits match the shapes of this model (a measurement of another model is refused).
  static Measurement from_json(const json& j, const ModelConfig& config, const std::string& where);
  // The layers an unfinished measurement (a job's checkpoint) holds so far.
  static Measurement from_json_partial(const json& j, const ModelConfig& config);
};

// Bits a block's option occupies in `config`'s shapes.
int64_t option_bits(const ModelConfig& config, BlockKind kind, const std::vector<LinearSpec>& specs);

// Measures both blocks of one layer: `x` holds `rows` reference input rows on the backend and
// is advanced to the layer's reference output. `w` are the layer's host weights, `l` the same on
// the device (their linears are swapped for quantized ones and back during the measurement).
void measure_layer(BlockQuantizer& q, int64_t layer, const LayerWeights& w, DeviceLayer& l, float* x, int64_t rows,
                   Measurement& m, Progress* progress);

}  // namespace qf
