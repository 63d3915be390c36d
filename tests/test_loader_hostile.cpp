// Issue 9, "every input file is hostile": model folders come from strangers. Every malformed
// config.json, safetensors header, index, EXL2/GPTQ tensor set or non-finite weight must end in one
// line naming the file (or tensor) and the limit, never in a crash, a wrapped integer, a silently
// different model or NaN output. Runs under ASan+UBSan in CI (parser label).
#include <cmath>
#include <cstdio>
#include <fstream>
#include <limits>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "formats/quant_bits.h"
#include "formats/quant_linear.h"
#include "formats/safetensors.h"
#include "model/config.h"
#include "model/weights.h"
#include "quant_layers.h"
#include "test_util.h"

namespace qf {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using test::error_of;
using test::expect_error;
using test::write_file;

// Expects `msg` to be one line holding every needle.
void expect_msg(const std::string& msg, const std::vector<std::string>& needles, const std::string& ctx = "") {
  EXPECT_FALSE(msg.empty()) << ctx << ": no error";
  EXPECT_EQ(msg.find('\n'), std::string::npos) << ctx << ": " << msg;
  for (const auto& n : needles) EXPECT_NE(msg.find(n), std::string::npos) << ctx << ": wanted '" << n << "' in: " << msg;
}

// ---- config.json ------------------------------------------------------------------------------

json base_config() {
  return json::parse(R"({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8,
    "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
    "vocab_size": 6, "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "tie_word_embeddings": true, "bos_token_id": 1, "eos_token_id": 2})");
}

// load_config's error for the base config with `patch` (a JSON object) merged over it at the top.
std::string config_error(const std::string& patch, const std::string& name) {
  auto dir = test::tmp_dir("cfg_" + name);
  json c = base_config();
  c.update(json::parse(patch));
  write_file(dir / "config.json", c.dump());
  return error_of([&] { load_config(dir); });
}

TEST(HostileConfig, BaseConfigLoads) {
  EXPECT_EQ(config_error("{}", "base"), "");
}

TEST(HostileConfig, NormEpsAndRopeThetaOutOfRange) {
  const std::string eps_range = "(must be a number greater than 0 and at most 1)";
  expect_msg(config_error(R"({"rms_norm_eps": -1e-5})", "eps_neg"), {"config.json: rms_norm_eps is -1e-05", eps_range});
  expect_msg(config_error(R"({"rms_norm_eps": 0})", "eps_zero"), {"rms_norm_eps is 0", eps_range});
  expect_msg(config_error(R"({"rms_norm_eps": 1e-999})", "eps_underflow"), {"rms_norm_eps is 0.0"});
  expect_msg(config_error(R"({"rms_norm_eps": 2})", "eps_big"), {"rms_norm_eps is 2"});
  expect_msg(config_error(R"({"rms_norm_eps": "1e-5"})", "eps_str"), {"rms_norm_eps is '1e-5'", eps_range});
  for (const char* t : {"0", "-10000", "0.5", "1e31"})
    expect_msg(config_error(str(R"({"rope_theta": )", t, "}"), str("theta", t)),
               {"config.json: rope_theta is ", "(must be a number from 1 to 1e+30)"}, t);
  expect_msg(config_error(R"({"rope_parameters": {"rope_type": "default", "rope_theta": -1}})", "theta5"),
             {"rope_parameters.rope_theta is -1"});
  // JSON has no NaN or Infinity (Python's json.dump writes them anyway): a parse error, one line.
  auto dir = test::tmp_dir("cfg_nan");
  for (const char* v : {"NaN", "Infinity", "-Infinity", "1e999"}) {
    write_file(dir / "config.json", str(R"({"architectures": ["LlamaForCausalLM"], "rms_norm_eps": )", v, "}"));
    expect_msg(error_of([&] { load_config(dir); }), {"config.json: malformed JSON"}, v);
  }
}

TEST(HostileConfig, MaxPositionEmbeddings) {
  const std::string range = "(must be an integer from 1 to 16777216)";
  expect_msg(config_error(R"({"max_position_embeddings": 0})", "mp0"), {"config.json: max_position_embeddings is 0", range});
  expect_msg(config_error(R"({"max_position_embeddings": -1})", "mpm1"), {"max_position_embeddings is -1", range});
  expect_msg(config_error(R"({"max_position_embeddings": 1000000000000})", "mpbig"), {"is 1000000000000", range});
  expect_msg(config_error(R"({"max_position_embeddings": 18446744073709551615})", "mpu64"),
             {"is 18446744073709551615", range});
  expect_msg(config_error(R"({"max_position_embeddings": 2048.5})", "mpf"), {"is 2048.5", range});
}

TEST(HostileConfig, SizesRangeAndDivisibility) {
  struct Case { const char* patch; std::vector<std::string> needles; };
  const std::vector<Case> cases = {
      {R"({"hidden_size": 0})", {"hidden_size is 0 (must be an integer from 1 to 1048576)"}},
      {R"({"hidden_size": -8})", {"hidden_size is -8"}},
      {R"({"hidden_size": 18446744073709551615})", {"hidden_size is 18446744073709551615"}},
      {R"({"hidden_size": 1099511627776})", {"hidden_size is 1099511627776"}},
      {R"({"hidden_size": "8"})", {"hidden_size is '8'"}},
      {R"({"intermediate_size": 0})", {"intermediate_size is 0"}},
      {R"({"num_hidden_layers": 0})", {"num_hidden_layers is 0 (must be an integer from 1 to 16384)"}},
      {R"({"num_hidden_layers": 100000})", {"num_hidden_layers is 100000"}},
      {R"({"num_attention_heads": 0})", {"num_attention_heads is 0"}},
      {R"({"num_key_value_heads": 0})", {"num_key_value_heads is 0 (must be an integer from 1 to 2)"}},
      {R"({"num_key_value_heads": 4})", {"num_key_value_heads is 4 (must be an integer from 1 to 2)"}},
      {R"({"num_attention_heads": 4, "num_key_value_heads": 3, "head_dim": 2})",
       {"num_attention_heads 4 is not a multiple of num_key_value_heads 3"}},
      {R"({"hidden_size": 9, "num_attention_heads": 2})", {"hidden_size 9 is not a multiple of num_attention_heads 2"}},
      {R"({"head_dim": 3})", {"head_dim is 3 (must be even for RoPE)"}},
      {R"({"head_dim": 0})", {"head_dim is 0"}},
      {R"({"num_attention_heads": 65536, "num_key_value_heads": 1, "head_dim": 65536})",
       {"num_attention_heads 65536 x head_dim 65536 = 4294967296 (must be at most 1048576)"}},
      {R"({"vocab_size": 0})", {"vocab_size is 0"}},
      {R"({"vocab_size": 2147483648})", {"vocab_size is 2147483648 (must be an integer from 1 to 16777216)"}},
      {R"({"sliding_window": -1})", {"sliding_window is -1"}},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    const std::string msg = config_error(cases[i].patch, str("size", i));
    expect_msg(msg, {"config.json: "}, cases[i].patch);
    for (const auto& n : cases[i].needles) EXPECT_NE(msg.find(n), std::string::npos) << cases[i].patch << ": " << msg;
  }
  // Missing required fields still say so.
  auto dir = test::tmp_dir("cfg_missing");
  json c = base_config();
  c.erase("vocab_size");
  write_file(dir / "config.json", c.dump());
  expect_msg(error_of([&] { load_config(dir); }), {"missing field 'vocab_size'"});
}

TEST(HostileConfig, BooleansMustBeBooleans) {
  expect_msg(config_error(R"({"tie_word_embeddings": "yes"})", "tie"),
             {"config.json: tie_word_embeddings is 'yes' (must be true or false)"});
  expect_msg(config_error(R"({"tie_word_embeddings": 1})", "tie1"), {"tie_word_embeddings is 1 (must be true or false)"});
  expect_msg(config_error(R"({"mlp_bias": "false"})", "mlpb"), {"mlp_bias is 'false' (must be true or false)"});
  expect_msg(config_error(R"({"attention_bias": 0})", "attb"), {"attention_bias is 0 (must be true or false)"});
  expect_msg(config_error(R"({"use_sliding_window": "no"})", "usw"), {"use_sliding_window is 'no'"});
  // null means "not given", as transformers writes it.
  EXPECT_EQ(config_error(R"({"tie_word_embeddings": null, "sliding_window": null, "head_dim": null})", "nulls"), "");
}

TEST(HostileConfig, TokenIdsRopeScalingAndTypes) {
  expect_msg(config_error(R"({"bos_token_id": 6})", "bos"),
             {"bos_token_id holds 6 (token ids must be integers from 0 to 5"});
  expect_msg(config_error(R"({"eos_token_id": [2, -1]})", "eos"), {"eos_token_id holds -1"});
  expect_msg(config_error(R"({"eos_token_id": "2"})", "eoss"), {"eos_token_id holds '2'"});
  expect_msg(config_error(R"({"rope_scaling": "linear"})", "rs_str"), {"rope_scaling is 'linear' (must be an object or null)"});
  expect_msg(config_error(R"({"rope_scaling": {"type": "linear", "factor": 0}})", "rs_f0"),
             {"rope_scaling.factor is 0 (must be a number greater than 0"});
  expect_msg(config_error(R"({"rope_scaling": {"type": "linear", "factor": -2}})", "rs_fneg"), {"rope_scaling.factor is -2"});
  expect_msg(config_error(R"({"rope_scaling": {"rope_type": 3}})", "rs_t3"), {"rope_scaling.rope_type is 3 (must be a string)"});
  expect_msg(config_error(R"({"rope_scaling": {"rope_type": "llama3", "factor": 8, "low_freq_factor": 4,
                                 "high_freq_factor": 4}})", "rs_l3"),
             {"rope_scaling.high_freq_factor (4) must be greater than low_freq_factor (4)"});
  expect_msg(config_error(R"({"rope_scaling": {"rope_type": "llama3", "original_max_position_embeddings": 0}})", "rs_omp"),
             {"rope_scaling.original_max_position_embeddings is 0"});
  expect_msg(config_error(R"({"rope_scaling": {"rope_type": "yarn\nx"}})", "rs_nl"), {"unsupported RoPE type 'yarn\\x0Ax'"});
  expect_msg(config_error(R"({"architectures": "LlamaForCausalLM"})", "arch"), {"architectures is 'LlamaForCausalLM'"});
  expect_msg(config_error(R"({"architectures": ["Evil\nModel"]})", "archnl"), {"unknown architecture 'Evil\\x0AModel'"});
  expect_msg(config_error(R"({"quantization_config": "gptq"})", "qc"), {"quantization_config is 'gptq' (must be an object)"});
}

TEST(HostileConfig, GptqQuantizationConfig) {
  const std::string bits = "(GPTQ bits must be 2, 3, 4 or 8)";
  expect_msg(config_error(R"({"quantization_config": {"quant_method": "gptq", "bits": 4.7}})", "b47"),
             {"config.json: quantization_config.bits is 4.7", bits});
  expect_msg(config_error(R"({"quantization_config": {"quant_method": "gptq", "bits": 1e30}})", "b1e30"),
             {"quantization_config.bits is 1e+30", bits});
  expect_msg(config_error(R"({"quantization_config": {"quant_method": "gptq", "bits": 5}})", "b5"), {"bits is 5", bits});
  expect_msg(config_error(R"({"quantization_config": {"quant_method": "gptq", "bits": "4"}})", "bs"), {"bits is '4'"});
  for (const char* g : {"0", "-2", "-1e9", "128.5", "\"128\"", "4294967296"})
    expect_msg(config_error(str(R"({"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": )", g, "}}"),
                            str("g", std::string(g).size())),
               {"quantization_config.group_size is ", "(must be -1 for one group, or from 1 to 2147483648)"}, g);
  expect_msg(config_error(R"({"quantization_config": {"quant_method": "gptq", "bits": 4, "desc_act": "yes"}})", "da"),
             {"quantization_config.desc_act is 'yes' (must be true or false)"});
  EXPECT_EQ(config_error(R"({"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": -1}})", "gm1"), "");
  // EXL2's bits is a bit-rate target: fractional is fine.
  EXPECT_EQ(config_error(R"({"quantization_config": {"quant_method": "exl2", "bits": 4.65, "head_bits": 6}})", "exl2"), "");
  expect_msg(config_error(R"({"quantization_config": {"quant_method": "exl2", "bits": 1e30}})", "exl2big"),
             {"quantization_config.bits is 1e+30"});
  // AutoGPTQ's separate quantize_config.json is checked the same way and named.
  auto dir = test::tmp_dir("cfg_qc_file");
  write_file(dir / "config.json", base_config().dump());
  write_file(dir / "quantize_config.json", R"({"bits": 3.5, "group_size": 128})");
  expect_msg(error_of([&] { load_config(dir); }), {"quantize_config.json: bits is 3.5", bits});
  // A QuantConfig built in code never reaches an undefined float -> int cast.
  QuantConfig q;
  q.method = "gptq";
  q.bits = 1e30;
  expect_msg(error_of([&] { quant_hints(q); }), {"bits 1e+30"});
}

// ---- tiny model folders -----------------------------------------------------------------------

// Every tensor of a Llama of base_config()'s shape (hidden 8, FFN 16, 2 heads of 4, 1 KV head,
// vocab 6) for `layers` layers, as small F32 values.
std::map<std::string, std::pair<std::vector<int64_t>, std::vector<float>>> tiny_tensors(int layers) {
  std::map<std::string, std::pair<std::vector<int64_t>, std::vector<float>>> t;
  auto add = [&](const std::string& n, std::vector<int64_t> shape) {
    int64_t count = 1;
    for (int64_t d : shape) count *= d;
    std::vector<float> v(static_cast<size_t>(count));
    for (size_t i = 0; i < v.size(); ++i) v[i] = 0.01f * static_cast<float>((i * 7 + n.size()) % 13) - 0.05f;
    t[n] = {shape, v};
  };
  add("model.embed_tokens.weight", {6, 8});
  add("model.norm.weight", {8});
  for (int L = 0; L < layers; ++L) {
    const std::string p = str("model.layers.", L, ".");
    add(p + "input_layernorm.weight", {8});
    add(p + "post_attention_layernorm.weight", {8});
    add(p + "self_attn.q_proj.weight", {8, 8});
    add(p + "self_attn.k_proj.weight", {4, 8});
    add(p + "self_attn.v_proj.weight", {4, 8});
    add(p + "self_attn.o_proj.weight", {8, 8});
    add(p + "mlp.gate_proj.weight", {16, 8});
    add(p + "mlp.up_proj.weight", {16, 8});
    add(p + "mlp.down_proj.weight", {8, 16});
  }
  return t;
}

using Tensors = std::map<std::string, std::pair<std::vector<int64_t>, std::vector<float>>>;

void write_tensors(const fs::path& file, const Tensors& t, DType dt = DType::F32) {
  std::vector<std::vector<uint16_t>> half;
  std::vector<TensorToWrite> w;
  for (const auto& [name, sv] : t) {
    if (dt == DType::F32) {
      w.push_back({name, dt, sv.first, sv.second.data()});
    } else {
      half.emplace_back();
      for (float f : sv.second) half.back().push_back(dt == DType::F16 ? f32_to_fp16(f) : f32_to_bf16(f));
      w.push_back({name, dt, sv.first, half.back().data()});
    }
  }
  write_safetensors(file, w);
}

fs::path tiny_folder(const std::string& name, const json& config, const Tensors& t, DType dt = DType::F32) {
  auto dir = test::tmp_dir(name);
  write_file(dir / "config.json", config.dump());
  write_tensors(dir / "model.safetensors", t, dt);
  return dir;
}

std::string weights_error(const fs::path& dir, const WeightLoadOptions& o = {}) {
  return error_of([&] {
    const ModelConfig c = load_config(dir);
    const TensorStore s = TensorStore::open_dir(dir);
    load_weights(c, s, o);
  });
}

TEST(HostileWeights, TinyModelLoads) {
  EXPECT_EQ(weights_error(tiny_folder("tiny_ok", base_config(), tiny_tensors(2))), "");
  EXPECT_EQ(weights_error(tiny_folder("tiny_ok16", base_config(), tiny_tensors(2), DType::F16)), "");
}

TEST(HostileWeights, LayerCountMustMatchTheFile) {
  json c = base_config();
  c["num_hidden_layers"] = 1;  // the file has 5 layers: running 1 would be a different model
  expect_msg(weights_error(tiny_folder("layers_fewer", c, tiny_tensors(5))),
             {"model.safetensors: tensor 'model.layers.1.", "belongs to layer 1",
              "config.json has num_hidden_layers 1 (layers 0..0)"});
  c["num_hidden_layers"] = 3;  // the file has 2
  expect_msg(weights_error(tiny_folder("layers_more", c, tiny_tensors(2))),
             {"missing tensor 'model.layers.2.input_layernorm.weight'"});
  // A stray tensor of a far layer, even one unknown to the architecture.
  Tensors t = tiny_tensors(2);
  t["model.layers.99999999999999999999.foo"] = {{1}, {0.f}};
  expect_msg(weights_error(tiny_folder("layers_huge", base_config(), t)), {"belongs to layer (huge)"});
}

TEST(HostileWeights, MlpBiasIsBlamedOnMlpBias) {
  json c = base_config();
  c["mlp_bias"] = true;
  expect_msg(weights_error(tiny_folder("mlp_bias", c, tiny_tensors(2))),
             {"tensor 'model.layers.0.mlp.gate_proj.bias': missing (config.json has mlp_bias true)"});
  c = base_config();
  c["attention_bias"] = true;
  expect_msg(weights_error(tiny_folder("attn_bias", c, tiny_tensors(2))),
             {"q_proj.bias': missing (config.json has attention_bias true)"});
  c = base_config();
  c["architectures"] = {"Qwen2ForCausalLM"};
  expect_msg(weights_error(tiny_folder("qwen_bias", c, tiny_tensors(2))), {"missing (Qwen2ForCausalLM has q/k/v biases)"});
  // With the biases there, it loads.
  Tensors t = tiny_tensors(2);
  for (int L = 0; L < 2; ++L)
    for (const char* p : {"gate_proj", "up_proj"}) t[str("model.layers.", L, ".mlp.", p, ".bias")] = {{16}, std::vector<float>(16)};
  for (int L = 0; L < 2; ++L) t[str("model.layers.", L, ".mlp.down_proj.bias")] = {{8}, std::vector<float>(8)};
  c = base_config();
  c["mlp_bias"] = true;
  EXPECT_EQ(weights_error(tiny_folder("mlp_bias_ok", c, t)), "");
}

TEST(HostileWeights, NonFiniteWeightsAreFoundAtLoad) {
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  struct Case { std::string tensor; size_t index; float value; DType dt; std::string needle; };
  const std::vector<Case> cases = {
      {"model.norm.weight", 3, nan, DType::F32, "tensor 'model.norm.weight': element [3] is nan (weights must be finite)"},
      {"model.layers.1.input_layernorm.weight", 7, -inf, DType::F16, "input_layernorm.weight': element [7] is -inf"},
      {"model.embed_tokens.weight", 2 * 8 + 1, inf, DType::BF16, "model.embed_tokens.weight': element [2, 1] is inf"},
      {"model.layers.0.self_attn.q_proj.weight", 8 * 5 + 6, nan, DType::F16, "q_proj.weight': element [5, 6] is nan"},
      {"model.layers.1.mlp.down_proj.weight", 16 * 7 + 15, nan, DType::BF16, "down_proj.weight': element [7, 15] is nan"},
  };
  for (size_t i = 0; i < cases.size(); ++i) {
    Tensors t = tiny_tensors(2);
    t[cases[i].tensor].second[cases[i].index] = cases[i].value;
    const auto dir = tiny_folder(str("nonfinite", i), base_config(), t, cases[i].dt);
    expect_msg(weights_error(dir), {"model.safetensors: ", cases[i].needle}, cases[i].tensor);
    // The large tensors' scan can be turned off; the small ones are always checked.
    const bool small = cases[i].tensor.find("norm") != std::string::npos;
    EXPECT_EQ(weights_error(dir, {.scan_large = false}).empty(), !small) << cases[i].tensor;
  }
  // An untied head and a bias are checked too.
  json c = base_config();
  c["tie_word_embeddings"] = false;
  Tensors t = tiny_tensors(2);
  t["lm_head.weight"] = {{6, 8}, std::vector<float>(48)};
  t["lm_head.weight"].second[47] = nan;
  expect_msg(weights_error(tiny_folder("nonfinite_head", c, t)), {"lm_head.weight': element [5, 7] is nan"});
  t = tiny_tensors(2);
  t["model.layers.0.self_attn.o_proj.bias"] = {{8}, std::vector<float>(8)};
  t["model.layers.0.self_attn.o_proj.bias"].second[4] = inf;
  expect_msg(weights_error(tiny_folder("nonfinite_bias", base_config(), t)), {"o_proj.bias': element [4] is inf"});
}

TEST(HostileWeights, FirstNonFiniteFindsEveryPosition) {
  // The chunked, vectorized scan: every position of a long tensor, every special value.
  for (DType dt : {DType::F32, DType::F16, DType::BF16}) {
    const int64_t n = 3 * 4096 + 17;
    std::vector<uint32_t> raw(static_cast<size_t>(n));  // big enough for every dtype
    TensorView v;
    v.dtype = dt;
    v.shape = {n};
    v.data = raw.data();
    auto set = [&](int64_t i, float f) {
      if (dt == DType::F32) std::memcpy(reinterpret_cast<char*>(raw.data()) + 4 * i, &f, 4);
      else {
        const uint16_t h = dt == DType::F16 ? f32_to_fp16(f) : f32_to_bf16(f);
        std::memcpy(reinterpret_cast<char*>(raw.data()) + 2 * i, &h, 2);
      }
    };
    for (int64_t i = 0; i < n; ++i) set(i, i % 2 ? 65504.f : -1e-7f);  // large and tiny finite values
    EXPECT_EQ(first_non_finite(v), -1);
    for (int64_t pos : {int64_t{0}, int64_t{4095}, int64_t{4096}, n - 1}) {
      set(pos, std::numeric_limits<float>::quiet_NaN());
      EXPECT_EQ(first_non_finite(v), pos);
      EXPECT_EQ(first_non_finite(v, pos + 1, n), -1);
      set(pos, 1.f);
    }
  }
}

TEST(HostileWeights, MisalignedDataIsCopiedNotReadMisaligned) {
  // A header whose length is not a multiple of 8 puts every tensor at an odd address; the loader
  // hands out aligned copies (UBSan would flag a misaligned float load).
  auto dir = test::tmp_dir("misaligned");
  write_file(dir / "config.json", base_config().dump());
  const Tensors t = tiny_tensors(2);
  json header = json::object();
  std::string data;
  for (const auto& [name, sv] : t) {
    const size_t b = data.size();
    data.append(reinterpret_cast<const char*>(sv.second.data()), sv.second.size() * 4);
    header[name] = {{"dtype", "F32"}, {"shape", sv.first}, {"data_offsets", {b, data.size()}}};
  }
  std::string h = header.dump();
  if ((h.size() + 8) % 2 == 0) h += ' ';
  std::string file(8, '\0');
  for (int i = 0; i < 8; ++i) file[static_cast<size_t>(i)] = static_cast<char>(static_cast<uint64_t>(h.size()) >> (8 * i));
  write_file(dir / "model.safetensors", file + h + data);
  const ModelConfig c = load_config(dir);
  const TensorStore s = TensorStore::open_dir(dir);
  const ModelWeights w = load_weights(c, s);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(w.layers[1].q.weight.data) % 4, 0u);
  EXPECT_EQ(to_f32(w.layers[1].q.weight), t.at("model.layers.1.self_attn.q_proj.weight").second);
  EXPECT_EQ(to_f32(w.final_norm), t.at("model.norm.weight").second);
}

// ---- safetensors headers ----------------------------------------------------------------------

std::string st_bytes(const std::string& header, const std::string& data) {
  std::string out(8, '\0');
  const uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[static_cast<size_t>(i)] = static_cast<char>(n >> (8 * i));
  return out + header + data;
}

std::string open_error(const std::string& bytes, const std::string& name) {
  const auto f = test::tmp_dir("st_" + name) / "x.safetensors";
  write_file(f, bytes);
  return error_of([&] { SafetensorsFile::open(f); });
}

TEST(HostileSafetensors, DuplicateTensorNames) {
  const std::string e = R"({"dtype": "F32", "shape": [2], "data_offsets": [0, 8]})";
  expect_msg(open_error(st_bytes(str(R"({"a": )", e, R"(, "b": )", e, R"(, "a": )", e, "}"), std::string(8, '\0')), "dup"),
             {"x.safetensors: safetensors header: tensor 'a' appears twice"});
  // The name is escaped: the message stays one line.
  expect_msg(open_error(st_bytes(str(R"({"a\nb": )", e, R"(, "a\nb": )", e, "}"), std::string(8, '\0')), "dup_nl"),
             {"tensor 'a\\x0Ab' appears twice"});
  expect_msg(open_error(st_bytes(str(R"({"__metadata__": {}, "__metadata__": {}})"), ""), "dup_meta"),
             {"tensor '__metadata__' appears twice"});
  // The same key inside an entry is a duplicate of nlohmann's kind too, but harmless: not checked.
}

// One malformed header: the file is `header` followed by `data_bytes` zero bytes.
struct BadHeader {
  const char* name;
  std::string header;
  size_t data_bytes;
  std::vector<std::string> needles;
};

TEST(HostileSafetensors, BadHeaders) {
  const std::string kTooMany = "has more than 2^50 elements";
  const BadHeader cases[] = {
      // Absurd shapes and offsets. shape_2p50 is large but representable: its byte count is checked
      // against data_offsets without overflow.
      {"shape_0max", R"({"a": {"dtype": "F32", "shape": [0, 18446744073709551615], "data_offsets": [0, 0]}})", 0,
       {"tensor 'a': shape [0, 18446744073709551615]", kTooMany}},
      {"shape_2p64", R"({"a": {"dtype": "F16", "shape": [4294967296, 4294967296, 0], "data_offsets": [0, 0]}})", 0,
       {kTooMany}},
      {"shape_i64max", R"({"a": {"dtype": "F64", "shape": [9223372036854775807], "data_offsets": [0, 0]}})", 0,
       {kTooMany}},
      {"shape_2p50", R"({"a": {"dtype": "F64", "shape": [33554432, 33554432], "data_offsets": [0, 8]}})", 8,
       {"needs 9007199254740992 bytes but data_offsets span 8"}},
      {"shape_float", R"({"a": {"dtype": "F32", "shape": [2, 2.5], "data_offsets": [0, 8]}})", 8,
       {"shape [2, 2.5] must hold non-negative integers"}},
      {"shape_nested", R"({"a": {"dtype": "F32", "shape": [1, [2]], "data_offsets": [0, 8]}})", 8,
       {"nested deeper than 3 levels"}},
      {"shape_rank", R"({"a": {"dtype": "F32", "shape": [1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1], "data_offsets": [0, 4]}})", 4,
       {"shape has 17 dimensions (at most 16 supported)"}},
      {"off_neg", R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}})", 8,
       {"data_offsets must be two non-negative integers"}},
      {"off_max", R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [18446744073709551615, 7]}})", 8,
       {"out of range"}},
      // Not a header at all, or not the header's types.
      {"hdr_array", "[]", 0, {"safetensors header is not a JSON object (array)"}},
      {"hdr_num", "7", 0, {"safetensors header is not a JSON object (number)"}},
      {"hdr_empty", "", 0, {"x.safetensors: safetensors header: malformed JSON"}},
      {"hdr_trunc", "{\"a\": 1", 0, {"malformed JSON"}},
      {"hdr_1e999", R"({"a": {"dtype": "F32", "shape": [1e999], "data_offsets": [0, 0]}})", 0,
       {"x.safetensors: safetensors header: malformed JSON", "1e999"}},
      {"meta_arr", R"({"__metadata__": [1]})", 0, {"__metadata__ must be an object of strings"}},
      {"meta_val", R"({"__metadata__": {"k\n": 1}})", 0, {"__metadata__ value 'k\\x0A' is not a string"}},
      {"meta_obj", R"({"__metadata__": {"k": {"x": 1}}})", 0, {"is not a string"}},
      {"dtype_f8", R"({"a": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}})", 2,
       {"tensor 'a': unknown dtype 'F8_E4M3' (known: F32, F16, BF16"}},
      {"dtype_ctl", R"({"a": {"dtype": "f\u0001", "shape": [2], "data_offsets": [0, 2]}})", 2,
       {"unknown dtype 'f\\x01'"}},
      {"dtype_num", R"({"a": {"dtype": 16, "shape": [2], "data_offsets": [0, 2]}})", 2, {"missing dtype"}},
      {"entry_arr", R"({"a": [1, 2]})", 0, {"tensor 'a': header entry is not an object"}},
  };
  for (const BadHeader& c : cases)
    expect_msg(open_error(st_bytes(c.header, std::string(c.data_bytes, '\0')), c.name), c.needles, c.name);
  // A zero-size tensor with a sane shape is fine.
  EXPECT_EQ(open_error(st_bytes(R"({"a": {"dtype": "F32", "shape": [0, 4], "data_offsets": [0, 0]}})", ""), "empty_ok"), "");
}

TEST(HostileSafetensors, HeaderDepthAndLength) {
  // Nesting deeper than a header can be: refused before the tree is built.
  expect_msg(open_error(st_bytes(std::string(100000, '[') + std::string(100000, ']'), ""), "deep"),
             {"JSON nested deeper than 3 levels"});
  expect_msg(open_error(st_bytes(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": {"y": {"z": 1}}}})",
                                 std::string(8, '\0')),
                        "deep_entry"),
             {"nested deeper"});
  // Header length: past the end of the file, 2^64-1, or more than any header may be.
  std::string len(8, '\xff');
  expect_msg(open_error(len + "{}", "len_max"), {"header length 18446744073709551615 exceeds the file size 10"});
  auto f = test::tmp_dir("st_len_big") / "x.safetensors";
  {
    std::string h(8, '\0');
    const uint64_t n = (256ull << 20) + 1;
    for (int i = 0; i < 8; ++i) h[static_cast<size_t>(i)] = static_cast<char>(n >> (8 * i));
    write_file(f, h);
    fs::resize_file(f, n + 8);  // sparse: no disk used
  }
  expect_msg(error_of([&] { SafetensorsFile::open(f); }), {"header length 268435457 is more than the 256 MiB"});
}

// ---- sharded folders and the index ------------------------------------------------------------

TEST(HostileIndex, DuplicatesOutsideFolderAndMissingShards) {
  std::vector<float> v = {1, 2};
  auto shards = [&](const std::string& name) {
    auto d = test::tmp_dir(name);
    write_safetensors(d / "model-00001-of-00002.safetensors", {{"a", DType::F32, {2}, v.data()}});
    write_safetensors(d / "model-00002-of-00002.safetensors", {{"b", DType::F32, {2}, v.data()}});
    return d;
  };
  const std::string s1 = "model-00001-of-00002.safetensors", s2 = "model-00002-of-00002.safetensors";
  {  // fine
    auto d = shards("idx_ok");
    write_file(d / "model.safetensors.index.json", str(R"({"weight_map": {"a": ")", s1, R"(", "b": ")", s2, R"("}})"));
    EXPECT_EQ(error_of([&] { TensorStore::open_dir(d); }), "");
  }
  {  // the same tensor listed twice (nlohmann would keep the last)
    auto d = shards("idx_dup");
    write_file(d / "model.safetensors.index.json",
               str(R"({"weight_map": {"a": ")", s1, R"(", "b": ")", s2, R"(", "a": ")", s2, R"("}})"));
    expect_msg(error_of([&] { TensorStore::open_dir(d); }),
               {"model.safetensors.index.json: weight_map lists tensor 'a' twice"});
  }
  {  // the same tensor in two shards
    auto d = shards("idx_dup_shards");
    write_safetensors(d / s2, {{"b", DType::F32, {2}, v.data()}, {"a", DType::F32, {2}, v.data()}});
    write_file(d / "model.safetensors.index.json", str(R"({"weight_map": {"a": ")", s1, R"(", "b": ")", s2, R"("}})"));
    expect_msg(error_of([&] { TensorStore::open_dir(d); }), {s2, ": tensor 'a' is also in ", s1});
  }
  for (const char* bad : {"../model-00001-of-00002.safetensors", "/etc/passwd", "", ".", "..", "sub\\\\x.safetensors"}) {
    auto d = shards("idx_outside");
    write_file(d / "model.safetensors.index.json", str(R"({"weight_map": {"a": ")", bad, R"(", "b": ")", s2, R"("}})"));
    expect_msg(error_of([&] { TensorStore::open_dir(d); }), {"weight_map names a file outside the folder", "(for tensor 'a')"},
               bad);
  }
  {  // one shard of two missing: an error naming it, not "missing tensor" later
    auto d = shards("idx_missing");
    fs::remove(d / s2);
    write_file(d / "model.safetensors.index.json", str(R"({"weight_map": {"a": ")", s1, R"(", "b": ")", s2, R"("}})"));
    expect_msg(error_of([&] { TensorStore::open_dir(d); }),
               {"model.safetensors.index.json: shard 'model-00002-of-00002.safetensors' is missing from the folder",
                "1 tensor(s), e.g. 'b'"});
  }
  {  // a tensor the index places in a shard that does not hold it
    auto d = shards("idx_wrong_file");
    write_file(d / "model.safetensors.index.json", str(R"({"weight_map": {"a": ")", s2, R"(", "b": ")", s2, R"("}})"));
    expect_msg(error_of([&] { TensorStore::open_dir(d); }), {"tensor 'a' is not in 'model-00002-of-00002.safetensors'"});
  }
  {  // a file the index does not name is not part of the model (transformers ignores it too)
    auto d = shards("idx_extra");
    write_safetensors(d / "consolidated.safetensors", {{"a", DType::F32, {2}, v.data()}});
    write_file(d / "model.safetensors.index.json", str(R"({"weight_map": {"a": ")", s1, R"(", "b": ")", s2, R"("}})"));
    const TensorStore s = TensorStore::open_dir(d);
    EXPECT_EQ(s.files().size(), 2u);
    ASSERT_EQ(s.notes().size(), 1u);
    EXPECT_NE(s.notes()[0].find("ignoring 1 *.safetensors file(s)"), std::string::npos) << s.notes()[0];
    EXPECT_NE(s.notes()[0].find("consolidated.safetensors"), std::string::npos) << s.notes()[0];
  }
  {  // garbage index
    auto d = shards("idx_garbage");
    write_file(d / "model.safetensors.index.json", R"({"weight_map": {"a": 3}})");
    expect_msg(error_of([&] { TensorStore::open_dir(d); }), {"weight_map value for 'a' is not a string"});
    write_file(d / "model.safetensors.index.json", R"({"weight_map": [1]})");
    expect_msg(error_of([&] { TensorStore::open_dir(d); }), {"missing object 'weight_map'"});
    write_file(d / "model.safetensors.index.json", R"({"weight_map": {}, "weight_map": {}})");
    expect_msg(error_of([&] { TensorStore::open_dir(d); }), {"key 'weight_map' appears twice"});
    write_file(d / "model.safetensors.index.json", "{\"weight_map\": ");
    expect_msg(error_of([&] { TensorStore::open_dir(d); }), {"model.safetensors.index.json: malformed JSON"});
    write_file(d / "model.safetensors.index.json", R"({"metadata": {"total_size": 1e999}, "weight_map": {}})");
    expect_msg(error_of([&] { TensorStore::open_dir(d); }), {"model.safetensors.index.json: malformed JSON"});
    write_file(d / "model.safetensors.index.json", "[]");
    expect_msg(error_of([&] { TensorStore::open_dir(d); }), {"expected a JSON object"});
  }
}

// ---- EXL2 / GPTQ tensor sets ------------------------------------------------------------------

using namespace qf::test;  // quant_layers.h

std::vector<TensorToWrite> exl2_tensors(const Exl2Tensors& t) {
  return {{"layer.q_weight", DType::I32, {t.P, t.W}, t.q_weight.data()},
          {"layer.q_scale", DType::I32, {t.G, (t.W + 7) / 8}, t.q_scale.data()},
          {"layer.q_scale_max", DType::F16, {t.G}, t.q_scale_max.data()},
          {"layer.q_groups", DType::I16, {2 * t.G}, t.q_groups.data()},
          {"layer.q_invperm", DType::I32, {t.K}, t.q_invperm.data()}};
}

Exl2Tensors small_exl2() {
  Exl2Case c;
  c.K = 128;
  c.N = 32;
  c.groups = {{4, 64}, {3, 64}};
  return build_exl2(c);
}

std::string quant_error(const std::vector<TensorToWrite>& ts, const std::string& name, int64_t K, int64_t N,
                        const QuantHints& h = {}) {
  const auto path = test::tmp_dir("q_" + name) / "model.safetensors";
  write_safetensors(path, ts);
  const TensorStore store = TensorStore::from_files({path});
  return error_of([&] { load_linear(store, "layer", K, N, false, h); });
}

TEST(HostileQuant, TwoFormatsInOneLayer) {
  const Exl2Tensors t = small_exl2();
  std::vector<float> dense(static_cast<size_t>(t.K * t.N));
  auto ts = exl2_tensors(t);
  EXPECT_EQ(quant_error(ts, "exl2_ok", t.K, t.N), "");
  ts.push_back({"layer.weight", DType::F32, {t.N, t.K}, dense.data()});
  expect_msg(quant_error(ts, "exl2_dense", t.K, t.N),
             {"tensor 'layer.q_weight': layer 'layer' has both EXL2 (.q_weight) and dense (.weight) weights"});
  GptqCase gc;
  const GptqTensors g = build_gptq(gc);
  std::vector<TensorToWrite> gt = {{"layer.qweight", DType::I32, {g.rows, g.N}, g.qweight.data()},
                                   {"layer.qzeros", DType::I32, {g.G, g.zcols}, g.qzeros.data()},
                                   {"layer.scales", DType::F16, {g.G, g.N}, g.scales.data()},
                                   {"layer.g_idx", DType::I32, {g.K}, g.g_idx.data()}};
  EXPECT_EQ(quant_error(gt, "gptq_ok", g.K, g.N, hints_for(gc)), "");
  auto gd = gt;
  std::vector<float> gdense(static_cast<size_t>(g.K * g.N));
  gd.push_back({"layer.weight", DType::F32, {g.N, g.K}, gdense.data()});
  expect_msg(quant_error(gd, "gptq_dense", g.K, g.N, hints_for(gc)), {"has both GPTQ (.qweight) and dense (.weight)"});
  auto both = gt;
  for (const auto& x : exl2_tensors(t)) both.push_back(x);
  expect_msg(quant_error(both, "exl2_gptq", g.K, g.N), {"has both EXL2 (.q_weight) and GPTQ (.qweight)"});
  // Parts of a format without its main tensor, beside a dense weight.
  std::vector<TensorToWrite> stray = {{"layer.weight", DType::F32, {g.N, g.K}, gdense.data()}, gt[2]};
  expect_msg(quant_error(stray, "gptq_stray", g.K, g.N), {"tensor 'layer.scales': GPTQ tensor without layer.qweight"});
  stray = {{"layer.weight", DType::F32, {t.N, t.K}, dense.data()}, exl2_tensors(t)[3]};
  expect_msg(quant_error(stray, "exl2_stray", t.K, t.N), {"tensor 'layer.q_groups': EXL2 tensor without layer.q_weight"});
}

TEST(HostileQuant, GptqScalesGroupsAndActOrder) {
  GptqCase gc;
  GptqTensors g = build_gptq(gc);
  auto tensors = [&](GptqTensors& x, bool g_idx = true) {
    std::vector<TensorToWrite> v = {{"layer.qweight", DType::I32, {x.rows, x.N}, x.qweight.data()},
                                    {"layer.qzeros", DType::I32, {x.G, x.zcols}, x.qzeros.data()},
                                    {"layer.scales", DType::F16, {x.G, x.N}, x.scales.data()}};
    if (g_idx) v.push_back({"layer.g_idx", DType::I32, {x.K}, x.g_idx.data()});
    return v;
  };
  // A NaN or inf scale: found at load, with the element.
  GptqTensors bad = g;
  bad.scales[static_cast<size_t>(1 * g.N + 5)] = 0x7e00;  // fp16 NaN
  expect_msg(quant_error(tensors(bad), "sc_nan", g.K, g.N, hints_for(gc)),
             {"tensor 'layer.scales': element [1, 5] is nan (scales must be finite)"});
  bad = g;
  bad.scales.back() = 0xfc00;  // -inf
  expect_msg(quant_error(tensors(bad), "sc_inf", g.K, g.N, hints_for(gc)),
             {str("element [", g.G - 1, ", ", g.N - 1, "] is -inf")});
  // desc_act promised but no g_idx: the row order is unknown.
  QuantHints h = hints_for(gc);
  h.desc_act = true;
  expect_msg(quant_error(tensors(g, false), "da_no_gidx", g.K, g.N, h),
             {"tensor 'layer.qweight': the config says desc_act (act-order) but there is no layer.g_idx"});
  // A group size from the config that does not fit the scales.
  h = hints_for(gc);
  h.group_size = 96;
  expect_msg(quant_error(tensors(g, false), "gs96", g.K, g.N, h), {"groups do not fit"});
  h.group_size = std::numeric_limits<int64_t>::max();  // ceil_div must not overflow
  expect_msg(quant_error(tensors(g, false), "gsmax", g.K, g.N, h), {"groups do not fit"});
  // g_idx values past the groups, in an I64 g_idx.
  std::vector<int64_t> gi64(g.g_idx.begin(), g.g_idx.end());
  gi64[9] = int64_t{1} << 40;
  auto t64 = tensors(g, false);
  t64.push_back({"layer.g_idx", DType::I64, {g.K}, gi64.data()});
  expect_msg(quant_error(t64, "gi64", g.K, g.N, hints_for(gc)), {"layer.g_idx': entry 9 is 1099511627776, outside"});
}

TEST(HostileQuant, Exl2IndicesAndBitWidths) {
  for (int16_t b : {9, 1, 0, -1, 32767}) {
    Exl2Tensors t = small_exl2();
    t.q_groups[0] = b;
    expect_msg(quant_error(exl2_tensors(t), str("bits", b + 10), t.K, t.N),
               {"tensor 'layer.q_groups': group 0 has bit width ", "(EXL2 uses 2, 3, 4, 5, 6 or 8)"});
  }
  {  // a negative first packed row of the second group
    Exl2Tensors t = small_exl2();
    t.q_groups[3] = -5;
    expect_msg(quant_error(exl2_tensors(t), "row_neg", t.K, t.N), {"tensor 'layer.q_groups'"});
  }
  {  // q_perm out of range, or disagreeing with q_invperm
    Exl2Tensors t = small_exl2();
    std::vector<int32_t> perm(static_cast<size_t>(t.K));
    for (int64_t i = 0; i < t.K; ++i) perm[static_cast<size_t>(t.q_invperm[static_cast<size_t>(i)])] = static_cast<int32_t>(i);
    auto ts = exl2_tensors(t);
    ts.push_back({"layer.q_perm", DType::I32, {t.K}, perm.data()});
    EXPECT_EQ(quant_error(ts, "perm_ok", t.K, t.N), "");
    perm[3] = 1 << 30;
    expect_msg(quant_error(ts, "perm_big", t.K, t.N), {"tensor 'layer.q_perm': entry 3 is 1073741824"});
    perm[3] = -7;
    expect_msg(quant_error(ts, "perm_neg", t.K, t.N), {"tensor 'layer.q_perm': entry 3 is -7"});
  }
  {  // q_invperm out of range
    Exl2Tensors t = small_exl2();
    t.q_invperm[100] = 128;
    expect_msg(quant_error(exl2_tensors(t), "inv_big", t.K, t.N), {"layer.q_invperm': entry 100 is 128, outside 0..127"});
  }
  {  // a non-finite scale maximum
    Exl2Tensors t = small_exl2();
    t.q_scale_max[1] = 0x7c00;
    expect_msg(quant_error(exl2_tensors(t), "smax_inf", t.K, t.N), {"layer.q_scale_max': group 1 has scale inf"});
  }
}

// ---- through the CLI: one "qforge: error:" line, exit 1 ----------------------------------------

void expect_cli_error(const fs::path& dir, std::initializer_list<std::string> needles) {
  std::string out, err;
  const int rc = test::run_command(test::binary() + " inspect -m " + dir.string(), &out, &err);
  EXPECT_EQ(rc, 1) << err;
  while (!err.empty() && err.back() == '\n') err.pop_back();
  EXPECT_EQ(err.find('\n'), std::string::npos) << err;
  EXPECT_EQ(err.rfind("qforge: error: ", 0), 0u) << err;
  for (const auto& n : needles) EXPECT_NE(err.find(n), std::string::npos) << "wanted '" << n << "' in: " << err;
}

TEST(HostileCli, OneLineAndExitOne) {
  json c = base_config();
  c["max_position_embeddings"] = 0;
  expect_cli_error(tiny_folder("cli_mp0", c, tiny_tensors(2)),
                   {"config.json: max_position_embeddings is 0 (must be an integer from 1 to 16777216)"});
  c = base_config();
  c["tie_word_embeddings"] = "yes";
  expect_cli_error(tiny_folder("cli_tie", c, tiny_tensors(2)), {"tie_word_embeddings is 'yes' (must be true or false)"});
  c = base_config();
  c["num_hidden_layers"] = 1;
  expect_cli_error(tiny_folder("cli_layers", c, tiny_tensors(5)), {"num_hidden_layers 1"});
  Tensors t = tiny_tensors(2);
  t["model.layers.1.post_attention_layernorm.weight"].second[2] = std::numeric_limits<float>::quiet_NaN();
  expect_cli_error(tiny_folder("cli_nan", base_config(), t, DType::F16),
                   {"post_attention_layernorm.weight': element [2] is nan"});
  auto dir = tiny_folder("cli_dup", base_config(), tiny_tensors(2));
  const std::string e = R"({"dtype": "F32", "shape": [2], "data_offsets": [0, 8]})";
  write_file(dir / "model.safetensors", st_bytes(str(R"({"x\ny": )", e, R"(, "x\ny": )", e, "}"), std::string(8, '\0')));
  expect_cli_error(dir, {"model.safetensors: safetensors header: tensor 'x\\x0Ay' appears twice"});
}

// A real folder, when the shared data is there: still loads (nothing legitimate is refused).
TEST(HostileCli, RealFoldersStillLoad) {
  for (const char* m : {"models/stories260K-hf", "models/testmodel-llama-20m", "models/testmodel-llama-20m-exl2-4.0bpw"}) {
    if (!test::has_data(std::string(m) + "/config.json")) {
      std::printf("skipping %s: shared test data not found under %s\n", m, test::data_dir().c_str());
      continue;
    }
    EXPECT_EQ(weights_error(test::data_dir() / m), "") << m;
  }
}

}  // namespace
}  // namespace qf
