#include "model/weights.h"

#include "core/error.h"
#include "formats/quant_linear.h"

namespace qf {

namespace {

const char* kFloatTypes = "F32, F16 or BF16";

bool is_float(DType t) { return t == DType::F32 || t == DType::F16 || t == DType::BF16; }

std::string where_of(const TensorStore& store, const std::string& name) {
  const auto f = store.file_of(name);
  return (f.empty() ? std::string("model") : f.string()) + ": tensor '" + name + "'";
}

TensorView get_checked(const TensorStore& store, const std::string& name, std::vector<int64_t> shape) {
  const TensorView& t = store.get(name);
  if (!is_float(t.dtype))
    fail(where_of(store, name), ": dtype ", dtype_name(t.dtype), " where ", kFloatTypes, " is expected");
  if (t.shape != shape) {
    TensorView want;
    want.shape = shape;
    fail(where_of(store, name), ": shape ", t.shape_str(), " but the config implies ", want.shape_str());
  }
  return t;
}

}  // namespace

const char* linear_format_name(LinearFormat f) {
  switch (f) {
    case LinearFormat::Dense: return "fp";
    case LinearFormat::EXL2: return "exl2";
    case LinearFormat::GPTQ: return "gptq";
  }
  return "?";
}

double LinearWeight::bits_per_weight() const {
  if (format == LinearFormat::Dense) return 8.0 * static_cast<double>(dtype_size(weight.dtype));
  return 8.0 * static_cast<double>(storage_bytes()) / static_cast<double>(in_features * out_features);
}

size_t LinearWeight::storage_bytes() const {
  size_t n = bias ? bias->nbytes() : 0;
  if (format == LinearFormat::Dense) return n + weight.nbytes();
  return n + quant_storage_bytes(*quant);
}

LinearWeight load_linear(const TensorStore& store, const std::string& prefix, int64_t in_features,
                         int64_t out_features, bool expect_bias, const QuantHints& hints) {
  LinearWeight w;
  w.name = prefix;
  w.in_features = in_features;
  w.out_features = out_features;
  if (auto q = detect_quantized_linear(store, prefix, in_features, out_features, hints)) {
    w.format = q->format;
    w.quant = std::move(q);
  } else if (store.has(prefix + ".weight")) {
    w.weight = get_checked(store, prefix + ".weight", {out_features, in_features});
  } else {
    fail(store.files().empty() ? std::string("model") : store.files()[0]->path().parent_path().string(),
         ": no weights for linear layer '", prefix, "' (looked for ", prefix, ".weight, .q_weight, .qweight)");
  }
  const std::string bname = prefix + ".bias";
  if (store.has(bname)) {
    w.bias = get_checked(store, bname, {out_features});
  } else if (expect_bias) {
    fail(where_of(store, bname), ": missing (this architecture has q/k/v biases)");
  }
  return w;
}

QuantHints quant_hints(const QuantConfig& q) {
  QuantHints h;
  h.method = q.method;
  h.bits = q.method == "exl2" ? 0 : static_cast<int>(q.bits);  // EXL2's "bits" is a bpw target
  h.group_size = q.group_size;
  h.desc_act = q.desc_act;
  h.checkpoint_format = q.checkpoint_format;
  return h;
}

ModelWeights load_weights(const ModelConfig& c, const TensorStore& store) {
  const Architecture& a = *c.arch;
  const QuantHints qh = quant_hints(c.quant);
  ModelWeights w;
  w.embed = get_checked(store, a.embed, {c.vocab, c.hidden});
  w.final_norm = get_checked(store, a.final_norm, {c.hidden});
  w.layers.resize(static_cast<size_t>(c.n_layers));
  for (int L = 0; L < c.n_layers; ++L) {
    LayerWeights& l = w.layers[static_cast<size_t>(L)];
    l.attn_norm = get_checked(store, layer_name(a.attn_norm, L), {c.hidden});
    l.ffn_norm = get_checked(store, layer_name(a.ffn_norm, L), {c.hidden});
    const bool qkv_bias = c.attention_bias;
    l.q = load_linear(store, layer_name(a.q, L), c.hidden, c.q_dim(), qkv_bias, qh);
    l.k = load_linear(store, layer_name(a.k, L), c.hidden, c.kv_dim(), qkv_bias, qh);
    l.v = load_linear(store, layer_name(a.v, L), c.hidden, c.kv_dim(), qkv_bias, qh);
    l.o = load_linear(store, layer_name(a.o, L), c.q_dim(), c.hidden, false, qh);
    l.gate = load_linear(store, layer_name(a.gate, L), c.hidden, c.intermediate, c.mlp_bias, qh);
    l.up = load_linear(store, layer_name(a.up, L), c.hidden, c.intermediate, c.mlp_bias, qh);
    l.down = load_linear(store, layer_name(a.down, L), c.intermediate, c.hidden, c.mlp_bias, qh);
  }
  const bool has_head = store.has(a.head + ".weight") || store.has(a.head + ".q_weight") ||
                        store.has(a.head + ".qweight");
  if (has_head && !c.tie_embeddings) {
    w.head = load_linear(store, a.head, c.hidden, c.vocab, false, qh);
  } else if (c.tie_embeddings || !has_head) {
    if (!c.tie_embeddings)
      fail(c.dir.string(), ": missing tensor '", a.head, ".weight' (and tie_word_embeddings is false)");
    w.head.name = a.embed;
    w.head.in_features = c.hidden;
    w.head.out_features = c.vocab;
    w.head.weight = w.embed;
  }
  return w;
}

}  // namespace qf
