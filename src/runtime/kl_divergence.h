// Quantization quality: a quantized model against its base (e.g. the FP16 original) over the
// windows of the perplexity protocol (runtime/perplexity.h), as llama.cpp's
// `perplexity --kl-divergence` reports it: both perplexities, and per scored token the KL
// divergence of the quant's next-token distribution from the base's and whether their argmax agree.
#pragma once
#include <functional>
#include <vector>

#include "model/model.h"
#include "runtime/perplexity.h"

namespace qf {

struct KlDivergenceResult {
  PerplexityResult quant, base;  // each over every window scored
  double ppl_ratio = 0;          // quant.ppl / base.ppl
  // Over the scored tokens of the first kld_windows windows (kld_tokens of them):
  double kld_mean = 0, kld_median = 0, kld_p99 = 0, kld_max = 0;  // KL(base || quant), nats
  double top1 = 0;                                                // share with equal argmax
  double delta_p_mean = 0, delta_p_rms = 0;  // p_quant(next token) - p_base(next token)
  int64_t kld_windows = 0, kld_tokens = 0;
  double seconds = 0;
};

// Fails (one line) unless the two configs can be compared token by token: the same vocabulary,
// and the same RoPE (both models run on one backend, whose RoPE tables are shared).
void check_comparable(const ModelConfig& quant, const ModelConfig& base);

// KL(p || q) = sum_i p_i (log p_i - log q_i) of the softmaxes of two rows of logits, in double.
double kl_divergence_row(const float* base_row, const float* quant_row, int64_t vocab, std::vector<double>& scratch);

// Runs both models over the same windows of `tokens` (see perplexity()); the KL statistics cover
// the first kld_windows windows (0 = all). progress gets the quant's running perplexity and mean KLD.
KlDivergenceResult kl_divergence(
    Model& quant, Model& base, const std::vector<int32_t>& tokens, int64_t ctx, int64_t max_windows = 0,
    int64_t kld_windows = 48,
    const std::function<void(int64_t done, int64_t total, double ppl, double kld)>& progress = {});

}  // namespace qf
