// Times the converter's GPU primitives at Llama-2-7B sizes (not a test: prints milliseconds).
//   build/bench/gptq_bench            Hessian (2048 rows), inverse factor, GPTQ 4-bit g128
// Each figure is the median of a few calls after one warm-up, host wall time around the call
// (which returns synchronised: codes on the host, or the stream drained for the Hessian).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <functional>
#include <numeric>
#include <vector>

#include "backends/cuda/cuda_backend.h"
#include "core/error.h"

namespace {

using Clock = std::chrono::steady_clock;

// Median milliseconds of `reps` calls of fn() after one warm-up; prep() runs untimed before each.
double time_ms(int reps, const std::function<void()>& fn, const std::function<void()>& prep = [] {}) {
  std::vector<double> t;
  for (int i = 0; i <= reps; ++i) {
    prep();
    const auto t0 = Clock::now();
    fn();
    const double ms = std::chrono::duration<double, std::milli>(Clock::now() - t0).count();
    if (i > 0) t.push_back(ms);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// Cheap normal-ish random numbers (sum of four uniforms), reproducible.
std::vector<float> noise(size_t n, uint64_t seed, float scale) {
  std::vector<float> v(n);
  uint64_t s = seed * 0x9e3779b97f4a7c15ULL + 1;
  auto u = [&] {
    s ^= s << 13, s ^= s >> 7, s ^= s << 17;
    return static_cast<float>(s >> 40) * (1.f / 16777216.f);
  };
  for (auto& x : v) x = (u() + u() + u() + u() - 2.f) * 1.7320508f * scale;
  return v;
}

struct Layer {
  int64_t K;
  qf::DeviceBuffer H, U;
};

}  // namespace

int main() {
  try {
    qf::CudaBackend gpu(0);
    std::printf("device: %s\n", gpu.name().c_str());
    const int64_t rows = 2048;
    std::vector<Layer> layers;
    for (int64_t K : {4096, 11008}) {
      Layer L{K, gpu.alloc(static_cast<size_t>(K * K)), gpu.alloc(static_cast<size_t>(K * K))};
      // Inputs with a few strong directions (a shared component every 64 columns) plus noise.
      std::vector<float> x = noise(static_cast<size_t>(rows * K), 1 + static_cast<uint64_t>(K), 1.f);
      const std::vector<float> common = noise(static_cast<size_t>(rows * 64), 7, 2.f);
      for (int64_t r = 0; r < rows; ++r)
        for (int64_t k = 0; k < K; ++k) x[static_cast<size_t>(r * K + k)] += common[static_cast<size_t>(r * 64 + k % 64)];
      qf::DeviceBuffer X = gpu.alloc(x.size());
      gpu.upload(X.data(), x.data(), x.size());
      std::vector<float> zero(static_cast<size_t>(K * K), 0.f);
      gpu.upload(L.H.data(), zero.data(), zero.size());
      const double ms = time_ms(5, [&] {
        gpu.hessian_accumulate(L.H.data(), X.data(), rows, K);
        gpu.synchronize();
      });
      std::printf("hessian_accumulate rows=%lld K=%lld: %.3f ms (%.0f TFLOP/s fp32-equivalent)\n",
                  static_cast<long long>(rows), static_cast<long long>(K), ms, 2.0 * rows * K * K / ms / 1e9);
      const std::vector<float> diag = gpu.matrix_diagonal(L.H.data(), K);
      std::vector<int32_t> perm(static_cast<size_t>(K));
      std::iota(perm.begin(), perm.end(), 0);
      std::stable_sort(perm.begin(), perm.end(), [&](int32_t a, int32_t b) { return diag[static_cast<size_t>(a)] > diag[static_cast<size_t>(b)]; });
      double mean = 0;
      for (float d : diag) mean += d == 0.f ? 1.0 : d;
      mean /= static_cast<double>(K);
      bool ok = true;
      const double inv = time_ms(3, [&] { ok = gpu.gptq_inverse_factor(L.H.data(), perm, K, 0.01 * mean, L.U.data()); });
      std::printf("gptq_inverse_factor K=%lld: %.3f ms%s\n", static_cast<long long>(K), inv, ok ? "" : " (NOT positive definite)");
      layers.push_back(std::move(L));
    }

    struct Shape {
      int64_t K, N;
      const char* what;
    };
    const Shape shapes[] = {{4096, 4096, "q/k/v/o"}, {4096, 11008, "gate/up"}, {11008, 4096, "down"}};
    double per_layer[2] = {0, 0};
    for (const Shape& sh : shapes) {
      const Layer& L = sh.K == 4096 ? layers[0] : layers[1];
      const std::vector<float> w = noise(static_cast<size_t>(sh.K * sh.N), 99, 0.02f);
      qf::DeviceBuffer W = gpu.alloc(w.size());
      std::vector<qf::GptqGroup> groups;
      for (int64_t a = 0; a < sh.K; a += 128) groups.push_back({4, std::min<int64_t>(128, sh.K - a)});
      for (int mode = 0; mode < 2; ++mode) {
        gpu.set_gptq_tf32(mode == 1);
        const double ms = time_ms(
            3, [&] { gpu.gptq_quantize(W.data(), L.U.data(), sh.K, sh.N, groups, qf::ScaleSearch{}); },
            [&] { gpu.upload(W.data(), w.data(), w.size()); });
        std::printf("gptq_quantize K=%lld N=%lld (%s) 4-bit g128, %s update: %.3f ms\n", static_cast<long long>(sh.K),
                    static_cast<long long>(sh.N), sh.what, mode ? "TF32" : "fp32", ms);
        per_layer[mode] += ms * (sh.N == 11008 ? 2 : sh.K == 11008 ? 1 : 4);
      }
      // Without the scale search (two grid points): what the rest of the algorithm costs.
      gpu.set_gptq_tf32(false);
      qf::ScaleSearch two;
      two.p_grid = 1;
      const double rest = time_ms(
          3, [&] { gpu.gptq_quantize(W.data(), L.U.data(), sh.K, sh.N, groups, two); },
          [&] { gpu.upload(W.data(), w.data(), w.size()); });
      std::printf("  the same with a 2-point scale search (fp32): %.3f ms\n", rest);
    }
    gpu.set_gptq_tf32(false);
    for (int mode = 0; mode < 2; ++mode)
      std::printf("Llama-2-7B estimate (%s): %.1f ms per layer and option, %.0f s for 32 layers x 40 options\n",
                  mode ? "TF32" : "fp32", per_layer[mode], per_layer[mode] * 32 * 40 / 1e3);
  } catch (const qf::Error& e) {
    std::fprintf(stderr, "gptq_bench: %s\n", e.what());
    return 1;
  }
  return 0;
}
