// bench/make_random_model: the folders it writes load with qforge's loader and run to finite,
// non-degenerate logits; the weights depend on the seed only, not on the sharding.
#include <cmath>
#include <cstdio>
#include <cstring>

#include "backends/cpu/cpu_backend.h"
#include "core/tensor.h"
#include "core/json_file.h"
#include "formats/safetensors.h"
#include "model/config.h"
#include "model/model.h"
#include "test_util.h"
#include "tokenizer/tokenizer.h"

#ifndef MAKE_RANDOM_MODEL_BINARY  // bench/CMakeLists.txt defines it; else it sits beside qforge
#define MAKE_RANDOM_MODEL_BINARY ""
#endif

namespace qf {
namespace {

namespace fs = std::filesystem;

std::string tool() {
  const std::string defined = MAKE_RANDOM_MODEL_BINARY;
  return defined.empty() ? (fs::path(test::binary()).parent_path() / "make_random_model").string() : defined;
}

// Runs the tool; returns its exit code, its stderr in *err.
int make(const std::string& args, std::string* err) {
  std::string out;
  return test::run_command(tool() + " " + args, &out, err);
}

double rms(const std::vector<float>& v) {
  double s = 0;
  for (float x : v) s += static_cast<double>(x) * x;
  return std::sqrt(s / static_cast<double>(v.size()));
}

TEST(MakeRandomModel, TinyLoadsAndRunsToFiniteLogits) {
  const fs::path dir = test::tmp_dir("random_tiny") / "model";
  std::string err;
  ASSERT_EQ(make("--shape tiny --out " + dir.string() + " --max-shard-mb 2 --seed 5", &err), 0) << err;
  EXPECT_FALSE(fs::exists(dir.string() + ".partial-make_random_model"));

  // Sharded as transformers shards, with an index that the loader cross-checks.
  const json index = read_json_file(dir / "model.safetensors.index.json");
  const std::string last = index["weight_map"]["lm_head.weight"].get<std::string>();
  EXPECT_EQ(last.rfind("model-0000", 0), 0u) << last;
  EXPECT_TRUE(fs::exists(dir / "model-00001-of-00003.safetensors")) << err;
  EXPECT_TRUE(fs::exists(dir / "model-00003-of-00003.safetensors")) << err;

  const ModelConfig c = load_config(dir);
  EXPECT_EQ(c.hf_class, "LlamaForCausalLM");
  EXPECT_EQ(c.hidden, 256);
  EXPECT_EQ(c.n_kv_heads, 2);
  EXPECT_EQ(c.dtype, "float16");

  CpuBackend cpu;
  auto model = Model::load(dir, cpu);
  const TensorStore& store = model->store();
  EXPECT_EQ(store.get("model.layers.0.self_attn.q_proj.weight").dtype, DType::F16);
  // std 1/sqrt(fan_in); norms exactly 1.
  EXPECT_NEAR(rms(to_f32(store.get("model.layers.0.self_attn.q_proj.weight"))), 1.0 / 16, 0.002);
  EXPECT_NEAR(rms(to_f32(store.get("model.layers.3.mlp.down_proj.weight"))), 1.0 / std::sqrt(512.0), 0.002);
  for (float x : to_f32(store.get("model.layers.2.post_attention_layernorm.weight"))) ASSERT_EQ(x, 1.0f);

  const int64_t n = 32, V = c.vocab;
  std::vector<int32_t> ids(n);
  for (int64_t i = 0; i < n; ++i) ids[static_cast<size_t>(i)] = static_cast<int32_t>((i * 37 + 11) % V);
  auto cache = model->new_cache(n);
  std::vector<float> logits(static_cast<size_t>(n * V));
  model->forward(ids.data(), n, 0, *cache, logits.data(), /*all_logits=*/true);
  for (float x : logits) ASSERT_TRUE(std::isfinite(x));
  // Logits of std ~3: a peaked but not one-hot distribution that depends on the input.
  const double s = rms(logits);
  EXPECT_GT(s, 1.5);
  EXPECT_LT(s, 6.0);
  double diff = 0;
  for (int64_t i = 0; i < V; ++i) diff += std::abs(logits[static_cast<size_t>(i)] - logits[static_cast<size_t>(V + i)]);
  EXPECT_GT(diff / static_cast<double>(V), 0.1);
}

TEST(MakeRandomModel, WeightsDependOnTheSeedOnly) {
  const fs::path root = test::tmp_dir("random_seed");
  std::string err;
  ASSERT_EQ(make("--shape tiny --out " + (root / "a").string() + " --seed 9 --max-shard-mb 1 -t 1", &err), 0) << err;
  ASSERT_EQ(make("--shape tiny --out " + (root / "b").string() + " --seed 9", &err), 0) << err;
  ASSERT_EQ(make("--shape tiny --out " + (root / "c").string() + " --seed 10", &err), 0) << err;
  EXPECT_TRUE(fs::exists(root / "b" / "model.safetensors"));  // one file when it fits, no index
  EXPECT_FALSE(fs::exists(root / "b" / "model.safetensors.index.json"));
  const TensorStore a = TensorStore::open_dir(root / "a"), b = TensorStore::open_dir(root / "b"),
                    c = TensorStore::open_dir(root / "c");
  EXPECT_GT(a.files().size(), 3u);
  ASSERT_EQ(a.names(), b.names());
  for (const auto& name : a.names()) {
    const TensorView &x = a.get(name), &y = b.get(name);
    ASSERT_EQ(x.nbytes(), y.nbytes()) << name;
    EXPECT_EQ(std::memcmp(x.data, y.data, x.nbytes()), 0) << name;
  }
  const TensorView &x = a.get("model.embed_tokens.weight"), &z = c.get("model.embed_tokens.weight");
  EXPECT_NE(std::memcmp(x.data, z.data, x.nbytes()), 0);
}

TEST(MakeRandomModel, RefusesToOverwriteAndChecksTheTokenizer) {
  const fs::path root = test::tmp_dir("random_refuse");
  std::string err;
  test::write_file(root / "keep.txt", "mine");
  EXPECT_EQ(make("--shape tiny --out " + root.string(), &err), 1);
  EXPECT_NE(err.find("--force"), std::string::npos) << err;
  EXPECT_TRUE(fs::exists(root / "keep.txt"));
  EXPECT_EQ(make("--shape gpt5 --out " + (root / "x").string(), &err), 1);
  EXPECT_NE(err.find("unknown --shape 'gpt5'"), std::string::npos) << err;

  QF_REQUIRE_DATA("models/testmodel-llama-20m/tokenizer.json");
  QF_REQUIRE_DATA("models/stories260K-hf/tokenizer.json");
  // The Llama-2 tokenizer has 32000 tokens, more than tiny's 1024 embeddings.
  const std::string llama2 = (test::data_dir() / "models/testmodel-llama-20m").string();
  EXPECT_EQ(make("--shape tiny --out " + (root / "t").string() + " --tokenizer-from " + llama2, &err), 1);
  EXPECT_NE(err.find("--vocab 32000"), std::string::npos) << err;
  EXPECT_FALSE(fs::exists(root / "t"));
  // stories260K's 512-token tokenizer fits: copied, and it loads with the model.
  const fs::path dir = root / "with_tok";
  ASSERT_EQ(make("--shape tiny --out " + dir.string() + " --tokenizer-from " +
                     (test::data_dir() / "models/stories260K-hf").string(),
                 &err),
            0)
      << err;
  EXPECT_EQ(Tokenizer::load(dir).vocab_size(), 512);
  EXPECT_TRUE(fs::exists(dir / "tokenizer_config.json"));
}

}  // namespace
}  // namespace qf
