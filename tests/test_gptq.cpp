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
#include "quant_layers.h"
#include "test_util.h"

namespace qf {
namespace {

using namespace qf::test;  // the layer builders of quant_layers.h

void check_case(const GptqCase& c, const std::string& name) {
  SCOPED_TRACE(name);
  const GptqTensors t = build_gptq(c);
  const auto path = write_gptq(t, name, c.write_g_idx);
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
  expect_cpu_linear_matches(*lin, w, bias, c.K, c.N, c.seed + 7);
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
  const GptqTensors t = build_gptq(c);
  const TensorStore store = TensorStore::from_files({write_gptq(t, "bytes")});
  auto q = detect_quantized_linear(store, "layer", c.K, c.N, hints_for(c));
  ASSERT_TRUE(q);
  EXPECT_EQ(q->storage_bytes(), t.qweight.size() * 4 + t.qzeros.size() * 4 + t.scales.size() * 2 + t.g_idx.size() * 4);
}

// ---- malformed tensor sets -------------------------------------------------------------------

std::string load_error(const GptqTensors& t, const std::string& name, const QuantHints& h, const GptqOverrides& o = {},
                       int64_t K = 0) {
  const TensorStore store = TensorStore::from_files({write_gptq(t, name, true, o)});
  return error_of([&] { detect_quantized_linear(store, "layer", K ? K : t.K, t.N, h); });
}

TEST(GptqErrors, QzerosOfTheWrongWidth) {
  GptqCase c;
  GptqTensors t = build_gptq(c);
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
  GptqTensors t = build_gptq(c);
  t.g_idx[17] = static_cast<int32_t>(t.G);
  expect_one_line(load_error(t, "gi_hi", hints_for(c)), "layer.g_idx");
  t.g_idx[17] = -1;
  expect_one_line(load_error(t, "gi_neg", hints_for(c)), "layer.g_idx");
  GptqTensors u = build_gptq(c);
  expect_one_line(load_error(u, "gi_len", hints_for(c), g_idx_shape({u.K / 2})), "layer.g_idx");
}

TEST(GptqErrors, QweightFitsNoBitWidth) {
  GptqCase c;
  GptqTensors t = build_gptq(c);
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
  GptqTensors t = build_gptq(c);
  expect_one_line(load_error(t, "sc", hints_for(c), scales_shape({t.G * 2, t.N / 2})), "layer.scales");
}

TEST(GptqErrors, AwqIsRejectedClearly) {
  GptqCase c;
  GptqTensors t = build_gptq(c);
  QuantHints h = hints_for(c);
  h.method = "awq";
  const std::string msg = load_error(t, "awq", h);
  expect_one_line(msg, "layer.qweight");
  EXPECT_NE(msg.find("AWQ"), std::string::npos) << msg;
}

}  // namespace
}  // namespace qf
