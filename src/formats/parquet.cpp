#include "formats/parquet.h"

#include <algorithm>
#include <cstring>
#include <string_view>

#include "core/error.h"
#include "core/mapped_file.h"
#include "formats/parquet_codec.h"
#include "formats/parquet_encoding.h"
#include "formats/parquet_meta.h"
#include "formats/thrift_compact.h"

namespace qf {

using namespace parquet;

namespace {

// Deepest schema nesting accepted (each level can add one definition level; real files use < 10).
constexpr int kMaxSchemaDepth = 64;
// Largest page, compressed or not. Real pages are about 1 MB; this still lets one value of
// hundreds of MB through.
constexpr int64_t kMaxPageBytes = int64_t{1} << 30;
// What one column read may return (entries and their text), as a floor and as a
// multiple of the file size: enough for real datasets (text rarely expands 8x), while a few
// hostile KB (a page of a billion nulls, a dictionary entry repeated a billion times, a
// compression bomb) end in an error instead of gigabytes.
constexpr size_t kMinOutputBudget = size_t{256} << 20;
constexpr size_t kOutputBudgetPerFileByte = 16;
// The page bytes one column read may go through (read plus decompressed). A real file reads
// each page once; a hostile footer can point many row groups at the same pages, and this stops
// it from turning a small file into hours of decompression.
constexpr size_t kMinWorkBudget = size_t{512} << 20;
constexpr size_t kWorkBudgetPerFileByte = 64;

// Cost of reading one page header, whatever the page holds.
constexpr size_t kPageOverhead = 64;
// Cost of one output entry before its text.
constexpr size_t kValueOverhead = sizeof(std::optional<std::string>);

const char kMagic[4] = {'P', 'A', 'R', '1'};

uint32_t load_u32(const uint8_t* p) { return p[0] | p[1] << 8 | p[2] << 16 | static_cast<uint32_t>(p[3]) << 24; }

// Names from the file go into messages quoted, escaped and cut short: a hostile footer can hold
// a column name of megabytes.
constexpr size_t kMaxNameInMessage = 120;

std::string quote_name(std::string_view s) {
  if (s.size() <= kMaxNameInMessage) return quote_for_error(s);
  size_t n = kMaxNameInMessage;
  while (n > 0 && (static_cast<uint8_t>(s[n]) & 0xC0) == 0x80) --n;  // not inside a UTF-8 sequence
  return quote_for_error(s.substr(0, n)) + "...";
}

// The same without the surrounding quotes (for the list of columns).
std::string escaped(const std::string& s) {
  const std::string q = quote_for_error(s.substr(0, std::min(s.size(), kMaxNameInMessage)));
  return q.substr(1, q.size() - 2) + (s.size() > kMaxNameInMessage ? "..." : "");
}

struct Leaf {
  ParquetColumn info;
  std::vector<std::string> path;  // path_in_schema
  ValueType value_type;
};

}  // namespace

struct ParquetFile::Impl {
  std::string name;                   // the file, for messages
  std::shared_ptr<MappedFile> mapped;  // or:
  std::string owned;                  // bytes given in memory
  const uint8_t* data = nullptr;
  size_t size = 0;
  size_t data_end = 0;  // where the footer starts: column chunks lie in [4, data_end)
  FileMetaData meta;
  std::vector<Leaf> leaves;
  std::vector<ParquetColumn> columns;

  void parse();
  void build_leaves();
  void check_chunks() const;
  std::vector<std::optional<std::string>> read_column(size_t leaf) const;
  size_t find_leaf(const std::string& path) const;  // throws naming the columns there are
};

namespace {

// ---- schema ------------------------------------------------------------------------------------

std::string type_string(const SchemaElement& e) {
  std::string s = physical_type_name(*e.type);
  if (*e.type == kFixedLenByteArray) s += str("(", e.type_length, ")");
  if (e.converted_type) s += " (" + converted_type_name(*e.converted_type) + ")";
  else if (e.logical_type) s += " (" + logical_type_name(*e.logical_type) + ")";
  return s;
}

struct SchemaWalker {
  const std::vector<SchemaElement>& schema;
  std::vector<Leaf>* leaves;
  size_t next = 1;  // schema[0] is the root
  std::vector<std::string> path;

  void walk_children(int32_t count, int def, int rep) {
    if (count < 0) fail("schema: negative child count ", count);
    if (static_cast<int>(path.size()) >= kMaxSchemaDepth)
      fail("schema: nesting deeper than ", kMaxSchemaDepth, " levels");
    for (int32_t i = 0; i < count; ++i) {
      if (next >= schema.size())
        fail("schema: the elements end before every group has its children (", schema.size(), " elements)");
      const SchemaElement& e = schema[next++];
      const int32_t r = e.repetition.value_or(kRequired);
      if (r < kRequired || r > kRepeated) fail("schema: element ", quote_name(e.name), " has repetition #", r);
      const int d2 = def + (r != kRequired), r2 = rep + (r == kRepeated);
      path.push_back(e.name);
      if (e.num_children && !e.type) {
        walk_children(*e.num_children, d2, r2);
      } else {
        if (!e.type) fail("schema: element ", quote_name(e.name), " has neither a type nor children");
        if (*e.type < kBoolean || *e.type > kFixedLenByteArray)
          fail("schema: column ", quote_name(e.name), " has unknown ", physical_type_name(*e.type));
        if (*e.type == kFixedLenByteArray && (e.type_length <= 0 || e.type_length > (1 << 20)))
          fail("schema: column ", quote_name(e.name), " is FIXED_LEN_BYTE_ARRAY of invalid length ", e.type_length);
        Leaf l;
        for (const auto& p : path) l.info.path += (l.info.path.empty() ? "" : ".") + p;
        l.info.type = type_string(e);
        l.info.max_def = d2;
        l.info.max_rep = r2;
        l.path = path;
        l.value_type.physical = *e.type;
        l.value_type.type_length = e.type_length;
        l.value_type.is_unsigned = e.converted_type && *e.converted_type >= 11 && *e.converted_type <= 14;  // UINT_*
        leaves->push_back(std::move(l));
      }
      path.pop_back();
    }
  }
};

// ---- the decode budget ---------------------------------------------------------------------------

class Budget {
 public:
  // `what` completes "the column ..." in the error, e.g. "decodes to more than".
  Budget(size_t limit, const char* what) : left_(limit), limit_(limit), what_(what) {}
  void charge(size_t bytes) {
    if (bytes > left_) fail("the column ", what_, " ", limit_ >> 20, " MiB (the limit for a file of this size)");
    left_ -= bytes;
  }
  size_t left() const { return left_; }
  size_t limit() const { return limit_; }

 private:
  size_t left_, limit_;
  const char* what_;
};

// What the chunks of one column read share.
struct ColumnRead {
  Budget output;  // what the read returns and keeps while it runs
  Budget work;    // page bytes read and decompressed
  std::vector<uint8_t> page_buffer;  // decompressed page, its memory reused from page to page
};

// ---- pages ----------------------------------------------------------------------------------------

// Reads one column chunk page by page, appending its values to `out`.
class ChunkReader {
 public:
  ChunkReader(const ParquetFile::Impl& f, const Leaf& leaf, const ColumnChunkMeta& cm, int64_t rows, ColumnRead& read,
              std::vector<std::optional<std::string>>* out)
      : f_(f), leaf_(leaf), cm_(cm), rows_(rows), output_budget_(read.output), work_budget_(read.work),
        buf_(read.page_buffer), out_(out) {}

  int page = -1;  // the page being read, for messages

  void read() {
    if (!codec_supported(cm_.codec))
      fail("codec ", codec_name(cm_.codec), " is not supported; qforge reads UNCOMPRESSED, SNAPPY, GZIP and ZSTD");
    const uint8_t* p = f_.data + chunk_start();
    const uint8_t* end = p + cm_.total_compressed_size;
    while (levels_seen_ < cm_.num_values) {
      ++page;
      if (p >= end) fail("the column chunk ends after ", levels_seen_, " of its ", cm_.num_values, " values");
      thrift::CompactReader r(p, static_cast<size_t>(end - p));
      PageHeader h;
      try {
        h = decode_page_header(r);
      } catch (const Error& e) {
        fail("malformed page header: ", e.what());
      }
      const uint8_t* body = p + r.position();
      if (h.compressed_page_size < 0 || h.compressed_page_size > end - body)
        fail("page of ", h.compressed_page_size, " bytes runs past the column chunk (", end - body, " bytes left)");
      if (h.uncompressed_page_size < 0 || h.uncompressed_page_size > kMaxPageBytes ||
          static_cast<size_t>(h.uncompressed_page_size) > output_budget_.limit())
        fail("page claims an uncompressed size of ", h.uncompressed_page_size, " bytes");
      // Every page costs its header; a page that is decoded also its bytes in and out. Chunks of
      // different row groups may point at the same bytes, so this is what bounds the work.
      work_budget_.charge(kPageOverhead + r.position());
      if (h.type == kDictionaryPage || h.type == kDataPage || h.type == kDataPageV2) {
        if (!h.has_data_header) fail(page_type_name(h.type), " without its header");
        if (h.num_values < 0) fail("page claims ", h.num_values, " values");
        work_budget_.charge(static_cast<size_t>(h.compressed_page_size) +
                            static_cast<size_t>(h.uncompressed_page_size));
      }
      if (h.type == kDictionaryPage) read_dictionary(h, body);
      else if (h.type == kDataPage || h.type == kDataPageV2) read_data_page(h, body);
      // INDEX_PAGE and page types added after this reader: skipped
      p = body + h.compressed_page_size;
    }
    page = -1;
    if (rows_seen_ != rows_) fail("the column chunk holds ", rows_seen_, " rows, its row group ", rows_);
  }

 private:
  size_t chunk_start() const {
    const auto& d = cm_.dictionary_page_offset;
    return static_cast<size_t>(d && *d > 0 && *d < cm_.data_page_offset ? *d : cm_.data_page_offset);
  }

  // The page's bytes after decompression (a view into the file when nothing is compressed).
  struct Bytes {
    const uint8_t* p;
    size_t n;
  };
  Bytes inflate(const uint8_t* src, size_t n, size_t expected, bool compressed) {
    if (!compressed || cm_.codec == kUncompressed) {
      if (n != expected) fail("page holds ", n, " bytes, its header says ", expected, " uncompressed");
      return {src, n};
    }
    decompress(cm_.codec, src, n, expected, &buf_);
    return {buf_.data(), buf_.size()};
  }

  void read_dictionary(const PageHeader& h, const uint8_t* body) {
    if (have_dict_) fail("a second dictionary page");
    if (levels_seen_ > 0) fail("a dictionary page after data pages");
    if (h.encoding != kPlain && h.encoding != kPlainDictionary)
      fail("dictionary page encoding ", encoding_name(h.encoding), " is not supported");
    const Bytes b = inflate(body, h.compressed_page_size, h.uncompressed_page_size, true);
    // Freed with the chunk, so counted as work, not output.
    decode_values(leaf_.value_type, kPlain, b.p, b.n, h.num_values, work_budget_.left(), &dict_);
    size_t bytes = 0;
    for (const auto& s : dict_) bytes += s.size() + sizeof(std::string);
    work_budget_.charge(bytes);
    have_dict_ = true;
  }

  // Levels of a v1 page: RLE behind a 4-byte length, or the old BIT_PACKED form.
  size_t read_levels_v1(int32_t encoding, int max, const uint8_t* p, size_t n, size_t count, std::vector<uint32_t>* out,
                        const char* what) {
    if (encoding == kRle) {
      if (n < 4) fail(what, " levels: the page ends early");
      const uint32_t len = load_u32(p);
      if (len > n - 4) fail(what, " levels of ", len, " bytes run past the page (", n - 4, " bytes left)");
      HybridDecoder(p + 4, len, bit_width(max)).decode(count, out);
      return 4 + len;
    }
    if (encoding == kBitPacked) return decode_bit_packed_levels(p, n, bit_width(max), count, out);
    fail(what, " level encoding ", encoding_name(encoding), " is not supported");
  }

  void read_data_page(const PageHeader& h, const uint8_t* body) {
    const int max_def = leaf_.info.max_def, max_rep = leaf_.info.max_rep;
    const size_t count = static_cast<size_t>(h.num_values);
    if (h.num_values > cm_.num_values - levels_seen_)
      fail("page holds ", h.num_values, " values, only ", cm_.num_values - levels_seen_, " remain in the column chunk");
    output_budget_.charge(count * kValueOverhead);      // the entries (over-estimated for repeated columns)
    work_budget_.charge(count * 2 * sizeof(uint32_t));  // the levels
    rep_.clear();
    def_.clear();
    Bytes values{};
    if (h.type == kDataPage) {
      const Bytes page = inflate(body, h.compressed_page_size, h.uncompressed_page_size, true);
      size_t at = 0;
      if (max_rep > 0) at += read_levels_v1(h.rep_level_encoding, max_rep, page.p, page.n, count, &rep_, "repetition");
      if (max_def > 0)
        at += read_levels_v1(h.def_level_encoding, max_def, page.p + at, page.n - at, count, &def_, "definition");
      values = {page.p + at, page.n - at};
    } else {
      const int64_t rl = h.rep_levels_byte_length, dl = h.def_levels_byte_length;
      if (rl < 0 || dl < 0 || rl + dl > h.compressed_page_size || rl + dl > h.uncompressed_page_size)
        fail("level lengths ", rl, " + ", dl, " do not fit the page (", h.compressed_page_size, " bytes)");
      // v2: levels are never compressed and carry no length prefix; the header has their sizes.
      if (max_rep > 0) HybridDecoder(body, rl, bit_width(max_rep)).decode(count, &rep_);
      if (max_def > 0) HybridDecoder(body + rl, dl, bit_width(max_def)).decode(count, &def_);
      values = inflate(body + rl + dl, h.compressed_page_size - rl - dl, h.uncompressed_page_size - rl - dl,
                       h.is_compressed);
    }
    size_t present = count;
    if (max_def > 0) {
      present = 0;
      for (uint32_t d : def_) {
        if (d > static_cast<uint32_t>(max_def)) fail("definition level ", d, " exceeds the column's maximum ", max_def);
        present += d == static_cast<uint32_t>(max_def);
      }
    }
    for (uint32_t r : rep_)
      if (r > static_cast<uint32_t>(max_rep)) fail("repetition level ", r, " exceeds the column's maximum ", max_rep);
    if (max_rep > 0 && count > 0 && levels_seen_ == 0 && rep_[0] != 0) fail("the column chunk starts inside a row");

    vals_.clear();
    if (h.encoding == kPlainDictionary || h.encoding == kRleDictionary) {
      if (!have_dict_) fail("dictionary-encoded page without a dictionary page");
      decode_dictionary_indices(values.p, values.n, present, &idx_);
      vals_.reserve(present);
      size_t bytes = 0;
      for (uint32_t i : idx_) {
        if (i >= dict_.size()) fail("dictionary index ", i, " is out of range (", dict_.size(), " entries)");
        bytes += dict_[i].size();
        if (bytes > output_budget_.left()) output_budget_.charge(bytes);  // throws before building the strings
        vals_.push_back(dict_[i]);
      }
      output_budget_.charge(bytes);
    } else {
      decode_values(leaf_.value_type, h.encoding, values.p, values.n, present, output_budget_.left(), &vals_);
      size_t bytes = 0;
      for (const auto& s : vals_) bytes += s.size();
      output_budget_.charge(bytes);
    }

    // Assemble: one entry per level for flat columns (nullopt below the maximum definition level);
    // for repeated columns only the values present, and rows counted where a record starts.
    size_t k = 0;
    for (size_t i = 0; i < count; ++i) {
      const bool is_present = max_def == 0 || def_[i] == static_cast<uint32_t>(max_def);
      if (max_rep == 0) {
        if (is_present) out_->emplace_back(std::move(vals_[k++]));
        else out_->emplace_back(std::nullopt);
        ++rows_seen_;
      } else {
        if (is_present) out_->emplace_back(std::move(vals_[k++]));
        rows_seen_ += rep_[i] == 0;
      }
    }
    levels_seen_ += h.num_values;
  }

  const ParquetFile::Impl& f_;
  const Leaf& leaf_;
  const ColumnChunkMeta& cm_;
  const int64_t rows_;
  Budget& output_budget_;
  Budget& work_budget_;
  std::vector<uint8_t>& buf_;  // decompressed page
  std::vector<std::optional<std::string>>* out_;

  int64_t levels_seen_ = 0;
  int64_t rows_seen_ = 0;
  bool have_dict_ = false;
  std::vector<std::string> dict_;
  std::vector<uint32_t> rep_, def_, idx_;
  std::vector<std::string> vals_;
};

}  // namespace

// ---- the file -----------------------------------------------------------------------------------

void ParquetFile::Impl::parse() {
  if (size < 12) fail(name, ": not a Parquet file (", size, " bytes, too short for the PAR1 magic and a footer)");
  if (std::memcmp(data, kMagic, 4) != 0) fail(name, ": not a Parquet file (no PAR1 magic at the start)");
  if (std::memcmp(data + size - 4, "PARE", 4) == 0)
    fail(name, ": encrypted Parquet files (PARE footer) are not supported");
  if (std::memcmp(data + size - 4, kMagic, 4) != 0)
    fail(name, ": not a Parquet file or truncated (no PAR1 magic at the end)");
  const uint32_t footer_len = load_u32(data + size - 8);
  if (footer_len > size - 12)
    fail(name, ": footer length ", footer_len, " exceeds the file (", size, " bytes; truncated?)");
  data_end = size - 8 - footer_len;
  try {
    meta = decode_file_metadata(data + data_end, footer_len);
  } catch (const Error& e) {
    fail(name, ": malformed footer: ", e.what());
  }
  if (meta.encrypted) fail(name, ": encrypted Parquet files are not supported");
  if (meta.num_rows < 0) fail(name, ": footer claims ", meta.num_rows, " rows");
  build_leaves();
  check_chunks();
}

void ParquetFile::Impl::build_leaves() {
  try {
    if (meta.schema.empty()) fail("schema: no elements");
    const SchemaElement& root = meta.schema[0];
    SchemaWalker w{meta.schema, &leaves, 1, {}};
    w.walk_children(root.num_children.value_or(0), 0, 0);
    if (w.next != meta.schema.size())
      fail("schema: ", meta.schema.size() - w.next, " elements lie outside the root's children");
  } catch (const Error& e) {
    fail(name, ": ", e.what());
  }
  for (const auto& l : leaves) columns.push_back(l.info);
}

void ParquetFile::Impl::check_chunks() const {
  int64_t rows = 0;
  for (size_t g = 0; g < meta.row_groups.size(); ++g) {
    const RowGroupMeta& rg = meta.row_groups[g];
    const auto where = [&](size_t c) {
      return str(" (column ", quote_name(leaves[c].info.path), ", row group ", g, ")");
    };
    if (rg.columns.size() != leaves.size())
      fail(name, ": row group ", g, " has ", rg.columns.size(), " column chunks, the schema ", leaves.size(),
           " columns");
    if (rg.num_rows < 0 || rg.num_rows > meta.num_rows - rows)
      fail(name, ": row group ", g, " claims ", rg.num_rows, " rows, more than the footer's ", meta.num_rows,
           " in all");
    rows += rg.num_rows;
    for (size_t c = 0; c < rg.columns.size(); ++c) {
      const ColumnChunkMeta& cm = rg.columns[c];
      if (cm.file_path)
        fail(name, ": column data in another file (", quote_name(*cm.file_path), ") is not supported", where(c));
      if (cm.encrypted) fail(name, ": encrypted columns are not supported", where(c));
      if (!cm.has_meta_data) fail(name, ": column chunk without metadata", where(c));
      if (cm.path_in_schema != leaves[c].path) {
        std::string got;
        for (const auto& p : cm.path_in_schema) got += (got.empty() ? "" : ".") + p;
        fail(name, ": column chunk is for ", quote_name(got), ", not the schema's column", where(c));
      }
      if (cm.type != leaves[c].value_type.physical)
        fail(name, ": column chunk has type ", physical_type_name(cm.type), ", the schema ",
             physical_type_name(leaves[c].value_type.physical), where(c));
      if (cm.num_values < 0) fail(name, ": column chunk claims ", cm.num_values, " values", where(c));
      const auto& d = cm.dictionary_page_offset;
      const int64_t start = d && *d > 0 && *d < cm.data_page_offset ? *d : cm.data_page_offset;
      const int64_t limit = static_cast<int64_t>(data_end);
      if (start < 4 || cm.total_compressed_size < 0 || start > limit || cm.total_compressed_size > limit - start)
        fail(name, ": column chunk at byte ", start, " of ", cm.total_compressed_size,
             " bytes lies outside the data (bytes 4 to ",
             limit, ")", where(c));
    }
  }
  if (rows != meta.num_rows) fail(name, ": the row groups hold ", rows, " rows, the footer claims ", meta.num_rows);
}

std::vector<std::optional<std::string>> ParquetFile::Impl::read_column(size_t leaf) const {
  std::vector<std::optional<std::string>> out;
  ColumnRead read{{std::max(kMinOutputBudget, size * kOutputBudgetPerFileByte), "decodes to more than"},
                  {std::max(kMinWorkBudget, size * kWorkBudgetPerFileByte), "takes more page data to decode than"},
                  {}};
  for (size_t g = 0; g < meta.row_groups.size(); ++g) {
    const RowGroupMeta& rg = meta.row_groups[g];
    ChunkReader reader(*this, leaves[leaf], rg.columns[leaf], rg.num_rows, read, &out);
    try {
      reader.read();
    } catch (const Error& e) {
      const std::string page = reader.page >= 0 ? str(", page ", reader.page) : "";
      fail(name, ": ", e.what(), " (column ", quote_name(leaves[leaf].info.path), ", row group ", g, page, ")");
    }
  }
  return out;
}

ParquetFile ParquetFile::open(const std::filesystem::path& path) {
  auto impl = std::make_shared<Impl>();
  impl->name = path.string();
  impl->mapped = MappedFile::open(path);
  impl->data = impl->mapped->data();
  impl->size = impl->mapped->size();
  impl->parse();
  return ParquetFile(std::move(impl));
}

ParquetFile ParquetFile::from_memory(std::string bytes, const std::string& name) {
  auto impl = std::make_shared<Impl>();
  impl->name = name;
  impl->owned = std::move(bytes);
  impl->data = reinterpret_cast<const uint8_t*>(impl->owned.data());
  impl->size = impl->owned.size();
  impl->parse();
  return ParquetFile(std::move(impl));
}

int64_t ParquetFile::num_rows() const { return impl_->meta.num_rows; }
size_t ParquetFile::num_row_groups() const { return impl_->meta.row_groups.size(); }
const std::vector<ParquetColumn>& ParquetFile::columns() const { return impl_->columns; }
const std::string& ParquetFile::created_by() const { return impl_->meta.created_by; }

namespace {

std::string column_list(const std::vector<ParquetColumn>& cols) {
  constexpr size_t kShown = 20;
  std::string s;
  for (size_t i = 0; i < cols.size() && i < kShown; ++i) s += (i ? ", " : "") + escaped(cols[i].path);
  if (cols.size() > kShown) s += str(", ... (", cols.size() - kShown, " more)");
  return cols.empty() ? "none" : s;
}

}  // namespace

size_t ParquetFile::Impl::find_leaf(const std::string& path) const {
  for (size_t i = 0; i < leaves.size(); ++i)
    if (leaves[i].info.path == path) return i;
  fail(name, ": no column ", quote_name(path), " (columns: ", column_list(columns), ")");
}

std::vector<std::optional<std::string>> ParquetFile::read_column_nullable(const std::string& path) const {
  return impl_->read_column(impl_->find_leaf(path));
}

std::vector<std::string> ParquetFile::read_column_text(const std::string& path) const {
  auto values = impl_->read_column(impl_->find_leaf(path));
  std::vector<std::string> out;
  out.reserve(values.size());
  for (auto& v : values)
    if (v) out.push_back(std::move(*v));
  return out;
}

std::vector<std::string> read_parquet_text_column(const std::string& path, const std::string& column) {
  return ParquetFile::open(path).read_column_text(column);
}

}  // namespace qf
