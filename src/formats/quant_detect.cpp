#include "core/error.h"
#include "formats/quant_linear.h"

namespace qf {

std::shared_ptr<const QuantizedLinear> detect_quantized_linear(const TensorStore& store,
                                                               const std::string& prefix,
                                                               int64_t in_features,
                                                               int64_t out_features) {
  if (store.has(prefix + ".q_weight") || store.has(prefix + ".qweight"))
    fail(store.file_of(prefix + (store.has(prefix + ".q_weight") ? ".q_weight" : ".qweight")).string(),
         ": layer '", prefix, "' is quantized (EXL2/GPTQ), which this build cannot load yet");
  return nullptr;
}

}  // namespace qf
