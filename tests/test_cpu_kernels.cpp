// CPU kernels against naive reference loops, and the sampler's rules.
#include <algorithm>
#include <cmath>
#include <random>

#include "backends/cpu/cpu_backend.h"
#include "backends/cpu/cpu_linear.h"
#include "core/dtype.h"
#include "core/error.h"
#include "backends/sampler.h"
#include "test_util.h"

namespace qf {
namespace {

using test::randn;

TEST(DType, HalfAndBf16Conversions) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = fp16_to_f32(static_cast<uint16_t>(h));
    if (std::isnan(f)) continue;
    EXPECT_EQ(f32_to_fp16(f), h) << h;
  }
  EXPECT_EQ(f32_to_fp16(65520.f), 0x7c00);  // rounds to inf
  EXPECT_EQ(f32_to_fp16(1.0f + 1.0f / 2048), 0x3c00);  // tie to even
  EXPECT_FLOAT_EQ(bf16_to_f32(f32_to_bf16(3.140625f)), 3.140625f);
}

class DenseLinear : public ::testing::TestWithParam<std::tuple<DType, int64_t, int64_t, int64_t>> {};

TEST_P(DenseLinear, MatchesNaive) {
  const auto [dt, in, out, rows] = GetParam();
  auto wf = randn(static_cast<size_t>(in * out), 1);
  auto x = randn(static_cast<size_t>(in * rows), 2);
  std::vector<uint16_t> w16(wf.size());
  for (size_t i = 0; i < wf.size(); ++i) {
    w16[i] = dt == DType::F16 ? f32_to_fp16(wf[i]) : f32_to_bf16(wf[i]);
    if (dt != DType::F32) wf[i] = dt == DType::F16 ? fp16_to_f32(w16[i]) : bf16_to_f32(w16[i]);
  }
  auto bias = randn(static_cast<size_t>(out), 3);
  LinearWeight lw;
  lw.name = "t";
  lw.in_features = in;
  lw.out_features = out;
  lw.weight.dtype = dt;
  lw.weight.shape = {out, in};
  lw.weight.data = dt == DType::F32 ? static_cast<const void*>(wf.data()) : w16.data();
  TensorView bv;
  bv.dtype = DType::F32;
  bv.shape = {out};
  bv.data = bias.data();
  lw.bias = bv;
  CpuBackend cpu(2);
  auto lin = cpu.make_linear(lw);
  std::vector<float> y(static_cast<size_t>(rows * out));
  cpu.linear(*lin, x.data(), y.data(), rows);
  for (int64_t t = 0; t < rows; ++t)
    for (int64_t o = 0; o < out; ++o) {
      double ref = bias[static_cast<size_t>(o)];
      for (int64_t i = 0; i < in; ++i) ref += double(wf[o * in + i]) * x[t * in + i];
      ASSERT_NEAR(y[t * out + o], ref, 1e-3 * (1 + std::abs(ref))) << t << "," << o;
    }
}

INSTANTIATE_TEST_SUITE_P(Shapes, DenseLinear,
                         ::testing::Combine(::testing::Values(DType::F32, DType::F16, DType::BF16),
                                            ::testing::Values(8, 64, 172), ::testing::Values(5, 64, 130),
                                            ::testing::Values(1, 3, 33)));

TEST(CpuOps, AttentionMatchesNaiveWithGqaAndWindow) {
  CpuBackend cpu(2);
  const int64_t H = 4, KV = 2, D = 8, T = 9;
  for (int64_t window : {0, 3}) {
    auto cache = cpu.make_sequence_cache(1, KV, D, 16);
    auto q = randn(T * H * D, 4), k = randn(T * KV * D, 5), v = randn(T * KV * D, 6);
    AttentionParams p{H, KV, D, 0.35f, window};
    std::vector<float> out(T * H * D);
    // Prefill 4 then 5 more, as a generator would.
    test::attend_one_sequence(cpu, *cache, q.data(), k.data(), v.data(), 0, 0, 4, p, out.data());
    test::attend_one_sequence(cpu, *cache, q.data() + 4 * H * D, k.data() + 4 * KV * D, v.data() + 4 * KV * D, 0, 4, 5,
                              p, out.data() + 4 * H * D);
    std::vector<float> want(H * D);
    for (int64_t t = 0; t < T; ++t) {
      test::naive_attention(q.data() + t * H * D, k, v, t, p, want.data());
      for (int64_t i = 0; i < H * D; ++i) ASSERT_NEAR(out[t * H * D + i], want[i], 1e-4) << "window " << window << " row " << t;
    }
  }
}

TEST(CpuOps, RmsNormRopeSiluMul) {
  CpuBackend cpu(2);
  auto x = randn(3 * 16, 7), w = randn(16, 8);
  std::vector<float> y(x.size());
  cpu.rmsnorm(x.data(), w.data(), y.data(), 3, 16, 1e-5f);
  for (int r = 0; r < 3; ++r) {
    double ss = 0;
    for (int i = 0; i < 16; ++i) ss += x[r * 16 + i] * x[r * 16 + i];
    const double inv = 1 / std::sqrt(ss / 16 + 1e-5);
    for (int i = 0; i < 16; ++i) ASSERT_NEAR(y[r * 16 + i], x[r * 16 + i] * inv * w[i], 1e-5);
  }
  RopeTables t;
  t.max_pos = 8;
  t.half_dim = 2;
  for (int p = 0; p < 8; ++p)
    for (int i = 0; i < 2; ++i) {
      t.cos.push_back(std::cos(p * (i + 1) * 0.1f));
      t.sin.push_back(std::sin(p * (i + 1) * 0.1f));
    }
  cpu.set_rope_tables(t);
  std::vector<float> q = {1, 2, 3, 4}, k = {5, 6, 7, 8};
  cpu.rope(q.data(), k.data(), 1, 1, 1, 4, 3);
  const float c0 = std::cos(0.3f), s0 = std::sin(0.3f), c1 = std::cos(0.6f), s1 = std::sin(0.6f);
  EXPECT_NEAR(q[0], 1 * c0 - 3 * s0, 1e-6);
  EXPECT_NEAR(q[2], 3 * c0 + 1 * s0, 1e-6);
  EXPECT_NEAR(q[1], 2 * c1 - 4 * s1, 1e-6);
  EXPECT_NEAR(k[3], 8 * c1 + 6 * s1, 1e-6);
  std::vector<float> g = {-1, 0, 2}, u = {2, 3, 4}, o(3);
  cpu.silu_mul(g.data(), u.data(), o.data(), 3);
  EXPECT_NEAR(o[0], -1 / (1 + std::exp(1.0)) * 2, 1e-6);
  EXPECT_NEAR(o[2], 2 / (1 + std::exp(-2.0)) * 4, 1e-6);
}

TEST(Sampler, GreedyTopKMinPAndSeed) {
  std::vector<float> logits = {1, 5, 3, 4.9f};
  SamplerParams p;
  p.temperature = 0;
  Sampler greedy(p);
  auto l = logits;
  EXPECT_EQ(greedy.sample(l, {}), 1);
  p.repeat_penalty = 2;  // 5 -> 2.5, so 4.9 wins
  Sampler pen(p);
  l = logits;
  EXPECT_EQ(pen.sample(l, {1}), 3);
  p = SamplerParams{};
  p.temperature = 1;
  p.top_k = 1;
  Sampler k1(p);
  for (int i = 0; i < 20; ++i) {
    l = logits;
    EXPECT_EQ(k1.sample(l, {}), 1);
  }
  p.top_k = 0;
  p.top_p = 1;
  p.min_p = 0.5f;  // only ids 1 and 3 are within half of the top probability
  Sampler mp(p);
  for (int i = 0; i < 50; ++i) {
    l = logits;
    const int id = mp.sample(l, {});
    EXPECT_TRUE(id == 1 || id == 3) << id;
  }
  p.min_p = 0;
  p.seed = 42;
  // A draw is a function of (seed, history length): the same for any sampler object, and the
  // draws along a growing history are not all one id.
  Sampler a(p), b(p);
  std::vector<int32_t> history, seen;
  for (int i = 0; i < 40; ++i) {
    auto la = logits, lb = logits;
    const int32_t id = a.sample(la, history);
    EXPECT_EQ(id, b.sample(lb, history));
    seen.push_back(id);
    history.push_back(-1);  // outside the vocabulary: no penalty, only the count grows
  }
  std::sort(seen.begin(), seen.end());
  EXPECT_GT(std::unique(seen.begin(), seen.end()) - seen.begin(), 1);
  EXPECT_NE(sample_random_bits(42, 0), sample_random_bits(42, 1));
  EXPECT_NE(sample_random_bits(42, 0), sample_random_bits(43, 0));
}

// The host sampler draws from the distribution its rules give (test::sampler_distribution, which
// the GPU sampler's tests compare against too).
TEST(Sampler, DrawsFollowTheRules) {
  const auto logits = test::randn(1000, 7, 2.5f);
  const std::vector<int32_t> history = {5, 9, 5, 700, 33};
  struct Case {
    const char* what;
    float temperature, top_p, min_p, penalty;
    int top_k;
  };
  const Case cases[] = {{"top-k", 1.0f, 1.0f, 0.0f, 1.0f, 40},      {"top-p", 1.0f, 0.9f, 0.0f, 1.0f, 0},
                        {"min-p", 0.7f, 1.0f, 0.05f, 1.0f, 0},      {"all", 0.8f, 0.95f, 0.05f, 1.0f, 40},
                        {"penalty", 1.5f, 0.9f, 0.0f, 1.3f, 100},   {"temperature", 1.0f, 1.0f, 0.0f, 1.0f, 0}};
  for (const auto& c : cases) {
    SamplerParams p;
    p.temperature = c.temperature;
    p.top_k = c.top_k;
    p.top_p = c.top_p;
    p.min_p = c.min_p;
    p.repeat_penalty = c.penalty;
    // Half the draws along one seed's stream (the history grows by ids the penalty skips), half
    // from as many seeds.
    std::vector<int32_t> draws, grown = history;
    for (int i = 0; i < 10000; ++i) {
      auto l = logits;
      p.seed = 11;
      draws.push_back(Sampler(p).sample(l, grown));
      grown.insert(grown.begin(), -1);  // older than the penalty's window of 64
      l = logits;
      p.seed = 1000 + static_cast<uint64_t>(i);
      draws.push_back(Sampler(p).sample(l, history));
    }
    test::expect_draws_match(draws, test::sampler_distribution(logits, p, history), c.what);
  }
}

TEST(Sampler, RejectsBadParams) {
  SamplerParams p;
  p.top_p = 0;
  EXPECT_THROW(Sampler{p}, Error);
  p = SamplerParams{};
  p.temperature = -1;
  EXPECT_THROW(Sampler{p}, Error);
}

}  // namespace
}  // namespace qf

#include "core/vec_math.h"
namespace qf {
namespace {
TEST(VecMath, MaxAndSumExpMatchLibm) {
  auto x = randn(1003, 9);
  for (auto& v : x) v *= 20;
  const float mx = max_f32(x.data(), 1003);
  EXPECT_EQ(mx, *std::max_element(x.begin(), x.end()));
  double ref = 0;
  for (float v : x) ref += std::exp(double(v) - mx);
  EXPECT_NEAR(sum_exp_f32(x.data(), 1003, mx), ref, 1e-5 * ref);
  std::vector<float> tiny = {-200.f, 0.f, -1.f};
  EXPECT_NEAR(sum_exp_f32(tiny.data(), 3, 0.f), 1 + std::exp(-1.0), 1e-6);
}
}  // namespace
}  // namespace qf

#include <atomic>
#include "core/thread_pool.h"
namespace qf {
namespace {
// Many short loops on an oversubscribed pool: every index must run exactly once per loop.
TEST(ThreadPool, EveryIndexExactlyOnceUnderContention) {
  ThreadPool pool(4);
  std::vector<std::atomic<int>> hits(97);
  for (int iter = 0; iter < 20000; ++iter) {
    const int64_t n = 1 + iter % 97;
    pool.parallel_for(n, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) hits[static_cast<size_t>(i)].fetch_add(1, std::memory_order_relaxed);
    });
  }
  for (int64_t i = 0; i < 97; ++i) {
    int expect = 0;
    for (int iter = 0; iter < 20000; ++iter) expect += (i < 1 + iter % 97);
    ASSERT_EQ(hits[static_cast<size_t>(i)].load(), expect) << i;
  }
}
}  // namespace
}  // namespace qf
