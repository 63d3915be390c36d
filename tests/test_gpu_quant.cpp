// EXL2 and GPTQ linear layers on the CUDA backend: layers built in memory in the published layouts
// (tests/quant_layers.h) against QuantizedLinear::dequantize() + a
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
#include "backends/random_weights.h"
#include "backends/sampler.h"
#include "quant_layers.h"
#include "test_util.h"
#include "tokenizer/tokenizer.h"
#ifdef QFORGE_HAVE_CUDA
#include "backends/cuda/cuda_backend.h"
#endif

namespace qf {
namespace {

using namespace qf::test;  // the layer builders of quant_layers.h


// ---- comparison -------------------------------------------------------------------------------

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
// One row takes the decode GEMV (x quantized to 16 bits: tight tolerance), 2 to 64 rows the
// tensor-core small-batch GEMM and more rows the dequantize + cuBLAS path (fp16 weights and x).
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
  for (int64_t rows : {1, 2, 3, 7, 16, 17, 33, 64, 65}) {
    SCOPED_TRACE("rows " + std::to_string(rows));
    std::vector<float> x(static_cast<size_t>(rows * K));
    for (auto& v : x) v = nd(rng);
    const auto want = naive_linear(w, x, bias, rows, K, N);
    DeviceBuffer dx = gpu.alloc(x.size()), dy = gpu.alloc(static_cast<size_t>(rows * N));
    gpu.upload(dx.data(), x.data(), x.size());
    gpu.linear(*dl, dx.data(), dy.data(), rows);
    std::vector<float> y(static_cast<size_t>(rows * N), 1e30f);
    gpu.download(y.data(), dy.data(), y.size());
    std::vector<float> yc(static_cast<size_t>(rows * N), 1e30f);
    cl->forward(x.data(), yc.data(), rows, pool);
    const double tol = rows == 1 && !expect_fallbacks ? 1e-4 : 3e-3;
    EXPECT_LT(rel_rms(y, want), tol) << "GPU vs dequantize + naive matmul";
    EXPECT_LT(rel_rms(y, yc), tol + 1e-4) << "GPU vs CPU backend";
  }
}

// The layer of a case, written as a file like a checkpoint and loaded back; `store` must outlive it.
TensorStore exl2_store(const Exl2Case& c, const std::string& name) {
  return TensorStore::from_files({write_exl2(build_exl2(c), name)});
}
LinearWeight exl2_linear(const TensorStore& store, const Exl2Case& c, const std::string& name) {
  LinearWeight lw;
  lw.name = name;
  lw.format = LinearFormat::EXL2;
  lw.in_features = c.K;
  lw.out_features = c.N;
  lw.quant = detect_quantized_linear(store, "layer", c.K, c.N);
  if (c.bias) lw.bias = store.get("layer.bias");
  return lw;
}
TensorStore gptq_store(const GptqCase& c, const std::string& name) {
  return TensorStore::from_files({write_gptq(build_gptq(c), name)});
}
LinearWeight gptq_linear(const TensorStore& store, const GptqCase& c) {
  QuantHints h;
  h.method = "gptq";
  h.bits = c.bits;
  h.group_size = c.group_size;
  h.desc_act = c.act_order;
  h.checkpoint_format = c.v2 ? "gptq_v2" : "gptq";
  return load_linear(store, "layer", c.K, c.N, false, h);
}

void check_exl2(const Exl2Case& c, const std::string& name, int expect_fallbacks = 0) {
  SCOPED_TRACE(name);
  const TensorStore store = exl2_store(c, name);
  const LinearWeight lw = exl2_linear(store, c, "layer");
  ASSERT_TRUE(lw.quant);
  check_layer(lw, c.seed + 50, expect_fallbacks);
}

void check_gptq(const GptqCase& c, const std::string& name) {
  SCOPED_TRACE(name);
  const TensorStore store = gptq_store(c, name);
  const LinearWeight lw = gptq_linear(store, c);
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
#ifdef QFORGE_HAVE_CUDA
// A quantized layer on the GPU with the plain matrix it must equal ([N][K]) and its bias.
struct GpuQuantLayer {
  std::unique_ptr<DeviceLinear> dev;
  std::vector<float> W, bias;
};

GpuQuantLayer upload_layer(CudaBackend& gpu, const LinearWeight& lw) {
  GpuQuantLayer g;
  g.W.resize(static_cast<size_t>(lw.in_features * lw.out_features));
  lw.quant->dequantize(g.W.data());
  if (lw.bias) g.bias = to_f32(*lw.bias);
  g.dev = gpu.make_linear(lw);
  return g;
}

GpuQuantLayer exl2_on_gpu(CudaBackend& gpu, const Exl2Case& c, const std::string& name) {
  const TensorStore store = exl2_store(c, name);
  return upload_layer(gpu, exl2_linear(store, c, name));
}

GpuQuantLayer gptq_on_gpu(CudaBackend& gpu, const GptqCase& c, const std::string& name) {
  const TensorStore store = gptq_store(c, name);
  return upload_layer(gpu, gptq_linear(store, c));
}

// The fused decode ops (norm + q/k/v, residual add, SwiGLU) on sets of layers.
void check_fused_set(CudaBackend& gpu, const std::vector<GpuQuantLayer*>& ls, uint64_t seed) {
  std::vector<const DeviceLinear*> ws;
  std::vector<std::vector<float>> W, B;
  for (auto* l : ls) {
    ws.push_back(l->dev.get());
    W.push_back(l->W);
    B.push_back(l->bias);
  }
  using In = FusedLinear::Input;
  using Out = FusedLinear::Output;
  // One row: the decode GEMV (x quantized to 16 bits); 2 to 64: the small-batch GEMM (fp16 x and
  // weights, fp32 sums); more: dequantized weights through cuBLAS (the same precision).
  for (int64_t rows : {1, 3, 16, 40, 64, 100}) {
    const double tol = rows == 1 ? 1e-4 : 3e-3;
    for (In in : {In::Plain, In::RmsNorm})
      for (Out out : {Out::Store, Out::Accumulate}) {
        SCOPED_TRACE(str(rows, " rows, input ", static_cast<int>(in), " output ", static_cast<int>(out)));
        expect_fused_linear_matches(gpu, ws, W, B, in, out, seed++, tol, rows);
      }
    if (ls.size() == 2 && ls[0]->W.size() == ls[1]->W.size()) {
      SCOPED_TRACE(str(rows, " rows, SwiGLU"));
      expect_fused_linear_matches(gpu, ws, W, B, In::RmsNorm, Out::SwiGLU, seed, tol, rows);
    }
  }
}
#endif

TEST(GpuQuant, FusedOpsMatchHost) {
  QF_REQUIRE_GPU();
#ifdef QFORGE_HAVE_CUDA
  CudaBackend gpu(0);
  // EXL2: q/k/v of different widths, mixes and permutations; one with a bias.
  Exl2Case q{512, 384, {{6, 128}, {4, 256}, {3, 128}}, true, false, true, 11};
  Exl2Case k{512, 128, {{5, 64}, {4, 448}}, true, false, false, 12};
  Exl2Case v{512, 128, {{8, 32}, {2, 480}}, false, false, false, 13};
  auto lq = exl2_on_gpu(gpu, q, "q"), lk = exl2_on_gpu(gpu, k, "k"), lv = exl2_on_gpu(gpu, v, "v");
  {
    SCOPED_TRACE("exl2 q/k/v");
    check_fused_set(gpu, {&lq, &lk, &lv}, 100);
  }
  // Gate and up with a partial last tile; a layer of 4 units (one slice) and one of a partial unit.
  Exl2Case g{512, 300, {{4, 512}}, true, false, false, 14}, u{512, 300, {{3, 256}, {5, 256}}, true, false, true, 15};
  auto lg = exl2_on_gpu(gpu, g, "gate"), lu = exl2_on_gpu(gpu, u, "up");
  {
    SCOPED_TRACE("exl2 gate/up");
    check_fused_set(gpu, {&lg, &lu}, 200);
  }
  Exl2Case small{128, 2000, {{4, 128}}, true, false, false, 16}, odd{300, 45, {{6, 128}, {4, 128}, {3, 44}}, true, true, true, 17};
  auto ls = exl2_on_gpu(gpu, small, "small"), lo = exl2_on_gpu(gpu, odd, "odd");
  {
    SCOPED_TRACE("exl2 single layers");
    check_fused_set(gpu, {&ls}, 300);
    check_fused_set(gpu, {&lo}, 400);
  }
  // GPTQ, act-order and not.
  GptqCase gq;
  gq.K = 1024;
  gq.N = 256;
  gq.group_size = 128;
  gq.act_order = true;
  gq.bias = true;
  GptqCase gk = gq;
  gk.N = 128;
  gk.act_order = false;
  gk.bias = false;
  gk.seed = 2;
  auto pq = gptq_on_gpu(gpu, gq, "gq"), pk = gptq_on_gpu(gpu, gk, "gk");
  {
    SCOPED_TRACE("gptq q/k");
    check_fused_set(gpu, {&pq, &pk}, 500);
  }
  GptqCase gu = gk;
  gu.N = 256;
  gu.seed = 3;
  auto pu = gptq_on_gpu(gpu, gu, "gu");
  {
    SCOPED_TRACE("gptq gate/up");
    check_fused_set(gpu, {&pq, &pu}, 600);
  }
  // Mixed formats are not fused for one row (the model then runs the separate operations).
  FusedLinear op;
  op.count = 2;
  op.w[0] = lq.dev.get();
  op.w[1] = pq.dev.get();
  op.rows = 1;
  EXPECT_FALSE(gpu.fused_linear(op));
#endif
}

TEST(GpuQuant, GemvBandwidthReport) {
  QF_REQUIRE_GPU();
#ifdef QFORGE_HAVE_CUDA
  CudaBackend gpu(0);
  const auto rw = make_random_weights(gpu);
  struct S { int64_t K, N; };
  for (const char* fmt : {"exl2 4b", "exl2 4/3 mix", "exl2 6/5 mix", "exl2 2/3 mix g32", "gptq 4g128", "fp16"})
    for (S s : {S{4096, 4096}, S{4096, 11008}, S{11008, 4096}, S{4096, 32000}}) {
      size_t bytes = 0;
      const std::string f = fmt;
      // Copies of the layer adding up to ~256 MB, cycled so that weights stream from DRAM (L2: 50 MB).
      std::vector<std::unique_ptr<DeviceLinear>> ls;
      for (int c = 0; c < 64 && (c == 0 || static_cast<size_t>(c) * bytes < (256u << 20)); ++c) {
        const uint64_t seed = 7 + static_cast<uint64_t>(c);
        if (f == "fp16") {
          ls.push_back(rw->dense(s.K, s.N, DType::F16, 0.02f, seed));
          bytes = static_cast<size_t>(s.K * s.N) * 2;
        } else if (f == "gptq 4g128") ls.push_back(rw->gptq(s.K, s.N, 4, 128, false, seed, &bytes));
        else if (f == "exl2 4b") ls.push_back(rw->exl2(s.K, s.N, {{4, 1.0, 128}}, seed, &bytes));
        else if (f == "exl2 4/3 mix") ls.push_back(rw->exl2(s.K, s.N, {{4, 0.97, 128}, {3, 0.03, 128}}, seed, &bytes));
        else if (f == "exl2 6/5 mix") ls.push_back(rw->exl2(s.K, s.N, {{6, 0.97, 128}, {5, 0.03, 128}}, seed, &bytes));
        else ls.push_back(rw->exl2(s.K, s.N, {{3, 0.37, 32}, {2, 0.63, 32}}, seed, &bytes));
      }
      // One row (the decode GEMV); 8 and 64 rows (the small-batch GEMM, cuBLAS for fp16) for the
      // common formats.
      const bool rows_too = f == "exl2 4b" || f == "gptq 4g128" || f == "fp16";
      for (int64_t rows : {1, 8, 64}) {
        if (rows > 1 && !rows_too) break;
        DeviceBuffer x = rw->vector(rows * s.K, 0.f, 1.f, 3), y = gpu.alloc(static_cast<size_t>(rows * s.N));
        for (size_t i = 0; i < ls.size(); ++i) gpu.linear(*ls[i], x.data(), y.data(), rows);
        gpu.synchronize();
        const int iters = static_cast<int>(std::max<size_t>(200, 4 * ls.size()));
        const auto t0 = std::chrono::steady_clock::now();
        for (int i = 0; i < iters; ++i) gpu.linear(*ls[static_cast<size_t>(i) % ls.size()], x.data(), y.data(), rows);
        gpu.synchronize();
        const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / iters;
        std::printf("%s %-16s %5lld x %5lld, %2lld rows: %7.2f us, %6.2f MB, %5.0f GB/s\n", rows == 1 ? "GEMV" : "GEMM",
                    fmt, static_cast<long long>(s.K), static_cast<long long>(s.N), static_cast<long long>(rows), dt * 1e6,
                    bytes / 1e6, bytes / dt / 1e9);
      }
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
  const auto want = test::greedy(*mc, prompt, 64);
  EXPECT_EQ(test::greedy(*mg, prompt, 64), want) << "eager greedy";
  EXPECT_EQ(test::greedy(*mg, prompt, 64, nullptr, /*engine=*/true), want) << "engine greedy (decode graphs)";
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
