// Prompt-then-decode loop for one sequence: prefill the prompt in chunks, then one token at a
// time, handing each new id to a callback (which streams it) until EOS or the token budget.
#pragma once
#include <functional>
#include <vector>

#include "model/model.h"
#include "runtime/sampler.h"

namespace qf {

struct GenerateOptions {
  int max_tokens = 128;
  int64_t context = 0;         // KV cache positions; 0 = prompt + max_tokens (capped by the model)
  int prefill_chunk = 512;     // prompt tokens per forward call
  bool stop_at_eos = true;
  bool use_graph = true;       // decode from a captured graph where the backend can (CUDA)
  std::vector<int32_t> eos_ids;
  SamplerParams sampling;
};

struct GenerateStats {
  int64_t prompt_tokens = 0, generated_tokens = 0;
  double prefill_seconds = 0, decode_seconds = 0;
  bool hit_eos = false;
  double prefill_tps() const { return prefill_seconds > 0 ? prompt_tokens / prefill_seconds : 0; }
  // The first generated token comes from the prefill, so decode speed counts the rest.
  double decode_tps() const {
    return decode_seconds > 0 && generated_tokens > 1 ? (generated_tokens - 1) / decode_seconds : 0;
  }
};

// on_token returns false to stop early.
GenerateStats generate(Model& model, const std::vector<int32_t>& prompt, const GenerateOptions& opt,
                       const std::function<bool(int32_t)>& on_token);

}  // namespace qf
