// Every CUDA backend operation against the CPU backend on random inputs, odd shapes included.
// Skips when built without CUDA or when no CUDA device is present.
#include <gtest/gtest.h>

#include <algorithm>
#include <limits>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "backends/cpu/cpu_backend.h"
#include "backends/sampler.h"
#include "core/dtype.h"
#include "backends/random_weights.h"
#include "core/error.h"
#include "test_util.h"
#ifdef QFORGE_HAVE_CUDA
#include "backends/cuda/cuda_backend.h"
#endif

namespace qf {
namespace {


using test::randn;

[[maybe_unused]] double rel_err(const std::vector<float>& a, const std::vector<float>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i])) return INFINITY;
    num += (a[i] - ref[i]) * double(a[i] - ref[i]);
    den += double(ref[i]) * ref[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

#ifdef QFORGE_HAVE_CUDA

// Host data on either backend: upload/download through the Backend interface.
struct Pair {
  CpuBackend cpu{2};
  std::unique_ptr<CudaBackend> gpu = std::make_unique<CudaBackend>(0);

  struct Buf {
    DeviceBuffer c, g;
  };
  Buf make(const std::vector<float>& host) {
    Buf b{cpu.alloc(host.size()), gpu->alloc(host.size())};
    cpu.upload(b.c.data(), host.data(), host.size());
    gpu->upload(b.g.data(), host.data(), host.size());
    return b;
  }
  Buf zeros(size_t n) { return make(std::vector<float>(n, std::nanf(""))); }  // poisoned
  std::vector<float> get_c(const Buf& b) {
    std::vector<float> h(b.c.size());
    cpu.download(h.data(), b.c.data(), h.size());
    return h;
  }
  std::vector<float> get_g(const Buf& b) {
    std::vector<float> h(b.g.size());
    gpu->download(h.data(), b.g.data(), h.size());
    return h;
  }
};

std::vector<uint16_t> to_dtype(const std::vector<float>& v, DType dt) {
  std::vector<uint16_t> o(v.size());
  for (size_t i = 0; i < v.size(); ++i) o[i] = dt == DType::F16 ? f32_to_fp16(v[i]) : f32_to_bf16(v[i]);
  return o;
}

TEST(GpuKernels, RmsNorm) {
  QF_REQUIRE_GPU();
  Pair P;
  for (int64_t dim : {64, 172, 4096, 8}) {
    for (int64_t rows : {1, 7}) {
      auto x = P.make(randn(rows * dim, 1 + dim + rows));
      auto w = P.make(randn(dim, 2 + dim));
      auto o = P.zeros(rows * dim);
      P.cpu.rmsnorm(x.c.data(), w.c.data(), o.c.data(), rows, dim, 1e-5f);
      P.gpu->rmsnorm(x.g.data(), w.g.data(), o.g.data(), rows, dim, 1e-5f);
      EXPECT_LT(rel_err(P.get_g(o), P.get_c(o)), 1e-5) << dim << " " << rows;
    }
  }
}

TEST(GpuKernels, LinearAllDtypesAndShapes) {
  QF_REQUIRE_GPU();
  Pair P;
  struct Shape { int64_t in, out; };
  for (DType dt : {DType::F16, DType::BF16, DType::F32}) {
    for (Shape s : {Shape{64, 172}, Shape{172, 64}, Shape{64, 64}, Shape{4096, 300}, Shape{11008, 40}, Shape{13, 9}}) {
      for (bool with_bias : {false, true}) {
        auto wf = randn(s.in * s.out, 7 + s.in, 1.f / std::sqrt(float(s.in)));
        std::vector<uint16_t> wh;
        LinearWeight lw;
        lw.name = "test";
        lw.in_features = s.in;
        lw.out_features = s.out;
        if (dt == DType::F32) {
          lw.weight = TensorView{dt, {s.out, s.in}, wf.data(), nullptr};
        } else {
          wh = to_dtype(wf, dt);
          lw.weight = TensorView{dt, {s.out, s.in}, wh.data(), nullptr};
        }
        auto bias = randn(s.out, 99);
        if (with_bias) lw.bias = TensorView{DType::F32, {s.out}, bias.data(), nullptr};
        auto lc = P.cpu.make_linear(lw);
        auto lg = P.gpu->make_linear(lw);
        for (int64_t rows : {1, 7, 33}) {
          auto x = P.make(randn(rows * s.in, 3 + rows));
          auto y = P.zeros(rows * s.out);
          P.cpu.linear(*lc, x.c.data(), y.c.data(), rows);
          P.gpu->linear(*lg, x.g.data(), y.g.data(), rows);
          // Several rows round the activations to the weight dtype before the tensor cores.
          const double tol = rows == 1 || dt == DType::F32 ? 2e-5 : (dt == DType::F16 ? 2e-3 : 1e-2);
          EXPECT_LT(rel_err(P.get_g(y), P.get_c(y)), tol)
              << dtype_name(dt) << " in=" << s.in << " out=" << s.out << " rows=" << rows << " bias=" << with_bias;
        }
      }
    }
  }
}

TEST(GpuKernels, FusedLinearDenseMatchesHost) {
  QF_REQUIRE_GPU();
  Pair P;
  using In = FusedLinear::Input;
  using Out = FusedLinear::Output;
  struct Set { int64_t K; std::vector<int64_t> N; bool bias; };
  uint64_t seed = 1;
  for (DType dt : {DType::F16, DType::BF16, DType::F32})
    for (const Set& set : {Set{256, {256, 64, 64}, true}, Set{4096, {300, 300}, false}, Set{13, {9, 9}, true},
                           Set{1000, {77}, false}}) {
      std::vector<std::vector<float>> W, B;
      std::vector<std::vector<uint16_t>> keep;
      std::vector<std::unique_ptr<DeviceLinear>> dev;
      std::vector<const DeviceLinear*> ws;
      for (int64_t N : set.N) {
        W.push_back(randn(static_cast<size_t>(N * set.K), seed++, 1.f / std::sqrt(float(set.K))));
        B.push_back(set.bias ? randn(static_cast<size_t>(N), seed++, 0.1f) : std::vector<float>{});
        if (dt != DType::F32) {
          keep.push_back(to_dtype(W.back(), dt));
          for (size_t i = 0; i < W.back().size(); ++i)  // the host reference uses the rounded weights
            W.back()[i] = dt == DType::F16 ? fp16_to_f32(keep.back()[i]) : bf16_to_f32(keep.back()[i]);
        }
        LinearWeight lw;
        lw.name = "fused";
        lw.in_features = set.K;
        lw.out_features = N;
        lw.weight = TensorView{dt, {N, set.K}, dt == DType::F32 ? static_cast<void*>(W.back().data()) : keep.back().data(), nullptr};
        if (set.bias) lw.bias = TensorView{DType::F32, {N}, B.back().data(), nullptr};
        dev.push_back(P.gpu->make_linear(lw));
        ws.push_back(dev.back().get());
      }
      for (In in : {In::Plain, In::RmsNorm})
        for (Out out : {Out::Store, Out::Accumulate, Out::SwiGLU}) {
          if (out == Out::SwiGLU && (set.N.size() != 2 || set.N[0] != set.N[1])) continue;
          // One row: the GEMV (fp32 x); more: cuBLAS with x converted once to the weights' type.
          for (int64_t rows : {1, 5, 70}) {
            SCOPED_TRACE(str(dtype_name(dt), " K ", set.K, " matrices ", set.N.size(), " input ", static_cast<int>(in),
                             " output ", static_cast<int>(out), " rows ", rows));
            const double tol = rows == 1 || dt == DType::F32 ? 2e-5 : dt == DType::F16 ? 1e-3 : 6e-3;
            test::expect_fused_linear_matches(*P.gpu, ws, W, B, in, out, seed++, tol, rows);
          }
        }
    }
}

TEST(GpuKernels, EmbedSiluAddCopyRows) {
  QF_REQUIRE_GPU();
  Pair P;
  for (DType dt : {DType::F16, DType::F32, DType::BF16}) {
    const int64_t vocab = 100, dim = 72;
    auto tf = randn(vocab * dim, 5);
    std::vector<uint16_t> th = dt == DType::F32 ? std::vector<uint16_t>{} : to_dtype(tf, dt);
    TensorView tv{dt, {vocab, dim}, dt == DType::F32 ? static_cast<const void*>(tf.data()) : th.data(), nullptr};
    auto ec = P.cpu.make_embedding(tv);
    auto eg = P.gpu->make_embedding(tv);
    std::vector<int32_t> ids = {0, 99, 5, 5, 42, 7, 1};
    auto o = P.zeros(ids.size() * dim);
    P.cpu.embed(*ec, ids.data(), 7, o.c.data());
    P.gpu->embed(*eg, ids.data(), 7, o.g.data());
    EXPECT_EQ(P.get_g(o), P.get_c(o));
    std::vector<int32_t> bad = {100};
    EXPECT_THROW(P.gpu->embed(*eg, bad.data(), 1, o.g.data()), Error);
  }
  for (int64_t n : {1, 172, 7 * 172, 100003}) {
    auto g = P.make(randn(n, 11, 3.f));
    auto u = P.make(randn(n, 12));
    auto o = P.zeros(n);
    P.cpu.silu_mul(g.c.data(), u.c.data(), o.c.data(), n);
    P.gpu->silu_mul(g.g.data(), u.g.data(), o.g.data(), n);
    EXPECT_LT(rel_err(P.get_g(o), P.get_c(o)), 1e-5);
    P.cpu.add(g.c.data(), u.c.data(), n);
    P.gpu->add(g.g.data(), u.g.data(), n);
    EXPECT_EQ(P.get_g(g), P.get_c(g));
  }
  auto src = P.make(randn(7 * 64, 13));
  auto dst = P.zeros(3 * 64);
  P.cpu.copy_rows(src.c.data(), 4, 3, 64, dst.c.data());
  P.gpu->copy_rows(src.g.data(), 4, 3, 64, dst.g.data());
  EXPECT_EQ(P.get_g(dst), P.get_c(dst));
}

RopeTables make_rope(int64_t max_pos, int64_t head_dim) {
  RopeTables t;
  t.max_pos = max_pos;
  t.half_dim = head_dim / 2;
  for (int64_t p = 0; p < max_pos; ++p)
    for (int64_t i = 0; i < t.half_dim; ++i) {
      const double f = std::pow(10000.0, -2.0 * i / head_dim);
      t.cos.push_back(static_cast<float>(std::cos(p * f)));
      t.sin.push_back(static_cast<float>(std::sin(p * f)));
    }
  return t;
}

TEST(GpuKernels, Rope) {
  QF_REQUIRE_GPU();
  Pair P;
  for (int64_t hd : {8, 64, 128}) {
    auto t = make_rope(64, hd);
    P.cpu.set_rope_tables(t);
    P.gpu->set_rope_tables(t);
    for (int64_t rows : {1, 7}) {
      for (int64_t pos0 : {0, 5}) {
        const int64_t nh = 8, nkv = 4;
        auto q = P.make(randn(rows * nh * hd, 20 + rows));
        auto k = P.make(randn(rows * nkv * hd, 21 + rows));
        P.cpu.rope(q.c.data(), k.c.data(), rows, nh, nkv, hd, pos0);
        P.gpu->rope(q.g.data(), k.g.data(), rows, nh, nkv, hd, pos0);
        EXPECT_LT(rel_err(P.get_g(q), P.get_c(q)), 1e-6);
        EXPECT_LT(rel_err(P.get_g(k), P.get_c(k)), 1e-6);
      }
    }
  }
}

struct AttnCase {
  int64_t nh, nkv, hd, window;
  std::vector<int64_t> steps;  // rows of successive calls
};

// One sequence through the paged attention of both backends; rope: RoPE on the way (the GPU folds
// it into the store of the keys, the CPU rotates first).
void check_attention(Pair& P, const AttnCase& c, bool rope = false) {
  AttentionParams ap;
  ap.n_heads = c.nh;
  ap.n_kv_heads = c.nkv;
  ap.head_dim = c.hd;
  ap.scale = 1.f / std::sqrt(float(c.hd));
  ap.sliding_window = c.window;
  int64_t total = 0;
  for (auto r : c.steps) total += r;
  const int64_t layers = 2;
  auto cc = P.cpu.make_sequence_cache(layers, c.nkv, c.hd, total + 3);
  auto cg = P.gpu->make_sequence_cache(layers, c.nkv, c.hd, total + 3);
  if (rope) {
    const auto t = make_rope(total + 3, c.hd);
    P.cpu.set_rope_tables(t);
    P.gpu->set_rope_tables(t);
  }
  int64_t pos = 0;
  uint32_t seed = 100;
  for (int64_t rows : c.steps) {
    for (int64_t layer = 0; layer < layers; ++layer) {
      auto q = P.make(randn(rows * c.nh * c.hd, seed++, 2.f));
      auto k = P.make(randn(rows * c.nkv * c.hd, seed++, 2.f));
      auto v = P.make(randn(rows * c.nkv * c.hd, seed++));
      auto o = P.zeros(rows * c.nh * c.hd);
      test::attend_one_sequence(P.cpu, *cc, q.c.data(), k.c.data(), v.c.data(), layer, pos, rows, ap, o.c.data(), rope);
      test::attend_one_sequence(*P.gpu, *cg, q.g.data(), k.g.data(), v.g.data(), layer, pos, rows, ap, o.g.data(), rope);
      // The GPU cache holds fp16 keys and values.
      EXPECT_LT(rel_err(P.get_g(o), P.get_c(o)), 3e-3)
          << "nh=" << c.nh << " nkv=" << c.nkv << " hd=" << c.hd << " pos=" << pos << " rows=" << rows
          << " window=" << c.window << " layer=" << layer;
    }
    pos += rows;
  }
}

TEST(GpuKernels, AttentionPrefillThenDecode) {
  QF_REQUIRE_GPU();
  Pair P;
  check_attention(P, {8, 4, 8, 0, {7, 1, 1, 5, 1}});
  check_attention(P, {4, 4, 64, 0, {1, 1, 1}});
  check_attention(P, {32, 8, 128, 0, {33, 1, 7, 1}});
  check_attention(P, {8, 2, 256, 0, {5, 1}});
  check_attention(P, {8, 4, 8, 4, {7, 1, 6, 1}});        // sliding window
  check_attention(P, {4, 2, 128, 0, {1500, 1, 600, 1}});  // several slices per row; many row groups
  check_attention(P, {8, 8, 32, 300, {2000, 1}});         // window with slices
  check_attention(P, {4, 2, 64, 0, {4500, 3, 1}});        // prefill rows split over slices
}

TEST(GpuKernels, RopeFoldedIntoTheStoreMatchesTheCpu) {
  QF_REQUIRE_GPU();
  Pair P;
  check_attention(P, {8, 4, 16, 0, {1, 1, 7, 1, 1}}, true);
  check_attention(P, {32, 8, 128, 0, {33, 1, 1}}, true);
  check_attention(P, {8, 2, 256, 0, {5, 1}}, true);
  check_attention(P, {8, 4, 64, 4, {7, 1, 6, 1}}, true);     // sliding window
  check_attention(P, {4, 2, 128, 0, {1500, 1, 1}}, true);     // several slices
  check_attention(P, {8, 8, 32, 300, {2000, 1, 1}}, true);    // window with slices
}

TEST(GpuKernels, AttentionRejectsFullCache) {
  QF_REQUIRE_GPU();
  Pair P;
  AttentionParams ap{4, 4, 8, 1.f, 0};
  auto cg = P.gpu->make_sequence_cache(1, 4, 8, 4);
  auto q = P.make(randn(5 * 32, 1));
  auto o = P.zeros(5 * 32);
  EXPECT_THROW(test::attend_one_sequence(*P.gpu, *cg, q.g.data(), q.g.data(), q.g.data(), 0, 0, 5, ap, o.g.data()), Error);
}

TEST(GpuKernels, ArgmaxRows) {
  QF_REQUIRE_GPU();
  Pair P;
  for (int64_t n : {1, 512, 32000, 128256}) {
    auto v = randn(2 * n, static_cast<uint32_t>(n));
    if (n > 10) v[n / 3] = v[n - 2] = 100.f;  // tie: the first index wins
    v[n + n / 2] = std::numeric_limits<float>::quiet_NaN();  // row 1: non-finite
    auto b = P.make(v);
    int32_t ids[2] = {-7, -7};
    P.gpu->argmax_rows(b.g.data(), 2, n, ids);
    EXPECT_EQ(ids[0], static_cast<int32_t>(std::max_element(v.begin(), v.begin() + n) - v.begin())) << n;
    EXPECT_EQ(ids[1], Sampler::kNonFinite) << n;
  }
}

// Backend::capture: the recorded work does not run while it is recorded, each replay runs it with
// whatever its buffers hold then, and a free of device memory makes the graph stale.
TEST(GpuKernels, CapturedWorkReplaysWithNewInputs) {
  QF_REQUIRE_GPU();
  Pair P;
  const int64_t n = 1000;
  auto x = P.gpu->alloc(n), y = P.gpu->alloc(n);
  const std::vector<float> zeros(n, 0.f), ones(n, 1.f), twos(n, 2.f);
  P.gpu->upload(x.data(), zeros.data(), n);
  P.gpu->upload(y.data(), ones.data(), n);
  auto g = P.gpu->capture([&] { P.gpu->add(x.data(), y.data(), n); });
  ASSERT_TRUE(g);
  EXPECT_TRUE(g->valid());
  std::vector<float> got(n);
  P.gpu->download(got.data(), x.data(), n);
  EXPECT_EQ(got, zeros) << "recording ran the work";
  g->replay();
  P.gpu->download(got.data(), x.data(), n);
  EXPECT_EQ(got, ones);
  P.gpu->upload(y.data(), twos.data(), n);
  g->replay();
  P.gpu->download(got.data(), x.data(), n);
  EXPECT_EQ(got, std::vector<float>(n, 3.f));
  { auto tmp = P.gpu->alloc(16); }  // freed: the graph may point at moved memory now
  EXPECT_FALSE(g->valid());
  EXPECT_THROW(g->replay(), Error);
}

TEST(GpuKernels, OutOfMemoryIsAClearError) {
  QF_REQUIRE_GPU();
  Pair P;
  EXPECT_THROW(P.gpu->make_sequence_cache(1000, 64, 128, 1 << 20), Error);
  try {
    make_random_weights(*P.gpu)->dense(1 << 20, 1 << 20, DType::F16, 1.f, 1);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("MiB"), std::string::npos) << e.what();
  }
}

// The tensor-core prefill kernel (head_dim 64/128, fp16 cache, 16 rows or more): besides the
// relative error, every element within 2e-2 of the CPU (outputs are O(1) mixes of unit values).
struct AttnErr {
  double max_abs = 0, max_rel = 0;
};

void check_attention_elementwise(Pair& P, const AttnCase& c, AttnErr& worst) {
  AttentionParams ap;
  ap.n_heads = c.nh;
  ap.n_kv_heads = c.nkv;
  ap.head_dim = c.hd;
  ap.scale = 1.f / std::sqrt(float(c.hd));
  ap.sliding_window = c.window;
  int64_t total = 0;
  for (auto r : c.steps) total += r;
  const int64_t layers = 2;
  auto cc = P.cpu.make_sequence_cache(layers, c.nkv, c.hd, total + 3);
  auto cg = P.gpu->make_sequence_cache(layers, c.nkv, c.hd, total + 3);
  int64_t pos = 0;
  uint32_t seed = 500;
  for (int64_t rows : c.steps) {
    for (int64_t layer = 0; layer < layers; ++layer) {
      auto q = P.make(randn(rows * c.nh * c.hd, seed++, 2.f));
      auto k = P.make(randn(rows * c.nkv * c.hd, seed++, 2.f));
      auto v = P.make(randn(rows * c.nkv * c.hd, seed++));
      auto o = P.zeros(rows * c.nh * c.hd);
      test::attend_one_sequence(P.cpu, *cc, q.c.data(), k.c.data(), v.c.data(), layer, pos, rows, ap, o.c.data());
      test::attend_one_sequence(*P.gpu, *cg, q.g.data(), k.g.data(), v.g.data(), layer, pos, rows, ap, o.g.data());
      const auto g = P.get_g(o), r = P.get_c(o);
      double max_abs = 0;
      for (size_t i = 0; i < g.size(); ++i)
        max_abs = std::isfinite(g[i]) ? std::max(max_abs, double(std::fabs(g[i] - r[i]))) : INFINITY;
      const double rel = rel_err(g, r);
      const auto where = ::testing::Message() << "nh=" << c.nh << " nkv=" << c.nkv << " hd=" << c.hd
                                              << " pos=" << pos << " rows=" << rows << " window=" << c.window
                                              << " layer=" << layer;
      EXPECT_LT(max_abs, 2e-2) << where;
      EXPECT_LT(rel, 3e-3) << where;
      worst.max_abs = std::max(worst.max_abs, max_abs);
      worst.max_rel = std::max(worst.max_rel, rel);
    }
    pos += rows;
  }
}

TEST(GpuKernels, AttentionFlashPrefill) {
  QF_REQUIRE_GPU();
  Pair P;
  AttnErr worst;
  // Row counts around the 64-row tile, later chunks (pos0 > 0) and decode steps between them.
  check_attention_elementwise(P, {8, 2, 64, 0, {17, 1, 64, 65, 63, 100, 16, 1}}, worst);
  check_attention_elementwise(P, {8, 2, 128, 0, {16, 33, 128, 300, 1}}, worst);  // 300 rows: keys split in two
  check_attention_elementwise(P, {32, 8, 128, 0, {700, 1, 130, 1}}, worst);      // GQA 32/8
  check_attention_elementwise(P, {32, 8, 64, 0, {511, 257}}, worst);
  check_attention_elementwise(P, {8, 8, 64, 300, {2000, 1, 40}}, worst);  // sliding window
  check_attention_elementwise(P, {8, 2, 128, 600, {2000, 77}}, worst);    // window, keys split
  check_attention_elementwise(P, {4, 2, 64, 0, {4500, 20, 1}}, worst);    // long prompt; a chunk split 16 ways
  check_attention_elementwise(P, {32, 8, 128, 0, {1200, 40}}, worst);     // keys split, 32 heads
  std::printf("flash prefill vs CPU: max abs error %.3g, max rel_err %.3g\n", worst.max_abs, worst.max_rel);
}

#else
TEST(GpuKernels, SkippedWithoutCuda) { QF_REQUIRE_GPU(); }
#endif

}  // namespace
}  // namespace qf
