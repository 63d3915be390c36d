// Perplexity over non-overlapping windows: each full window of `ctx` tokens is run from an empty
// cache and every token but the first is scored (the method of the project's reference numbers).
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

}  // namespace qf
