// Quantized KV caches (selectable per run, like ExLlamaV2's Q4/Q8 caches): each head's row of
// head_dim keys or values is cut into groups of 32 with one fp32 scale each, symmetric:
//   Q8: q = round(x / s) in [-127, 127], one byte each,        s = max|x| / 127;
//   Q4: q = round(x / s) + 8 in [1, 15], two per byte (the even element in the low nibble),
//       s = max|x| / 7.
// Full keeps the backend's native type (fp32 on the CPU, fp16 on CUDA for fp16/bf16 models). The
// CPU backend calls the functions below; the CUDA kernels compute the same values.
#pragma once
#include <cstdint>
#include <string>

namespace qf {

enum class KVFormat { Full, Q8, Q4 };

constexpr int64_t kKVGroup = 32;  // values per scale

// "fp16" (or "full"), "q8", "q4"; anything else fails with one line.
KVFormat parse_kv_format(const std::string& s);
const char* kv_format_name(KVFormat f);
inline int kv_bits(KVFormat f) { return f == KVFormat::Q8 ? 8 : f == KVFormat::Q4 ? 4 : 0; }
// Bytes of one head row of n values (codes and scales); n a multiple of kKVGroup.
inline int64_t kv_row_bytes(KVFormat f, int64_t n) { return n * kv_bits(f) / 8 + n / kKVGroup * 4; }

// x [n] -> codes [n * bits / 8] and scales [n / kKVGroup].
void kv_quantize_row(const float* x, int64_t n, KVFormat f, uint8_t* codes, float* scales);
// codes, scales -> out [n].
void kv_dequantize_row(const uint8_t* codes, const float* scales, int64_t n, KVFormat f, float* out);

}  // namespace qf
