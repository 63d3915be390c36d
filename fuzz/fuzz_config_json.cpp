// config.json of a model folder (model/config.cpp: load_config), with the two files it may also
// read as optional further parts of the input: generation_config.json and AutoGPTQ's
// quantize_config.json.
//
// Besides crashes, a config that loads must be usable: what the loader derives from it first
// (q/kv widths, the RoPE frequencies, the quantization hints) must be computable and finite, and
// values with no meaning (a context of 0 or less, a negative RMSNorm epsilon, a token id outside
// the vocabulary) must have been rejected. Those checks are the `finding(...)` lines below.
#include <cmath>

#include "fuzz_common.h"
#include "model/config.h"
#include "model/rope.h"
#include "model/weights.h"

using namespace qf;

namespace {

void check_usable(const ModelConfig& c) {
  int64_t q_dim = 0, kv_dim = 0;
  if (__builtin_mul_overflow(c.n_heads, c.head_dim, &q_dim) || __builtin_mul_overflow(c.n_kv_heads, c.head_dim, &kv_dim))
    fuzz::finding(str("accepted sizes whose q/kv width overflows int64: heads ", c.n_heads, ", kv heads ",
                      c.n_kv_heads, ", head_dim ", c.head_dim));
  if (c.max_position <= 0) fuzz::finding(str("accepted max_position_embeddings ", c.max_position));
  if (c.sliding_window < 0) fuzz::finding(str("accepted sliding_window ", c.sliding_window));
  if (!(c.rms_eps >= 0) || !std::isfinite(c.rms_eps)) fuzz::finding(str("accepted rms_norm_eps ", c.rms_eps));
  // Token ids index the embedding rows.
  if (c.bos_id && (*c.bos_id < 0 || *c.bos_id >= c.vocab))
    fuzz::finding(str("accepted bos_token_id ", *c.bos_id, " with vocab_size ", c.vocab));
  for (int64_t e : c.eos_ids)
    if (e < 0 || e >= c.vocab) fuzz::finding(str("accepted eos_token_id ", e, " with vocab_size ", c.vocab));
  // The RoPE table the loader builds first: every frequency finite and positive.
  for (float f : rope_inv_freq(c.rope, c.head_dim))
    if (!(f > 0) || !std::isfinite(f))
      fuzz::finding(str("RoPE frequency ", f, " from rope type '", c.rope.type, "', theta ", c.rope.theta,
                        ", factor ", c.rope.factor, ", low/high ", c.rope.low_freq_factor, "/",
                        c.rope.high_freq_factor, ", original_max_position ", c.rope.original_max_position));
  (void)quant_hints(c.quant);  // bits, group size: converted for the layer loaders
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto parts = fuzz::split_parts(data, size, 3);
  const auto dir = fuzz::fresh_subdir("model");
  fuzz::write_file(dir / "config.json", parts[0]);
  if (parts.size() > 1) fuzz::write_file(dir / "generation_config.json", parts[1]);
  if (parts.size() > 2) fuzz::write_file(dir / "quantize_config.json", parts[2]);
  fuzz::expect_errors([&] { check_usable(load_config(dir)); });
  return 0;
}
