// Quantized layers built in memory in the published layouts (see quant_layers.h).
#include "quant_layers.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include "backends/cpu/cpu_linear.h"
#include "core/dtype.h"
#include "core/thread_pool.h"
#include "test_util.h"

namespace qf::test {

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




Exl2Tensors build_exl2(const Exl2Case& c) {
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

std::filesystem::path write_exl2(const Exl2Tensors& t, const std::string& name, const std::string& prefix) {
  const auto path = tmp_dir("exl2_" + name) / "model.safetensors";
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




// Packs 32/bits codes per word (2, 4, 8 bits) or, for 3 bits, 32 codes into 3 words the way
// AutoGPTQ's pack() does: codes 0-9 in word 0, code 10 split 2+1 bits, codes 11-20 in word 1 from
// bit 1, code 21 split 1+2 bits, codes 22-31 in word 2 from bit 2.
std::vector<uint32_t> pack_gptq(const std::vector<uint32_t>& v, int bits) {
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

GptqTensors build_gptq(const GptqCase& c) {
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
    const auto p = pack_gptq(col, c.bits);
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
    const auto p = pack_gptq(row, c.bits);
    for (int64_t j = 0; j < t.zcols; ++j) t.qzeros.push_back(static_cast<int32_t>(p[static_cast<size_t>(j)]));
  }
  if (c.bias)
    for (int64_t n = 0; n < c.N; ++n) t.bias.push_back(f32_to_fp16(0.02f * static_cast<float>(n % 5) - 0.04f));
  return t;
}

GptqOverrides qzeros_shape(std::vector<int64_t> s) { GptqOverrides o; o.qzeros_shape = std::move(s); return o; }
GptqOverrides g_idx_shape(std::vector<int64_t> s) { GptqOverrides o; o.g_idx_shape = std::move(s); return o; }
GptqOverrides qweight_shape(std::vector<int64_t> s) { GptqOverrides o; o.qweight_shape = std::move(s); return o; }
GptqOverrides scales_shape(std::vector<int64_t> s) { GptqOverrides o; o.scales_shape = std::move(s); return o; }

std::filesystem::path write_gptq(const GptqTensors& t, const std::string& name, bool write_g_idx,
                            const GptqOverrides& o) {
  const auto path = tmp_dir("gptq_" + name) / "model.safetensors";
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



// y = x W^T + b in double, the reference for the kernel.
std::vector<float> naive_linear(const std::vector<float>& w, const std::vector<float>& x, const std::vector<float>& bias,
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

void expect_one_line(const std::string& msg, const std::string& tensor) {
  EXPECT_FALSE(msg.empty()) << "no error for " << tensor;
  EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
  EXPECT_NE(msg.find("'" + tensor + "'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("model.safetensors"), std::string::npos) << msg;
}

void expect_cpu_linear_matches(const CpuLinear& lin, const std::vector<float>& w, const std::vector<float>& bias,
                               int64_t K, int64_t N, uint32_t seed) {
  ThreadPool pool(2);
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, 1.f);
  for (int64_t rows : {1, 2, 3, 4, 5, 8, 13, 17}) {
    std::vector<float> x(static_cast<size_t>(rows * K));
    for (auto& v : x) v = nd(rng);
    std::vector<float> y(static_cast<size_t>(rows * N), 12345.f);  // every output must be written
    lin.forward(x.data(), y.data(), rows, pool);
    const auto want = naive_linear(w, x, bias, rows, K, N);
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

}  // namespace qf::test
