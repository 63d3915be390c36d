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
  KVFormat kv_format = KVFormat::Full;
  uint64_t seed = 1;
};

void run_concurrency_bench(Model& model, const ConcurrencyBench& opt);

// bench --prefix-sharing N: time to first token of a request whose first N tokens are already in
// the paged cache (a second request with the same system prompt) against the same request cold.
struct PrefixBench {
  int64_t prefix = 1000;  // shared tokens
  int64_t suffix = 16;    // tokens after the prefix, different in every request
  int32_t block_size = 16;
  int32_t token_budget = 2048;
  KVFormat kv_format = KVFormat::Full;
  int repeats = 3;
  uint64_t seed = 1;
};

void run_prefix_bench(Model& model, const PrefixBench& opt);

}  // namespace qf::app
