#include "model/architecture.h"

namespace qf {

const std::vector<Architecture>& architectures() {
  static const std::vector<Architecture> table = [] {
    std::vector<Architecture> t;
    Architecture llama;
    llama.hf_class = "LlamaForCausalLM";
    llama.model_type = "llama";
    t.push_back(llama);

    Architecture mistral = llama;
    mistral.hf_class = "MistralForCausalLM";
    mistral.model_type = "mistral";
    t.push_back(mistral);

    Architecture qwen2 = llama;
    qwen2.hf_class = "Qwen2ForCausalLM";
    qwen2.model_type = "qwen2";
    qwen2.qkv_bias = true;
    t.push_back(qwen2);
    return t;
  }();
  return table;
}

const Architecture* find_architecture(const std::string& hf_class, const std::string& model_type) {
  for (const auto& a : architectures())
    if (!hf_class.empty() && a.hf_class == hf_class) return &a;
  if (!hf_class.empty()) return nullptr;
  for (const auto& a : architectures())
    if (a.model_type == model_type) return &a;
  return nullptr;
}

std::string layer_name(const std::string& pattern, int layer) {
  std::string s = pattern;
  const auto p = s.find("{L}");
  if (p != std::string::npos) s.replace(p, 3, std::to_string(layer));
  return s;
}

}  // namespace qf
