// Perplexity over non-overlapping windows: each full window of `ctx` tokens is run from an empty
// cache and every token but the first is scored (the method of the project's reference numbers).
// The window loop and the per-token log-softmax are public so that other measures over the same
// windows (KL divergence against a base model, runtime/kl_divergence.h) score exactly the same tokens.
#pragma once
#include <functional>
#include <vector>

#include "model/model.h"

namespace qf {

struct PerplexityResult {
  double ppl = 0, nll_sum = 0;
  int64_t windows = 0, tokens_scored = 0;
  double seconds = 0;
};

PerplexityResult perplexity(Model& model, const std::vector<int32_t>& tokens, int64_t ctx,
                            int64_t max_windows = 0,
                            const std::function<void(int64_t done, int64_t total, double ppl)>& progress = {});

// perplexity() with `batch` windows in each forward pass (Model::forward_batch over a paged cache,
// one block per window): the same tokens scored, the sums added in the same order.
// `kv` is the paged cache's format (a quantized cache's effect on quality).
PerplexityResult perplexity_batched(Model& model, const std::vector<int32_t>& tokens, int64_t ctx, int64_t batch,
                                    int64_t max_windows = 0, KVFormat kv = KVFormat::Full,
                                    const std::function<void(int64_t done, int64_t total, double ppl)>& progress = {});

// How many windows of `ctx` tokens are scored: the full ones, at most max_windows when > 0.
// Fails (one line) when ctx < 2 or the text is shorter than one window.
int64_t count_windows(size_t n_tokens, int64_t ctx, int64_t max_windows);

// Runs every model over windows [0, windows) of `tokens`, each window from an empty cache, and
// hands fn the window's first token and each model's logits for it ([ctx, vocab] row-major, in
// the order of `models`; valid until fn returns). The models must share their RoPE settings when
// they share a backend (its RoPE tables are per backend).
using WindowLogitsFn =
    std::function<void(int64_t w, const int32_t* window, const std::vector<const float*>& logits)>;
void run_windows(const std::vector<Model*>& models, const std::vector<int32_t>& tokens, int64_t ctx,
                 int64_t windows, const WindowLogitsFn& fn);

// -log softmax(row)[target], in float for the exponentials (terms <= 1) and double after.
double token_nll(const float* row, int64_t vocab, int32_t target);
// token_nll of every scored token of a window (row t predicts window[t + 1]), in parallel:
// nll[t] for t < ctx - 1.
void window_nll(const float* logits, const int32_t* window, int64_t ctx, int64_t vocab, std::vector<double>& nll);

}  // namespace qf
