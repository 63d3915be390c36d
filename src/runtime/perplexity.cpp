#include "runtime/perplexity.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <memory>

#include "core/error.h"
#include "core/thread_pool.h"
#include "core/sizes.h"
#include "core/vec_math.h"
#include "backends/sampler.h"

namespace qf {

int64_t count_windows(size_t n_tokens, int64_t ctx, int64_t max_windows) {
  if (ctx < 2) fail("--ctx must be at least 2");
  int64_t windows = static_cast<int64_t>(n_tokens) / ctx;
  if (windows == 0) fail("the text has ", n_tokens, " tokens, fewer than one window of ", ctx);
  if (max_windows > 0) windows = std::min(windows, max_windows);
  return windows;
}

void run_windows(const std::vector<Model*>& models, const std::vector<int32_t>& tokens, int64_t ctx,
                 int64_t windows, const WindowLogitsFn& fn) {
  QF_CHECK(checked_mul(windows, ctx, "perplexity windows") <= static_cast<int64_t>(tokens.size()), windows,
           " windows of ", ctx, " tokens do not fit a text of ", tokens.size());
  // Each window is one sequence over a paged cache of its own length (Model::forward: the engine's
  // forward pass), every row's logits wanted.
  std::vector<std::unique_ptr<SequenceCache>> caches;
  std::vector<std::vector<float>> logits;
  std::vector<const float*> views;
  for (Model* m : models) {
    caches.push_back(m->new_cache(ctx));
    logits.emplace_back(static_cast<size_t>(checked_mul(ctx, m->config().vocab, str("logits of a ", ctx, "-token window"))));
    views.push_back(logits.back().data());
  }
  for (int64_t w = 0; w < windows; ++w) {
    const int32_t* win = tokens.data() + w * ctx;
    // Position 0 again: each window overwrites its cache from the start, as if it were empty.
    for (size_t i = 0; i < models.size(); ++i) {
      models[i]->forward(win, ctx, 0, *caches[i], logits[i].data(), /*all_logits=*/true);
      if (!all_finite(logits[i].data(), ctx * models[i]->config().vocab)) {
        const auto& dir = models[i]->config().dir;
        fail(dir.empty() ? std::string("the model") : dir.string(),
             ": the model produced non-finite logits (NaN or infinity) in window ", w + 1,
             "; its weights likely hold NaN or Inf values");
      }
    }
    fn(w, win, views);
  }
}

double token_nll(const float* row, int64_t vocab, int32_t target) {
  const float mx = max_f32(row, vocab);
  const float sum = sum_exp_f32(row, vocab, mx);  // terms are <= 1: float is plenty
  return std::log(static_cast<double>(sum)) - static_cast<double>(row[target] - mx);
}

void window_nll(const float* logits, const int32_t* window, int64_t ctx, int64_t vocab, std::vector<double>& nll) {
  nll.resize(static_cast<size_t>(ctx - 1));
  ThreadPool::global().parallel_for(ctx - 1, 16, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) nll[static_cast<size_t>(t)] = token_nll(logits + t * vocab, vocab, window[t + 1]);
  });
}

PerplexityResult perplexity(Model& model, const std::vector<int32_t>& tokens, int64_t ctx, int64_t max_windows,
                            const std::function<void(int64_t, int64_t, double)>& progress) {
  const int64_t windows = count_windows(tokens.size(), ctx, max_windows);
  const int64_t vocab = model.config().vocab;
  PerplexityResult r;
  std::vector<double> nll;
  const auto t0 = std::chrono::steady_clock::now();
  run_windows({&model}, tokens, ctx, windows, [&](int64_t w, const int32_t* win, const std::vector<const float*>& logits) {
    window_nll(logits[0], win, ctx, vocab, nll);
    for (double v : nll) r.nll_sum += v;  // token by token, in order: repeatable to the bit
    r.tokens_scored += ctx - 1;
    r.windows = w + 1;
    if (progress) progress(w + 1, windows, std::exp(r.nll_sum / static_cast<double>(r.tokens_scored)));
  });
  r.ppl = std::exp(r.nll_sum / static_cast<double>(r.tokens_scored));
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

PerplexityResult perplexity_batched(Model& model, const std::vector<int32_t>& tokens, int64_t ctx, int64_t batch,
                                    int64_t max_windows, KVFormat kv,
                                    const std::function<void(int64_t done, int64_t total, double ppl)>& progress) {
  if (batch < 1) fail("windows per batch must be at least 1");
  const int64_t windows = count_windows(tokens.size(), ctx, max_windows);
  const int64_t vocab = model.config().vocab;
  batch = std::min(batch, windows);
  auto cache = model.new_paged_cache(batch, ctx, ctx, kv);  // one block of ctx positions per window
  std::vector<int32_t> tables(static_cast<size_t>(batch));
  for (int64_t i = 0; i < batch; ++i) tables[static_cast<size_t>(i)] = static_cast<int32_t>(i);
  std::vector<float> logits(static_cast<size_t>(checked_mul(checked_mul(batch, ctx, "batch rows"), vocab, "logits")));
  PerplexityResult r;
  std::vector<double> nll;
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t w0 = 0; w0 < windows; w0 += batch) {
    const int64_t n = std::min(batch, windows - w0);
    Batch b;
    b.tokens.assign(tokens.begin() + w0 * ctx, tokens.begin() + (w0 + n) * ctx);
    for (int64_t i = 0; i < n; ++i) b.seqs.push_back({i * ctx, ctx, 0, &tables[static_cast<size_t>(i)], 1});
    b.logit_rows.resize(static_cast<size_t>(n * ctx));
    for (int64_t i = 0; i < n * ctx; ++i) b.logit_rows[static_cast<size_t>(i)] = i;
    model.forward_batch(b, *cache, logits.data());
    for (int64_t i = 0; i < n; ++i)
      if (!all_finite(logits.data() + i * ctx * vocab, ctx * vocab)) {
        const auto& dir = model.config().dir;
        fail(dir.empty() ? std::string("the model") : dir.string(),
             ": the model produced non-finite logits (NaN or infinity) in window ", w0 + i + 1,
             "; its weights likely hold NaN or Inf values");
      }
    for (int64_t i = 0; i < n; ++i) {
      window_nll(logits.data() + i * ctx * vocab, b.tokens.data() + i * ctx, ctx, vocab, nll);
      for (double v : nll) r.nll_sum += v;
      r.tokens_scored += ctx - 1;
    }
    r.windows = w0 + n;
    if (progress) progress(r.windows, windows, std::exp(r.nll_sum / static_cast<double>(r.tokens_scored)));
  }
  r.ppl = std::exp(r.nll_sum / static_cast<double>(r.tokens_scored));
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

}  // namespace qf
