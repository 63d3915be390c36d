#include "backends/backend.h"

#include <algorithm>

#include "backends/cpu/cpu_backend.h"
#include "backends/sampler.h"
#include "core/error.h"
#include "core/log.h"
#include "core/sizes.h"
#ifdef QFORGE_HAVE_CUDA
#include "backends/cuda/cuda_backend.h"
#endif

namespace qf {

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& o) noexcept {
  if (this != &o) {
    reset();
    backend_ = o.backend_;
    ptr_ = o.ptr_;
    count_ = o.count_;
    o.backend_ = nullptr;
    o.ptr_ = nullptr;
    o.count_ = 0;
  }
  return *this;
}

void DeviceBuffer::reset() {
  if (backend_ && ptr_) backend_->free_raw(ptr_);
  backend_ = nullptr;
  ptr_ = nullptr;
  count_ = 0;
}

DeviceBuffer Backend::make_vector(const TensorView& v) {
  std::vector<float> host = to_f32(v);
  DeviceBuffer b = alloc(host.size());
  upload(b.data(), host.data(), host.size());
  return b;
}

int64_t Backend::kv_cache_bytes(int64_t n_layers, int64_t n_kv_heads, int64_t head_dim, int64_t capacity,
                                KVFormat format) const {
  const std::string what = str("the KV cache for ", capacity, " positions");
  if (format == KVFormat::Full)
    return checked_product({2, n_layers, n_kv_heads, head_dim, capacity, static_cast<int64_t>(kv_element_bytes())}, what);
  if (head_dim % kKVGroup != 0)
    fail("a ", kv_format_name(format), " KV cache needs a head size that is a multiple of ", kKVGroup, ", not ", head_dim);
  return checked_product({2, n_layers, n_kv_heads, capacity, kv_row_bytes(format, head_dim)}, what);
}

void check_memory(const Backend& b, const std::string& subject, const std::vector<MemoryItem>& items,
                  const std::string& hint) {
  double total = 0;
  for (const auto& it : items) total += it.bytes;
  const double avail = static_cast<double>(b.free_memory());
  const double headroom = static_cast<double>(b.memory_headroom());
  if (total + headroom <= avail) return;
  std::string parts;
  for (const auto& it : items) {
    if (it.bytes <= 0) continue;
    parts += str(parts.empty() ? "" : " + ", it.what, " ", format_bytes(it.bytes));
  }
  fail(subject, " on ", b.name(), " needs ~", format_bytes(total + headroom), " (", parts,
       headroom > 0 ? str(" + ", format_bytes(headroom), " reserve") : std::string(), "), ", format_bytes(avail),
       " available", hint);
}

namespace {
[[noreturn]] void cannot_quantize(const Backend& b) {
  fail("the ", b.name(), " backend cannot quantize (use --device cpu or cuda)");
}
}  // namespace

std::pair<double, double> Backend::diff_norms(const float* a, const float* b, int64_t n) {
  std::vector<float> ha(static_cast<size_t>(n)), hb(static_cast<size_t>(n));
  download(ha.data(), a, ha.size());
  download(hb.data(), b, hb.size());
  double d = 0, r = 0;
  for (size_t i = 0; i < ha.size(); ++i) {
    const double e = static_cast<double>(ha[i]) - hb[i];
    d += e * e;
    r += static_cast<double>(hb[i]) * hb[i];
  }
  return {d, r};
}

int64_t check_gptq_groups(const std::vector<GptqGroup>& groups, int64_t K) {
  int64_t total = 0, max_rows = 0;
  for (const auto& g : groups) {
    QF_CHECK(g.bits >= 2 && g.bits <= 8 && g.rows > 0, "internal: GPTQ group of ", g.rows, " rows at ", g.bits, " bits");
    total += g.rows;
    max_rows = std::max(max_rows, g.rows);
  }
  QF_CHECK(total == K, "internal: GPTQ groups cover ", total, " of ", K, " rows");
  return max_rows;
}

void Backend::hessian_accumulate(float*, const float*, int64_t, int64_t) { cannot_quantize(*this); }
std::vector<float> Backend::matrix_diagonal(const float*, int64_t) { cannot_quantize(*this); }
bool Backend::gptq_inverse_factor(const float*, const std::vector<int32_t>&, int64_t, double, float*) {
  cannot_quantize(*this);
}
GptqCodes Backend::gptq_quantize(float*, const float*, int64_t, int64_t, const std::vector<GptqGroup>&,
                                 const ScaleSearch&) {
  cannot_quantize(*this);
}

std::unique_ptr<PagedKVCache> Backend::make_paged_kv_cache(int64_t, int64_t, int64_t, int64_t, int64_t, KVFormat) {
  fail("a paged KV cache (many sequences at once) is not supported on ", name(), " yet");
}
void Backend::rope_seqs(float* q, float* k, const std::vector<BatchSeq>& seqs, int64_t n_heads, int64_t n_kv_heads,
                        int64_t head_dim) {
  for (const BatchSeq& s : seqs)
    rope(q + s.first_row * n_heads * head_dim, k + s.first_row * n_kv_heads * head_dim, s.rows, n_heads, n_kv_heads,
         head_dim, s.pos0);
}
void Backend::argmax_rows(const float* logits, int64_t rows, int64_t vocab, int32_t* ids_host) {
  std::vector<float> row(static_cast<size_t>(vocab));
  for (int64_t r = 0; r < rows; ++r) {
    download(row.data(), logits + r * vocab, row.size());
    ids_host[r] = all_finite(row.data(), vocab) ? argmax(row.data(), vocab) : Sampler::kNonFinite;
  }
}
void Backend::sample_rows(float* logits, int64_t vocab, const std::vector<SampleRow>& rows, int32_t* ids_host) {
  if (rows.empty()) return;
  stage_sampling(rows, vocab);
  sample_staged(logits);
  fetch_sampled(ids_host);
}
void Backend::stage_sampling(const std::vector<SampleRow>& rows, int64_t vocab) {
  staged_rows_ = rows;
  staged_vocab_ = vocab;
}
void Backend::sample_staged(float* logits) {
  const int64_t vocab = staged_vocab_;
  const auto n = static_cast<int64_t>(staged_rows_.size());
  sampled_.assign(static_cast<size_t>(n), 0);
  if (all_greedy(staged_rows_)) {
    argmax_rows(logits, n, vocab, sampled_.data());
    return;
  }
  std::vector<float> row(static_cast<size_t>(vocab));
  for (int64_t i = 0; i < n; ++i) {
    const SampleRow& r = staged_rows_[static_cast<size_t>(i)];
    download(row.data(), logits + i * vocab, row.size());
    sampled_[static_cast<size_t>(i)] = Sampler(*r.params).sample(row.data(), vocab, r.history, r.history_len);
  }
}
void Backend::fetch_sampled(int32_t* ids_host) { std::copy(sampled_.begin(), sampled_.end(), ids_host); }

void check_batch_tables(const Batch& batch, const PagedKVCache& cache) {
  const auto n = static_cast<int64_t>(batch.tokens.size());
  for (const BatchSeq& s : batch.seqs) {
    QF_CHECK(s.rows >= 0 && s.first_row >= 0 && s.first_row + s.rows <= n, "batch: a sequence's rows outside the batch");
    QF_CHECK(s.pos0 >= 0 && s.pos0 + s.rows <= s.n_blocks * cache.block_size, "paged attention: positions ", s.pos0,
             "..", s.pos0 + s.rows, " beyond the sequence's ", s.n_blocks, " blocks");
    for (int64_t i = 0; i < s.n_blocks; ++i)
      QF_CHECK(s.block_table[i] >= 0 && s.block_table[i] < cache.num_blocks, "paged attention: block ",
               s.block_table[i], " outside the cache");
  }
}

Batch SequenceCache::batch(const int32_t* tokens, int64_t n, int64_t pos0, bool all_logits) const {
  if (pos0 < 0 || n > capacity || pos0 > capacity - n)
    fail("context full: ", n, " tokens at position ", pos0, " do not fit the context of ", capacity);
  Batch b;
  b.tokens.assign(tokens, tokens + n);
  BatchSeq s;
  s.rows = n;
  s.pos0 = pos0;
  s.block_table = table.data();
  s.n_blocks = static_cast<int64_t>(table.size());
  b.seqs.push_back(s);
  for (int64_t r = all_logits ? 0 : n - 1; r < n; ++r) b.logit_rows.push_back(r);
  return b;
}

std::unique_ptr<SequenceCache> Backend::make_sequence_cache(int64_t n_layers, int64_t n_kv_heads, int64_t head_dim,
                                                            int64_t capacity) {
  if (capacity <= 0) fail("context size must be positive");
  constexpr int64_t kBlock = 16;
  const int32_t blocks = kv_block_count(capacity, kBlock);
  auto c = std::make_unique<SequenceCache>();
  c->paged = make_paged_kv_cache(n_layers, n_kv_heads, head_dim, blocks, kBlock, KVFormat::Full);
  c->table.resize(static_cast<size_t>(blocks));
  for (int32_t i = 0; i < blocks; ++i) c->table[static_cast<size_t>(i)] = i;
  c->capacity = capacity;
  return c;
}

void Backend::prepare_batch(const Batch& batch, const PagedKVCache& cache, int64_t vocab, int64_t) {
  check_batch_tables(batch, cache);
  for (int32_t t : batch.tokens)
    if (t < 0 || t >= vocab) fail("token id ", t, " is outside the vocabulary (", vocab, ")");
  prepared_tokens_ = batch.tokens;
}
void Backend::embed_batch(const DeviceEmbedding& table, float* out) {
  embed(table, prepared_tokens_.data(), static_cast<int64_t>(prepared_tokens_.size()), out);
}
void Backend::rope_paged_attention(float* q, float* k, const float* v, PagedKVCache& cache, int64_t layer,
                                   const std::vector<BatchSeq>& seqs, const AttentionParams& p, float* out) {
  rope_seqs(q, k, seqs, p.n_heads, p.n_kv_heads, p.head_dim);
  paged_attention(q, k, v, cache, layer, seqs, p, out);
}
void Backend::paged_attention(const float*, const float*, const float*, PagedKVCache&, int64_t,
                              const std::vector<BatchSeq>&, const AttentionParams&, float*) {
  fail("paged attention (many sequences at once) is not supported on ", name(), " yet");
}
void Backend::copy_kv_blocks(PagedKVCache&, const std::vector<std::pair<int32_t, int32_t>>&) {
  fail("a paged KV cache (many sequences at once) is not supported on ", name(), " yet");
}

DeviceSpec parse_device(const std::string& spec) {
  DeviceSpec d;
  if (spec == "cpu") return d;
  if (spec == "auto") {
#ifdef QFORGE_HAVE_CUDA
    if (cuda_device_count() > 0) {
      d.kind = "cuda";
      return d;
    }
    log_info("--device auto: no usable GPU, running on the CPU (slower)");
#endif
    return d;
  }
  if (spec.rfind("cuda", 0) == 0) {
    d.kind = "cuda";
    if (spec.size() > 4) {
      if (spec[4] != ':' || spec.size() == 5) fail("bad --device '", spec, "' (use auto, cpu, cuda or cuda:N)");
      try {
        size_t used = 0;
        d.index = std::stoi(spec.substr(5), &used);
        if (used != spec.size() - 5 || d.index < 0) throw std::invalid_argument("x");
      } catch (const std::exception&) {
        fail("bad --device '", spec, "' (use auto, cpu, cuda or cuda:N)");
      }
    }
    return d;
  }
  fail("bad --device '", spec, "' (use auto, cpu, cuda or cuda:N)");
}

std::unique_ptr<Backend> make_backend(const DeviceSpec& spec) {
  if (spec.kind == "cpu") return std::make_unique<CpuBackend>(spec.threads);
#ifdef QFORGE_HAVE_CUDA
  if (spec.kind == "cuda") return make_cuda_backend(spec.index);
#endif
  fail("device '", spec.kind, "' is not available in this build (built without CUDA)");
}

}  // namespace qf
