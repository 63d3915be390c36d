#include "formats/linear_weight.h"

#include "formats/quant_linear.h"

namespace qf {

const char* linear_format_name(LinearFormat f) {
  switch (f) {
    case LinearFormat::Dense: return "fp";
    case LinearFormat::EXL2: return "exl2";
    case LinearFormat::GPTQ: return "gptq";
  }
  return "?";
}

double LinearWeight::bits_per_weight() const {
  if (format == LinearFormat::Dense) return 8.0 * static_cast<double>(dtype_size(weight.dtype));
  return 8.0 * static_cast<double>(storage_bytes()) / static_cast<double>(in_features * out_features);
}

size_t LinearWeight::storage_bytes() const {
  size_t n = bias ? bias->nbytes() : 0;
  if (format == LinearFormat::Dense) return n + weight.nbytes();
  return n + quant_storage_bytes(*quant);
}

}  // namespace qf
