#include "formats/parquet_meta.h"

#include "core/error.h"

namespace qf::parquet {

using thrift::CompactReader;
using thrift::Type;

namespace {

std::string enum_name(int32_t v, const char* const* names, int32_t count, const char* what) {
  if (v >= 0 && v < count && names[v][0] != '\0') return names[v];
  return str(what, " #", v);
}

// Reads a list of structs, calling each(i) with the reader positioned at element i.
template <typename F>
void read_struct_list(CompactReader& r, Type t, F each) {
  const auto h = r.read_list_header(t);
  if (h.size > 0 && h.elem != Type::Struct)
    fail("Thrift: list of ", thrift::type_name(h.elem), " where a list of structs belongs");
  for (uint32_t i = 0; i < h.size; ++i) each(i);
  r.end_list();
}

std::vector<std::string> read_string_list(CompactReader& r, Type t) {
  const auto h = r.read_list_header(t);
  if (h.size > 0 && h.elem != Type::Binary)
    fail("Thrift: list of ", thrift::type_name(h.elem), " where strings belong");
  std::vector<std::string> out;
  out.reserve(h.size);  // bounded by the bytes left (read_list_header checked)
  for (uint32_t i = 0; i < h.size; ++i) out.emplace_back(r.read_binary(h.elem));
  r.end_list();
  return out;
}

// The LogicalType union: which member is set (its field id); the member's own fields are skipped.
int32_t read_logical_type(CompactReader& r, Type t) {
  if (t != Type::Struct) fail("Thrift: LogicalType is a ", thrift::type_name(t), ", not a struct");
  r.begin_struct();
  int32_t which = 0;
  int16_t id;
  Type ft;
  while (r.next_field(&id, &ft)) {
    if (ft == Type::Struct && which == 0) which = id;
    r.skip(ft);
  }
  return which;
}

SchemaElement read_schema_element(CompactReader& r) {
  SchemaElement e;
  bool has_name = false;
  r.begin_struct();
  int16_t id;
  Type t;
  while (r.next_field(&id, &t)) {
    switch (id) {
      case 1: e.type = r.read_i32(t); break;
      case 2: e.type_length = r.read_i32(t); break;
      case 3: e.repetition = r.read_i32(t); break;
      case 4: e.name = std::string(r.read_binary(t)), has_name = true; break;
      case 5: e.num_children = r.read_i32(t); break;
      case 6: e.converted_type = r.read_i32(t); break;
      case 10: e.logical_type = read_logical_type(r, t); break;
      default: r.skip(t);
    }
  }
  if (!has_name) fail("schema element without a name");
  return e;
}

void read_column_meta(CompactReader& r, Type t, ColumnChunkMeta* c) {
  if (t != Type::Struct) fail("Thrift: ColumnMetaData is a ", thrift::type_name(t), ", not a struct");
  unsigned seen = 0;  // bit per required field
  r.begin_struct();
  int16_t id;
  Type ft;
  while (r.next_field(&id, &ft)) {
    switch (id) {
      case 1: c->type = r.read_i32(ft), seen |= 1; break;
      case 3: c->path_in_schema = read_string_list(r, ft), seen |= 2; break;
      case 4: c->codec = r.read_i32(ft), seen |= 4; break;
      case 5: c->num_values = r.read_i64(ft), seen |= 8; break;
      case 6: c->total_uncompressed_size = r.read_i64(ft); break;
      case 7: c->total_compressed_size = r.read_i64(ft), seen |= 16; break;
      case 9: c->data_page_offset = r.read_i64(ft), seen |= 32; break;
      case 11: c->dictionary_page_offset = r.read_i64(ft); break;
      default: r.skip(ft);
    }
  }
  static const char* const kRequired[] = {"type", "path_in_schema", "codec", "num_values", "total_compressed_size",
                                          "data_page_offset"};
  for (int i = 0; i < 6; ++i)
    if (!(seen & (1u << i))) fail("column metadata lacks the required field ", kRequired[i]);
}

ColumnChunkMeta read_column_chunk(CompactReader& r) {
  ColumnChunkMeta c;
  r.begin_struct();
  int16_t id;
  Type t;
  while (r.next_field(&id, &t)) {
    switch (id) {
      case 1: c.file_path = std::string(r.read_binary(t)); break;
      case 3: read_column_meta(r, t, &c), c.has_meta_data = true; break;
      case 8:
      case 9: c.encrypted = true, r.skip(t); break;
      default: r.skip(t);
    }
  }
  return c;
}

RowGroupMeta read_row_group(CompactReader& r) {
  RowGroupMeta g;
  bool has_columns = false, has_rows = false;
  r.begin_struct();
  int16_t id;
  Type t;
  while (r.next_field(&id, &t)) {
    switch (id) {
      case 1:
        read_struct_list(r, t, [&](uint32_t) { g.columns.push_back(read_column_chunk(r)); });
        has_columns = true;
        break;
      case 3: g.num_rows = r.read_i64(t), has_rows = true; break;
      default: r.skip(t);
    }
  }
  if (!has_columns || !has_rows) fail("row group lacks its ", has_columns ? "num_rows" : "columns");
  return g;
}

}  // namespace

std::string physical_type_name(int32_t t) {
  static const char* const k[] = {"BOOLEAN", "INT32",  "INT64",      "INT96",
                                  "FLOAT",   "DOUBLE", "BYTE_ARRAY", "FIXED_LEN_BYTE_ARRAY"};
  return enum_name(t, k, 8, "type");
}

std::string encoding_name(int32_t e) {
  static const char* const k[] = {"PLAIN",      "GROUP_VAR_INT",      "PLAIN_DICTIONARY",
                                  "RLE",        "BIT_PACKED",         "DELTA_BINARY_PACKED",
                                  "DELTA_LENGTH_BYTE_ARRAY", "DELTA_BYTE_ARRAY", "RLE_DICTIONARY",
                                  "BYTE_STREAM_SPLIT"};
  return enum_name(e, k, 10, "encoding");
}

std::string codec_name(int32_t c) {
  static const char* const k[] = {"UNCOMPRESSED", "SNAPPY", "GZIP", "LZO", "BROTLI", "LZ4", "ZSTD", "LZ4_RAW"};
  return enum_name(c, k, 8, "codec");
}

std::string page_type_name(int32_t t) {
  static const char* const k[] = {"DATA_PAGE", "INDEX_PAGE", "DICTIONARY_PAGE", "DATA_PAGE_V2"};
  return enum_name(t, k, 4, "page type");
}

std::string converted_type_name(int32_t c) {
  static const char* const k[] = {"UTF8",        "MAP",         "MAP_KEY_VALUE",    "LIST",
                                  "ENUM",        "DECIMAL",     "DATE",             "TIME_MILLIS",
                                  "TIME_MICROS", "TIMESTAMP_MILLIS", "TIMESTAMP_MICROS", "UINT_8",
                                  "UINT_16",     "UINT_32",     "UINT_64",          "INT_8",
                                  "INT_16",      "INT_32",      "INT_64",           "JSON",
                                  "BSON",        "INTERVAL"};
  return enum_name(c, k, 22, "converted type");
}

std::string logical_type_name(int32_t id) {
  static const char* const k[] = {"",       "STRING",  "MAP",  "LIST",    "ENUM",    "DECIMAL", "DATE",
                                  "TIME",   "TIMESTAMP", "",   "INTEGER", "UNKNOWN", "JSON",    "BSON",
                                  "UUID",   "FLOAT16", "VARIANT", "GEOMETRY", "GEOGRAPHY"};
  return enum_name(id, k, 19, "logical type");
}

FileMetaData decode_file_metadata(const uint8_t* data, size_t size) {
  CompactReader r(data, size);
  FileMetaData m;
  bool has_schema = false, has_rows = false, has_groups = false;
  r.begin_struct();
  int16_t id;
  Type t;
  while (r.next_field(&id, &t)) {
    switch (id) {
      case 1: m.version = r.read_i32(t); break;
      case 2:
        read_struct_list(r, t, [&](uint32_t) { m.schema.push_back(read_schema_element(r)); });
        has_schema = true;
        break;
      case 3: m.num_rows = r.read_i64(t), has_rows = true; break;
      case 4:
        read_struct_list(r, t, [&](uint32_t i) {
          try {
            m.row_groups.push_back(read_row_group(r));
          } catch (const Error& e) {
            fail(e.what(), " (row group ", i, ")");
          }
        });
        has_groups = true;
        break;
      case 6: m.created_by = std::string(r.read_binary(t)); break;
      case 8: m.encrypted = true, r.skip(t); break;
      default: r.skip(t);
    }
  }
  if (!has_schema) fail("file metadata lacks the schema");
  if (!has_rows) fail("file metadata lacks num_rows");
  if (!has_groups) fail("file metadata lacks the row group list");
  return m;
}

PageHeader decode_page_header(CompactReader& r) {
  PageHeader h;
  bool has_type = false, has_u = false, has_c = false;
  int16_t member = 0;  // which of the per-type headers (fields 5, 7, 8) was decoded
  r.begin_struct();
  int16_t id;
  Type t;
  while (r.next_field(&id, &t)) {
    switch (id) {
      case 1: h.type = r.read_i32(t), has_type = true; break;
      case 2: h.uncompressed_page_size = r.read_i32(t), has_u = true; break;
      case 3: h.compressed_page_size = r.read_i32(t), has_c = true; break;
      case 5:  // DataPageHeader
      case 7:  // DictionaryPageHeader
      case 8: {  // DataPageHeaderV2
        if (t != Type::Struct) fail("Thrift: page header field ", id, " is a ", thrift::type_name(t), ", not a struct");
        // Only the member matching the page type counts (a writer may not set several).
        const bool wanted = (id == 5 && h.type == kDataPage) || (id == 7 && h.type == kDictionaryPage) ||
                            (id == 8 && h.type == kDataPageV2) || !has_type;
        if (!wanted) {
          r.skip(t);
          break;
        }
        bool has_n = false, has_enc = false;
        r.begin_struct();
        int16_t fid;
        Type ft;
        while (r.next_field(&fid, &ft)) {
          if (fid == 1) {
            h.num_values = r.read_i32(ft), has_n = true;
          } else if (id == 5 && fid == 2) {
            h.encoding = r.read_i32(ft), has_enc = true;
          } else if (id == 5 && fid == 3) {
            h.def_level_encoding = r.read_i32(ft);
          } else if (id == 5 && fid == 4) {
            h.rep_level_encoding = r.read_i32(ft);
          } else if (id == 7 && fid == 2) {
            h.encoding = r.read_i32(ft), has_enc = true;
          } else if (id == 8 && fid == 2) {
            h.num_nulls = r.read_i32(ft);
          } else if (id == 8 && fid == 3) {
            h.num_rows = r.read_i32(ft);
          } else if (id == 8 && fid == 4) {
            h.encoding = r.read_i32(ft), has_enc = true;
          } else if (id == 8 && fid == 5) {
            h.def_levels_byte_length = r.read_i32(ft);
          } else if (id == 8 && fid == 6) {
            h.rep_levels_byte_length = r.read_i32(ft);
          } else if (id == 8 && fid == 7) {
            h.is_compressed = r.read_bool(ft);
          } else {
            r.skip(ft);
          }
        }
        if (!has_n || !has_enc) fail("page header lacks num_values or encoding");
        member = id;
        break;
      }
      default: r.skip(t);
    }
  }
  if (!has_type || !has_u || !has_c) fail("page header lacks its type or sizes");
  h.has_data_header = (member == 5 && h.type == kDataPage) || (member == 7 && h.type == kDictionaryPage) ||
                      (member == 8 && h.type == kDataPageV2);
  return h;
}

}  // namespace qf::parquet
