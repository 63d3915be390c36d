// Whole models on the CUDA backend against the CPU backend: greedy continuations must be identical,
// eagerly and through a captured CUDA graph of the decode step. Skips without CUDA, a device or the
// shared test data (QFORGE_TEST_DATA can point at a copy).
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "backends/cpu/cpu_backend.h"
#include "core/json_file.h"
#include "model/model.h"
#include "runtime/sampler.h"
#include "test_util.h"
#ifdef QFORGE_HAVE_CUDA
#include "backends/cuda/cuda_backend.h"
#endif

namespace qf {
namespace {

#ifdef QFORGE_HAVE_CUDA
#define QF_REQUIRE_GPU()                                                          \
  do {                                                                            \
    if (::qf::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device present"; \
  } while (0)
#else
#define QF_REQUIRE_GPU() GTEST_SKIP() << "built without CUDA"
#endif

[[maybe_unused]] std::vector<int32_t> greedy(Model& m, std::vector<int32_t> ids, int n_new, std::vector<float>* first_logits = nullptr) {
  auto cache = m.new_cache(static_cast<int64_t>(ids.size()) + n_new);
  std::vector<float> logits(static_cast<size_t>(m.config().vocab));
  m.forward(ids.data(), static_cast<int64_t>(ids.size()), 0, *cache, logits.data());
  if (first_logits) *first_logits = logits;
  std::vector<int32_t> out;
  int64_t pos = static_cast<int64_t>(ids.size());
  for (int i = 0; i < n_new; ++i) {
    int32_t id = argmax(logits.data(), m.config().vocab);
    out.push_back(id);
    if (i + 1 < n_new) m.forward(&id, 1, pos++, *cache, logits.data());
  }
  return out;
}

#ifdef QFORGE_HAVE_CUDA
// Prefill eagerly, then decode by replaying one captured graph: the token and position live on
// the device and argmax runs there; only the token id crosses to the host each step.
std::vector<int32_t> greedy_graph(Model& m, CudaBackend& gpu, std::vector<int32_t> ids, int n_new) {
  auto cache = m.new_cache(static_cast<int64_t>(ids.size()) + n_new);
  std::vector<float> logits(static_cast<size_t>(m.config().vocab));
  m.forward(ids.data(), static_cast<int64_t>(ids.size()), 0, *cache, logits.data());
  std::vector<int32_t> out = {argmax(logits.data(), m.config().vocab)};
  if (n_new == 1) return out;
  gpu.set_device_inputs(true);
  gpu.set_argmax_on_download(true);
  gpu.set_decode_state(out[0], static_cast<int64_t>(ids.size()));
  int32_t dummy = 0;
  m.forward(&dummy, 1, 0, *cache, logits.data());  // eager warm-up step: sizes every buffer
  out.push_back(gpu.read_token());
  gpu.begin_capture();
  m.forward(&dummy, 1, 0, *cache, logits.data());
  gpu.end_capture();
  while (static_cast<int>(out.size()) < n_new) {
    gpu.replay();
    out.push_back(gpu.read_token());
  }
  gpu.set_argmax_on_download(false);
  gpu.set_device_inputs(false);
  return out;
}

void compare_model(const std::string& rel, const std::vector<int32_t>& prompt, int n_new) {
  const auto dir = test::data_dir() / rel;
  CpuBackend cpu;
  auto mc = Model::load(dir, cpu);
  CudaBackend gpu(0);
  auto mg = Model::load(dir, gpu);
  std::vector<float> lc, lg;
  const auto want = greedy(*mc, prompt, n_new, &lc);
  const auto got = greedy(*mg, prompt, n_new, &lg);
  double num = 0, den = 0;
  for (size_t i = 0; i < lc.size(); ++i) {
    num += (lg[i] - lc[i]) * double(lg[i] - lc[i]);
    den += double(lc[i]) * lc[i];
  }
  EXPECT_LT(std::sqrt(num / den), 5e-3) << "prefill logits differ";
  EXPECT_EQ(got, want) << "eager greedy";
  EXPECT_EQ(greedy_graph(*mg, gpu, prompt, n_new), want) << "graph greedy";
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
    EXPECT_EQ(greedy(*m, pid, 32), p["greedy_32_ids"].get<std::vector<int32_t>>()) << p["prompt"];
  }
#endif
}

TEST(GpuModel, Stories260kGreedy200MatchesCpuAndTransformers) {
  QF_REQUIRE_GPU();
  QF_REQUIRE_DATA("models/stories260K-hf/reference_outputs.json");
#ifdef QFORGE_HAVE_CUDA
  compare_model("models/stories260K-hf", {1}, 200);
  const json ref = read_json_file(test::data_dir() / "models/stories260K-hf/reference_outputs.json");
  auto want = ref["hf_greedy_ids"].get<std::vector<int32_t>>();
  CudaBackend gpu(0);
  auto m = Model::load(test::data_dir() / "models/stories260K-hf", gpu);
  EXPECT_EQ(greedy(*m, {1}, 200), std::vector<int32_t>(want.begin() + 1, want.end()));
#endif
}

TEST(GpuModel, PrefillInChunksEqualsOneShot) {
  QF_REQUIRE_GPU();
  QF_REQUIRE_DATA("models/stories260K-hf/model.safetensors");
#ifdef QFORGE_HAVE_CUDA
  CudaBackend gpu(0);
  auto model = Model::load(test::data_dir() / "models/stories260K-hf", gpu);
  std::vector<int32_t> ids = {1, 403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315};
  std::vector<float> a(512), b(512);
  auto c1 = model->new_cache(32);
  model->forward(ids.data(), 12, 0, *c1, a.data());
  auto c2 = model->new_cache(32);
  model->forward(ids.data(), 5, 0, *c2, b.data());
  model->forward(ids.data() + 5, 7, 5, *c2, b.data());
  for (size_t i = 0; i < a.size(); ++i) ASSERT_NEAR(a[i], b[i], 1e-3) << i;
#endif
}

}  // namespace
}  // namespace qf
