// The quantization options the converter chooses between (shared/reference/exl2-format.md 1.7):
// a linear layer is quantized with a mix of bit widths, each over a share of its input rows (the
// most important rows, in act-order, get the most bits) in groups of 32, 64 or 128 rows; a block
// option gives one mix to each linear of an attention block (q, k, v, o) or an MLP block (gate,
// up, down). Written and read as ExLlamaV2's QParams, so measurement files are interchangeable.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "backends/quant_ops.h"
#include "core/json_file.h"

namespace qf {

struct MixPart {
  int bits = 4;
  double frac = 1.0;
  int64_t group_size = 128;
};

// One linear layer's mix, parts in descending bit width.
struct LinearSpec {
  std::vector<MixPart> parts;

  // "0.05:3b_64g/0.95:2b_64g" (ExLlamaV2's description format), and back.
  std::string describe() const;
  static LinearSpec parse(const std::string& desc);  // throws a one-line error
  // The groups of a matrix with K input rows: each part but the last takes its share rounded up to
  // whole groups, the last takes the rest; every group but the matrix's last has group_size rows.
  std::vector<GptqGroup> groups(int64_t K) const;
  // Bits of every tensor ExLlamaV2's format stores for a K x N layer with these groups (q_weight
  // with N padded to 32, q_scale, q_scale_max, q_groups, q_invperm), as the loader counts them.
  int64_t storage_bits(int64_t K, int64_t N) const;

  json to_qparams() const;                                          // ExLlamaV2's QParams dict
  static LinearSpec from_qparams(const json& j, const std::string& where);  // throws on bad input
  bool operator==(const LinearSpec& o) const { return describe() == o.describe(); }
};

// Bits of packed codes for `rows` rows at `bits`: whole packing units, as ExLlamaV2 packs them.
int64_t packed_words(int64_t rows, int bits);

enum class BlockKind { Attention, Mlp };
const char* block_kind_name(BlockKind k);  // "self_attn" / "mlp"
// The projections of a block, in the order of a BlockOption's specs.
const std::vector<std::string>& block_projections(BlockKind k);  // q_proj.. / gate_proj..

struct BlockOption {
  std::vector<LinearSpec> specs;  // one per projection
};
// The candidates measured for every block, cheapest first.
const std::vector<BlockOption>& block_options(BlockKind k);

// The head's mix for --head-bits 2, 3, 4, 5, 6 or 8 (ExLlamaV2's conventions).
LinearSpec head_spec(int head_bits);

}  // namespace qf
