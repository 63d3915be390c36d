#include "model/weights.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/error.h"
#include "core/thread_pool.h"
#include "formats/quant_bits.h"
#include "formats/quant_linear.h"

namespace qf {

namespace {

const char* kFloatTypes = "F32, F16 or BF16";

bool is_float(DType t) { return t == DType::F32 || t == DType::F16 || t == DType::BF16; }

std::string where_of(const TensorStore& store, const std::string& name) { return tensor_where(store, name); }

// A float tensor of exactly `shape`, aligned for its element type (a hostile or sloppy writer may
// put it at an odd offset; the kernels read it as float/uint16 arrays).
TensorView get_checked(const TensorStore& store, const std::string& name, std::vector<int64_t> shape) {
  const TensorView& t = store.get(name);
  if (!is_float(t.dtype))
    fail(where_of(store, name), ": dtype ", dtype_name(t.dtype), " where ", kFloatTypes, " is expected");
  if (t.shape != shape) {
    TensorView want;
    want.shape = shape;
    fail(where_of(store, name), ": shape ", t.shape_str(), " but the config implies ", want.shape_str());
  }
  return aligned_view(t);
}

// Small tensors (norm weights, biases: one row each) are checked for NaN/inf as they are read.
TensorView get_small(const TensorStore& store, const std::string& name, std::vector<int64_t> shape) {
  TensorView t = get_checked(store, name, std::move(shape));
  check_finite(t, where_of(store, name));
  return t;
}

// NaN/inf in the large float tensors (embedding, dense linear layers, head).
//
// Decision: scan them all at load, in parallel on the global thread pool. The check is a
// vectorized compare of the exponent bits, as fast as memory delivers the data. Measured on the
// shared 2-core dev VM, a 2.14 GB FP16 folder (4 Llama-2-7B layers + embedding + head):
//   cold (its pages evicted): load_weights 4.8 s, while `cat` of the file alone takes 4.3 s (disk);
//   warm, first touch in the process: 1.3 s on 2 threads (1.65 GB/s), of which the check itself is
//   0.52 s (4.1 GB/s; 2.4 GB/s on one thread) and the rest is mapping the file's pages, a cost the
//   first forward pass (CPU) or the upload (CUDA) pays anyway and then no longer does.
// For a 7B FP16 model (13.5 GB) that is ~3 s of extra work here when the file is in the page cache,
// less on a server's cores, and nothing measurable from disk, where the read dominates and only
// moves to load time. A NaN found here is an error naming the tensor and element; found later it
// is NaN logits naming nothing. Quantized layers hold integer codes (no NaN possible) and their
// float scales are checked by the EXL2/GPTQ loaders, so quantized models pay almost nothing.
// Callers that never compute (inspect) pass scan_large = false: for them the scan would be the
// whole cost (reading a 70B model from disk to print its shapes).
void check_large_finite(const std::vector<std::pair<std::string, TensorView>>& views, const TensorStore& store) {
  constexpr int64_t kChunk = int64_t{1} << 22;  // elements per task
  struct Task {
    size_t view;
    int64_t begin, end;
  };
  std::vector<Task> tasks;
  for (size_t v = 0; v < views.size(); ++v)
    for (int64_t b = 0, n = views[v].second.numel(); b < n; b += kChunk) tasks.push_back({v, b, std::min(n, b + kChunk)});
  std::vector<int64_t> bad(tasks.size(), -1);
  ThreadPool::global().parallel_for(static_cast<int64_t>(tasks.size()), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const Task& k = tasks[static_cast<size_t>(t)];
      bad[static_cast<size_t>(t)] = first_non_finite(views[k.view].second, k.begin, k.end);
    }
  });
  for (size_t t = 0; t < tasks.size(); ++t)  // the first bad element in load order
    if (bad[t] >= 0) {
      const auto& [name, view] = views[tasks[t].view];
      fail(where_of(store, name), ": element ", element_index(view.shape, bad[t]), " is ", float_text(view, bad[t]),
           " (weights must be finite)");
    }
}

// The layer index of a tensor named PREFIX<digits>.<rest>, or -1.
int64_t layer_of(const std::string& name, const std::string& prefix) {
  if (name.compare(0, prefix.size(), prefix) != 0) return -1;
  int64_t L = 0;
  size_t i = prefix.size(), digits = 0;
  for (; i < name.size() && name[i] >= '0' && name[i] <= '9'; ++i, ++digits)
    L = digits < 18 ? L * 10 + (name[i] - '0') : std::numeric_limits<int64_t>::max();
  return digits > 0 && i < name.size() && name[i] == '.' ? L : -1;
}

}  // namespace

namespace {

// bias_reason: why the layer must have a bias ("" = it need not), for the message when it has none.
LinearWeight load_linear_why(const TensorStore& store, const std::string& prefix, int64_t in_features,
                             int64_t out_features, const std::string& bias_reason, const QuantHints& hints) {
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
    w.bias = get_small(store, bname, {out_features});
  } else if (!bias_reason.empty()) {
    fail(where_of(store, bname), ": missing (", bias_reason, ")");
  }
  return w;
}

}  // namespace

LinearWeight load_linear(const TensorStore& store, const std::string& prefix, int64_t in_features,
                         int64_t out_features, bool expect_bias, const QuantHints& hints) {
  return load_linear_why(store, prefix, in_features, out_features,
                         expect_bias ? "the config says this layer has a bias" : "", hints);
}

QuantHints quant_hints(const QuantConfig& q) {
  QuantHints h;
  h.method = q.method;
  if (q.method != "exl2") {  // EXL2's "bits" is a bpw target
    // load_config accepts only 2, 3, 4 or 8 for GPTQ; never cast a value an int cannot hold.
    if (!(q.bits >= 0 && q.bits <= 64 && q.bits == std::floor(q.bits)))
      fail("quantization_config: bits ", q.bits, " is not a supported code width (2, 3, 4 or 8)");
    h.bits = static_cast<int>(q.bits);
  }
  h.group_size = q.group_size;
  h.desc_act = q.desc_act;
  h.checkpoint_format = q.checkpoint_format;
  return h;
}

ModelWeights load_weights(const ModelConfig& c, const TensorStore& store, const WeightLoadOptions& opt) {
  const Architecture& a = *c.arch;
  const QuantHints qh = quant_hints(c.quant);
  const std::string config_file = (c.dir / "config.json").string();

  // Tensors of layers the config does not have would be silently ignored: a config edited (or
  // written) with fewer layers than the weights runs a different model.
  const std::string layer_prefix = a.attn_norm.substr(0, a.attn_norm.find("{L}"));
  for (const auto& name : store.names()) {
    const int64_t L = layer_of(name, layer_prefix);
    if (L >= c.n_layers)
      fail(where_of(store, name), ": belongs to layer ", L == std::numeric_limits<int64_t>::max() ? std::string("(huge)")
                                                                                            : std::to_string(L),
           " but ", config_file, " has num_hidden_layers ", c.n_layers, " (layers 0..", c.n_layers - 1, ")");
  }

  ModelWeights w;
  std::vector<std::pair<std::string, TensorView>> large;  // scanned for NaN/inf at the end
  w.embed = get_checked(store, a.embed, {c.vocab, c.hidden});
  large.emplace_back(a.embed, w.embed);
  w.final_norm = get_small(store, a.final_norm, {c.hidden});
  w.layers.resize(static_cast<size_t>(c.n_layers));
  const std::string qkv_bias = c.attention_bias ? (c.arch->qkv_bias ? str(a.hf_class, " has q/k/v biases")
                                                                    : std::string("config.json has attention_bias true"))
                                                : std::string();
  const std::string mlp_bias = c.mlp_bias ? "config.json has mlp_bias true" : "";
  for (int L = 0; L < c.n_layers; ++L) {
    LayerWeights& l = w.layers[static_cast<size_t>(L)];
    l.attn_norm = get_small(store, layer_name(a.attn_norm, L), {c.hidden});
    l.ffn_norm = get_small(store, layer_name(a.ffn_norm, L), {c.hidden});
    l.q = load_linear_why(store, layer_name(a.q, L), c.hidden, c.q_dim(), qkv_bias, qh);
    l.k = load_linear_why(store, layer_name(a.k, L), c.hidden, c.kv_dim(), qkv_bias, qh);
    l.v = load_linear_why(store, layer_name(a.v, L), c.hidden, c.kv_dim(), qkv_bias, qh);
    l.o = load_linear_why(store, layer_name(a.o, L), c.q_dim(), c.hidden, std::string(), qh);
    l.gate = load_linear_why(store, layer_name(a.gate, L), c.hidden, c.intermediate, mlp_bias, qh);
    l.up = load_linear_why(store, layer_name(a.up, L), c.hidden, c.intermediate, mlp_bias, qh);
    l.down = load_linear_why(store, layer_name(a.down, L), c.intermediate, c.hidden, mlp_bias, qh);
    for (const LinearWeight* lw : l.linears())
      if (lw->format == LinearFormat::Dense) large.emplace_back(lw->name + ".weight", lw->weight);
  }
  const bool has_head = store.has(a.head + ".weight") || store.has(a.head + ".q_weight") ||
                        store.has(a.head + ".qweight");
  if (has_head && !c.tie_embeddings) {
    w.head = load_linear_why(store, a.head, c.hidden, c.vocab, std::string(), qh);
    if (w.head.format == LinearFormat::Dense) large.emplace_back(a.head + ".weight", w.head.weight);
  } else {
    if (!c.tie_embeddings)
      fail(c.dir.string(), ": missing tensor '", a.head, ".weight' (and tie_word_embeddings is false)");
    w.head.name = a.embed;
    w.head.in_features = c.hidden;
    w.head.out_features = c.vocab;
    w.head.weight = w.embed;
  }
  if (opt.scan_large) check_large_finite(large, store);
  return w;
}

}  // namespace qf
