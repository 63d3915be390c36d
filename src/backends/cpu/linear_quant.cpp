#include "backends/cpu/cpu_linear.h"
#include "core/error.h"

namespace qf {

std::unique_ptr<CpuLinear> make_quant_cpu_linear(const LinearWeight& w) {
  fail("linear layer '", w.name, "': ", linear_format_name(w.format), " layers are not supported on the CPU yet");
}

}  // namespace qf
