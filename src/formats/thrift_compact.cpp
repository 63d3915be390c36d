#include "formats/thrift_compact.h"

#include <cstring>
#include <limits>

#include "core/error.h"

namespace qf::thrift {

const char* type_name(Type t) {
  switch (t) {
    case Type::Stop: return "stop";
    case Type::BoolTrue:
    case Type::BoolFalse: return "bool";
    case Type::Byte: return "byte";
    case Type::I16: return "i16";
    case Type::I32: return "i32";
    case Type::I64: return "i64";
    case Type::Double: return "double";
    case Type::Binary: return "binary";
    case Type::List: return "list";
    case Type::Set: return "set";
    case Type::Map: return "map";
    case Type::Struct: return "struct";
    case Type::Uuid: return "uuid";
  }
  return "unknown";
}

namespace {

bool is_integer(Type t) { return t == Type::Byte || t == Type::I16 || t == Type::I32 || t == Type::I64; }

Type wire_type(uint8_t nibble, size_t at) {
  if (nibble > static_cast<uint8_t>(Type::Uuid)) fail("Thrift: unknown wire type ", int(nibble), " at byte ", at);
  return static_cast<Type>(nibble);
}

}  // namespace

uint8_t CompactReader::read_u8() {
  if (p_ >= end_) fail("Thrift: data ends early at byte ", position());
  return *p_++;
}

uint64_t CompactReader::read_varint() {
  uint64_t v = 0;
  for (int shift = 0; shift < 64; shift += 7) {
    const uint8_t b = read_u8();
    v |= static_cast<uint64_t>(b & 0x7F) << shift;
    if (!(b & 0x80)) return v;
  }
  fail("Thrift: varint longer than 10 bytes at byte ", position());
}

void CompactReader::enter() {
  if (++depth_ > kMaxDepth) fail("Thrift: nesting deeper than ", kMaxDepth, " levels at byte ", position());
}

void CompactReader::expect(Type got, Type want) const {
  if (got != want)
    fail("Thrift: found a ", type_name(got), " where a ", type_name(want), " belongs (byte ", position(), ")");
}

void CompactReader::begin_struct() {
  enter();
  last_field_.push_back(0);
}

bool CompactReader::next_field(int16_t* id, Type* type) {
  const size_t at = position();
  const uint8_t h = read_u8();
  const Type t = wire_type(h & 0x0F, at);
  if (t == Type::Stop) {
    last_field_.pop_back();
    --depth_;
    return false;
  }
  int64_t fid;
  if (h >> 4) {
    fid = int64_t{last_field_.back()} + (h >> 4);  // short form: delta from the previous field
  } else {
    fid = read_zigzag();  // long form: the id itself as a zigzag i16
  }
  if (fid < std::numeric_limits<int16_t>::min() || fid > std::numeric_limits<int16_t>::max())
    fail("Thrift: field id ", fid, " out of range at byte ", at);
  last_field_.back() = static_cast<int16_t>(fid);
  *id = static_cast<int16_t>(fid);
  *type = t;
  return true;
}

bool CompactReader::read_bool(Type t) {
  if (t == Type::BoolTrue) return true;
  if (t == Type::BoolFalse) return false;
  fail("Thrift: found a ", type_name(t), " where a bool belongs (byte ", position(), ")");
}

int64_t CompactReader::read_i64(Type t) {
  if (t == Type::Byte) return static_cast<int8_t>(read_u8());
  if (!is_integer(t)) fail("Thrift: found a ", type_name(t), " where an integer belongs (byte ", position(), ")");
  return read_zigzag();
}

int32_t CompactReader::read_i32(Type t) {
  const size_t at = position();
  const int64_t v = read_i64(t);
  if (v < std::numeric_limits<int32_t>::min() || v > std::numeric_limits<int32_t>::max())
    fail("Thrift: integer ", v, " does not fit 32 bits (byte ", at, ")");
  return static_cast<int32_t>(v);
}

double CompactReader::read_double(Type t) {
  expect(t, Type::Double);
  if (remaining() < 8) fail("Thrift: data ends early at byte ", position());
  uint64_t bits = 0;
  for (int i = 7; i >= 0; --i) bits = (bits << 8) | p_[i];  // little-endian on the wire
  p_ += 8;
  double d;
  std::memcpy(&d, &bits, sizeof d);
  return d;
}

std::string_view CompactReader::read_binary(Type t) {
  expect(t, Type::Binary);
  const size_t at = position();
  const uint64_t n = read_varint();
  if (n > remaining())
    fail("Thrift: string of ", n, " bytes at byte ", at, " runs past the end (", remaining(), " left)");
  std::string_view s(reinterpret_cast<const char*>(p_), static_cast<size_t>(n));
  p_ += n;
  return s;
}

CompactReader::ListHeader CompactReader::read_list_header(Type t) {
  if (t != Type::List && t != Type::Set) expect(t, Type::List);
  const size_t at = position();
  const uint8_t h = read_u8();
  uint64_t n = h >> 4;
  if (n == 15) n = read_varint();  // long form: the count follows as a varint
  const Type elem = wire_type(h & 0x0F, at);
  if (elem == Type::Stop && n > 0) fail("Thrift: list of invalid element type at byte ", at);
  // Every element takes at least one byte, so a longer list cannot be in the data.
  if (n > remaining())
    fail("Thrift: list of ", n, " elements at byte ", at, " runs past the end (", remaining(), " bytes left)");
  enter();
  return {elem, static_cast<uint32_t>(n)};
}

void CompactReader::end_list() { --depth_; }

void CompactReader::skip(Type t) {
  switch (t) {
    case Type::BoolTrue:
    case Type::BoolFalse: return;  // a field's bool lives in its header (list elements: see below)
    case Type::Byte: read_u8(); return;
    case Type::I16:
    case Type::I32:
    case Type::I64: read_varint(); return;
    case Type::Double: read_double(t); return;
    case Type::Binary: read_binary(t); return;
    case Type::Uuid:
      if (remaining() < 16) fail("Thrift: data ends early at byte ", position());
      p_ += 16;
      return;
    case Type::List:
    case Type::Set: {
      const ListHeader h = read_list_header(t);
      for (uint32_t i = 0; i < h.size; ++i) {
        if (h.elem == Type::BoolTrue || h.elem == Type::BoolFalse) read_u8();  // one byte per element
        else skip(h.elem);
      }
      end_list();
      return;
    }
    case Type::Map: {
      const size_t at = position();
      const uint64_t n = read_varint();
      if (n == 0) return;
      const uint8_t kv = read_u8();
      const Type k = wire_type(kv >> 4, at), v = wire_type(kv & 0x0F, at);
      if (k == Type::Stop || v == Type::Stop || n > remaining() / 2)
        fail("Thrift: map of ", n, " entries at byte ", at, " is malformed or runs past the end");
      enter();
      for (uint64_t i = 0; i < n; ++i) {
        for (Type e : {k, v}) {
          if (e == Type::BoolTrue || e == Type::BoolFalse) read_u8();
          else skip(e);
        }
      }
      --depth_;
      return;
    }
    case Type::Struct: {
      begin_struct();
      int16_t id;
      Type ft;
      while (next_field(&id, &ft)) skip(ft);
      return;
    }
    case Type::Stop: break;
  }
  fail("Thrift: cannot skip a value of type ", type_name(t), " at byte ", position());
}

}  // namespace qf::thrift
