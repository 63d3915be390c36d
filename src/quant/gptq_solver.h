// GPTQ for one group of linear layers that read the same input (q/k/v, gate/up, or one alone):
// the Hessian of that input is factored once — act-order permutation by its diagonal, damping
// (more on retry when the factorisation fails), the upper Cholesky factor of the inverse — and
// every layer and every candidate mix is then quantized against it on the backend.
#pragma once
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "backends/backend.h"
#include "quant/exl2_pack.h"
#include "quant/options.h"

namespace qf {

// A dense [N][K] weight as [K][N] fp32 rows in the order `perm` (row i holds input perm[i]), the
// inputs marked `dead` (never active) zeroed, as GPTQ does. Checks that every value is finite.
std::vector<float> arrange_weight(const LinearWeight& w, const std::vector<int32_t>& perm, const std::vector<char>& dead);

class GptqSolver {
 public:
  // H [K][K] in the backend's memory (read only here). `damp` is a fraction of the mean diagonal.
  // `what` names the input in error messages (e.g. "model.layers.3.self_attn input").
  GptqSolver(Backend& b, const float* H, int64_t K, double damp, const std::string& what);

  int64_t K() const { return K_; }
  const std::vector<int32_t>& perm() const { return perm_; }
  double damp_used() const { return damp_used_; }  // the fraction that worked
  int retries() const { return retries_; }

  // arrange_weight() in this solver's order, with the inputs its Hessian never saw zeroed.
  std::vector<float> arrange(const LinearWeight& w) const;
  // GPTQ of the arranged weight with `spec`; `bias` is copied into the packed layer as fp16.
  // `dequantized` (tests) receives the [K][N] weights GPTQ settled on, in this solver's order.
  std::shared_ptr<const Exl2Tensors> quantize(const std::vector<float>& arranged, int64_t N, const LinearSpec& spec,
                                              const std::optional<TensorView>& bias, const ScaleSearch& search,
                                              std::vector<float>* dequantized = nullptr);

  // The same in two halves, for quantizing one weight many ways (measurement): load() puts the
  // arranged weight on the device once; codes() runs GPTQ on a device copy of it; pack() (host
  // only, safe to run on other threads while the device works on the next mix) packs the codes.
  void load(const std::vector<float>& arranged, int64_t N);
  GptqCodes codes(const LinearSpec& spec, const ScaleSearch& search, std::vector<float>* dequantized = nullptr);
  std::shared_ptr<const Exl2Tensors> pack(const GptqCodes& codes, const LinearSpec& spec,
                                          const std::optional<TensorView>& bias) const;

 private:
  Backend& b_;
  int64_t K_ = 0;
  std::vector<int32_t> perm_;
  std::vector<char> dead_;
  double damp_used_ = 0;
  int retries_ = 0;
  int64_t N_ = 0;      // columns of the loaded weight
  DeviceBuffer U_, A_, W_;  // inverse factor, loaded weight, GPTQ's working copy
};

}  // namespace qf
