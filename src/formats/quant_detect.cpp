// Finds a linear layer's format from the tensors present, as ExLlamaV2's loader does
// (exllamav2/module.py): .q_weight is EXL2, else .qweight is GPTQ, else the layer is dense.
#include "core/error.h"
#include "formats/exl2.h"
#include "formats/gptq.h"
#include "formats/quant_linear.h"

namespace qf {

std::shared_ptr<const QuantizedLinear> detect_quantized_linear(const TensorStore& store,
                                                               const std::string& prefix,
                                                               int64_t in_features,
                                                               int64_t out_features,
                                                               const QuantHints& hints) {
  if (store.has(prefix + ".q_weight")) return Exl2Linear::load(store, prefix, in_features, out_features);
  if (store.has(prefix + ".qweight")) return GptqLinear::load(store, prefix, in_features, out_features, hints);
  return nullptr;
}

}  // namespace qf
