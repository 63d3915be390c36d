// GPTQ on the CPU: the reference every other device is tested against (backends/quant_ops.h).
// Work is split over the thread pool in fixed blocks of columns (or of Hessian rows), so the
// results do not depend on the number of threads: a resumed conversion is bit-identical.
#include <algorithm>
#include <cmath>
#include <cstring>

#include "backends/cpu/cpu_backend.h"
#include "backends/cpu/cpu_linear.h"
#include "core/dtype.h"
#include "core/error.h"

namespace qf {

namespace {

constexpr int64_t kBlock = 64;  // columns (or Hessian rows) per unit of parallel work

int64_t blocks_of(int64_t n) { return (n + kBlock - 1) / kBlock; }

// |e|^norm; the common norm 3.5 without powf (cheaper, and the same expression on every device).
inline float err_pow(float e, float norm) {
  const float a = std::fabs(e);
  return norm == 3.5f ? a * a * a * std::sqrt(a) : std::pow(a, norm);
}

// The code of w at scale s for a width with zero point z and largest code maxq.
inline float code_of(float w, float s, float z, float maxq) { return std::clamp(std::rint(w / s) + z, 0.f, maxq); }

// Lower Cholesky factor of the symmetric A [K][K] (row-major, only the lower triangle is read),
// in place. False when A is not positive definite.
bool cholesky_lower(std::vector<double>& A, int64_t K, ThreadPool& pool) {
  for (int64_t j = 0; j < K; ++j) {
    double* lj = A.data() + j * K;
    double d = lj[j];
    for (int64_t k = 0; k < j; ++k) d -= lj[k] * lj[k];
    if (!(d > 0.0) || !std::isfinite(d)) return false;
    const double ljj = std::sqrt(d);
    lj[j] = ljj;
    pool.parallel_for(K - j - 1, std::max<int64_t>(1, 8192 / (j + 1)), [&](int64_t i0, int64_t i1) {
      for (int64_t i = j + 1 + i0; i < j + 1 + i1; ++i) {
        double* li = A.data() + i * K;
        double s = li[j];
        for (int64_t k = 0; k < j; ++k) s -= li[k] * lj[k];
        li[j] = s / ljj;
      }
    });
  }
  return true;
}

// Inverse of the lower-triangular L [K][K] (row-major), column by column: out[i][j] for i >= j.
void invert_lower(const std::vector<double>& L, int64_t K, std::vector<double>& out, ThreadPool& pool) {
  out.assign(static_cast<size_t>(K * K), 0.0);
  pool.parallel_for(K, 1, [&](int64_t j0, int64_t j1) {
    std::vector<double> x(static_cast<size_t>(K));
    for (int64_t j = j0; j < j1; ++j) {
      // Solve L x = e_j: x[i] = 0 above j.
      x[static_cast<size_t>(j)] = 1.0 / L[static_cast<size_t>(j * K + j)];
      for (int64_t i = j + 1; i < K; ++i) {
        const double* li = L.data() + i * K;
        double s = 0.0;
        for (int64_t k = j; k < i; ++k) s += li[k] * x[static_cast<size_t>(k)];
        x[static_cast<size_t>(i)] = -s / li[i];
      }
      for (int64_t i = j; i < K; ++i) out[static_cast<size_t>(i * K + j)] = x[static_cast<size_t>(i)];
    }
  });
}

}  // namespace

void CpuBackend::hessian_accumulate(float* H, const float* X, int64_t rows, int64_t K) {
  if (rows <= 0) return;
  // Row block i of H gets X[:, block]^T X: one product per block, whatever the thread count.
  pool_.parallel_for(blocks_of(K), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t i0 = b * kBlock, i1 = std::min(K, i0 + kBlock);
      sgemm_rm(true, false, i1 - i0, K, rows, 1.0f, X + i0, K, X, K, 1.0f, H + i0 * K, K);
    }
  });
}

std::vector<float> CpuBackend::matrix_diagonal(const float* H, int64_t K) {
  std::vector<float> d(static_cast<size_t>(K));
  for (int64_t i = 0; i < K; ++i) d[static_cast<size_t>(i)] = H[i * K + i];
  return d;
}

bool CpuBackend::gptq_inverse_factor(const float* H, const std::vector<int32_t>& perm, int64_t K, double damp,
                                     float* U) {
  QF_CHECK(static_cast<int64_t>(perm.size()) == K, "internal: permutation of ", perm.size(), " rows for ", K);
  // With J the reversal, J A J = L L^T gives A = R R^T for the upper R = J L J, so A^-1 = U^T U
  // with U = R^-1 = J L^-1 J: one Cholesky and one triangular inverse, no second factorisation.
  std::vector<double> B(static_cast<size_t>(K * K));
  for (int64_t i = 0; i < K; ++i) {
    const int64_t pi = perm[static_cast<size_t>(K - 1 - i)];
    for (int64_t j = 0; j <= i; ++j) {
      double v = H[pi * K + perm[static_cast<size_t>(K - 1 - j)]];
      if (i == j) v = (v == 0.0 ? 1.0 : v) + damp;
      B[static_cast<size_t>(i * K + j)] = v;
    }
  }
  if (!cholesky_lower(B, K, pool_)) return false;
  std::vector<double> Linv;
  invert_lower(B, K, Linv, pool_);
  for (int64_t i = 0; i < K; ++i)
    for (int64_t j = 0; j < K; ++j)
      U[i * K + j] = j < i ? 0.f : static_cast<float>(Linv[static_cast<size_t>((K - 1 - i) * K + (K - 1 - j))]);
  return true;
}

GptqCodes CpuBackend::gptq_quantize(float* W, const float* U, int64_t K, int64_t N,
                                    const std::vector<GptqGroup>& groups, const ScaleSearch& ss) {
  const int64_t max_rows = check_gptq_groups(groups, K);
  GptqCodes out;
  out.K = K;
  out.N = N;
  out.q.assign(static_cast<size_t>(K * N), 0);
  out.qscale.assign(groups.size() * static_cast<size_t>(N), 0);
  out.scale_max.assign(groups.size(), 0);
  std::vector<float> E(static_cast<size_t>(max_rows * N));  // the group's scaled errors
  std::vector<float> base(static_cast<size_t>(N)), scale(static_cast<size_t>(N));
  const int P = ss.p_grid + 1;
  const int64_t nb = blocks_of(N);
  std::vector<double> block_err(static_cast<size_t>(nb * P));

  int64_t a = 0;
  for (size_t g = 0; g < groups.size(); ++g) {
    const int bits = groups[g].bits;
    const int64_t rows = groups[g].rows, b = a + rows;
    const float maxq = static_cast<float>((1 << bits) - 1), z = static_cast<float>(1 << (bits - 1));
    uint8_t* qs = out.qscale.data() + g * static_cast<size_t>(N);

    // Scale search: base scales per column, their maximum, the codes, then the best multiplier.
    pool_.parallel_for(nb, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t n = b0 * kBlock; n < std::min(N, b1 * kBlock); ++n) {
        float m = 0.f;
        for (int64_t r = a; r < b; ++r) m = std::max(m, std::fabs(W[r * N + n]));
        base[static_cast<size_t>(n)] = (m + 1e-12f) / (maxq / 2.f);
      }
    });
    const float smax = *std::max_element(base.begin(), base.end());
    for (int64_t n = 0; n < N; ++n)
      qs[n] = static_cast<uint8_t>(std::clamp(std::rint(16.f * std::sqrt(base[static_cast<size_t>(n)] / smax)), 1.f, 16.f));
    pool_.parallel_for(nb, 1, [&](int64_t b0, int64_t b1) {
      std::vector<float> s(kBlock);
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t n0 = blk * kBlock, n1 = std::min(N, n0 + kBlock);
        for (int p = 0; p < P; ++p) {
          const float mult = ss.p_min + static_cast<float>(p) * (ss.p_max - ss.p_min) / static_cast<float>(ss.p_grid);
          for (int64_t n = n0; n < n1; ++n) s[static_cast<size_t>(n - n0)] = exl2_scale(qs[n], smax * mult);
          double e = 0.0;
          for (int64_t r = a; r < b; ++r) {
            const float* w = W + r * N;
            float er = 0.f;
            for (int64_t n = n0; n < n1; ++n) {
              const float sn = s[static_cast<size_t>(n - n0)];
              er += err_pow(w[n] - (code_of(w[n], sn, z, maxq) - z) * sn, ss.norm);
            }
            e += er;
          }
          block_err[static_cast<size_t>(blk * P + p)] = e;
        }
      }
    });
    int best = 0;
    double best_err = 0.0;
    for (int p = 0; p < P; ++p) {
      double e = 0.0;
      for (int64_t blk = 0; blk < nb; ++blk) e += block_err[static_cast<size_t>(blk * P + p)];
      if (p == 0 || e < best_err) best = p, best_err = e;
    }
    const float mult = ss.p_min + static_cast<float>(best) * (ss.p_max - ss.p_min) / static_cast<float>(ss.p_grid);
    uint16_t sm16 = f32_to_fp16(smax * mult);
    QF_CHECK((sm16 & 0x7c00) != 0x7c00, "weights too large for EXL2's fp16 scales (group maximum ", smax * mult, ")");
    if (sm16 == 0) sm16 = 1;  // an all-zero group: the smallest positive scale keeps w / s finite
    out.scale_max[g] = sm16;
    const float smf = fp16_to_f32(sm16);
    for (int64_t n = 0; n < N; ++n) scale[static_cast<size_t>(n)] = exl2_scale(qs[n], smf);

    // The group's rows one by one: round, keep the scaled error, feed it to the rest of the group.
    pool_.parallel_for(nb, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t blk = b0; blk < b1; ++blk) {
        const int64_t n0 = blk * kBlock, n1 = std::min(N, n0 + kBlock);
        for (int64_t r = a; r < b; ++r) {
          float* w = W + r * N;
          float* e = E.data() + (r - a) * N;
          uint8_t* q = out.q.data() + r * N;
          const float d = U[r * K + r];
          for (int64_t n = n0; n < n1; ++n) {
            const float sn = scale[static_cast<size_t>(n)];
            const float c = code_of(w[n], sn, z, maxq);
            const float dq = (c - z) * sn;
            e[n] = (w[n] - dq) / d;
            w[n] = dq;
            q[n] = static_cast<uint8_t>(c);
          }
          for (int64_t r2 = r + 1; r2 < b; ++r2) {
            const float u = U[r * K + r2];
            float* w2 = W + r2 * N;
            for (int64_t n = n0; n < n1; ++n) w2[n] -= e[n] * u;
          }
        }
        // The later groups: W[b:K] -= U[a:b, b:K]^T E.
        if (b < K) sgemm_rm(true, false, K - b, n1 - n0, rows, -1.0f, U + a * K + b, K, E.data() + n0, N, 1.0f,
                            W + b * N + n0, N);
      }
    });
    a = b;
  }
  return out;
}

}  // namespace qf
