// The table of supported architectures: one row says how a Hugging Face architecture names its
// tensors and which optional parts (biases, tied head) it has. Adding a Llama-like architecture is
// one more row here.
#pragma once
#include <string>
#include <vector>

namespace qf {

struct Architecture {
  std::string hf_class;        // config.json "architectures"[0], e.g. "LlamaForCausalLM"
  std::string model_type;      // config.json "model_type"
  bool qkv_bias = false;       // q/k/v projections carry a bias (Qwen2)
  bool default_tied = false;   // tie_word_embeddings when config.json does not say
  // Tensor names; "{L}" stands for the layer index.
  std::string embed = "model.embed_tokens.weight";
  std::string final_norm = "model.norm.weight";
  std::string head = "lm_head";
  std::string attn_norm = "model.layers.{L}.input_layernorm.weight";
  std::string ffn_norm = "model.layers.{L}.post_attention_layernorm.weight";
  std::string q = "model.layers.{L}.self_attn.q_proj";
  std::string k = "model.layers.{L}.self_attn.k_proj";
  std::string v = "model.layers.{L}.self_attn.v_proj";
  std::string o = "model.layers.{L}.self_attn.o_proj";
  std::string gate = "model.layers.{L}.mlp.gate_proj";
  std::string up = "model.layers.{L}.mlp.up_proj";
  std::string down = "model.layers.{L}.mlp.down_proj";
};

const std::vector<Architecture>& architectures();
// By "architectures"[0] or, failing that, by model_type; nullptr when unknown.
const Architecture* find_architecture(const std::string& hf_class, const std::string& model_type);
std::string layer_name(const std::string& pattern, int layer);

}  // namespace qf
