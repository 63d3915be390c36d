#include "parquet_writer.h"

#include <snappy-c.h>
#include <zlib.h>
#include <zstd.h>

#include <algorithm>
#include <map>
#include <stdexcept>

namespace qf::test {

namespace {

// Thrift compact protocol, the subset a footer and page headers use.
enum : uint8_t { kTrue = 1, kFalse = 2, kI32 = 5, kI64 = 6, kBinary = 8, kList = 9, kStruct = 12 };

class ThriftOut {
 public:
  std::string bytes;

  void begin_struct() { last_id_.push_back(0); }
  void end_struct() {
    bytes.push_back(0);  // STOP
    last_id_.pop_back();
  }
  void i32(int16_t id, int64_t v) { field(id, kI32), zigzag(v); }
  void i64(int16_t id, int64_t v) { field(id, kI64), zigzag(v); }
  void boolean(int16_t id, bool v) { field(id, v ? kTrue : kFalse); }
  void binary(int16_t id, const std::string& s) { field(id, kBinary), raw_binary(s); }
  void struct_field(int16_t id) { field(id, kStruct), begin_struct(); }
  // A list field; its elements follow as raw_* values or begin_struct()/end_struct() pairs.
  void list(int16_t id, uint8_t elem, size_t n) {
    field(id, kList);
    if (n < 15) {
      bytes.push_back(static_cast<char>(n << 4 | elem));
    } else {
      bytes.push_back(static_cast<char>(0xF0 | elem));
      varint(n);
    }
  }
  void raw_zigzag(int64_t v) { zigzag(v); }
  void raw_binary(const std::string& s) {
    varint(s.size());
    bytes += s;
  }

 private:
  void field(int16_t id, uint8_t type) {
    const int delta = id - last_id_.back();
    if (delta > 0 && delta <= 15) {
      bytes.push_back(static_cast<char>(delta << 4 | type));
    } else {
      bytes.push_back(static_cast<char>(type));
      zigzag(id);
    }
    last_id_.back() = id;
  }
  void varint(uint64_t v) {
    while (v >= 0x80) bytes.push_back(static_cast<char>(v | 0x80)), v >>= 7;
    bytes.push_back(static_cast<char>(v));
  }
  void zigzag(int64_t v) { varint((static_cast<uint64_t>(v) << 1) ^ static_cast<uint64_t>(v >> 63)); }
  std::vector<int16_t> last_id_;
};

void put_u32(std::string* out, uint32_t v) {
  for (int i = 0; i < 4; ++i) out->push_back(static_cast<char>(v >> (8 * i)));
}

void put_varint(std::string* out, uint64_t v) {
  while (v >= 0x80) out->push_back(static_cast<char>(v | 0x80)), v >>= 7;
  out->push_back(static_cast<char>(v));
}

// The RLE / bit-packed hybrid: an RLE run wherever 8 or more equal values start, groups of 8
// bit-packed values elsewhere (the last group padded with zeros), so both run kinds get used.
std::string encode_hybrid(const std::vector<uint32_t>& v, int width) {
  std::string out;
  const auto run_at = [&](size_t i) {
    size_t n = 1;
    while (i + n < v.size() && v[i + n] == v[i]) ++n;
    return n;
  };
  size_t i = 0;
  while (i < v.size()) {
    const size_t run = run_at(i);
    if (run >= 8) {
      put_varint(&out, uint64_t{run} << 1);
      for (int b = 0; b < (width + 7) / 8; ++b) out.push_back(static_cast<char>(v[i] >> (8 * b)));
      i += run;
      continue;
    }
    const size_t start = i;
    size_t n = 0;
    do {
      n += 8;
      i = std::min(start + n, v.size());
    } while (i < v.size() && run_at(i) < 8);
    put_varint(&out, (uint64_t{n / 8} << 1) | 1);
    std::string packed(n * width / 8, '\0');
    for (size_t k = 0; k < n && start + k < v.size(); ++k)
      for (int b = 0; b < width; ++b)
        if (v[start + k] >> b & 1) {
          const size_t bit = k * width + b;
          packed[bit / 8] = static_cast<char>(packed[bit / 8] | 1 << (bit % 8));
        }
    out += packed;
  }
  return out;
}

int width_for(size_t max_value) {
  int w = 0;
  while (max_value >> w) ++w;
  return w;
}

std::string plain_strings(const std::vector<const std::string*>& values) {
  std::string out;
  for (const std::string* s : values) {
    put_u32(&out, static_cast<uint32_t>(s->size()));
    out += *s;
  }
  return out;
}

struct Page {
  std::string bytes;              // header and body
  int64_t uncompressed_size = 0;  // header and uncompressed body
};

Page page(ThriftOut& header, const std::string& body, size_t uncompressed_body) {
  Page p;
  p.bytes = header.bytes + body;
  p.uncompressed_size = static_cast<int64_t>(header.bytes.size() + uncompressed_body);
  return p;
}

Page dictionary_page(const ParquetWriteOptions& o, const std::vector<const std::string*>& dict) {
  const std::string plain = plain_strings(dict);
  const std::string body = compress_for_parquet(o.codec, plain);
  ThriftOut h;
  h.begin_struct();
  h.i32(1, 2);  // DICTIONARY_PAGE
  h.i32(2, static_cast<int64_t>(plain.size()));
  h.i32(3, static_cast<int64_t>(body.size()));
  h.struct_field(7);
  h.i32(1, static_cast<int64_t>(dict.size()));
  h.i32(2, o.legacy_dictionary ? 2 : 0);  // PLAIN_DICTIONARY or PLAIN
  h.end_struct();
  h.end_struct();
  return page(h, body, plain.size());
}

// A data page of `levels` entries; def_levels is empty for a required column.
Page data_page(const ParquetWriteOptions& o, size_t levels, const std::vector<uint32_t>& def_levels, int32_t encoding,
               const std::string& values, bool lie) {
  const int64_t size_lie = lie ? o.uncompressed_size_delta : 0, count_lie = lie ? o.num_values_delta : 0;
  const std::string def = def_levels.empty() ? "" : encode_hybrid(def_levels, 1);
  const size_t nulls = static_cast<size_t>(std::count(def_levels.begin(), def_levels.end(), 0u));
  ThriftOut h;
  h.begin_struct();
  if (!o.page_v2) {
    std::string plain;
    if (!def_levels.empty() && o.bit_packed_levels) {
      // Most significant bit first, no length prefix (width 1 for an optional column).
      std::string packed((def_levels.size() + 7) / 8, '\0');
      for (size_t i = 0; i < def_levels.size(); ++i)
        if (def_levels[i]) packed[i / 8] = static_cast<char>(packed[i / 8] | 0x80 >> (i % 8));
      plain += packed;
    } else if (!def_levels.empty()) {
      put_u32(&plain, static_cast<uint32_t>(def.size()));
      plain += def;
    }
    plain += values;
    const std::string body = compress_for_parquet(o.codec, plain);
    h.i32(1, 0);  // DATA_PAGE
    h.i32(2, static_cast<int64_t>(plain.size()) + size_lie);
    h.i32(3, static_cast<int64_t>(body.size()));
    h.struct_field(5);
    h.i32(1, static_cast<int64_t>(levels) + count_lie);
    h.i32(2, encoding);
    h.i32(3, o.bit_packed_levels ? 4 : 3);  // definition levels: BIT_PACKED or RLE
    h.i32(4, 3);  // repetition levels: RLE
    h.end_struct();
    h.end_struct();
    return page(h, body, plain.size());
  }
  // v2: the levels stay uncompressed in front; an empty value section is left out entirely.
  const bool compressed = !o.v2_uncompressed && o.codec != 0;
  const std::string packed = values.empty() ? "" : compressed ? compress_for_parquet(o.codec, values) : values;
  h.i32(1, 3);  // DATA_PAGE_V2
  h.i32(2, static_cast<int64_t>(def.size() + values.size()) + size_lie);
  h.i32(3, static_cast<int64_t>(def.size() + packed.size()));
  h.struct_field(8);
  h.i32(1, static_cast<int64_t>(levels) + count_lie);
  h.i32(2, static_cast<int64_t>(nulls));
  h.i32(3, static_cast<int64_t>(levels));  // num_rows: flat column, one level per row
  h.i32(4, encoding);
  h.i32(5, static_cast<int64_t>(def.size()));
  h.i32(6, 0);
  if (!compressed) h.boolean(7, false);  // default true
  h.end_struct();
  h.end_struct();
  return page(h, def + packed, def.size() + values.size());
}

struct Chunk {
  int32_t type = 0;
  std::string name;
  std::vector<int32_t> encodings;
  int64_t num_values = 0;
  int64_t start = 0, data_page_offset = 0, dictionary_page_offset = -1;
  int64_t compressed = 0, uncompressed = 0;
};

void add_page(std::string* file, Chunk* c, const Page& p) {
  file->append(p.bytes);
  c->compressed += static_cast<int64_t>(p.bytes.size());
  c->uncompressed += p.uncompressed_size;
}

void write_column_meta(ThriftOut& t, const Chunk& c, int32_t codec) {
  t.begin_struct();  // ColumnChunk
  t.i64(2, c.start);  // file_offset
  t.struct_field(3);  // ColumnMetaData
  t.i32(1, c.type);
  t.list(2, kI32, c.encodings.size());
  for (int32_t e : c.encodings) t.raw_zigzag(e);
  t.list(3, kBinary, 1);
  t.raw_binary(c.name);
  t.i32(4, codec);
  t.i64(5, c.num_values);
  t.i64(6, c.uncompressed);
  t.i64(7, c.compressed);
  t.i64(9, c.data_page_offset);
  if (c.dictionary_page_offset >= 0) t.i64(11, c.dictionary_page_offset);
  t.end_struct();
  t.end_struct();
}

}  // namespace

std::string compress_for_parquet(int32_t codec, const std::string& data) {
  switch (codec) {
    case 0: return data;
    case 1: {
      std::string out(snappy_max_compressed_length(data.size()), '\0');
      size_t n = out.size();
      if (snappy_compress(data.data(), data.size(), out.data(), &n) != SNAPPY_OK) throw std::runtime_error("snappy");
      out.resize(n);
      return out;
    }
    case 2: {
      z_stream zs{};
      if (deflateInit2(&zs, Z_DEFAULT_COMPRESSION, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY) != Z_OK)  // +16: gzip
        throw std::runtime_error("deflateInit2");
      std::string out(deflateBound(&zs, data.size()), '\0');
      zs.next_in = reinterpret_cast<Bytef*>(const_cast<char*>(data.data()));
      zs.avail_in = static_cast<uInt>(data.size());
      zs.next_out = reinterpret_cast<Bytef*>(out.data());
      zs.avail_out = static_cast<uInt>(out.size());
      const int ret = deflate(&zs, Z_FINISH);
      out.resize(zs.total_out);
      deflateEnd(&zs);
      if (ret != Z_STREAM_END) throw std::runtime_error("deflate");
      return out;
    }
    case 6: {
      std::string out(ZSTD_compressBound(data.size()), '\0');
      const size_t n = ZSTD_compress(out.data(), out.size(), data.data(), data.size(), 3);
      if (ZSTD_isError(n)) throw std::runtime_error("ZSTD_compress");
      out.resize(n);
      return out;
    }
    default: throw std::runtime_error("compress_for_parquet: codec not written by the test writer");
  }
}

std::string write_parquet(const std::vector<std::optional<std::string>>& rows, const ParquetWriteOptions& o) {
  std::string file = "PAR1";
  std::vector<std::pair<int64_t, std::vector<Chunk>>> groups;  // (rows, chunks)
  const int32_t dict_encoding = o.legacy_dictionary ? 2 : 8;
  // Steps of n up to `to`: the end of the step starting at `from` (no overflow for huge n).
  const auto step_end = [](size_t from, size_t to, size_t n) { return from + std::min(n, to - from); };
  for (size_t g0 = 0, g1 = 0; g0 < rows.size() || groups.empty(); g0 = g1) {
    g1 = step_end(g0, rows.size(), o.rows_per_group);
    Chunk id{2, "id", {0}, static_cast<int64_t>(g1 - g0)};
    Chunk text{6, o.column, {0, 3}, static_cast<int64_t>(g1 - g0)};

    id.start = id.data_page_offset = static_cast<int64_t>(file.size());
    for (size_t p0 = g0, p1 = 0; p0 < g1; p0 = p1) {
      p1 = step_end(p0, g1, o.rows_per_page);
      std::string values;
      for (size_t r = p0; r < p1; ++r)
        for (int b = 0; b < 8; ++b) values.push_back(static_cast<char>(uint64_t{r} >> (8 * b)));
      add_page(&file, &id, data_page(o, p1 - p0, {}, 0, values, false));
    }

    // The dictionary: distinct strings of the chunk in order of first appearance.
    std::map<std::string, uint32_t> index;
    std::vector<const std::string*> dict;
    text.start = static_cast<int64_t>(file.size());
    if (o.dictionary) {
      for (size_t r = g0; r < g1; ++r)
        if (rows[r] && index.emplace(*rows[r], static_cast<uint32_t>(dict.size())).second) dict.push_back(&*rows[r]);
      text.dictionary_page_offset = text.start;
      text.encodings.push_back(dict_encoding);
      add_page(&file, &text, dictionary_page(o, dict));
    }
    text.data_page_offset = static_cast<int64_t>(file.size());
    size_t page_no = 0;
    for (size_t p0 = g0, p1 = 0; p0 < g1; p0 = p1, ++page_no) {
      p1 = step_end(p0, g1, o.rows_per_page);
      std::vector<uint32_t> def;
      std::vector<const std::string*> present;
      for (size_t r = p0; r < p1; ++r) {
        if (o.optional) def.push_back(rows[r] ? 1 : 0);
        if (rows[r]) present.push_back(&*rows[r]);
      }
      const bool use_dict = o.dictionary && page_no < o.dictionary_pages;
      std::string values;
      if (use_dict) {
        std::vector<uint32_t> idx;
        for (const std::string* s : present) idx.push_back(index.at(*s));
        const int w = width_for(dict.empty() ? 0 : dict.size() - 1);
        values.push_back(static_cast<char>(w));
        values += encode_hybrid(idx, w);
      } else {
        values = plain_strings(present);
      }
      values.append(o.value_padding, '\0');
      add_page(&file, &text, data_page(o, p1 - p0, def, use_dict ? dict_encoding : 0, values, true));
    }
    groups.push_back({static_cast<int64_t>(g1 - g0), {id, text}});
  }

  ThriftOut t;
  t.begin_struct();  // FileMetaData
  t.i32(1, 2);       // version
  t.list(2, kStruct, 3);  // schema
  t.begin_struct();
  t.binary(4, "schema");
  t.i32(5, 2);  // num_children
  t.end_struct();
  t.begin_struct();
  t.i32(1, 2);  // INT64
  t.i32(3, 0);  // REQUIRED
  t.binary(4, "id");
  t.end_struct();
  t.begin_struct();
  t.i32(1, 6);  // BYTE_ARRAY
  t.i32(3, o.optional ? 1 : 0);
  t.binary(4, o.column);
  t.i32(6, 0);         // converted_type UTF8
  t.struct_field(10);  // logicalType: STRING (an empty struct in member 1)
  t.struct_field(1);
  t.end_struct();
  t.end_struct();
  t.end_struct();
  for (size_t k = 0; k < o.repeat_first_group; ++k) groups.push_back(groups[0]);
  int64_t total_rows = 0;
  for (const auto& g : groups) total_rows += g.first;
  t.i64(3, total_rows);
  t.list(4, kStruct, groups.size());
  for (const auto& [n, chunks] : groups) {
    t.begin_struct();  // RowGroup
    t.list(1, kStruct, chunks.size());
    int64_t bytes = 0;
    for (const Chunk& c : chunks) write_column_meta(t, c, o.codec), bytes += c.uncompressed;
    t.i64(2, bytes);
    t.i64(3, n);
    t.end_struct();
  }
  t.list(5, kStruct, 1);  // key_value_metadata, which the reader skips
  t.begin_struct();
  t.binary(1, "writer");
  t.binary(2, "qforge tests");
  t.end_struct();
  t.binary(6, "qforge test writer");
  t.end_struct();

  file += t.bytes;
  put_u32(&file, static_cast<uint32_t>(t.bytes.size()));
  file += "PAR1";
  return file;
}

}  // namespace qf::test
