// config.json and safetensors loading: both config layouts, the architecture table, RoPE
// scalings, sharded files, and every kind of bad input giving one clear line.
#include <cmath>
#include <fstream>

#include "core/error.h"
#include "formats/safetensors.h"
#include "model/config.h"
#include "model/rope.h"
#include "model/weights.h"
#include "test_util.h"

namespace qf {
namespace {

namespace fs = std::filesystem;

using test::write_file;

using test::expect_error;

const char* kLlamaT4 = R"({
  "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
  "intermediate_size": 172, "num_hidden_layers": 2, "num_attention_heads": 8,
  "num_key_value_heads": 4, "vocab_size": 100, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
  "torch_dtype": "bfloat16", "tie_word_embeddings": true, "eos_token_id": [7, 9],
  "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})";

TEST(Config, TransformersFiveLayout) {
  QF_REQUIRE_DATA("models/testmodel-llama-20m/config.json");
  const auto c = load_config(test::data_dir() / "models/testmodel-llama-20m");
  EXPECT_EQ(c.arch->hf_class, "LlamaForCausalLM");
  EXPECT_EQ(c.hidden, 256);
  EXPECT_EQ(c.n_layers, 6);
  EXPECT_EQ(c.n_heads, 4);
  EXPECT_EQ(c.n_kv_heads, 2);
  EXPECT_EQ(c.head_dim, 64);
  EXPECT_EQ(c.vocab, 32000);
  EXPECT_EQ(c.rope.type, "default");
  EXPECT_DOUBLE_EQ(c.rope.theta, 10000.0);
  EXPECT_EQ(c.dtype, "float16");
  EXPECT_FALSE(c.tie_embeddings);
}

TEST(Config, TransformersFourLayoutWithLlama3Rope) {
  auto dir = test::tmp_dir("cfg_t4");
  write_file(dir / "config.json", kLlamaT4);
  const auto c = load_config(dir);
  EXPECT_EQ(c.rope.type, "llama3");
  EXPECT_DOUBLE_EQ(c.rope.theta, 500000.0);
  EXPECT_DOUBLE_EQ(c.rope.factor, 8.0);
  EXPECT_EQ(c.rope.original_max_position, 8192);
  EXPECT_EQ(c.dtype, "bfloat16");
  EXPECT_TRUE(c.tie_embeddings);
  EXPECT_EQ(c.head_dim, 8);
  EXPECT_EQ(c.eos_ids, (std::vector<int64_t>{7, 9}));
}

TEST(Config, QwenHasQkvBiasAndMistralSlidingWindow) {
  auto dir = test::tmp_dir("cfg_qwen");
  write_file(dir / "config.json", R"({"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 10,
    "tie_word_embeddings": true, "sliding_window": 4096, "use_sliding_window": false})");
  auto c = load_config(dir);
  EXPECT_TRUE(c.attention_bias);
  EXPECT_EQ(c.sliding_window, 0);
  EXPECT_EQ(c.n_kv_heads, 4);
  write_file(dir / "config.json", R"({"architectures": ["MistralForCausalLM"], "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
    "num_key_value_heads": 1, "vocab_size": 10, "sliding_window": 4096})");
  c = load_config(dir);
  EXPECT_FALSE(c.attention_bias);
  EXPECT_EQ(c.sliding_window, 4096);
  EXPECT_EQ(c.arch->model_type, "mistral");
}

TEST(Config, RopeScalings) {
  RopeConfig def;
  const auto base = rope_inv_freq(def, 64);
  EXPECT_FLOAT_EQ(base[0], 1.0f);
  EXPECT_NEAR(base[1], std::pow(10000.0, -2.0 / 64), 1e-7);
  RopeConfig lin;
  lin.type = "linear";
  lin.factor = 4;
  const auto l = rope_inv_freq(lin, 64);
  for (size_t i = 0; i < l.size(); ++i) EXPECT_FLOAT_EQ(l[i], base[i] / 4);
  RopeConfig l3;
  l3.type = "llama3";
  l3.theta = 500000;
  l3.factor = 8;
  const auto b3 = rope_inv_freq(RopeConfig{"default", 500000}, 128);
  const auto s3 = rope_inv_freq(l3, 128);
  EXPECT_FLOAT_EQ(s3[0], b3[0]);                      // short wavelengths kept
  EXPECT_NEAR(s3.back(), b3.back() / 8, 1e-12);       // long ones slowed by the factor
  bool blended = false;                               // and some in between
  for (size_t i = 0; i < s3.size(); ++i)
    if (s3[i] < b3[i] * 0.99 && s3[i] > b3[i] / 8 * 1.01) blended = true;
  EXPECT_TRUE(blended);
  const auto t = build_rope_tables(def, 8, 16);
  EXPECT_FLOAT_EQ(t.cos[0], 1.0f);
  EXPECT_NEAR(t.sin[5 * 4 + 0], std::sin(5.0), 1e-6);
}

TEST(Config, BadInput) {
  auto dir = test::tmp_dir("cfg_bad");
  expect_error([&] { load_config(dir); }, "config.json: cannot open");
  write_file(dir / "config.json", "{\"architectures\": [\"LlamaForCausalLM\",");
  expect_error([&] { load_config(dir); }, "config.json: malformed JSON");
  write_file(dir / "config.json", R"({"architectures": ["GPTBigCodeForCausalLM"], "hidden_size": 8})");
  expect_error([&] { load_config(dir); }, "unknown architecture 'GPTBigCodeForCausalLM'");
  write_file(dir / "config.json", R"({"architectures": ["LlamaForCausalLM"], "hidden_size": 64})");
  expect_error([&] { load_config(dir); }, "missing field 'intermediate_size'");
  write_file(dir / "config.json", R"({"architectures": ["LlamaForCausalLM"], "hidden_size": "64"})");
  expect_error([&] { load_config(dir); }, "config.json");
  write_file(dir / "config.json", R"({"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4, "vocab_size": 10,
    "rope_scaling": {"type": "yarn", "factor": 4}})");
  expect_error([&] { load_config(dir); }, "unsupported RoPE type 'yarn'");
  write_file(dir / "config.json", R"({"architectures": ["LlamaForCausalLM"], "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
    "num_key_value_heads": 3, "vocab_size": 10})");
  expect_error([&] { load_config(dir); }, "multiple of num_key_value_heads");
}

// ---- safetensors -----------------------------------------------------------------------------

std::string st_bytes(const std::string& header, const std::string& data) {
  std::string out(8, '\0');
  uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[static_cast<size_t>(i)] = static_cast<char>(n >> (8 * i));
  return out + header + data;
}

TEST(Safetensors, RoundTripAndSharded) {
  auto dir = test::tmp_dir("st_ok");
  std::vector<uint16_t> a = {0x3c00, 0x4000, 0xc000, 0x0000};  // 1, 2, -2, 0 in fp16
  std::vector<float> b = {0.5f, -1.5f};
  write_safetensors(dir / "model-00001-of-00002.safetensors", {{"a", DType::F16, {2, 2}, a.data()}},
                    {{"format", "pt"}});
  write_safetensors(dir / "model-00002-of-00002.safetensors", {{"b", DType::F32, {2}, b.data()}});
  write_file(dir / "model.safetensors.index.json",
             R"({"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                "b": "model-00002-of-00002.safetensors"}})");
  auto store = TensorStore::open_dir(dir);
  EXPECT_TRUE(store.notes().empty());
  const auto& ta = store.get("a");
  EXPECT_EQ(ta.dtype, DType::F16);
  EXPECT_EQ(ta.shape, (std::vector<int64_t>{2, 2}));
  EXPECT_EQ(to_f32(ta), (std::vector<float>{1, 2, -2, 0}));
  EXPECT_EQ(to_f32(store.get("b")), b);
  EXPECT_EQ(store.files()[0]->metadata().at("format"), "pt");
  expect_error([&] { store.get("nope"); }, "missing tensor 'nope'");
}

TEST(Safetensors, StaleIndexIsReportedNotFatal) {
  auto dir = test::tmp_dir("st_stale");
  std::vector<float> b = {1, 2};
  write_safetensors(dir / "output.safetensors", {{"b", DType::F32, {2}, b.data()}});
  write_file(dir / "model.safetensors.index.json",
             R"({"weight_map": {"x": "model-00001-of-00003.safetensors"}})");
  auto store = TensorStore::open_dir(dir);
  ASSERT_EQ(store.notes().size(), 1u);
  EXPECT_NE(store.notes()[0].find("stale"), std::string::npos);
  EXPECT_TRUE(store.has("b"));
}

TEST(Safetensors, RealShardedModel) {
  QF_REQUIRE_DATA("models/testmodel-llama-20m/model.safetensors.index.json");
  auto store = TensorStore::open_dir(test::data_dir() / "models/testmodel-llama-20m");
  EXPECT_EQ(store.files().size(), 3u);
  EXPECT_TRUE(store.notes().empty());
  EXPECT_EQ(store.get("model.embed_tokens.weight").shape, (std::vector<int64_t>{32000, 256}));
}

TEST(Safetensors, BadInput) {
  auto dir = test::tmp_dir("st_bad");
  const auto f = dir / "x.safetensors";
  expect_error([&] { SafetensorsFile::open(f); }, "x.safetensors: cannot open");
  write_file(f, "abc");
  expect_error([&] { SafetensorsFile::open(f); }, "truncated");
  write_file(f, st_bytes("{}", "").substr(0, 8) + std::string("{"));
  expect_error([&] { SafetensorsFile::open(f); }, "exceeds the file size");
  write_file(f, st_bytes("{\"a\": ", ""));
  expect_error([&] { SafetensorsFile::open(f); }, "safetensors header: malformed JSON");
  write_file(f, st_bytes(R"({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}})", std::string(8, '\0')));
  expect_error([&] { SafetensorsFile::open(f); }, "out of range");
  write_file(f, st_bytes(R"({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}})", std::string(8, '\0')));
  expect_error([&] { SafetensorsFile::open(f); }, "needs 12 bytes but data_offsets span 8");
  write_file(f, st_bytes(R"({"a": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}})", std::string(8, '\0')));
  expect_error([&] { SafetensorsFile::open(f); }, "unknown dtype 'Q9'");
  write_file(f, st_bytes(R"({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}})", std::string(8, '\0')));
  expect_error([&] { SafetensorsFile::open(f); }, "non-negative");
  write_file(f, st_bytes(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}})", std::string(8, '\0')));
  expect_error([&] { SafetensorsFile::open(f); }, "out of range");
  write_file(f, st_bytes(R"({"a": {"dtype": "F32", "shape": [9999999999, 9999999999, 9999999999]}, "b": 1})", ""));
  expect_error([&] { SafetensorsFile::open(f); }, "x.safetensors");
  write_file(f, st_bytes(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                             "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})", std::string(12, '\0')));
  expect_error([&] { SafetensorsFile::open(f); }, "overlap");
  auto d2 = test::tmp_dir("st_bad_index");
  std::vector<float> b = {1, 2};
  write_safetensors(d2 / "a.safetensors", {{"b", DType::F32, {2}, b.data()}});
  write_file(d2 / "model.safetensors.index.json", R"({"weight_map": {"zz": "a.safetensors"}})");
  expect_error([&] { TensorStore::open_dir(d2); }, "tensor 'zz' is not in 'a.safetensors'");
  write_file(d2 / "model.safetensors.index.json", R"({"weight_map": {"b": "../a.safetensors"}})");
  expect_error([&] { TensorStore::open_dir(d2); }, "outside the folder");
  expect_error([&] { TensorStore::open_dir(test::tmp_dir("st_empty")); }, "no *.safetensors files");
}

// A tiny model whose tensors disagree with its config: the error names the tensor and shapes.
TEST(Weights, ShapeMismatchNamesTensor) {
  auto dir = test::tmp_dir("w_bad");
  write_file(dir / "config.json", R"({"architectures": ["LlamaForCausalLM"], "hidden_size": 4,
    "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 6,
    "tie_word_embeddings": true})");
  std::vector<float> z(64, 0.f);
  write_safetensors(dir / "model.safetensors",
                    {{"model.embed_tokens.weight", DType::F32, {6, 4}, z.data()},
                     {"model.norm.weight", DType::F32, {4}, z.data()},
                     {"model.layers.0.input_layernorm.weight", DType::F32, {4}, z.data()},
                     {"model.layers.0.post_attention_layernorm.weight", DType::F32, {4}, z.data()},
                     {"model.layers.0.self_attn.q_proj.weight", DType::F32, {4, 3}, z.data()}});
  const auto c = load_config(dir);
  auto store = TensorStore::open_dir(dir);
  expect_error([&] { load_weights(c, store); }, "q_proj.weight': shape [4, 3] but the config implies [4, 4]");
  write_safetensors(dir / "model.safetensors",
                    {{"model.embed_tokens.weight", DType::I32, {6, 4}, z.data()}});
  auto store2 = TensorStore::open_dir(dir);
  expect_error([&] { load_weights(c, store2); }, "dtype I32");
}

}  // namespace
}  // namespace qf
