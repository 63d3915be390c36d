// Random weights generated in device memory (backends/random_weights.h) for `qforge bench
// --random`, bench/ and tests: uniform values from a counter-based hash (one kernel per tensor, no
// host copy), EXL2 and GPTQ layers with random codes in the layouts the kernels read
// (cuda_quant.cuh).
#include "backends/cuda/cuda_random_weights.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>
#include <vector>

#include "backends/cuda/cuda_quant.cuh"

namespace qf {
namespace cuda {
namespace {

template <typename T>
__global__ void fill_random_kernel(T* dst, size_t n, float center, float spread, uint64_t seed) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const uint64_t r = mix64(seed * 0x9e3779b97f4a7c15ULL + i);
    const float u = static_cast<float>(r >> 40) * (2.0f / 16777216.0f) - 1.0f;  // [-1, 1)
    dst[i] = from_float<T>(center + spread * u);
  }
}

__global__ void fill_u32_kernel(uint32_t* dst, size_t n, uint64_t seed, uint32_t mask, uint32_t add) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    const uint64_t z = mix64(seed * 0x9e3779b97f4a7c15ULL + i);
    dst[i] = (static_cast<uint32_t>(z) & mask) + add;
  }
}

// dst[i] = center + spread * u(seed, i), u uniform in [-1, 1).
void fill_random(void* dst, DType dtype, size_t n, float center, float spread, uint64_t seed, cudaStream_t s) {
  const int grid = grid_for(static_cast<int64_t>(n), 256, 132 * 32);
  switch (dtype) {
    case DType::F32: fill_random_kernel<<<grid, 256, 0, s>>>(static_cast<float*>(dst), n, center, spread, seed); break;
    case DType::F16: fill_random_kernel<<<grid, 256, 0, s>>>(static_cast<__half*>(dst), n, center, spread, seed); break;
    case DType::BF16: fill_random_kernel<<<grid, 256, 0, s>>>(static_cast<__nv_bfloat16*>(dst), n, center, spread, seed); break;
    default: fail("fill_random: unsupported dtype ", dtype_name(dtype));
  }
  QF_CUDA_LAUNCH();
}

void fill_u32(uint32_t* dst, size_t n, uint64_t seed, uint32_t mask, uint32_t add, cudaStream_t s) {
  if (n == 0) return;
  const int grid = grid_for(static_cast<int64_t>(n), 256, 132 * 32);
  fill_u32_kernel<<<grid, 256, 0, s>>>(dst, n, seed, mask, add);
  QF_CUDA_LAUNCH();
}

std::vector<int32_t> random_perm(int64_t K, uint64_t seed) {
  std::vector<int32_t> p(static_cast<size_t>(K));
  std::iota(p.begin(), p.end(), 0);
  std::mt19937_64 rng(seed);
  std::shuffle(p.begin(), p.end(), rng);
  return p;
}

}  // namespace
}  // namespace cuda

using namespace qf::cuda;

namespace {

class CudaRandomWeights final : public RandomWeights {
 public:
  explicit CudaRandomWeights(CudaBackend& b) : b_(b) {}
  bool on_device() const override { return true; }

  std::unique_ptr<DeviceLinear> dense(int64_t in, int64_t out, DType dtype, float scale, uint64_t seed) override {
    auto l = std::make_unique<CudaLinear>();
    l->in_features = in;
    l->out_features = out;
    l->dtype = dtype;
    l->bytes = static_cast<size_t>(in * out) * dtype_size(dtype);
    b_.check_fits(l->bytes, str("a random ", out, "x", in, " ", dtype_name(dtype), " layer"));
    QF_CUDA(cudaMalloc(&l->weight, l->bytes));
    fill_random(l->weight, dtype, static_cast<size_t>(in * out), 0.f, scale, seed, stream_of(b_));
    b_.note_weight_bytes(l->bytes);
    return l;
  }

  std::unique_ptr<DeviceEmbedding> embedding(int64_t vocab, int64_t dim, DType dtype, float scale,
                                             uint64_t seed) override {
    auto e = std::make_unique<CudaEmbedding>();
    e->vocab = vocab;
    e->dim = dim;
    e->dtype = dtype;
    const size_t bytes = static_cast<size_t>(vocab * dim) * dtype_size(dtype);
    b_.check_fits(bytes, "the embedding table");
    QF_CUDA(cudaMalloc(&e->table, bytes));
    fill_random(e->table, dtype, static_cast<size_t>(vocab * dim), 0.f, scale, seed, stream_of(b_));
    b_.note_weight_bytes(bytes);
    return e;
  }

  DeviceBuffer vector(int64_t n, float center, float spread, uint64_t seed) override {
    DeviceBuffer d = b_.alloc(static_cast<size_t>(n));
    fill_random(d.data(), DType::F32, static_cast<size_t>(n), center, spread, seed, stream_of(b_));
    return d;
  }

  std::unique_ptr<DeviceLinear> exl2(int64_t in, int64_t out, const std::vector<QuantMixPart>& mix, uint64_t seed,
                                     size_t* bytes_read) override {
    QF_CHECK(in % 32 == 0, "random EXL2 layers need in_features % 32 == 0");
    auto l = std::make_unique<CudaQuantLinear>();
    l->format = LinearFormat::EXL2;
    l->in_features = in;
    l->out_features = out;
    l->stride = padded_stride(out);
    // Parts in descending bit width; rows of each part rounded to 32, the last takes the rest.
    std::vector<QuantMixPart> parts = mix;
    std::stable_sort(parts.begin(), parts.end(), [](const QuantMixPart& a, const QuantMixPart& c) { return a.bits > c.bits; });
    std::vector<int2> tab;
    std::vector<float> smax;
    int64_t row = 0, word = 0, g = 0;
    for (size_t p = 0; p < parts.size(); ++p) {
      int64_t rows = p + 1 == parts.size() ? in - row
                                           : std::min<int64_t>(in - row, std::llround(parts[p].frac * static_cast<double>(in) / 32.0) * 32);
      const int bits = parts[p].bits;
      const int64_t gs = std::max<int64_t>(32, parts[p].group / 32 * 32);
      for (int64_t r = 0; r < rows; r += gs, ++g) {
        const int64_t gr = std::min(gs, rows - r);
        for (int64_t u = 0; u < gr; u += 32) {
          tab.push_back(make_int2(static_cast<int>(word), static_cast<int>(g << 8) | bits));
          word += bits;
        }
        smax.push_back(1.0f / (std::sqrt(static_cast<float>(in)) * static_cast<float>(1 << (bits - 1))) / 256.0f);
      }
      row += rows;
    }
    l->packed_rows = word;
    l->groups = g;
    l->max_bits = max_bits_of(tab);
    cudaStream_t s = stream_of(b_);
    const size_t qw_words = static_cast<size_t>(word * l->stride);
    b_.check_fits(qw_words * 4 + static_cast<size_t>(8 * l->stride) * 4, "a random EXL2 layer");
    QF_CUDA(cudaMalloc(&l->qweight, qw_words * 4 + static_cast<size_t>(8 * l->stride) * 4));
    QF_CUDA(cudaMemsetAsync(l->qweight, 0, qw_words * 4 + static_cast<size_t>(8 * l->stride) * 4, s));
    fill_u32(l->qweight, qw_words, seed, 0xffffffffu, 0, s);
    l->qscale_stride = l->stride / 8;
    const size_t qs_words = static_cast<size_t>(g * l->qscale_stride);
    QF_CUDA(cudaMalloc(&l->qscale, qs_words * 4));
    fill_u32(l->qscale, qs_words, seed + 1, 0xffffffffu, 0, s);
    l->scale_max = upload_vec(smax, &l->allocated);
    l->bytes = qw_words * 4 + qs_words * 4 + smax.size() * 4;
    l->allocated += qw_words * 4 + qs_words * 4;
    LinearWeight dummy;
    finish_common(*l, dummy, tab, random_perm(in, seed + 2));
    b_.note_weight_bytes(l->allocated);
    if (bytes_read) *bytes_read = l->bytes;
    return l;
  }

  std::unique_ptr<DeviceLinear> gptq(int64_t in, int64_t out, int bits, int64_t group, bool act_order, uint64_t seed,
                                     size_t* bytes_read) override {
    QF_CHECK(in % 32 == 0 && (group < 0 || group % 32 == 0), "random GPTQ layers need in_features and group % 32 == 0");
    auto l = std::make_unique<CudaQuantLinear>();
    l->format = LinearFormat::GPTQ;
    l->in_features = in;
    l->out_features = out;
    l->stride = padded_stride(out);
    l->max_bits = bits;
    const int64_t gs = group < 0 ? in : group;
    l->groups = (in + gs - 1) / gs;
    l->packed_rows = in * bits / 32;
    std::vector<int2> tab;
    for (int64_t j = 0; j < in; j += 32)
      tab.push_back(make_int2(static_cast<int>(j / 32 * bits), static_cast<int>((j / gs) << 8) | bits));
    cudaStream_t s = stream_of(b_);
    const size_t qw_words = static_cast<size_t>(l->packed_rows * l->stride);
    const size_t slack = static_cast<size_t>(8 * l->stride) * 4;
    b_.check_fits(qw_words * 4 + slack, "a random GPTQ layer");
    QF_CUDA(cudaMalloc(&l->qweight, qw_words * 4 + slack));
    QF_CUDA(cudaMemsetAsync(l->qweight, 0, qw_words * 4 + slack, s));
    fill_u32(l->qweight, qw_words, seed, 0xffffffffu, 0, s);
    const size_t gn = static_cast<size_t>(l->groups * l->stride);
    QF_CUDA(cudaMalloc(&l->scales, gn * 2));
    fill_random(l->scales, DType::F16, gn, 1.0f / (8.0f * std::sqrt(static_cast<float>(in))), 0.2f / (8.0f * std::sqrt(static_cast<float>(in))), seed + 1, s);
    QF_CUDA(cudaMalloc(&l->zeros, gn));
    // Zeros 7..8 (random bytes masked), written as 32-bit words over the byte array.
    std::vector<uint8_t> z(gn);
    std::mt19937 rng(static_cast<uint32_t>(seed));
    const int mid = 1 << (bits - 1);
    for (auto& v : z) v = static_cast<uint8_t>(mid - static_cast<int>(rng() & 1u));
    QF_CUDA(cudaMemcpy(l->zeros, z.data(), gn, cudaMemcpyHostToDevice));
    l->bytes = qw_words * 4 + gn * 3;
    l->allocated += qw_words * 4 + slack + gn * 3;
    LinearWeight dummy;
    finish_common(*l, dummy, tab, act_order ? random_perm(in, seed + 2) : std::vector<int32_t>{});
    b_.note_weight_bytes(l->allocated);
    if (bytes_read) *bytes_read = l->bytes;
    return l;
  }

 private:
  CudaBackend& b_;
};

}  // namespace

std::unique_ptr<RandomWeights> make_cuda_random_weights(CudaBackend& b) { return std::make_unique<CudaRandomWeights>(b); }

}  // namespace qf
