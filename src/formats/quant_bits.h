// Shared pieces of the quantized formats: reading packed integer codes out of int32 words, and
// the one-line error messages that name the tensor (and its file) a problem was found in.
#pragma once
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>

#include "core/error.h"
#include "formats/safetensors.h"

namespace qf {

// A packed column is a little-endian bit stream spread over 32-bit words `stride` words apart
// (the words of one output column in a [rows, columns] int32 tensor). Returns the `bits`-bit code
// starting at bit `pos` of the stream; a code may straddle two words (3-, 5- and 6-bit packing).
// The caller guarantees that every word touched lies inside the tensor.
inline uint32_t read_packed(const uint32_t* column, int64_t stride, int64_t pos, int bits) {
  const int64_t w = pos >> 5;
  const int off = static_cast<int>(pos & 31);
  uint32_t v = column[w * stride] >> off;
  if (off + bits > 32) v |= column[(w + 1) * stride] << (32 - off);
  return v & ((1u << bits) - 1u);
}

// "FILE: tensor 'NAME'" for error messages; FILE is "model" when the store cannot say. The name
// comes from a file and is escaped.
inline std::string tensor_where(const TensorStore& store, const std::string& name) {
  const auto f = store.file_of(name);
  return (f.empty() ? std::string("model") : f.string()) + ": tensor " + quote_for_error(name);
}

// ceil(a / b) for a >= 0, b > 0, without the overflow of (a + b - 1) / b when b is huge.
inline int64_t ceil_div(int64_t a, int64_t b) { return a / b + (a % b != 0); }

}  // namespace qf

namespace qf {

// The view itself when its data is aligned for its element type, else an owned, aligned copy
// (safetensors only promises byte offsets; an odd-length fp16 tensor misaligns the next one).
inline TensorView aligned_view(const TensorView& t) {
  const size_t a = dtype_size(t.dtype);
  if (a <= 1 || reinterpret_cast<uintptr_t>(t.data) % a == 0) return t;
  auto buf = std::shared_ptr<uint64_t[]>(new uint64_t[t.nbytes() / 8 + 1]);
  std::memcpy(buf.get(), t.data, t.nbytes());
  TensorView v = t;
  v.data = buf.get();
  v.keepalive = std::shared_ptr<const void>(buf, buf.get());
  return v;
}

}  // namespace qf

namespace qf {

namespace detail {
// Index of the first of n elements whose exponent bits are all ones (inf or NaN), or -1. Chunked so
// the inner loop is a branch-free compare-and-or that the compiler vectorizes (memcpy loads: the
// data need not be aligned).
template <typename U, U kExponent>
int64_t first_all_ones_exponent(const unsigned char* p, int64_t n) {
  constexpr int64_t kChunk = 4096;
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t c1 = std::min(n, c0 + kChunk);
    unsigned bad = 0;
    for (int64_t i = c0; i < c1; ++i) {
      U x;
      std::memcpy(&x, p + i * static_cast<int64_t>(sizeof(U)), sizeof(U));
      bad |= (x & kExponent) == kExponent;
    }
    if (!bad) continue;
    for (int64_t i = c0; i < c1; ++i) {
      U x;
      std::memcpy(&x, p + i * static_cast<int64_t>(sizeof(U)), sizeof(U));
      if ((x & kExponent) == kExponent) return i;
    }
  }
  return -1;
}
}  // namespace detail

// Elements [begin, end) of an F32/F16/BF16 view: the index of the first NaN or infinity, or -1
// (also for other dtypes, which hold no such values). About memory bandwidth on one core.
inline int64_t first_non_finite(const TensorView& t, int64_t begin = 0, int64_t end = -1) {
  if (end < 0) end = t.numel();
  const auto* p = static_cast<const unsigned char*>(t.data);
  int64_t i = -1;
  switch (t.dtype) {
    case DType::F16: i = detail::first_all_ones_exponent<uint16_t, 0x7c00>(p + 2 * begin, end - begin); break;
    case DType::BF16: i = detail::first_all_ones_exponent<uint16_t, 0x7f80>(p + 2 * begin, end - begin); break;
    case DType::F32: i = detail::first_all_ones_exponent<uint32_t, 0x7f800000u>(p + 4 * begin, end - begin); break;
    default: return -1;
  }
  return i < 0 ? -1 : begin + i;
}

// "[i, j]" of flat element `flat` of a tensor of this shape, for error messages.
inline std::string element_index(const std::vector<int64_t>& shape, int64_t flat) {
  std::vector<int64_t> idx(shape.size());
  for (size_t d = shape.size(); d-- > 0;) {
    if (shape[d] > 0) {
      idx[d] = flat % shape[d];
      flat /= shape[d];
    }
  }
  std::string s = "[";
  for (size_t d = 0; d < idx.size(); ++d) s += (d ? ", " : "") + std::to_string(idx[d]);
  return s + "]";
}

// The value at flat element i of an F32/F16/BF16 view, as text ("nan", "inf", "-inf").
inline std::string float_text(const TensorView& t, int64_t i) {
  const auto* p = static_cast<const unsigned char*>(t.data);
  float f = 0;
  if (t.dtype == DType::F32) {
    std::memcpy(&f, p + 4 * i, 4);
  } else {
    uint16_t h;
    std::memcpy(&h, p + 2 * i, 2);
    f = t.dtype == DType::F16 ? fp16_to_f32(h) : bf16_to_f32(h);
  }
  return f != f ? "nan" : f > 0 ? "inf" : "-inf";
}

// Throws "WHERE: element [i, j] is nan (weights must be finite)" when the view holds a NaN or inf.
inline void check_finite(const TensorView& t, const std::string& where) {
  const int64_t i = first_non_finite(t);
  if (i >= 0) fail(where, ": element ", element_index(t.shape, i), " is ", float_text(t, i), " (weights must be finite)");
}

}  // namespace qf
