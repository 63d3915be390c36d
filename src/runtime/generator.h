// Prompt-then-decode loop for one sequence: prefill the prompt in chunks, then one token at a
// time, handing each new id to a callback (which streams it) until EOS or the token budget.
#pragma once
#include <functional>
#include <optional>
#include <vector>

#include "model/model.h"
#include "backends/sampler.h"

namespace qf {

struct GenerateOptions {
  int64_t max_tokens = 128;    // -1: until EOS or the context is full; 0: only the prefill
  int64_t context = 0;         // KV cache positions; 0 = choose_context(trained, prompt, max_tokens, nullopt)
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
  bool hit_context = false;  // stopped because the context was full
  int64_t graph_steps = 0;   // decode steps replayed from a recorded graph (the engine's, on CUDA)
  double prefill_tps() const { return prefill_seconds > 0 ? prompt_tokens / prefill_seconds : 0; }
  // The first generated token comes from the prefill, so decode speed counts the rest.
  double decode_tps() const {
    return decode_seconds > 0 && generated_tokens > 1 ? (generated_tokens - 1) / decode_seconds : 0;
  }
};

// The KV cache positions of a run, as `qforge generate` defines --ctx:
//   requested > 0:  that many (a warning when above `trained`, the model's max_position_embeddings);
//   requested <= 0: the trained context (llama.cpp's -c 0);
//   not requested:  prompt + max_tokens, at most the trained context (the trained context when
//                   max_tokens is -1).
// Fails with one line when the prompt leaves no room to generate (max_tokens != 0) or does not fit;
// a prompt longer than the trained context is refused unless --ctx is raised explicitly.
int64_t choose_context(int64_t trained, int64_t prompt_tokens, int64_t max_tokens, std::optional<int64_t> requested);

// on_token returns false to stop early. Fails with one line naming the model when the logits to
// sample hold NaN or infinity (broken weights) instead of printing garbage.
GenerateStats generate(Model& model, const std::vector<int32_t>& prompt, const GenerateOptions& opt,
                       const std::function<bool(int32_t)>& on_token);

}  // namespace qf
