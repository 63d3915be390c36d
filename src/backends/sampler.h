// Token sampling on the host: repetition penalty, temperature, top-k, top-p, min-p; greedy at
// temperature 0. Deterministic for a given seed.
#pragma once
#include <cstdint>
#include <random>
#include <vector>

namespace qf {

struct SamplerParams {
  float temperature = 0.8f;   // 0 = greedy
  int top_k = 40;             // 0 = off
  float top_p = 0.95f;        // 1 = off
  float min_p = 0.05f;        // 0 = off
  float repeat_penalty = 1.0f;  // 1 = off
  int repeat_last_n = 64;
  uint64_t seed = 0;
};

class Sampler {
 public:
  explicit Sampler(const SamplerParams& p);
  // `history` are the ids seen so far (prompt and generated), for the repetition penalty.
  // Returns kNonFinite when the row holds a NaN or an infinity (as the device samplers do).
  int32_t sample(std::vector<float>& logits, const std::vector<int32_t>& history);
  static constexpr int32_t kNonFinite = -1;
  const SamplerParams& params() const { return p_; }

 private:
  SamplerParams p_;
  std::mt19937_64 rng_;
  std::vector<std::pair<float, int32_t>> cand_;
};

int32_t argmax(const float* logits, int64_t n);
// True when every one of the n values is finite (no NaN, no infinity).
bool all_finite(const float* v, int64_t n);

}  // namespace qf
