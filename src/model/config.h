// config.json of a Hugging Face model folder, in both layouts seen in the wild: transformers 4
// (top-level rope_theta / rope_scaling / torch_dtype) and transformers 5 (rope_parameters / dtype).
#pragma once
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "model/architecture.h"

namespace qf {

struct RopeConfig {
  std::string type = "default";  // default | linear | llama3
  double theta = 10000.0;
  double factor = 1.0;
  double low_freq_factor = 1.0, high_freq_factor = 4.0;  // llama3
  int64_t original_max_position = 8192;                  // llama3
};

struct QuantConfig {
  std::string method;  // "", "exl2", "gptq", ...
  double bits = 0;
  double head_bits = 0;
  int64_t group_size = 0;
  bool desc_act = false, sym = true;
  std::string checkpoint_format;  // gptq: "gptq" (v1) or "gptq_v2"
};

struct ModelConfig {
  std::filesystem::path dir;
  const Architecture* arch = nullptr;
  std::string hf_class, model_type, dtype;
  int64_t hidden = 0, intermediate = 0, n_layers = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0;
  int64_t vocab = 0, max_position = 2048;
  int64_t sliding_window = 0;  // 0 = none
  double rms_eps = 1e-6;
  bool tie_embeddings = false;
  bool attention_bias = false, mlp_bias = false;
  RopeConfig rope;
  std::optional<int64_t> bos_id;
  std::vector<int64_t> eos_ids;
  QuantConfig quant;

  int64_t q_dim() const { return n_heads * head_dim; }
  int64_t kv_dim() const { return n_kv_heads * head_dim; }
};

ModelConfig load_config(const std::filesystem::path& model_dir);

}  // namespace qf
