#include "runtime/perplexity.h"

#include <chrono>
#include <cmath>

#include "core/error.h"

namespace qf {

PerplexityResult perplexity(Model& model, const std::vector<int32_t>& tokens, int64_t ctx, int64_t max_windows,
                            const std::function<void(int64_t, int64_t, double)>& progress) {
  if (ctx < 2) fail("--ctx must be at least 2");
  int64_t windows = static_cast<int64_t>(tokens.size()) / ctx;
  if (windows == 0) fail("the text has ", tokens.size(), " tokens, fewer than one window of ", ctx);
  if (max_windows > 0) windows = std::min(windows, max_windows);
  const int64_t vocab = model.config().vocab;
  auto cache = model.new_cache(ctx);
  std::vector<float> logits(static_cast<size_t>(ctx * vocab));
  PerplexityResult r;
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t w = 0; w < windows; ++w) {
    const int32_t* win = tokens.data() + w * ctx;
    model.forward(win, ctx, 0, *cache, logits.data(), /*all_logits=*/true);
    for (int64_t t = 0; t + 1 < ctx; ++t) {
      const float* row = logits.data() + t * vocab;
      float mx = row[0];
      for (int64_t i = 1; i < vocab; ++i) mx = std::max(mx, row[i]);
      double sum = 0;
      for (int64_t i = 0; i < vocab; ++i) sum += std::exp(static_cast<double>(row[i] - mx));
      const double logp = static_cast<double>(row[win[t + 1]] - mx) - std::log(sum);
      r.nll_sum -= logp;
      ++r.tokens_scored;
    }
    r.windows = w + 1;
    if (progress) progress(w + 1, windows, std::exp(r.nll_sum / static_cast<double>(r.tokens_scored)));
  }
  r.ppl = std::exp(r.nll_sum / static_cast<double>(r.tokens_scored));
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

}  // namespace qf
