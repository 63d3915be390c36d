#include "model/model.h"

#include <cmath>

#include "core/error.h"
#include "core/log.h"
#include "model/rope.h"

namespace qf {

Model::Model(ModelConfig config, TensorStore store, Backend& backend)
    : config_(std::move(config)), store_(std::move(store)), backend_(backend),
      runner_(std::make_unique<LayerRunner>(config_, backend_)) {}

std::unique_ptr<Model> Model::load(const std::filesystem::path& dir, Backend& backend) {
  ModelConfig config = load_config(dir);
  TensorStore store = TensorStore::open_dir(dir);
  for (const auto& note : store.notes()) log_warn(note);
  std::unique_ptr<Model> m(new Model(std::move(config), std::move(store), backend));
  m->weights_ = load_weights(m->config_, m->store_);

  const auto& w = m->weights_;
  DeviceWeights& d = m->dev_;
  d.embed = backend.make_embedding(w.embed);
  d.layers.reserve(w.layers.size());
  for (const auto& l : w.layers) d.layers.push_back(upload_layer(backend, l));
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

void Model::forward(const int32_t* tokens, int64_t n, int64_t pos0, KVCache& cache, float* logits_host,
                    bool all_logits) {
  if (n <= 0) return;
  const auto& c = config_;
  if (pos0 + n > cache.capacity)
    fail("context full: ", pos0 + n, " tokens do not fit the context of ", cache.capacity);
  if (n > x_rows_) {
    x_ = backend_.alloc(static_cast<size_t>(n * c.hidden));
    x_rows_ = n;
  }
  backend_.embed(*dev_.embed, tokens, n, x_.data());
  for (size_t L = 0; L < dev_.layers.size(); ++L) {
    runner_->attention(dev_.layers[L], x_.data(), n, pos0, cache, static_cast<int64_t>(L));
    runner_->mlp(dev_.layers[L], x_.data(), n);
  }
  // Only the rows whose logits are wanted go through the head (the largest matrix).
  const int64_t first = all_logits ? 0 : n - 1, rows = n - first;
  if (logits_rows_ < rows) {  // sized for the rows asked for, not for the whole prompt
    logits_ = backend_.alloc(static_cast<size_t>(rows * c.vocab));
    logits_rows_ = rows;
  }
  runner_->head(dev_.final_norm, *dev_.head, x_.data() + first * c.hidden, rows, logits_.data());
  backend_.download(logits_host, logits_.data(), static_cast<size_t>(rows * c.vocab));
}

}  // namespace qf
