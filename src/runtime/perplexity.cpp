#include "runtime/perplexity.h"

#include <chrono>
#include <cmath>

#include "core/error.h"
#include "core/thread_pool.h"
#include "core/vec_math.h"

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
    // Log-softmax of each scored row, in parallel; summed in a fixed order for repeatability.
    std::vector<double> nll(static_cast<size_t>(ctx - 1));
    ThreadPool::global().parallel_for(ctx - 1, 16, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const float* row = logits.data() + t * vocab;
        const float mx = max_f32(row, vocab);
        const float sum = sum_exp_f32(row, vocab, mx);  // terms are <= 1: float is plenty
        nll[static_cast<size_t>(t)] = std::log(static_cast<double>(sum)) - static_cast<double>(row[win[t + 1]] - mx);
      }
    });
    for (double v : nll) r.nll_sum += v;
    r.tokens_scored += ctx - 1;
    r.windows = w + 1;
    if (progress) progress(w + 1, windows, std::exp(r.nll_sum / static_cast<double>(r.tokens_scored)));
  }
  r.ppl = std::exp(r.nll_sum / static_cast<double>(r.tokens_scored));
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

}  // namespace qf
