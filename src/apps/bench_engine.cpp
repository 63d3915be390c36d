#include "apps/bench_engine.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "core/error.h"
#include "core/sizes.h"
#include "engine/engine.h"

namespace qf::app {

namespace {

using Clock = std::chrono::steady_clock;

double percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const double at = p * static_cast<double>(v.size() - 1);
  const size_t lo = static_cast<size_t>(at);
  const size_t hi = std::min(lo + 1, v.size() - 1);
  return v[lo] + (v[hi] - v[lo]) * (at - static_cast<double>(lo));
}

struct Stream {
  int64_t prompt = 0, generated = 0;
  double first = -1, last = -1;  // seconds since the start: first and latest token
};

std::string fmt_step_note(int64_t conc, int64_t decode_steps, double decode_s, int64_t mixed_steps, double mixed_s,
                          int64_t prefill_tokens) {
  char buf[320];
  std::snprintf(buf, sizeof buf,
                "concurrency %lld: %lld decode steps in %.3f s (%.2f ms each); %lld steps with prompt chunks in %.3f s "
                "(%lld prompt tokens, %.0f tok/s with the decode rows beside them)",
                static_cast<long long>(conc), static_cast<long long>(decode_steps), decode_s,
                decode_steps ? 1e3 * decode_s / static_cast<double>(decode_steps) : 0.0, static_cast<long long>(mixed_steps),
                mixed_s, static_cast<long long>(prefill_tokens),
                mixed_s > 0 ? static_cast<double>(prefill_tokens) / mixed_s : 0.0);
  return buf;
}

}  // namespace

StreamResult run_stream_bench(Model& model, const StreamBench& opt, const std::function<void()>& after_phase) {
  const ModelConfig& c = model.config();
  const int64_t max_depth = opt.depths.empty() ? 0 : *std::max_element(opt.depths.begin(), opt.depths.end());
  // One request at a time, the prompt in one step; the blocks a finished one leaves keep their
  // contents for the next request with the same first tokens (prefix sharing).
  EngineOptions eo = EngineOptions::for_one_request(
      checked_add(std::max(opt.prompt, max_depth + 1), opt.new_tokens + 1, "--depth + -n"),
      static_cast<int32_t>(std::clamp<int64_t>(opt.prompt, 512, 1 << 20)));
  eo.graphs = opt.graphs;
  Engine engine(model, eo);
  SamplerParams greedy;
  greedy.temperature = 0;
  std::mt19937_64 rng(opt.seed);
  const auto random_tokens = [&](int64_t n) {
    std::vector<int32_t> t(static_cast<size_t>(n));
    for (auto& x : t) x = static_cast<int32_t>(1 + rng() % static_cast<uint64_t>(std::max<int64_t>(c.vocab - 1, 1)));
    return t;
  };
  SeqId next = 0;
  // Runs one request to its end; returns the seconds to its first token and from then to its last.
  const auto run = [&](std::vector<int32_t> prompt, int64_t new_tokens) {
    Request r;
    r.id = next++;
    r.prompt = std::move(prompt);
    r.max_new_tokens = static_cast<int32_t>(new_tokens);
    const size_t n_prompt = r.prompt.size();
    const SeqId id = r.id;
    engine.add(std::move(r), greedy);
    model.backend().synchronize();
    const auto t0 = Clock::now();
    double first = -1;
    while (engine.step()) {
      if (first < 0 && (!engine.scheduler().has(id) || engine.scheduler().tokens(id).size() > n_prompt))
        first = std::chrono::duration<double>(Clock::now() - t0).count();
    }
    const double end = std::chrono::duration<double>(Clock::now() - t0).count();
    QF_CHECK(engine.take_finished().size() == 1, "bench: the request did not finish");
    return std::pair<double, double>{first, end - first};
  };
  StreamResult res;
  if (opt.prompt > 0)
    for (int rep = 0; rep <= opt.repeats; ++rep) {
      const auto [ttft, rest] = run(random_tokens(opt.prompt), 1);
      if (rep > 0) {
        res.pp.push_back(static_cast<double>(opt.prompt) / ttft);
        res.ttft_ms.push_back(ttft * 1e3);
      }
      after_phase();
    }
  for (int64_t depth : opt.depths) {
    const std::vector<int32_t> shared = random_tokens(depth);
    std::vector<double> tps;
    for (int rep = 0; rep <= opt.repeats; ++rep) {
      std::vector<int32_t> prompt = shared;
      const auto tail = random_tokens(1);
      prompt.push_back(tail[0]);
      const auto [ttft, decode] = run(prompt, opt.new_tokens + 1);
      if (rep > 0) tps.push_back(static_cast<double>(opt.new_tokens) / decode);
    }
    res.tg.push_back(tps);
    after_phase();
  }
  res.graphs = engine.graph_steps() > 0;
  return res;
}

void run_concurrency_bench(Model& model, const ConcurrencyBench& opt) {
  const ModelConfig& c = model.config();
  std::printf("\n| concurrency | output tok/s | per-stream tok/s | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | preemptions | steps from graphs |\n");
  std::printf("|---:|---:|---:|---:|---:|---:|---:|\n");
  std::vector<std::string> step_notes;
  for (int64_t conc : opt.concurrency) {
    EngineOptions eo;
    eo.block_size = opt.block_size;
    eo.max_running = static_cast<int32_t>(conc);
    eo.token_budget = opt.token_budget;
    eo.kv_format = opt.kv_format;
    eo.max_context = opt.max_prompt + opt.new_tokens;
    eo.graphs = opt.graphs;
    // Every request's whole context at once, so that the table measures batching, not preemption.
    eo.num_blocks = kv_block_count(eo.max_context, eo.block_size, conc);
    Engine engine(model, eo);
    std::mt19937_64 rng(opt.seed);
    SamplerParams greedy;
    greedy.temperature = 0;
    std::map<SeqId, Stream> streams;
    const auto t0 = Clock::now();
    for (int64_t i = 0; i < conc; ++i) {
      Request r;
      r.id = i;
      const int64_t lo = std::max<int64_t>(1, opt.max_prompt / 2);
      const int64_t len = lo + static_cast<int64_t>(rng() % static_cast<uint64_t>(opt.max_prompt - lo + 1));
      for (int64_t t = 0; t < len; ++t) r.prompt.push_back(static_cast<int32_t>(1 + rng() % static_cast<uint64_t>(c.vocab - 1)));
      r.max_new_tokens = static_cast<int32_t>(opt.new_tokens);
      streams[i].prompt = len;
      engine.add(std::move(r), greedy);
    }
    std::vector<double> ttft, itl;
    int64_t total = 0;
    auto record = [&](SeqId id, int64_t count, double now) {
      Stream& s = streams[id];
      for (; s.generated < count; ++s.generated) {
        if (s.generated == 0) {
          s.first = now;
          ttft.push_back(now);
        } else {
          itl.push_back(now - s.last);
        }
        s.last = now;
        ++total;
      }
    };
    // Where the wall time goes: decode-only steps against steps that also compute prompts.
    double decode_s = 0, mixed_s = 0, before = 0;
    int64_t decode_steps = 0, mixed_steps = 0, prefill_tokens = 0;
    while (engine.step()) {
      const double now = std::chrono::duration<double>(Clock::now() - t0).count();
      if (engine.last_step_decode_only()) {
        decode_s += now - before;
        ++decode_steps;
      } else {
        mixed_s += now - before;
        ++mixed_steps;
        prefill_tokens += engine.last_step_prefill_tokens();
      }
      before = now;
      for (const Finished& f : engine.take_finished()) record(f.id, static_cast<int64_t>(f.output.size()), now);
      for (auto& [id, s] : streams)
        if (s.generated < opt.new_tokens && engine.scheduler().has(id))
          record(id, static_cast<int64_t>(engine.scheduler().tokens(id).size()) - s.prompt, now);
    }
    const double wall = std::chrono::duration<double>(Clock::now() - t0).count();
    double stream_rate = 0;
    for (const auto& [id, s] : streams)
      if (s.generated > 1 && s.last > s.first) stream_rate += static_cast<double>(s.generated - 1) / (s.last - s.first);
    stream_rate /= static_cast<double>(streams.size());
    std::printf("| %lld | %.1f | %.1f | %.1f / %.1f | %.2f / %.2f | %lld | %lld of %lld |\n", static_cast<long long>(conc),
                static_cast<double>(total) / wall, stream_rate, 1e3 * percentile(ttft, 0.5), 1e3 * percentile(ttft, 0.99),
                1e3 * percentile(itl, 0.5), 1e3 * percentile(itl, 0.99),
                static_cast<long long>(engine.scheduler().preemptions()), static_cast<long long>(engine.graph_steps()),
                static_cast<long long>(engine.steps()));
    step_notes.push_back(fmt_step_note(conc, decode_steps, decode_s, mixed_steps, mixed_s, prefill_tokens));
    std::fflush(stdout);
  }
  for (const std::string& n : step_notes) std::printf("%s\n", n.c_str());
  std::printf("prompts of %lld..%lld random tokens, %lld new tokens each (greedy), all arriving at once; %s KV cache "
              "in %d-token blocks, at most %d tokens per step\n",
              static_cast<long long>(std::max<int64_t>(1, opt.max_prompt / 2)), static_cast<long long>(opt.max_prompt),
              static_cast<long long>(opt.new_tokens), kv_format_name(opt.kv_format), opt.block_size, opt.token_budget);
}

void run_prefix_bench(Model& model, const PrefixBench& opt) {
  const ModelConfig& c = model.config();
  EngineOptions eo;
  eo.block_size = opt.block_size;
  eo.token_budget = opt.token_budget;
  eo.max_running = 1;
  eo.kv_format = opt.kv_format;
  eo.max_context = opt.prefix + opt.suffix + 1;
  // Room for two prompts' blocks: the cached one stays while a cold one runs beside it.
  eo.num_blocks = kv_block_count(eo.max_context, eo.block_size, 3);
  Engine engine(model, eo);
  std::mt19937_64 rng(opt.seed);
  auto random_tokens = [&](int64_t n) {
    std::vector<int32_t> t;
    for (int64_t i = 0; i < n; ++i) t.push_back(static_cast<int32_t>(1 + rng() % static_cast<uint64_t>(c.vocab - 1)));
    return t;
  };
  SamplerParams greedy;
  greedy.temperature = 0;
  SeqId next_id = 0;
  // Time from adding the request to its first token, and how many prompt tokens were cached then.
  auto ttft = [&](const std::vector<int32_t>& prompt, int64_t& cached) {
    cached = engine.blocks().cached_tokens(prompt);
    const auto t0 = Clock::now();
    engine.add({next_id++, prompt, 1, {}}, greedy);
    engine.run_to_completion();
    engine.take_finished();
    return std::chrono::duration<double>(Clock::now() - t0).count();
  };
  std::vector<double> cold, warm;
  int64_t cached_cold = 0, cached_warm = 0;
  for (int r = 0; r < opt.repeats + 1; ++r) {  // the first round warms the kernels up and is not counted
    const std::vector<int32_t> prefix = random_tokens(opt.prefix);
    std::vector<int32_t> a = prefix, b = prefix;
    for (int32_t t : random_tokens(opt.suffix)) a.push_back(t);
    for (int32_t t : random_tokens(opt.suffix)) b.push_back(t);
    const double tc = ttft(a, cached_cold);
    const double tw = ttft(b, cached_warm);
    if (r == 0) continue;
    cold.push_back(tc);
    warm.push_back(tw);
  }
  const double c50 = percentile(cold, 0.5), w50 = percentile(warm, 0.5);
  std::printf("\n| request | prompt tokens | cached tokens | TTFT p50 (ms) |\n|---|---:|---:|---:|\n");
  std::printf("| new prefix (cold) | %lld | %lld | %.2f |\n", static_cast<long long>(opt.prefix + opt.suffix),
              static_cast<long long>(cached_cold), 1e3 * c50);
  std::printf("| same %lld-token prefix | %lld | %lld | %.2f |\n", static_cast<long long>(opt.prefix),
              static_cast<long long>(opt.prefix + opt.suffix), static_cast<long long>(cached_warm), 1e3 * w50);
  std::printf("prefix sharing: the second request's first token comes %.1fx sooner (%d repeats, %d-token blocks)\n",
              w50 > 0 ? c50 / w50 : 0.0, opt.repeats, opt.block_size);
}

}  // namespace qf::app
