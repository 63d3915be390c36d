#include "runtime/kl_divergence.h"

#include <algorithm>
#include <chrono>
#include <cmath>

#include "core/error.h"
#include "core/thread_pool.h"

namespace qf {

namespace {

// The q-quantile of sorted values, interpolated between neighbours (numpy's default).
double quantile(const std::vector<double>& sorted, double q) {
  if (sorted.empty()) return 0;
  const double pos = q * static_cast<double>(sorted.size() - 1);
  const size_t i = static_cast<size_t>(pos);
  if (i + 1 >= sorted.size()) return sorted.back();
  return sorted[i] + (pos - static_cast<double>(i)) * (sorted[i + 1] - sorted[i]);
}

}  // namespace

void check_comparable(const ModelConfig& quant, const ModelConfig& base) {
  if (quant.vocab != base.vocab)
    fail(base.dir.string(), ": vocabulary of ", base.vocab, " tokens, but ", quant.dir.string(), " has ", quant.vocab,
         ": KL divergence needs two versions of one model");
  const RopeConfig &a = quant.rope, &b = base.rope;
  if (quant.head_dim != base.head_dim || a.type != b.type || a.theta != b.theta || a.factor != b.factor ||
      a.low_freq_factor != b.low_freq_factor || a.high_freq_factor != b.high_freq_factor ||
      a.original_max_position != b.original_max_position)
    fail(base.dir.string(), ": rotary embedding (head_dim ", base.head_dim, ", ", b.type, ", theta ", b.theta,
         ") differs from ", quant.dir.string(), "'s (head_dim ", quant.head_dim, ", ", a.type, ", theta ", a.theta,
         "): KL divergence needs two versions of one model");
}

double kl_divergence_row(const float* base_row, const float* quant_row, int64_t vocab, std::vector<double>& scratch) {
  const float* b = base_row;
  const float* q = quant_row;
  const double mb = *std::max_element(b, b + vocab), mq = *std::max_element(q, q + vocab);
  scratch.resize(static_cast<size_t>(vocab));
  double sb = 0, sq = 0;
  for (int64_t i = 0; i < vocab; ++i) {
    scratch[static_cast<size_t>(i)] = std::exp(static_cast<double>(b[i]) - mb);
    sb += scratch[static_cast<size_t>(i)];
    sq += std::exp(static_cast<double>(q[i]) - mq);
  }
  // log p_i = b_i - lzb; identical rows give identical log-probabilities, so exactly 0.
  const double lzb = mb + std::log(sb), lzq = mq + std::log(sq);
  double kl = 0;
  for (int64_t i = 0; i < vocab; ++i) {
    const double e = scratch[static_cast<size_t>(i)];
    if (e > 0) kl += e * ((static_cast<double>(b[i]) - lzb) - (static_cast<double>(q[i]) - lzq));
  }
  return kl / sb;
}

KlDivergenceResult kl_divergence(Model& quant, Model& base, const std::vector<int32_t>& tokens, int64_t ctx,
                                 int64_t max_windows, int64_t kld_windows,
                                 const std::function<void(int64_t, int64_t, double, double)>& progress) {
  check_comparable(quant.config(), base.config());
  if (kld_windows < 0) fail("--kld-windows must be >= 0 (0 = every window)");
  const int64_t windows = count_windows(tokens.size(), ctx, max_windows);
  const int64_t vocab = quant.config().vocab;
  KlDivergenceResult r;
  r.kld_windows = kld_windows == 0 ? windows : std::min(kld_windows, windows);
  const size_t rows = static_cast<size_t>(ctx - 1);
  std::vector<double> nll_q, nll_b, kld_all, kld(rows);
  std::vector<char> same_top(rows);
  int64_t top1 = 0;
  double kld_sum = 0, dp_sum = 0, dp_sq = 0;
  const auto t0 = std::chrono::steady_clock::now();
  run_windows({&quant, &base}, tokens, ctx, windows,
              [&](int64_t w, const int32_t* win, const std::vector<const float*>& logits) {
                const float *lq = logits[0], *lb = logits[1];
                window_nll(lq, win, ctx, vocab, nll_q);
                window_nll(lb, win, ctx, vocab, nll_b);
                for (size_t t = 0; t < rows; ++t) {  // in order, as perplexity() sums
                  r.quant.nll_sum += nll_q[t];
                  r.base.nll_sum += nll_b[t];
                }
                for (PerplexityResult* p : {&r.quant, &r.base}) {
                  p->tokens_scored += ctx - 1;
                  p->windows = w + 1;
                }
                if (w < r.kld_windows) {
                  ThreadPool::global().parallel_for(ctx - 1, 16, [&](int64_t row0, int64_t row1) {
                    std::vector<double> scratch;
                    for (int64_t t = row0; t < row1; ++t) {
                      const float *qr = lq + t * vocab, *br = lb + t * vocab;
                      kld[static_cast<size_t>(t)] = kl_divergence_row(br, qr, vocab, scratch);
                      same_top[static_cast<size_t>(t)] =
                          std::max_element(qr, qr + vocab) - qr == std::max_element(br, br + vocab) - br;
                    }
                  });
                  for (size_t t = 0; t < rows; ++t) {
                    kld_sum += kld[t];
                    top1 += same_top[t];
                    const double dp = std::exp(-nll_q[t]) - std::exp(-nll_b[t]);
                    dp_sum += dp;
                    dp_sq += dp * dp;
                  }
                  kld_all.insert(kld_all.end(), kld.begin(), kld.end());
                }
                if (progress)
                  progress(w + 1, windows, std::exp(r.quant.nll_sum / static_cast<double>(r.quant.tokens_scored)),
                           kld_all.empty() ? 0.0 : kld_sum / static_cast<double>(kld_all.size()));
              });
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  for (PerplexityResult* p : {&r.quant, &r.base}) {
    p->ppl = std::exp(p->nll_sum / static_cast<double>(p->tokens_scored));
    p->seconds = r.seconds;
  }
  r.ppl_ratio = r.quant.ppl / r.base.ppl;
  r.kld_tokens = static_cast<int64_t>(kld_all.size());
  const double n = static_cast<double>(r.kld_tokens);
  r.kld_mean = kld_sum / n;
  r.top1 = static_cast<double>(top1) / n;
  r.delta_p_mean = dp_sum / n;
  r.delta_p_rms = std::sqrt(dp_sq / n);
  std::sort(kld_all.begin(), kld_all.end());
  r.kld_median = quantile(kld_all, 0.5);
  r.kld_p99 = quantile(kld_all, 0.99);
  r.kld_max = kld_all.back();
  return r;
}

}  // namespace qf
