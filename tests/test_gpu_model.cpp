// Whole models on the CUDA backend against the CPU backend: greedy continuations must be identical,
// eagerly and through a captured CUDA graph of the decode step. Skips without CUDA, a device or the
// shared test data (QFORGE_TEST_DATA can point at a copy).
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "backends/cpu/cpu_backend.h"
#include "core/json_file.h"
#include "model/model.h"
#include "runtime/generator.h"
#include "backends/sampler.h"
#include "test_util.h"
#ifdef QFORGE_HAVE_CUDA
#include "backends/cuda/cuda_backend.h"
#endif

namespace qf {
namespace {

#ifdef QFORGE_HAVE_CUDA
// Greedy continuations on the GPU (eager and graph) against the CPU; returns the GPU's eager ids.
std::vector<int32_t> compare_model(const std::string& rel, const std::vector<int32_t>& prompt, int n_new) {
  const auto dir = test::data_dir() / rel;
  CpuBackend cpu;
  auto mc = Model::load(dir, cpu);
  CudaBackend gpu(0);
  auto mg = Model::load(dir, gpu);
  std::vector<float> lc, lg;
  const auto want = test::greedy(*mc, prompt, n_new, &lc);
  const auto got = test::greedy(*mg, prompt, n_new, &lg);
  double num = 0, den = 0;
  for (size_t i = 0; i < lc.size(); ++i) {
    num += (lg[i] - lc[i]) * double(lg[i] - lc[i]);
    den += double(lc[i]) * lc[i];
  }
  EXPECT_LT(std::sqrt(num / den), 5e-3) << "prefill logits differ";
  EXPECT_EQ(got, want) << "eager greedy";
  EXPECT_EQ(test::greedy(*mg, prompt, n_new, nullptr, /*engine=*/true), want) << "engine greedy (decode graphs)";
  return got;
}
#endif

TEST(GpuModel, TestModelLlama20mGreedy200MatchesCpu) {
  QF_REQUIRE_GPU();
  QF_REQUIRE_DATA("models/testmodel-llama-20m/reference_outputs.json");
#ifdef QFORGE_HAVE_CUDA
  const json ref = read_json_file(test::data_dir() / "models/testmodel-llama-20m/reference_outputs.json");
  const auto ids = ref["prompts"][0]["input_ids"].get<std::vector<int32_t>>();
  compare_model("models/testmodel-llama-20m", ids, 200);
  // And the transformers reference for the first 32 tokens of every prompt.
  CudaBackend gpu(0);
  auto m = Model::load(test::data_dir() / "models/testmodel-llama-20m", gpu);
  for (const auto& p : ref["prompts"]) {
    const auto pid = p["input_ids"].get<std::vector<int32_t>>();
    EXPECT_EQ(test::greedy(*m, pid, 32), p["greedy_32_ids"].get<std::vector<int32_t>>()) << p["prompt"];
  }
#endif
}

TEST(GpuModel, Stories260kGreedy200MatchesCpuAndTransformers) {
  QF_REQUIRE_GPU();
  QF_REQUIRE_DATA("models/stories260K-hf/reference_outputs.json");
#ifdef QFORGE_HAVE_CUDA
  const auto got = compare_model("models/stories260K-hf", {1}, 200);
  const json ref = read_json_file(test::data_dir() / "models/stories260K-hf/reference_outputs.json");
  auto want = ref["hf_greedy_ids"].get<std::vector<int32_t>>();
  EXPECT_EQ(got, std::vector<int32_t>(want.begin() + 1, want.end()));
#endif
}

TEST(GpuModel, PrefillInChunksEqualsOneShot) {
  QF_REQUIRE_GPU();
  QF_REQUIRE_DATA("models/stories260K-hf/model.safetensors");
#ifdef QFORGE_HAVE_CUDA
  CudaBackend gpu(0);
  auto model = Model::load(test::data_dir() / "models/stories260K-hf", gpu);
  test::expect_chunked_prefill_matches(*model, 1e-3);
#endif
}

// The generator's own loop (one request through the engine): on CUDA, greedy decoding runs from
// the engine's captured graphs and must give the CPU's tokens.
TEST(GpuModel, GenerateGreedyFromGraphMatchesCpu) {
  QF_REQUIRE_GPU();
  QF_REQUIRE_DATA("models/stories260K-hf/model.safetensors");
#ifdef QFORGE_HAVE_CUDA
  const auto dir = test::data_dir() / "models/stories260K-hf";
  GenerateOptions opt;
  opt.max_tokens = 150;
  opt.sampling.temperature = 0;
  opt.stop_at_eos = false;
  int64_t graph_steps = 0;
  auto run = [&](Backend& b) {
    auto m = Model::load(dir, b);
    std::vector<int32_t> ids;
    graph_steps = generate(*m, {1, 403, 407}, opt, [&](int32_t id) {
                    ids.push_back(id);
                    return true;
                  }).graph_steps;
    return ids;
  };
  CpuBackend cpu;
  CudaBackend gpu(0);
  const auto want = run(cpu);
  ASSERT_EQ(want.size(), 150u);
  EXPECT_EQ(graph_steps, 0);
  EXPECT_EQ(run(gpu), want);
  EXPECT_GT(graph_steps, 140) << "greedy generation on CUDA should replay the engine's graphs";
#endif
}

}  // namespace
}  // namespace qf
