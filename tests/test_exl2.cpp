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
#include "test_util.h"

namespace qf {
namespace {

// Values per packing unit for each width (pack_columns_kernel): 16 2-bit codes in 1 word, 32 3-bit
// codes in 3, 8 4-bit in 1, 32 5-bit in 5, 16 6-bit in 3, 4 8-bit in 1.
int unit_values(int bits) {
  switch (bits) {
    case 2: return 16;
    case 3: return 32;
    case 4: return 8;
    case 5: return 32;
    case 6: return 16;
    default: return 4;
  }
}

uint32_t wshift(uint32_t x, int j) {
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
  bool permute = true;
  bool pad_columns = false;  // q_weight padded to a multiple of 32 columns
  bool bias = false;
  uint32_t seed = 1;
};

// The tensors of one layer, plus the weights they must decode to ([N][K], original row order).
struct Exl2Tensors {
  int64_t K = 0, N = 0, W = 0, P = 0, G = 0;
  std::vector<int32_t> q_weight, q_scale, q_invperm;
  std::vector<uint16_t> q_scale_max, bias;
  std::vector<int16_t> q_groups;
  std::vector<float> expected;
};

Exl2Tensors build(const Exl2Case& c) {
  Exl2Tensors t;
  t.K = c.K;
  t.N = c.N;
  t.W = c.pad_columns ? (c.N + 31) / 32 * 32 : c.N;
  t.G = static_cast<int64_t>(c.groups.size());
  std::mt19937 rng(c.seed);
  // Permutation: stored row j holds input feature perm[j]; q_invperm = argsort(perm).
  std::vector<int32_t> perm(static_cast<size_t>(c.K));
  std::iota(perm.begin(), perm.end(), 0);
  if (c.permute) std::shuffle(perm.begin(), perm.end(), rng);
  t.q_invperm.assign(static_cast<size_t>(c.K), 0);
  for (int64_t j = 0; j < c.K; ++j) t.q_invperm[static_cast<size_t>(perm[static_cast<size_t>(j)])] = static_cast<int32_t>(j);

  // Packed rows per group: whole packing units (the last group may end in a partial unit).
  std::vector<int64_t> words(c.groups.size());
  for (size_t g = 0; g < c.groups.size(); ++g) {
    const int b = c.groups[g].bits, u = unit_values(b);
    words[g] = (c.groups[g].rows + u - 1) / u * (u * b / 32);
    t.P += words[g];
  }
  t.q_weight.assign(static_cast<size_t>(t.P * t.W), 0);
  t.q_scale.assign(static_cast<size_t>(t.G * ((t.W + 7) / 8)), 0);
  t.expected.assign(static_cast<size_t>(c.K * c.N), 0.f);
  int64_t row = 0, word = 0;
  for (size_t g = 0; g < c.groups.size(); ++g) {
    const int b = c.groups[g].bits, u = unit_values(b), wpu = u * b / 32;
    const int64_t rows = c.groups[g].rows;
    t.q_groups.push_back(static_cast<int16_t>(b));
    t.q_groups.push_back(static_cast<int16_t>(word));
    const float smax = std::uniform_real_distribution<float>(0.001f, 0.02f)(rng);
    t.q_scale_max.push_back(f32_to_fp16(smax));
    const float smax16 = fp16_to_f32(t.q_scale_max.back());
    std::vector<int> qs(static_cast<size_t>(t.W));
    for (int64_t n = 0; n < t.W; ++n) {
      qs[static_cast<size_t>(n)] = static_cast<int>(rng() % 16);
      t.q_scale[static_cast<size_t>(static_cast<int64_t>(g) * ((t.W + 7) / 8) + n / 8)] |=
          static_cast<int32_t>(static_cast<uint32_t>(qs[static_cast<size_t>(n)]) << (4 * (n % 8)));
    }
    // Codes for every (row, column); padded columns hold 2^(b-1) (zero), as the converter writes.
    const int64_t units = (rows + u - 1) / u;
    for (int64_t n = 0; n < t.W; ++n) {
      const double s = static_cast<double>((qs[static_cast<size_t>(n)] + 1) * (qs[static_cast<size_t>(n)] + 1)) *
                       static_cast<double>(smax16) / 256.0;
      for (int64_t un = 0; un < units; ++un) {
        uint32_t packed[5] = {0, 0, 0, 0, 0};
        for (int i = 0; i < u; ++i) {
          const int64_t r = un * u + i;
          uint32_t q = 0;
          if (r < rows) {
            q = n < c.N ? rng() % (1u << b) : (1u << (b - 1));
            if (n < c.N) {
              const int64_t k = perm[static_cast<size_t>(row + r)];
              t.expected[static_cast<size_t>(n * c.K + k)] =
                  static_cast<float>(static_cast<double>(static_cast<int>(q) - (1 << (b - 1))) * s);
            }
          }
          for (int w = 0; w < wpu; ++w) packed[w] |= wshift(q, i * b - 32 * w);
        }
        for (int w = 0; w < wpu; ++w)
          t.q_weight[static_cast<size_t>((word + un * wpu + w) * t.W + n)] = static_cast<int32_t>(packed[w]);
      }
    }
    row += rows;
    word += words[g];
  }
  EXPECT_EQ(row, c.K) << "test case groups must add up to K";
  if (c.bias)
    for (int64_t n = 0; n < c.N; ++n) t.bias.push_back(f32_to_fp16(0.01f * static_cast<float>(n % 7) - 0.03f));
  return t;
}

std::filesystem::path write(const Exl2Tensors& t, const std::string& name, const std::string& prefix = "layer") {
  const auto path = test::tmp_dir("exl2_" + name) / "model.safetensors";
  std::vector<TensorToWrite> ts = {
      {prefix + ".q_weight", DType::I32, {t.P, t.W}, t.q_weight.data()},
      {prefix + ".q_scale", DType::I32, {t.G, (t.W + 7) / 8}, t.q_scale.data()},
      {prefix + ".q_scale_max", DType::F16, {t.G}, t.q_scale_max.data()},
      {prefix + ".q_groups", DType::I16, {2 * t.G}, t.q_groups.data()},
      {prefix + ".q_invperm", DType::I32, {t.K}, t.q_invperm.data()},
  };
  if (!t.bias.empty()) ts.push_back({prefix + ".bias", DType::F16, {t.N}, t.bias.data()});
  write_safetensors(path, ts);
  return path;
}

// y = x W^T + b in double, the reference for the kernel.
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

void check_case(const Exl2Case& c, const std::string& name) {
  SCOPED_TRACE(name);
  const Exl2Tensors t = build(c);
  const auto path = write(t, name);
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
  std::vector<float> bias = c.bias ? to_f32(store.get("layer.bias")) : std::vector<float>{};
  ThreadPool pool(2);
  std::mt19937 rng(c.seed + 100);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (int64_t rows : {1, 2, 3, 4, 5, 8, 13, 17}) {
    std::vector<float> x(static_cast<size_t>(rows * c.K));
    for (auto& v : x) v = nd(rng);
    std::vector<float> y(static_cast<size_t>(rows * c.N), 12345.f);
    lin->forward(x.data(), y.data(), rows, pool);
    const auto want = naive(w, x, bias, rows, c.K, c.N);
    double num = 0, den = 0, worst = 0;
    for (size_t i = 0; i < y.size(); ++i) {
      num += (y[i] - want[i]) * static_cast<double>(y[i] - want[i]);
      den += static_cast<double>(want[i]) * want[i];
      worst = std::max(worst, std::abs(static_cast<double>(y[i]) - want[i]));
    }
    EXPECT_LT(std::sqrt(num / den), 1e-4) << "rows " << rows;
    EXPECT_LT(worst, 1e-4 * std::sqrt(den / static_cast<double>(y.size())) * 10) << "rows " << rows;
  }
}

std::vector<GroupSpec> uniform(int bits, int64_t K, int64_t gs) {
  std::vector<GroupSpec> g;
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

template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

Exl2Tensors small_good() {
  Exl2Case c;
  c.K = 128;
  c.N = 32;
  c.groups = {{4, 64}, {3, 64}};
  return build(c);
}

std::string load_error(const Exl2Tensors& t, const std::string& name) {
  const auto path = write(t, name);
  const TensorStore store = TensorStore::from_files({path});
  return error_of([&] { detect_quantized_linear(store, "layer", t.K, t.N); });
}

void expect_one_line(const std::string& msg, const std::string& tensor) {
  EXPECT_FALSE(msg.empty()) << "no error for " << tensor;
  EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
  EXPECT_NE(msg.find("'" + tensor + "'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("model.safetensors"), std::string::npos) << msg;
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
  const auto path = write(t, "cols");
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
    const auto path = write(t, "rows_b");
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
