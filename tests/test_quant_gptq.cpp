// The converter's quantizer on the CPU: the inverse-Hessian factor against a direct inverse, GPTQ
// against a direct (unblocked, double precision) reference, the EXL2 packer round trip through
// the loader, and the bit accounting of the option tables.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include "backends/cpu/cpu_backend.h"
#include "core/dtype.h"
#include "formats/quant_linear.h"
#include "quant/exl2_pack.h"
#include "quant/gptq_solver.h"
#include "quant/options.h"
#include "test_util.h"

namespace qf {
namespace {

// X [rows][K] with correlated columns (a random mix of a few latent factors plus noise) and one
// column that is always zero (an input that is never active).
std::vector<float> correlated_inputs(int64_t rows, int64_t K, uint64_t seed) {
  const int64_t F = std::max<int64_t>(4, K / 3);
  const auto g = test::randn(static_cast<size_t>(rows * F), seed);
  const auto m = test::randn(static_cast<size_t>(F * K), seed + 1);
  const auto noise = test::randn(static_cast<size_t>(rows * K), seed + 2, 0.1f);
  std::vector<float> x(static_cast<size_t>(rows * K));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < K; ++k) {
      double s = noise[static_cast<size_t>(r * K + k)];
      for (int64_t f = 0; f < F; ++f) s += g[static_cast<size_t>(r * F + f)] * m[static_cast<size_t>(f * K + k)] / std::sqrt(double(F));
      x[static_cast<size_t>(r * K + k)] = k == K / 2 ? 0.f : static_cast<float>(s);
    }
  return x;
}

std::vector<double> hessian_direct(const std::vector<float>& x, int64_t rows, int64_t K) {
  std::vector<double> H(static_cast<size_t>(K * K), 0.0);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < K; ++i)
      for (int64_t j = 0; j < K; ++j) H[static_cast<size_t>(i * K + j)] += double(x[static_cast<size_t>(r * K + i)]) * x[static_cast<size_t>(r * K + j)];
  return H;
}

// Inverse by Gauss-Jordan with partial pivoting (double).
std::vector<double> inverse_direct(std::vector<double> A, int64_t K) {
  std::vector<double> I(static_cast<size_t>(K * K), 0.0);
  for (int64_t i = 0; i < K; ++i) I[static_cast<size_t>(i * K + i)] = 1.0;
  for (int64_t c = 0; c < K; ++c) {
    int64_t p = c;
    for (int64_t r = c + 1; r < K; ++r)
      if (std::fabs(A[static_cast<size_t>(r * K + c)]) > std::fabs(A[static_cast<size_t>(p * K + c)])) p = r;
    for (int64_t j = 0; j < K; ++j) {
      std::swap(A[static_cast<size_t>(c * K + j)], A[static_cast<size_t>(p * K + j)]);
      std::swap(I[static_cast<size_t>(c * K + j)], I[static_cast<size_t>(p * K + j)]);
    }
    const double d = A[static_cast<size_t>(c * K + c)];
    for (int64_t j = 0; j < K; ++j) {
      A[static_cast<size_t>(c * K + j)] /= d;
      I[static_cast<size_t>(c * K + j)] /= d;
    }
    for (int64_t r = 0; r < K; ++r) {
      if (r == c) continue;
      const double f = A[static_cast<size_t>(r * K + c)];
      if (f == 0) continue;
      for (int64_t j = 0; j < K; ++j) {
        A[static_cast<size_t>(r * K + j)] -= f * A[static_cast<size_t>(c * K + j)];
        I[static_cast<size_t>(r * K + j)] -= f * I[static_cast<size_t>(c * K + j)];
      }
    }
  }
  return I;
}

TEST(GptqQuantizer, HessianAndInverseFactorMatchADirectInverse) {
  CpuBackend b(2);
  const int64_t K = 48, rows = 300;
  const auto x = correlated_inputs(rows, K, 7);
  std::vector<float> H(static_cast<size_t>(K * K), 0.f);
  b.hessian_accumulate(H.data(), x.data(), 200, K);            // in two calls, as the converter does
  b.hessian_accumulate(H.data(), x.data() + 200 * K, rows - 200, K);
  const auto Hd = hessian_direct(x, rows, K);
  for (size_t i = 0; i < H.size(); ++i) ASSERT_NEAR(H[i], Hd[i], 1e-4 * (1 + std::fabs(Hd[i])));

  std::vector<int32_t> perm(static_cast<size_t>(K));
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), std::mt19937(3));
  const double damp = 0.01 * Hd[0];
  std::vector<float> U(static_cast<size_t>(K * K), -1.f);
  ASSERT_TRUE(b.gptq_inverse_factor(H.data(), perm, K, damp, U.data()));
  const auto Ainv = inverse_direct(test::damped(Hd, perm, K, damp), K);
  double err = 0, ref = 0;
  for (int64_t i = 0; i < K; ++i)
    for (int64_t j = 0; j < K; ++j) {
      if (j < i) ASSERT_EQ(U[static_cast<size_t>(i * K + j)], 0.f) << "U must be upper triangular";
      double s = 0;  // (U^T U)[i][j]
      for (int64_t k = 0; k <= std::min(i, j); ++k) s += double(U[static_cast<size_t>(k * K + i)]) * U[static_cast<size_t>(k * K + j)];
      err += (s - Ainv[static_cast<size_t>(i * K + j)]) * (s - Ainv[static_cast<size_t>(i * K + j)]);
      ref += Ainv[static_cast<size_t>(i * K + j)] * Ainv[static_cast<size_t>(i * K + j)];
    }
  // fp32 factor against a double inverse: ~1e-5 with -march=native, a little more without FMA.
  EXPECT_LT(std::sqrt(err / ref), 4e-5);
  for (int64_t i = 0; i < K; ++i) EXPECT_GT(U[static_cast<size_t>(i * K + i)], 0.f);

  // Not positive definite: false, never a throw.
  std::vector<float> neg(static_cast<size_t>(K * K), 0.f);
  for (int64_t i = 0; i < K; ++i) neg[static_cast<size_t>(i * K + i)] = -1.f;
  EXPECT_FALSE(b.gptq_inverse_factor(neg.data(), perm, K, 0.0, U.data()));
}

// EXL2's scale search and rounding, written directly from quant_ops.h.
struct GroupScales {
  std::vector<int> qs;
  float smax16 = 0;
};
GroupScales search_scales(const std::vector<double>& W, int64_t N, int64_t a, int64_t b, int bits, const ScaleSearch& ss) {
  const float maxq = float((1 << bits) - 1), z = float(1 << (bits - 1));
  std::vector<float> base(static_cast<size_t>(N));
  for (int64_t n = 0; n < N; ++n) {
    float m = 0;
    for (int64_t r = a; r < b; ++r) m = std::max(m, std::fabs(float(W[static_cast<size_t>(r * N + n)])));
    base[static_cast<size_t>(n)] = (m + 1e-12f) / (maxq / 2);
  }
  const float smax = *std::max_element(base.begin(), base.end());
  GroupScales g;
  for (int64_t n = 0; n < N; ++n) g.qs.push_back(int(std::clamp(std::rint(16.f * std::sqrt(base[static_cast<size_t>(n)] / smax)), 1.f, 16.f)));
  int best = 0;
  double best_e = 0;
  for (int p = 0; p <= ss.p_grid; ++p) {
    const float mult = ss.p_min + float(p) * (ss.p_max - ss.p_min) / float(ss.p_grid);
    double e = 0;
    for (int64_t r = a; r < b; ++r)
      for (int64_t n = 0; n < N; ++n) {
        const float s = exl2_scale(g.qs[static_cast<size_t>(n)], smax * mult), w = float(W[static_cast<size_t>(r * N + n)]);
        const float q = std::clamp(std::rint(w / s) + z, 0.f, maxq);
        e += std::pow(std::fabs(double(w - (q - z) * s)), 3.5);
      }
    if (p == 0 || e < best_e) best = p, best_e = e;
  }
  g.smax16 = fp16_to_f32(f32_to_fp16(smax * (ss.p_min + float(best) * (ss.p_max - ss.p_min) / float(ss.p_grid))));
  return g;
}

// Textbook GPTQ in double: every row's error goes to every later row at once (no blocks).
struct DirectResult {
  std::vector<int> codes;
  std::vector<double> deq;
};
DirectResult gptq_direct(std::vector<double> W, const std::vector<double>& U, int64_t K, int64_t N,
                         const std::vector<GptqGroup>& groups, const ScaleSearch& ss) {
  DirectResult out;
  out.codes.assign(static_cast<size_t>(K * N), 0);
  out.deq.assign(static_cast<size_t>(K * N), 0);
  int64_t a = 0;
  for (const auto& g : groups) {
    const GroupScales sc = search_scales(W, N, a, a + g.rows, g.bits, ss);
    const float maxq = float((1 << g.bits) - 1), z = float(1 << (g.bits - 1));
    for (int64_t r = a; r < a + g.rows; ++r)
      for (int64_t n = 0; n < N; ++n) {
        const float s = exl2_scale(sc.qs[static_cast<size_t>(n)], sc.smax16);
        const float q = std::clamp(std::rint(float(W[static_cast<size_t>(r * N + n)]) / s) + z, 0.f, maxq);
        const double dq = double((q - z) * s);
        const double e = (W[static_cast<size_t>(r * N + n)] - dq) / U[static_cast<size_t>(r * K + r)];
        out.codes[static_cast<size_t>(r * N + n)] = int(q);
        out.deq[static_cast<size_t>(r * N + n)] = dq;
        for (int64_t r2 = r; r2 < K; ++r2) W[static_cast<size_t>(r2 * N + n)] -= e * U[static_cast<size_t>(r * K + r2)];
      }
    a += g.rows;
  }
  return out;
}

// Proxy loss of GPTQ: trace((W - Q) A (W - Q)^T) over rows in processing order.
double proxy_loss(const std::vector<double>& W, const std::vector<double>& Q, const std::vector<double>& A, int64_t K, int64_t N) {
  double loss = 0;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t i = 0; i < K; ++i) {
      const double di = W[static_cast<size_t>(i * N + n)] - Q[static_cast<size_t>(i * N + n)];
      if (di == 0) continue;
      for (int64_t j = 0; j < K; ++j)
        loss += di * A[static_cast<size_t>(i * K + j)] * (W[static_cast<size_t>(j * N + n)] - Q[static_cast<size_t>(j * N + n)]);
    }
  return loss;
}

struct GptqCase {
  int64_t K, N;
  std::vector<int32_t> perm;
  std::vector<double> A;         // permuted, damped Hessian
  std::vector<float> U;
  std::vector<double> W;         // [K][N], processing order
};

GptqCase make_setup(CpuBackend& b, int64_t K, int64_t N, uint64_t seed) {
  GptqCase s;
  s.K = K;
  s.N = N;
  const int64_t rows = 4 * K;
  const auto x = correlated_inputs(rows, K, seed);
  std::vector<float> H(static_cast<size_t>(K * K), 0.f);
  b.hessian_accumulate(H.data(), x.data(), rows, K);
  std::vector<float> diag = b.matrix_diagonal(H.data(), K);
  s.perm.resize(static_cast<size_t>(K));
  std::iota(s.perm.begin(), s.perm.end(), 0);
  std::stable_sort(s.perm.begin(), s.perm.end(), [&](int x1, int x2) { return diag[static_cast<size_t>(x1)] > diag[static_cast<size_t>(x2)]; });
  double mean = 0;
  for (float d : diag) mean += d == 0 ? 1 : d;
  const double damp = 0.01 * mean / double(K);
  std::vector<double> Hd(H.begin(), H.end());
  s.A = test::damped(Hd, s.perm, K, damp);
  s.U.assign(static_cast<size_t>(K * K), 0.f);
  EXPECT_TRUE(b.gptq_inverse_factor(H.data(), s.perm, K, damp, s.U.data()));
  const auto w = test::randn(static_cast<size_t>(K * N), seed + 9, 0.05f);
  s.W.assign(w.begin(), w.end());
  return s;
}

TEST(GptqQuantizer, MatchesADirectReferenceAndBeatsRounding) {
  CpuBackend b(2);
  const ScaleSearch ss;
  struct Case {
    int64_t K, N;
    std::vector<GptqGroup> groups;
  };
  const std::vector<Case> cases = {
      {96, 40, {{8, 32}, {4, 32}, {2, 32}}},
      {200, 70, {{6, 32}, {5, 32}, {4, 64}, {3, 64}, {2, 8}}},  // a small last group
      {128, 33, {{4, 64}, {4, 64}}},
  };
  for (const auto& c : cases) {
    GptqCase s = make_setup(b, c.K, c.N, 11 + static_cast<uint64_t>(c.K));
    std::vector<float> Wf(s.W.begin(), s.W.end());
    const GptqCodes codes = b.gptq_quantize(Wf.data(), s.U.data(), c.K, c.N, c.groups, ss);
    std::vector<double> Ud(s.U.begin(), s.U.end());
    const DirectResult ref = gptq_direct(s.W, Ud, c.K, c.N, c.groups, ss);
    int64_t same = 0;
    for (int64_t i = 0; i < c.K * c.N; ++i) same += codes.q[static_cast<size_t>(i)] == ref.codes[static_cast<size_t>(i)];
    EXPECT_GE(double(same) / double(c.K * c.N), 0.99) << "K=" << c.K;
    const std::vector<double> Q(Wf.begin(), Wf.end());
    const double loss = proxy_loss(s.W, Q, s.A, c.K, c.N), loss_ref = proxy_loss(s.W, ref.deq, s.A, c.K, c.N);
    EXPECT_NEAR(loss, loss_ref, 0.01 * loss_ref) << "K=" << c.K;

    // Round to nearest with the same group scales: GPTQ must do clearly better on the proxy loss.
    std::vector<double> rtn(s.W.size());
    int64_t a = 0;
    for (const auto& g : c.groups) {
      const GroupScales sc = search_scales(s.W, c.N, a, a + g.rows, g.bits, ss);
      const float maxq = float((1 << g.bits) - 1), z = float(1 << (g.bits - 1));
      for (int64_t r = a; r < a + g.rows; ++r)
        for (int64_t n = 0; n < c.N; ++n) {
          const float sc_n = exl2_scale(sc.qs[static_cast<size_t>(n)], sc.smax16);
          const float q = std::clamp(std::rint(float(s.W[static_cast<size_t>(r * c.N + n)]) / sc_n) + z, 0.f, maxq);
          rtn[static_cast<size_t>(r * c.N + n)] = double((q - z) * sc_n);
        }
      a += g.rows;
    }
    EXPECT_LT(loss, 0.8 * proxy_loss(s.W, rtn, s.A, c.K, c.N)) << "K=" << c.K;
  }
}

TEST(GptqQuantizer, ResultsDoNotDependOnTheThreadCount) {
  std::vector<std::vector<uint8_t>> runs;
  for (int threads : {1, 2, 3}) {
    CpuBackend b(threads);
    GptqCase s = make_setup(b, 160, 130, 5);
    std::vector<float> Wf(s.W.begin(), s.W.end());
    runs.push_back(b.gptq_quantize(Wf.data(), s.U.data(), 160, 130, {{5, 64}, {4, 64}, {3, 32}}, ScaleSearch{}).q);
  }
  EXPECT_EQ(runs[0], runs[1]);
  EXPECT_EQ(runs[0], runs[2]);
  ThreadPool::set_global_threads(0);
}

// pack -> our loader -> dequantize gives back exactly the weights GPTQ left in W.
TEST(Exl2Pack, RoundTripsThroughTheLoader) {
  CpuBackend b(2);
  struct Case {
    int64_t K, N;
    const char* spec;
    bool bias;
  };
  const std::vector<Case> cases = {
      {256, 64, "0.05:8b_32g/0.1:6b_32g/0.1:5b_32g/0.25:4b_64g/0.25:3b_64g/0.25:2b_64g", false},
      {172, 100, "0.1:3b_64g/0.9:2b_64g", true},  // stories260K's down_proj: a partial last group
      {128, 256, "1:8b_128g", false},
      {96, 40, "0.3:6b_32g/0.7:5b_32g", false},
  };
  for (const auto& c : cases) {
    const LinearSpec spec = LinearSpec::parse(c.spec);
    const auto x = correlated_inputs(3 * c.K, c.K, 21);
    std::vector<float> H(static_cast<size_t>(c.K * c.K), 0.f);
    b.hessian_accumulate(H.data(), x.data(), 3 * c.K, c.K);
    const auto wv = test::randn(static_cast<size_t>(c.N * c.K), 4, 0.02f);
    std::vector<uint16_t> w16(wv.size());
    for (size_t i = 0; i < wv.size(); ++i) w16[i] = f32_to_fp16(wv[i]);
    std::vector<uint16_t> b16(static_cast<size_t>(c.N));
    for (int64_t n = 0; n < c.N; ++n) b16[static_cast<size_t>(n)] = f32_to_fp16(0.01f * float(n));
    LinearWeight w;
    w.name = "layer";
    w.in_features = c.K;
    w.out_features = c.N;
    w.weight.dtype = DType::F16;
    w.weight.shape = {c.N, c.K};
    w.weight.data = w16.data();
    std::optional<TensorView> bias;
    if (c.bias) bias = TensorView{DType::F16, {c.N}, b16.data(), nullptr};

    GptqSolver solver(b, H.data(), c.K, 0.01, "test input");
    std::vector<float> W;
    auto packed = solver.quantize(solver.arrange(w), c.N, spec, bias, ScaleSearch{}, &W);
    const LinearWeight lw = exl2_linear(packed, "layer");
    EXPECT_EQ(static_cast<int64_t>(lw.storage_bytes() * 8 - (c.bias ? 16 * c.N : 0)), spec.storage_bits(c.K, c.N)) << c.spec;
    std::vector<float> deq(static_cast<size_t>(c.N * c.K));
    lw.quant->dequantize(deq.data());
    for (int64_t i = 0; i < c.K; ++i)
      for (int64_t n = 0; n < c.N; ++n)
        ASSERT_EQ(deq[static_cast<size_t>(n * c.K + solver.perm()[static_cast<size_t>(i)])], W[static_cast<size_t>(i * c.N + n)])
            << c.spec << " row " << i << " col " << n;
    if (c.bias) EXPECT_EQ(packed->bias, b16);
  }
}

TEST(QuantOptions, DescriptionsParseAndBitsAreExact) {
  const LinearSpec s = LinearSpec::parse("0.05:8b_32g/0.95:4b_128g");
  EXPECT_EQ(s.describe(), "0.05:8b_32g/0.95:4b_128g");
  EXPECT_EQ(LinearSpec::from_qparams(s.to_qparams(), "x"), s);
  // 4096 rows: 8-bit part 205 rows -> 7 groups of 32 = 224 rows, the rest 4-bit in groups of 128.
  const auto g = s.groups(4096);
  EXPECT_EQ(g.front().bits, 8);
  int64_t rows8 = 0, total = 0;
  for (const auto& x : g) total += x.rows, rows8 += x.bits == 8 ? x.rows : 0;
  EXPECT_EQ(rows8, 224);
  EXPECT_EQ(total, 4096);
  // Uniform 4-bit g128 on a 4096 x 4096 layer: ExLlamaV2 counts 4.039 bpw (exl2-format.md 1.6).
  EXPECT_NEAR(double(LinearSpec::parse("1:4b_128g").storage_bits(4096, 4096)) / (4096.0 * 4096.0), 4.039, 0.001);
  // Head -hb 6 on 4096 x 32000: 6.345 bpw.
  EXPECT_NEAR(double(head_spec(6).storage_bits(4096, 32000)) / (4096.0 * 32000.0), 6.345, 0.01);
  for (const char* bad : {"", "1:7b_128g", "0.5:4b_128g", "1:4b_100g", "0.5:3b_64g/0.5:4b_64g", "1:4b_128gx", "junk"})
    test::expect_error([&] { LinearSpec::parse(bad); }, "mix");
  test::expect_error([] { head_spec(7); }, "--head-bits 7");
  for (BlockKind k : {BlockKind::Attention, BlockKind::Mlp}) {
    const auto& opts = block_options(k);
    ASSERT_GE(opts.size(), 15u);
    for (const auto& o : opts) EXPECT_EQ(o.specs.size(), block_projections(k).size());
  }
}

}  // namespace
}  // namespace qf
