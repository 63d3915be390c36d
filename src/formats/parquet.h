// Reads columns of a Parquet file as text: how `qforge convert` takes calibration text from a
// Hugging Face datasets export (a `text` column).
//
// Supported: the footer (Thrift compact protocol), every physical type, REQUIRED / OPTIONAL
// columns (nulls from definition levels), DATA_PAGE v1 and v2, dictionary pages; encodings
// PLAIN, PLAIN_DICTIONARY, RLE_DICTIONARY, RLE (levels, booleans), BIT_PACKED (levels),
// DELTA_BINARY_PACKED, DELTA_LENGTH_BYTE_ARRAY, DELTA_BYTE_ARRAY, BYTE_STREAM_SPLIT; codecs
// UNCOMPRESSED, SNAPPY, GZIP, ZSTD. Repeated (list/map) columns come out flattened: the leaf
// values actually present, in order, without the nulls and empty lists around them.
// Not supported, each a one-line error that names it: LZO, BROTLI, LZ4, LZ4_RAW; encrypted
// files; column chunks stored in other files. Page CRCs are not checked.
//
// The file is memory-mapped once; each column read walks that column's chunks once. Every offset,
// length and count in the file is checked before use, and decoded output is bounded (see
// parquet.cpp), so a corrupt or hostile file gives a qf::Error and nothing worse.
#pragma once
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace qf {

struct ParquetColumn {
  std::string path;  // dotted leaf path, e.g. "text" or "a.list.element"
  std::string type;  // physical type and annotation, e.g. "BYTE_ARRAY (UTF8)", "INT64"
  int max_def = 0, max_rep = 0;
};

class ParquetFile {
 public:
  // Maps the file and validates the footer, schema and column chunk ranges (not the pages).
  static ParquetFile open(const std::filesystem::path& path);
  // The same from bytes in memory; `name` stands for the file in error messages.
  static ParquetFile from_memory(std::string bytes, const std::string& name);

  int64_t num_rows() const;
  size_t num_row_groups() const;
  const std::vector<ParquetColumn>& columns() const;
  const std::string& created_by() const;

  // The values of a leaf column in row order, as text: strings and fixed-length byte arrays as
  // stored, integers in decimal (UINT_* annotated ones unsigned), floats in their shortest
  // round-trip form, booleans "true"/"false", INT96 as "YYYY-MM-DD HH:MM:SS[.nnnnnnnnn]".
  // Nulls are SKIPPED: the result holds only the values present, so for an optional column it
  // can be shorter than num_rows(). Repeated (list/map) columns come out flattened the same way.
  std::vector<std::string> read_column_text(const std::string& path) const;
  // The same with one entry per row for flat columns, nullopt where the row is null. Repeated
  // columns: the present leaf values only, flattened (no nullopt entries).
  std::vector<std::optional<std::string>> read_column_nullable(const std::string& path) const;

  struct Impl;

 private:
  explicit ParquetFile(std::shared_ptr<const Impl> impl) : impl_(std::move(impl)) {}
  std::shared_ptr<const Impl> impl_;
};

// The non-null values of `column` as strings, in row order (ParquetFile::read_column_text).
// Every failure (missing or corrupt file, unsupported codec, no such column) is a qf::Error, a
// std::runtime_error, whose message is one line that starts with the file's path, e.g.
// "wikitext.parquet: no column 'txt' (columns: text)".
std::vector<std::string> read_parquet_text_column(const std::string& path, const std::string& column);

}  // namespace qf
