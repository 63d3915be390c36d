#include "quant/gptq_solver.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <numeric>

#include "core/dtype.h"
#include "core/error.h"
#include "core/log.h"
#include "core/thread_pool.h"

namespace qf {

namespace {
constexpr int kMaxDampRetries = 10;
}

GptqSolver::GptqSolver(Backend& b, const float* H, int64_t K, double damp, const std::string& what) : b_(b), K_(K) {
  const std::vector<float> diag = b.matrix_diagonal(H, K);
  double mean = 0;
  dead_.assign(static_cast<size_t>(K), 0);
  for (int64_t i = 0; i < K; ++i) {
    const float d = diag[static_cast<size_t>(i)];
    if (!std::isfinite(d) || d < 0) fail(what, ": the Hessian has a bad diagonal entry (", d, " at ", i, "): non-finite activations?");
    dead_[static_cast<size_t>(i)] = d == 0.f;
    mean += d == 0.f ? 1.0 : d;
  }
  mean /= static_cast<double>(K);
  // Act-order: the inputs with the most energy first (ties by index, so the order is reproducible).
  perm_.resize(static_cast<size_t>(K));
  std::iota(perm_.begin(), perm_.end(), 0);
  std::stable_sort(perm_.begin(), perm_.end(),
                   [&](int32_t x, int32_t y) { return diag[static_cast<size_t>(x)] > diag[static_cast<size_t>(y)]; });
  U_ = b.alloc(static_cast<size_t>(K * K));
  double frac = damp;
  for (retries_ = 0;; ++retries_) {
    if (b.gptq_inverse_factor(H, perm_, K, frac * mean, U_.data())) break;
    if (retries_ == kMaxDampRetries)
      fail(what, ": the Hessian is not positive definite even with damping ", frac, " of its mean diagonal");
    frac *= 2;
  }
  if (retries_ > 0) log_info(what, ": Hessian damped with ", frac, " of its mean diagonal after ", retries_, " retries");
  damp_used_ = frac;
}

std::vector<float> arrange_weight(const LinearWeight& w, const std::vector<int32_t>& perm, const std::vector<char>& dead) {
  if (w.format != LinearFormat::Dense)
    fail(w.name, ": already quantized (", linear_format_name(w.format), "); convert needs an FP16/BF16/FP32 model");
  const auto K = static_cast<int64_t>(perm.size());
  QF_CHECK(w.in_features == K && dead.size() == perm.size(), "internal: ", w.name, " reads ", w.in_features,
           " inputs, the Hessian has ", K);
  const int64_t N = w.out_features;
  QF_CHECK(w.weight.numel() == K * N, "internal: ", w.name, " holds ", w.weight.numel(), " values, not ", K * N);
  const DType dt = w.weight.dtype;
  if (dt != DType::F32 && dt != DType::F16 && dt != DType::BF16)  // checked here: workers must not throw
    fail(w.name, ".weight: unsupported dtype ", dtype_name(dt), " (FP32, FP16 or BF16)");
  const auto* src = static_cast<const char*>(w.weight.data);  // [N][K]
  const size_t row_bytes = static_cast<size_t>(K) * dtype_size(dt);
  std::vector<float> out(static_cast<size_t>(K * N));
  // Column blocks in parallel, each weight row converted to fp32 by the thread that reads it
  // (converting a 7B MLP matrix whole, on one thread, cost more than the rearrangement itself);
  // one bad value is reported.
  std::atomic<int64_t> bad{-1};
  ThreadPool::global().parallel_for(N, 64, [&](int64_t n0, int64_t n1) {
    std::vector<float> row(static_cast<size_t>(K));
    for (int64_t n = n0; n < n1; ++n) {
      convert_to_f32(dt, src + static_cast<size_t>(n) * row_bytes, row.data(), row.size());
      for (int64_t i = 0; i < K; ++i) {
        const int32_t k = perm[static_cast<size_t>(i)];
        const float v = row[static_cast<size_t>(k)];
        if (!std::isfinite(v)) {
          int64_t none = -1;
          bad.compare_exchange_strong(none, n * K + k);
        }
        out[static_cast<size_t>(i * N + n)] = dead[static_cast<size_t>(k)] ? 0.f : v;
      }
    }
  });
  if (bad >= 0) fail(w.name, ".weight: non-finite value at [", bad / K, ", ", bad % K, "]");
  return out;
}

std::vector<float> GptqSolver::arrange(const LinearWeight& w) const { return arrange_weight(w, perm_, dead_); }

std::shared_ptr<const Exl2Tensors> GptqSolver::quantize(const std::vector<float>& arranged, int64_t N,
                                                        const LinearSpec& spec, const std::optional<TensorView>& bias,
                                                        const ScaleSearch& search, std::vector<float>* dequantized) {
  load(arranged, N);
  return pack(codes(spec, search, dequantized), spec, bias);
}

void GptqSolver::load(const std::vector<float>& arranged, int64_t N) {
  QF_CHECK(static_cast<int64_t>(arranged.size()) == K_ * N, "internal: arranged weight of the wrong size");
  if (A_.size() < arranged.size()) A_ = b_.alloc(arranged.size());
  b_.upload(A_.data(), arranged.data(), arranged.size());
  N_ = N;
}

GptqCodes GptqSolver::codes(const LinearSpec& spec, const ScaleSearch& search, std::vector<float>* dequantized) {
  QF_CHECK(N_ > 0, "internal: GPTQ without a loaded weight");
  const size_t n = static_cast<size_t>(K_ * N_);
  if (W_.size() < n) W_ = b_.alloc(n);
  b_.copy_rows(A_.data(), 0, K_, N_, W_.data());  // GPTQ updates its weight in place
  const std::vector<GptqGroup> groups = spec.groups(K_);
  GptqCodes c = b_.gptq_quantize(W_.data(), U_.data(), K_, N_, groups, search);
  if (dequantized) {
    dequantized->resize(n);
    b_.download(dequantized->data(), W_.data(), n);
  }
  return c;
}

std::shared_ptr<const Exl2Tensors> GptqSolver::pack(const GptqCodes& codes, const LinearSpec& spec,
                                                    const std::optional<TensorView>& bias) const {
  auto t = std::make_shared<Exl2Tensors>(pack_exl2(codes, spec.groups(K_), perm_));
  if (bias) {
    const std::vector<float> bf = to_f32(*bias);
    t->bias.resize(bf.size());
    for (size_t i = 0; i < bf.size(); ++i) t->bias[i] = f32_to_fp16(bf[i]);
  }
  return t;
}

}  // namespace qf
