// The GPU sampler (cuda_sampler.cu) against the host sampler's rules (test::sampler_distribution):
// greedy and ties, the distribution of many draws for each kind of cut at vocabularies of 32000 and
// 128256, the repetition penalty and its window along a sequence, reproducibility and graph replay,
// generation end to end, and the time per token. Skips without CUDA or a device.
#include <gtest/gtest.h>

#include <chrono>
#include <cstdio>
#include <set>
#include <vector>

#include "backends/cpu/cpu_backend.h"
#include "model/model.h"
#include "runtime/generator.h"
#include "backends/sampler.h"
#include "test_util.h"
#ifdef QFORGE_HAVE_CUDA
#include "backends/cuda/cuda_backend.h"
#endif

namespace qf {
namespace {

constexpr int64_t kVocabs[] = {32000, 128256};

[[maybe_unused]] SamplerParams params(float temperature, int top_k, float top_p, float min_p, float penalty = 1.0f,
                                      int last_n = 64, uint64_t seed = 1) {
  SamplerParams p;
  p.temperature = temperature;
  p.top_k = top_k;
  p.top_p = top_p;
  p.min_p = min_p;
  p.repeat_penalty = penalty;
  p.repeat_last_n = last_n;
  p.seed = seed;
  return p;
}

#ifdef QFORGE_HAVE_CUDA
// Host logits with a device copy that draws read (and the penalty changes: reset() restores it).
struct DeviceLogits {
  DeviceLogits(CudaBackend& g, std::vector<float> h) : gpu(g), host(std::move(h)), buf(g.alloc(host.size())) {
    reset();
  }
  void reset() { gpu.upload(buf.data(), host.data(), host.size()); }
  int64_t vocab() const { return static_cast<int64_t>(host.size()); }
  CudaBackend& gpu;
  std::vector<float> host;
  DeviceBuffer buf;
};

// One draw (CudaBackend::sample_rows, one row) from the logits as they are on the host.
int32_t one(CudaBackend& gpu, DeviceLogits& l, const SamplerParams& p, const std::vector<int32_t>& history = {}) {
  l.reset();
  int32_t id = -7;
  gpu.sample_rows(l.buf.data(), l.vocab(), {{&p, history.data(), static_cast<int64_t>(history.size())}}, &id);
  return id;
}

// A sequence of n draws: each id joins the history the next draw sees (the draw number and the
// penalty window advance as in a decode loop).
std::vector<int32_t> sequence(CudaBackend& gpu, DeviceLogits& l, const SamplerParams& p, std::vector<int32_t> history,
                              int n) {
  std::vector<int32_t> out;
  for (int i = 0; i < n; ++i) {
    out.push_back(one(gpu, l, p, history));
    history.push_back(out.back());
  }
  return out;
}

// n independent draws from the same logits and history, draw i seeded p.seed + i, many rows per
// sample_rows call (each row its own copy of the logits, which the penalty changes).
std::vector<int32_t> many(CudaBackend& gpu, const std::vector<float>& logits, const SamplerParams& p,
                          const std::vector<int32_t>& history, int n) {
  const int64_t V = static_cast<int64_t>(logits.size());
  const int64_t per_call = std::max<int64_t>(1, std::min<int64_t>(256, (int64_t{64} << 20) / (V * 4)));
  std::vector<float> rows_host;
  for (int64_t r = 0; r < per_call; ++r) rows_host.insert(rows_host.end(), logits.begin(), logits.end());
  DeviceBuffer buf = gpu.alloc(rows_host.size());
  std::vector<int32_t> out;
  while (static_cast<int>(out.size()) < n) {
    const int64_t rows = std::min<int64_t>(per_call, n - static_cast<int64_t>(out.size()));
    std::vector<SamplerParams> ps(static_cast<size_t>(rows), p);
    std::vector<SampleRow> sr;
    for (int64_t r = 0; r < rows; ++r) {
      ps[static_cast<size_t>(r)].seed = p.seed + out.size() + static_cast<uint64_t>(r);
      sr.push_back({&ps[static_cast<size_t>(r)], history.data(), static_cast<int64_t>(history.size())});
    }
    gpu.upload(buf.data(), rows_host.data(), static_cast<size_t>(rows * V));
    std::vector<int32_t> ids(static_cast<size_t>(rows));
    gpu.sample_rows(buf.data(), V, sr, ids.data());
    out.insert(out.end(), ids.begin(), ids.end());
  }
  return out;
}
#endif

TEST(GpuSampler, GreedyAndTopOneTakeTheLowestTiedId) {
  QF_REQUIRE_GPU();
#ifdef QFORGE_HAVE_CUDA
  CudaBackend gpu(0);
  for (int64_t V : kVocabs) {
    auto logits = test::randn(static_cast<size_t>(V), 3, 2.0f);
    {
      DeviceLogits d(gpu, logits);
      EXPECT_EQ(one(gpu, d, params(0, 40, 1, 0)), argmax(logits.data(), V)) << V;
      EXPECT_EQ(one(gpu, d, params(1, 1, 1, 0)), argmax(logits.data(), V)) << V;
    }
    logits[7] = logits[300] = 50.0f;  // a tie at the top
    {
      DeviceLogits d(gpu, logits);
      EXPECT_EQ(one(gpu, d, params(0, 40, 1, 0)), 7) << "argmax kernel, vocab " << V;
      EXPECT_EQ(one(gpu, d, params(0, 40, 1, 0, 1.1f), {5, 9}), 7) << "sampler kernel at temperature 0";
      for (int32_t id : many(gpu, logits, params(1.0f, 1, 0.9f, 0.05f, 1.0f, 64, 3), {}, 50))
        ASSERT_EQ(id, 7) << "top-k 1, vocab " << V;
      // The penalty moves the top: 50 / 2 = 25 is below the next id's 50.
      EXPECT_EQ(one(gpu, d, params(0, 0, 1, 0, 2.0f), {7}), 300);
    }
    // A tie group too large to sort in shared memory (5000 ids at the max): exact key cuts.
    for (int i = 1000; i < 6000; ++i) logits[static_cast<size_t>(i)] = 60.0f;
    {
      DeviceLogits d(gpu, logits);
      EXPECT_EQ(one(gpu, d, params(0, 0, 1, 0)), 1000);
      for (int32_t id : many(gpu, logits, params(1.0f, 1, 1, 0), {}, 20))
        ASSERT_EQ(id, 1000) << "top-k 1 among 5000 tied, vocab " << V;
      std::set<int32_t> seen;
      for (int32_t id : many(gpu, logits, params(1.0f, 2, 1, 0), {}, 100)) seen.insert(id);
      EXPECT_EQ(seen, (std::set<int32_t>{1000, 1001})) << "top-k 2 among 5000 tied";
      for (int32_t id : many(gpu, logits, params(1.0f, 0, 1e-6f, 0), {}, 20)) ASSERT_EQ(id, 1000) << "top-p 1e-6 among 5000 tied";
      // Half of the mass: the first 2500 or 2501 of them (the two ids at 50 add a little).
      for (int32_t id : many(gpu, logits, params(1.0f, 0, 0.5f, 0), {}, 200))
        ASSERT_TRUE(id >= 1000 && id < 3502) << "top-p 0.5 of 5000 tied: " << id;
    }
  }
#endif
}

// A few steps down each path of the kernels (small enough to run under compute-sanitizer): every
// id drawn is a candidate of the host rules.
TEST(GpuSampler, EachPathDrawsCandidates) {
  QF_REQUIRE_GPU();
#ifdef QFORGE_HAVE_CUDA
  struct Setting {
    const char* what;
    float scale;
    SamplerParams p;
  };
  const Setting settings[] = {
      {"greedy with penalty", 2, params(0, 0, 1, 0, 1.2f)},
      {"sorted: top-k 40, top-p, min-p, penalty", 3, params(0.8f, 40, 0.95f, 0.05f, 1.1f)},
      {"sorted: top-p 0.9", 3, params(1.0f, 0, 0.9f, 0)},
      {"boundary bin: top-p 0.9, flat", 1, params(1.0f, 0, 0.9f, 0)},
      {"boundary bin: min-p 0.01, flat", 1, params(1.0f, 0, 1, 0.01f)},
      {"boundary bin: top-p 0.95 and min-p 0.001, flat", 1, params(1.0f, 0, 0.95f, 0.001f)},
      {"no cut: temperature only, penalty -1", 3, params(1.0f, 0, 1, 0, 1.1f, -1)},
      {"exact: top-k 6000, top-p 0.5", 1, params(1.0f, 6000, 0.5f, 0)},
      {"exact: top-k 6000, min-p 0.001", 1, params(1.0f, 6000, 1, 0.001f)},
  };
  CudaBackend gpu(0);
  const std::vector<int32_t> history = {3, 1, 4, 1, 5, 9, 2, 6};
  for (int64_t V : kVocabs)
    for (const auto& s : settings) {
      const auto logits = test::randn(static_cast<size_t>(V), 77, s.scale);
      std::set<int32_t> ok;
      for (const auto& [id, prob] : test::sampler_distribution(logits, s.p, history)) ok.insert(id);
      DeviceLogits d(gpu, logits);
      for (int i = 0; i < 3; ++i) {
        SamplerParams q = s.p;
        q.seed = static_cast<uint64_t>(i);
        const int32_t id = one(gpu, d, q, history);
        EXPECT_TRUE(ok.count(id)) << s.what << ", vocab " << V << ": drew " << id;
      }
    }
#endif
}

// Many draws from fixed logits against the probabilities the host rules give. The settings cover
// the sorted path (few candidates), the boundary-bin path (many, top-k off: flat logits,
// temperature only) and the exact-threshold path (top-k above 4096).
TEST(GpuSampler, DrawsFollowTheHostRules) {
  QF_REQUIRE_GPU();
#ifdef QFORGE_HAVE_CUDA
  struct Setting {
    const char* what;
    float scale, temperature;
    int top_k;
    float top_p, min_p;
  };
  const Setting settings[] = {
      {"top-k 40", 3, 1.0f, 40, 1, 0},
      {"top-p 0.9", 3, 1.0f, 0, 0.9f, 0},
      {"top-p 0.9, flat logits", 1, 1.0f, 0, 0.9f, 0},
      {"min-p 0.05", 2, 1.0f, 0, 1, 0.05f},
      {"min-p 0.01, flat logits", 1, 1.0f, 0, 1, 0.01f},
      {"top-k 40, top-p 0.95, min-p 0.05, T 0.8", 3, 0.8f, 40, 0.95f, 0.05f},
      {"T 0.5, top-k 100, top-p 0.9", 3, 0.5f, 100, 0.9f, 0},
      {"T 1.5, top-k 100, top-p 0.9, min-p 0.02", 3, 1.5f, 100, 0.9f, 0.02f},
      {"top-k 6000, top-p 0.5", 1, 1.0f, 6000, 0.5f, 0},
      {"top-k 6000", 1, 1.0f, 6000, 1, 0},
      {"temperature only", 3, 1.0f, 0, 1, 0},
      {"T 1.5, top-p 0.95, flat logits", 1, 1.5f, 0, 0.95f, 0},
  };
  CudaBackend gpu(0);
  for (int64_t V : kVocabs) {
    int seed = 100;
    for (const auto& s : settings) {
      const auto logits = test::randn(static_cast<size_t>(V), static_cast<uint64_t>(++seed), s.scale);
      const SamplerParams p = params(s.temperature, s.top_k, s.top_p, s.min_p, 1.0f, 64, static_cast<uint64_t>(seed));
      const auto want = test::sampler_distribution(logits, p, {});
      const auto got = many(gpu, logits, p, {}, 20000);
      std::printf("[ sampler  ] vocab %lld, %s: %zu candidates\n", static_cast<long long>(V), s.what, want.size());
      test::expect_draws_match(got, want, std::string(s.what) + ", vocab " + std::to_string(V));
    }
  }
#endif
}

// The penalty reads the device window; each step appends its id to it.
TEST(GpuSampler, RepetitionPenaltyUsesTheDeviceWindow) {
  QF_REQUIRE_GPU();
#ifdef QFORGE_HAVE_CUDA
  CudaBackend gpu(0);
  const int64_t V = 32000;
  auto logits = test::randn(static_cast<size_t>(V), 9, 1.0f);
  for (auto& l : logits) l -= 4.0f;  // mostly negative, so the penalty multiplies
  logits[10] = 1.5f;                  // positive ones are divided
  logits[20] = 1.2f;
  logits[30] = -1.0f;
  logits[40] = 1.4f;                  // outside the window: untouched
  const std::vector<int32_t> history = {40, 10, 20, 10, 30, 10};
  SamplerParams p = params(1.0f, 50, 0.95f, 0.0f, 1.3f, 5);  // the window: 10 20 10 30 10
  const auto want = test::sampler_distribution(logits, p, history);
  const auto plain = test::sampler_distribution(logits, params(1.0f, 50, 0.95f, 0.0f), history);
  ASSERT_NE(want[0].first, plain[0].first) << "the test's penalty should change the top id";
  // The same window each time, a fresh random stream per draw.
  p.seed = 1000;
  test::expect_draws_match(many(gpu, logits, p, history, 20000), want, "repetition penalty 1.3 over the last 5 ids");
  // Along a sequence each id joins the window (the last 8, or all of them): the host sampler,
  // sorted path, draws the same ids from the same stream.
  DeviceLogits d(gpu, logits);
  for (int last_n : {8, -1}) {
    p = params(1.0f, 50, 0.95f, 0.0f, 1.3f, last_n, 5);
    const auto ids = sequence(gpu, d, p, history, 20);
    std::vector<int32_t> h = history, host;
    Sampler hs(p);
    for (int i = 0; i < 20; ++i) {
      auto row = logits;
      host.push_back(hs.sample(row, h));
      h.push_back(host.back());
    }
    EXPECT_EQ(ids, host) << "repeat_last_n " << last_n;
  }
#endif
}

// Many rows in one call, each with its own parameters and history (CudaBackend::sample_rows):
// every row draws what the one-sequence device sampler draws from the same state. Greedy rows and
// the sorted path (top-k at most 4096 ids) also draw the host Sampler's id, from the same random
// number (the boundary-bin and exact-threshold paths order their candidates otherwise, so the same
// number may pick another id of the same distribution).
TEST(GpuSampler, RowsDrawAsOneSequenceAndAsTheHost) {
  QF_REQUIRE_GPU();
#ifdef QFORGE_HAVE_CUDA
  CudaBackend gpu(0);
  const SamplerParams kinds[] = {
      params(0, 0, 1, 0),                    // greedy
      params(0, 0, 1, 0, 1.3f),              // greedy with a penalty
      params(0.8f, 40, 0.95f, 0.05f, 1.1f),  // sorted
      params(1.0f, 0, 0.9f, 0),              // boundary bin (flat logits below)
      params(1.0f, 6000, 0.5f, 0),           // exact thresholds
      params(1.2f, 100, 0.9f, 0.02f, 1.2f, -1),
  };
  for (int64_t V : kVocabs) {
    const int64_t R = 48;
    std::vector<float> logits;
    std::vector<SamplerParams> ps;
    std::vector<std::vector<int32_t>> hist;
    for (int64_t r = 0; r < R; ++r) {
      const SamplerParams& k = kinds[r % 6];
      const auto row = test::randn(static_cast<size_t>(V), 500 + static_cast<uint64_t>(r), r % 6 == 3 || r % 6 == 4 ? 1.0f : 3.0f);
      logits.insert(logits.end(), row.begin(), row.end());
      ps.push_back(k);
      ps.back().seed = 1000 + static_cast<uint64_t>(r);
      std::vector<int32_t> h;
      for (int64_t i = 0; i < 5 + r; ++i) h.push_back(static_cast<int32_t>((r * 7919 + i * 104729) % V));
      hist.push_back(h);
    }
    std::vector<SampleRow> rows;
    for (int64_t r = 0; r < R; ++r)
      rows.push_back({&ps[static_cast<size_t>(r)], hist[static_cast<size_t>(r)].data(),
                      static_cast<int64_t>(hist[static_cast<size_t>(r)].size())});
    DeviceBuffer d = gpu.alloc(logits.size());
    gpu.upload(d.data(), logits.data(), logits.size());
    std::vector<int32_t> ids(static_cast<size_t>(R));
    gpu.sample_rows(d.data(), V, rows, ids.data());
    int same_host = 0, comparable = 0;
    for (int64_t r = 0; r < R; ++r) {
      std::vector<float> row(logits.begin() + r * V, logits.begin() + (r + 1) * V);
      DeviceLogits one_row(gpu, row);
      EXPECT_EQ(ids[static_cast<size_t>(r)], one(gpu, one_row, ps[static_cast<size_t>(r)], hist[static_cast<size_t>(r)]))
          << "row " << r << ", vocab " << V;
      const int kind = static_cast<int>(r % 6);
      if (kind == 3 || kind == 4) continue;  // boundary bin, exact thresholds
      ++comparable;
      same_host += ids[static_cast<size_t>(r)] == Sampler(ps[static_cast<size_t>(r)]).sample(row, hist[static_cast<size_t>(r)]);
    }
    std::printf("[ sampler  ] vocab %lld: %d of %d greedy and sorted-path rows drew the host sampler's id\n",
                static_cast<long long>(V), same_host, comparable);
    EXPECT_GE(same_host, comparable - 1) << "vocab " << V;  // one may sit on a boundary within rounding
  }
#endif
}

// One seed, one sequence: the same again, another seed differs; and the draw recorded in a graph
// (Backend::capture of sample_staged) replays to the eager draw's id.
TEST(GpuSampler, SeedReproducesAndGraphReplayMatchesEager) {
  QF_REQUIRE_GPU();
#ifdef QFORGE_HAVE_CUDA
  CudaBackend gpu(0);
  for (int64_t V : kVocabs) {
    DeviceLogits d(gpu, test::randn(static_cast<size_t>(V), 21, 2.0f));
    const std::vector<int32_t> history = {1, 2, 3};
    for (const SamplerParams& p : {params(0.8f, 40, 0.95f, 0.05f, 1.1f, 16, 42), params(1.0f, 0, 0.9f, 0.0f, 1.0f, 64, 42),
                                   params(1.0f, 0, 1.0f, 0.0f, 1.2f, -1, 42)}) {
      const auto a = sequence(gpu, d, p, history, 100);
      EXPECT_EQ(sequence(gpu, d, p, history, 100), a) << "same seed, vocab " << V;
      SamplerParams q = p;
      q.seed = 43;
      EXPECT_NE(sequence(gpu, d, q, history, 100), a) << "another seed";
      const std::vector<SampleRow> row = {{&p, history.data(), static_cast<int64_t>(history.size())}};
      d.reset();
      gpu.stage_sampling(row, V);
      gpu.sample_staged(d.buf.data());
      int32_t eager = -7, replayed = -7;
      gpu.fetch_sampled(&eager);
      EXPECT_EQ(eager, a[0]);
      auto g = gpu.capture([&] { gpu.sample_staged(d.buf.data()); });
      ASSERT_TRUE(g);
      d.reset();  // the penalty changed the logits in place
      gpu.stage_sampling(row, V);  // the draw counted itself: a replay is staged as every engine step is
      g->replay();
      gpu.fetch_sampled(&replayed);
      EXPECT_EQ(replayed, eager) << "graph replay, vocab " << V;
    }
  }
#endif
}

// Generation with sampling on: the graph and the eager device path give the same tokens for a
// seed, and top-k 1 gives the CPU's greedy tokens.
TEST(GpuSampler, GenerateSamplesOnTheDeviceWithAndWithoutGraph) {
  QF_REQUIRE_GPU();
  QF_REQUIRE_DATA("models/stories260K-hf/model.safetensors");
#ifdef QFORGE_HAVE_CUDA
  const auto dir = test::data_dir() / "models/stories260K-hf";
  auto run = [&](Backend& b, const SamplerParams& p, bool graph) {
    auto m = Model::load(dir, b);
    GenerateOptions opt;
    opt.max_tokens = 150;
    opt.stop_at_eos = false;
    opt.use_graph = graph;
    opt.sampling = p;
    std::vector<int32_t> ids;
    const GenerateStats st = generate(*m, {1, 403, 407}, opt, [&](int32_t id) {
      ids.push_back(id);
      return true;
    });
    if (graph && b.name().rfind("cpu", 0) != 0) EXPECT_GT(st.graph_steps, 100) << "decode steps from the engine's graphs";
    if (!graph) EXPECT_EQ(st.graph_steps, 0);
    return ids;
  };
  CudaBackend gpu(0);
  const SamplerParams p = params(0.8f, 40, 0.95f, 0.05f, 1.1f, 64, 7);
  const auto with_graph = run(gpu, p, true);
  ASSERT_EQ(with_graph.size(), 150u);
  EXPECT_EQ(run(gpu, p, false), with_graph);
  SamplerParams other = p;
  other.seed = 8;
  EXPECT_NE(run(gpu, other, true), with_graph);
  CpuBackend cpu;
  const auto greedy = run(cpu, params(0, 40, 1, 0), false);
  EXPECT_EQ(run(gpu, params(1.0f, 1, 0.9f, 0.0f, 1.0f, 64, 3), true), greedy) << "top-k 1 is greedy";
  EXPECT_EQ(run(gpu, params(0, 40, 1, 0), false), greedy) << "greedy, eager on the device";
#endif
}

// Time per token from a captured graph of 20 steps (no launch gaps), at both vocabulary sizes.
TEST(GpuSampler, TimePerToken) {
  QF_REQUIRE_GPU();
#ifdef QFORGE_HAVE_CUDA
  struct Setting {
    const char* what;
    float scale;
    SamplerParams p;
  };
  const Setting settings[] = {
      {"greedy (argmax kernel)", 3, params(0, 40, 1, 0)},
      {"defaults: T 0.8, top-k 40, top-p 0.95, min-p 0.05, penalty 1.1/64", 3, params(0.8f, 40, 0.95f, 0.05f, 1.1f)},
      {"top-k 40", 3, params(1.0f, 40, 1, 0)},
      {"top-p 0.95 (top-k 0), peaked logits", 3, params(1.0f, 0, 0.95f, 0)},
      {"top-p 0.95 (top-k 0), flat logits", 1, params(1.0f, 0, 0.95f, 0)},
      {"top-k 6000 (exact thresholds, one block)", 1, params(1.0f, 6000, 1, 0)},
      {"min-p 0.05 (top-k 0)", 3, params(1.0f, 0, 1.0f, 0.05f)},
      {"temperature only", 3, params(1.0f, 0, 1.0f, 0)},
  };
  CudaBackend gpu(0);
  for (int64_t V : kVocabs)
    for (const auto& s : settings) {
      DeviceLogits d(gpu, test::randn(static_cast<size_t>(V), 5, s.scale));
      const std::vector<int32_t> history = {1, 2, 3};
      gpu.stage_sampling({{&s.p, history.data(), 3}}, V);
      gpu.sample_staged(d.buf.data());  // warm-up: sizes the scratch
      auto g = gpu.capture([&] {
        for (int i = 0; i < 20; ++i) gpu.sample_staged(d.buf.data());
      });
      ASSERT_TRUE(g);
      g->replay();  // warm-up
      gpu.synchronize();
      const int reps = 50;
      const auto t0 = std::chrono::steady_clock::now();
      for (int r = 0; r < reps; ++r) g->replay();
      gpu.synchronize();
      const double us =
          std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() / (reps * 20);
      std::printf("[ sampler  ] vocab %lld, %s: %.1f us/token\n", static_cast<long long>(V), s.what, us);
      EXPECT_LT(us, 1000.0) << s.what;
    }
#endif
}

}  // namespace
}  // namespace qf
