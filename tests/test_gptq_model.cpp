// End to end GPTQ: the FP16 test model is quantized here (round-to-nearest, AutoGPTQ tensor layout,
// quantization_config in config.json) and loaded like any published GPTQ folder. Its logits must
// equal those of the same model with the dequantized weights stored densely (the loader, hints and
// CPU kernels are exact), and stay close to the FP16 model's (the quantization is sane).
#include <algorithm>
#include <cmath>
#include <fstream>
#include <numeric>
#include <random>

#include "backends/cpu/cpu_backend.h"
#include "core/json_file.h"
#include "formats/safetensors.h"
#include "model/model.h"
#include "test_util.h"

namespace qf {
namespace {

const char* kFp16 = "models/testmodel-llama-20m";

struct Variant {
  std::string name;
  int bits;
  int64_t group_size;  // -1: one group
  bool sym, act_order, v2;
};

// Little-endian bit stream of `bits`-bit values, 32-bit words.
std::vector<uint32_t> pack_stream(const std::vector<uint32_t>& v, int bits, size_t words) {
  std::vector<uint32_t> out(words, 0);
  for (size_t i = 0; i < v.size(); ++i) {
    const uint64_t pos = i * static_cast<uint64_t>(bits);
    out[pos / 32] |= v[i] << (pos % 32);
    if (pos % 32 + static_cast<uint64_t>(bits) > 32) out[pos / 32 + 1] |= v[i] >> (32 - pos % 32);
  }
  return out;
}

struct QuantLayer {
  std::vector<int32_t> qweight, qzeros, g_idx;
  std::vector<uint16_t> scales;
  std::vector<float> dequant;  // [N][K]
  int64_t rows = 0, zcols = 0, G = 0;
};

QuantLayer quantize(const std::vector<float>& w, int64_t N, int64_t K, const Variant& v, std::mt19937& rng) {
  QuantLayer q;
  const int64_t gs = v.group_size < 0 ? K : v.group_size;
  q.G = (K + gs - 1) / gs;
  std::vector<int32_t> order(static_cast<size_t>(K));
  std::iota(order.begin(), order.end(), 0);
  if (v.act_order) std::shuffle(order.begin(), order.end(), rng);
  q.g_idx.assign(static_cast<size_t>(K), 0);
  for (int64_t i = 0; i < K; ++i) q.g_idx[static_cast<size_t>(order[static_cast<size_t>(i)])] = static_cast<int32_t>(i / gs);
  const int maxq = (1 << v.bits) - 1;
  std::vector<uint32_t> codes(static_cast<size_t>(K * N)), zeros(static_cast<size_t>(q.G * N));
  q.scales.resize(static_cast<size_t>(q.G * N));
  q.dequant.resize(static_cast<size_t>(N * K));
  for (int64_t n = 0; n < N; ++n) {
    std::vector<float> lo(static_cast<size_t>(q.G), 0.f), hi(static_cast<size_t>(q.G), 0.f);
    for (int64_t k = 0; k < K; ++k) {
      const size_t g = static_cast<size_t>(q.g_idx[static_cast<size_t>(k)]);
      lo[g] = std::min(lo[g], w[static_cast<size_t>(n * K + k)]);
      hi[g] = std::max(hi[g], w[static_cast<size_t>(n * K + k)]);
    }
    for (int64_t g = 0; g < q.G; ++g) {
      float s, z;
      if (v.sym) {
        s = std::max(std::abs(lo[static_cast<size_t>(g)]), hi[static_cast<size_t>(g)]) / (maxq / 2.0f);
        z = static_cast<float>((maxq + 1) / 2);
      } else {
        s = (hi[static_cast<size_t>(g)] - lo[static_cast<size_t>(g)]) / static_cast<float>(maxq);
        z = 0;
      }
      if (s <= 0) s = 1e-4f;
      const uint16_t s16 = f32_to_fp16(s);
      s = fp16_to_f32(s16);
      if (!v.sym) z = std::clamp(std::round(-lo[static_cast<size_t>(g)] / s), v.v2 ? 0.f : 1.f, static_cast<float>(maxq));
      q.scales[static_cast<size_t>(g * N + n)] = s16;
      zeros[static_cast<size_t>(g * N + n)] = static_cast<uint32_t>(z);
    }
    for (int64_t k = 0; k < K; ++k) {
      const int64_t g = q.g_idx[static_cast<size_t>(k)];
      const float s = fp16_to_f32(q.scales[static_cast<size_t>(g * N + n)]);
      const int z = static_cast<int>(zeros[static_cast<size_t>(g * N + n)]);
      const int c = std::clamp(static_cast<int>(std::round(w[static_cast<size_t>(n * K + k)] / s)) + z, 0, maxq);
      codes[static_cast<size_t>(k * N + n)] = static_cast<uint32_t>(c);
      q.dequant[static_cast<size_t>(n * K + k)] = static_cast<float>(c - z) * s;
    }
  }
  q.rows = (K * v.bits + 31) / 32;
  q.qweight.assign(static_cast<size_t>(q.rows * N), 0);
  for (int64_t n = 0; n < N; ++n) {
    std::vector<uint32_t> col(static_cast<size_t>(K));
    for (int64_t k = 0; k < K; ++k) col[static_cast<size_t>(k)] = codes[static_cast<size_t>(k * N + n)];
    const auto p = pack_stream(col, v.bits, static_cast<size_t>(q.rows));
    for (int64_t r = 0; r < q.rows; ++r) q.qweight[static_cast<size_t>(r * N + n)] = static_cast<int32_t>(p[static_cast<size_t>(r)]);
  }
  q.zcols = (N * v.bits + 31) / 32;
  for (int64_t g = 0; g < q.G; ++g) {
    std::vector<uint32_t> row(static_cast<size_t>(N));
    for (int64_t n = 0; n < N; ++n) row[static_cast<size_t>(n)] = zeros[static_cast<size_t>(g * N + n)] - (v.v2 ? 0u : 1u);
    const auto p = pack_stream(row, v.bits, static_cast<size_t>(q.zcols));
    q.qzeros.insert(q.qzeros.end(), p.begin(), p.end());
  }
  return q;
}

// Writes <tmp>/<variant>-gptq (GPTQ tensors) and <tmp>/<variant>-dense (the same weights, F32).
std::pair<std::filesystem::path, std::filesystem::path> make_models(const Variant& v) {
  const auto src = test::data_dir() / kFp16;
  const TensorStore store = TensorStore::open_dir(src);
  const auto qdir = test::tmp_dir("gptq_model_" + v.name), ddir = test::tmp_dir("gptq_dense_" + v.name);
  std::vector<TensorToWrite> qt, dt;
  std::vector<std::unique_ptr<QuantLayer>> keep;
  std::mt19937 rng(7);
  for (const auto& name : store.names()) {
    const TensorView& t = store.get(name);
    const bool linear = name.find("model.layers.") == 0 && name.size() > 12 &&
                        name.compare(name.size() - 12, 12, "_proj.weight") == 0;
    if (!linear) {
      qt.push_back({name, t.dtype, t.shape, t.data});
      dt.push_back({name, t.dtype, t.shape, t.data});
      continue;
    }
    const std::string prefix = name.substr(0, name.size() - 7);
    const int64_t N = t.dim(0), K = t.dim(1);
    keep.push_back(std::make_unique<QuantLayer>(quantize(to_f32(t), N, K, v, rng)));
    const QuantLayer& q = *keep.back();
    qt.push_back({prefix + ".qweight", DType::I32, {q.rows, N}, q.qweight.data()});
    qt.push_back({prefix + ".qzeros", DType::I32, {q.G, q.zcols}, q.qzeros.data()});
    qt.push_back({prefix + ".scales", DType::F16, {q.G, N}, q.scales.data()});
    qt.push_back({prefix + ".g_idx", DType::I32, {K}, q.g_idx.data()});
    dt.push_back({name, DType::F32, {N, K}, q.dequant.data()});
  }
  write_safetensors(qdir / "model.safetensors", qt);
  write_safetensors(ddir / "model.safetensors", dt);
  json cfg = read_json_file(src / "config.json");
  std::ofstream(ddir / "config.json") << cfg.dump(2);
  cfg["quantization_config"] = {{"quant_method", "gptq"},       {"bits", v.bits},
                                {"group_size", v.group_size},   {"desc_act", v.act_order},
                                {"sym", v.sym},                 {"checkpoint_format", v.v2 ? "gptq_v2" : "gptq"}};
  std::ofstream(qdir / "config.json") << cfg.dump(2);
  return {qdir, ddir};
}

std::vector<float> last_logits(Model& m, const std::vector<int32_t>& ids, bool step_last) {
  auto cache = m.new_cache(static_cast<int64_t>(ids.size()));
  std::vector<float> logits(static_cast<size_t>(m.config().vocab));
  const int64_t n = static_cast<int64_t>(ids.size());
  if (!step_last) {
    m.forward(ids.data(), n, 0, *cache, logits.data());
  } else {  // prefill, then the last 3 tokens one at a time (the decode kernels)
    m.forward(ids.data(), n - 3, 0, *cache, logits.data());
    for (int64_t p = n - 3; p < n; ++p) m.forward(ids.data() + p, 1, p, *cache, logits.data());
  }
  return logits;
}

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double d = 0;
  for (size_t i = 0; i < a.size(); ++i) d = std::max(d, static_cast<double>(std::abs(a[i] - b[i])));
  return d;
}

int argmax_of(const std::vector<float>& v) { return static_cast<int>(std::max_element(v.begin(), v.end()) - v.begin()); }

TEST(GptqModel, QuantizedFolderLoadsAndMatchesItsDequantizedWeights) {
  QF_REQUIRE_DATA(std::string(kFp16) + "/reference_outputs.json");
  const auto ref = read_json_file(test::data_dir() / kFp16 / "reference_outputs.json");
  CpuBackend cpu;
  auto fp16 = Model::load(test::data_dir() / kFp16, cpu);
  const std::vector<Variant> variants = {
      {"b4_g128_asym_actorder_v1", 4, 128, false, true, false},
      {"b8_g64_sym_v2", 8, 64, true, false, true},
      {"b3_g32_asym_v2", 3, 32, false, false, true},
      {"b4_gall_sym_v1", 4, -1, true, false, false},
  };
  for (const auto& v : variants) {
    SCOPED_TRACE(v.name);
    const auto [qdir, ddir] = make_models(v);
    auto gq = Model::load(qdir, cpu);
    auto dense = Model::load(ddir, cpu);
    int top1_agree = 0, prompts = 0;
    for (const auto& p : ref["prompts"]) {
      const auto ids = p["input_ids"].get<std::vector<int32_t>>();
      if (ids.size() < 4) continue;
      const auto want = last_logits(*dense, ids, false);
      for (bool step : {false, true}) {
        const auto got = last_logits(*gq, ids, step);
        EXPECT_LT(max_abs_diff(got, want), 2e-3) << (step ? "decode steps" : "prefill");
      }
      const auto f = last_logits(*fp16, ids, false);
      top1_agree += argmax_of(f) == argmax_of(want);
      ++prompts;
      if (v.bits >= 8) {
        EXPECT_LT(max_abs_diff(f, want), 0.1);
      }
    }
    std::printf("%-28s top-1 agrees with fp16 on %d/%d prompts\n", v.name.c_str(), top1_agree, prompts);
    gq.reset();
    dense.reset();
    std::filesystem::remove_all(qdir);
    std::filesystem::remove_all(ddir);
    if (v.bits >= 4) {
      EXPECT_GE(top1_agree, prompts - 2);
    }
  }
}

}  // namespace
}  // namespace qf
