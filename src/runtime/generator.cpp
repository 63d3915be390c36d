#include "runtime/generator.h"

#include <algorithm>
#include <chrono>

#include "core/error.h"
#include "core/log.h"
#include "engine/engine.h"

namespace qf {

namespace {
double now_seconds() {
  using namespace std::chrono;
  return duration<double>(steady_clock::now().time_since_epoch()).count();
}
}  // namespace

int64_t choose_context(int64_t trained, int64_t prompt_tokens, int64_t max_tokens, std::optional<int64_t> requested) {
  trained = std::max<int64_t>(trained, 1);
  const int64_t room = max_tokens != 0 ? 1 : 0;  // the first generated token needs a position too
  if (requested && *requested > 0) {
    const int64_t ctx = *requested;
    if (prompt_tokens + room > ctx)
      fail("--ctx ", ctx, ": the prompt is too long (", prompt_tokens, " tokens; a context of ", ctx, " holds at most ",
           ctx - room, room ? " prompt tokens and leaves room to generate)" : " prompt tokens)");
    if (ctx > trained)
      log_warn("--ctx ", ctx, " is above the model's trained context of ", trained,
               " tokens (max_position_embeddings): positions past it are extrapolated and the output may degrade");
    return ctx;
  }
  if (prompt_tokens + room > trained)
    fail("-p: the prompt has ", prompt_tokens, " tokens, more than the model's trained context of ", trained,
         " tokens (max_position_embeddings) allows", room ? " with room to generate" : "",
         "; pass a larger --ctx to run it anyway");
  if (requested || max_tokens < 0) return trained;
  return std::min(trained, prompt_tokens + max_tokens);
}

GenerateStats generate(Model& model, const std::vector<int32_t>& prompt, const GenerateOptions& opt,
                       const std::function<bool(int32_t)>& on_token) {
  if (prompt.empty()) fail("the prompt is empty (no tokens to start from)");
  const auto& cfg = model.config();
  const auto prompt_tokens = static_cast<int64_t>(prompt.size());
  const int64_t ctx = opt.context > 0 ? opt.context
                                      : choose_context(cfg.max_position, prompt_tokens, opt.max_tokens, std::nullopt);
  if (prompt_tokens + (opt.max_tokens != 0 ? 1 : 0) > ctx)
    fail("the prompt has ", prompt.size(), " tokens, which leaves no room in a context of ", ctx);
  Sampler check(opt.sampling);  // the parameters' one-line errors before anything is allocated
  GenerateStats st;
  st.prompt_tokens = prompt_tokens;
  // One request through the engine. The last generated token needs no position of its own: a
  // context of ctx positions yields up to ctx - prompt + 1 tokens.
  const int64_t room = ctx - prompt_tokens + 1;
  const int64_t wanted = opt.max_tokens < 0 ? room : std::min(opt.max_tokens, room);
  EngineOptions eo = EngineOptions::for_one_request(ctx + 1, std::max(1, opt.prefill_chunk));
  eo.graphs = opt.use_graph;
  Engine engine(model, eo);
  Request r;
  r.prompt = prompt;
  r.max_new_tokens = static_cast<int32_t>(std::max<int64_t>(wanted, 1));
  if (opt.stop_at_eos) r.eos = opt.eos_ids;
  engine.add(std::move(r), opt.sampling);

  const double t0 = now_seconds();
  double t_first = -1;
  int64_t seen = 0;  // tokens handed to on_token
  // Hands on the tokens generated so far; false when the caller stops.
  const auto deliver = [&](const int32_t* ids, int64_t count) {
    if (t_first < 0) t_first = now_seconds();
    if (wanted == 0) return true;  // max_tokens 0: the prompt only; its one drawn token is not shown
    for (; seen < count; ++seen) {
      ++st.generated_tokens;
      if (!on_token(ids[seen])) return false;
    }
    return true;
  };
  // Non-finite logits end the run with the engine's one-line error naming the model.
  bool stopped = false;
  while (!stopped && engine.step()) {
    if (engine.scheduler().has(0)) {
      const auto& toks = engine.scheduler().tokens(0);
      if (static_cast<int64_t>(toks.size()) > prompt_tokens)
        stopped = !deliver(toks.data() + prompt_tokens, static_cast<int64_t>(toks.size()) - prompt_tokens);
    }
    for (const Finished& f : engine.take_finished()) {
      if (!stopped) stopped = !deliver(f.output.data(), static_cast<int64_t>(f.output.size()));
      if (f.reason == Finished::Eos) {
        st.hit_eos = true;
        if (wanted > 0) ++st.generated_tokens;  // the EOS was generated, only not shown
      }
    }
  }
  if (stopped) engine.cancel(0);
  const double t1 = now_seconds();
  st.prefill_seconds = (t_first < 0 ? t1 : t_first) - t0;
  st.decode_seconds = t_first < 0 ? 0 : t1 - t_first;
  st.graph_steps = engine.graph_steps();
  st.hit_context = !st.hit_eos && !stopped && st.generated_tokens == room && (opt.max_tokens < 0 || opt.max_tokens > room);
  return st;
}

}  // namespace qf
