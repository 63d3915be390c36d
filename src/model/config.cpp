#include "model/config.h"

#include <cmath>
#include <limits>

#include "core/error.h"
#include "core/json_file.h"

namespace qf {

namespace {

// read_json_file, with nlohmann's other exceptions (a number too large for a double, 1e999, is an
// out_of_range error, not a parse error) also reported as one line naming the file.
json read_json(const std::filesystem::path& path) {
  try {
    return read_json_file(path);
  } catch (const json::exception& e) {
    fail(path.string(), ": malformed JSON (", e.what(), ")");
  }
}

// Bounds on the sizes a config may declare. They are far above any published model (the largest
// have hidden 16384-25600, 126 layers, 128 heads, vocabularies of 256K, contexts of 10M) and low
// enough that every size computed from them fits int64_t without overflow: a weight matrix has at
// most 2^20 * 2^24 elements, the whole model at most 2^14 layers of them, and a KV cache of the
// full context 2^14 layers * 2^20 (kv_dim) * 2^24 positions * 2 (K, V) * 4 bytes = 2^61 bytes.
constexpr int64_t kMaxHidden = int64_t{1} << 20;        // hidden_size, and heads * head_dim
constexpr int64_t kMaxIntermediate = int64_t{1} << 22;  // intermediate_size
constexpr int64_t kMaxLayers = int64_t{1} << 14;        // num_hidden_layers
constexpr int64_t kMaxHeads = int64_t{1} << 16;         // num_attention_heads, head_dim
constexpr int64_t kMaxVocab = int64_t{1} << 24;         // vocab_size (token ids are int32)
constexpr int64_t kMaxPosition = int64_t{1} << 24;      // max_position_embeddings (16.7M tokens)

// A JSON value for a one-line message, as the file wrote it (numbers and literals verbatim, strings
// quoted and escaped, shortened when long).
std::string shown(const json& v) {
  if (v.is_string()) {
    std::string s = v.get<std::string>();
    if (s.size() > 40) s = s.substr(0, 40) + "...";
    return quote_for_error(s);
  }
  if (v.is_object()) return "an object";
  if (v.is_array()) return "an array";
  return v.dump();
}

const json* field(const json& j, const char* key) {
  auto it = j.find(key);
  return it == j.end() || it->is_null() ? nullptr : &*it;
}

// An integer field in [lo, hi]; `dflt` when absent or null (required when there is none).
int64_t int_field(const json& j, const char* key, const std::string& where, int64_t lo, int64_t hi,
                  std::optional<int64_t> dflt = std::nullopt, const char* prefix = "") {
  const json* v = field(j, key);
  if (!v) {
    if (dflt) return *dflt;
    fail(where, ": missing field '", prefix, key, "'");
  }
  if (!v->is_number_integer())
    fail(where, ": ", prefix, key, " is ", shown(*v), " (must be an integer from ", lo, " to ", hi, ")");
  const bool in_range = v->is_number_unsigned() ? v->get<uint64_t>() <= static_cast<uint64_t>(hi) && hi >= 0 &&
                                                       static_cast<int64_t>(v->get<uint64_t>()) >= lo
                                                 : v->get<int64_t>() >= lo && v->get<int64_t>() <= hi;
  if (!in_range) fail(where, ": ", prefix, key, " is ", shown(*v), " (must be an integer from ", lo, " to ", hi, ")");
  return v->get<int64_t>();
}

// A finite number with lo < x <= hi (lo_open) or lo <= x <= hi; `dflt` when absent or null.
double num_field(const json& j, const char* key, const std::string& where, double lo, double hi, bool lo_open,
                 double dflt, const char* prefix = "") {
  const json* v = field(j, key);
  if (!v) return dflt;
  const char* range = lo_open ? " (must be a number greater than " : " (must be a number from ";
  if (!v->is_number()) fail(where, ": ", prefix, key, " is ", shown(*v), range, lo, lo_open ? " and at most " : " to ", hi, ")");
  const double x = v->get<double>();
  if (!std::isfinite(x) || (lo_open ? !(x > lo) : !(x >= lo)) || !(x <= hi))
    fail(where, ": ", prefix, key, " is ", shown(*v), range, lo, lo_open ? " and at most " : " to ", hi, ")");
  return x;
}

std::optional<bool> bool_field(const json& j, const char* key, const std::string& where, const char* prefix = "") {
  const json* v = field(j, key);
  if (!v) return std::nullopt;
  if (!v->is_boolean()) fail(where, ": ", prefix, key, " is ", shown(*v), " (must be true or false)");
  return v->get<bool>();
}

std::optional<std::string> string_field(const json& j, const char* key, const std::string& where,
                                        const char* prefix = "") {
  const json* v = field(j, key);
  if (!v) return std::nullopt;
  if (!v->is_string()) fail(where, ": ", prefix, key, " is ", shown(*v), " (must be a string)");
  return v->get<std::string>();
}

// A token id field: an integer or a list of them, each a valid id of the vocabulary.
std::vector<int64_t> token_ids(const json& j, const char* key, const std::string& where, int64_t vocab) {
  const json* v = field(j, key);
  std::vector<int64_t> ids;
  if (!v) return ids;
  auto one = [&](const json& x) {
    if (!x.is_number_integer() || (x.is_number_unsigned() ? x.get<uint64_t>() >= static_cast<uint64_t>(vocab)
                                                          : x.get<int64_t>() < 0 || x.get<int64_t>() >= vocab))
      fail(where, ": ", key, " holds ", shown(x), " (token ids must be integers from 0 to ", vocab - 1,
           ", the vocabulary of vocab_size ", vocab, ")");
    ids.push_back(x.get<int64_t>());
  };
  if (v->is_array()) {
    for (const auto& x : *v) one(x);
  } else {
    one(*v);
  }
  return ids;
}

void parse_rope(const json& j, RopeConfig* rope, const std::string& where) {
  // transformers 5 keeps everything RoPE-related in rope_parameters; 4 has rope_theta at the top
  // and an optional rope_scaling object. theta below 1 would turn the frequencies upside down (and
  // tiny values become 0 in the float tables: inf frequencies, NaN angles); above 1e30 it is no
  // longer a float.
  constexpr double kMaxTheta = 1e30;
  rope->theta = num_field(j, "rope_theta", where, 1, kMaxTheta, false, 10000.0);
  const json* scaling = nullptr;
  const char* sname = "rope_parameters";
  for (const char* k : {"rope_parameters", "rope_scaling"}) {
    const json* s = field(j, k);
    if (!s) continue;
    if (!s->is_object()) fail(where, ": ", k, " is ", shown(*s), " (must be an object or null)");
    scaling = s;
    sname = k;
    break;
  }
  if (!scaling) return;
  const json& s = *scaling;
  const std::string pre = std::string(sname) + ".";
  rope->theta = num_field(s, "rope_theta", where, 1, kMaxTheta, false, rope->theta, pre.c_str());
  std::string type = "default";
  if (auto t = string_field(s, "rope_type", where, pre.c_str())) type = *t;
  else if (auto t2 = string_field(s, "type", where, pre.c_str())) type = *t2;
  rope->type = type;
  if (type == "default") return;
  if (type == "linear") {
    rope->factor = num_field(s, "factor", where, 0, 1e6, true, 1.0, pre.c_str());
  } else if (type == "llama3") {
    rope->factor = num_field(s, "factor", where, 0, 1e6, true, 8.0, pre.c_str());
    rope->low_freq_factor = num_field(s, "low_freq_factor", where, 0, 1e6, true, 1.0, pre.c_str());
    rope->high_freq_factor = num_field(s, "high_freq_factor", where, 0, 1e6, true, 4.0, pre.c_str());
    if (!(rope->high_freq_factor > rope->low_freq_factor))
      fail(where, ": ", pre, "high_freq_factor (", rope->high_freq_factor, ") must be greater than low_freq_factor (",
           rope->low_freq_factor, ")");
    rope->original_max_position =
        int_field(s, "original_max_position_embeddings", where, 1, kMaxPosition, 8192, pre.c_str());
  } else {
    fail(where, ": unsupported RoPE type ", quote_for_error(type), " (supported: default, linear, llama3)");
  }
}

void parse_quant(const json& q, QuantConfig* out, const std::string& where, const char* pre) {
  if (auto m = string_field(q, "quant_method", where, pre)) out->method = *m;
  // EXL2's bits and head_bits are bit-rate targets (informational: every layer describes itself);
  // GPTQ's bits is the width of every code and must be one the loader decodes.
  const bool gptq = out->method.empty() || out->method == "gptq";
  if (const json* b = field(q, "bits"); b && gptq) {
    const double x = b->is_number() ? b->get<double>() : 0;
    if (!b->is_number() || !(x == 2 || x == 3 || x == 4 || x == 8))
      fail(where, ": ", pre, "bits is ", shown(*b), " (GPTQ bits must be 2, 3, 4 or 8)");
  }
  out->bits = num_field(q, "bits", where, 0, 64, false, 0, pre);
  out->head_bits = num_field(q, "head_bits", where, 0, 64, false, 0, pre);
  if (const json* g = field(q, "group_size")) {
    if (!g->is_number_integer() ||
        (g->is_number_unsigned() ? g->get<uint64_t>() < 1 || g->get<uint64_t>() > (uint64_t{1} << 31)
                                 : g->get<int64_t>() != -1 && g->get<int64_t>() < 1))
      fail(where, ": ", pre, "group_size is ", shown(*g), " (must be -1 for one group, or from 1 to ", uint64_t{1} << 31,
           ")");
    out->group_size = g->get<int64_t>();
  }
  if (auto d = bool_field(q, "desc_act", where, pre)) out->desc_act = *d;
  if (auto d = bool_field(q, "sym", where, pre)) out->sym = *d;
  if (auto f = string_field(q, "checkpoint_format", where, pre)) out->checkpoint_format = *f;
}

}  // namespace

ModelConfig load_config(const std::filesystem::path& model_dir) {
  const auto path = model_dir / "config.json";
  const std::string where = path.string();
  const json j = read_json(path);
  if (!j.is_object()) fail(where, ": expected a JSON object");
  ModelConfig c;
  c.dir = model_dir;
  try {
    if (const json* a = field(j, "architectures")) {
      if (!a->is_array() || (!a->empty() && !(*a)[0].is_string()))
        fail(where, ": architectures is ", shown(a->is_array() ? (*a)[0] : *a), " (must be a list of class names)");
      if (!a->empty()) c.hf_class = (*a)[0].get<std::string>();
    }
    if (auto m = string_field(j, "model_type", where)) c.model_type = *m;
    c.arch = find_architecture(c.hf_class, c.model_type);
    if (!c.arch) {
      std::string known;
      for (const auto& a : architectures()) known += (known.empty() ? "" : ", ") + a.hf_class;
      fail(where, ": unknown architecture ", quote_for_error(c.hf_class.empty() ? c.model_type : c.hf_class),
           " (supported: ", known, ")");
    }
    c.hidden = int_field(j, "hidden_size", where, 1, kMaxHidden);
    c.intermediate = int_field(j, "intermediate_size", where, 1, kMaxIntermediate);
    c.n_layers = int_field(j, "num_hidden_layers", where, 1, kMaxLayers);
    c.n_heads = int_field(j, "num_attention_heads", where, 1, kMaxHeads);
    c.n_kv_heads = int_field(j, "num_key_value_heads", where, 1, c.n_heads, c.n_heads);
    c.vocab = int_field(j, "vocab_size", where, 1, kMaxVocab);
    if (!field(j, "head_dim") && c.hidden % c.n_heads != 0)
      fail(where, ": hidden_size ", c.hidden, " is not a multiple of num_attention_heads ", c.n_heads,
           " (and there is no head_dim)");
    c.head_dim = int_field(j, "head_dim", where, 2, kMaxHeads, c.hidden / c.n_heads);
    if (c.head_dim % 2) fail(where, ": head_dim is ", c.head_dim, " (must be even for RoPE)");
    if (c.n_heads % c.n_kv_heads)
      fail(where, ": num_attention_heads ", c.n_heads, " is not a multiple of num_key_value_heads ", c.n_kv_heads);
    if (c.n_heads * c.head_dim > kMaxHidden)  // both <= 2^16: the product cannot overflow
      fail(where, ": num_attention_heads ", c.n_heads, " x head_dim ", c.head_dim, " = ", c.n_heads * c.head_dim,
           " (must be at most ", kMaxHidden, ")");
    c.max_position = int_field(j, "max_position_embeddings", where, 1, kMaxPosition, 2048);
    c.sliding_window = int_field(j, "sliding_window", where, 0, std::numeric_limits<int64_t>::max(), 0);
    if (auto u = bool_field(j, "use_sliding_window", where); u && !*u) c.sliding_window = 0;
    c.rms_eps = num_field(j, "rms_norm_eps", where, 0, 1, true, 1e-6);
    c.tie_embeddings = bool_field(j, "tie_word_embeddings", where).value_or(c.arch->default_tied);
    c.attention_bias = c.arch->qkv_bias || bool_field(j, "attention_bias", where).value_or(false);
    c.mlp_bias = bool_field(j, "mlp_bias", where).value_or(false);
    if (auto d = string_field(j, "dtype", where)) c.dtype = *d;
    else if (auto d2 = string_field(j, "torch_dtype", where)) c.dtype = *d2;
    if (auto b = token_ids(j, "bos_token_id", where, c.vocab); !b.empty()) {
      if (b.size() > 1) fail(where, ": bos_token_id is a list (must be one token id)");
      c.bos_id = b[0];
    }
    c.eos_ids = token_ids(j, "eos_token_id", where, c.vocab);
    parse_rope(j, &c.rope, where);
    if (const json* q = field(j, "quantization_config")) {
      if (!q->is_object()) fail(where, ": quantization_config is ", shown(*q), " (must be an object)");
      parse_quant(*q, &c.quant, where, "quantization_config.");
    }
    const auto qc = model_dir / "quantize_config.json";  // AutoGPTQ's separate file
    if (c.quant.method.empty() && std::filesystem::exists(qc)) {
      const json qj = read_json(qc);
      if (!qj.is_object()) fail(qc.string(), ": expected a JSON object");
      parse_quant(qj, &c.quant, qc.string(), "");
      if (c.quant.method.empty()) c.quant.method = "gptq";
    }
  } catch (const json::exception& e) {
    fail(where, ": unexpected value type (", e.what(), ")");
  }
  // generation_config.json may list extra end-of-sequence ids (Llama 3 instruct).
  const auto gen = model_dir / "generation_config.json";
  if (std::filesystem::exists(gen)) {
    const json g = read_json(gen);
    if (!g.is_object()) fail(gen.string(), ": expected a JSON object");
    for (int64_t id : token_ids(g, "eos_token_id", gen.string(), c.vocab)) {
      bool seen = false;
      for (int64_t x : c.eos_ids) seen = seen || x == id;
      if (!seen) c.eos_ids.push_back(id);
    }
  }
  return c;
}

}  // namespace qf
