// A reader for Thrift's compact protocol, the encoding of Parquet's footer and page headers.
// It decodes from a byte range it never leaves: every length and count is checked against the
// bytes that remain, and nesting is bounded, so a hostile input cannot make it crash, recurse
// without end or allocate more than the input's size. Errors are qf::Error without a file name
// (the caller knows which file and structure it was reading and adds that).
#pragma once
#include <cstddef>
#include <cstdint>
#include <string_view>
#include <vector>

namespace qf::thrift {

// Wire types of the compact protocol (a field header's low nibble, a list's element type).
enum class Type : uint8_t {
  Stop = 0,
  BoolTrue = 1,  // in a field header the type carries the value; as a list element it is a byte
  BoolFalse = 2,
  Byte = 3,
  I16 = 4,
  I32 = 5,
  I64 = 6,
  Double = 7,
  Binary = 8,
  List = 9,
  Set = 10,
  Map = 11,
  Struct = 12,
  Uuid = 13,
};

const char* type_name(Type t);

class CompactReader {
 public:
  // Deepest struct/list/map nesting accepted; Parquet's own metadata needs about 8.
  static constexpr int kMaxDepth = 64;

  CompactReader(const uint8_t* data, size_t size) : p_(data), begin_(data), end_(data + size) {}

  size_t position() const { return static_cast<size_t>(p_ - begin_); }
  size_t remaining() const { return static_cast<size_t>(end_ - p_); }

  // Structs: begin_struct(), then next_field() until it returns false (it consumed the STOP and
  // closed the struct). Every field must be read with a read_* call or skip(type).
  void begin_struct();
  bool next_field(int16_t* id, Type* type);

  // Scalars. `t` is the wire type from the field header or list header; a mismatch (for example
  // a string where a number belongs) is an error. Integers of any width are accepted where the
  // value fits.
  bool read_bool(Type t);  // field (the type is the value) or list element (a byte)
  int32_t read_i32(Type t);
  int64_t read_i64(Type t);
  double read_double(Type t);
  std::string_view read_binary(Type t);  // a view into the input

  // Lists and sets: the element type and count (count checked against the remaining bytes,
  // every element taking at least one). Elements then follow with read_*/skip(elem).
  struct ListHeader {
    Type elem;
    uint32_t size;
  };
  ListHeader read_list_header(Type t);
  void end_list();  // pairs with read_list_header (nesting bookkeeping)

  // Skips one value of wire type t, whatever it holds.
  void skip(Type t);

 private:
  uint64_t read_varint();
  int64_t read_zigzag() {
    const uint64_t v = read_varint();
    return static_cast<int64_t>(v >> 1) ^ -static_cast<int64_t>(v & 1);
  }
  uint8_t read_u8();
  void enter();
  void expect(Type got, Type want) const;

  const uint8_t* p_;
  const uint8_t* begin_;
  const uint8_t* end_;
  int depth_ = 0;
  std::vector<int16_t> last_field_;  // per open struct: the previous field id (for deltas)
};

}  // namespace qf::thrift
