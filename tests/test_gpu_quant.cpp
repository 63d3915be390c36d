// EXL2 and GPTQ linear layers on the CUDA backend: layers built in memory in the published layouts
// (packing helpers as in test_exl2.cpp / test_gptq.cpp) against QuantizedLinear::dequantize() + a
// naive matmul and against the CPU kernels, for the decode GEMV (rows 1, 3) and the dequantize +
// cuBLAS prefill path (rows 7, 33); and the staged EXL2 model against the CPU backend and
// ExLlamaV2's reference outputs. Skips without CUDA, a device, or the shared test data.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <numeric>
#include <random>

#include "backends/cpu/cpu_backend.h"
#include "backends/cpu/cpu_linear.h"
#include "core/error.h"
#include "core/json_file.h"
#include "formats/quant_linear.h"
#include "formats/safetensors.h"
#include "model/model.h"
#include "model/weights.h"
#include "runtime/perplexity.h"
#include "runtime/sampler.h"
#include "test_util.h"
#include "tokenizer/tokenizer.h"
#ifdef QFORGE_HAVE_CUDA
#include "backends/cuda/cuda_backend.h"
#endif

namespace qf {
namespace {

#ifdef QFORGE_HAVE_CUDA
#define QF_REQUIRE_GPU()                                                          \
  do {                                                                            \
    if (::qf::cuda_device_count() == 0) GTEST_SKIP() << "no CUDA device present"; \
  } while (0)
#else
#define QF_REQUIRE_GPU() GTEST_SKIP() << "built without CUDA"
#endif

// ---- EXL2 layers (as in test_exl2.cpp) ----------------------------------------------------------

[[maybe_unused]] int unit_values(int bits) {
  switch (bits) {
    case 2: return 16;
    case 3: return 32;
    case 4: return 8;
    case 5: return 32;
    case 6: return 16;
    default: return 4;
  }
}

[[maybe_unused]] uint32_t wshift(uint32_t x, int j) {
  if (j <= -32 || j >= 32) return 0;
  return j < 0 ? x >> -j : x << j;
}

struct GroupSpec {
  int bits;
  int64_t rows;
};

struct Exl2Case {
  int64_t K = 256, N = 48;
  std::vector<GroupSpec> groups;
  bool permute = true, pad_columns = false, bias = false;
  uint32_t seed = 1;
};

struct Exl2Tensors {
  int64_t K = 0, N = 0, W = 0, P = 0, G = 0;
  std::vector<int32_t> q_weight, q_scale, q_invperm;
  std::vector<uint16_t> q_scale_max, bias;
  std::vector<int16_t> q_groups;
};

[[maybe_unused]] Exl2Tensors build_exl2(const Exl2Case& c) {
  Exl2Tensors t;
  t.K = c.K;
  t.N = c.N;
  t.W = c.pad_columns ? (c.N + 31) / 32 * 32 : c.N;
  t.G = static_cast<int64_t>(c.groups.size());
  std::mt19937 rng(c.seed);
  std::vector<int32_t> perm(static_cast<size_t>(c.K));
  std::iota(perm.begin(), perm.end(), 0);
  if (c.permute) std::shuffle(perm.begin(), perm.end(), rng);
  t.q_invperm.assign(static_cast<size_t>(c.K), 0);
  for (int64_t j = 0; j < c.K; ++j) t.q_invperm[static_cast<size_t>(perm[static_cast<size_t>(j)])] = static_cast<int32_t>(j);
  std::vector<int64_t> words(c.groups.size());
  for (size_t g = 0; g < c.groups.size(); ++g) {
    const int b = c.groups[g].bits, u = unit_values(b);
    words[g] = (c.groups[g].rows + u - 1) / u * (u * b / 32);
    t.P += words[g];
  }
  t.q_weight.assign(static_cast<size_t>(t.P * t.W), 0);
  t.q_scale.assign(static_cast<size_t>(t.G * ((t.W + 7) / 8)), 0);
  int64_t word = 0;
  for (size_t g = 0; g < c.groups.size(); ++g) {
    const int b = c.groups[g].bits, u = unit_values(b), wpu = u * b / 32;
    const int64_t rows = c.groups[g].rows;
    t.q_groups.push_back(static_cast<int16_t>(b));
    t.q_groups.push_back(static_cast<int16_t>(word));
    t.q_scale_max.push_back(f32_to_fp16(std::uniform_real_distribution<float>(0.001f, 0.02f)(rng)));
    for (int64_t n = 0; n < t.W; ++n)
      t.q_scale[static_cast<size_t>(static_cast<int64_t>(g) * ((t.W + 7) / 8) + n / 8)] |=
          static_cast<int32_t>(static_cast<uint32_t>(rng() % 16) << (4 * (n % 8)));
    const int64_t units = (rows + u - 1) / u;
    for (int64_t n = 0; n < t.W; ++n)
      for (int64_t un = 0; un < units; ++un) {
        uint32_t packed[5] = {0, 0, 0, 0, 0};
        for (int i = 0; i < u; ++i) {
          const int64_t r = un * u + i;
          const uint32_t q = r < rows && n < c.N ? rng() % (1u << b) : (1u << (b - 1));
          for (int w = 0; w < wpu; ++w) packed[w] |= wshift(q, i * b - 32 * w);
        }
        for (int w = 0; w < wpu; ++w)
          t.q_weight[static_cast<size_t>((word + un * wpu + w) * t.W + n)] = static_cast<int32_t>(packed[w]);
      }
    word += words[g];
  }
  if (c.bias)
    for (int64_t n = 0; n < c.N; ++n) t.bias.push_back(f32_to_fp16(0.01f * static_cast<float>(n % 7) - 0.03f));
  return t;
}

[[maybe_unused]] std::filesystem::path write_exl2(const Exl2Tensors& t, const std::string& name) {
  const auto path = test::tmp_dir("gpu_exl2_" + name) / "model.safetensors";
  std::vector<TensorToWrite> ts = {
      {"layer.q_weight", DType::I32, {t.P, t.W}, t.q_weight.data()},
      {"layer.q_scale", DType::I32, {t.G, (t.W + 7) / 8}, t.q_scale.data()},
      {"layer.q_scale_max", DType::F16, {t.G}, t.q_scale_max.data()},
      {"layer.q_groups", DType::I16, {2 * t.G}, t.q_groups.data()},
      {"layer.q_invperm", DType::I32, {t.K}, t.q_invperm.data()},
  };
  if (!t.bias.empty()) ts.push_back({"layer.bias", DType::F16, {t.N}, t.bias.data()});
  write_safetensors(path, ts);
  return path;
}

// ---- GPTQ layers (as in test_gptq.cpp) ----------------------------------------------------------

struct GptqCase {
  int64_t K = 256, N = 64;
  int bits = 4;
  int64_t group_size = 32;
  bool sym = true, v2 = false, act_order = false, bias = false;
  uint32_t seed = 1;
};

struct GptqTensors {
  int64_t K = 0, N = 0, G = 0, rows = 0, zcols = 0;
  std::vector<int32_t> qweight, qzeros, g_idx;
  std::vector<uint16_t> scales, bias;
};

[[maybe_unused]] std::vector<uint32_t> pack(const std::vector<uint32_t>& v, int bits) {
  std::vector<uint32_t> out;
  if (bits != 3) {
    const size_t per = 32 / static_cast<size_t>(bits);
    out.assign((v.size() + per - 1) / per, 0);
    for (size_t i = 0; i < v.size(); ++i) out[i / per] |= v[i] << (bits * (i % per));
    return out;
  }
  out.assign((v.size() + 31) / 32 * 3, 0);
  for (size_t base = 0, w = 0; base < v.size(); base += 32, w += 3) {
    auto at = [&](size_t i) { return base + i < v.size() ? v[base + i] : 0u; };
    for (size_t i = 0; i < 10; ++i) out[w] |= at(i) << (3 * i);
    out[w] |= at(10) << 30;
    out[w + 1] |= (at(10) >> 2) & 1u;
    for (size_t i = 0; i < 10; ++i) out[w + 1] |= at(11 + i) << (3 * i + 1);
    out[w + 1] |= at(21) << 31;
    out[w + 2] |= (at(21) >> 1) & 3u;
    for (size_t i = 0; i < 10; ++i) out[w + 2] |= at(22 + i) << (3 * i + 2);
  }
  return out;
}

[[maybe_unused]] GptqTensors build_gptq(const GptqCase& c) {
  GptqTensors t;
  t.K = c.K;
  t.N = c.N;
  const int64_t gs = c.group_size < 0 ? c.K : c.group_size;
  t.G = (c.K + gs - 1) / gs;
  std::mt19937 rng(c.seed);
  std::vector<int32_t> order(static_cast<size_t>(c.K));
  std::iota(order.begin(), order.end(), 0);
  if (c.act_order) std::shuffle(order.begin(), order.end(), rng);
  t.g_idx.assign(static_cast<size_t>(c.K), 0);
  for (int64_t i = 0; i < c.K; ++i) t.g_idx[static_cast<size_t>(order[static_cast<size_t>(i)])] = static_cast<int32_t>(i / gs);
  const uint32_t maxq = (1u << c.bits) - 1;
  std::vector<uint32_t> codes(static_cast<size_t>(c.K * c.N)), zeros(static_cast<size_t>(t.G * c.N));
  for (auto& q : codes) q = rng() & maxq;
  for (auto& z : zeros) z = c.sym ? (1u << (c.bits - 1)) : rng() & maxq;
  t.scales.resize(static_cast<size_t>(t.G * c.N));
  for (auto& s : t.scales) s = f32_to_fp16(std::uniform_real_distribution<float>(0.001f, 0.05f)(rng));
  t.rows = (c.K * c.bits + 31) / 32;
  t.qweight.assign(static_cast<size_t>(t.rows * c.N), 0);
  for (int64_t n = 0; n < c.N; ++n) {
    std::vector<uint32_t> col(static_cast<size_t>(c.K));
    for (int64_t k = 0; k < c.K; ++k) col[static_cast<size_t>(k)] = codes[static_cast<size_t>(k * c.N + n)];
    const auto p = pack(col, c.bits);
    for (int64_t r = 0; r < t.rows; ++r) t.qweight[static_cast<size_t>(r * c.N + n)] = static_cast<int32_t>(p[static_cast<size_t>(r)]);
  }
  t.zcols = (c.N * c.bits + 31) / 32;
  for (int64_t g = 0; g < t.G; ++g) {
    std::vector<uint32_t> row(static_cast<size_t>(c.N));
    for (int64_t n = 0; n < c.N; ++n) {
      const uint32_t z = zeros[static_cast<size_t>(g * c.N + n)];
      row[static_cast<size_t>(n)] = c.v2 ? z : (z - 1u) & maxq;
    }
    const auto p = pack(row, c.bits);
    for (int64_t j = 0; j < t.zcols; ++j) t.qzeros.push_back(static_cast<int32_t>(p[static_cast<size_t>(j)]));
  }
  if (c.bias)
    for (int64_t n = 0; n < c.N; ++n) t.bias.push_back(f32_to_fp16(0.02f * static_cast<float>(n % 5) - 0.04f));
  return t;
}

[[maybe_unused]] std::filesystem::path write_gptq(const GptqTensors& t, const std::string& name) {
  const auto path = test::tmp_dir("gpu_gptq_" + name) / "model.safetensors";
  std::vector<TensorToWrite> ts = {
      {"layer.qweight", DType::I32, {t.rows, t.N}, t.qweight.data()},
      {"layer.qzeros", DType::I32, {t.G, t.zcols}, t.qzeros.data()},
      {"layer.scales", DType::F16, {t.G, t.N}, t.scales.data()},
      {"layer.g_idx", DType::I32, {t.K}, t.g_idx.data()},
  };
  if (!t.bias.empty()) ts.push_back({"layer.bias", DType::F16, {t.N}, t.bias.data()});
  write_safetensors(path, ts);
  return path;
}

// ---- comparison -------------------------------------------------------------------------------

[[maybe_unused]] std::vector<float> naive(const std::vector<float>& w, const std::vector<float>& x, const std::vector<float>& bias,
                         int64_t rows, int64_t K, int64_t N) {
  std::vector<float> y(static_cast<size_t>(rows * N));
  for (int64_t t = 0; t < rows; ++t)
    for (int64_t n = 0; n < N; ++n) {
      double acc = bias.empty() ? 0.0 : bias[static_cast<size_t>(n)];
      for (int64_t k = 0; k < K; ++k)
        acc += static_cast<double>(w[static_cast<size_t>(n * K + k)]) * x[static_cast<size_t>(t * K + k)];
      y[static_cast<size_t>(t * N + n)] = static_cast<float>(acc);
    }
  return y;
}

[[maybe_unused]] double rel_rms(const std::vector<float>& got, const std::vector<float>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    num += (got[i] - want[i]) * static_cast<double>(got[i] - want[i]);
    den += static_cast<double>(want[i]) * want[i];
  }
  return std::sqrt(num / std::max(den, 1e-300));
}

#ifdef QFORGE_HAVE_CUDA
// Runs the layer on the GPU and the CPU for several row counts and compares with the oracle.
// rows <= 4 take the fp32 GEMV (tight tolerance), more rows the fp16 dequantize + cuBLAS path.
void check_layer(const LinearWeight& lw, uint32_t seed, int expect_fallbacks = 0) {
  const int64_t K = lw.in_features, N = lw.out_features;
  std::vector<float> w(static_cast<size_t>(K * N));
  lw.quant->dequantize(w.data());
  const std::vector<float> bias = lw.bias ? to_f32(*lw.bias) : std::vector<float>{};
  CudaBackend gpu(0);
  auto dl = gpu.make_linear(lw);
  EXPECT_EQ(gpu.quant_fallbacks(), expect_fallbacks);
  auto cl = make_quant_cpu_linear(lw);
  ThreadPool pool(2);
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (int64_t rows : {1, 3, 7, 33}) {
    SCOPED_TRACE("rows " + std::to_string(rows));
    std::vector<float> x(static_cast<size_t>(rows * K));
    for (auto& v : x) v = nd(rng);
    const auto want = naive(w, x, bias, rows, K, N);
    DeviceBuffer dx = gpu.alloc(x.size()), dy = gpu.alloc(static_cast<size_t>(rows * N));
    gpu.upload(dx.data(), x.data(), x.size());
    gpu.linear(*dl, dx.data(), dy.data(), rows);
    std::vector<float> y(static_cast<size_t>(rows * N), 1e30f);
    gpu.download(y.data(), dy.data(), y.size());
    std::vector<float> yc(static_cast<size_t>(rows * N), 1e30f);
    cl->forward(x.data(), yc.data(), rows, pool);
    const double tol = rows <= 4 && !expect_fallbacks ? 2e-5 : 3e-3;
    EXPECT_LT(rel_rms(y, want), tol) << "GPU vs dequantize + naive matmul";
    EXPECT_LT(rel_rms(y, yc), tol + 1e-4) << "GPU vs CPU backend";
  }
}

void check_exl2(const Exl2Case& c, const std::string& name, int expect_fallbacks = 0) {
  SCOPED_TRACE(name);
  const Exl2Tensors t = build_exl2(c);
  const TensorStore store = TensorStore::from_files({write_exl2(t, name)});
  LinearWeight lw;
  lw.name = "layer";
  lw.format = LinearFormat::EXL2;
  lw.in_features = c.K;
  lw.out_features = c.N;
  lw.quant = detect_quantized_linear(store, "layer", c.K, c.N);
  ASSERT_TRUE(lw.quant);
  if (c.bias) lw.bias = store.get("layer.bias");
  check_layer(lw, c.seed + 50, expect_fallbacks);
}

void check_gptq(const GptqCase& c, const std::string& name) {
  SCOPED_TRACE(name);
  const GptqTensors t = build_gptq(c);
  const TensorStore store = TensorStore::from_files({write_gptq(t, name)});
  QuantHints h;
  h.method = "gptq";
  h.bits = c.bits;
  h.group_size = c.group_size;
  h.desc_act = c.act_order;
  h.checkpoint_format = c.v2 ? "gptq_v2" : "gptq";
  const LinearWeight lw = load_linear(store, "layer", c.K, c.N, false, h);
  ASSERT_EQ(lw.format, LinearFormat::GPTQ);
  check_layer(lw, c.seed + 60);
}
#endif

TEST(GpuQuant, Exl2EveryWidthMixedGroupsActOrder) {
  QF_REQUIRE_GPU();
#ifdef QFORGE_HAVE_CUDA
  Exl2Case c;
  c.K = 1024;
  c.N = 96;
  c.groups = {{8, 64}, {6, 128}, {5, 128}, {4, 256}, {4, 128}, {3, 64}, {3, 32}, {2, 128}, {2, 96}};
  check_exl2(c, "mixed");
  for (int b : {2, 3, 4, 5, 6, 8}) {
    Exl2Case u;
    u.K = 512;
    u.N = 200;
    u.groups = {{b, 128}, {b, 128}, {b, 256}};
    u.seed = static_cast<uint32_t>(b);
    check_exl2(u, "uniform" + std::to_string(b));
  }
#endif
}

TEST(GpuQuant, Exl2PaddedColumnsBiasPartialLastGroupIdentityPerm) {
  QF_REQUIRE_GPU();
#ifdef QFORGE_HAVE_CUDA
  Exl2Case c;
  c.K = 300;  // last group of 44 rows: a partial unit
  c.N = 45;
  c.pad_columns = true;
  c.bias = true;
  c.groups = {{6, 128}, {4, 128}, {3, 44}};
  check_exl2(c, "padded");
  Exl2Case d;
  d.K = 256;
  d.N = 64;
  d.permute = false;
  d.groups = {{5, 64}, {4, 192}};
  check_exl2(d, "noperm");
#endif
}

TEST(GpuQuant, Exl2GroupsOfSixteenFallBackToDense) {
  QF_REQUIRE_GPU();
#ifdef QFORGE_HAVE_CUDA
  Exl2Case c;
  c.K = 256;
  c.N = 40;
  c.groups = {{4, 128}, {2, 16}, {2, 112}};
  check_exl2(c, "g16", /*expect_fallbacks=*/1);
#endif
}

TEST(GpuQuant, GptqBitsGroupsSymmetryFormatsActOrder) {
  QF_REQUIRE_GPU();
#ifdef QFORGE_HAVE_CUDA
  int i = 0;
  for (int bits : {4, 2, 3, 8})
    for (int64_t gs : {32, 128, -1})
      for (bool sym : {true, false})
        for (bool v2 : {false, true}) {
          if (bits != 4 && (gs == 128 || v2)) continue;  // keep the run short
          GptqCase c;
          c.K = 512;
          c.N = 96;
          c.bits = bits;
          c.group_size = gs;
          c.sym = sym;
          c.v2 = v2;
          c.act_order = (i % 3) == 1 && gs != -1;
          c.bias = (i % 4) == 2;
          c.seed = static_cast<uint32_t>(100 + i);
          check_gptq(c, str("b", bits, "g", gs, sym ? "sym" : "asym", v2 ? "v2" : "v1", c.act_order ? "act" : ""));
          ++i;
        }
  GptqCase big;
  big.K = 4096;
  big.N = 256;
  big.group_size = 128;
  big.act_order = true;
  check_gptq(big, "4096x256 act-order");
#endif
}

// Not a check: decode GEMV bandwidth of random layers in the Llama-2-7B shapes (printed).
TEST(GpuQuant, GemvBandwidthReport) {
  QF_REQUIRE_GPU();
#ifdef QFORGE_HAVE_CUDA
  CudaBackend gpu(0);
  struct S { int64_t K, N; };
  for (const char* fmt : {"exl2 4b", "exl2 4/3 mix", "exl2 6/5 mix", "exl2 2/3 mix g32", "gptq 4g128"})
    for (S s : {S{4096, 4096}, S{4096, 11008}, S{11008, 4096}, S{4096, 32000}}) {
      size_t bytes = 0;
      const std::string f = fmt;
      // Copies of the layer adding up to ~256 MB, cycled so that weights stream from DRAM (L2: 50 MB).
      std::vector<std::unique_ptr<DeviceLinear>> ls;
      for (int c = 0; c < 64 && (c == 0 || static_cast<size_t>(c) * bytes < (256u << 20)); ++c) {
        const uint64_t seed = 7 + static_cast<uint64_t>(c);
        if (f == "gptq 4g128") ls.push_back(gpu.make_random_gptq_linear(s.K, s.N, 4, 128, false, seed, &bytes));
        else if (f == "exl2 4b") ls.push_back(gpu.make_random_exl2_linear(s.K, s.N, {{4, 1.0, 128}}, seed, &bytes));
        else if (f == "exl2 4/3 mix") ls.push_back(gpu.make_random_exl2_linear(s.K, s.N, {{4, 0.97, 128}, {3, 0.03, 128}}, seed, &bytes));
        else if (f == "exl2 6/5 mix") ls.push_back(gpu.make_random_exl2_linear(s.K, s.N, {{6, 0.97, 128}, {5, 0.03, 128}}, seed, &bytes));
        else ls.push_back(gpu.make_random_exl2_linear(s.K, s.N, {{3, 0.37, 32}, {2, 0.63, 32}}, seed, &bytes));
      }
      DeviceBuffer x = gpu.make_random_vector(s.K, 0.f, 1.f, 3), y = gpu.alloc(static_cast<size_t>(s.N));
      for (size_t i = 0; i < ls.size(); ++i) gpu.linear(*ls[i], x.data(), y.data(), 1);
      gpu.synchronize();
      const int iters = static_cast<int>(std::max<size_t>(200, 4 * ls.size()));
      const auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; i < iters; ++i) gpu.linear(*ls[static_cast<size_t>(i) % ls.size()], x.data(), y.data(), 1);
      gpu.synchronize();
      const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / iters;
      std::printf("GEMV %-16s %5lld x %5lld: %7.2f us, %6.2f MB, %5.0f GB/s\n", fmt, static_cast<long long>(s.K),
                  static_cast<long long>(s.N), dt * 1e6, bytes / 1e6, bytes / dt / 1e9);
    }
  std::fflush(stdout);
#endif
}

// ---- the staged EXL2 model ------------------------------------------------------------------------

const char* kExl2 = "models/testmodel-llama-20m-exl2-4.0bpw";

[[maybe_unused]] std::vector<int32_t> heldout_tokens(const std::filesystem::path& model_dir) {
  const Tokenizer tok = Tokenizer::load(model_dir);
  std::string text = read_text_file(test::data_dir() / "text/heldout/heldout.txt");
  text.erase(std::remove(text.begin(), text.end(), '\r'), text.end());
  return tok.encode(text, /*add_special=*/false);
}

[[maybe_unused]] std::vector<int32_t> greedy(Model& m, std::vector<int32_t> ids, int n_new) {
  auto cache = m.new_cache(static_cast<int64_t>(ids.size()) + n_new);
  std::vector<float> logits(static_cast<size_t>(m.config().vocab));
  m.forward(ids.data(), static_cast<int64_t>(ids.size()), 0, *cache, logits.data());
  std::vector<int32_t> out;
  int64_t pos = static_cast<int64_t>(ids.size());
  for (int i = 0; i < n_new; ++i) {
    int32_t id = argmax(logits.data(), m.config().vocab);
    out.push_back(id);
    if (i + 1 < n_new) m.forward(&id, 1, pos++, *cache, logits.data());
  }
  return out;
}

#ifdef QFORGE_HAVE_CUDA
std::vector<int32_t> greedy_graph(Model& m, CudaBackend& gpu, std::vector<int32_t> ids, int n_new) {
  auto cache = m.new_cache(static_cast<int64_t>(ids.size()) + n_new);
  std::vector<float> logits(static_cast<size_t>(m.config().vocab));
  m.forward(ids.data(), static_cast<int64_t>(ids.size()), 0, *cache, logits.data());
  std::vector<int32_t> out = {argmax(logits.data(), m.config().vocab)};
  gpu.set_device_inputs(true);
  gpu.set_argmax_on_download(true);
  gpu.set_decode_state(out[0], static_cast<int64_t>(ids.size()));
  int32_t dummy = 0;
  m.forward(&dummy, 1, 0, *cache, logits.data());
  out.push_back(gpu.read_token());
  gpu.begin_capture();
  m.forward(&dummy, 1, 0, *cache, logits.data());
  gpu.end_capture();
  while (static_cast<int>(out.size()) < n_new) {
    gpu.replay();
    out.push_back(gpu.read_token());
  }
  gpu.set_argmax_on_download(false);
  gpu.set_device_inputs(false);
  return out;
}
#endif

TEST(GpuQuantModel, Exl2TestModelGreedy64MatchesCpu) {
  QF_REQUIRE_GPU();
  QF_REQUIRE_DATA(std::string(kExl2) + "/output.safetensors");
  QF_REQUIRE_DATA("text/heldout/heldout.txt");
#ifdef QFORGE_HAVE_CUDA
  const auto dir = test::data_dir() / kExl2;
  const auto ids = heldout_tokens(dir);
  const std::vector<int32_t> prompt(ids.begin(), ids.begin() + 24);
  CpuBackend cpu;
  auto mc = Model::load(dir, cpu);
  CudaBackend gpu(0);
  auto mg = Model::load(dir, gpu);
  EXPECT_EQ(gpu.quant_fallbacks(), 0) << "every layer should use the quantized kernels";
  const auto want = greedy(*mc, prompt, 64);
  EXPECT_EQ(greedy(*mg, prompt, 64), want) << "eager greedy";
  EXPECT_EQ(greedy_graph(*mg, gpu, prompt, 64), want) << "graph greedy";
#endif
}

TEST(GpuQuantModel, Exl2TestModelTop10MatchesExLlamaV2) {
  QF_REQUIRE_GPU();
  QF_REQUIRE_DATA(std::string(kExl2) + "/reference_outputs.json");
  QF_REQUIRE_DATA("text/heldout/heldout.txt");
#ifdef QFORGE_HAVE_CUDA
  const auto dir = test::data_dir() / kExl2;
  const json ref = read_json_file(dir / "reference_outputs.json");
  const auto ids = heldout_tokens(dir);
  ASSERT_GE(ids.size(), 512u);
  CudaBackend gpu(0);
  auto model = Model::load(dir, gpu);
  auto cache = model->new_cache(512);
  std::vector<float> logits(static_cast<size_t>(model->config().vocab));
  model->forward(ids.data(), 512, 0, *cache, logits.data());
  const auto& top = ref["last_logits_top10"];
  ASSERT_EQ(top.size(), 10u);
  double worst = 0;
  for (size_t i = 0; i < 10; ++i) {
    const int32_t id = top[i][0].get<int32_t>();
    const float val = top[i][1].get<float>();
    worst = std::max(worst, static_cast<double>(std::abs(logits[static_cast<size_t>(id)] - val)));
    EXPECT_NEAR(logits[static_cast<size_t>(id)], val, 0.05) << "token " << id;
  }
  std::printf("top-10 logits: worst difference from ExLlamaV2 %.4f\n", worst);
#endif
}

TEST(GpuQuantModel, Exl2TestModelHeldoutPerplexity) {
  QF_REQUIRE_GPU();
  QF_REQUIRE_DATA(std::string(kExl2) + "/reference_outputs.json");
  QF_REQUIRE_DATA("text/heldout/heldout.txt");
#ifdef QFORGE_HAVE_CUDA
  const auto dir = test::data_dir() / kExl2;
  const double want = read_json_file(dir / "reference_outputs.json")["ppl_heldout_ctx512"].get<double>();
  const auto ids = heldout_tokens(dir);
  CudaBackend gpu(0);
  auto model = Model::load(dir, gpu);
  const PerplexityResult r = perplexity(*model, ids, 512);
  std::printf("GPU heldout ppl %.4f over %lld windows (ExLlamaV2: %.4f, %+.3f%%) in %.1f s\n", r.ppl,
              static_cast<long long>(r.windows), want, 100.0 * (r.ppl / want - 1.0), r.seconds);
  EXPECT_NEAR(r.ppl, want, 0.003 * want);
#endif
}

}  // namespace
}  // namespace qf
