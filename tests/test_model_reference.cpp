// The CPU forward pass against transformers' own outputs for the staged test models.
#include <algorithm>
#include <numeric>

#include "backends/cpu/cpu_backend.h"
#include "core/json_file.h"
#include "model/model.h"
#include "backends/sampler.h"
#include "test_util.h"

namespace qf {
namespace {

TEST(ModelReference, TestModelLlama20mMatchesTransformers) {
  QF_REQUIRE_DATA("models/testmodel-llama-20m/reference_outputs.json");
  const auto dir = test::data_dir() / "models/testmodel-llama-20m";
  CpuBackend cpu;
  auto model = Model::load(dir, cpu);
  const json ref = read_json_file(dir / "reference_outputs.json");
  ASSERT_EQ(ref["prompts"].size(), 5u);
  for (const auto& p : ref["prompts"]) {
    SCOPED_TRACE(p["prompt"].get<std::string>());
    const auto ids = p["input_ids"].get<std::vector<int32_t>>();
    // Last-position logits: top-10 ids and values within 0.05.
    auto cache = model->new_cache(static_cast<int64_t>(ids.size()));
    std::vector<float> logits(32000);
    model->forward(ids.data(), static_cast<int64_t>(ids.size()), 0, *cache, logits.data());
    std::vector<int32_t> order(logits.size());
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + 10, order.end(),
                      [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
    const auto& top = p["last_logits_top10"];
    for (size_t i = 0; i < 10; ++i) {
      const int32_t id = top[i][0].get<int32_t>();
      const float val = top[i][1].get<float>();
      EXPECT_NEAR(logits[static_cast<size_t>(id)], val, 0.05) << "token " << id;
      // Ties within fp16 noise may swap places; the ids must match where values are distinct.
      if (i + 1 < 10 && i > 0 && std::abs(top[i][1].get<float>() - top[i + 1][1].get<float>()) > 0.02 &&
          std::abs(top[i - 1][1].get<float>() - top[i][1].get<float>()) > 0.02) {
        EXPECT_EQ(order[i], id) << "rank " << i;
      }
    }
    EXPECT_EQ(order[0], top[0][0].get<int32_t>());
    EXPECT_EQ(test::greedy(*model, ids, 32), p["greedy_32_ids"].get<std::vector<int32_t>>());
  }
}

TEST(ModelReference, Stories260kGreedyFromBos) {
  QF_REQUIRE_DATA("models/stories260K-hf/reference_outputs.json");
  const auto dir = test::data_dir() / "models/stories260K-hf";
  CpuBackend cpu;
  auto model = Model::load(dir, cpu);
  const json ref = read_json_file(dir / "reference_outputs.json");
  auto want = ref["hf_greedy_ids"].get<std::vector<int32_t>>();  // BOS + 200 tokens
  ASSERT_EQ(want.size(), 201u);
  auto got = test::greedy(*model, {1}, 200);
  EXPECT_EQ(got, std::vector<int32_t>(want.begin() + 1, want.end()));
}

TEST(ModelReference, PrefillInChunksEqualsOneShot) {
  QF_REQUIRE_DATA("models/stories260K-hf/model.safetensors");
  CpuBackend cpu;
  auto model = Model::load(test::data_dir() / "models/stories260K-hf", cpu);
  test::expect_chunked_prefill_matches(*model, 1e-4);
}

}  // namespace
}  // namespace qf
