// Size arithmetic for numbers that come from options or files: every product and sum is checked,
// so a huge --ctx or a lying header fails with one line instead of wrapping to a small buffer.
// And byte counts as people read them ("140.2 GB").
#pragma once
#include <cstdint>
#include <cstdio>
#include <initializer_list>
#include <string>

#include "core/error.h"

namespace qf {

// a * b, failing ("<what>: <a> x <b> is too large") when either is negative or the product
// overflows int64.
inline int64_t checked_mul(int64_t a, int64_t b, const std::string& what) {
  int64_t r = 0;
  if (a < 0 || b < 0 || __builtin_mul_overflow(a, b, &r)) fail(what, ": ", a, " x ", b, " is too large");
  return r;
}

// The product of every factor, checked as checked_mul.
inline int64_t checked_product(std::initializer_list<int64_t> factors, const std::string& what) {
  int64_t r = 1;
  for (int64_t f : factors) r = checked_mul(r, f, what);
  return r;
}

// Blocks of block_size positions that hold `positions` positions, `copies` times over, as the
// int32 count a block table and the engine's options use; fails with one line when there are too
// many (a huge --ctx, -p or --concurrency).
inline int32_t kv_block_count(int64_t positions, int64_t block_size, int64_t copies = 1) {
  const int64_t n = checked_mul((positions + block_size - 1) / block_size, copies, "KV blocks");
  if (n > INT32_MAX / 2)
    fail("a KV cache of ", copies, " x ", positions, " positions needs ", n, " blocks of ", block_size, ": too many");
  return static_cast<int32_t>(n);
}

inline int64_t checked_add(int64_t a, int64_t b, const std::string& what) {
  int64_t r = 0;
  if (__builtin_add_overflow(a, b, &r)) fail(what, ": ", a, " + ", b, " is too large");
  return r;
}

// "140.2 GB", "512.0 MB", "12.0 KB", "100 bytes" (decimal units, as bench reports bandwidth).
inline std::string format_bytes(double bytes) {
  char buf[64];
  if (bytes >= 1e12) std::snprintf(buf, sizeof buf, "%.1f TB", bytes / 1e12);
  else if (bytes >= 1e9) std::snprintf(buf, sizeof buf, "%.1f GB", bytes / 1e9);
  else if (bytes >= 1e6) std::snprintf(buf, sizeof buf, "%.1f MB", bytes / 1e6);
  else if (bytes >= 1e3) std::snprintf(buf, sizeof buf, "%.1f KB", bytes / 1e3);
  else std::snprintf(buf, sizeof buf, "%.0f bytes", bytes);
  return buf;
}

}  // namespace qf
