// Finds a linear layer's format from the tensors present, as ExLlamaV2's loader does
// (exllamav2/module.py): .q_weight is EXL2, else .qweight is GPTQ, else the layer is dense. A layer
// with the tensors of two formats, or with parts of a format but not its main tensor, is refused:
// which one the writer meant cannot be known, and picking one silently runs a different model.
#include "core/error.h"
#include "formats/exl2.h"
#include "formats/gptq.h"
#include "formats/quant_bits.h"
#include "formats/quant_linear.h"

namespace qf {

std::shared_ptr<const QuantizedLinear> detect_quantized_linear(const TensorStore& store,
                                                               const std::string& prefix,
                                                               int64_t in_features,
                                                               int64_t out_features,
                                                               const QuantHints& hints) {
  const bool exl2 = store.has(prefix + ".q_weight"), gptq = store.has(prefix + ".qweight"),
             dense = store.has(prefix + ".weight");
  if (exl2 + gptq + dense > 1) {
    const char* kinds = exl2 && gptq ? "EXL2 (.q_weight) and GPTQ (.qweight)"
                        : exl2       ? "EXL2 (.q_weight) and dense (.weight)"
                                     : "GPTQ (.qweight) and dense (.weight)";
    fail(tensor_where(store, prefix + (exl2 ? ".q_weight" : ".qweight")), ": layer ", quote_for_error(prefix),
         " has both ", kinds, " weights; refusing to guess which one is meant");
  }
  // Stray parts of a format whose main tensor is absent.
  static const char* const kExl2Parts[] = {".q_scale", ".q_scale_max", ".q_groups", ".q_invperm", ".q_perm"};
  static const char* const kGptqParts[] = {".qzeros", ".scales", ".g_idx"};
  if (!exl2)
    for (const char* s : kExl2Parts)
      if (store.has(prefix + s))
        fail(tensor_where(store, prefix + s), ": EXL2 tensor without ", prefix, ".q_weight (layer ",
             quote_for_error(prefix), " is incomplete)");
  if (!gptq)
    for (const char* s : kGptqParts)
      if (store.has(prefix + s))
        fail(tensor_where(store, prefix + s), ": GPTQ tensor without ", prefix, ".qweight (layer ",
             quote_for_error(prefix), " is incomplete)");
  if (exl2) return Exl2Linear::load(store, prefix, in_features, out_features);
  if (gptq) return GptqLinear::load(store, prefix, in_features, out_features, hints);
  return nullptr;
}

}  // namespace qf
