#include "backends/random_weights.h"

#include "core/error.h"
#include "core/dtype.h"
#include "formats/linear_weight.h"

#ifdef QFORGE_HAVE_CUDA
#include "backends/cuda/cuda_random_weights.h"
#endif

namespace qf {

std::vector<float> host_random(size_t n, float center, float spread, uint64_t seed) {
  std::vector<float> v(n);
  uint64_t s = seed * 0x9e3779b97f4a7c15ULL + 1;
  for (auto& x : v) {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    x = center + spread * (static_cast<float>(s >> 40) * (2.0f / 16777216.0f) - 1.0f);
  }
  return v;
}

std::unique_ptr<DeviceLinear> RandomWeights::exl2(int64_t, int64_t, const std::vector<QuantMixPart>&, uint64_t,
                                                  size_t*) {
  fail("random EXL2 layers need a GPU (--device cuda)");
}

std::unique_ptr<DeviceLinear> RandomWeights::gptq(int64_t, int64_t, int, int64_t, bool, uint64_t, size_t*) {
  fail("random GPTQ layers need a GPU (--device cuda)");
}

namespace {

// Host values handed to the backend's make_* (which may refer to them rather than copy: they are
// kept here).
class HostRandomWeights final : public RandomWeights {
 public:
  explicit HostRandomWeights(Backend& b) : b_(b) {}
  bool on_device() const override { return false; }

  std::unique_ptr<DeviceLinear> dense(int64_t in, int64_t out, DType dtype, float scale, uint64_t seed) override {
    const auto host = host_random(static_cast<size_t>(in * out), 0.f, scale, seed);
    LinearWeight w;
    w.name = "random";
    w.in_features = in;
    w.out_features = out;
    w.weight = keep(host, dtype, {out, in});
    return b_.make_linear(w);
  }

  std::unique_ptr<DeviceEmbedding> embedding(int64_t vocab, int64_t dim, DType dtype, float scale,
                                             uint64_t seed) override {
    return b_.make_embedding(keep(host_random(static_cast<size_t>(vocab * dim), 0.f, scale, seed), dtype, {vocab, dim}));
  }

  DeviceBuffer vector(int64_t n, float center, float spread, uint64_t seed) override {
    const auto h = host_random(static_cast<size_t>(n), center, spread, seed);
    DeviceBuffer d = b_.alloc(static_cast<size_t>(n));
    b_.upload(d.data(), h.data(), h.size());
    return d;
  }

 private:
  TensorView keep(const std::vector<float>& v, DType dtype, std::vector<int64_t> shape) {
    if (dtype == DType::F32) {
      auto p = std::make_shared<std::vector<float>>(v);
      kept_.push_back(p);
      return TensorView{DType::F32, std::move(shape), p->data(), nullptr};
    }
    QF_CHECK(dtype == DType::F16 || dtype == DType::BF16, "random weights: unsupported dtype ", dtype_name(dtype));
    auto p = std::make_shared<std::vector<uint16_t>>(v.size());
    for (size_t i = 0; i < v.size(); ++i) (*p)[i] = dtype == DType::F16 ? f32_to_fp16(v[i]) : f32_to_bf16(v[i]);
    kept_.push_back(p);
    return TensorView{dtype, std::move(shape), p->data(), nullptr};
  }

  Backend& b_;
  std::vector<std::shared_ptr<void>> kept_;
};

}  // namespace

std::unique_ptr<RandomWeights> make_random_weights(Backend& b) {
#ifdef QFORGE_HAVE_CUDA
  if (auto* gpu = dynamic_cast<CudaBackend*>(&b)) return make_cuda_random_weights(*gpu);
#endif
  return std::make_unique<HostRandomWeights>(b);
}

}  // namespace qf
