// Element types of stored tensors and the fp16/bf16 <-> fp32 conversions used everywhere.
#pragma once
#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

namespace qf {

enum class DType : uint8_t { F32, F16, BF16, F64, I8, U8, I16, U16, I32, U32, I64, U64, BOOL };

size_t dtype_size(DType t);
std::string_view dtype_name(DType t);           // safetensors spelling: "F16", "BF16", ...
bool dtype_from_name(std::string_view name, DType* out);

// IEEE half -> float through a 64K-entry table (built once); exact for every input.
extern const float* const kHalfToFloatTable;
inline float fp16_to_f32(uint16_t h) { return kHalfToFloatTable[h]; }
uint16_t f32_to_fp16(float f);  // round to nearest even

inline float bf16_to_f32(uint16_t b) {
  uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
uint16_t f32_to_bf16(float f);  // round to nearest even

// Converts n stored elements of type t (F32/F16/BF16) to fp32.
void convert_to_f32(DType t, const void* src, float* dst, size_t n);

}  // namespace qf
