// bench --concurrency: many requests at once through the engine (continuous batching over the
// paged KV cache), as a server would see them: aggregate output tok/s, per-stream decode tok/s,
// time to first token and inter-token latency percentiles, for each concurrency.
#pragma once
#include <cstdint>
#include <vector>

#include "model/model.h"

namespace qf::app {

struct ConcurrencyBench {
  std::vector<int64_t> concurrency;  // requests in flight, one table row each
  int64_t max_prompt = 512;          // prompts of mixed lengths, max_prompt / 2 .. max_prompt tokens
  int64_t new_tokens = 128;          // generated per request
  int32_t block_size = 16;
  int32_t token_budget = 2048;       // tokens per engine step
  uint64_t seed = 1;
};

void run_concurrency_bench(Model& model, const ConcurrencyBench& opt);

}  // namespace qf::app
