#include "model/model.h"

#include <cmath>

#include "core/error.h"
#include "core/log.h"
#include "model/rope.h"

namespace qf {

Model::Model(ModelConfig config, TensorStore store, Backend& backend)
    : config_(std::move(config)), store_(std::move(store)), backend_(backend) {}

std::unique_ptr<Model> Model::load(const std::filesystem::path& dir, Backend& backend) {
  ModelConfig config = load_config(dir);
  TensorStore store = TensorStore::open_dir(dir);
  for (const auto& note : store.notes()) log_warn(note);
  std::unique_ptr<Model> m(new Model(std::move(config), std::move(store), backend));
  m->weights_ = load_weights(m->config_, m->store_);

  const auto& w = m->weights_;
  DeviceWeights& d = m->dev_;
  d.embed = backend.make_embedding(w.embed);
  d.layers.resize(w.layers.size());
  for (size_t i = 0; i < w.layers.size(); ++i) {
    const auto& l = w.layers[i];
    auto& dl = d.layers[i];
    dl.attn_norm = backend.make_vector(l.attn_norm);
    dl.ffn_norm = backend.make_vector(l.ffn_norm);
    dl.q = backend.make_linear(l.q);
    dl.k = backend.make_linear(l.k);
    dl.v = backend.make_linear(l.v);
    dl.o = backend.make_linear(l.o);
    dl.gate = backend.make_linear(l.gate);
    dl.up = backend.make_linear(l.up);
    dl.down = backend.make_linear(l.down);
  }
  d.final_norm = backend.make_vector(w.final_norm);
  d.head = backend.make_linear(w.head);
  return m;
}

std::unique_ptr<Model> Model::from_device_weights(ModelConfig config, DeviceWeights weights, Backend& backend) {
  QF_CHECK(weights.embed && weights.head && weights.final_norm.data() &&
               static_cast<int64_t>(weights.layers.size()) == config.n_layers,
           "incomplete device weights for a ", config.n_layers, "-layer model");
  std::unique_ptr<Model> m(new Model(std::move(config), TensorStore{}, backend));
  m->dev_ = std::move(weights);
  return m;
}

std::unique_ptr<KVCache> Model::new_cache(int64_t capacity) {
  if (capacity <= 0) fail("context size must be positive");
  if (capacity > rope_positions_) {
    backend_.set_rope_tables(build_rope_tables(config_.rope, config_.head_dim, capacity));
    rope_positions_ = capacity;
  }
  return backend_.make_kv_cache(config_.n_layers, config_.n_kv_heads, config_.head_dim, capacity);
}

void Model::ensure_scratch(int64_t rows) {
  if (rows <= scratch_rows_) return;
  const auto& c = config_;
  auto r = static_cast<size_t>(rows);
  x_ = backend_.alloc(r * c.hidden);
  xn_ = backend_.alloc(r * c.hidden);
  q_ = backend_.alloc(r * c.q_dim());
  k_ = backend_.alloc(r * c.kv_dim());
  v_ = backend_.alloc(r * c.kv_dim());
  attn_ = backend_.alloc(r * c.q_dim());
  gate_ = backend_.alloc(r * c.intermediate);
  up_ = backend_.alloc(r * c.intermediate);
  act_ = backend_.alloc(r * c.intermediate);
  sum_ = backend_.alloc(r * c.hidden);
  scratch_rows_ = rows;
}

// One FusedLinear: the backend's fused kernel where it has one, else the separate operations
// (the normalized input in xn_, products to be added in sum_, gate and up products in gate_/up_).
void Model::linear_op(const FusedLinear& op) {
  Backend& b = backend_;
  if (b.fused_linear(op)) return;
  const int64_t in = op.w[0]->in_features, n = op.rows;
  const float* x = op.x;
  if (op.input == FusedLinear::Input::RmsNorm) {
    b.rmsnorm(op.x, op.norm, xn_.data(), n, in, op.eps);
    x = xn_.data();
  }
  switch (op.output) {
    case FusedLinear::Output::Store:
      for (int i = 0; i < op.count; ++i) b.linear(*op.w[i], x, op.y[i], n);
      break;
    case FusedLinear::Output::Accumulate:
      for (int i = 0; i < op.count; ++i) {
        QF_CHECK(op.w[i]->out_features <= config_.hidden, "internal: accumulated linear wider than the hidden size");
        b.linear(*op.w[i], x, sum_.data(), n);
        b.add(op.y[i], sum_.data(), n * op.w[i]->out_features);
      }
      break;
    case FusedLinear::Output::SwiGLU:
      QF_CHECK(op.count == 2, "a SwiGLU linear needs the gate and the up projection");
      b.linear(*op.w[0], x, gate_.data(), n);
      b.linear(*op.w[1], x, up_.data(), n);
      b.silu_mul(gate_.data(), up_.data(), op.y[0], n * op.w[0]->out_features);
      break;
  }
}

void Model::forward(const int32_t* tokens, int64_t n, int64_t pos0, KVCache& cache, float* logits_host,
                    bool all_logits) {
  if (n <= 0) return;
  const auto& c = config_;
  if (pos0 + n > cache.capacity)
    fail("context full: ", pos0 + n, " tokens do not fit the context of ", cache.capacity);
  ensure_scratch(n);
  Backend& b = backend_;
  AttentionParams ap;
  ap.n_heads = c.n_heads;
  ap.n_kv_heads = c.n_kv_heads;
  ap.head_dim = c.head_dim;
  ap.scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
  ap.sliding_window = c.sliding_window;
  const auto eps = static_cast<float>(c.rms_eps);

  b.embed(*dev_.embed, tokens, n, x_.data());
  for (size_t L = 0; L < dev_.layers.size(); ++L) {
    auto& l = dev_.layers[L];
    FusedLinear qkv;
    qkv.input = FusedLinear::Input::RmsNorm;
    qkv.x = x_.data();
    qkv.norm = l.attn_norm.data();
    qkv.eps = eps;
    qkv.count = 3;
    qkv.w[0] = l.q.get(), qkv.w[1] = l.k.get(), qkv.w[2] = l.v.get();
    qkv.y[0] = q_.data(), qkv.y[1] = k_.data(), qkv.y[2] = v_.data();
    qkv.rows = n;
    linear_op(qkv);
    if (!b.fused_rope_attention(q_.data(), k_.data(), v_.data(), cache, static_cast<int64_t>(L), pos0, n, ap,
                                attn_.data())) {
      b.rope(q_.data(), k_.data(), n, c.n_heads, c.n_kv_heads, c.head_dim, pos0);
      b.attention(q_.data(), k_.data(), v_.data(), cache, static_cast<int64_t>(L), pos0, n, ap, attn_.data());
    }
    FusedLinear o;
    o.x = attn_.data();
    o.count = 1;
    o.w[0] = l.o.get();
    o.y[0] = x_.data();
    o.output = FusedLinear::Output::Accumulate;
    o.rows = n;
    linear_op(o);

    FusedLinear gu;
    gu.input = FusedLinear::Input::RmsNorm;
    gu.x = x_.data();
    gu.norm = l.ffn_norm.data();
    gu.eps = eps;
    gu.count = 2;
    gu.w[0] = l.gate.get(), gu.w[1] = l.up.get();
    gu.y[0] = act_.data();
    gu.output = FusedLinear::Output::SwiGLU;
    gu.rows = n;
    linear_op(gu);
    FusedLinear down;
    down.x = act_.data();
    down.count = 1;
    down.w[0] = l.down.get();
    down.y[0] = x_.data();
    down.output = FusedLinear::Output::Accumulate;
    down.rows = n;
    linear_op(down);
  }
  // Only the rows whose logits are wanted go through the head (the largest matrix).
  const int64_t first = all_logits ? 0 : n - 1, rows = n - first;
  if (logits_rows_ < rows) {  // sized for the rows asked for, not for the whole prompt
    logits_ = backend_.alloc(static_cast<size_t>(rows * c.vocab));
    logits_rows_ = rows;
  }
  FusedLinear head;
  head.input = FusedLinear::Input::RmsNorm;
  head.x = x_.data() + first * c.hidden;
  head.norm = dev_.final_norm.data();
  head.eps = eps;
  head.count = 1;
  head.w[0] = dev_.head.get();
  head.y[0] = logits_.data();
  head.rows = rows;
  linear_op(head);
  b.download(logits_host, logits_.data(), static_cast<size_t>(rows * c.vocab));
}

}  // namespace qf
