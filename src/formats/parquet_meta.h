// Parquet's footer (FileMetaData) and page headers as plain structs, decoded from the Thrift
// compact protocol. Only the fields a reader needs are kept; the rest (statistics, indexes, bloom
// filters, key/value metadata) is skipped. Enum values are kept as the integers on the wire, so
// an unknown codec or encoding can be named in an error instead of failing the whole footer.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "formats/thrift_compact.h"

namespace qf::parquet {

enum PhysicalType : int32_t {
  kBoolean = 0,
  kInt32 = 1,
  kInt64 = 2,
  kInt96 = 3,
  kFloat = 4,
  kDouble = 5,
  kByteArray = 6,
  kFixedLenByteArray = 7,
};

enum Repetition : int32_t { kRequired = 0, kOptional = 1, kRepeated = 2 };

enum Encoding : int32_t {
  kPlain = 0,
  kPlainDictionary = 2,
  kRle = 3,
  kBitPacked = 4,
  kDeltaBinaryPacked = 5,
  kDeltaLengthByteArray = 6,
  kDeltaByteArray = 7,
  kRleDictionary = 8,
  kByteStreamSplit = 9,
};

enum Codec : int32_t {
  kUncompressed = 0,
  kSnappy = 1,
  kGzip = 2,
  kLzo = 3,
  kBrotli = 4,
  kLz4 = 5,
  kZstd = 6,
  kLz4Raw = 7,
};

enum PageType : int32_t { kDataPage = 0, kIndexPage = 1, kDictionaryPage = 2, kDataPageV2 = 3 };

// Names for messages; unknown values come out as e.g. "encoding #42".
std::string physical_type_name(int32_t t);
std::string encoding_name(int32_t e);
std::string codec_name(int32_t c);
std::string page_type_name(int32_t t);
std::string converted_type_name(int32_t c);
std::string logical_type_name(int32_t union_field_id);

struct SchemaElement {
  std::string name;
  std::optional<int32_t> type;  // set on leaves only
  int32_t type_length = 0;      // FIXED_LEN_BYTE_ARRAY width
  std::optional<int32_t> repetition;
  std::optional<int32_t> num_children;  // set on groups only
  std::optional<int32_t> converted_type;
  std::optional<int32_t> logical_type;  // the LogicalType union's field id (1 = STRING, ...)
};

struct ColumnChunkMeta {
  std::optional<std::string> file_path;  // data in another file (unsupported)
  bool has_meta_data = false;
  int32_t type = -1;
  std::vector<std::string> path_in_schema;
  int32_t codec = 0;
  int64_t num_values = 0;
  int64_t total_uncompressed_size = 0;
  int64_t total_compressed_size = 0;
  int64_t data_page_offset = 0;
  std::optional<int64_t> dictionary_page_offset;
  bool encrypted = false;  // crypto_metadata or encrypted_column_metadata present
};

struct RowGroupMeta {
  std::vector<ColumnChunkMeta> columns;
  int64_t num_rows = 0;
};

struct FileMetaData {
  int32_t version = 0;
  std::vector<SchemaElement> schema;
  int64_t num_rows = 0;
  std::vector<RowGroupMeta> row_groups;
  std::string created_by;
  bool encrypted = false;  // encryption_algorithm present (plaintext footer of an encrypted file)
};

// Decodes the footer's FileMetaData; throws qf::Error("Thrift: ..." or "...: missing field").
FileMetaData decode_file_metadata(const uint8_t* data, size_t size);

struct PageHeader {
  int32_t type = -1;
  int32_t uncompressed_page_size = -1;
  int32_t compressed_page_size = -1;
  // DATA_PAGE (v1) and DATA_PAGE_V2
  int32_t num_values = -1;
  int32_t encoding = -1;
  int32_t def_level_encoding = kRle;  // v1 only
  int32_t rep_level_encoding = kRle;  // v1 only
  // DATA_PAGE_V2 only
  int32_t num_nulls = 0;
  int32_t num_rows = 0;
  int32_t def_levels_byte_length = 0;
  int32_t rep_levels_byte_length = 0;
  bool is_compressed = true;
  bool has_data_header = false;  // the header struct matching `type` was present
};

// Decodes one PageHeader at the reader's position (the reader then points at the page body).
PageHeader decode_page_header(thrift::CompactReader& r);

}  // namespace qf::parquet
