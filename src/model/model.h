// A loaded Llama-family model on one backend: config, host weights (mapped), device weights and
// the forward pass written once against the Backend interface.
#pragma once
#include <filesystem>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "backends/backend.h"
#include "formats/safetensors.h"
#include "model/config.h"
#include "model/decoder_layer.h"
#include "model/weights.h"

namespace qf {

// Weights already resident on a backend: what Model::load uploads, or what a benchmark builds
// from random values directly in device memory.
struct DeviceWeights {
  std::unique_ptr<DeviceEmbedding> embed;
  std::vector<DeviceLayer> layers;
  DeviceBuffer final_norm;
  std::unique_ptr<DeviceLinear> head;
};

// What a run allocates besides the weights, for the memory check made before anything large is
// allocated (Model::load, Model::new_cache).
struct MemoryPlan {
  int64_t context = 0;      // KV cache positions (0: none)
  int64_t rows = 1;         // tokens per forward call (prefill chunk, perplexity window)
  bool all_logits = false;  // logits for every row (perplexity) rather than the last
};

// Estimated bytes on `b` of the weights (weight_bytes), the KV cache and RoPE tables of
// plan.context positions, and the activations and logits of plan.rows rows. Sizes are checked:
// an overflow fails with one line.
std::vector<MemoryItem> memory_needs(const ModelConfig& c, const Backend& b, double weight_bytes, const MemoryPlan& plan);

class Model {
 public:
  // A model over weights that are already on `backend` (no files: host weights() stay empty).
  static std::unique_ptr<Model> from_device_weights(ModelConfig config, DeviceWeights weights, Backend& backend);
  // Loads config.json and the safetensors files of `dir` (every tensor validated), asks `plan`
  // (when given) what the run will allocate, checks that the weights and that cache and scratch
  // fit the backend's free memory (one line saying what is needed and what is available
  // otherwise), and uploads the weights to `backend`.
  using PlanFn = std::function<MemoryPlan(const ModelConfig&)>;
  static std::unique_ptr<Model> load(const std::filesystem::path& dir, Backend& backend, const PlanFn& plan = {});

  const ModelConfig& config() const { return config_; }
  const ModelWeights& weights() const { return weights_; }
  const TensorStore& store() const { return store_; }
  Backend& backend() const { return backend_; }

  // One sequence's KV cache of `capacity` positions (and RoPE tables as long); checks the memory
  // first. A paged cache whose blocks are the sequence's in order: one sequence runs the same
  // forward pass as a batch of many.
  std::unique_ptr<SequenceCache> new_cache(int64_t capacity);

  // Runs tokens[0..n) at positions pos0.. of the one sequence of `cache` through the model
  // (forward_batch of that sequence). Writes the logits of the last token to logits (vocab
  // floats), or of every token when all_logits (n * vocab).
  void forward(const int32_t* tokens, int64_t n, int64_t pos0, SequenceCache& cache, float* logits_host,
               bool all_logits = false);

  // A KV cache of `num_blocks` blocks of `block_size` positions shared by many sequences, and RoPE
  // tables for positions up to max_context; checks the memory first.
  std::unique_ptr<PagedKVCache> new_paged_cache(int64_t num_blocks, int64_t block_size, int64_t max_context,
                                                KVFormat format = KVFormat::Full);
  // Runs a batch of several sequences through the model over `cache` (each sequence's rows at its
  // positions, KV written into its blocks). Writes the logits of batch.logit_rows, in their order,
  // to logits_host (logit_rows.size() * vocab floats).
  void forward_batch(const Batch& batch, PagedKVCache& cache, float* logits_host);
  // The same, leaving the logits in the backend's memory: returns them, [logit_rows.size(), vocab]
  // (valid until the next forward pass, and the sampler's repetition penalty may change them;
  // nullptr when no logits were asked for).
  float* forward_batch_device(const Batch& batch, PagedKVCache& cache);
  // forward_batch_device in two parts: prepare_batch checks the batch and hands its inputs to the
  // backend (Backend::prepare_batch, with min_len); run_prepared is then device work only, so it
  // can be captured once (Backend::capture) and replayed after each later prepare_batch of a batch
  // of the same shape (rows, sequences, logit rows), and buffers sized by an earlier call of it.
  void prepare_batch(const Batch& batch, PagedKVCache& cache, int64_t min_len = 0);
  float* run_prepared(const Batch& batch, PagedKVCache& cache);

  // Fails with one line on a malformed batch: a sequence without rows, rows not covered once,
  // positions past the RoPE tables, logit rows outside it (Backend::prepare_batch checks the rest).
  void check_batch(const Batch& batch) const;

  const DeviceWeights& device_weights() const { return dev_; }
  LayerRunner& runner() { return *runner_; }

 private:
  Model(ModelConfig config, TensorStore store, Backend& backend);
  // Checks that a KV cache of kv_positions and RoPE tables of rope_positions fit (one line naming
  // `what`, ending with `hint`, when not), then makes the RoPE tables that long.
  void reserve_context(int64_t kv_positions, int64_t rope_positions, const std::string& what, const char* hint,
                       KVFormat format = KVFormat::Full);

  ModelConfig config_;
  TensorStore store_;
  ModelWeights weights_;
  Backend& backend_;
  int64_t rope_positions_ = 0;

  DeviceWeights dev_;
  std::unique_ptr<LayerRunner> runner_;

  int64_t x_rows_ = 0, logits_rows_ = 0, gather_rows_ = 0;
  DeviceBuffer x_, logits_, gather_;
};

}  // namespace qf
