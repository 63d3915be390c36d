// backends/random_weights on the CPU: the host maker's values are deterministic per seed and in
// range, its layers compute with them, quantized layers are refused clearly (they need the GPU). The CUDA maker runs in test_gpu_quant / test_gpu_kernels.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "backends/cpu/cpu_backend.h"
#include "backends/random_weights.h"
#include "core/error.h"

namespace qf {
namespace {

std::vector<float> host_of(Backend& b, const DeviceBuffer& d) {
  std::vector<float> v(d.size());
  b.download(v.data(), d.data(), v.size());
  return v;
}

TEST(RandomWeights, HostValuesAreSeededAndInRange) {
  const auto a = host_random(1000, 1.0f, 0.1f, 7), b = host_random(1000, 1.0f, 0.1f, 7), c = host_random(1000, 1.0f, 0.1f, 8);
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  double mean = 0;
  for (float x : a) {
    EXPECT_GE(x, 0.9f);
    EXPECT_LT(x, 1.1f);
    mean += x;
  }
  EXPECT_NEAR(mean / 1000.0, 1.0, 0.01);
}

TEST(RandomWeights, CpuMakerBuildsLayersThatCompute) {
  CpuBackend cpu(1);
  auto rw = make_random_weights(cpu);
  EXPECT_FALSE(rw->on_device());
  // A dense layer: y = W x with W uniform in [-s, s]; the same seed gives the same layer.
  const int64_t in = 64, out = 32;
  for (DType dt : {DType::F32, DType::F16, DType::BF16}) {
    SCOPED_TRACE(dtype_name(dt));
    auto l1 = rw->dense(in, out, dt, 0.125f, 3), l2 = rw->dense(in, out, dt, 0.125f, 3);
    EXPECT_EQ(l1->in_features, in);
    EXPECT_EQ(l1->out_features, out);
    DeviceBuffer x = rw->vector(in, 1.0f, 0.0f, 1), y1 = cpu.alloc(out), y2 = cpu.alloc(out);
    cpu.linear(*l1, x.data(), y1.data(), 1);
    cpu.linear(*l2, x.data(), y2.data(), 1);
    const auto h1 = host_of(cpu, y1), h2 = host_of(cpu, y2);
    EXPECT_EQ(h1, h2);
    for (float v : h1) EXPECT_LE(std::fabs(v), 0.125f * in + 1e-3f);  // x is all ones
  }
  auto e = rw->embedding(100, 16, DType::F16, 1.0f, 5);
  EXPECT_EQ(e->vocab, 100);
  EXPECT_EQ(e->dim, 16);
  const auto v = host_of(cpu, rw->vector(10, 2.0f, 0.5f, 9));
  EXPECT_EQ(v, host_random(10, 2.0f, 0.5f, 9));
}

TEST(RandomWeights, QuantizedLayersNeedTheGpu) {
  CpuBackend cpu(1);
  auto rw = make_random_weights(cpu);
  size_t bytes = 0;
  try {
    rw->exl2(64, 32, {{4, 1.0, 32}}, 1, &bytes);
    FAIL() << "expected an error";
  } catch (const Error& err) {
    EXPECT_NE(std::string(err.what()).find("--device cuda"), std::string::npos) << err.what();
  }
  EXPECT_THROW(rw->gptq(64, 32, 4, 32, false, 1, &bytes), Error);
}

}  // namespace
}  // namespace qf
