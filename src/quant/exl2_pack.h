// Packs GPTQ's codes into the tensors ExLlamaV2 stores for a linear layer (exl2-format.md 1.2
// and 1.5): codes along the input rows in act-order, each group's codes in whole packing units,
// highest bit width first; 4-bit scale codes, fp16 group maxima, (bits, first word) per group and
// the inverse permutation. Output columns are padded to a multiple of 32 with zero-valued codes.
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "backends/quant_ops.h"
#include "formats/safetensors.h"
#include "formats/linear_weight.h"

namespace qf {

struct Exl2Tensors {
  int64_t K = 0, N = 0, W = 0, P = 0, G = 0;  // W: padded columns, P: packed rows
  std::vector<int32_t> q_weight, q_scale, q_invperm;
  std::vector<uint16_t> q_scale_max;  // fp16
  std::vector<int16_t> q_groups;
  std::vector<uint16_t> bias;  // fp16, empty when the layer has none

  // The tensors named "<prefix>.q_weight" etc., pointing into this object.
  std::vector<TensorToWrite> tensors(const std::string& prefix) const;
  // The same tensors as views that share ownership of this object.
  std::map<std::string, TensorView> views(const std::string& prefix, std::shared_ptr<const Exl2Tensors> self) const;
  size_t bytes() const;
};

// codes: GPTQ's result for rows in processing order; perm[i] is the input feature of processing
// row i; groups as given to gptq_quantize.
Exl2Tensors pack_exl2(const GptqCodes& codes, const std::vector<GptqGroup>& groups, const std::vector<int32_t>& perm);

// A LinearWeight over packed tensors, loaded and validated by the same code that reads files.
LinearWeight exl2_linear(std::shared_ptr<const Exl2Tensors> t, const std::string& prefix);

}  // namespace qf
