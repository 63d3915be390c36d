// Shared pieces of the quantized formats: reading packed integer codes out of int32 words, and
// the one-line error messages that name the tensor (and its file) a problem was found in.
#pragma once
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

// "FILE: tensor 'NAME'" for error messages; FILE is "model" when the store cannot say.
inline std::string tensor_where(const TensorStore& store, const std::string& name) {
  const auto f = store.file_of(name);
  return (f.empty() ? std::string("model") : f.string()) + ": tensor '" + name + "'";
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

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
