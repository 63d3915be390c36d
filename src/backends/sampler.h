// Token sampling on the host: repetition penalty, temperature, top-k, top-p, min-p; greedy at
// temperature 0. The random number of a draw comes from a counter-based stream, (seed, number of
// ids the sequence holds so far), the same stream the CUDA sampler uses: a sequence's tokens do not
// depend on which batch, step or device drew them, and a sampler carries no state between draws.
#pragma once
#include <cstdint>
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

// The 64 random bits of draw number `draw` of the stream `seed` (SplitMix64 finalizers).
uint64_t sample_random_bits(uint64_t seed, uint64_t draw);

// Temperature 0 without a penalty: the argmax, which needs no window or random number.
inline bool is_greedy(const SamplerParams& p) {
  return p.temperature == 0.0f && (p.repeat_penalty == 1.0f || p.repeat_last_n == 0);
}
// How many of the last ids of a history of history_len the repetition penalty reads (0: none).
inline int64_t penalty_window(const SamplerParams& p, int64_t history_len) {
  if (p.repeat_penalty == 1.0f || p.repeat_last_n == 0) return 0;
  return p.repeat_last_n < 0 ? history_len : (p.repeat_last_n < history_len ? p.repeat_last_n : history_len);
}

class Sampler {
 public:
  explicit Sampler(const SamplerParams& p);  // fails with one line on a parameter out of range
  // `history` are the ids of the sequence so far (prompt and generated): the repetition penalty
  // reads its tail and its length numbers the draw. Returns kNonFinite when the row holds a NaN
  // or an infinity (as the device samplers do). The penalty is applied to `logits` in place.
  int32_t sample(float* logits, int64_t vocab, const int32_t* history, int64_t history_len);
  int32_t sample(std::vector<float>& logits, const std::vector<int32_t>& history) {
    return sample(logits.data(), static_cast<int64_t>(logits.size()), history.data(),
                  static_cast<int64_t>(history.size()));
  }
  static constexpr int32_t kNonFinite = -1;
  const SamplerParams& params() const { return p_; }
  // Temperature 0 without a penalty: the argmax, which needs no sampler state or window.
  bool greedy() const { return is_greedy(p_); }

 private:
  SamplerParams p_;
  std::vector<std::pair<float, int32_t>> cand_;
};

// One row of a batch's logits to sample (Backend::sample_rows): its sequence's parameters and ids
// so far (prompt and generated).
struct SampleRow {
  const SamplerParams* params = nullptr;
  const int32_t* history = nullptr;
  int64_t history_len = 0;
};
// Every row greedy (is_greedy): the batch needs only the argmax.
bool all_greedy(const std::vector<SampleRow>& rows);

int32_t argmax(const float* logits, int64_t n);
// True when every one of the n values is finite (no NaN, no infinity).
bool all_finite(const float* v, int64_t n);

}  // namespace qf
