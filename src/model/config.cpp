#include "model/config.h"

#include "core/error.h"
#include "core/json_file.h"

namespace qf {

namespace {

int64_t get_int(const json& j, const char* key, int64_t dflt) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return dflt;
  return it->get<int64_t>();
}
double get_num(const json& j, const char* key, double dflt) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return dflt;
  return it->get<double>();
}

void parse_rope(const json& j, RopeConfig* rope, const std::string& where) {
  // transformers 5 keeps everything RoPE-related in rope_parameters; 4 has rope_theta at the top
  // and an optional rope_scaling object.
  rope->theta = get_num(j, "rope_theta", 10000.0);
  const json* scaling = nullptr;
  if (auto it = j.find("rope_parameters"); it != j.end() && it->is_object()) scaling = &*it;
  else if (auto it2 = j.find("rope_scaling"); it2 != j.end() && it2->is_object()) scaling = &*it2;
  if (!scaling) return;
  const json& s = *scaling;
  if (s.contains("rope_theta")) rope->theta = get_num(s, "rope_theta", rope->theta);
  std::string type = "default";
  if (auto t = s.find("rope_type"); t != s.end() && t->is_string()) type = t->get<std::string>();
  else if (auto t2 = s.find("type"); t2 != s.end() && t2->is_string()) type = t2->get<std::string>();
  rope->type = type;
  if (type == "default") return;
  if (type == "linear") {
    rope->factor = get_num(s, "factor", 1.0);
  } else if (type == "llama3") {
    rope->factor = get_num(s, "factor", 8.0);
    rope->low_freq_factor = get_num(s, "low_freq_factor", 1.0);
    rope->high_freq_factor = get_num(s, "high_freq_factor", 4.0);
    rope->original_max_position = get_int(s, "original_max_position_embeddings", 8192);
  } else {
    fail(where, ": unsupported RoPE type '", type, "' (supported: default, linear, llama3)");
  }
  if (!(rope->factor > 0)) fail(where, ": RoPE scaling factor must be positive");
}

void parse_quant(const json& q, QuantConfig* out) {
  if (auto m = q.find("quant_method"); m != q.end() && m->is_string()) out->method = m->get<std::string>();
  out->bits = get_num(q, "bits", 0);
  out->head_bits = get_num(q, "head_bits", 0);
  out->group_size = get_int(q, "group_size", 0);
  if (auto d = q.find("desc_act"); d != q.end() && d->is_boolean()) out->desc_act = d->get<bool>();
  if (auto d = q.find("sym"); d != q.end() && d->is_boolean()) out->sym = d->get<bool>();
  if (auto f = q.find("checkpoint_format"); f != q.end() && f->is_string())
    out->checkpoint_format = f->get<std::string>();
}

}  // namespace

ModelConfig load_config(const std::filesystem::path& model_dir) {
  const auto path = model_dir / "config.json";
  const std::string where = path.string();
  const json j = read_json_file(path);
  if (!j.is_object()) fail(where, ": expected a JSON object");
  ModelConfig c;
  c.dir = model_dir;
  try {
    if (auto a = j.find("architectures"); a != j.end() && a->is_array() && !a->empty() && (*a)[0].is_string())
      c.hf_class = (*a)[0].get<std::string>();
    if (auto m = j.find("model_type"); m != j.end() && m->is_string()) c.model_type = m->get<std::string>();
    c.arch = find_architecture(c.hf_class, c.model_type);
    if (!c.arch) {
      std::string known;
      for (const auto& a : architectures()) known += (known.empty() ? "" : ", ") + a.hf_class;
      fail(where, ": unknown architecture '", c.hf_class.empty() ? c.model_type : c.hf_class,
           "' (supported: ", known, ")");
    }
    c.hidden = json_int(j, "hidden_size", where);
    c.intermediate = json_int(j, "intermediate_size", where);
    c.n_layers = json_int(j, "num_hidden_layers", where);
    c.n_heads = json_int(j, "num_attention_heads", where);
    c.n_kv_heads = get_int(j, "num_key_value_heads", c.n_heads);
    c.vocab = json_int(j, "vocab_size", where);
    if (c.hidden <= 0 || c.intermediate <= 0 || c.n_layers <= 0 || c.n_heads <= 0 || c.n_kv_heads <= 0 ||
        c.vocab <= 0)
      fail(where, ": sizes must be positive");
    c.head_dim = get_int(j, "head_dim", c.hidden / c.n_heads);
    if (c.head_dim <= 0 || c.head_dim % 2) fail(where, ": head_dim must be positive and even");
    if (c.n_heads % c.n_kv_heads) fail(where, ": num_attention_heads must be a multiple of num_key_value_heads");
    c.max_position = get_int(j, "max_position_embeddings", 2048);
    c.sliding_window = get_int(j, "sliding_window", 0);
    if (auto u = j.find("use_sliding_window"); u != j.end() && u->is_boolean() && !u->get<bool>())
      c.sliding_window = 0;
    c.rms_eps = get_num(j, "rms_norm_eps", 1e-6);
    c.tie_embeddings = c.arch->default_tied;
    if (auto t = j.find("tie_word_embeddings"); t != j.end() && t->is_boolean()) c.tie_embeddings = t->get<bool>();
    c.attention_bias = c.arch->qkv_bias;
    if (auto b = j.find("attention_bias"); b != j.end() && b->is_boolean()) c.attention_bias = c.attention_bias || b->get<bool>();
    if (auto b = j.find("mlp_bias"); b != j.end() && b->is_boolean()) c.mlp_bias = b->get<bool>();
    if (auto d = j.find("dtype"); d != j.end() && d->is_string()) c.dtype = d->get<std::string>();
    else if (auto d2 = j.find("torch_dtype"); d2 != j.end() && d2->is_string()) c.dtype = d2->get<std::string>();
    if (auto b = j.find("bos_token_id"); b != j.end() && b->is_number_integer()) c.bos_id = b->get<int64_t>();
    if (auto e = j.find("eos_token_id"); e != j.end()) {
      if (e->is_number_integer()) c.eos_ids.push_back(e->get<int64_t>());
      else if (e->is_array())
        for (const auto& x : *e) if (x.is_number_integer()) c.eos_ids.push_back(x.get<int64_t>());
    }
    parse_rope(j, &c.rope, where);
    if (auto q = j.find("quantization_config"); q != j.end() && q->is_object()) parse_quant(*q, &c.quant);
    const auto qc = model_dir / "quantize_config.json";  // AutoGPTQ's separate file
    if (c.quant.method.empty() && std::filesystem::exists(qc)) {
      parse_quant(read_json_file(qc), &c.quant);
      if (c.quant.method.empty()) c.quant.method = "gptq";
    }
  } catch (const json::exception& e) {
    fail(where, ": unexpected value type (", e.what(), ")");
  }
  // generation_config.json may list extra end-of-sequence ids (Llama 3 instruct).
  const auto gen = model_dir / "generation_config.json";
  if (std::filesystem::exists(gen)) {
    const json g = read_json_file(gen);
    if (auto e = g.find("eos_token_id"); e != g.end()) {
      auto add = [&](int64_t id) {
        for (int64_t x : c.eos_ids) if (x == id) return;
        c.eos_ids.push_back(id);
      };
      if (e->is_number_integer()) add(e->get<int64_t>());
      else if (e->is_array())
        for (const auto& x : *e) if (x.is_number_integer()) add(x.get<int64_t>());
    }
  }
  return c;
}

}  // namespace qf
