#include "backends/cpu/cpu_backend.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <fstream>
#include <string>

#include "backends/cpu/cpu_linear.h"
#include "core/error.h"
#include "core/sizes.h"

namespace qf {

namespace {

ThreadPool& pool_for(int threads) {
  try {
    if (threads > 0 && ThreadPool::global().size() != threads) ThreadPool::set_global_threads(threads);
    return ThreadPool::global();
  } catch (const Error& e) {
    if (threads > 0) fail("-t ", threads, ": ", e.what(), "; use a smaller -t");
    fail("-t 0 (all cores): ", e.what(), "; give a smaller -t");
  }
}

class CpuEmbedding final : public DeviceEmbedding {
 public:
  explicit CpuEmbedding(const TensorView& t) : table(t) {
    vocab = t.dim(0);
    dim = t.dim(1);
  }
  TensorView table;  // stays in the mapped file
};

// Layout [layer][block][kv_head][slot][head_dim]: a block's keys of one head are contiguous. Full:
// fp32 in k, v; quantized (backends/kv_quant.h): codes in qk, qv and group scales in sk, sv.
class CpuPagedKVCache final : public PagedKVCache {
 public:
  std::vector<float> k, v;
  std::vector<uint8_t> qk, qv;
  std::vector<float> sk, sv;
  int64_t row(int64_t layer, int64_t block, int64_t h, int64_t slot) const {
    return ((layer * num_blocks + block) * n_kv_heads + h) * block_size + slot;
  }
  int64_t code_bytes() const { return head_dim * kv_bits(format) / 8; }  // per head row
  int64_t groups() const { return head_dim / kKVGroup; }
  void store(bool key, int64_t r, const float* x) {
    if (format == KVFormat::Full) {
      std::memcpy((key ? k : v).data() + r * head_dim, x, static_cast<size_t>(head_dim) * 4);
      return;
    }
    kv_quantize_row(x, head_dim, format, (key ? qk : qv).data() + r * code_bytes(), (key ? sk : sv).data() + r * groups());
  }
  // Row r as floats: in place when full, else dequantized into buf.
  const float* load(bool key, int64_t r, float* buf) const {
    if (format == KVFormat::Full) return (key ? k : v).data() + r * head_dim;
    kv_dequantize_row((key ? qk : qv).data() + r * code_bytes(), (key ? sk : sv).data() + r * groups(), head_dim, format,
                      buf);
    return buf;
  }
};

// Causal attention of one query row of one head over positions [first, last]: softmax(q k^T *
// scale) v, with k(j) and v(j) the key and value rows of position j. scores holds last + 1 floats.
template <typename KeyAt, typename ValueAt>
void attend(const float* qv, int64_t first, int64_t last, int64_t hd, float scale, const KeyAt& k_at,
            const ValueAt& v_at, float* scores, float* o) {
  float mx = -INFINITY;
  for (int64_t j = first; j <= last; ++j) {
    const float s = dot_f32(qv, k_at(j), hd) * scale;
    scores[j] = s;
    mx = std::max(mx, s);
  }
  double sum = 0.0;
  for (int64_t j = first; j <= last; ++j) {
    const float e = std::exp(scores[j] - mx);
    scores[j] = e;
    sum += e;
  }
  const float inv = static_cast<float>(1.0 / sum);
  std::fill(o, o + hd, 0.f);
  for (int64_t j = first; j <= last; ++j) {
    const float wj = scores[j] * inv;
    const float* vv = v_at(j);
    for (int64_t i = 0; i < hd; ++i) o[i] += wj * vv[i];
  }
}

}  // namespace

CpuBackend::CpuBackend(int threads) : pool_(pool_for(threads)) {}

std::string CpuBackend::name() const { return str("cpu (", pool_.size(), " threads)"); }

DeviceBuffer CpuBackend::alloc(size_t count) {
  float* p = nullptr;
  try {
    p = new float[count == 0 ? 1 : count]();
  } catch (const std::bad_alloc&) {
    fail("out of memory: a buffer of ", format_bytes(static_cast<double>(count) * 4.0), " could not be allocated (",
         format_bytes(static_cast<double>(free_memory())), " available)");
  }
  return DeviceBuffer(this, p, count);
}
void CpuBackend::free_raw(float* p) { delete[] p; }
void CpuBackend::upload(float* dst, const float* src, size_t count) { std::memcpy(dst, src, count * 4); }
void CpuBackend::download(float* dst, const float* src, size_t count) { std::memcpy(dst, src, count * 4); }

size_t CpuBackend::free_memory() const { return host_memory_available(); }

size_t host_memory_available() {
  std::ifstream in("/proc/meminfo");
  std::string key;
  size_t kb = 0;
  while (in >> key) {
    if (key == "MemAvailable:") {
      in >> kb;
      return kb * 1024;
    }
    in.ignore(256, '\n');
  }
  return static_cast<size_t>(sysconf(_SC_PHYS_PAGES)) * static_cast<size_t>(sysconf(_SC_PAGE_SIZE));
}

std::unique_ptr<DeviceLinear> CpuBackend::make_linear(const LinearWeight& w) {
  if (w.format == LinearFormat::Dense) return make_dense_cpu_linear(w);
  return make_quant_cpu_linear(w);
}

std::unique_ptr<DeviceEmbedding> CpuBackend::make_embedding(const TensorView& table) {
  QF_CHECK(table.rank() == 2, "embedding table must be 2-D");
  return std::make_unique<CpuEmbedding>(table);
}

namespace {

// k and v of `need` bytes together, zeroed; `what` names the cache in the one-line errors, `hint`
// ends them (what the user can change).
void allocate_kv(int64_t need, size_t avail, const std::string& what, const char* hint, std::vector<float>& k,
                 std::vector<float>& v) {
  if (static_cast<size_t>(need) > avail)
    fail(what, " needs ", format_bytes(static_cast<double>(need)), " but only ", format_bytes(static_cast<double>(avail)),
         " of memory is available", hint);
  try {
    k.assign(static_cast<size_t>(need / 8), 0.f);  // floats in each of k and v
    v.assign(static_cast<size_t>(need / 8), 0.f);
  } catch (const std::bad_alloc&) {
    fail("out of memory: ", what, " (", format_bytes(static_cast<double>(need)), ") could not be allocated", hint);
  }
}

}  // namespace

std::unique_ptr<PagedKVCache> CpuBackend::make_paged_kv_cache(int64_t n_layers, int64_t n_kv_heads, int64_t head_dim,
                                                              int64_t num_blocks, int64_t block_size, KVFormat format) {
  QF_CHECK(num_blocks > 0 && block_size > 0, "a paged KV cache needs blocks");
  auto c = std::make_unique<CpuPagedKVCache>();
  c->n_layers = n_layers;
  c->n_kv_heads = n_kv_heads;
  c->head_dim = head_dim;
  c->num_blocks = num_blocks;
  c->block_size = block_size;
  c->format = format;
  const int64_t positions = checked_mul(num_blocks, block_size, "KV cache positions");
  const int64_t bytes = kv_cache_bytes(n_layers, n_kv_heads, head_dim, positions, format);
  const std::string what = str("the ", kv_format_name(format), " KV cache of ", positions, " positions (", num_blocks,
                               " blocks of ", block_size, ")");
  const char* hint = " (use a smaller --ctx, or fewer requests at once)";
  if (format == KVFormat::Full) {
    allocate_kv(bytes, free_memory(), what, hint, c->k, c->v);
    return c;
  }
  if (static_cast<size_t>(bytes) > free_memory())
    fail(what, " needs ", format_bytes(static_cast<double>(bytes)), " but only ",
         format_bytes(static_cast<double>(free_memory())), " of memory is available", hint);
  const int64_t rows = n_layers * num_blocks * n_kv_heads * block_size;
  try {
    c->qk.assign(static_cast<size_t>(rows * c->code_bytes()), 0);
    c->qv.assign(c->qk.size(), 0);
    c->sk.assign(static_cast<size_t>(rows * c->groups()), 0.f);
    c->sv.assign(c->sk.size(), 0.f);
  } catch (const std::bad_alloc&) {
    fail("out of memory: ", what, " (", format_bytes(static_cast<double>(bytes)), ") could not be allocated", hint);
  }
  return c;
}

void CpuBackend::paged_attention(const float* q, const float* k, const float* v, PagedKVCache& cache_base,
                                 int64_t layer, const std::vector<BatchSeq>& seqs, const AttentionParams& p,
                                 float* out) {
  auto& c = static_cast<CpuPagedKVCache&>(cache_base);
  const int64_t hd = p.head_dim, kvd = p.n_kv_heads * hd, qd = p.n_heads * hd, bs = c.block_size;
  int64_t rows = 0, longest = 0;
  for (const BatchSeq& s : seqs) {
    QF_CHECK(s.pos0 >= 0 && s.rows >= 0 && s.pos0 + s.rows <= s.n_blocks * bs,
             "paged attention: positions ", s.pos0, "..", s.pos0 + s.rows, " beyond the sequence's ", s.n_blocks,
             " blocks");
    for (int64_t t = 0; t < s.rows; ++t) {
      const int64_t pos = s.pos0 + t;
      const int32_t blk = s.block_table[pos / bs];
      QF_CHECK(blk >= 0 && blk < c.num_blocks, "paged attention: block ", blk, " outside the cache");
      for (int64_t h = 0; h < p.n_kv_heads; ++h) {
        const int64_t r = c.row(layer, blk, h, pos % bs);
        c.store(true, r, k + (s.first_row + t) * kvd + h * hd);
        c.store(false, r, v + (s.first_row + t) * kvd + h * hd);
      }
    }
    rows += s.rows;
    longest = std::max(longest, s.pos0 + s.rows);
  }
  // Work items: (row i of the sequences' rows, head); row i is offset t of sequence seq_of[i].
  std::vector<const BatchSeq*> seq_of;
  std::vector<int64_t> offset_of;
  seq_of.reserve(static_cast<size_t>(rows));
  offset_of.reserve(static_cast<size_t>(rows));
  for (const BatchSeq& s : seqs)
    for (int64_t t = 0; t < s.rows; ++t) {
      seq_of.push_back(&s);
      offset_of.push_back(t);
    }
  const int64_t group = p.n_heads / p.n_kv_heads;
  pool_.parallel_for(p.n_heads * rows, std::max<int64_t>(1, 4096 / std::max<int64_t>(1, longest * hd)),
                     [&](int64_t w0, int64_t w1) {
    std::vector<float> scores(static_cast<size_t>(longest)), kbuf(static_cast<size_t>(hd)), vbuf(kbuf.size());
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t h = w % p.n_heads, i = w / p.n_heads, kvh = h / group;
      const BatchSeq& s = *seq_of[static_cast<size_t>(i)];
      const int64_t t = offset_of[static_cast<size_t>(i)], row = s.first_row + t, pos = s.pos0 + t;
      const int64_t first = p.sliding_window > 0 ? std::max<int64_t>(0, pos - p.sliding_window + 1) : 0;
      const auto slot = [&](int64_t j) { return c.row(layer, s.block_table[j / bs], kvh, j % bs); };
      attend(q + row * qd + h * hd, first, pos, hd, p.scale, [&](int64_t j) { return c.load(true, slot(j), kbuf.data()); },
             [&](int64_t j) { return c.load(false, slot(j), vbuf.data()); }, scores.data(), out + row * qd + h * hd);
    }
  });
}

void CpuBackend::copy_kv_blocks(PagedKVCache& cache_base, const std::vector<std::pair<int32_t, int32_t>>& from_to) {
  auto& c = static_cast<CpuPagedKVCache&>(cache_base);
  const int64_t rows = c.n_kv_heads * c.block_size;  // head rows per block and layer
  const auto copy = [&](auto& data, int64_t per_row, int64_t from, int64_t to) {
    std::copy_n(data.data() + from * per_row, rows * per_row, data.data() + to * per_row);
  };
  for (const auto& [from, to] : from_to) {
    QF_CHECK(from >= 0 && from < c.num_blocks && to >= 0 && to < c.num_blocks, "KV block copy outside the cache");
    for (int64_t l = 0; l < c.n_layers; ++l) {
      const int64_t rf = c.row(l, from, 0, 0), rt = c.row(l, to, 0, 0);
      if (c.format == KVFormat::Full) {
        copy(c.k, c.head_dim, rf, rt);
        copy(c.v, c.head_dim, rf, rt);
      } else {
        copy(c.qk, c.code_bytes(), rf, rt);
        copy(c.qv, c.code_bytes(), rf, rt);
        copy(c.sk, c.groups(), rf, rt);
        copy(c.sv, c.groups(), rf, rt);
      }
    }
  }
}

void CpuBackend::embed(const DeviceEmbedding& table, const int32_t* tokens, int64_t rows, float* out) {
  const auto& e = static_cast<const CpuEmbedding&>(table);
  const size_t row_bytes = static_cast<size_t>(e.dim) * dtype_size(e.table.dtype);
  for (int64_t t = 0; t < rows; ++t) {
    const int32_t id = tokens[t];
    if (id < 0 || id >= e.vocab) fail("token id ", id, " is outside the vocabulary (", e.vocab, ")");
    const auto* src = static_cast<const unsigned char*>(e.table.data) + static_cast<size_t>(id) * row_bytes;
    convert_to_f32(e.table.dtype, src, out + t * e.dim, static_cast<size_t>(e.dim));
  }
}

void CpuBackend::rmsnorm(const float* x, const float* w, float* out, int64_t rows, int64_t dim, float eps) {
  pool_.parallel_for(rows, std::max<int64_t>(1, 16384 / dim), [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* xr = x + r * dim;
      double ss = 0.0;
      for (int64_t i = 0; i < dim; ++i) ss += static_cast<double>(xr[i]) * xr[i];
      const float inv = 1.0f / std::sqrt(static_cast<float>(ss / static_cast<double>(dim)) + eps);
      float* o = out + r * dim;
      for (int64_t i = 0; i < dim; ++i) o[i] = xr[i] * inv * w[i];
    }
  });
}

void CpuBackend::linear(const DeviceLinear& w, const float* x, float* y, int64_t rows) {
  static_cast<const CpuLinear&>(w).forward(x, y, rows, pool_);
}

void CpuBackend::rope(float* q, float* k, int64_t rows, int64_t n_heads, int64_t n_kv_heads,
                      int64_t head_dim, int64_t pos0) {
  const int64_t half = head_dim / 2;
  QF_CHECK(half == rope_.half_dim, "RoPE tables were built for head_dim ", 2 * rope_.half_dim);
  QF_CHECK(pos0 + rows <= rope_.max_pos, "position ", pos0 + rows, " is beyond the RoPE tables (",
           rope_.max_pos, ")");
  auto rotate = [&](float* x, int64_t heads, int64_t t) {
    const float* c = rope_.cos.data() + (pos0 + t) * half;
    const float* s = rope_.sin.data() + (pos0 + t) * half;
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x + h * head_dim;
      for (int64_t i = 0; i < half; ++i) {
        const float a = v[i], b = v[i + half];
        v[i] = a * c[i] - b * s[i];
        v[i + half] = b * c[i] + a * s[i];
      }
    }
  };
  pool_.parallel_for(rows, std::max<int64_t>(1, 16384 / ((n_heads + n_kv_heads) * head_dim)), [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      rotate(q + t * n_heads * head_dim, n_heads, t);
      rotate(k + t * n_kv_heads * head_dim, n_kv_heads, t);
    }
  });
}

void CpuBackend::silu_mul(const float* gate, const float* up, float* out, int64_t n) {
  pool_.parallel_for(n, 16384, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const float g = gate[i];
      out[i] = g / (1.0f + std::exp(-g)) * up[i];
    }
  });
}

void CpuBackend::add(float* x, const float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] += y[i];
}

void CpuBackend::copy_rows(const float* src, int64_t first, int64_t rows, int64_t cols, float* dst) {
  std::memcpy(dst, src + first * cols, static_cast<size_t>(rows * cols) * 4);
}

}  // namespace qf
