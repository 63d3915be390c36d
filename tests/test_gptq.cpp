// GPTQ layers (AutoGPTQ / GPTQModel layout, shared/reference/exl2-format.md section 3) built in
// memory: 2/3/4/8 bits, sym and asym, v1 (zeros stored minus one) and gptq_v2, groups of 32/128,
// group -1, act-order with a shuffled g_idx, no g_idx at all; dequantize() checked exactly, the CPU
// kernel against dequantize() + a naive matmul; malformed tensor sets rejected in one line.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include "backends/cpu/cpu_linear.h"
#include "core/error.h"
#include "formats/gptq.h"
#include "formats/quant_linear.h"
#include "formats/safetensors.h"
#include "model/weights.h"
#include "test_util.h"

namespace qf {
namespace {

struct GptqCase {
  int64_t K = 256, N = 64;
  int bits = 4;
  int64_t group_size = 32;  // -1: one group
  bool sym = true, v2 = false, act_order = false, write_g_idx = true, bias = false;
  bool hint_bits = true;    // pass bits/group size through QuantHints (else inferred)
  uint32_t seed = 1;
};

struct GptqTensors {
  int64_t K = 0, N = 0, G = 0, rows = 0, zcols = 0;
  std::vector<int32_t> qweight, qzeros, g_idx;
  std::vector<uint16_t> scales, bias;
  std::vector<float> expected;  // [N][K]
};

// Packs 32/bits codes per word (2, 4, 8 bits) or, for 3 bits, 32 codes into 3 words the way
// AutoGPTQ's pack() does: codes 0-9 in word 0, code 10 split 2+1 bits, codes 11-20 in word 1 from
// bit 1, code 21 split 1+2 bits, codes 22-31 in word 2 from bit 2.
std::vector<uint32_t> pack(const std::vector<uint32_t>& v, int bits) {
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

GptqTensors build(const GptqCase& c) {
  GptqTensors t;
  t.K = c.K;
  t.N = c.N;
  const int64_t gs = c.group_size < 0 ? c.K : c.group_size;
  t.G = (c.K + gs - 1) / gs;
  std::mt19937 rng(c.seed);
  // g_idx: i / gs, or under act-order the group of each row after a random permutation.
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
  t.expected.resize(static_cast<size_t>(c.K * c.N));
  for (int64_t n = 0; n < c.N; ++n)
    for (int64_t k = 0; k < c.K; ++k) {
      const int64_t g = t.g_idx[static_cast<size_t>(k)];
      const double s = fp16_to_f32(t.scales[static_cast<size_t>(g * c.N + n)]);
      const int q = static_cast<int>(codes[static_cast<size_t>(k * c.N + n)]);
      const int z = static_cast<int>(zeros[static_cast<size_t>(g * c.N + n)]);
      t.expected[static_cast<size_t>(n * c.K + k)] = static_cast<float>(static_cast<double>(q - z) * s);
    }
  // qweight: each column packed along K.
  t.rows = (c.K * c.bits + 31) / 32;
  t.qweight.assign(static_cast<size_t>(t.rows * c.N), 0);
  for (int64_t n = 0; n < c.N; ++n) {
    std::vector<uint32_t> col(static_cast<size_t>(c.K));
    for (int64_t k = 0; k < c.K; ++k) col[static_cast<size_t>(k)] = codes[static_cast<size_t>(k * c.N + n)];
    const auto p = pack(col, c.bits);
    for (int64_t r = 0; r < t.rows; ++r) t.qweight[static_cast<size_t>(r * c.N + n)] = static_cast<int32_t>(p[static_cast<size_t>(r)]);
  }
  // qzeros: each group's row packed along N; v1 stores zero - 1 (wrapping within the width).
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

struct Overrides {
  std::vector<int64_t> qzeros_shape, g_idx_shape, qweight_shape, scales_shape;
};
Overrides qzeros_shape(std::vector<int64_t> s) { Overrides o; o.qzeros_shape = std::move(s); return o; }
Overrides g_idx_shape(std::vector<int64_t> s) { Overrides o; o.g_idx_shape = std::move(s); return o; }
Overrides qweight_shape(std::vector<int64_t> s) { Overrides o; o.qweight_shape = std::move(s); return o; }
Overrides scales_shape(std::vector<int64_t> s) { Overrides o; o.scales_shape = std::move(s); return o; }

std::filesystem::path write(const GptqTensors& t, const std::string& name, bool write_g_idx = true,
                            const Overrides& o = {}) {
  const auto path = test::tmp_dir("gptq_" + name) / "model.safetensors";
  auto pick = [](const std::vector<int64_t>& over, std::vector<int64_t> def) { return over.empty() ? def : over; };
  std::vector<TensorToWrite> ts = {
      {"layer.qweight", DType::I32, pick(o.qweight_shape, {t.rows, t.N}), t.qweight.data()},
      {"layer.qzeros", DType::I32, pick(o.qzeros_shape, {t.G, t.zcols}), t.qzeros.data()},
      {"layer.scales", DType::F16, pick(o.scales_shape, {t.G, t.N}), t.scales.data()},
  };
  if (write_g_idx) ts.push_back({"layer.g_idx", DType::I32, pick(o.g_idx_shape, {t.K}), t.g_idx.data()});
  if (!t.bias.empty()) ts.push_back({"layer.bias", DType::F16, {t.N}, t.bias.data()});
  write_safetensors(path, ts);
  return path;
}

QuantHints hints_for(const GptqCase& c) {
  QuantHints h;
  h.method = "gptq";
  if (c.hint_bits) {
    h.bits = c.bits;
    h.group_size = c.group_size;
  }
  h.desc_act = c.act_order;
  h.checkpoint_format = c.v2 ? "gptq_v2" : "gptq";
  return h;
}

std::vector<float> naive(const std::vector<float>& w, const std::vector<float>& x, const std::vector<float>& bias,
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

void check_case(const GptqCase& c, const std::string& name) {
  SCOPED_TRACE(name);
  const GptqTensors t = build(c);
  const auto path = write(t, name, c.write_g_idx);
  const TensorStore store = TensorStore::from_files({path});
  // Through the loader, as a model would load it.
  const LinearWeight lw = load_linear(store, "layer", c.K, c.N, false, hints_for(c));
  ASSERT_EQ(lw.format, LinearFormat::GPTQ);
  ASSERT_TRUE(lw.quant);
  const auto& q = *lw.quant;
  const std::string d = q.describe();
  EXPECT_NE(d.find(str(c.bits, "-bit")), std::string::npos) << d;
  EXPECT_EQ(d.find("act-order") != std::string::npos, c.act_order) << d;
  EXPECT_EQ(d.find(" sym") != std::string::npos, c.sym) << d;

  std::vector<float> w(static_cast<size_t>(c.K * c.N), -1e30f);
  q.dequantize(w.data());
  for (size_t i = 0; i < w.size(); ++i)
    ASSERT_EQ(w[i], t.expected[i]) << "weight [" << i / c.K << "][" << i % c.K << "]";

  auto lin = make_quant_cpu_linear(lw);
  const std::vector<float> bias = c.bias ? to_f32(*lw.bias) : std::vector<float>{};
  ThreadPool pool(2);
  std::mt19937 rng(c.seed + 7);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (int64_t rows : {1, 2, 3, 4, 5, 8, 13, 17}) {
    std::vector<float> x(static_cast<size_t>(rows * c.K));
    for (auto& v : x) v = nd(rng);
    std::vector<float> y(static_cast<size_t>(rows * c.N), 777.f);
    lin->forward(x.data(), y.data(), rows, pool);
    const auto want = naive(w, x, bias, rows, c.K, c.N);
    double num = 0, den = 0;
    for (size_t i = 0; i < y.size(); ++i) {
      num += (y[i] - want[i]) * static_cast<double>(y[i] - want[i]);
      den += static_cast<double>(want[i]) * want[i];
    }
    EXPECT_LT(std::sqrt(num / den), 1e-4) << "rows " << rows;
  }
}

TEST(Gptq, BitsGroupsSymmetryAndFormats) {
  for (int bits : {2, 3, 4, 8})
    for (int64_t gs : {32, 128, -1})
      for (int variant = 0; variant < 4; ++variant) {
        GptqCase c;
        c.bits = bits;
        c.group_size = gs;
        c.sym = variant == 0;
        c.v2 = variant >= 2;
        c.act_order = variant == 3 && gs != -1;
        c.N = bits == 3 ? 64 : 48;  // 3-bit zeros pack 32 columns per 3 words
        c.seed = static_cast<uint32_t>(bits * 100 + variant * 10 + (gs < 0 ? 0 : gs));
        check_case(c, str("b", bits, "_g", gs, "_v", variant));
      }
}

TEST(Gptq, ActOrderShuffledGroupIndex) {
  for (int bits : {2, 3, 4, 8}) {
    GptqCase c;
    c.bits = bits;
    c.K = 384;
    c.N = 96;
    c.group_size = 64;
    c.act_order = true;
    c.sym = false;
    c.bias = true;
    c.seed = static_cast<uint32_t>(bits);
    check_case(c, str("actorder_b", bits));
  }
}

TEST(Gptq, InfersBitsAndGroupsWithoutConfigOrGIdx) {
  for (int bits : {2, 3, 4, 8}) {
    GptqCase c;
    c.bits = bits;
    c.N = 64;
    c.hint_bits = false;
    c.write_g_idx = false;
    c.group_size = 64;
    c.seed = static_cast<uint32_t>(40 + bits);
    check_case(c, str("infer_b", bits));
  }
}

TEST(Gptq, LongInputIsDecodedInChunks) {
  GptqCase c;
  c.K = 1536;
  c.N = 40;
  c.bits = 4;
  c.group_size = 128;
  c.act_order = true;
  check_case(c, "long");
}

TEST(Gptq, StorageBytesCountEveryTensor) {
  GptqCase c;
  const GptqTensors t = build(c);
  const TensorStore store = TensorStore::from_files({write(t, "bytes")});
  auto q = detect_quantized_linear(store, "layer", c.K, c.N, hints_for(c));
  ASSERT_TRUE(q);
  EXPECT_EQ(q->storage_bytes(), t.qweight.size() * 4 + t.qzeros.size() * 4 + t.scales.size() * 2 + t.g_idx.size() * 4);
}

// ---- malformed tensor sets -------------------------------------------------------------------

template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

void expect_one_line(const std::string& msg, const std::string& tensor) {
  EXPECT_FALSE(msg.empty()) << "no error for " << tensor;
  EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
  EXPECT_NE(msg.find("'" + tensor + "'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("model.safetensors"), std::string::npos) << msg;
}

std::string load_error(const GptqTensors& t, const std::string& name, const QuantHints& h, const Overrides& o = {},
                       int64_t K = 0) {
  const TensorStore store = TensorStore::from_files({write(t, name, true, o)});
  return error_of([&] { detect_quantized_linear(store, "layer", K ? K : t.K, t.N, h); });
}

TEST(GptqErrors, QzerosOfTheWrongWidth) {
  GptqCase c;
  GptqTensors t = build(c);
  t.qzeros.resize(t.qzeros.size() * 2);
  for (bool hinted : {true, false}) {
    QuantHints h = hints_for(c);
    if (!hinted) h.bits = 0;
    expect_one_line(load_error(t, "zw", h, qzeros_shape({t.G, t.zcols * 2})), "layer.qzeros");
  }
  expect_one_line(load_error(t, "zg", hints_for(c), qzeros_shape({t.G * 2, t.zcols})), "layer.qzeros");
}

TEST(GptqErrors, GIdxOutOfRange) {
  GptqCase c;
  GptqTensors t = build(c);
  t.g_idx[17] = static_cast<int32_t>(t.G);
  expect_one_line(load_error(t, "gi_hi", hints_for(c)), "layer.g_idx");
  t.g_idx[17] = -1;
  expect_one_line(load_error(t, "gi_neg", hints_for(c)), "layer.g_idx");
  GptqTensors u = build(c);
  expect_one_line(load_error(u, "gi_len", hints_for(c), g_idx_shape({u.K / 2})), "layer.g_idx");
}

TEST(GptqErrors, QweightFitsNoBitWidth) {
  GptqCase c;
  GptqTensors t = build(c);
  QuantHints h = hints_for(c);
  h.bits = 0;
  expect_one_line(load_error(t, "qw_rows", h, qweight_shape({t.rows - 3, t.N})), "layer.qweight");
  expect_one_line(load_error(t, "qw_hint", hints_for(c), {}, t.K * 2), "layer.qweight");
  h.bits = 5;
  expect_one_line(load_error(t, "qw_5", h), "layer.qweight");
  expect_one_line(load_error(t, "qw_cols", hints_for(c), qweight_shape({t.rows * 2, t.N / 2})), "layer.qweight");
}

TEST(GptqErrors, ScalesDisagree) {
  GptqCase c;
  GptqTensors t = build(c);
  expect_one_line(load_error(t, "sc", hints_for(c), scales_shape({t.G * 2, t.N / 2})), "layer.scales");
}

TEST(GptqErrors, AwqIsRejectedClearly) {
  GptqCase c;
  GptqTensors t = build(c);
  QuantHints h = hints_for(c);
  h.method = "awq";
  const std::string msg = load_error(t, "awq", h);
  expect_one_line(msg, "layer.qweight");
  EXPECT_NE(msg.find("AWQ"), std::string::npos) << msg;
}

}  // namespace
}  // namespace qf
