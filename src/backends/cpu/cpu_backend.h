// The reference backend: plain C++ on host memory, multi-threaded with the global thread pool.
#pragma once
#include "backends/backend.h"
#include "core/thread_pool.h"

namespace qf {

// Bytes of host memory available to this process now (MemAvailable of /proc/meminfo, else the
// physical memory).
size_t host_memory_available();

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(int threads = 0);
  std::string name() const override;

  DeviceBuffer alloc(size_t count) override;
  void free_raw(float* p) override;
  void upload(float* dst, const float* src_host, size_t count) override;
  void download(float* dst_host, const float* src, size_t count) override;
  size_t free_memory() const override;

  std::unique_ptr<DeviceLinear> make_linear(const LinearWeight& w) override;
  std::unique_ptr<DeviceEmbedding> make_embedding(const TensorView& table) override;
  void set_rope_tables(const RopeTables& tables) override { rope_ = tables; }

  void embed(const DeviceEmbedding& table, const int32_t* tokens, int64_t rows, float* out) override;
  void rmsnorm(const float* x, const float* weight, float* out, int64_t rows, int64_t dim,
               float eps) override;
  void linear(const DeviceLinear& w, const float* x, float* y, int64_t rows) override;
  void rope(float* q, float* k, int64_t rows, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim,
            int64_t pos0) override;
  std::unique_ptr<PagedKVCache> make_paged_kv_cache(int64_t n_layers, int64_t n_kv_heads, int64_t head_dim,
                                                    int64_t num_blocks, int64_t block_size, KVFormat format) override;
  void paged_attention(const float* q, const float* k, const float* v, PagedKVCache& cache, int64_t layer,
                       const std::vector<BatchSeq>& seqs, const AttentionParams& p, float* out) override;
  void copy_kv_blocks(PagedKVCache& cache, const std::vector<std::pair<int32_t, int32_t>>& from_to) override;
  void silu_mul(const float* gate, const float* up, float* out, int64_t n) override;
  void add(float* x, const float* y, int64_t n) override;
  void copy_rows(const float* src, int64_t first, int64_t rows, int64_t cols, float* dst) override;

  // GPTQ, the reference implementation (cpu_gptq.cpp).
  void hessian_accumulate(float* H, const float* X, int64_t rows, int64_t K) override;
  std::vector<float> matrix_diagonal(const float* H, int64_t K) override;
  bool gptq_inverse_factor(const float* H, const std::vector<int32_t>& perm, int64_t K, double damp,
                           float* U) override;
  GptqCodes gptq_quantize(float* W, const float* U, int64_t K, int64_t N, const std::vector<GptqGroup>& groups,
                          const ScaleSearch& search) override;

 private:
  ThreadPool& pool_;
  RopeTables rope_;
};

}  // namespace qf
