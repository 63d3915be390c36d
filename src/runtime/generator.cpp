#include "runtime/generator.h"

#include <algorithm>
#include <chrono>

#include "core/error.h"
#include "core/log.h"

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
  auto cache = model.new_cache(ctx);
  Sampler sampler(opt.sampling);  // also checks the parameters for the device paths
  Backend& backend = model.backend();
  std::vector<float> logits(static_cast<size_t>(cfg.vocab));
  std::vector<int32_t> history = prompt;
  GenerateStats st;
  st.prompt_tokens = static_cast<int64_t>(prompt.size());

  // Where the backend samples on the device (CUDA), logits never cross to the host: the prompt's
  // last logits are sampled there too, so eager and graph decoding draw the same random stream.
  std::unique_ptr<DeviceSampling> device;
  const double t0 = now_seconds();
  const int64_t chunk = std::max(1, opt.prefill_chunk);
  for (int64_t p = 0; p < st.prompt_tokens; p += chunk) {
    const int64_t n = std::min(chunk, st.prompt_tokens - p);
    if (p + n == st.prompt_tokens) device = backend.sample_on_device(opt.sampling, history, ctx);
    model.forward(prompt.data() + p, n, p, *cache, logits.data());
  }
  backend.synchronize();  // a device-side draw is asynchronous; count it with the prefill
  const double t1 = now_seconds();
  st.prefill_seconds = t1 - t0;

  int64_t pos = st.prompt_tokens;
  std::unique_ptr<DecodeGraph> graph;
  bool tried_graph = !opt.use_graph;
  for (int64_t i = 0; opt.max_tokens < 0 || i < opt.max_tokens; ++i) {
    const int32_t id = graph ? graph->next() : device ? device->token() : sampler.sample(logits, history);
    if (id < 0 || id >= cfg.vocab)
      fail(cfg.dir.empty() ? std::string("the model") : cfg.dir.string(), ": the model produced non-finite logits ",
           "(NaN or infinity) at position ", pos - 1, "; its weights likely hold NaN or Inf values");
    history.push_back(id);
    ++st.generated_tokens;
    const bool is_eos = std::find(opt.eos_ids.begin(), opt.eos_ids.end(), id) != opt.eos_ids.end();
    if (is_eos && opt.stop_at_eos) {
      st.hit_eos = true;
      break;
    }
    if (!on_token(id)) break;
    if (i + 1 == opt.max_tokens) break;
    if (pos >= ctx) {
      st.hit_context = true;
      break;
    }
    if (graph) {
      ++pos;  // the replayed step advances the device-side position itself
      continue;
    }
    if (!tried_graph) {
      // Every sampling mode replays a captured step where the backend can.
      tried_graph = true;
      device.reset();  // the graph samples on the device by itself
      int32_t unused = 0;
      graph = backend.capture_decode([&] { model.forward(&unused, 1, 0, *cache, logits.data()); }, id, pos, ctx,
                                     opt.sampling, history);
      if (graph) {
        ++pos;
        continue;
      }
      device = backend.sample_on_device(opt.sampling, history, ctx);
    }
    model.forward(&id, 1, pos, *cache, logits.data());
    ++pos;
  }
  st.decode_seconds = now_seconds() - t1;
  return st;
}

}  // namespace qf
