// Vectorized reductions used on logits (log-softmax for perplexity, sampling).
#pragma once
#include <cstdint>

namespace qf {

float max_f32(const float* x, int64_t n);
// sum_i exp(x[i] - shift); relative error ~1e-7 per term.
float sum_exp_f32(const float* x, int64_t n, float shift);

}  // namespace qf
