#include "backends/sampler.h"

#include <algorithm>
#include <cmath>
#include <unordered_set>

#include "core/error.h"

namespace qf {

int32_t argmax(const float* logits, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i)
    if (logits[i] > logits[best]) best = i;
  return static_cast<int32_t>(best);
}

bool all_finite(const float* v, int64_t n) {
  // |x| <= FLT_MAX is false for NaN and both infinities; summed as a flag so the loop vectorizes.
  int bad = 0;
  for (int64_t i = 0; i < n; ++i) bad |= !(std::fabs(v[i]) <= 3.40282347e38f);
  return bad == 0;
}

uint64_t sample_random_bits(uint64_t seed, uint64_t draw) {
  const auto mix = [](uint64_t z) {
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
  };
  return mix(mix(seed ^ 0x5851f42d4c957f2dULL) + draw * 0x9e3779b97f4a7c15ULL);
}

bool all_greedy(const std::vector<SampleRow>& rows) {
  for (const SampleRow& r : rows)
    if (!is_greedy(*r.params)) return false;
  return true;
}

Sampler::Sampler(const SamplerParams& p) : p_(p) {
  if (!(p.temperature >= 0) || !std::isfinite(p.temperature)) fail("--temperature must be a finite number >= 0");
  if (p.top_k < 0) fail("--top-k must be >= 0");
  if (!(p.top_p > 0 && p.top_p <= 1)) fail("--top-p must be in (0, 1]");
  if (!(p.min_p >= 0 && p.min_p < 1)) fail("--min-p must be in [0, 1)");
  if (!(p.repeat_penalty > 0) || !std::isfinite(p.repeat_penalty)) fail("--repeat-penalty must be a finite number > 0");
}

int32_t Sampler::sample(float* logits, int64_t n, const int32_t* history, int64_t history_len) {
  if (!all_finite(logits, n)) return kNonFinite;
  if (const int64_t window = penalty_window(p_, history_len); window > 0) {
    // As in llama.cpp / CTRL: each distinct recent id is penalised once.
    std::unordered_set<int32_t> seen(history + (history_len - window), history + history_len);
    for (int32_t id : seen) {
      if (id < 0 || id >= n) continue;
      float& l = logits[id];
      l = l > 0 ? l / p_.repeat_penalty : l * p_.repeat_penalty;
    }
  }
  if (p_.temperature == 0.0f) return argmax(logits, n);

  cand_.clear();
  cand_.reserve(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) cand_.emplace_back(logits[i], static_cast<int32_t>(i));
  // Larger logit first, the lower id first among equals (the device samplers' order).
  auto by_logit = [](const auto& a, const auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); };
  size_t keep = cand_.size();
  if (p_.top_k > 0 && static_cast<size_t>(p_.top_k) < keep) {
    keep = static_cast<size_t>(p_.top_k);
    std::partial_sort(cand_.begin(), cand_.begin() + static_cast<std::ptrdiff_t>(keep), cand_.end(), by_logit);
    cand_.resize(keep);
  } else {
    std::sort(cand_.begin(), cand_.end(), by_logit);
  }
  // Softmax with temperature over the kept candidates (sorted, largest first).
  const float mx = cand_[0].first;
  double sum = 0;
  for (auto& c : cand_) {
    c.first = std::exp((c.first - mx) / p_.temperature);
    sum += c.first;
  }
  for (auto& c : cand_) c.first = static_cast<float>(c.first / sum);
  if (p_.min_p > 0) {
    const float floor = cand_[0].first * p_.min_p;
    size_t k = 1;
    while (k < cand_.size() && cand_[k].first >= floor) ++k;
    cand_.resize(k);
  }
  if (p_.top_p < 1.0f) {
    double cum = 0;
    size_t k = 0;
    while (k < cand_.size()) {
      cum += cand_[k].first;
      ++k;
      if (cum >= p_.top_p) break;
    }
    cand_.resize(std::max<size_t>(1, k));
  }
  double total = 0;
  for (const auto& c : cand_) total += c.first;
  // A uniform in [0, total) from the draw's 64 bits (the top 53, as a double's mantissa).
  const uint64_t bits = sample_random_bits(p_.seed, static_cast<uint64_t>(history_len));
  const double r = static_cast<double>(bits >> 11) * 0x1.0p-53 * total;
  double acc = 0;
  for (const auto& c : cand_) {
    acc += c.first;
    if (r < acc) return c.second;
  }
  return cand_.back().second;
}

}  // namespace qf
