// Parquet's value and level encodings, decoded from a byte range that is never overrun:
// the RLE / bit-packed hybrid (levels, dictionary indices, RLE booleans), the deprecated
// BIT_PACKED levels, PLAIN for every physical type, DELTA_BINARY_PACKED, DELTA_LENGTH_BYTE_ARRAY,
// DELTA_BYTE_ARRAY and BYTE_STREAM_SPLIT. Values come out as text (see parquet.h). Errors are
// qf::Error naming the encoding but no file, column or page: the page reader adds those.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace qf::parquet {

// Bits needed for values 0..max_value (0 for 0).
int bit_width(uint32_t max_value);

// The RLE / bit-packed hybrid: runs of one repeated value, or of groups of 8 bit-packed values
// (least significant bit first), each run behind a varint header. bit_width 0..32.
class HybridDecoder {
 public:
  HybridDecoder(const uint8_t* data, size_t size, int bit_width);
  // Appends the next `count` values to out; throws when the data ends first.
  void decode(size_t count, std::vector<uint32_t>* out);

 private:
  void next_run();
  const uint8_t* p_;
  const uint8_t* end_;
  int width_;
  uint64_t rle_left_ = 0;     // values left in the current RLE run
  uint32_t rle_value_ = 0;
  uint64_t packed_left_ = 0;  // values left in the current bit-packed run
  const uint8_t* packed_ = nullptr;  // start of that run's bytes
  size_t packed_avail_ = 0;          // bytes of it present in the data
  uint64_t packed_bit_ = 0;          // bit offset of its next value
};

// The deprecated BIT_PACKED level encoding: `count` values packed most significant bit first.
// Returns the bytes used.
size_t decode_bit_packed_levels(const uint8_t* data, size_t size, int bit_width, size_t count,
                                std::vector<uint32_t>* out);

// A physical type as the value decoders need it.
struct ValueType {
  int32_t physical = 0;     // PhysicalType
  int32_t type_length = 0;  // FIXED_LEN_BYTE_ARRAY width
  bool is_unsigned = false; // UINT_* annotation: integers printed unsigned
};

// Appends the text of `count` values stored with a non-dictionary `encoding` in [data, data+size).
// `max_bytes` bounds the text produced (a DELTA_BYTE_ARRAY page can expand quadratically).
void decode_values(const ValueType& type, int32_t encoding, const uint8_t* data, size_t size, size_t count,
                   size_t max_bytes, std::vector<std::string>* out);

// Dictionary indices of a data page: one byte of bit width, then the hybrid encoding.
void decode_dictionary_indices(const uint8_t* data, size_t size, size_t count, std::vector<uint32_t>* out);

}  // namespace qf::parquet
