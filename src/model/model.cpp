#include "model/model.h"

#include <cmath>

#include "core/error.h"
#include "core/log.h"
#include "core/sizes.h"
#include "model/rope.h"

namespace qf {

Model::Model(ModelConfig config, TensorStore store, Backend& backend)
    : config_(std::move(config)), store_(std::move(store)), backend_(backend),
      runner_(std::make_unique<LayerRunner>(config_, backend_)) {}

namespace {
double rope_table_bytes(const ModelConfig& c, int64_t positions) {
  return static_cast<double>(checked_product({positions, c.head_dim / 2, 2, 4}, str("RoPE tables for ", positions, " positions")));
}
}  // namespace

std::vector<MemoryItem> memory_needs(const ModelConfig& c, const Backend& b, double weight_bytes, const MemoryPlan& plan) {
  std::vector<MemoryItem> items;
  items.push_back({"weights", weight_bytes});
  if (plan.context > 0) {
    items.push_back({"KV cache", static_cast<double>(b.kv_cache_bytes(c.n_layers, c.n_kv_heads, c.head_dim, plan.context))});
  }
  // Activations of LayerRunner and the model (x, xn, q, k, v, attention, gate, up, act, sum) per
  // row, the logits of the rows asked for, and the RoPE tables.
  const std::string what = str("scratch for ", plan.rows, " rows");
  const int64_t per_row = checked_add(checked_product({3, c.hidden}, what),
                                      checked_add(checked_product({2, c.q_dim()}, what),
                                                  checked_add(checked_product({2, c.kv_dim()}, what),
                                                              checked_product({3, c.intermediate}, what), what),
                                                  what),
                                      what);
  const int64_t rows = std::max<int64_t>(plan.rows, 1);
  double scratch = static_cast<double>(checked_product({rows, per_row, 4}, what));
  scratch += static_cast<double>(checked_product({plan.all_logits ? rows : 1, c.vocab, 4}, what));
  if (plan.context > 0) scratch += rope_table_bytes(c, plan.context);
  items.push_back({"scratch", scratch});
  return items;
}

std::unique_ptr<Model> Model::load(const std::filesystem::path& dir, Backend& backend, const PlanFn& plan) {
  ModelConfig config = load_config(dir);
  TensorStore store = TensorStore::open_dir(dir);
  for (const auto& note : store.notes()) log_warn(note);
  std::unique_ptr<Model> m(new Model(std::move(config), std::move(store), backend));
  m->weights_ = load_weights(m->config_, m->store_);
  const MemoryPlan p = plan ? plan(m->config_) : MemoryPlan{};
  check_memory(backend, dir.string(), memory_needs(m->config_, backend, static_cast<double>(m->store_.total_bytes()), p));

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

void Model::reserve_context(int64_t kv_positions, int64_t rope_positions, const std::string& what, const char* hint,
                            KVFormat format) {
  std::vector<MemoryItem> need{{"KV cache", static_cast<double>(backend_.kv_cache_bytes(
                                                config_.n_layers, config_.n_kv_heads, config_.head_dim, kv_positions,
                                                format))}};
  if (rope_positions > rope_positions_) need.push_back({"RoPE tables", rope_table_bytes(config_, rope_positions)});
  check_memory(backend_, what, need, hint);
  if (rope_positions > rope_positions_) {
    backend_.set_rope_tables(build_rope_tables(config_.rope, config_.head_dim, rope_positions));
    rope_positions_ = rope_positions;
  }
}

std::unique_ptr<SequenceCache> Model::new_cache(int64_t capacity) {
  if (capacity <= 0) fail("context size must be positive");
  reserve_context(capacity, capacity, str("a context of ", capacity, " tokens"), " (use a smaller --ctx)");
  return backend_.make_sequence_cache(config_.n_layers, config_.n_kv_heads, config_.head_dim, capacity);
}

void Model::forward(const int32_t* tokens, int64_t n, int64_t pos0, SequenceCache& cache, float* logits_host,
                    bool all_logits) {
  if (n <= 0) return;
  forward_batch(cache.batch(tokens, n, pos0, all_logits), *cache.paged, logits_host);
}

std::unique_ptr<PagedKVCache> Model::new_paged_cache(int64_t num_blocks, int64_t block_size, int64_t max_context,
                                                     KVFormat format) {
  if (num_blocks <= 0 || block_size <= 0 || max_context <= 0) fail("a paged KV cache needs blocks and a context");
  reserve_context(checked_mul(num_blocks, block_size, "KV cache positions"), max_context,
                  str("a ", kv_format_name(format), " KV cache of ", num_blocks, " blocks of ", block_size), "", format);
  return backend_.make_paged_kv_cache(config_.n_layers, config_.n_kv_heads, config_.head_dim, num_blocks, block_size,
                                      format);
}

void Model::forward_batch(const Batch& batch, PagedKVCache& cache, float* logits_host) {
  const float* logits = forward_batch_device(batch, cache);
  if (logits)
    backend_.download(logits_host, logits, static_cast<size_t>(static_cast<int64_t>(batch.logit_rows.size()) * config_.vocab));
}

void Model::check_batch(const Batch& batch) const {
  const int64_t n = static_cast<int64_t>(batch.tokens.size());
  int64_t covered = 0;
  for (const BatchSeq& s : batch.seqs) {  // (rows inside the batch: check_batch_tables, the backend's own check)
    QF_CHECK(s.rows > 0, "batch: a sequence with no rows");
    if (s.pos0 + s.rows > rope_positions_)
      fail("context full: position ", s.pos0 + s.rows, " is past the ", rope_positions_, " positions the cache was made for");
    covered += s.rows;
  }
  QF_CHECK(covered == n, "batch: ", n, " tokens but the sequences cover ", covered, " rows");
  for (int64_t r : batch.logit_rows) QF_CHECK(r >= 0 && r < n, "batch: logits asked for row ", r, " of ", n);
}

void Model::prepare_batch(const Batch& batch, PagedKVCache& cache, int64_t min_len) {
  check_batch(batch);
  backend_.prepare_batch(batch, cache, config_.vocab, min_len);
}

float* Model::forward_batch_device(const Batch& batch, PagedKVCache& cache) {
  if (batch.tokens.empty()) return nullptr;
  prepare_batch(batch, cache);
  return run_prepared(batch, cache);
}

float* Model::run_prepared(const Batch& batch, PagedKVCache& cache) {
  const auto& c = config_;
  const int64_t n = static_cast<int64_t>(batch.tokens.size());
  if (n == 0) return nullptr;
  if (n > x_rows_) {
    x_ = backend_.alloc(static_cast<size_t>(checked_mul(n, c.hidden, "activations")));
    x_rows_ = n;
  }
  backend_.embed_batch(*dev_.embed, x_.data());
  for (size_t L = 0; L < dev_.layers.size(); ++L) {
    runner_->attention_paged(dev_.layers[L], x_.data(), n, batch.seqs, cache, static_cast<int64_t>(L));
    runner_->mlp(dev_.layers[L], x_.data(), n);
  }
  const int64_t rows = static_cast<int64_t>(batch.logit_rows.size());
  if (rows == 0) return nullptr;
  // The rows that need logits, gathered, go through the head (the largest matrix) together.
  if (gather_rows_ < rows) {
    gather_ = backend_.alloc(static_cast<size_t>(checked_mul(rows, c.hidden, "activations")));
    gather_rows_ = rows;
  }
  // Runs of consecutive rows in one copy each (a decode step's rows are one run).
  for (int64_t i = 0; i < rows;) {
    int64_t j = i + 1;
    while (j < rows && batch.logit_rows[static_cast<size_t>(j)] == batch.logit_rows[static_cast<size_t>(j - 1)] + 1) ++j;
    backend_.copy_rows(x_.data(), batch.logit_rows[static_cast<size_t>(i)], j - i, c.hidden, gather_.data() + i * c.hidden);
    i = j;
  }
  if (logits_rows_ < rows) {
    logits_ = backend_.alloc(static_cast<size_t>(checked_mul(rows, c.vocab, "logits")));
    logits_rows_ = rows;
  }
  runner_->head(dev_.final_norm, *dev_.head, gather_.data(), rows, logits_.data());
  return logits_.data();
}

}  // namespace qf
