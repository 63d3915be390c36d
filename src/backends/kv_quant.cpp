#include "backends/kv_quant.h"

#include <cmath>

#include "core/error.h"

namespace qf {

KVFormat parse_kv_format(const std::string& s) {
  if (s == "fp16" || s == "full") return KVFormat::Full;
  if (s == "q8") return KVFormat::Q8;
  if (s == "q4") return KVFormat::Q4;
  fail("unknown KV cache type '", s, "' (expected fp16, q8 or q4)");
}

const char* kv_format_name(KVFormat f) {
  switch (f) {
    case KVFormat::Q8: return "q8";
    case KVFormat::Q4: return "q4";
    default: return "fp16";
  }
}

void kv_quantize_row(const float* x, int64_t n, KVFormat f, uint8_t* codes, float* scales) {
  const float qmax = f == KVFormat::Q8 ? 127.f : 7.f;
  for (int64_t g = 0; g < n / kKVGroup; ++g) {
    const float* v = x + g * kKVGroup;
    float amax = 0.f;
    for (int64_t i = 0; i < kKVGroup; ++i) amax = std::fmax(amax, std::fabs(v[i]));
    const float inv = amax > 0.f ? qmax / amax : 0.f;
    scales[g] = amax / qmax;
    for (int64_t i = 0; i < kKVGroup; ++i) {
      const int q = static_cast<int>(std::nearbyint(std::fmin(std::fmax(v[i] * inv, -qmax), qmax)));
      const int64_t e = g * kKVGroup + i;
      if (f == KVFormat::Q8) {
        codes[e] = static_cast<uint8_t>(static_cast<int8_t>(q));
      } else if (e % 2 == 0) {
        codes[e / 2] = static_cast<uint8_t>(q + 8);
      } else {
        codes[e / 2] = static_cast<uint8_t>(codes[e / 2] | ((q + 8) << 4));
      }
    }
  }
}

void kv_dequantize_row(const uint8_t* codes, const float* scales, int64_t n, KVFormat f, float* out) {
  for (int64_t e = 0; e < n; ++e) {
    const float s = scales[e / kKVGroup];
    const int q = f == KVFormat::Q8 ? static_cast<int8_t>(codes[e]) : ((codes[e / 2] >> (4 * (e % 2))) & 15) - 8;
    out[e] = static_cast<float>(q) * s;
  }
}

}  // namespace qf
