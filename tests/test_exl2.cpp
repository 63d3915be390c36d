// EXL2 layers built in memory in the documented on-disk layout (shared/reference/exl2-format.md,
// section 1): every bit width, group size, mixed widths in one matrix, with and without the
// act-order permutation, padded columns; dequantize() checked exactly, the CPU kernel against
// dequantize() + a naive matmul; and malformed tensor sets rejected with one-line errors.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include "backends/cpu/cpu_linear.h"
#include "core/error.h"
#include "formats/exl2.h"
#include "formats/quant_linear.h"
#include "formats/safetensors.h"
#include "quant_layers.h"
#include "test_util.h"

namespace qf {
namespace {

using namespace qf::test;  // the layer builders of quant_layers.h

void check_case(const Exl2Case& c, const std::string& name) {
  SCOPED_TRACE(name);
  const Exl2Tensors t = build_exl2(c);
  const auto path = write_exl2(t, name);
  const TensorStore store = TensorStore::from_files({path});
  auto q = detect_quantized_linear(store, "layer", c.K, c.N);
  ASSERT_TRUE(q);
  EXPECT_EQ(q->format, LinearFormat::EXL2);
  EXPECT_EQ(q->in_features, c.K);
  EXPECT_EQ(q->out_features, c.N);
  // As ExLlamaV2 counts bits: weights + 4-bit scales + fp16 maxima + int16 pairs + int32 invperm.
  const size_t bits = static_cast<size_t>(t.P * t.W * 32 + t.G * ((t.W + 7) / 8) * 32 + 16 * t.G + 32 * t.G + 32 * t.K);
  EXPECT_EQ(q->storage_bytes() * 8, bits);
  EXPECT_FALSE(q->describe().empty());

  std::vector<float> w(static_cast<size_t>(c.K * c.N), -1e30f);
  q->dequantize(w.data());
  for (size_t i = 0; i < w.size(); ++i)
    ASSERT_EQ(w[i], t.expected[i]) << "weight [" << i / c.K << "][" << i % c.K << "]";

  LinearWeight lw;
  lw.name = "layer";
  lw.format = LinearFormat::EXL2;
  lw.in_features = c.K;
  lw.out_features = c.N;
  lw.quant = q;
  if (c.bias) lw.bias = store.get("layer.bias");
  auto lin = make_quant_cpu_linear(lw);
  const std::vector<float> bias = c.bias ? to_f32(store.get("layer.bias")) : std::vector<float>{};
  expect_cpu_linear_matches(*lin, w, bias, c.K, c.N, c.seed + 100);
}

std::vector<Exl2GroupSpec> uniform(int bits, int64_t K, int64_t gs) {
  std::vector<Exl2GroupSpec> g;
  for (int64_t r = 0; r < K; r += gs) g.push_back({bits, std::min(gs, K - r)});
  return g;
}

TEST(Exl2, EveryBitWidthAndGroupSize) {
  for (int bits : {2, 3, 4, 5, 6, 8})
    for (int64_t gs : {16, 32, 64, 128}) {
      if (gs == 16 && bits != 2) continue;  // only 2-bit groups may be 16 rows
      for (bool perm : {false, true}) {
        Exl2Case c;
        c.K = 256;
        c.N = 48;
        c.groups = uniform(bits, c.K, gs);
        c.permute = perm;
        c.seed = static_cast<uint32_t>(bits * 1000 + gs * 2 + perm);
        check_case(c, str("b", bits, "_g", gs, perm ? "_perm" : "_noperm"));
      }
    }
}

TEST(Exl2, MixedWidthsInOneMatrix) {
  Exl2Case c;
  c.K = 384;
  c.N = 40;
  c.groups = {{8, 32}, {6, 32}, {6, 32}, {5, 32}, {4, 64}, {3, 32}, {3, 64}, {2, 64}, {2, 32}};
  c.bias = true;
  check_case(c, "mixed");
}

TEST(Exl2, PaddedColumnsAndPartialLastGroup) {
  Exl2Case c;
  c.K = 296;  // the last 3-bit group has 40 rows: one full 32-row unit plus a partial one
  c.N = 50;
  c.pad_columns = true;
  c.groups = {{5, 128}, {4, 128}, {3, 40}};
  check_case(c, "padded");
}

TEST(Exl2, LongInputIsDecodedInChunks) {
  Exl2Case c;
  c.K = 1280;  // more than one K-chunk of the kernel
  c.N = 70;
  c.groups = uniform(4, c.K, 128);
  c.groups.front().bits = 6;
  check_case(c, "long");
}

// ---- malformed tensor sets -------------------------------------------------------------------

Exl2Tensors small_good() {
  Exl2Case c;
  c.K = 128;
  c.N = 32;
  c.groups = {{4, 64}, {3, 64}};
  return build_exl2(c);
}

std::string load_error(const Exl2Tensors& t, const std::string& name) {
  const auto path = write_exl2(t, name);
  const TensorStore store = TensorStore::from_files({path});
  return error_of([&] { detect_quantized_linear(store, "layer", t.K, t.N); });
}

TEST(Exl2Errors, GoodSmallLayerLoads) { EXPECT_EQ(load_error(small_good(), "good"), ""); }

TEST(Exl2Errors, ScaleRowsDisagreeWithGroups) {
  Exl2Tensors t = small_good();
  std::vector<int32_t> qs3(t.q_scale);
  qs3.resize(static_cast<size_t>((t.G + 1) * ((t.W + 7) / 8)));
  const auto path = test::tmp_dir("exl2_scale_rows") / "model.safetensors";
  write_safetensors(path, {{"layer.q_weight", DType::I32, {t.P, t.W}, t.q_weight.data()},
                           {"layer.q_scale", DType::I32, {t.G + 1, (t.W + 7) / 8}, qs3.data()},
                           {"layer.q_scale_max", DType::F16, {t.G}, t.q_scale_max.data()},
                           {"layer.q_groups", DType::I16, {2 * t.G}, t.q_groups.data()},
                           {"layer.q_invperm", DType::I32, {t.K}, t.q_invperm.data()}});
  const TensorStore store = TensorStore::from_files({path});
  expect_one_line(error_of([&] { detect_quantized_linear(store, "layer", t.K, t.N); }), "layer.q_scale");
}

TEST(Exl2Errors, WeightColumnsDisagreeWithLayer) {
  Exl2Tensors t = small_good();
  const auto path = write_exl2(t, "cols");
  const TensorStore store = TensorStore::from_files({path});
  expect_one_line(error_of([&] { detect_quantized_linear(store, "layer", t.K, t.N + 1); }), "layer.q_weight");
}

TEST(Exl2Errors, InvpermLengthDisagrees) {
  Exl2Tensors t = small_good();
  const auto path = test::tmp_dir("exl2_invperm_len") / "model.safetensors";
  write_safetensors(path, {{"layer.q_weight", DType::I32, {t.P, t.W}, t.q_weight.data()},
                           {"layer.q_scale", DType::I32, {t.G, (t.W + 7) / 8}, t.q_scale.data()},
                           {"layer.q_scale_max", DType::F16, {t.G}, t.q_scale_max.data()},
                           {"layer.q_groups", DType::I16, {2 * t.G}, t.q_groups.data()},
                           {"layer.q_invperm", DType::I32, {t.K - 1}, t.q_invperm.data()}});
  const TensorStore store = TensorStore::from_files({path});
  expect_one_line(error_of([&] { detect_quantized_linear(store, "layer", t.K, t.N); }), "layer.q_invperm");
}

TEST(Exl2Errors, GroupRowsDoNotAddUp) {
  {
    Exl2Tensors t = small_good();
    t.q_groups[3] = 4;  // the 4-bit group now holds 32 rows, the 3-bit one would need more words
    expect_one_line(load_error(t, "rows_a"), "layer.q_groups");
  }
  {
    Exl2Tensors t = small_good();
    const auto path = write_exl2(t, "rows_b");
    const TensorStore store = TensorStore::from_files({path});
    // The tensors describe 128 input rows; a layer of 160 does not fit.
    expect_one_line(error_of([&] { detect_quantized_linear(store, "layer", 160, t.N); }), "layer.q_invperm");
    // q_groups starting past the end of q_weight.
    Exl2Tensors u = small_good();
    u.q_groups[3] = static_cast<int16_t>(u.P + 5);
    expect_one_line(load_error(u, "rows_c"), "layer.q_groups");
    Exl2Tensors v = small_good();
    v.q_groups[1] = 1;  // first group not at packed row 0
    expect_one_line(load_error(v, "rows_d"), "layer.q_groups");
  }
}

TEST(Exl2Errors, NotAPermutation) {
  Exl2Tensors t = small_good();
  t.q_invperm[5] = t.q_invperm[6];
  expect_one_line(load_error(t, "dup"), "layer.q_invperm");
  Exl2Tensors u = small_good();
  u.q_invperm[0] = static_cast<int32_t>(u.K);
  expect_one_line(load_error(u, "range"), "layer.q_invperm");
  Exl2Tensors v = small_good();
  v.q_invperm[0] = -1;
  expect_one_line(load_error(v, "neg"), "layer.q_invperm");
}

TEST(Exl2Errors, UnknownBitWidth) {
  for (int16_t b : {7, 1, 0, 16, -4}) {
    Exl2Tensors t = small_good();
    t.q_groups[2] = b;
    expect_one_line(load_error(t, str("bits", b)), "layer.q_groups");
  }
}

TEST(Exl2Errors, WrongDtypes) {
  Exl2Tensors t = small_good();
  const auto path = test::tmp_dir("exl2_dtype") / "model.safetensors";
  std::vector<float> qw(t.q_weight.size());
  write_safetensors(path, {{"layer.q_weight", DType::F32, {t.P, t.W}, qw.data()},
                           {"layer.q_scale", DType::I32, {t.G, (t.W + 7) / 8}, t.q_scale.data()},
                           {"layer.q_scale_max", DType::F16, {t.G}, t.q_scale_max.data()},
                           {"layer.q_groups", DType::I16, {2 * t.G}, t.q_groups.data()},
                           {"layer.q_invperm", DType::I32, {t.K}, t.q_invperm.data()}});
  const TensorStore store = TensorStore::from_files({path});
  expect_one_line(error_of([&] { detect_quantized_linear(store, "layer", t.K, t.N); }), "layer.q_weight");
}

TEST(Exl2Errors, MissingTensor) {
  Exl2Tensors t = small_good();
  const auto path = test::tmp_dir("exl2_missing") / "model.safetensors";
  write_safetensors(path, {{"layer.q_weight", DType::I32, {t.P, t.W}, t.q_weight.data()},
                           {"layer.q_scale", DType::I32, {t.G, (t.W + 7) / 8}, t.q_scale.data()},
                           {"layer.q_groups", DType::I16, {2 * t.G}, t.q_groups.data()},
                           {"layer.q_invperm", DType::I32, {t.K}, t.q_invperm.data()}});
  const TensorStore store = TensorStore::from_files({path});
  const std::string msg = error_of([&] { detect_quantized_linear(store, "layer", t.K, t.N); });
  EXPECT_NE(msg.find("layer.q_scale_max"), std::string::npos) << msg;
  EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
}

}  // namespace
}  // namespace qf
