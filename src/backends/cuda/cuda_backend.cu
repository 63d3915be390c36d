// The CUDA backend: memory, weight upload, the element-wise kernels (embed, rmsnorm, rope,
// silu_mul, add), greedy argmax and CUDA graph capture. Linear layers live in cuda_linear.cu,
// attention in cuda_attention.cu.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdlib>
#include <vector>

#include "backends/cuda/cuda_internal.cuh"
#include "backends/cuda/cuda_quant.cuh"
#include "core/sizes.h"

namespace qf {

using namespace qf::cuda;

namespace cuda {

CudaLinear::~CudaLinear() {
  cudaFree(weight);
  cudaFree(bias);
}
CudaEmbedding::~CudaEmbedding() { cudaFree(table); }
CudaPagedKVCache::~CudaPagedKVCache() {
  cudaFree(k);
  cudaFree(v);
  cudaFree(sk);
  cudaFree(sv);
}

DeviceBatch::~DeviceBatch() { cudaFree(storage); }

namespace {

// An id outside the vocabulary (a device-side token of -1 after non-finite logits) embeds as zeros
// rather than reading outside the table; the host stops at that token anyway.
template <typename T>
__global__ void embed_kernel(const T* __restrict__ table, const int32_t* __restrict__ tokens,
                             int64_t dim, int64_t vocab, float* __restrict__ out) {
  pdl_wait();
  const int row = blockIdx.y;
  const int64_t id = tokens[row];
  const bool valid = id >= 0 && id < vocab;
  const T* src = table + (valid ? id : 0) * dim;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < dim;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[row * dim + i] = valid ? to_float<T>(src[i]) : 0.0f;
}

// One block per row.
__global__ void rmsnorm_kernel(const float* __restrict__ x, const float* __restrict__ w,
                               float* __restrict__ out, int64_t dim, float eps) {
  pdl_wait();
  const float* xr = x + blockIdx.x * dim;
  float* o = out + blockIdx.x * dim;
  float ss = 0.f;
  const bool vec = (dim % 4) == 0;
  if (vec) {
    for (int64_t i = threadIdx.x; i < dim / 4; i += blockDim.x) {
      const float4 v = reinterpret_cast<const float4*>(xr)[i];
      ss += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
    }
  } else {
    for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) ss += xr[i] * xr[i];
  }
  __shared__ float red[32];
  ss = warp_sum(ss);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = ss;
  __syncthreads();
  if (threadIdx.x < 32) {
    float t = threadIdx.x < (blockDim.x >> 5) ? red[threadIdx.x] : 0.f;
    t = warp_sum(t);
    if (threadIdx.x == 0) red[0] = t;
  }
  __syncthreads();
  const float inv = rsqrtf(red[0] / static_cast<float>(dim) + eps);
  if (vec) {
    for (int64_t i = threadIdx.x; i < dim / 4; i += blockDim.x) {
      const float4 v = reinterpret_cast<const float4*>(xr)[i];
      const float4 g = reinterpret_cast<const float4*>(w)[i];
      reinterpret_cast<float4*>(o)[i] = make_float4(v.x * inv * g.x, v.y * inv * g.y, v.z * inv * g.z, v.w * inv * g.w);
    }
  } else {
    for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) o[i] = xr[i] * inv * w[i];
  }
}

// One thread per (row, head, i < half) pair of q and k heads.
// Row t at position row_pos[t] when given (a batch of sequences), else at pos0 + t.
__global__ void rope_kernel(float* __restrict__ q, float* __restrict__ k, int64_t rows, int n_heads,
                            int n_kv_heads, int head_dim, int64_t pos0, const int* __restrict__ row_pos,
                            const float* __restrict__ cos_t, const float* __restrict__ sin_t) {
  pdl_wait();
  const int half = head_dim / 2;
  const int heads = n_heads + n_kv_heads;
  const int64_t total = rows * heads * half;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int i = static_cast<int>(idx % half);
    const int h = static_cast<int>((idx / half) % heads);
    const int64_t t = idx / (static_cast<int64_t>(half) * heads);
    float* v = h < n_heads ? q + (t * n_heads + h) * head_dim : k + (t * n_kv_heads + (h - n_heads)) * head_dim;
    const int64_t pos = row_pos ? row_pos[t] : pos0 + t;
    const float c = cos_t[pos * half + i], s = sin_t[pos * half + i];
    const float a = v[i], b = v[i + half];
    v[i] = a * c - b * s;
    v[i + half] = b * c + a * s;
  }
}

// One block per row: the first index of the row's largest value, or -1 (Sampler::kNonFinite) when
// the row holds a NaN or an infinity.
__global__ void argmax_rows_kernel(const float* __restrict__ logits, int64_t vocab, int32_t* __restrict__ out) {
  __shared__ float best_w[32];
  __shared__ int idx_w[32];
  pdl_wait();
  const float* row = logits + blockIdx.x * vocab;
  float best = -INFINITY;
  int idx = 0x7fffffff;
  int bad = 0;
  for (int64_t i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float v = row[i];
    bad |= !(fabsf(v) <= 3.40282347e38f);
    if (v > best) best = v, idx = static_cast<int>(i);  // i grows: the first of equal values stays
  }
  bad = __syncthreads_or(bad);
  for (int o = 16; o > 0; o >>= 1) {
    const float ob = __shfl_xor_sync(0xffffffffu, best, o);
    const int oi = __shfl_xor_sync(0xffffffffu, idx, o);
    if (ob > best || (ob == best && oi < idx)) best = ob, idx = oi;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) / 32;
  if (lane == 0) best_w[warp] = best, idx_w[warp] = idx;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < warps; ++w)
      if (best_w[w] > best_w[0] || (best_w[w] == best_w[0] && idx_w[w] < idx_w[0])) best_w[0] = best_w[w], idx_w[0] = idx_w[w];
    out[blockIdx.x] = bad ? -1 : idx_w[0];
  }
}

__global__ void silu_mul_kernel(const float* __restrict__ g, const float* __restrict__ u,
                                float* __restrict__ out, int64_t n) {
  pdl_wait();
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float x = g[i];
    out[i] = x / (1.0f + __expf(-x)) * u[i];
  }
}

__global__ void add_kernel(float* __restrict__ x, const float* __restrict__ y, int64_t n) {
  pdl_wait();
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    x[i] += y[i];
}


}  // namespace

void launch_rope(const CudaBackend& b, float* q, float* k, int64_t rows, int64_t n_heads, int64_t n_kv_heads,
                 int64_t head_dim, int64_t pos0, const int* row_pos) {
  const int64_t total = rows * (n_heads + n_kv_heads) * (head_dim / 2);
  launch(rope_kernel, dim3(grid_for(total, 256, 8192)), dim3(256), 0, stream_of(b), q, k, rows,
         static_cast<int>(n_heads), static_cast<int>(n_kv_heads), static_cast<int>(head_dim), pos0, row_pos,
         b.rope_cos(), b.rope_sin());
  QF_CUDA_LAUNCH();
}

bool& pdl_enabled() {
  static bool on = false;
  return on;
}

}  // namespace cuda

// ---- device discovery ---------------------------------------------------------------------------

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

std::unique_ptr<Backend> make_cuda_backend(int device_index) { return std::make_unique<CudaBackend>(device_index); }

CudaBackend::CudaBackend(int device_index) : device_(device_index) {
  const int n = cuda_device_count();
  if (n == 0) fail("--device cuda: no CUDA device is available (no driver or no GPU)");
  if (device_index >= n) fail("--device cuda:", device_index, ": only ", n, " CUDA device(s) present");
  QF_CUDA(cudaSetDevice(device_));
  cudaDeviceProp prop{};
  QF_CUDA(cudaGetDeviceProperties(&prop, device_));
  sm_count_ = prop.multiProcessorCount;
  cc_major_ = prop.major;
  const char* no_pdl = std::getenv("QFORGE_NO_PDL");
  pdl_enabled() = prop.major >= 9 && !(no_pdl && no_pdl[0] == '1');
  name_ = str("cuda:", device_, " (", prop.name, ", ", prop.totalGlobalMem >> 20, " MiB)");
  cudaStream_t s;
  QF_CUDA(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  stream_ = s;
  cublasHandle_t h;
  QF_CUBLAS(cublasCreate(&h));
  QF_CUBLAS(cublasSetStream(h, s));
  cublas_ = h;
}

CudaBackend::~CudaBackend() {
  cudaSetDevice(device_);
  if (stream_) cudaStreamSynchronize(static_cast<cudaStream_t>(stream_));
  for (auto* p : scratch_) cudaFree(p);
  cudaFree(counters_);
  cudaFree(d_rope_cos_);
  cudaFree(d_rope_sin_);
  if (cublas_) cublasDestroy(static_cast<cublasHandle_t>(cublas_));
  if (stream_) cudaStreamDestroy(static_cast<cudaStream_t>(stream_));
}

std::string CudaBackend::name() const { return name_; }

size_t CudaBackend::free_memory() const {
  size_t f = 0, t = 0;
  QF_CUDA(cudaMemGetInfo(&f, &t));
  return f;
}
size_t CudaBackend::total_memory() const {
  size_t f = 0, t = 0;
  QF_CUDA(cudaMemGetInfo(&f, &t));
  return t;
}
size_t CudaBackend::used_memory() const {
  size_t f = 0, t = 0;
  QF_CUDA(cudaMemGetInfo(&f, &t));
  return t - f;
}

void CudaBackend::check_fits(size_t bytes, const std::string& what) const {
  const size_t avail = free_memory();
  // Keep a little headroom for cuBLAS workspaces and scratch.
  const size_t headroom = 64ull << 20;
  if (bytes + headroom > avail)
    fail(what, " needs ", (bytes + (1 << 20) - 1) >> 20, " MiB of GPU memory but only ", avail >> 20,
         " MiB is free on ", name_, " (", weight_bytes_ >> 20, " MiB of weights already loaded)");
}

DeviceBuffer CudaBackend::alloc(size_t count) {
  const size_t bytes = std::max<size_t>(count, 1) * sizeof(float);
  check_fits(bytes, str("a buffer of ", count, " floats"));
  float* p = nullptr;
  QF_CUDA(cudaMalloc(&p, bytes));
  return DeviceBuffer(this, p, count);
}

void CudaBackend::free_raw(float* p) {
  cudaFree(p);
  ++memory_epoch_;  // a captured graph may have used it
}

void CudaBackend::upload(float* dst, const float* src, size_t count) {
  auto s = stream_of(*this);
  QF_CUDA(cudaMemcpyAsync(dst, src, count * sizeof(float), cudaMemcpyHostToDevice, s));
  QF_CUDA(cudaStreamSynchronize(s));
}

void CudaBackend::download(float* dst, const float* src, size_t count) {
  QF_CHECK(!capturing_, "internal: download during CUDA graph capture");
  auto s = stream_of(*this);
  QF_CUDA(cudaMemcpyAsync(dst, src, count * sizeof(float), cudaMemcpyDeviceToHost, s));
  QF_CUDA(cudaStreamSynchronize(s));
}

void CudaBackend::synchronize() { QF_CUDA(cudaStreamSynchronize(stream_of(*this))); }

void* CudaBackend::scratch(size_t bytes, int slot) {
  if (bytes <= scratch_bytes_[slot]) return scratch_[slot];
  if (capturing_) fail("internal: CUDA scratch buffer ", slot, " must grow during graph capture");
  QF_CUDA(cudaStreamSynchronize(stream_of(*this)));
  cudaFree(scratch_[slot]);
  ++memory_epoch_;
  scratch_[slot] = nullptr;
  scratch_bytes_[slot] = 0;
  const size_t want = std::max<size_t>(bytes, 1 << 20);
  check_fits(want, "scratch memory");
  QF_CUDA(cudaMalloc(&scratch_[slot], want));
  scratch_bytes_[slot] = want;
  return scratch_[slot];
}

int* CudaBackend::zeroed_counters(size_t n) {
  if (n <= n_counters_) return counters_;
  if (capturing_) fail("internal: GEMV counters must grow during graph capture");
  QF_CUDA(cudaStreamSynchronize(stream_of(*this)));
  cudaFree(counters_);
  ++memory_epoch_;
  counters_ = nullptr;
  n_counters_ = 0;
  const size_t want = std::max<size_t>(n, 4096);
  QF_CUDA(cudaMalloc(&counters_, want * sizeof(int)));
  QF_CUDA(cudaMemset(counters_, 0, want * sizeof(int)));
  n_counters_ = want;
  return counters_;
}

// ---- weights ------------------------------------------------------------------------------------

std::unique_ptr<DeviceLinear> CudaBackend::make_linear(const LinearWeight& w) {
  if (w.format != LinearFormat::Dense) return make_quant_linear(*this, w, &quant_fallbacks_);
  const DType dt = w.weight.dtype;
  if (dt != DType::F32 && dt != DType::F16 && dt != DType::BF16)
    fail("linear layer '", w.name, "': unsupported dtype ", dtype_name(dt));
  QF_CHECK(w.weight.rank() == 2 && w.weight.dim(0) == w.out_features && w.weight.dim(1) == w.in_features,
           "linear layer '", w.name, "': weight shape ", w.weight.shape_str(), " does not match ",
           w.out_features, "x", w.in_features);
  auto l = std::make_unique<CudaLinear>();
  l->in_features = w.in_features;
  l->out_features = w.out_features;
  l->dtype = dt;
  l->bytes = w.weight.nbytes();
  check_fits(l->bytes, str("the model (layer '", w.name, "')"));
  QF_CUDA(cudaMalloc(&l->weight, l->bytes));
  QF_CUDA(cudaMemcpy(l->weight, w.weight.data, l->bytes, cudaMemcpyHostToDevice));
  if (w.bias) {
    std::vector<float> b = to_f32(*w.bias);
    QF_CUDA(cudaMalloc(&l->bias, b.size() * 4));
    QF_CUDA(cudaMemcpy(l->bias, b.data(), b.size() * 4, cudaMemcpyHostToDevice));
  }
  if (dt == DType::F32) saw_f32_weights_ = true;
  weight_bytes_ += l->bytes;
  return l;
}

std::unique_ptr<DeviceEmbedding> CudaBackend::make_embedding(const TensorView& table) {
  QF_CHECK(table.rank() == 2, "embedding table must be 2-D");
  const DType dt = table.dtype;
  if (dt != DType::F32 && dt != DType::F16 && dt != DType::BF16)
    fail("embedding table: unsupported dtype ", dtype_name(dt));
  auto e = std::make_unique<CudaEmbedding>();
  e->vocab = table.dim(0);
  e->dim = table.dim(1);
  e->dtype = dt;
  check_fits(table.nbytes(), "the embedding table");
  QF_CUDA(cudaMalloc(&e->table, table.nbytes()));
  QF_CUDA(cudaMemcpy(e->table, table.data, table.nbytes(), cudaMemcpyHostToDevice));
  weight_bytes_ += table.nbytes();
  return e;
}

void CudaBackend::set_rope_tables(const RopeTables& t) {
  synchronize();
  cudaFree(d_rope_cos_);
  cudaFree(d_rope_sin_);
  d_rope_cos_ = d_rope_sin_ = nullptr;
  const size_t n = t.cos.size();
  QF_CUDA(cudaMalloc(&d_rope_cos_, std::max<size_t>(n, 1) * 4));
  QF_CUDA(cudaMalloc(&d_rope_sin_, std::max<size_t>(n, 1) * 4));
  QF_CUDA(cudaMemcpy(d_rope_cos_, t.cos.data(), n * 4, cudaMemcpyHostToDevice));
  QF_CUDA(cudaMemcpy(d_rope_sin_, t.sin.data(), n * 4, cudaMemcpyHostToDevice));
  rope_max_pos_ = t.max_pos;
  rope_half_ = t.half_dim;
}

// ---- operations ---------------------------------------------------------------------------------

namespace {
void launch_embed(const CudaEmbedding& e, const int32_t* d_tokens, int64_t rows, float* out, cudaStream_t s) {
  dim3 grid(static_cast<unsigned>(std::min<int64_t>((e.dim + 255) / 256, 64)), static_cast<unsigned>(rows));
  switch (e.dtype) {
    case DType::F32: launch(embed_kernel<float>, grid, 256, 0, s, static_cast<const float*>(e.table), d_tokens, e.dim, e.vocab, out); break;
    case DType::F16: launch(embed_kernel<__half>, grid, 256, 0, s, static_cast<const __half*>(e.table), d_tokens, e.dim, e.vocab, out); break;
    default: launch(embed_kernel<__nv_bfloat16>, grid, 256, 0, s, static_cast<const __nv_bfloat16*>(e.table), d_tokens, e.dim, e.vocab, out); break;
  }
  QF_CUDA_LAUNCH();
}
}  // namespace

void CudaBackend::embed(const DeviceEmbedding& table, const int32_t* tokens, int64_t rows, float* out) {
  const auto& e = static_cast<const CudaEmbedding&>(table);
  auto s = stream_of(*this);
  for (int64_t t = 0; t < rows; ++t)
    if (tokens[t] < 0 || tokens[t] >= e.vocab) fail("token id ", tokens[t], " is outside the vocabulary (", e.vocab, ")");
  auto* buf = static_cast<int32_t*>(scratch(static_cast<size_t>(rows) * 4, 3));
  QF_CUDA(cudaMemcpyAsync(buf, tokens, static_cast<size_t>(rows) * 4, cudaMemcpyHostToDevice, s));
  launch_embed(e, buf, rows, out, s);
  QF_CUDA(cudaStreamSynchronize(s));  // `tokens` may be reused by the caller
}

void CudaBackend::embed_batch(const DeviceEmbedding& table, float* out) {
  QF_CHECK(batch_, "internal: embed_batch before prepare_batch");
  if (batch_->rows == 0) return;
  launch_embed(static_cast<const CudaEmbedding&>(table), batch_->tokens, batch_->rows, out, stream_of(*this));
}

void CudaBackend::rmsnorm(const float* x, const float* w, float* out, int64_t rows, int64_t dim, float eps) {
  if (rows <= 0) return;
  const int block = rows == 1 ? (dim >= 2048 ? 1024 : 256) : (dim >= 2048 ? 512 : (dim >= 512 ? 256 : 64));
  launch(rmsnorm_kernel, dim3(static_cast<unsigned>(rows)), dim3(block), 0, stream_of(*this), x, w, out, dim, eps);
  QF_CUDA_LAUNCH();
}

void CudaBackend::linear(const DeviceLinear& w, const float* x, float* y, int64_t rows) {
  if (rows <= 0) return;
  if (const auto* q = dynamic_cast<const CudaQuantLinear*>(&w)) {
    quant_linear_forward(*this, *q, x, y, rows);
    return;
  }
  linear_forward(*this, static_cast<const CudaLinear&>(w), x, y, rows);
}

bool CudaBackend::fused_linear(const FusedLinear& op) {
  if (op.rows == 1) return quant_gemv_fused(*this, op) || dense_gemv_fused(*this, op);
  if (op.rows < 1 || op.count < 1) return false;
  const bool pair = op.output == FusedLinear::Output::SwiGLU;
  float* up = pair ? static_cast<float*>(scratch(static_cast<size_t>(op.rows * op.w[0]->out_features) * 4, 8)) : nullptr;
  // A few rows of quantized layers: the small-batch GEMM with the norm and the residual folded in;
  // more rows (prompt chunks), or dense layers: cuBLAS, x converted once for all matrices.
  const bool done = (op.rows <= 64 && dynamic_cast<const CudaQuantLinear*>(op.w[0]) && quant_gemm_fused(*this, op, up)) ||
                    cublas_linear_fused(*this, op, up);
  if (done && pair) silu_mul(op.y[0], up, op.y[0], op.rows * op.w[0]->out_features);
  return done;
}

void CudaBackend::rope(float* q, float* k, int64_t rows, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim,
                       int64_t pos0) {
  if (rows <= 0) return;
  const int64_t half = head_dim / 2;
  QF_CHECK(half == rope_half_, "RoPE tables were built for head_dim ", 2 * rope_half_);
  QF_CHECK(pos0 + rows <= rope_max_pos_, "position ", pos0 + rows, " is beyond the RoPE tables (", rope_max_pos_, ")");
  launch_rope(*this, q, k, rows, n_heads, n_kv_heads, head_dim, pos0, nullptr);
}

void CudaBackend::silu_mul(const float* gate, const float* up, float* out, int64_t n) {
  if (n <= 0) return;
  launch(silu_mul_kernel, dim3(grid_for(n, 256, 8192)), dim3(256), 0, stream_of(*this), gate, up, out, n);
  QF_CUDA_LAUNCH();
}

void CudaBackend::add(float* x, const float* y, int64_t n) {
  if (n <= 0) return;
  launch(add_kernel, dim3(grid_for(n, 256, 8192)), dim3(256), 0, stream_of(*this), x, y, n);
  QF_CUDA_LAUNCH();
}

void CudaBackend::copy_rows(const float* src, int64_t first, int64_t rows, int64_t cols, float* dst) {
  if (rows <= 0) return;
  QF_CUDA(cudaMemcpyAsync(dst, src + first * cols, static_cast<size_t>(rows * cols) * 4, cudaMemcpyDeviceToDevice,
                          stream_of(*this)));
}

// ---- many sequences over a paged cache -----------------------------------------------------------

std::unique_ptr<PagedKVCache> CudaBackend::make_paged_kv_cache(int64_t n_layers, int64_t n_kv_heads, int64_t head_dim,
                                                               int64_t num_blocks, int64_t block_size, KVFormat format) {
  QF_CHECK(num_blocks > 0 && block_size > 0, "a paged KV cache needs blocks");
  auto c = std::make_unique<CudaPagedKVCache>();
  c->n_layers = n_layers;
  c->n_kv_heads = n_kv_heads;
  c->head_dim = head_dim;
  c->num_blocks = num_blocks;
  c->block_size = block_size;
  c->f32 = saw_f32_weights_;
  c->format = format;
  const int64_t positions = checked_mul(num_blocks, block_size, "KV cache positions");
  const auto bytes = static_cast<size_t>(kv_cache_bytes(n_layers, n_kv_heads, head_dim, positions, format));
  check_fits(bytes, str("the ", kv_format_name(format), " KV cache of ", num_blocks, " blocks of ", block_size,
                        " positions"));
  const size_t codes = c->block_code_bytes() * static_cast<size_t>(num_blocks * n_layers);
  const size_t scales = c->block_scale_bytes() * static_cast<size_t>(num_blocks * n_layers);
  for (void** p : {&c->k, &c->v}) {
    QF_CUDA(cudaMalloc(p, codes));
    QF_CUDA(cudaMemsetAsync(*p, 0, codes, stream_of(*this)));
  }
  if (scales > 0)
    for (float** p : {&c->sk, &c->sv}) {
      QF_CUDA(cudaMalloc(p, scales));
      QF_CUDA(cudaMemsetAsync(*p, 0, scales, stream_of(*this)));
    }
  return c;
}

void CudaBackend::prepare_batch(const Batch& batch, const PagedKVCache& cache, int64_t vocab, int64_t min_len) {
  check_batch_tables(batch, cache);
  const std::vector<BatchSeq>& seqs = batch.seqs;
  const auto rows = static_cast<int64_t>(batch.tokens.size());
  for (int32_t t : batch.tokens)
    if (t < 0 || t >= vocab) fail("token id ", t, " is outside the vocabulary (", vocab, ")");
  if (!batch_) batch_ = std::make_shared<cuda::DeviceBatch>();
  cuda::DeviceBatch& d = *batch_;
  QF_CHECK(rows < (int64_t{1} << 30), "a batch of ", rows, " rows");
  d.seqs = seqs;
  d.rows = static_cast<int>(rows);
  // Host staging: tokens, row positions, row table offsets, short rows, then the block tables.
  std::vector<int32_t> pos(static_cast<size_t>(rows), 0), tab(static_cast<size_t>(rows), 0), shorts, tables;
  d.seq_table.clear();
  d.short_len = 0;
  for (const BatchSeq& s : seqs) {
    // Positions travel as int.
    QF_CHECK(s.pos0 + s.rows <= INT32_MAX, "batch: position ", s.pos0 + s.rows, " out of range");
    const int off = static_cast<int>(tables.size());
    d.seq_table.push_back(off);
    tables.insert(tables.end(), s.block_table, s.block_table + s.n_blocks);
    for (int64_t t = 0; t < s.rows; ++t) {
      pos[static_cast<size_t>(s.first_row + t)] = static_cast<int32_t>(s.pos0 + t);
      tab[static_cast<size_t>(s.first_row + t)] = off;
      if (s.rows < cuda::kFlashMinRows) shorts.push_back(static_cast<int32_t>(s.first_row + t));
    }
    if (s.rows < cuda::kFlashMinRows) d.short_len = std::max(d.short_len, s.pos0 + s.rows);
  }
  d.n_short = static_cast<int>(shorts.size());
  if (d.n_short > 0) d.short_len = std::max(d.short_len, min_len);
  d.host.clear();
  d.host.insert(d.host.end(), batch.tokens.begin(), batch.tokens.end());
  d.host.insert(d.host.end(), pos.begin(), pos.end());
  d.host.insert(d.host.end(), tab.begin(), tab.end());
  d.host.insert(d.host.end(), shorts.begin(), shorts.end());
  d.host.insert(d.host.end(), tables.begin(), tables.end());
  if (d.host.size() > d.capacity) {
    QF_CHECK(!capturing_, "internal: prepare_batch during CUDA graph capture");
    synchronize();
    cudaFree(d.storage);
    ++memory_epoch_;
    d.storage = nullptr;
    d.capacity = std::max<size_t>(d.host.size(), 2 * d.capacity);
    QF_CUDA(cudaMalloc(&d.storage, d.capacity * 4));
  }
  int32_t* base = static_cast<int32_t*>(d.storage);
  d.tokens = base;
  d.row_pos = base + rows;
  d.row_table = base + 2 * rows;
  d.short_rows = base + 3 * rows;
  d.tables = base + 3 * rows + d.n_short;
  // Pageable memory: the copy is staged before the call returns, so the vector may change after.
  QF_CUDA(cudaMemcpyAsync(d.storage, d.host.data(), d.host.size() * 4, cudaMemcpyHostToDevice, stream_of(*this)));
}

namespace {
const cuda::DeviceBatch& prepared(const std::shared_ptr<cuda::DeviceBatch>& b, const std::vector<BatchSeq>& seqs) {
  QF_CHECK(b && b->seqs.size() == seqs.size(), "internal: paged attention without prepare_batch for its sequences");
  return *b;
}
}  // namespace

void CudaBackend::check_rope(const std::vector<BatchSeq>& seqs, int64_t head_dim) const {
  QF_CHECK(head_dim / 2 == rope_half_, "RoPE tables were built for head_dim ", 2 * rope_half_);
  for (const BatchSeq& s : seqs)
    QF_CHECK(s.pos0 + s.rows <= rope_max_pos_, "position ", s.pos0 + s.rows, " is beyond the RoPE tables (", rope_max_pos_,
             ")");
}

void CudaBackend::rope_seqs(float* q, float* k, const std::vector<BatchSeq>& seqs, int64_t n_heads, int64_t n_kv_heads,
                            int64_t head_dim) {
  const cuda::DeviceBatch& d = prepared(batch_, seqs);
  check_rope(seqs, head_dim);
  if (d.rows == 0) return;
  launch_rope(*this, q, k, d.rows, n_heads, n_kv_heads, head_dim, 0, d.row_pos);
}

void CudaBackend::paged_attention(const float* q, const float* k, const float* v, PagedKVCache& cache, int64_t layer,
                                  const std::vector<BatchSeq>& seqs, const AttentionParams& p, float* out) {
  const cuda::DeviceBatch& d = prepared(batch_, seqs);  // checked against the cache there
  if (d.rows == 0) return;
  // Without RoPE nothing writes q or k.
  cuda::paged_attention_forward(*this, const_cast<float*>(q), const_cast<float*>(k), v,
                                static_cast<cuda::CudaPagedKVCache&>(cache), layer, d, p, out, /*rope=*/false);
}

void CudaBackend::rope_paged_attention(float* q, float* k, const float* v, PagedKVCache& cache, int64_t layer,
                                       const std::vector<BatchSeq>& seqs, const AttentionParams& p, float* out) {
  const cuda::DeviceBatch& d = prepared(batch_, seqs);
  check_rope(seqs, p.head_dim);
  if (d.rows == 0) return;
  cuda::paged_attention_forward(*this, q, k, v, static_cast<cuda::CudaPagedKVCache&>(cache), layer, d, p, out,
                                /*rope=*/true);
}

void CudaBackend::copy_kv_blocks(PagedKVCache& cache, const std::vector<std::pair<int32_t, int32_t>>& from_to) {
  auto& c = static_cast<cuda::CudaPagedKVCache&>(cache);
  // Blocks of a layer are consecutive in each array: codes (or values) and scales alike.
  const std::pair<void*, size_t> arrays[4] = {{c.k, c.block_code_bytes()}, {c.v, c.block_code_bytes()},
                                              {c.sk, c.block_scale_bytes()}, {c.sv, c.block_scale_bytes()}};
  for (const auto& [from, to] : from_to) {
    QF_CHECK(from >= 0 && from < c.num_blocks && to >= 0 && to < c.num_blocks, "KV block copy outside the cache");
    for (int64_t l = 0; l < c.n_layers; ++l)
      for (const auto& [base, block] : arrays) {
        if (block == 0) continue;
        char* p = static_cast<char*>(base) + static_cast<size_t>(l) * block * static_cast<size_t>(c.num_blocks);
        QF_CUDA(cudaMemcpyAsync(p + static_cast<size_t>(to) * block, p + static_cast<size_t>(from) * block, block,
                                cudaMemcpyDeviceToDevice, stream_of(*this)));
      }
  }
}

namespace cuda {
void launch_argmax_rows(CudaBackend& b, const float* logits, int64_t rows, int64_t vocab, int32_t* ids) {
  launch(argmax_rows_kernel, dim3(static_cast<unsigned>(rows)), dim3(256), 0, stream_of(b), logits, vocab, ids);
  QF_CUDA_LAUNCH();
}
}  // namespace cuda

void CudaBackend::argmax_rows(const float* logits, int64_t rows, int64_t vocab, int32_t* ids_host) {
  if (rows <= 0) return;
  auto* ids = static_cast<int32_t*>(scratch(static_cast<size_t>(rows) * 4, 3));
  cuda::launch_argmax_rows(*this, logits, rows, vocab, ids);
  QF_CUDA(cudaMemcpyAsync(ids_host, ids, static_cast<size_t>(rows) * 4, cudaMemcpyDeviceToHost, stream_of(*this)));
  synchronize();
}

// ---- graphs -------------------------------------------------------------------------------------

namespace {
// A recorded step, valid while the backend has freed or moved no memory since the capture.
class CudaStepGraph final : public StepGraph {
 public:
  CudaStepGraph(const CudaBackend& b, cudaGraphExec_t exec, uint64_t epoch) : b_(b), exec_(exec), epoch_(epoch) {}
  ~CudaStepGraph() override { cudaGraphExecDestroy(exec_); }
  bool valid() const override { return b_.memory_epoch() == epoch_; }
  void replay() override {
    QF_CHECK(valid(), "internal: replaying a CUDA graph whose buffers have moved");
    QF_CUDA(cudaGraphLaunch(exec_, stream_of(b_)));
  }

 private:
  const CudaBackend& b_;
  cudaGraphExec_t exec_;
  uint64_t epoch_;
};
}  // namespace

std::unique_ptr<StepGraph> CudaBackend::capture(const std::function<void()>& work) {
  QF_CHECK(!capturing_, "already capturing");
  synchronize();
  const uint64_t epoch = memory_epoch_;
  cudaStream_t s = stream_of(*this);
  QF_CUDA(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  capturing_ = true;
  try {
    work();
  } catch (...) {
    capturing_ = false;
    cudaGraph_t broken = nullptr;
    cudaStreamEndCapture(s, &broken);
    if (broken) cudaGraphDestroy(broken);
    throw;
  }
  capturing_ = false;
  cudaGraph_t g = nullptr;
  QF_CUDA(cudaStreamEndCapture(s, &g));
  cudaGraphExec_t e = nullptr;
  const cudaError_t err = cudaGraphInstantiate(&e, g, 0);
  cudaGraphDestroy(g);
  QF_CUDA(err);
  QF_CHECK(memory_epoch_ == epoch, "internal: device memory moved while capturing");
  return std::make_unique<CudaStepGraph>(*this, e, epoch);
}


}  // namespace qf
