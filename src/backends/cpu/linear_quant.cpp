// EXL2 and GPTQ linear layers on the CPU. The packed weights are never expanded whole; work is
// split over tiles of 32 output features, and each tile takes one of two paths:
//  - up to 8 rows of x (decode steps): the codes of each group are converted to float and dotted
//    with x straight from the packed words, and the group's scale and zero are applied once per
//    group: y += s * (sum_i x_i q_i - z * sum_i x_i). No buffer, no per-weight scaling.
//  - more rows (prefill): the tile is decoded K-chunk by K-chunk into a small thread-local fp32
//    buffer laid out [k][32] and every row of x is multiplied against it while it is hot in cache.
// EXL2's act-order permutation is applied to x once (x is gathered through q_perm, as ExLlamaV2's
// kernels do), never to the weights. GPTQ's g_idx only selects each row's scale and zero, so GPTQ
// needs no gather; act-order GPTQ (groups not contiguous) always takes the buffered path.
// QuantizedLinear::dequantize() is the oracle both paths are tested against.
#include <algorithm>
#include <cstring>

#include "backends/cpu/cpu_linear.h"
#include "core/error.h"
#include "formats/exl2.h"
#include "formats/gptq.h"
#include "formats/quant_bits.h"

namespace qf {

namespace {

constexpr int kTile = 32;             // output features per task (two 16-float vectors)
constexpr int64_t kMaxChunk = 1024;   // input rows decoded at a time: 128 KiB of buffer

typedef float v16 __attribute__((vector_size(64)));

inline v16 load16(const float* p) {
  v16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// y[r][0..nt) (+)= sum_k x[r][k] * buf[k][0..32) for R rows of x (row stride ldx).
template <int R>
void micro_kernel(const float* x, int64_t ldx, const float* buf, int64_t kc, float* y, int64_t ldy, int nt,
                  bool accumulate) {
  v16 a[R][2];
  for (int r = 0; r < R; ++r) a[r][0] = a[r][1] = v16{};
  for (int64_t k = 0; k < kc; ++k) {
    const v16 b0 = load16(buf + k * kTile), b1 = load16(buf + k * kTile + 16);
    for (int r = 0; r < R; ++r) {
      const float xv = x[r * ldx + k];
      a[r][0] += xv * b0;
      a[r][1] += xv * b1;
    }
  }
  for (int r = 0; r < R; ++r) {
    float out[kTile];
    std::memcpy(out, &a[r][0], 64);
    std::memcpy(out + 16, &a[r][1], 64);
    float* yr = y + r * ldy;
    if (accumulate)
      for (int j = 0; j < nt; ++j) yr[j] += out[j];
    else
      for (int j = 0; j < nt; ++j) yr[j] = out[j];
  }
}

void tile_gemm(const float* x, int64_t ldx, int64_t rows, const float* buf, int64_t kc, float* y, int64_t ldy,
               int nt, bool accumulate) {
  constexpr int R = 6;
  int64_t t = 0;
  for (; t + R <= rows; t += R) micro_kernel<R>(x + t * ldx, ldx, buf, kc, y + t * ldy, ldy, nt, accumulate);
  switch (rows - t) {
    case 1: micro_kernel<1>(x + t * ldx, ldx, buf, kc, y + t * ldy, ldy, nt, accumulate); break;
    case 2: micro_kernel<2>(x + t * ldx, ldx, buf, kc, y + t * ldy, ldy, nt, accumulate); break;
    case 3: micro_kernel<3>(x + t * ldx, ldx, buf, kc, y + t * ldy, ldy, nt, accumulate); break;
    case 4: micro_kernel<4>(x + t * ldx, ldx, buf, kc, y + t * ldy, ldy, nt, accumulate); break;
    case 5: micro_kernel<5>(x + t * ldx, ldx, buf, kc, y + t * ldy, ldy, nt, accumulate); break;
    default: break;
  }
}

// ---- fused decode + dot for a few rows (decode steps) ---------------------------------------
// A run of rows sharing one bit width, scale and zero contributes
//   y[r][n] += s[n] * (sum_i x[r][i] * q[i][n] - z[n] * sum_i x[r][i]),
// so the codes are only converted to float and multiplied in; no buffer, no per-weight scaling.

typedef uint32_t v16u __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

inline v16u load16u(const uint32_t* p) {
  v16u v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// out[r][h] = sum_{i < rows} x[r][i] * code(i, 16h + lane) for the 32 columns starting at `p` (the
// run's first packed row; packed rows `stride` words apart). Every word of the 32 columns is read.
template <int B, int R>
void run_dot(const uint32_t* p, int64_t stride, int64_t rows, const float* x, int64_t ldx, v16 (&out)[R][2]) {
  constexpr int U = B == 3 || B == 5 ? 32 : B == 2 || B == 6 ? 16 : 32 / B;  // codes per packing unit
  constexpr int WPU = U * B / 32;                                            // words per unit
  constexpr uint32_t mask = (1u << B) - 1u;
  constexpr int C = R >= 4 ? 1 : 4 / R;  // independent accumulator chains per row (FMA latency)
  const int64_t units = rows / U;
  for (int h = 0; h < 2; ++h) {
    v16 acc[R][C];
    for (int r = 0; r < R; ++r)
      for (int c = 0; c < C; ++c) acc[r][c] = v16{};
    const uint32_t* pu = p + 16 * h;
    const float* xu = x;
    for (int64_t u = 0; u < units; ++u, pu += WPU * stride, xu += U) {
      v16u w[WPU];
      for (int i = 0; i < WPU; ++i) w[i] = load16u(pu + i * stride);
#pragma GCC unroll 32
      for (int i = 0; i < U; ++i) {
        const int bit = i * B, wi = bit / 32, off = bit % 32;
        v16u c = w[wi] >> off;
        if (off + B > 32) c |= w[wi + 1] << (32 - off);
        c &= mask;
        const v16 cf = __builtin_convertvector((v16i)c, v16);
        for (int r = 0; r < R; ++r) acc[r][i % C] += xu[r * ldx + i] * cf;
      }
    }
    for (int r = 0; r < R; ++r) {
      out[r][h] = acc[r][0];
      for (int c = 1; c < C; ++c) out[r][h] += acc[r][c];
    }
  }
  // Rows past the last whole unit (only a last EXL2 group can end in a partial unit).
  for (int64_t i = units * U; i < rows; ++i)
    for (int j = 0; j < kTile; ++j) {
      const float q = static_cast<float>(read_packed(p + j, stride, i * B, B));
      for (int r = 0; r < R; ++r) out[r][j / 16][j % 16] += x[r * ldx + i] * q;
    }
}

template <int R>
void run_dot_bits(int bits, const uint32_t* p, int64_t stride, int64_t rows, const float* x, int64_t ldx,
                  v16 (&out)[R][2]) {
  switch (bits) {
    case 2: run_dot<2, R>(p, stride, rows, x, ldx, out); break;
    case 3: run_dot<3, R>(p, stride, rows, x, ldx, out); break;
    case 4: run_dot<4, R>(p, stride, rows, x, ldx, out); break;
    case 5: run_dot<5, R>(p, stride, rows, x, ldx, out); break;
    case 6: run_dot<6, R>(p, stride, rows, x, ldx, out); break;
    default: run_dot<8, R>(p, stride, rows, x, ldx, out); break;
  }
}

// Per-format tile decoders: prepare() runs once per tile of output features, decode() per K-chunk.
struct Exl2Source {
  const Exl2Linear* q;
  struct Scratch {};
  const int32_t* perm() const { return q->perm().data(); }
  void prepare(int64_t, int, Scratch&) const {}
  void decode(int64_t n0, int nt, int64_t k0, int64_t k1, const Scratch&, float* buf) const {
    q->decode_tile(n0, nt, k0, k1, buf, kTile);
  }

  // Fused path: per-group sums of the (permuted) x rows, then one pass over the packed codes.
  static constexpr int kMaxFusedRows = 8;
  std::vector<float> group_sums(const float* xs, int64_t rows, int64_t K) const {
    const auto& gs = q->groups();
    std::vector<float> sums(static_cast<size_t>(rows) * gs.size());
    for (int64_t t = 0; t < rows; ++t)
      for (size_t g = 0; g < gs.size(); ++g) {
        float acc = 0;
        for (int64_t i = gs[g].row0; i < gs[g].row0 + gs[g].rows; ++i) acc += xs[t * K + i];
        sums[static_cast<size_t>(t) * gs.size() + g] = acc;
      }
    return sums;
  }
  bool can_fuse(int64_t n0) const { return n0 + kTile <= q->packed_stride(); }
  template <int R>
  void fused(int64_t n0, int nt, const float* xs, int64_t K, const float* sums, float* y, int64_t ldy) const {
    const auto& gs = q->groups();
    v16 yacc[R][2];
    for (int r = 0; r < R; ++r) yacc[r][0] = yacc[r][1] = v16{};
    float s[kTile];
    for (size_t g = 0; g < gs.size(); ++g) {
      const Exl2Group& gr = gs[g];
      v16 dot[R][2];
      run_dot_bits<R>(gr.bits, q->packed() + gr.word0 * q->packed_stride() + n0, q->packed_stride(), gr.rows,
                      xs + gr.row0, K, dot);
      q->group_scales(g, n0, kTile, s);
      const float z = static_cast<float>(1 << (gr.bits - 1));
      for (int h = 0; h < 2; ++h) {
        const v16 sv = load16(s + 16 * h);
        for (int r = 0; r < R; ++r) yacc[r][h] += sv * (dot[r][h] - z * sums[static_cast<size_t>(r) * gs.size() + g]);
      }
    }
    for (int r = 0; r < R; ++r) {
      float out[kTile];
      std::memcpy(out, &yacc[r][0], 64);
      std::memcpy(out + 16, &yacc[r][1], 64);
      std::memcpy(y + r * ldy, out, sizeof(float) * static_cast<size_t>(nt));
    }
  }
};

struct GptqSource {
  const GptqLinear* q;
  int64_t run_rows = 0;  // rows per contiguous group when the fused path applies, else 0

  explicit GptqSource(const GptqLinear* g) : q(g) {
    // Fusable when every group is one contiguous run of rows starting on a word boundary.
    const auto& gi = g->g_idx();
    const int64_t K = g->in_features, G = g->n_groups();
    const int64_t gs = G == 1 ? K : static_cast<int64_t>(std::count(gi.begin(), gi.end(), 0));
    bool plain = gs > 0 && (G == 1 || gs * g->bits() % 32 == 0);
    for (int64_t k = 0; k < K && plain; ++k) plain = gi[static_cast<size_t>(k)] == k / gs;
    if (plain) run_rows = gs;
  }

  static constexpr int kMaxFusedRows = 8;
  std::vector<float> group_sums(const float* xs, int64_t rows, int64_t K) const {
    if (run_rows == 0) return {};
    const int64_t G = q->n_groups();
    std::vector<float> sums(static_cast<size_t>(rows * G), 0.f);
    for (int64_t t = 0; t < rows; ++t)
      for (int64_t k = 0; k < K; ++k) sums[static_cast<size_t>(t * G + k / run_rows)] += xs[t * K + k];
    return sums;
  }
  bool can_fuse(int64_t n0) const { return run_rows > 0 && n0 + kTile <= q->out_features; }
  template <int R>
  void fused(int64_t n0, int nt, const float* xs, int64_t K, const float* sums, float* y, int64_t ldy) const {
    const int64_t G = q->n_groups(), N = q->out_features;
    const int bits = q->bits();
    v16 yacc[R][2];
    for (int r = 0; r < R; ++r) yacc[r][0] = yacc[r][1] = v16{};
    float s[kTile], z[kTile];
    for (int64_t g = 0; g < G; ++g) {
      const int64_t row0 = g * run_rows, rows = std::min(run_rows, K - row0);
      v16 dot[R][2];
      run_dot_bits<R>(bits, q->packed() + row0 * bits / 32 * N + n0, N, rows, xs + row0, K, dot);
      for (int j = 0; j < kTile; ++j) {
        s[j] = q->scale(g, n0 + j);
        z[j] = static_cast<float>(q->zero(g, n0 + j));
      }
      for (int h = 0; h < 2; ++h) {
        const v16 sv = load16(s + 16 * h), zv = load16(z + 16 * h);
        for (int r = 0; r < R; ++r) yacc[r][h] += sv * (dot[r][h] - zv * sums[static_cast<size_t>(r * G + g)]);
      }
    }
    for (int r = 0; r < R; ++r) {
      float out[kTile];
      std::memcpy(out, &yacc[r][0], 64);
      std::memcpy(out + 16, &yacc[r][1], 64);
      std::memcpy(y + r * ldy, out, sizeof(float) * static_cast<size_t>(nt));
    }
  }

  struct Scratch {
    std::vector<float> scales;
    std::vector<int32_t> zeros;
  };
  const int32_t* perm() const { return nullptr; }
  void prepare(int64_t n0, int nt, Scratch& s) const {
    const size_t n = static_cast<size_t>(q->n_groups() * kTile);
    if (s.scales.size() < n) {
      s.scales.assign(n, 0.f);
      s.zeros.assign(n, 0);
    }
    q->tile_params(n0, nt, s.scales.data(), s.zeros.data(), kTile);
  }
  void decode(int64_t n0, int nt, int64_t k0, int64_t k1, const Scratch& s, float* buf) const {
    q->decode_tile(n0, nt, k0, k1, s.scales.data(), s.zeros.data(), buf, kTile);
  }
};

template <class Source>
class QuantCpuLinear final : public CpuLinear {
 public:
  QuantCpuLinear(const LinearWeight& w, std::shared_ptr<const QuantizedLinear> keep, Source src)
      : keep_(std::move(keep)), src_(src) {
    in_features = w.in_features;
    out_features = w.out_features;
    if (w.bias) bias = to_f32(*w.bias);
  }

  void forward(const float* x, float* y, int64_t rows, ThreadPool& pool) const override {
    const int64_t K = in_features, N = out_features;
    const float* xs = x;
    std::vector<float> xp;
    if (const int32_t* perm = src_.perm()) {
      xp.resize(static_cast<size_t>(rows * K));
      for (int64_t t = 0; t < rows; ++t) {
        const float* xr = x + t * K;
        float* dst = xp.data() + t * K;
        for (int64_t j = 0; j < K; ++j) dst[j] = xr[perm[j]];
      }
      xs = xp.data();
    }
    const int64_t tiles = (N + kTile - 1) / kTile;
    const int64_t kc = std::min(K, kMaxChunk);
    // ~128K multiply-adds (decode counted as ~4 per weight) per chunk of work at least.
    const int64_t per_tile = K * kTile * (rows + 4);
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 17) / std::max<int64_t>(1, per_tile));
    if (rows <= Source::kMaxFusedRows) {
      // Decode steps: codes are dotted with x straight from the packed words.
      const std::vector<float> sums = src_.group_sums(xs, rows, K);
      const int64_t fgrain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, K * kTile * (rows + 2)));
      // n0 + 32 <= packed width fails at most for the last tile, which then takes the path below.
      const bool tail = !src_.can_fuse((tiles - 1) * kTile);
      pool.parallel_for(tiles, fgrain, [&](int64_t t0, int64_t t1) {
        for (int64_t tile = t0; tile < t1; ++tile) {
          const int64_t n0 = tile * kTile;
          const int nt = static_cast<int>(std::min<int64_t>(kTile, N - n0));
          if (!src_.can_fuse(n0)) continue;
          for (int64_t r0 = 0; r0 < rows; r0 += 8) {  // blocks of up to 8 rows share each decoded code
            const float* xb = xs + r0 * K;
            const float* sb = sums.data() + sums.size() / static_cast<size_t>(rows) * static_cast<size_t>(r0);
            float* yb = y + r0 * N + n0;
            switch (std::min<int64_t>(8, rows - r0)) {
              case 1: src_.template fused<1>(n0, nt, xb, K, sb, yb, N); break;
              case 2: src_.template fused<2>(n0, nt, xb, K, sb, yb, N); break;
              case 3: src_.template fused<3>(n0, nt, xb, K, sb, yb, N); break;
              case 4: src_.template fused<4>(n0, nt, xb, K, sb, yb, N); break;
              case 5: src_.template fused<5>(n0, nt, xb, K, sb, yb, N); break;
              case 6: src_.template fused<6>(n0, nt, xb, K, sb, yb, N); break;
              case 7: src_.template fused<7>(n0, nt, xb, K, sb, yb, N); break;
              default: src_.template fused<8>(n0, nt, xb, K, sb, yb, N); break;
            }
          }
        }
      });
      if (!tail) {
        add_bias(y, rows);
        return;
      }
    }
    pool.parallel_for(tiles, grain, [&](int64_t t0, int64_t t1) {
      thread_local std::vector<float> buf;
      thread_local typename Source::Scratch scratch;
      if (buf.size() < static_cast<size_t>(kc * kTile)) buf.resize(static_cast<size_t>(kc * kTile));
      for (int64_t tile = t0; tile < t1; ++tile) {
        const int64_t n0 = tile * kTile;
        const int nt = static_cast<int>(std::min<int64_t>(kTile, N - n0));
        if (rows <= Source::kMaxFusedRows && src_.can_fuse(n0)) continue;  // done above
        if (nt < kTile) std::fill(buf.begin(), buf.end(), 0.f);
        src_.prepare(n0, nt, scratch);
        for (int64_t k0 = 0; k0 < K; k0 += kc) {
          const int64_t k1 = std::min(K, k0 + kc);
          src_.decode(n0, nt, k0, k1, scratch, buf.data());
          tile_gemm(xs + k0, K, rows, buf.data(), k1 - k0, y + n0, N, nt, k0 > 0);
        }
      }
    });
    add_bias(y, rows);
  }

 private:
  std::shared_ptr<const QuantizedLinear> keep_;
  Source src_;
};

}  // namespace

std::unique_ptr<CpuLinear> make_quant_cpu_linear(const LinearWeight& w) {
  if (!w.quant) fail("linear layer '", w.name, "': ", linear_format_name(w.format), " layer without quantized tensors");
  if (w.quant->in_features != w.in_features || w.quant->out_features != w.out_features)
    fail("linear layer '", w.name, "': quantized tensors are ", w.quant->out_features, "x", w.quant->in_features,
         " but the layer is ", w.out_features, "x", w.in_features);
  if (const auto* e = dynamic_cast<const Exl2Linear*>(w.quant.get()))
    return std::make_unique<QuantCpuLinear<Exl2Source>>(w, w.quant, Exl2Source{e});
  if (const auto* g = dynamic_cast<const GptqLinear*>(w.quant.get()))
    return std::make_unique<QuantCpuLinear<GptqSource>>(w, w.quant, GptqSource(g));
  fail("linear layer '", w.name, "': ", linear_format_name(w.format), " layers are not supported on the CPU");
}

}  // namespace qf
