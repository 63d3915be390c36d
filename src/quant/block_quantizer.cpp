#include "quant/block_quantizer.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"
#include "model/rope.h"

namespace qf {

std::vector<const LinearWeight*> block_weights(const LayerWeights& w, BlockKind kind) {
  if (kind == BlockKind::Attention) return {&w.q, &w.k, &w.v, &w.o};
  return {&w.gate, &w.up, &w.down};
}

std::unique_ptr<DeviceLinear>& block_slot(DeviceLayer& l, BlockKind kind, size_t projection) {
  if (kind == BlockKind::Attention) {
    std::unique_ptr<DeviceLinear>* slots[] = {&l.q, &l.k, &l.v, &l.o};
    QF_CHECK(projection < 4, "internal: attention projection ", projection);
    return *slots[projection];
  }
  std::unique_ptr<DeviceLinear>* slots[] = {&l.gate, &l.up, &l.down};
  QF_CHECK(projection < 3, "internal: MLP projection ", projection);
  return *slots[projection];
}

bool reads_inner(BlockKind kind, size_t projection) {
  return kind == BlockKind::Attention ? projection == 3 : projection == 2;
}

BlockQuantizer::BlockQuantizer(const ModelConfig& config, Backend& b, int64_t length, double damp)
    : c_(config), b_(b), runner_(config, b), length_(length), damp_(damp), free_at_start_(b.free_memory()) {
  b_.set_rope_tables(build_rope_tables(c_.rope, c_.head_dim, length_));
  cache_ = b_.make_sequence_cache(1, c_.n_kv_heads, c_.head_dim, length_);
}

void BlockQuantizer::note_memory() {
  const size_t now = b_.free_memory();
  if (now < free_at_start_) peak_bytes_ = std::max(peak_bytes_, static_cast<int64_t>(free_at_start_ - now));
}

BlockHessians BlockQuantizer::new_hessians(BlockKind kind) {
  BlockHessians h;
  h.outer_k = c_.hidden;
  h.inner_k = kind == BlockKind::Attention ? c_.q_dim() : c_.intermediate;
  h.outer = zero_square(h.outer_k);
  h.inner = zero_square(h.inner_k);
  return h;
}

DeviceBuffer BlockQuantizer::zero_square(int64_t k) {
  DeviceBuffer m = b_.alloc(static_cast<size_t>(k * k));
  const std::vector<float> zeros(m.size(), 0.f);
  b_.upload(m.data(), zeros.data(), zeros.size());
  return m;
}

void BlockQuantizer::run(BlockKind kind, const DeviceLayer& l, float* x, int64_t rows, BlockHessians* h) {
  TapFn tap = [&](Tap t, const float* data, int64_t n, int64_t cols) {
    const bool inner = t == Tap::OInput || t == Tap::DownInput;
    b_.hessian_accumulate(inner ? h->inner.data() : h->outer.data(), data, n, cols);
  };
  const TapFn* tp = h ? &tap : nullptr;
  // Every row is one sequence of length_ positions from 0 (the tokens themselves are not read: x
  // holds the block's input), through the attention every batch runs.
  const std::vector<int32_t> tokens(static_cast<size_t>(length_), 0);
  const Batch batch = cache_->batch(tokens.data(), length_, 0, false);
  if (kind == BlockKind::Attention) b_.prepare_batch(batch, *cache_->paged, c_.vocab);
  for (int64_t r = 0; r < rows; ++r) {
    float* row = x + r * row_floats();
    if (kind == BlockKind::Attention)
      runner_.attention_paged(l, row, length_, batch.seqs, *cache_->paged, 0, tp);
    else
      runner_.mlp(l, row, length_, tp);
  }
}

double BlockQuantizer::mean_relative_error(const float* x, const float* ref, int64_t rows) {
  double sum = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const auto [d, n] = b_.diff_norms(x + r * row_floats(), ref + r * row_floats(), row_floats());
    if (!std::isfinite(d)) fail("the quantized block's output is not finite");
    sum += n > 0 ? std::sqrt(d / n) : 0.0;
  }
  return rows > 0 ? sum / static_cast<double>(rows) : 0.0;
}

BlockQuantizer::Solvers BlockQuantizer::solvers(const BlockHessians& h, BlockKind kind, const std::string& where) {
  Solvers s;
  const char* outer = kind == BlockKind::Attention ? "q/k/v input" : "gate/up input";
  const char* inner = kind == BlockKind::Attention ? "o_proj input" : "down_proj input";
  s.outer = std::make_unique<GptqSolver>(b_, h.outer.data(), h.outer_k, damp_, where + " " + outer);
  s.inner = std::make_unique<GptqSolver>(b_, h.inner.data(), h.inner_k, damp_, where + " " + inner);
  return s;
}

}  // namespace qf
