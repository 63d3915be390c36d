// A small Parquet writer for the reader's tests: one INT64 "id" column (the row number, PLAIN)
// and one BYTE_ARRAY (UTF8) column of the given strings, with the layout chosen per file (codec,
// encoding, page version, required/optional, row groups, pages). It writes what the format
// allows, not what any one library does, so the reader is tested against the spec's choices.
// Test-only: it trusts its input and checks nothing.
#pragma once
#include <cstddef>
#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <vector>

namespace qf::test {

struct ParquetWriteOptions {
  std::string column = "text";
  int32_t codec = 0;             // parquet::Codec: 0 UNCOMPRESSED, 1 SNAPPY, 2 GZIP, 6 ZSTD
  bool dictionary = false;       // a dictionary page per chunk, indices in the data pages
  bool legacy_dictionary = false;  // ... named PLAIN_DICTIONARY (format 1.0) instead of RLE_DICTIONARY
  size_t dictionary_pages = std::numeric_limits<size_t>::max();  // pages per chunk using it; later ones PLAIN
  bool page_v2 = false;          // DATA_PAGE_V2 (levels outside the compressed part)
  bool v2_uncompressed = false;  // v2 pages with is_compressed = false
  bool optional = false;         // OPTIONAL text column: nullopt rows become nulls
  bool bit_packed_levels = false;  // v1 definition levels in the deprecated BIT_PACKED encoding
  size_t rows_per_group = std::numeric_limits<size_t>::max();
  size_t rows_per_page = std::numeric_limits<size_t>::max();
  // Lies, for the corrupt-input tests: added to every text data page's header fields.
  int64_t uncompressed_size_delta = 0;
  int64_t num_values_delta = 0;
  // For the hostile-footer test: zero bytes after each text page's values (readers stop at the
  // last value), and more row groups in the footer that all point at the first one's bytes.
  size_t value_padding = 0;
  size_t repeat_first_group = 0;
};

// The bytes of a Parquet file holding `rows` in the text column (nullopt = null; only with
// optional).
std::string write_parquet(const std::vector<std::optional<std::string>>& rows, const ParquetWriteOptions& options);

// Compresses with a Parquet codec (0 UNCOMPRESSED, 1 SNAPPY, 2 GZIP, 6 ZSTD).
std::string compress_for_parquet(int32_t codec, const std::string& data);

}  // namespace qf::test
