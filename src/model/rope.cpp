#include "model/rope.h"

#include <cmath>
#include <new>
#include <stdexcept>

#include "core/sizes.h"

namespace qf {

std::vector<float> rope_inv_freq(const RopeConfig& rope, int64_t head_dim) {
  const int64_t half = head_dim / 2;
  std::vector<float> inv(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i) {
    const float expo = static_cast<float>(2 * i) / static_cast<float>(head_dim);
    inv[static_cast<size_t>(i)] = 1.0f / std::pow(static_cast<float>(rope.theta), expo);
  }
  if (rope.type == "linear") {
    for (auto& f : inv) f /= static_cast<float>(rope.factor);
  } else if (rope.type == "llama3") {
    // Long wavelengths are slowed by `factor`, short ones kept, and the band between blended.
    const double old_ctx = static_cast<double>(rope.original_max_position);
    const double low_wavelen = old_ctx / rope.low_freq_factor;
    const double high_wavelen = old_ctx / rope.high_freq_factor;
    for (auto& f : inv) {
      const double wavelen = 2.0 * M_PI / f;
      if (wavelen < high_wavelen) continue;
      if (wavelen > low_wavelen) {
        f = static_cast<float>(f / rope.factor);
      } else {
        const double smooth = (old_ctx / wavelen - rope.low_freq_factor) /
                              (rope.high_freq_factor - rope.low_freq_factor);
        f = static_cast<float>((1.0 - smooth) * f / rope.factor + smooth * f);
      }
    }
  }
  return inv;
}

RopeTables build_rope_tables(const RopeConfig& rope, int64_t head_dim, int64_t max_pos) {
  RopeTables t;
  t.max_pos = max_pos;
  t.half_dim = head_dim / 2;
  const auto inv = rope_inv_freq(rope, head_dim);
  const int64_t n = checked_mul(max_pos, t.half_dim, str("RoPE tables for ", max_pos, " positions"));
  try {
    t.cos.resize(static_cast<size_t>(n));
    t.sin.resize(t.cos.size());
  } catch (const std::bad_alloc&) {
    fail("out of memory: the RoPE tables for ", max_pos, " positions (", format_bytes(8.0 * static_cast<double>(n)),
         ") could not be allocated (use a smaller --ctx)");
  } catch (const std::length_error&) {
    fail("the RoPE tables for ", max_pos, " positions are too large (use a smaller --ctx)");
  }
  for (int64_t p = 0; p < max_pos; ++p)
    for (int64_t i = 0; i < t.half_dim; ++i) {
      const float angle = static_cast<float>(p) * inv[static_cast<size_t>(i)];
      t.cos[static_cast<size_t>(p * t.half_dim + i)] = std::cos(angle);
      t.sin[static_cast<size_t>(p * t.half_dim + i)] = std::sin(angle);
    }
  return t;
}

}  // namespace qf
