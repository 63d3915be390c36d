// Many sequences in one forward pass on the CUDA backend (issue 10): paged attention and batched
// RoPE against the CPU reference, block copies, and the engine's batched greedy decoding and
// batched perplexity against the one-sequence path. Skips without CUDA, a device or the shared
// test data (QFORGE_TEST_DATA can point at a copy).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "backends/cpu/cpu_backend.h"
#include "engine/engine.h"
#include "model/model.h"
#include "model/rope.h"
#include "runtime/perplexity.h"
#include "tokenizer/tokenizer.h"
#include "test_util.h"
#ifdef QFORGE_HAVE_CUDA
#include "backends/cuda/cuda_backend.h"
#endif

namespace qf {
namespace {

#ifdef QFORGE_HAVE_CUDA
bool have_gpu() { return cuda_device_count() > 0; }

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::max(m, std::fabs(static_cast<double>(a[i]) - b[i]));
  return m;
}
#endif

// Three sequences fed in two steps (prefill chunks long enough for the tensor-core kernel, short
// chunks and single tokens), block tables shuffled, GQA, head_dim 64 and 128, with and without a
// sliding window, fp16 and 8-/4-bit caches: the GPU's RoPE, cache writes and attention equal the
// CPU's (quantized alike); then a copied block (copy-on-write) reads back the same.
TEST(GpuPagedAttention, MatchesTheCpu) {
#ifndef QFORGE_HAVE_CUDA
  GTEST_SKIP() << "built without CUDA";
#else
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  CpuBackend cpu(2);
  CudaBackend gpu(0);
  for (KVFormat fmt : {KVFormat::Full, KVFormat::Q8, KVFormat::Q4})
  for (int64_t hd : {64, 128})
    for (int64_t window : {0, 23}) {
      SCOPED_TRACE(std::string(kv_format_name(fmt)) + " head_dim " + std::to_string(hd) + " window " + std::to_string(window));
      AttentionParams p;
      p.n_heads = 4;
      p.n_kv_heads = 2;
      p.head_dim = hd;
      p.scale = 1.0f / std::sqrt(static_cast<float>(hd));
      p.sliding_window = window;
      RopeConfig rc;
      const RopeTables rt = build_rope_tables(rc, hd, 256);
      cpu.set_rope_tables(rt);
      gpu.set_rope_tables(rt);
      const int64_t qd = p.n_heads * hd, kvd = p.n_kv_heads * hd, bs = 16, blocks = 40, per = 12;
      auto pc = cpu.make_paged_kv_cache(2, p.n_kv_heads, hd, blocks, bs, fmt);
      auto pg = gpu.make_paged_kv_cache(2, p.n_kv_heads, hd, blocks, bs, fmt);
      std::vector<int32_t> ids(blocks);
      std::iota(ids.begin(), ids.end(), 0);
      std::shuffle(ids.begin(), ids.end(), std::mt19937(7));
      std::vector<std::vector<int32_t>> tables(3);
      for (int s = 0; s < 3; ++s) tables[static_cast<size_t>(s)].assign(ids.begin() + s * per, ids.begin() + s * per + per);
      // (rows, pos0) per sequence and step.
      const std::vector<std::pair<int64_t, int64_t>> steps[2] = {{{40, 0}, {5, 0}, {1, 0}}, {{1, 40}, {33, 5}, {20, 1}}};
      for (int st = 0; st < 2; ++st) {
        std::vector<BatchSeq> seqs;
        int64_t rows = 0;
        for (int s = 0; s < 3; ++s) {
          const auto [n, pos0] = steps[st][static_cast<size_t>(s)];
          seqs.push_back({rows, n, pos0, tables[static_cast<size_t>(s)].data(), per});
          rows += n;
        }
        auto q = test::randn(static_cast<size_t>(rows * qd), 10 + st), k = test::randn(static_cast<size_t>(rows * kvd), 20 + st);
        const auto v = test::randn(static_cast<size_t>(rows * kvd), 30 + st);
        const auto q0 = q, k0 = k;  // before RoPE
        Batch batch;
        batch.tokens.assign(static_cast<size_t>(rows), 0);
        batch.seqs = seqs;
        gpu.prepare_batch(batch, *pg, 1);
        cpu.prepare_batch(batch, *pc, 1);
        // RoPE of both at every row's position.
        DeviceBuffer dq = gpu.alloc(q.size()), dk = gpu.alloc(k.size()), dv = gpu.alloc(v.size()), dout = gpu.alloc(q.size());
        gpu.upload(dq.data(), q.data(), q.size());
        gpu.upload(dk.data(), k.data(), k.size());
        gpu.upload(dv.data(), v.data(), v.size());
        gpu.rope_seqs(dq.data(), dk.data(), seqs, p.n_heads, p.n_kv_heads, hd);
        cpu.rope_seqs(q.data(), k.data(), seqs, p.n_heads, p.n_kv_heads, hd);
        std::vector<float> gq(q.size());
        gpu.download(gq.data(), dq.data(), gq.size());
        EXPECT_LT(max_abs_diff(gq, q), 1e-5) << "RoPE, step " << st;
        for (int64_t layer = 0; layer < 2; ++layer) {
          std::vector<float> want(q.size()), got(q.size());
          cpu.paged_attention(q.data(), k.data(), v.data(), *pc, layer, seqs, p, want.data());
          gpu.paged_attention(dq.data(), dk.data(), dv.data(), *pg, layer, seqs, p, dout.data());
          gpu.download(got.data(), dout.data(), got.size());
          // fp16 keys and values in the GPU's cache.
          EXPECT_LT(max_abs_diff(got, want), 4e-3) << "step " << st << " layer " << layer;
          // Launched as if a sequence were 1000 positions long (how a captured decode graph serves
          // every shorter batch): the same values.
          gpu.prepare_batch(batch, *pg, 1, 1000);
          gpu.paged_attention(dq.data(), dk.data(), dv.data(), *pg, layer, seqs, p, dout.data());
          gpu.download(got.data(), dout.data(), got.size());
          EXPECT_LT(max_abs_diff(got, want), 4e-3) << "min_len 1000, step " << st << " layer " << layer;
          gpu.prepare_batch(batch, *pg, 1);
          // RoPE folded into the store (rope_paged_attention) from the unrotated q and k.
          DeviceBuffer rq = gpu.alloc(q0.size()), rk = gpu.alloc(k0.size());
          gpu.upload(rq.data(), q0.data(), q0.size());
          gpu.upload(rk.data(), k0.data(), k0.size());
          gpu.rope_paged_attention(rq.data(), rk.data(), dv.data(), *pg, layer, seqs, p, dout.data());
          gpu.download(got.data(), dout.data(), got.size());
          EXPECT_LT(max_abs_diff(got, want), 4e-3) << "rope folded in, step " << st << " layer " << layer;
          std::vector<float> rotated(k.size());
          gpu.download(rotated.data(), rk.data(), rotated.size());
          EXPECT_LT(max_abs_diff(rotated, k), 1e-5) << "rotated keys, step " << st;
        }
      }
      // Copy-on-write: sequence 0's first block copied to a free block and its table pointed there.
      const int32_t spare = ids[static_cast<size_t>(3 * per)];
      gpu.copy_kv_blocks(*pg, {{tables[0][0], spare}});
      cpu.copy_kv_blocks(*pc, {{tables[0][0], spare}});
      tables[0][0] = spare;
      std::vector<BatchSeq> one{{0, 1, 41, tables[0].data(), per}};
      auto q = test::randn(static_cast<size_t>(qd), 40), k = test::randn(static_cast<size_t>(kvd), 41);
      const auto v = test::randn(static_cast<size_t>(kvd), 42);
      Batch one_batch;
      one_batch.tokens = {0};
      one_batch.seqs = one;
      gpu.prepare_batch(one_batch, *pg, 1);
      std::vector<float> want(q.size()), got(q.size());
      cpu.paged_attention(q.data(), k.data(), v.data(), *pc, 1, one, p, want.data());
      DeviceBuffer dq = gpu.alloc(q.size()), dk = gpu.alloc(k.size()), dv = gpu.alloc(v.size()), dout = gpu.alloc(q.size());
      gpu.upload(dq.data(), q.data(), q.size());
      gpu.upload(dk.data(), k.data(), k.size());
      gpu.upload(dv.data(), v.data(), v.size());
      gpu.paged_attention(dq.data(), dk.data(), dv.data(), *pg, 1, one, p, dout.data());
      gpu.download(got.data(), dout.data(), got.size());
      EXPECT_LT(max_abs_diff(got, want), 4e-3) << "after the block copy";
    }
#endif
}

#ifdef QFORGE_HAVE_CUDA
// Each of 8 prompts decoded in one batch gives the tokens it gives alone: greedily, Model::forward
// one call at a time; with `sampling`, generate() (one request through the engine).
void expect_batched_equals_alone(const std::string& rel, const EngineOptions& opt, int n_new,
                                 const SamplerParams* sampling = nullptr) {
  if (!test::has_data(rel + "/config.json")) GTEST_SKIP() << "no " << rel << " (../shared absent)";
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  CudaBackend gpu(0);
  auto model = Model::load(test::data_dir() / rel, gpu);
  test::expect_engine_batch_equals_alone(*model, Tokenizer::load(test::data_dir() / rel), opt, n_new, false, sampling);
}
#endif

TEST(GpuEngine, Exl2TestModelEightPromptsBatchedDecodeAsAlone) {
#ifndef QFORGE_HAVE_CUDA
  GTEST_SKIP() << "built without CUDA";
#else
  expect_batched_equals_alone("models/testmodel-llama-20m-exl2-4.0bpw", test::one_batch_options(), 32);
#endif
}

TEST(GpuEngine, ChunkedPrefillAndPreemptionDecodeAsAlone) {
#ifndef QFORGE_HAVE_CUDA
  GTEST_SKIP() << "built without CUDA";
#else
  EngineOptions opt;
  opt.num_blocks = 12;  // 96 positions for 8 prompts of ~10 tokens + 32 new: preemption
  opt.block_size = 8;
  opt.token_budget = 20;  // prompts arrive in chunks
  opt.max_running = 8;
  opt.max_context = 128;
  expect_batched_equals_alone("models/testmodel-llama-20m-exl2-4.0bpw", opt, 32);
#endif
}

// Sampled on the device, row by row with each sequence's own parameters (CudaBackend::sample_rows),
// as generate() samples each prompt alone.
TEST(GpuEngine, SampledPromptsInOneBatchDrawAsAlone) {
#ifndef QFORGE_HAVE_CUDA
  GTEST_SKIP() << "built without CUDA";
#else
  const SamplerParams s = test::story_sampling();
  expect_batched_equals_alone("models/testmodel-llama-20m-exl2-4.0bpw", test::one_batch_options(), 32, &s);
#endif
}

// Decode steps replayed from graphs (five sequences padded to a bucket of eight, greedy and
// sampled) give what eager steps give.
TEST(GpuEngine, DecodeGraphsMatchEagerSteps) {
#ifndef QFORGE_HAVE_CUDA
  GTEST_SKIP() << "built without CUDA";
#else
  const std::string rel = "models/testmodel-llama-20m-exl2-4.0bpw";
  if (!test::has_data(rel + "/config.json")) GTEST_SKIP() << "no " << rel << " (../shared absent)";
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  CudaBackend gpu(0);
  auto model = Model::load(test::data_dir() / rel, gpu);
  const Tokenizer tok = Tokenizer::load(test::data_dir() / rel);
  const char* texts[] = {"Once upon a time", "The little dog", "Tim", "The sun was hot. The children", "Ben and his mom"};
  SamplerParams greedy, sampled;
  greedy.temperature = 0;
  sampled.temperature = 0.9f, sampled.top_k = 40, sampled.repeat_penalty = 1.1f, sampled.seed = 3;
  for (const SamplerParams* sp : {&greedy, &sampled}) {
    std::vector<std::vector<int32_t>> out[2];
    for (int graphs = 0; graphs < 2; ++graphs) {
      EngineOptions opt;
      opt.num_blocks = 64;
      opt.max_context = 256;
      opt.graphs = graphs == 1;
      Engine engine(*model, opt);
      for (int i = 0; i < 5; ++i) {
        SamplerParams p = *sp;
        p.seed += static_cast<uint64_t>(i);
        engine.add({i, tok.encode(texts[i], true), 40, {}}, p);
      }
      engine.run_to_completion();
      auto fin = engine.take_finished();
      std::sort(fin.begin(), fin.end(), [](const Finished& a, const Finished& b) { return a.id < b.id; });
      for (const Finished& f : fin) out[graphs].push_back(f.output);
      if (graphs) {
        EXPECT_GT(engine.graph_steps(), 30) << "decode steps replayed from a graph";
        std::printf("[ graphs   ] %s: %lld steps, %lld from graphs, %lld captured\n", sp == &greedy ? "greedy" : "sampled",
                    static_cast<long long>(engine.steps()), static_cast<long long>(engine.graph_steps()),
                    static_cast<long long>(engine.graph_captures()));
      } else {
        EXPECT_EQ(engine.graph_steps(), 0);
      }
    }
    ASSERT_EQ(out[0].size(), 5u);
    for (size_t i = 0; i < 5; ++i) EXPECT_EQ(out[1][i], out[0][i]) << (sp == &greedy ? "greedy" : "sampled") << " prompt " << i;
  }
#endif
}

// Perplexity with several windows in one forward pass equals the unbatched value.
TEST(GpuEngine, BatchedPerplexityEqualsUnbatched) {
#ifndef QFORGE_HAVE_CUDA
  GTEST_SKIP() << "built without CUDA";
#else
  const std::string rel = "models/testmodel-llama-20m-exl2-4.0bpw";
  if (!test::has_data(rel + "/config.json") || !test::has_data("text/heldout/heldout.txt"))
    GTEST_SKIP() << "no " << rel << " or heldout.txt (../shared absent)";
  if (!have_gpu()) GTEST_SKIP() << "no CUDA device";
  CudaBackend gpu(0);
  auto model = Model::load(test::data_dir() / rel, gpu);
  const Tokenizer tok = Tokenizer::load(test::data_dir() / rel);
  const auto ids = tok.encode(test::slurp(test::data_dir() / "text/heldout/heldout.txt").substr(0, 60000), false);
  const PerplexityResult one = perplexity(*model, ids, 256, 16);
  for (int64_t batch : {1, 4, 7}) {
    const PerplexityResult many = perplexity_batched(*model, ids, 256, batch, 16);
    EXPECT_EQ(many.windows, one.windows);
    EXPECT_EQ(many.tokens_scored, one.tokens_scored);
    std::printf("ppl: one window at a time %.5f, %lld per batch %.5f\n", one.ppl, static_cast<long long>(batch), many.ppl);
    EXPECT_NEAR(many.ppl, one.ppl, 1e-4 * one.ppl) << batch << " windows per batch";
  }
  // Quantized caches, as on the CPU: within 1% (8-bit) and 3% (4-bit) of the fp16 cache.
  const double full = perplexity_batched(*model, ids, 256, 4, 16, KVFormat::Full).ppl;
  const double q8 = perplexity_batched(*model, ids, 256, 4, 16, KVFormat::Q8).ppl;
  const double q4 = perplexity_batched(*model, ids, 256, 4, 16, KVFormat::Q4).ppl;
  std::printf("ppl: fp16 cache %.4f, q8 %.4f (%+.3f%%), q4 %.4f (%+.3f%%)\n", full, q8, 100 * (q8 / full - 1), q4,
              100 * (q4 / full - 1));
  EXPECT_LT(std::fabs(q8 / full - 1), 0.01);
  EXPECT_LT(std::fabs(q4 / full - 1), 0.03);
#endif
}

}  // namespace
}  // namespace qf
