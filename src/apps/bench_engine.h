// The benchmarks of qforge bench, every one through the engine (the path generate and a server
// take): one request's prefill and decode speed (pp/tg), many requests at once (--concurrency),
// and prefix sharing (--prefix-sharing).
#pragma once
#include <cstdint>
#include <functional>
#include <vector>

#include "model/model.h"

namespace qf::app {

// pp: a prompt of `prompt` fresh tokens in one step (its time to first token); tg at each depth:
// `new_tokens` decode steps of one request whose first `depth` tokens are in the cache (shared by
// the repeats through prefix sharing). The first of repeats + 1 runs warms up and is not counted.
struct StreamBench {
  int64_t prompt = 512, new_tokens = 128;
  int repeats = 5;
  std::vector<int64_t> depths{0};
  bool graphs = true;
  uint64_t seed = 1;
};
struct StreamResult {
  std::vector<double> pp, ttft_ms;               // per counted repeat
  std::vector<std::vector<double>> tg;           // per depth, per counted repeat: tok/s
  bool graphs = false;                           // decode steps were replayed from graphs
};
// `after_phase` runs after each part (the caller samples the device memory there).
StreamResult run_stream_bench(Model& model, const StreamBench& opt, const std::function<void()>& after_phase);

struct ConcurrencyBench {
  std::vector<int64_t> concurrency;  // requests in flight, one table row each
  int64_t max_prompt = 512;          // prompts of mixed lengths, max_prompt / 2 .. max_prompt tokens
  int64_t new_tokens = 128;          // generated per request
  int32_t block_size = 16;
  int32_t token_budget = 8192;       // tokens per engine step
  KVFormat kv_format = KVFormat::Full;
  uint64_t seed = 1;
  bool graphs = true;                // decode steps from graphs where the backend records them
};

void run_concurrency_bench(Model& model, const ConcurrencyBench& opt);

// bench --prefix-sharing N: time to first token of a request whose first N tokens are already in
// the paged cache (a second request with the same system prompt) against the same request cold.
struct PrefixBench {
  int64_t prefix = 1000;  // shared tokens
  int64_t suffix = 16;    // tokens after the prefix, different in every request
  int32_t block_size = 16;
  int32_t token_budget = 8192;
  KVFormat kv_format = KVFormat::Full;
  int repeats = 3;
  uint64_t seed = 1;
};

void run_prefix_bench(Model& model, const PrefixBench& opt);

}  // namespace qf::app
