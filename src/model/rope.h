// Rotary position embedding tables with the scalings Llama-family configs use (default, linear,
// llama3), computed in fp32 as transformers does so long contexts round the same way.
#pragma once
#include "backends/backend.h"
#include "model/config.h"

namespace qf {

std::vector<float> rope_inv_freq(const RopeConfig& rope, int64_t head_dim);
RopeTables build_rope_tables(const RopeConfig& rope, int64_t head_dim, int64_t max_pos);

}  // namespace qf
