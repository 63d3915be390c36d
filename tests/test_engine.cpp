// Many sequences in one forward pass (issue 10) on the CPU: paged attention against the contiguous
// cache's attention, and the engine's batched greedy decoding against each prompt decoded alone.
#include <algorithm>
#include <numeric>
#include <random>

#include "backends/cpu/cpu_backend.h"
#include "engine/engine.h"
#include "model/model.h"
#include "runtime/perplexity.h"
#include "tokenizer/tokenizer.h"
#include "test_util.h"

namespace qf {
namespace {

// Paged attention over shuffled block tables equals naive attention over each sequence's own
// history, for prefill chunks and single tokens of sequences of different lengths (GQA, and a
// sliding window).
TEST(PagedAttention, ManySequencesMatchNaiveAttention) {
  CpuBackend cpu(2);
  for (int64_t window : {0, 7}) {
    AttentionParams p;
    p.n_heads = 4;
    p.n_kv_heads = 2;
    p.head_dim = 8;
    p.scale = 0.35f;
    p.sliding_window = window;
    const int64_t qd = p.n_heads * p.head_dim, kvd = p.n_kv_heads * p.head_dim, bs = 4, blocks = 32;
    auto paged = cpu.make_paged_kv_cache(2, p.n_kv_heads, p.head_dim, blocks, bs, KVFormat::Full);
    // Three sequences: each is fed in two steps (a chunk, then a chunk or one token).
    const std::vector<std::pair<int64_t, int64_t>> steps[2] = {{{5, 0}, {9, 0}, {1, 0}}, {{1, 5}, {6, 9}, {1, 1}}};
    std::vector<std::vector<int32_t>> tables(3);
    std::vector<int32_t> ids(blocks);
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), std::mt19937(3));
    for (int s = 0; s < 3; ++s) tables[static_cast<size_t>(s)].assign(ids.begin() + s * 8, ids.begin() + s * 8 + 8);
    // Each sequence's keys and values so far, per layer: [layer][sequence] -> [position][kvd].
    std::vector<std::vector<float>> k_hist[2] = {std::vector<std::vector<float>>(3), std::vector<std::vector<float>>(3)},
                                    v_hist[2] = {std::vector<std::vector<float>>(3), std::vector<std::vector<float>>(3)};
    for (int st = 0; st < 2; ++st) {
      std::vector<BatchSeq> seqs;
      int64_t rows = 0;
      for (int s = 0; s < 3; ++s) {
        const auto [n, pos0] = steps[st][static_cast<size_t>(s)];
        seqs.push_back({rows, n, pos0, tables[static_cast<size_t>(s)].data(), 8});
        rows += n;
      }
      const auto q = test::randn(static_cast<size_t>(rows * qd), 10 + st), k = test::randn(static_cast<size_t>(rows * kvd), 20 + st),
                 v = test::randn(static_cast<size_t>(rows * kvd), 30 + st);
      for (int64_t layer = 0; layer < 2; ++layer) {
        std::vector<float> got(static_cast<size_t>(rows * qd)), want(got.size());
        cpu.paged_attention(q.data(), k.data(), v.data(), *paged, layer, seqs, p, got.data());
        for (size_t s = 0; s < 3; ++s) {
          const BatchSeq& b = seqs[s];
          auto& kh = k_hist[layer][s];
          auto& vh = v_hist[layer][s];
          kh.insert(kh.end(), k.begin() + b.first_row * kvd, k.begin() + (b.first_row + b.rows) * kvd);
          vh.insert(vh.end(), v.begin() + b.first_row * kvd, v.begin() + (b.first_row + b.rows) * kvd);
          for (int64_t t = 0; t < b.rows; ++t)
            test::naive_attention(q.data() + (b.first_row + t) * qd, kh, vh, b.pos0 + t, p,
                                  want.data() + (b.first_row + t) * qd);
        }
        for (size_t i = 0; i < got.size(); ++i) ASSERT_NEAR(got[i], want[i], 1e-5) << "step " << st << " layer " << layer << " " << i;
      }
    }
  }
}

void expect_batched_equals_alone(const char* model_dir, const EngineOptions& opt, int n_new, bool expect_preemption,
                                 const SamplerParams* sampling = nullptr) {
  const std::string rel = std::string("models/") + model_dir;
  if (!test::has_data(rel)) GTEST_SKIP() << "no " << rel << " (../shared absent)";
  CpuBackend cpu(2);
  auto model = Model::load(test::data_dir() / rel, cpu);
  test::expect_engine_batch_equals_alone(*model, Tokenizer::load(test::data_dir() / rel), opt, n_new, expect_preemption,
                                         sampling);
}

// 80 positions for 8 prompts of ~10 tokens + 40 new, arriving in chunks: preemption.
EngineOptions preempting_options() {
  EngineOptions opt;
  opt.num_blocks = 10;
  opt.block_size = 8;
  opt.token_budget = 7;
  opt.max_running = 8;
  opt.max_context = 128;
  return opt;
}

TEST(Engine, EightPromptsInOneBatchDecodeAsAlone) {
  expect_batched_equals_alone("stories260K-hf", test::one_batch_options(), 40, false);
}

TEST(Engine, ChunkedPrefillAndPreemptionDecodeAsAlone) {
  expect_batched_equals_alone("stories260K-hf", preempting_options(), 40, true);
}

// Sampling draws from (seed, tokens so far): in a batch, after chunked prefill and after a
// preemption's recompute, each sequence gets the tokens generate() gives it alone.
TEST(Engine, SampledPromptsInOneBatchDrawAsAlone) {
  const SamplerParams s = test::story_sampling();
  expect_batched_equals_alone("stories260K-hf", test::one_batch_options(), 40, false, &s);
}

TEST(Engine, SampledPromptsSurvivePreemption) {
  const SamplerParams s = test::story_sampling();
  expect_batched_equals_alone("stories260K-hf", preempting_options(), 40, true, &s);
}

// Backend::sample_rows (here the host default) draws row i exactly as a Sampler with row i's
// parameters and history would, each row by its own rules.
TEST(Engine, SampleRowsTakesEachRowsOwnParameters) {
  CpuBackend cpu(1);
  const int64_t V = 5000, R = 6;
  const auto logits = test::randn(static_cast<size_t>(V * R), 3, 3.0f);
  std::vector<SamplerParams> params(R);
  params[0].temperature = 0;                      // greedy
  params[1].temperature = 0, params[1].repeat_penalty = 1.5f;  // greedy with a penalty
  params[2].top_k = 1;                            // top-1 sampling
  params[3].temperature = 1.2f, params[3].top_k = 0, params[3].min_p = 0;
  params[4].top_p = 0.5f, params[4].seed = 99;
  params[5].repeat_penalty = 1.3f, params[5].repeat_last_n = -1, params[5].seed = 5;
  std::vector<std::vector<int32_t>> histories(R);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t i = 0; i < 10 + r; ++i) histories[static_cast<size_t>(r)].push_back(static_cast<int32_t>((r * 131 + i * 17) % V));
  std::vector<SampleRow> rows;
  for (int64_t r = 0; r < R; ++r)
    rows.push_back({&params[static_cast<size_t>(r)], histories[static_cast<size_t>(r)].data(),
                    static_cast<int64_t>(histories[static_cast<size_t>(r)].size())});
  auto work = logits;
  std::vector<int32_t> ids(R);
  cpu.sample_rows(work.data(), V, rows, ids.data());
  for (int64_t r = 0; r < R; ++r) {
    std::vector<float> row(logits.begin() + r * V, logits.begin() + (r + 1) * V);
    EXPECT_EQ(ids[static_cast<size_t>(r)], Sampler(params[static_cast<size_t>(r)]).sample(row, histories[static_cast<size_t>(r)]))
        << "row " << r;
  }
  EXPECT_EQ(ids[0], argmax(logits.data(), V));
  // All greedy: the argmax path.
  std::vector<SampleRow> greedy(3, rows[0]);
  work = logits;
  cpu.sample_rows(work.data(), V, greedy, ids.data());
  for (int64_t r = 0; r < 3; ++r) EXPECT_EQ(ids[static_cast<size_t>(r)], argmax(logits.data() + r * V, V));
}

TEST(Engine, TestModelBatchDecodesAsAlone) {
  EngineOptions opt;
  opt.num_blocks = 48;
  opt.block_size = 16;
  opt.token_budget = 128;
  opt.max_running = 8;
  opt.max_context = 128;
  expect_batched_equals_alone("testmodel-llama-20m", opt, 16, false);
}

TEST(Engine, RejectsWhatDoesNotFit) {
  if (!test::has_data("models/stories260K-hf")) GTEST_SKIP() << "no stories260K-hf (../shared absent)";
  CpuBackend cpu(1);
  auto model = Model::load(test::data_dir() / "models/stories260K-hf", cpu);
  EngineOptions opt;
  opt.num_blocks = 4;
  opt.block_size = 8;
  opt.max_context = 32;
  Engine engine(*model, opt);
  SamplerParams greedy;
  greedy.temperature = 0;
  test::expect_error([&] { engine.add({1, std::vector<int32_t>(30, 1), 8, {}}, greedy); }, "exceed the context of 32");
  test::expect_error([&] { engine.add({2, {1, 999999}, 8, {}}, greedy); }, "outside the vocabulary");
  EXPECT_FALSE(engine.step());
}

// What a step was, as the concurrency benchmark reads it: a 10-token prompt in chunks of 4, 4 and 2
// (prompt tokens, not decode steps), then one decode step per further token.
TEST(Engine, ReportsPromptTokensAndDecodeSteps) {
  if (!test::has_data("models/stories260K-hf")) GTEST_SKIP() << "no stories260K-hf (../shared absent)";
  CpuBackend cpu(1);
  auto model = Model::load(test::data_dir() / "models/stories260K-hf", cpu);
  EngineOptions opt;
  opt.num_blocks = 8;
  opt.block_size = 8;
  opt.token_budget = 4;
  opt.max_running = 2;
  opt.max_context = 32;
  Engine engine(*model, opt);
  SamplerParams greedy;
  greedy.temperature = 0;
  std::vector<int32_t> prompt;
  for (int32_t t = 1; t <= 10; ++t) prompt.push_back(t * 7);
  engine.add({1, prompt, 6, {}}, greedy);
  std::vector<int64_t> prefill;
  int64_t decode_steps = 0;
  while (engine.step()) {
    if (engine.last_step_decode_only()) {
      ++decode_steps;
      EXPECT_EQ(engine.last_step_prefill_tokens(), 0);
    } else {
      prefill.push_back(engine.last_step_prefill_tokens());
    }
  }
  EXPECT_EQ(prefill, (std::vector<int64_t>{4, 4, 2}));
  EXPECT_EQ(decode_steps, 5);  // the first of the 6 new tokens comes with the last prompt chunk
}

// Perplexity with several windows in one forward pass equals the unbatched value.
TEST(Engine, BatchedPerplexityEqualsUnbatched) {
  QF_REQUIRE_DATA("models/stories260K-hf/model.safetensors");
  if (!test::has_data("text/heldout/heldout.txt")) GTEST_SKIP() << "no heldout.txt";
  CpuBackend cpu(2);
  auto model = Model::load(test::data_dir() / "models/stories260K-hf", cpu);
  const Tokenizer tok = Tokenizer::load(test::data_dir() / "models/stories260K-hf");
  const std::string text = test::slurp(test::data_dir() / "text/heldout/heldout.txt").substr(0, 20000);
  const auto ids = tok.encode(text, false);
  const PerplexityResult one = perplexity(*model, ids, 128, 12);
  for (int64_t batch : {1, 4, 5}) {
    const PerplexityResult many = perplexity_batched(*model, ids, 128, batch, 12);
    EXPECT_EQ(many.windows, one.windows);
    EXPECT_EQ(many.tokens_scored, one.tokens_scored);
    EXPECT_NEAR(many.ppl, one.ppl, 1e-5 * one.ppl) << batch << " windows per batch";
  }
}

// 8- and 4-bit caches (groups of 32 with one scale) keep perplexity within 1% and 3% of the full
// cache on testmodel-llama-20m.
TEST(Engine, QuantizedCachePerplexity) {
  QF_REQUIRE_DATA("models/testmodel-llama-20m/config.json");
  if (!test::has_data("text/heldout/heldout.txt")) GTEST_SKIP() << "no heldout.txt";
  CpuBackend cpu(2);
  auto model = Model::load(test::data_dir() / "models/testmodel-llama-20m", cpu);
  const Tokenizer tok = Tokenizer::load(test::data_dir() / "models/testmodel-llama-20m");
  const std::string text = test::slurp(test::data_dir() / "text/heldout/heldout.txt").substr(0, 60000);
  const auto ids = tok.encode(text, false);
  const double full = perplexity_batched(*model, ids, 256, 4, 16, KVFormat::Full).ppl;
  const double q8 = perplexity_batched(*model, ids, 256, 4, 16, KVFormat::Q8).ppl;
  const double q4 = perplexity_batched(*model, ids, 256, 4, 16, KVFormat::Q4).ppl;
  std::printf("perplexity with the full cache %.4f, q8 %.4f (%+.3f%%), q4 %.4f (%+.3f%%)\n", full, q8,
              100 * (q8 / full - 1), q4, 100 * (q4 / full - 1));
  EXPECT_LT(std::fabs(q8 / full - 1), 0.01);
  EXPECT_LT(std::fabs(q4 / full - 1), 0.03);
}

// The quantized rows round-trip within half a step of their group's scale.
TEST(Engine, KVRowQuantization) {
  const auto x = test::randn(128, 5);
  for (KVFormat f : {KVFormat::Q8, KVFormat::Q4}) {
    std::vector<uint8_t> codes(static_cast<size_t>(128 * kv_bits(f) / 8));
    std::vector<float> scales(4), back(128);
    kv_quantize_row(x.data(), 128, f, codes.data(), scales.data());
    kv_dequantize_row(codes.data(), scales.data(), 128, f, back.data());
    for (size_t i = 0; i < x.size(); ++i) EXPECT_LE(std::fabs(back[i] - x[i]), 0.5f * scales[i / 32] + 1e-6f) << i;
  }
  EXPECT_EQ(kv_row_bytes(KVFormat::Q4, 128), 64 + 16);
  test::expect_error([] { parse_kv_format("q5"); }, "unknown KV cache type 'q5'");
}

}  // namespace
}  // namespace qf
