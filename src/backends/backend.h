// The device interface the model is written against (CTranslate2-style per-device primitives).
// The CPU backend is the reference; the CUDA backend implements the same operations. Activations
// are fp32 row-major [rows, cols] in the backend's memory; weights are uploaded once as opaque
// objects in whatever layout suits the device.
#pragma once
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "backends/kv_quant.h"
#include "backends/quant_ops.h"
#include "backends/sampler.h"
#include "core/tensor.h"
#include "formats/linear_weight.h"

namespace qf {

class Backend;

// Device memory holding `count` floats; freed with its backend.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(Backend* b, float* p, size_t count) : backend_(b), ptr_(p), count_(count) {}
  DeviceBuffer(DeviceBuffer&& o) noexcept { *this = std::move(o); }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { reset(); }
  void reset();

  float* data() const { return ptr_; }
  size_t size() const { return count_; }

 private:
  Backend* backend_ = nullptr;
  float* ptr_ = nullptr;
  size_t count_ = 0;
};

// A linear layer (y = x W^T + b) resident on a device.
class DeviceLinear {
 public:
  virtual ~DeviceLinear() = default;
  int64_t in_features = 0, out_features = 0;
};

// An embedding table resident on a device.
class DeviceEmbedding {
 public:
  virtual ~DeviceEmbedding() = default;
  int64_t vocab = 0, dim = 0;
};

// Keys and values of many sequences in fixed-size blocks of one pool (the engine's BlockManager
// hands them out): block b, slot s of layer l holds one position of one sequence.
class PagedKVCache {
 public:
  virtual ~PagedKVCache() = default;
  int64_t n_layers = 0, n_kv_heads = 0, head_dim = 0, num_blocks = 0, block_size = 0;
  KVFormat format = KVFormat::Full;
};

// One sequence's part of a batch: rows [first_row, first_row + rows) are its positions pos0 ..
// pos0 + rows - 1, and position p's keys and values live in block block_table[p / block_size].
struct BatchSeq {
  int64_t first_row = 0, rows = 0, pos0 = 0;
  const int32_t* block_table = nullptr;
  int64_t n_blocks = 0;
};

// A forward pass over several sequences: their tokens (each sequence's rows contiguous, at the
// rows its BatchSeq names) and the rows whose logits are wanted (llama.cpp's llama_batch, as data).
struct Batch {
  std::vector<int32_t> tokens;
  std::vector<BatchSeq> seqs;
  std::vector<int64_t> logit_rows;
};

// Fails with one line when a sequence of `batch` has rows outside the batch, or positions beyond
// its blocks, or a block outside `cache`.
void check_batch_tables(const Batch& batch, const PagedKVCache& cache);

// One sequence on its own (Model::forward, the converter's layer runs): a paged cache whose block
// table is all of its blocks in order, so that it runs the same attention as many sequences do.
struct SequenceCache {
  std::unique_ptr<PagedKVCache> paged;
  std::vector<int32_t> table;
  int64_t capacity = 0;  // positions
  // The batch of its tokens [pos0, pos0 + n), logits for every row or the last one.
  Batch batch(const int32_t* tokens, int64_t n, int64_t pos0, bool all_logits) const;
};

// Rotary embedding tables, precomputed on the host (model/rope.h) and uploaded.
struct RopeTables {
  int64_t max_pos = 0, half_dim = 0;
  std::vector<float> cos, sin;  // [max_pos, half_dim]
};

// One part of what a run needs in a backend's memory (see check_memory).
struct MemoryItem {
  std::string what;  // "weights", "KV cache", ...
  double bytes = 0;
};

struct AttentionParams {
  int64_t n_heads = 0, n_kv_heads = 0, head_dim = 0;
  float scale = 1.0f;
  int64_t sliding_window = 0;  // 0 = attend to every earlier position
};

// Up to three linear layers that share one input, with the step before them and the step after
// them folded in (Backend::fused_linear). The matrices see
//   Plain:   x                          (x [rows, in])
//   RmsNorm: rmsnorm(x) * norm          (norm [in], eps)
// and write
//   Store:      y[i] = W[i] input (+ bias)
//   Accumulate: y[i] += W[i] input (+ bias)        (the residual stream)
//   SwiGLU:     y[0] = silu(W[0] input) * (W[1] input)   (count == 2: gate and up)
struct FusedLinear {
  enum class Input { Plain, RmsNorm };
  enum class Output { Store, Accumulate, SwiGLU };
  Input input = Input::Plain;
  Output output = Output::Store;
  const float* x = nullptr;
  const float* norm = nullptr;
  float eps = 0.f;
  int count = 0;
  const DeviceLinear* w[3] = {};
  float* y[3] = {};
  int64_t rows = 0;
  // y = x W^T for one matrix (what Backend::linear computes).
  static FusedLinear single(const DeviceLinear& w, const float* x, float* y, int64_t rows) {
    FusedLinear op;
    op.x = x;
    op.count = 1;
    op.w[0] = &w;
    op.y[0] = y;
    op.rows = rows;
    return op;
  }
};

// Device work recorded once and replayed as one launch (CUDA graphs). It reads and writes the
// buffers it was recorded with, so it stays valid only while none of the backend's memory has been
// freed or moved since (valid() says so); inputs change by rewriting those buffers in place.
class StepGraph {
 public:
  virtual ~StepGraph() = default;
  virtual bool valid() const = 0;
  virtual void replay() = 0;  // asynchronous
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;

  // Memory.
  virtual DeviceBuffer alloc(size_t count) = 0;
  virtual void free_raw(float* p) = 0;
  virtual void upload(float* dst, const float* src_host, size_t count) = 0;
  virtual void download(float* dst_host, const float* src, size_t count) = 0;
  virtual void synchronize() {}
  // Bytes of device memory free for weights and caches (for "does not fit" errors).
  virtual size_t free_memory() const = 0;
  // Bytes of device memory in use as the device reports them (0 where not tracked: the CPU).
  virtual size_t used_memory() const { return 0; }
  // Memory to keep free beyond an estimate (library workspaces, fragmentation).
  virtual size_t memory_headroom() const { return 0; }
  // Bytes per element of the KV cache this backend allocates.
  virtual size_t kv_element_bytes() const { return 4; }
  // Bytes of a KV cache of these dimensions (keys and values) in `format`; fails with one line when
  // the size overflows or a quantized format does not fit head_dim.
  int64_t kv_cache_bytes(int64_t n_layers, int64_t n_kv_heads, int64_t head_dim, int64_t capacity,
                         KVFormat format = KVFormat::Full) const;

  // Weights.
  virtual std::unique_ptr<DeviceLinear> make_linear(const LinearWeight& w) = 0;
  virtual std::unique_ptr<DeviceEmbedding> make_embedding(const TensorView& table) = 0;
  virtual DeviceBuffer make_vector(const TensorView& v);  // F32/F16/BF16 -> fp32 on the device
  virtual void set_rope_tables(const RopeTables& tables) = 0;

  // Operations. `rows` is the number of tokens in flight.
  virtual void embed(const DeviceEmbedding& table, const int32_t* tokens_host, int64_t rows,
                     float* out) = 0;
  virtual void rmsnorm(const float* x, const float* weight, float* out, int64_t rows, int64_t dim,
                       float eps) = 0;
  virtual void linear(const DeviceLinear& w, const float* x, float* y, int64_t rows) = 0;
  // Rotates q [rows, n_heads*head_dim] and k [rows, n_kv_heads*head_dim] in place (rotate-half
  // convention) for positions pos0 .. pos0+rows-1.
  virtual void rope(float* q, float* k, int64_t rows, int64_t n_heads, int64_t n_kv_heads,
                    int64_t head_dim, int64_t pos0) = 0;
  virtual void silu_mul(const float* gate, const float* up, float* out, int64_t n) = 0;
  virtual void add(float* x, const float* y, int64_t n) = 0;
  // Copies `rows` rows of `cols` floats starting at row `first` (a row gather for the head).
  virtual void copy_rows(const float* src, int64_t first, int64_t rows, int64_t cols, float* dst) = 0;

  // Many sequences at once over a paged cache. The default fails with "not supported on <device>
  // yet"; the CPU and CUDA backends implement them.
  virtual std::unique_ptr<PagedKVCache> make_paged_kv_cache(int64_t n_layers, int64_t n_kv_heads, int64_t head_dim,
                                                            int64_t num_blocks, int64_t block_size, KVFormat format);
  // A paged cache for one sequence of up to `capacity` positions (native format, 16-position blocks).
  std::unique_ptr<SequenceCache> make_sequence_cache(int64_t n_layers, int64_t n_kv_heads, int64_t head_dim,
                                                     int64_t capacity);
  // Called once per forward pass over `batch` before embed_batch, rope_seqs and paged_attention
  // take it: checks its tokens against the vocabulary and its block tables against `cache`, and a
  // device copies the tokens, positions and block tables into its memory once instead of once per
  // layer, so that the pass itself is device work only (and a captured graph of it can be
  // replayed with the next batch's inputs). `min_len`: attention launches as if some sequence
  // had at least this many positions (one graph serves every batch up to that length).
  virtual void prepare_batch(const Batch& batch, const PagedKVCache& cache, int64_t vocab, int64_t min_len = 0);
  // embed() of the prepared batch's tokens.
  virtual void embed_batch(const DeviceEmbedding& table, float* out);
  // rope() of every sequence's rows at its own positions (one pass where the backend can).
  virtual void rope_seqs(float* q, float* k, const std::vector<BatchSeq>& seqs, int64_t n_heads, int64_t n_kv_heads,
                         int64_t head_dim);
  // For every sequence of `seqs`: writes its rows of k and v at their positions into its blocks
  // of layer `layer`, then computes causal attention of each of its rows of q over its positions
  // [0, pos] through its block table. q, k, v and out hold the batch's rows.
  virtual void paged_attention(const float* q, const float* k, const float* v, PagedKVCache& cache, int64_t layer,
                               const std::vector<BatchSeq>& seqs, const AttentionParams& p, float* out);
  // rope_seqs on q and k, then paged_attention: one call, so that a device can fold the rotation
  // into the store of the keys.
  virtual void rope_paged_attention(float* q, float* k, const float* v, PagedKVCache& cache, int64_t layer,
                                    const std::vector<BatchSeq>& seqs, const AttentionParams& p, float* out);
  // Copies every layer's keys and values of block `from` into block `to`, pair by pair in order
  // (copy-on-write).
  virtual void copy_kv_blocks(PagedKVCache& cache, const std::vector<std::pair<int32_t, int32_t>>& from_to);

  // Greedy choice of each of `rows` rows of logits [rows, vocab] in this backend's memory: the
  // first largest value's index, or Sampler::kNonFinite for a row holding a NaN or an infinity,
  // into ids_host. The default downloads the rows.
  virtual void argmax_rows(const float* logits, int64_t rows, int64_t vocab, int32_t* ids_host);
  // One token for each row of logits [rows.size(), vocab] in this backend's memory, row i drawn by
  // the rules of Sampler with rows[i]'s parameters and history (the penalty may change the
  // logits), or Sampler::kNonFinite, into ids_host. The default takes an all-greedy batch through
  // argmax_rows and otherwise downloads the rows to the host Sampler.
  virtual void sample_rows(float* logits, int64_t vocab, const std::vector<SampleRow>& rows, int32_t* ids_host);
  // sample_rows in three parts, so that the draw can sit in a captured graph: stage_sampling
  // copies the rows' parameters and penalty windows to the device, sample_staged draws (device work
  // only) from logits [rows, vocab], fetch_sampled waits and copies the ids to the host. The
  // defaults draw on the host in sample_staged; `rows` must outlive the draw.
  virtual void stage_sampling(const std::vector<SampleRow>& rows, int64_t vocab);
  virtual void sample_staged(float* logits);
  virtual void fetch_sampled(int32_t* ids_host);

  // Optional. Records `work` (device operations only: no upload, download, allocation or wait)
  // into a graph to replay; nullptr where the backend cannot capture.
  virtual std::unique_ptr<StepGraph> capture(const std::function<void()>& work) { return nullptr; }

  // Optional fusions. A backend that can run `op` in fewer passes over memory does it and returns
  // true; otherwise it returns false and the model runs the separate operations above.
  virtual bool fused_linear(const FusedLinear& op) { return false; }

  // ---- Quantization (qforge convert; see backends/quant_ops.h) ---------------------------------
  // Matrices are fp32, row-major, in this backend's memory. A backend without these throws a
  // one-line error saying that it cannot quantize.
  // {sum (a - b)^2, sum b^2} over n floats: the converter's relative error of a block's output.
  // The default downloads both; a device overrides it with a reduction where the data lives.
  virtual std::pair<double, double> diff_norms(const float* a, const float* b, int64_t n);
  // H [K][K] += X^T X for X [rows][K] (the Hessian of a linear layer's inputs, unnormalised).
  virtual void hessian_accumulate(float* H, const float* X, int64_t rows, int64_t K);
  // The diagonal of H [K][K], on the host.
  virtual std::vector<float> matrix_diagonal(const float* H, int64_t K);
  // U [K][K] = the upper Cholesky factor of A^-1 (A^-1 = U^T U), where A = P H P^T + damp I with
  // A[i][j] = H[perm[i]][perm[j]], and a zero diagonal entry of H (an input never active) counts
  // as 1. Returns false when A is not positive definite (the caller damps more and tries again).
  virtual bool gptq_inverse_factor(const float* H, const std::vector<int32_t>& perm, int64_t K, double damp,
                                   float* U);
  // GPTQ over W [K][N] whose rows are in U's order: group by group, scales from `search` at the
  // group's start, each row rounded and its error fed forward through U to the rows after it (the
  // rest of the group at once, the later groups by one matrix product per group). W is left
  // holding the dequantized weights.
  virtual GptqCodes gptq_quantize(float* W, const float* U, int64_t K, int64_t N,
                                  const std::vector<GptqGroup>& groups, const ScaleSearch& search);

 private:
  // What the default prepare_batch and sampling steps keep between their parts (host memory).
  std::vector<int32_t> prepared_tokens_;
  std::vector<SampleRow> staged_rows_;
  int64_t staged_vocab_ = 0;
  std::vector<int32_t> sampled_;
};

// Fails with one line when the items do not fit in b's free memory (less its headroom):
//   "<subject> on <device> needs ~140.2 GB (weights 138.0 GB + KV cache 2.1 GB), 23.1 GB available<hint>"
void check_memory(const Backend& b, const std::string& subject, const std::vector<MemoryItem>& items,
                  const std::string& hint = "");

struct DeviceSpec {
  std::string kind = "cpu";  // cpu | cuda
  int index = 0;
  int threads = 0;           // CPU threads, 0 = all cores
};
// "auto" (CUDA device 0 when one can be used, else the CPU), "cpu", "cuda", "cuda:1".
DeviceSpec parse_device(const std::string& spec);
std::unique_ptr<Backend> make_backend(const DeviceSpec& spec);

}  // namespace qf
