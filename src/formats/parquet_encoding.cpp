#include "formats/parquet_encoding.h"

#include <algorithm>
#include <charconv>
#include <cstdio>
#include <cstring>

#include "core/error.h"
#include "formats/parquet_meta.h"

namespace qf::parquet {

namespace {

// A bounds-checked cursor over one encoded buffer.
struct Cursor {
  const uint8_t* p;
  const uint8_t* end;
  size_t left() const { return static_cast<size_t>(end - p); }
  uint64_t uvarint(const char* what) {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (p >= end) fail(what, " data ends inside a varint");
      const uint8_t b = *p++;
      v |= static_cast<uint64_t>(b & 0x7F) << shift;
      if (!(b & 0x80)) return v;
    }
    fail(what, " varint longer than 10 bytes");
  }
  int64_t zigzag(const char* what) {
    const uint64_t v = uvarint(what);
    return static_cast<int64_t>(v >> 1) ^ -static_cast<int64_t>(v & 1);
  }
  const uint8_t* take(size_t n, const char* what) {
    if (n > left()) fail(what, " data ends early (needs ", n, " bytes, ", left(), " left)");
    const uint8_t* q = p;
    p += n;
    return q;
  }
};

uint32_t load_u32(const uint8_t* p) { return p[0] | p[1] << 8 | p[2] << 16 | static_cast<uint32_t>(p[3]) << 24; }
uint64_t load_u64(const uint8_t* p) { return load_u32(p) | static_cast<uint64_t>(load_u32(p + 4)) << 32; }

// `width` (0..64) bits at bit offset `bit`, least significant bit first. The caller has checked
// that the bits lie inside the buffer.
uint64_t read_bits_lsb(const uint8_t* p, uint64_t bit, int width) {
  if (width == 0) return 0;
  size_t byte = bit >> 3;
  const int off = static_cast<int>(bit & 7);
  uint64_t v = p[byte++] >> off;
  for (int got = 8 - off; got < width; got += 8) v |= static_cast<uint64_t>(p[byte++]) << got;
  return width == 64 ? v : v & ((uint64_t{1} << width) - 1);
}

template <typename T>
void append_number(T v, std::vector<std::string>* out) {
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof buf, v);
  out->emplace_back(buf, r.ptr);
}

// INT96 (legacy Impala/Spark timestamps): nanoseconds of the day, then the Julian day number.
void append_int96(const uint8_t* p, std::vector<std::string>* out) {
  const int64_t nanos = static_cast<int64_t>(load_u64(p));
  const int64_t julian = load_u32(p + 8);
  constexpr int64_t kDayNs = 86400LL * 1000000000LL;
  int64_t days = julian - 2440588 + nanos / kDayNs;  // 2440588: the Julian day of 1970-01-01
  int64_t ns = nanos % kDayNs;
  if (ns < 0) ns += kDayNs, --days;
  // Civil date from days since 1970-01-01 (proleptic Gregorian, 400-year eras).
  const int64_t z = days + 719468;
  const int64_t era = (z >= 0 ? z : z - 146096) / 146097;
  const int64_t doe = z - era * 146097;
  const int64_t yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
  const int64_t doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
  const int64_t mp = (5 * doy + 2) / 153;
  const int64_t day = doy - (153 * mp + 2) / 5 + 1;
  const int64_t month = mp < 10 ? mp + 3 : mp - 9;
  const int64_t year = yoe + era * 400 + (month <= 2);
  const int64_t secs = ns / 1000000000;
  char buf[96];
  int n = std::snprintf(buf, sizeof buf, "%04lld-%02lld-%02lld %02lld:%02lld:%02lld", static_cast<long long>(year),
                        static_cast<long long>(month), static_cast<long long>(day),
                        static_cast<long long>(secs / 3600), static_cast<long long>(secs / 60 % 60),
                        static_cast<long long>(secs % 60));
  if (ns % 1000000000)
    n += std::snprintf(buf + n, sizeof buf - n, ".%09lld", static_cast<long long>(ns % 1000000000));
  out->emplace_back(buf, n);
}

int fixed_width(const ValueType& t) {
  switch (t.physical) {
    case kInt32:
    case kFloat: return 4;
    case kInt64:
    case kDouble: return 8;
    case kInt96: return 12;
    case kFixedLenByteArray: return t.type_length;
    default: return 0;
  }
}

// Text of one fixed-width value stored little-endian at p.
void append_fixed(const ValueType& t, const uint8_t* p, std::vector<std::string>* out) {
  switch (t.physical) {
    case kInt32: {
      const uint32_t u = load_u32(p);
      return t.is_unsigned ? append_number(u, out) : append_number(static_cast<int32_t>(u), out);
    }
    case kInt64: {
      const uint64_t u = load_u64(p);
      return t.is_unsigned ? append_number(u, out) : append_number(static_cast<int64_t>(u), out);
    }
    case kFloat: {
      float f;
      const uint32_t u = load_u32(p);
      std::memcpy(&f, &u, 4);
      return append_number(f, out);
    }
    case kDouble: {
      double d;
      const uint64_t u = load_u64(p);
      std::memcpy(&d, &u, 8);
      return append_number(d, out);
    }
    case kInt96: return append_int96(p, out);
    default: out->emplace_back(reinterpret_cast<const char*>(p), t.type_length);  // FIXED_LEN_BYTE_ARRAY
  }
}

void integer_from_delta(const ValueType& t, uint64_t v, std::vector<std::string>* out) {
  if (t.physical == kInt32) {
    const uint32_t u = static_cast<uint32_t>(v);  // INT32 deltas wrap at 32 bits
    return t.is_unsigned ? append_number(u, out) : append_number(static_cast<int32_t>(u), out);
  }
  return t.is_unsigned ? append_number(v, out) : append_number(static_cast<int64_t>(v), out);
}

// DELTA_BINARY_PACKED: a header (block size, miniblocks per block, value count, first value),
// then blocks of (min delta, one bit width per miniblock, the bit-packed miniblocks). Decodes
// exactly `count` values (the header must agree) as raw 64-bit integers; arithmetic wraps.
void decode_delta_ints(Cursor& c, size_t count, std::vector<uint64_t>* out) {
  const char* what = "DELTA_BINARY_PACKED";
  const uint64_t block = c.uvarint(what), minis = c.uvarint(what), total = c.uvarint(what);
  const int64_t first = c.zigzag(what);
  if (block == 0 || block > (1u << 20) || minis == 0 || block % minis != 0 || (block / minis) % 8 != 0)
    fail(what, " header is invalid (block size ", block, ", ", minis, " miniblocks)");
  if (total != count) fail(what, " holds ", total, " values where the page needs ", count);
  out->clear();
  if (count == 0) return;
  out->reserve(count);
  const uint64_t per_mini = block / minis;
  uint64_t last = static_cast<uint64_t>(first);
  out->push_back(last);
  while (out->size() < count) {
    const uint64_t min_delta = static_cast<uint64_t>(c.zigzag(what));
    const uint8_t* widths = c.take(minis, what);
    for (uint64_t m = 0; m < minis && out->size() < count; ++m) {
      const int w = widths[m];
      if (w > 64) fail(what, " miniblock bit width ", w, " exceeds 64");
      const uint8_t* bits = c.take(per_mini * w / 8, what);  // a started miniblock is stored whole
      for (uint64_t k = 0; k < per_mini && out->size() < count; ++k) {
        last += min_delta + read_bits_lsb(bits, k * w, w);
        out->push_back(last);
      }
    }
  }
}

// Lengths for the byte-array delta encodings: non-negative and inside the page.
std::vector<uint64_t> decode_lengths(Cursor& c, size_t count, const char* what) {
  std::vector<uint64_t> lens;
  decode_delta_ints(c, count, &lens);
  for (uint64_t& l : lens) {
    const int64_t s = static_cast<int64_t>(l);
    if (s < 0 || s > INT32_MAX) fail(what, " length ", s, " is invalid");
  }
  return lens;
}

void check_budget(size_t used, size_t max_bytes, const char* what) {
  if (used > max_bytes) fail(what, " values decode to more than ", max_bytes, " bytes");
}

}  // namespace

int bit_width(uint32_t max_value) {
  int w = 0;
  while (max_value) ++w, max_value >>= 1;
  return w;
}

// ---- RLE / bit-packed hybrid --------------------------------------------------------------------

HybridDecoder::HybridDecoder(const uint8_t* data, size_t size, int bit_width)
    : p_(data), end_(data + size), width_(bit_width) {
  if (bit_width < 0 || bit_width > 32) fail("RLE bit width ", bit_width, " is out of range (0..32)");
}

void HybridDecoder::next_run() {
  Cursor c{p_, end_};
  const uint64_t header = c.uvarint("RLE");
  if (header & 1) {
    const uint64_t groups = header >> 1;  // groups of 8 values
    if (groups > (1u << 28)) fail("RLE bit-packed run of ", groups, " groups is implausible");
    packed_left_ = groups * 8;
    packed_ = c.p;
    packed_avail_ = std::min<size_t>(groups * width_, c.left());  // the last run may be cut short
    packed_bit_ = 0;
    c.p += packed_avail_;
  } else {
    rle_left_ = header >> 1;
    const uint8_t* v = c.take((width_ + 7) / 8, "RLE");
    rle_value_ = 0;
    for (int i = 0; i < (width_ + 7) / 8; ++i) rle_value_ |= static_cast<uint32_t>(v[i]) << (8 * i);
  }
  p_ = c.p;
}

void HybridDecoder::decode(size_t count, std::vector<uint32_t>* out) {
  while (count > 0) {
    if (rle_left_ > 0) {
      const size_t n = static_cast<size_t>(std::min<uint64_t>(rle_left_, count));
      out->insert(out->end(), n, rle_value_);
      rle_left_ -= n;
      count -= n;
    } else if (packed_left_ > 0) {
      const uint64_t n = std::min<uint64_t>(packed_left_, count);
      if (packed_bit_ + n * width_ > uint64_t{packed_avail_} * 8) fail("RLE bit-packed run ends early");
      for (uint64_t i = 0; i < n; ++i, packed_bit_ += width_)
        out->push_back(static_cast<uint32_t>(read_bits_lsb(packed_, packed_bit_, width_)));
      packed_left_ -= n;
      count -= n;
    } else {
      if (p_ >= end_) fail("RLE data ends before all values (", count, " missing)");
      next_run();
    }
  }
}

size_t decode_bit_packed_levels(const uint8_t* data, size_t size, int bit_width, size_t count,
                                std::vector<uint32_t>* out) {
  const uint64_t bits = uint64_t{count} * bit_width;
  const size_t bytes = static_cast<size_t>((bits + 7) / 8);
  if (bytes > size) fail("BIT_PACKED levels need ", bytes, " bytes, the page has ", size);
  out->reserve(out->size() + count);
  uint64_t b = 0;
  for (size_t i = 0; i < count; ++i) {
    uint32_t v = 0;
    for (int j = 0; j < bit_width; ++j, ++b) v = v << 1 | ((data[b >> 3] >> (7 - (b & 7))) & 1);
    out->push_back(v);
  }
  return bytes;
}

void decode_dictionary_indices(const uint8_t* data, size_t size, size_t count, std::vector<uint32_t>* out) {
  out->clear();
  if (count == 0) return;
  if (size == 0) fail("dictionary indices are missing");
  HybridDecoder d(data + 1, size - 1, data[0]);
  out->reserve(count);
  d.decode(count, out);
}

// ---- values ----------------------------------------------------------------------------------

void decode_values(const ValueType& t, int32_t encoding, const uint8_t* data, size_t size, size_t count,
                   size_t max_bytes, std::vector<std::string>* out) {
  Cursor c{data, data + size};
  const int width = fixed_width(t);
  switch (encoding) {
    case kPlain: {
      if (t.physical == kBoolean) {
        const uint8_t* bits = c.take((count + 7) / 8, "PLAIN BOOLEAN");
        out->reserve(out->size() + count);
        for (size_t i = 0; i < count; ++i) out->emplace_back((bits[i >> 3] >> (i & 7)) & 1 ? "true" : "false");
        return;
      }
      if (t.physical == kByteArray) {
        if (count > size / 4) fail("PLAIN BYTE_ARRAY data ends early (", count, " values in ", size, " bytes)");
        out->reserve(out->size() + count);
        for (size_t i = 0; i < count; ++i) {
          const uint32_t n = load_u32(c.take(4, "PLAIN BYTE_ARRAY"));
          out->emplace_back(reinterpret_cast<const char*>(c.take(n, "PLAIN BYTE_ARRAY")), n);
        }
        return;
      }
      if (width <= 0) break;
      if (count > size / width) fail("PLAIN data ends early (", count, " values of ", width, " bytes in ", size, ")");
      out->reserve(out->size() + count);
      for (size_t i = 0; i < count; ++i) append_fixed(t, data + i * width, out);
      return;
    }
    case kRle: {  // booleans only: a 4-byte length, then the hybrid with bit width 1
      if (t.physical != kBoolean) break;
      const uint32_t n = load_u32(c.take(4, "RLE BOOLEAN"));
      HybridDecoder d(c.take(n, "RLE BOOLEAN"), n, 1);
      std::vector<uint32_t> bits;
      bits.reserve(count);
      d.decode(count, &bits);
      for (uint32_t b : bits) out->emplace_back(b ? "true" : "false");
      return;
    }
    case kDeltaBinaryPacked: {
      if (t.physical != kInt32 && t.physical != kInt64) break;
      std::vector<uint64_t> v;
      decode_delta_ints(c, count, &v);
      out->reserve(out->size() + count);
      for (uint64_t x : v) integer_from_delta(t, x, out);
      return;
    }
    case kDeltaLengthByteArray: {
      if (t.physical != kByteArray) break;
      const auto lens = decode_lengths(c, count, "DELTA_LENGTH_BYTE_ARRAY");
      out->reserve(out->size() + count);
      for (uint64_t n : lens)
        out->emplace_back(reinterpret_cast<const char*>(c.take(n, "DELTA_LENGTH_BYTE_ARRAY")), n);
      return;
    }
    case kDeltaByteArray: {
      if (t.physical != kByteArray && t.physical != kFixedLenByteArray) break;
      const auto prefix = decode_lengths(c, count, "DELTA_BYTE_ARRAY");
      const auto suffix = decode_lengths(c, count, "DELTA_BYTE_ARRAY");
      out->reserve(out->size() + count);
      std::string prev;
      size_t used = 0;
      for (size_t i = 0; i < count; ++i) {
        if (prefix[i] > prev.size())
          fail("DELTA_BYTE_ARRAY prefix of ", prefix[i], " bytes is longer than the previous value (", prev.size(),
               ")");
        used += prefix[i] + suffix[i];
        check_budget(used, max_bytes, "DELTA_BYTE_ARRAY");
        prev.resize(prefix[i]);
        prev.append(reinterpret_cast<const char*>(c.take(suffix[i], "DELTA_BYTE_ARRAY")), suffix[i]);
        if (t.physical == kFixedLenByteArray && prev.size() != static_cast<size_t>(t.type_length))
          fail("DELTA_BYTE_ARRAY value of ", prev.size(), " bytes in a FIXED_LEN_BYTE_ARRAY(", t.type_length,
               ") column");
        out->push_back(prev);
      }
      return;
    }
    case kByteStreamSplit: {
      // K byte streams of `count` bytes each: byte b of value i is at b * count + i.
      if (width <= 0 || t.physical == kInt96) break;
      if (count > size / width)
        fail("BYTE_STREAM_SPLIT data ends early (", count, " values of ", width, " bytes in ", size, ")");
      std::vector<uint8_t> v(width);
      out->reserve(out->size() + count);
      for (size_t i = 0; i < count; ++i) {
        for (int b = 0; b < width; ++b) v[b] = data[b * count + i];
        append_fixed(t, v.data(), out);
      }
      return;
    }
    default: break;
  }
  fail("encoding ", encoding_name(encoding), " is not supported for ", physical_type_name(t.physical), " values");
}

}  // namespace qf::parquet
