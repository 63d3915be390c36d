#include "model/decoder_layer.h"

#include <cmath>

#include "core/error.h"
#include "core/sizes.h"

namespace qf {

DeviceLayer upload_layer(Backend& b, const LayerWeights& w) {
  DeviceLayer d;
  d.attn_norm = b.make_vector(w.attn_norm);
  d.ffn_norm = b.make_vector(w.ffn_norm);
  d.q = b.make_linear(w.q);
  d.k = b.make_linear(w.k);
  d.v = b.make_linear(w.v);
  d.o = b.make_linear(w.o);
  d.gate = b.make_linear(w.gate);
  d.up = b.make_linear(w.up);
  d.down = b.make_linear(w.down);
  return d;
}

LayerRunner::LayerRunner(const ModelConfig& config, Backend& backend) : c_(config), b_(backend) {
  ap_.n_heads = c_.n_heads;
  ap_.n_kv_heads = c_.n_kv_heads;
  ap_.head_dim = c_.head_dim;
  ap_.scale = 1.0f / std::sqrt(static_cast<float>(c_.head_dim));
  ap_.sliding_window = c_.sliding_window;
  eps_ = static_cast<float>(c_.rms_eps);
}

void LayerRunner::ensure_scratch(int64_t rows) {
  if (rows <= scratch_rows_) return;
  // Checked: rows come from a prompt or an option.
  auto n = [&](int64_t cols) { return static_cast<size_t>(checked_mul(rows, cols, str("scratch for ", rows, " rows"))); };
  xn_ = b_.alloc(n(c_.hidden));
  q_ = b_.alloc(n(c_.q_dim()));
  k_ = b_.alloc(n(c_.kv_dim()));
  v_ = b_.alloc(n(c_.kv_dim()));
  attn_ = b_.alloc(n(c_.q_dim()));
  gate_ = b_.alloc(n(c_.intermediate));
  up_ = b_.alloc(n(c_.intermediate));
  act_ = b_.alloc(n(c_.intermediate));
  sum_ = b_.alloc(n(c_.hidden));
  scratch_rows_ = rows;
}

// The fused kernel where the backend has one; otherwise the normalised input in xn_, products to
// be added in sum_, gate and up products in gate_/up_.
void LayerRunner::linear_op(const FusedLinear& op) {
  if (b_.fused_linear(op)) return;
  const int64_t in = op.w[0]->in_features, n = op.rows;
  const float* x = op.x;
  if (op.input == FusedLinear::Input::RmsNorm) {
    b_.rmsnorm(op.x, op.norm, xn_.data(), n, in, op.eps);
    x = xn_.data();
  }
  switch (op.output) {
    case FusedLinear::Output::Store:
      for (int i = 0; i < op.count; ++i) b_.linear(*op.w[i], x, op.y[i], n);
      break;
    case FusedLinear::Output::Accumulate:
      for (int i = 0; i < op.count; ++i) {
        QF_CHECK(op.w[i]->out_features <= c_.hidden, "internal: accumulated linear wider than the hidden size");
        b_.linear(*op.w[i], x, sum_.data(), n);
        b_.add(op.y[i], sum_.data(), n * op.w[i]->out_features);
      }
      break;
    case FusedLinear::Output::SwiGLU:
      QF_CHECK(op.count == 2, "a SwiGLU linear needs the gate and the up projection");
      b_.linear(*op.w[0], x, gate_.data(), n);
      b_.linear(*op.w[1], x, up_.data(), n);
      b_.silu_mul(gate_.data(), up_.data(), op.y[0], n * op.w[0]->out_features);
      break;
  }
}

namespace {

// q/k/v of x: the norm folded into the linears, or (with a tap) done first so the tap sees it.
FusedLinear qkv_op(const DeviceLayer& l, const float* x, float* xn, float eps, float* q, float* k, float* v,
                   int64_t rows, bool explicit_norm) {
  FusedLinear op;
  op.input = explicit_norm ? FusedLinear::Input::Plain : FusedLinear::Input::RmsNorm;
  op.x = explicit_norm ? xn : x;
  op.norm = l.attn_norm.data();
  op.eps = eps;
  op.count = 3;
  op.w[0] = l.q.get(), op.w[1] = l.k.get(), op.w[2] = l.v.get();
  op.y[0] = q, op.y[1] = k, op.y[2] = v;
  op.rows = rows;
  return op;
}

FusedLinear residual_op(const DeviceLinear& w, const float* in, float* x, int64_t rows) {
  FusedLinear op;
  op.x = in;
  op.count = 1;
  op.w[0] = &w;
  op.y[0] = x;
  op.output = FusedLinear::Output::Accumulate;
  op.rows = rows;
  return op;
}

}  // namespace

void LayerRunner::attention_paged(const DeviceLayer& l, float* x, int64_t rows, const std::vector<BatchSeq>& seqs,
                                  PagedKVCache& cache, int64_t cache_layer, const TapFn* tap) {
  ensure_scratch(rows);
  if (tap) {
    b_.rmsnorm(x, l.attn_norm.data(), xn_.data(), rows, c_.hidden, eps_);
    (*tap)(Tap::AttnInput, xn_.data(), rows, c_.hidden);
  }
  linear_op(qkv_op(l, x, xn_.data(), eps_, q_.data(), k_.data(), v_.data(), rows, tap != nullptr));
  b_.rope_paged_attention(q_.data(), k_.data(), v_.data(), cache, cache_layer, seqs, ap_, attn_.data());
  if (tap) (*tap)(Tap::OInput, attn_.data(), rows, c_.q_dim());
  linear_op(residual_op(*l.o, attn_.data(), x, rows));
}

void LayerRunner::mlp(const DeviceLayer& l, float* x, int64_t rows, const TapFn* tap) {
  ensure_scratch(rows);
  FusedLinear gu;
  gu.input = FusedLinear::Input::RmsNorm;
  gu.x = x;
  if (tap) {
    b_.rmsnorm(x, l.ffn_norm.data(), xn_.data(), rows, c_.hidden, eps_);
    (*tap)(Tap::MlpInput, xn_.data(), rows, c_.hidden);
    gu.input = FusedLinear::Input::Plain;
    gu.x = xn_.data();
  }
  gu.norm = l.ffn_norm.data();
  gu.eps = eps_;
  gu.count = 2;
  gu.w[0] = l.gate.get(), gu.w[1] = l.up.get();
  gu.y[0] = act_.data();
  gu.output = FusedLinear::Output::SwiGLU;
  gu.rows = rows;
  linear_op(gu);
  if (tap) (*tap)(Tap::DownInput, act_.data(), rows, c_.intermediate);
  linear_op(residual_op(*l.down, act_.data(), x, rows));
}

void LayerRunner::head(const DeviceBuffer& final_norm, const DeviceLinear& head, const float* x, int64_t rows,
                       float* logits) {
  ensure_scratch(rows);
  FusedLinear op;
  op.input = FusedLinear::Input::RmsNorm;
  op.x = x;
  op.norm = final_norm.data();
  op.eps = eps_;
  op.count = 1;
  op.w[0] = &head;
  op.y[0] = logits;
  op.rows = rows;
  linear_op(op);
}

}  // namespace qf
