#include "runtime/generator.h"

#include <algorithm>
#include <chrono>

#include "core/error.h"

namespace qf {

namespace {
double now_seconds() {
  using namespace std::chrono;
  return duration<double>(steady_clock::now().time_since_epoch()).count();
}
}  // namespace

GenerateStats generate(Model& model, const std::vector<int32_t>& prompt, const GenerateOptions& opt,
                       const std::function<bool(int32_t)>& on_token) {
  if (prompt.empty()) fail("the prompt is empty (no tokens to start from)");
  const auto& cfg = model.config();
  int64_t ctx = opt.context > 0 ? opt.context
                                : std::min<int64_t>(static_cast<int64_t>(prompt.size()) + opt.max_tokens,
                                                    std::max<int64_t>(cfg.max_position, static_cast<int64_t>(prompt.size()) + 1));
  if (static_cast<int64_t>(prompt.size()) >= ctx)
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
  for (int i = 0; i < opt.max_tokens; ++i) {
    const int32_t id = graph ? graph->next() : device ? device->token() : sampler.sample(logits, history);
    history.push_back(id);
    ++st.generated_tokens;
    const bool is_eos = std::find(opt.eos_ids.begin(), opt.eos_ids.end(), id) != opt.eos_ids.end();
    if (is_eos && opt.stop_at_eos) {
      st.hit_eos = true;
      break;
    }
    if (!on_token(id)) break;
    if (i + 1 == opt.max_tokens || pos >= ctx) break;
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
