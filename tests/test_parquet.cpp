// The Parquet reader: the real files in ../shared/data/parquet (pyarrow, parquet-mr, Impala,
// parquet-rs writers), files our test writer makes with every codec / encoding / page version /
// nullability, and corrupt input, which must give a one-line std::runtime_error and nothing worse
// (this test also runs under ASan + UBSan).
#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <map>
#include <random>
#include <set>
#include <typeinfo>

#include "core/error.h"
#include "formats/parquet.h"
#include "parquet_writer.h"
#include "test_util.h"

namespace qf {
namespace {

namespace fs = std::filesystem;
using test::ParquetWriteOptions;
using Rows = std::vector<std::optional<std::string>>;

constexpr int32_t kUncompressed = 0, kSnappy = 1, kGzip = 2, kZstd = 6;

const char* codec_label(int32_t c) {
  switch (c) {
    case kUncompressed: return "Uncompressed";
    case kSnappy: return "Snappy";
    case kGzip: return "Gzip";
    case kZstd: return "Zstd";
  }
  return "Other";
}

bool valid_utf8(const std::string& s) {
  for (size_t i = 0; i < s.size();) {
    const auto c = static_cast<unsigned char>(s[i]);
    size_t more;  // continuation bytes after the lead byte
    if (c < 0x80) more = 0;
    else if (c >= 0xC2 && c < 0xE0) more = 1;
    else if (c >= 0xE0 && c < 0xF0) more = 2;
    else if (c >= 0xF0 && c < 0xF5) more = 3;
    else return false;
    if (more > s.size() - i - 1) return false;
    for (size_t k = 1; k <= more; ++k)
      if ((static_cast<unsigned char>(s[i + k]) & 0xC0) != 0x80) return false;
    i += more + 1;
  }
  return true;
}

// The footer's length, from the 4 bytes before the trailing magic.
size_t footer_length(const std::string& file) {
  size_t n = 0;
  for (int i = 3; i >= 0; --i) n = n << 8 | static_cast<uint8_t>(file[file.size() - 8 + i]);
  return n;
}

using test::slurp;

std::vector<std::string> non_null(const Rows& rows) {
  std::vector<std::string> out;
  for (const auto& r : rows)
    if (r) out.push_back(*r);
  return out;
}

// Runs fn and describes what is wrong with how it failed: any exception must be a
// std::runtime_error with one non-empty line (naming `file` when given). *msg gets the message,
// "" when nothing was thrown. Returns "" when all is well.
std::string error_problem(const std::function<void()>& fn, const std::string& file, std::string* msg) {
  msg->clear();
  try {
    fn();
  } catch (const std::runtime_error& e) {
    *msg = e.what();
    if (msg->empty()) return "empty error message";
    if (msg->find_first_of("\r\n") != std::string::npos) return "multi-line error: " + *msg;
    if (!file.empty() && msg->find(file) == std::string::npos) return "the error does not name the file: " + *msg;
    return "";
  } catch (const std::exception& e) {
    *msg = e.what();
    return std::string("not a std::runtime_error: ") + typeid(e).name() + ": " + e.what();
  } catch (...) {
    *msg = "?";
    return "a non-standard exception";
  }
  return "";
}

// The message fn() throws ("" when none), after checking it is a clean one.
std::string clean_error_of(const std::function<void()>& fn, const std::string& file = "") {
  std::string msg;
  const std::string problem = error_problem(fn, file, &msg);
  EXPECT_EQ(problem, "");
  return msg;
}

void expect_clean_error(const std::function<void()>& fn, const std::string& needle, const std::string& file = "") {
  const std::string msg = clean_error_of(fn, file);
  EXPECT_FALSE(msg.empty()) << "no error; expected one mentioning '" << needle << "'";
  EXPECT_NE(msg.find(needle), std::string::npos) << msg;
}

// Opens `bytes` and reads every column, as a user of the reader would.
void read_everything(const std::string& bytes, const std::string& name) {
  const ParquetFile f = ParquetFile::from_memory(bytes, name);
  for (const auto& c : f.columns()) f.read_column_nullable(c.path);
}

// ---- the shared data files -------------------------------------------------------------------------

const char* kParquetDir = "parquet";

fs::path parquet_path(const std::string& rel) { return test::data_dir() / kParquetDir / rel; }

// Splits one CSV line: quoted fields ("" escapes a quote); an empty unquoted field is a null.
Rows csv_fields(const std::string& line) {
  Rows out;
  size_t i = 0;
  for (;;) {
    if (i < line.size() && line[i] == '"') {
      std::string f;
      for (++i; i < line.size(); ++i) {
        if (line[i] == '"' && i + 1 < line.size() && line[i + 1] == '"') f += '"', ++i;
        else if (line[i] == '"') break;
        else f += line[i];
      }
      ++i;  // closing quote
      out.emplace_back(std::move(f));
    } else {
      const size_t end = std::min(line.find(',', i), line.size());
      if (end == i) out.emplace_back(std::nullopt);
      else out.emplace_back(line.substr(i, end - i));
      i = end;
    }
    if (i >= line.size() || line[i] != ',') break;
    ++i;
  }
  return out;
}

// Expected values per column from one of parquet-testing's *_expect.csv files (header skipped).
std::vector<Rows> csv_columns(const fs::path& p) {
  std::ifstream in(p);
  std::string line;
  std::getline(in, line);
  std::vector<Rows> cols(csv_fields(line).size());
  while (std::getline(in, line)) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    const Rows f = csv_fields(line);
    EXPECT_EQ(f.size(), cols.size()) << line;
    for (size_t c = 0; c < cols.size() && c < f.size(); ++c) cols[c].push_back(f[c]);
  }
  return cols;
}

std::vector<std::string> column_paths(const ParquetFile& f) {
  std::vector<std::string> out;
  for (const auto& c : f.columns()) out.push_back(c.path);
  return out;
}

// Every file in both folders: it opens; each flat column gives one entry per row, string columns
// annotated UTF8/STRING hold valid UTF-8; the only failures are the codecs qforge leaves out,
// each a clear line naming the file and the codec.
TEST(ParquetShared, EveryFileReadsOrNamesItsUnsupportedCodec) {
  QF_REQUIRE_DATA(kParquetDir);
  const std::map<std::string, int64_t> rows = {
      {"financial-sentiment-test-00000-of-00001.parquet", 10004},
      {"alltypes_dictionary.parquet", 2},
      {"alltypes_plain.parquet", 8},
      {"alltypes_plain.snappy.parquet", 2},
      {"alltypes_tiny_pages.parquet", 7300},
      {"binary.parquet", 12},
      {"byte_stream_split.zstd.parquet", 300},
      {"concatenated_gzip_members.parquet", 513},
      {"data_index_bloom_encoding_stats.parquet", 14},
      {"data_index_bloom_encoding_with_length.parquet", 14},
      {"datapage_v2.snappy.parquet", 5},
      {"delta_byte_array.parquet", 1000},
      {"delta_encoding_required_column.parquet", 100},
      {"delta_length_byte_array.parquet", 1000},
      {"geography-points.parquet", 500},
      {"hadoop_lz4_compressed_larger.parquet", 10000},
      {"large_string_map.brotli.parquet", 2},
      {"list_columns.parquet", 3},
      {"lz4_raw_compressed_larger.parquet", 10000},
      {"nested_lists.snappy.parquet", 3},
      {"nulls.snappy.parquet", 8},
      {"page_v2_empty_compressed.parquet", 10},
      {"plain-dict-uncompressed-checksum.parquet", 1000},
      {"rle-dict-snappy-checksum.parquet", 1000},
  };
  const std::map<std::string, std::string> unsupported = {
      {"hadoop_lz4_compressed_larger.parquet", "codec LZ4 is not supported"},
      {"lz4_raw_compressed_larger.parquet", "codec LZ4_RAW is not supported"},
      {"large_string_map.brotli.parquet", "codec BROTLI is not supported"},
  };
  size_t files = 0;
  for (const auto& dir : {"hf-datasets-style", "parquet-testing"}) {
    for (const auto& entry : fs::directory_iterator(parquet_path(dir))) {
      if (entry.path().extension() != ".parquet") continue;
      const std::string name = entry.path().filename().string();
      SCOPED_TRACE(name);
      ++files;
      const ParquetFile f = ParquetFile::open(entry.path());
      if (rows.count(name)) {
        EXPECT_EQ(f.num_rows(), rows.at(name));
      }
      ASSERT_FALSE(f.columns().empty());
      for (const auto& c : f.columns()) {
        SCOPED_TRACE(c.path);
        if (unsupported.count(name)) {
          expect_clean_error([&] { f.read_column_nullable(c.path); }, unsupported.at(name), name);
          continue;
        }
        const std::string err = clean_error_of([&] {
          const Rows values = f.read_column_nullable(c.path);
          if (c.max_rep == 0) {
            EXPECT_EQ(static_cast<int64_t>(values.size()), f.num_rows());
          }
          if (c.type.find("(UTF8)") != std::string::npos || c.type.find("(STRING)") != std::string::npos) {
            for (const auto& v : values) EXPECT_TRUE(!v || valid_utf8(*v)) << *v;
          }
        });
        EXPECT_EQ(err, "");
      }
    }
  }
  EXPECT_EQ(files, rows.size()) << "a file was added or removed: update the table";
}

TEST(ParquetShared, HuggingFaceExportTextColumn) {
  const std::string rel = "hf-datasets-style/financial-sentiment-test-00000-of-00001.parquet";
  QF_REQUIRE_DATA(std::string(kParquetDir) + "/" + rel);
  const ParquetFile f = ParquetFile::open(parquet_path(rel));
  EXPECT_EQ(f.num_rows(), 10004);
  EXPECT_EQ(f.num_row_groups(), 11u);
  EXPECT_EQ(column_paths(f), (std::vector<std::string>{"text", "label", "source"}));
  const auto text = read_parquet_text_column(parquet_path(rel).string(), "text");
  ASSERT_EQ(text.size(), 10004u);
  EXPECT_EQ(text[0].rfind("The company recorded revenues of E658 .1", 0), 0u) << text[0];
  for (const auto& t : text) {
    EXPECT_FALSE(t.empty());
    EXPECT_TRUE(valid_utf8(t)) << t;
  }
  std::map<std::string, size_t> labels;
  for (const auto& l : f.read_column_text("label")) ++labels[l];
  EXPECT_EQ(labels.size(), 3u);
  for (const auto& [l, n] : labels) EXPECT_TRUE(l == "0" || l == "1" || l == "2") << l;
  std::set<std::string> sources;
  for (const auto& s : f.read_column_text("source")) sources.insert(s);
  EXPECT_EQ(sources, (std::set<std::string>{"zeroshot/twitter-financial-news-sentiment", "FinGPT/fingpt-sentiment-cls",
                                            "TimKoornstra/financial-tweets-sentiment", "takala/financial_phrasebank"}));
  expect_clean_error([&] { read_parquet_text_column(parquet_path(rel).string(), "txt"); },
                     "financial-sentiment-test-00000-of-00001.parquet: no column 'txt' (columns: text, label, source)");
}

TEST(ParquetShared, ImpalaAllTypes) {
  QF_REQUIRE_DATA("parquet/parquet-testing/alltypes_plain.parquet");
  const ParquetFile plain = ParquetFile::open(parquet_path("parquet-testing/alltypes_plain.parquet"));
  using V = std::vector<std::string>;
  EXPECT_EQ(plain.read_column_text("id"), (V{"4", "5", "6", "7", "2", "3", "0", "1"}));
  EXPECT_EQ(plain.read_column_text("bool_col"),
            (V{"true", "false", "true", "false", "true", "false", "true", "false"}));
  EXPECT_EQ(plain.read_column_text("bigint_col"), (V{"0", "10", "0", "10", "0", "10", "0", "10"}));
  EXPECT_EQ(plain.read_column_text("float_col"), (V{"0", "1.1", "0", "1.1", "0", "1.1", "0", "1.1"}));
  EXPECT_EQ(plain.read_column_text("date_string_col"),
            (V{"03/01/09", "03/01/09", "04/01/09", "04/01/09", "02/01/09", "02/01/09", "01/01/09", "01/01/09"}));
  EXPECT_EQ(plain.read_column_text("timestamp_col")[1], "2009-03-01 00:01:00");
  const ParquetFile snappy = ParquetFile::open(parquet_path("parquet-testing/alltypes_plain.snappy.parquet"));
  EXPECT_EQ(snappy.read_column_text("id"), (V{"6", "7"}));
  EXPECT_EQ(snappy.read_column_text("string_col"), (V{"0", "1"}));
  const ParquetFile dict = ParquetFile::open(parquet_path("parquet-testing/alltypes_dictionary.parquet"));
  EXPECT_EQ(dict.read_column_text("id"), (V{"0", "1"}));
  EXPECT_EQ(dict.read_column_text("string_col"), (V{"0", "1"}));
  // Many small dictionary-encoded pages (parquet-mr).
  const ParquetFile tiny = ParquetFile::open(parquet_path("parquet-testing/alltypes_tiny_pages.parquet"));
  const auto ids = tiny.read_column_text("id");
  ASSERT_EQ(ids.size(), 7300u);
  std::set<std::string> distinct(ids.begin(), ids.end());
  EXPECT_EQ(distinct.size(), 7300u);
  for (const auto& s : tiny.read_column_text("string_col"))
    EXPECT_TRUE(s.size() == 1 && s[0] >= '0' && s[0] <= '9') << s;
}

TEST(ParquetShared, PageV2NullsAndLists) {
  QF_REQUIRE_DATA("parquet/parquet-testing/datapage_v2.snappy.parquet");
  const ParquetFile v2 = ParquetFile::open(parquet_path("parquet-testing/datapage_v2.snappy.parquet"));
  EXPECT_EQ(v2.read_column_nullable("a"), (Rows{"abc", "abc", "abc", std::nullopt, "abc"}));
  EXPECT_EQ(v2.read_column_text("a"), (std::vector<std::string>{"abc", "abc", "abc", "abc"}));  // nulls skipped
  EXPECT_EQ(v2.read_column_text("b"), (std::vector<std::string>{"1", "2", "3", "4", "5"}));
  EXPECT_EQ(v2.read_column_text("e.list.element").size(), 8u);
  // All nulls, in a v2 page whose empty value section is a real ZSTD stream of 0 bytes.
  const ParquetFile empty = ParquetFile::open(parquet_path("parquet-testing/page_v2_empty_compressed.parquet"));
  EXPECT_EQ(empty.read_column_nullable("integer_column"), Rows(10));
  EXPECT_TRUE(empty.read_column_text("integer_column").empty());
  const ParquetFile nulls = ParquetFile::open(parquet_path("parquet-testing/nulls.snappy.parquet"));
  EXPECT_EQ(nulls.read_column_nullable("b_struct.b_c_int"), Rows(8));
  const ParquetFile lists = ParquetFile::open(parquet_path("parquet-testing/list_columns.parquet"));
  EXPECT_EQ(lists.read_column_text("utf8_list.list.item"),
            (std::vector<std::string>{"abc", "efg", "hij", "efg", "hij", "xyz"}));
  std::vector<std::string> bytes;  // binary.parquet: one byte each, 0 to 11
  for (char c = 0; c < 12; ++c) bytes.emplace_back(1, c);
  EXPECT_EQ(ParquetFile::open(parquet_path("parquet-testing/binary.parquet")).read_column_text("foo"), bytes);
  const ParquetFile bloom = ParquetFile::open(parquet_path("parquet-testing/data_index_bloom_encoding_stats.parquet"));
  EXPECT_EQ(bloom.read_column_text("String"),
            (std::vector<std::string>{"Hello", "This is", "a", "test", "How", "are you", "doing ", "today",
                                      "the quick", "brown fox", "jumps", "over", "the lazy", "dog"}));
}

TEST(ParquetShared, CodecsOfOtherWriters) {
  QF_REQUIRE_DATA("parquet/parquet-testing/concatenated_gzip_members.parquet");
  // GZIP with two concatenated members in one page.
  const auto gz = ParquetFile::open(parquet_path("parquet-testing/concatenated_gzip_members.parquet"));
  const auto longs = gz.read_column_text("long_col");
  ASSERT_EQ(longs.size(), 513u);
  for (size_t i = 0; i < longs.size(); ++i) EXPECT_EQ(longs[i], std::to_string(i + 1));
  // ZSTD (BYTE_STREAM_SPLIT floats): the first values of numpy's seed-0 standard normals.
  const auto bss = ParquetFile::open(parquet_path("parquet-testing/byte_stream_split.zstd.parquet"));
  const auto f32 = bss.read_column_text("f32");
  ASSERT_EQ(f32.size(), 300u);
  EXPECT_EQ(f32[0], "1.7640524");
  EXPECT_EQ(f32[1], "0.4001572");
  // SNAPPY v2 and uncompressed v1 dictionaries from parquet-mr.
  for (const char* name : {"rle-dict-snappy-checksum.parquet", "plain-dict-uncompressed-checksum.parquet"}) {
    SCOPED_TRACE(name);
    const auto f = ParquetFile::open(parquet_path(std::string("parquet-testing/") + name));
    const auto s = f.read_column_text("binary_field");
    ASSERT_EQ(s.size(), 1000u);
    for (const auto& v : s) EXPECT_EQ(v.size(), 36u) << v;  // UUIDs
  }
}

TEST(ParquetShared, DeltaEncodingsMatchTheirCsv) {
  QF_REQUIRE_DATA("parquet/parquet-testing/delta_byte_array_expect.csv");
  for (const char* base : {"delta_byte_array", "delta_encoding_required_column"}) {
    SCOPED_TRACE(base);
    const auto f = ParquetFile::open(parquet_path(std::string("parquet-testing/") + base + ".parquet"));
    const auto expected = csv_columns(parquet_path(std::string("parquet-testing/") + base + "_expect.csv"));
    ASSERT_EQ(f.columns().size(), expected.size());
    for (size_t c = 0; c < expected.size(); ++c) {
      SCOPED_TRACE(f.columns()[c].path);
      EXPECT_EQ(f.read_column_nullable(f.columns()[c].path), expected[c]);
    }
  }
  const auto fruit = ParquetFile::open(parquet_path("parquet-testing/delta_length_byte_array.parquet"));
  const auto v = fruit.read_column_text("FRUIT");
  ASSERT_EQ(v.size(), 1000u);
  for (size_t i = 0; i < v.size(); ++i) EXPECT_EQ(v[i], "apple_banana_mango" + std::to_string(i * i));
}

// ---- files written by the test writer ---------------------------------------------------------------

// n rows: words from a small pool (so dictionaries pay), the empty string, long strings,
// multi-byte UTF-8, embedded NULs; with `nulls`, every 5th row and rows 500 to 639 (whole pages
// of nulls) are null.
Rows sample_rows(size_t n, bool nulls, uint64_t seed = 7) {
  const std::vector<std::string> pool = {"the", "quick brown fox", "", "naïve café — 日本語 🙂", std::string("a\0b", 3),
                                         "jumps over", "the lazy dog", "Ünïcödé", "\t tabs and spaces ", "x"};
  std::mt19937_64 rng(seed);
  Rows rows;
  for (size_t i = 0; i < n; ++i) {
    if (nulls && (i % 5 == 3 || (i >= 500 && i < 640))) {
      rows.emplace_back(std::nullopt);
    } else if (i % 97 == 11) {
      rows.emplace_back(std::string(3000 + i, static_cast<char>('a' + i % 26)));  // long and unique
    } else if (i % 13 == 0) {
      rows.emplace_back("row " + std::to_string(i));  // unique
    } else {
      rows.emplace_back(pool[rng() % pool.size()]);
    }
  }
  return rows;
}

std::vector<std::string> id_strings(size_t n) {
  std::vector<std::string> out;
  for (size_t i = 0; i < n; ++i) out.push_back(std::to_string(i));
  return out;
}

enum class Enc { Plain, RleDictionary, PlainDictionary };

struct Layout {
  int32_t codec;
  Enc encoding;
  bool v2;
  bool optional;
};

ParquetWriteOptions options_for(const Layout& l) {
  ParquetWriteOptions o;
  o.codec = l.codec;
  o.dictionary = l.encoding != Enc::Plain;
  o.legacy_dictionary = l.encoding == Enc::PlainDictionary;
  o.page_v2 = l.v2;
  o.optional = l.optional;
  o.rows_per_group = 400;  // 400 + 400 + 200
  o.rows_per_page = 64;    // 7 pages a group, the last one short
  return o;
}

class ParquetRoundTrip : public ::testing::TestWithParam<Layout> {};

TEST_P(ParquetRoundTrip, ReadsBackExactlyWhatWasWritten) {
  const Layout l = GetParam();
  const Rows rows = sample_rows(1000, l.optional);
  const std::string bytes = test::write_parquet(rows, options_for(l));
  const ParquetFile f = ParquetFile::from_memory(bytes, "roundtrip.parquet");
  EXPECT_EQ(f.num_rows(), 1000);
  EXPECT_EQ(f.num_row_groups(), 3u);
  EXPECT_EQ(f.created_by(), "qforge test writer");
  ASSERT_EQ(f.columns().size(), 2u);
  EXPECT_EQ(f.columns()[0].path, "id");
  EXPECT_EQ(f.columns()[0].type, "INT64");
  EXPECT_EQ(f.columns()[1].path, "text");
  EXPECT_EQ(f.columns()[1].type, "BYTE_ARRAY (UTF8)");
  EXPECT_EQ(f.columns()[1].max_def, l.optional ? 1 : 0);
  EXPECT_EQ(f.read_column_nullable("text"), rows);
  EXPECT_EQ(f.read_column_text("text"), non_null(rows));
  EXPECT_EQ(f.read_column_text("id"), id_strings(1000));

  // The same through a file on disk and the one-call API.
  const fs::path path = test::tmp_dir("parquet_roundtrip") / "roundtrip.parquet";
  test::write_file(path, bytes);
  EXPECT_EQ(read_parquet_text_column(path.string(), "text"), non_null(rows));
}

std::vector<Layout> all_layouts() {
  std::vector<Layout> out;
  for (int32_t codec : {kUncompressed, kSnappy, kGzip, kZstd})
    for (Enc e : {Enc::Plain, Enc::RleDictionary, Enc::PlainDictionary})
      for (bool v2 : {false, true})
        for (bool optional : {false, true}) out.push_back({codec, e, v2, optional});
  return out;
}

INSTANTIATE_TEST_SUITE_P(Layouts, ParquetRoundTrip, ::testing::ValuesIn(all_layouts()),
                         [](const ::testing::TestParamInfo<Layout>& info) {
                           const Layout& l = info.param;
                           const char* enc = l.encoding == Enc::Plain           ? "Plain"
                                             : l.encoding == Enc::RleDictionary ? "RleDict"
                                                                                : "PlainDict";
                           return std::string(codec_label(l.codec)) + enc + (l.v2 ? "V2" : "V1") +
                                  (l.optional ? "Optional" : "Required");
                         });

TEST(ParquetWritten, DictionaryFallsBackToPlainMidChunk) {
  // pyarrow's layout when a dictionary grows too big: the first pages use it, later ones PLAIN.
  for (int32_t codec : {kUncompressed, kSnappy, kZstd}) {
    for (bool v2 : {false, true}) {
      SCOPED_TRACE(str(codec_label(codec), v2 ? " v2" : " v1"));
      const Rows rows = sample_rows(700, true, 11);
      ParquetWriteOptions o = options_for({codec, Enc::RleDictionary, v2, true});
      o.dictionary_pages = 2;
      const auto f = ParquetFile::from_memory(test::write_parquet(rows, o), "fallback.parquet");
      EXPECT_EQ(f.read_column_nullable("text"), rows);
    }
  }
}

TEST(ParquetWritten, EdgeLayouts) {
  // v2 pages left uncompressed in a SNAPPY chunk (is_compressed = false).
  const Rows rows = sample_rows(300, true, 3);
  ParquetWriteOptions o = options_for({kSnappy, Enc::RleDictionary, true, true});
  o.v2_uncompressed = true;
  EXPECT_EQ(ParquetFile::from_memory(test::write_parquet(rows, o), "v2raw.parquet").read_column_nullable("text"), rows);

  // v1 pages with the deprecated BIT_PACKED definition levels.
  for (bool dictionary : {false, true}) {
    ParquetWriteOptions bp = options_for({kGzip, dictionary ? Enc::RleDictionary : Enc::Plain, false, true});
    bp.bit_packed_levels = true;
    EXPECT_EQ(ParquetFile::from_memory(test::write_parquet(rows, bp), "bitpacked.parquet").read_column_nullable("text"),
              rows);
  }

  // One row group, one page, one dictionary entry (bit width 0), every codec.
  for (int32_t codec : {kUncompressed, kSnappy, kGzip, kZstd}) {
    SCOPED_TRACE(codec_label(codec));
    const Rows same(50, std::string("same"));
    ParquetWriteOptions one;
    one.codec = codec;
    one.dictionary = true;
    EXPECT_EQ(ParquetFile::from_memory(test::write_parquet(same, one), "one.parquet").read_column_nullable("text"),
              same);
  }

  // No rows at all: one empty row group.
  const auto empty = ParquetFile::from_memory(test::write_parquet({}, ParquetWriteOptions{}), "empty.parquet");
  EXPECT_EQ(empty.num_rows(), 0);
  EXPECT_TRUE(empty.read_column_text("text").empty());

  // Only nulls, every page empty of values (a v2 value section of 0 bytes even with ZSTD).
  for (bool v2 : {false, true}) {
    const Rows nulls(200);
    ParquetWriteOptions n = options_for({kZstd, Enc::RleDictionary, v2, true});
    EXPECT_EQ(ParquetFile::from_memory(test::write_parquet(nulls, n), "nulls.parquet").read_column_nullable("text"),
              nulls);
  }

  // One page holding a 4 MB string.
  const Rows big = {std::string(4 << 20, 'q'), "tail"};
  ParquetWriteOptions b;
  b.codec = kZstd;
  EXPECT_EQ(ParquetFile::from_memory(test::write_parquet(big, b), "big.parquet").read_column_nullable("text"), big);
}

TEST(ParquetWritten, MissingColumnIsOneLineListingTheColumns) {
  const fs::path path = test::tmp_dir("parquet_missing") / "wikitext.parquet";
  test::write_file(path, test::write_parquet({"a", "b"}, ParquetWriteOptions{}));
  const std::string msg = clean_error_of([&] { read_parquet_text_column(path.string(), "txt"); });
  EXPECT_EQ(msg, path.string() + ": no column 'txt' (columns: id, text)");
  expect_clean_error([&] { read_parquet_text_column((path.parent_path() / "absent.parquet").string(), "text"); },
                     "absent.parquet: cannot open");
}

// ---- corrupt input ----------------------------------------------------------------------------------

std::string sample_file(int32_t codec, bool dictionary, bool v2) {
  ParquetWriteOptions o = options_for({codec, dictionary ? Enc::RleDictionary : Enc::Plain, v2, true});
  o.rows_per_group = 60;
  o.rows_per_page = 16;
  return test::write_parquet(sample_rows(150, true, 5), o);
}

TEST(ParquetCorrupt, BadMagicTruncationAndFooterLength) {
  const std::string good = sample_file(kSnappy, true, false);
  ASSERT_EQ(clean_error_of([&] { read_everything(good, "good.parquet"); }), "");
  const auto expect_bad = [](const std::string& bytes, const std::string& needle) {
    expect_clean_error([&] { read_everything(bytes, "bad.parquet"); }, needle, "bad.parquet");
  };
  expect_bad("", "not a Parquet file");
  expect_bad("PAR1", "not a Parquet file");
  expect_bad(std::string("PAR1\0\0\0\0PAR1", 12), "malformed footer");
  expect_bad("PAR0" + good.substr(4), "no PAR1 magic at the start");
  expect_bad(good.substr(0, good.size() - 1) + "2", "no PAR1 magic at the end");
  expect_bad(good.substr(0, good.size() - 4) + "PARE", "encrypted");
  // Footer length past the file, and pointing at the middle of the data.
  for (uint32_t len : {static_cast<uint32_t>(good.size()), static_cast<uint32_t>(good.size() - 11), 0xFFFFFFFFu}) {
    std::string bad = good;
    for (int i = 0; i < 4; ++i) bad[bad.size() - 8 + i] = static_cast<char>(len >> (8 * i));
    expect_bad(bad, "footer length");
  }
  // Every truncation: the trailing magic goes missing, or the file is too short.
  for (size_t n = 0; n < good.size(); ++n)
    EXPECT_NE(clean_error_of([&] { read_everything(good.substr(0, n), "cut.parquet"); }, "cut.parquet"), "") << n;
  // Truncated pages behind an intact footer: the chunks no longer fit the data.
  const std::string footer_and_tail = good.substr(good.size() - 8 - footer_length(good));
  EXPECT_NE(clean_error_of([&] { read_everything("PAR1" + footer_and_tail, "gutted.parquet"); }, "gutted.parquet"), "");
}

TEST(ParquetCorrupt, PageHeadersThatLie) {
  for (int32_t codec : {kUncompressed, kSnappy, kGzip, kZstd}) {
    for (bool v2 : {false, true}) {
      SCOPED_TRACE(str(codec_label(codec), v2 ? " v2" : " v1"));
      const Rows rows = sample_rows(200, true, 9);
      ParquetWriteOptions o = options_for({codec, Enc::Plain, v2, true});
      for (int64_t delta : {-1, 1, 1000}) {
        o.uncompressed_size_delta = delta;
        const std::string bytes = test::write_parquet(rows, o);
        EXPECT_NE(clean_error_of([&] { read_everything(bytes, "size.parquet"); }, "size.parquet"), "") << delta;
      }
      o.uncompressed_size_delta = 0;
      // More values than the chunk holds, and a count whose levels alone would take gigabytes.
      for (int64_t delta : {int64_t{1}, int64_t{1} << 30}) {
        o.num_values_delta = delta;
        const std::string bytes = test::write_parquet(rows, o);
        EXPECT_NE(clean_error_of([&] { read_everything(bytes, "count.parquet"); }, "count.parquet"), "") << delta;
      }
    }
  }
}

TEST(ParquetCorrupt, DecompressionIsCappedByThePageHeader) {
  // 4 MiB of one byte compress to a few KB; a header claiming 100 bytes must stop the codec
  // there (an error, not 4 MiB of output).
  const Rows rows = {std::string(4 << 20, 'z')};
  for (int32_t codec : {kSnappy, kGzip, kZstd}) {
    SCOPED_TRACE(codec_label(codec));
    ParquetWriteOptions o;
    o.codec = codec;
    o.uncompressed_size_delta = 100 - (int64_t{4} << 20) - 4;
    expect_clean_error([&] { read_everything(test::write_parquet(rows, o), "bomb.parquet"); },
                       "more than the 100 bytes the page header states", "bomb.parquet");
  }
}

// For longer runs by hand: QFORGE_PARQUET_FUZZ=N runs N times the rounds, from other seeds.
int fuzz_scale() {
  const char* env = std::getenv("QFORGE_PARQUET_FUZZ");
  return env ? std::max(1, std::atoi(env)) : 1;
}

TEST(ParquetCorrupt, RowGroupsSharingPagesCannotMakeEndlessWork) {
  // 1000 row groups that all point at one page of one value and 4 MiB of zstd-compressed zeros:
  // a file of about 100 KB that would take 4 GB of decompression. The read stops at its budget.
  ParquetWriteOptions o;
  o.codec = kZstd;
  o.value_padding = 4 << 20;
  o.repeat_first_group = 999;
  const std::string bytes = test::write_parquet({"x"}, o);
  EXPECT_LT(bytes.size(), 200000u);
  const ParquetFile f = ParquetFile::from_memory(bytes, "shared_pages.parquet");
  EXPECT_EQ(f.num_rows(), 1000);
  EXPECT_EQ(f.read_column_text("id").size(), 1000u);  // the id pages are small: nothing to stop
  expect_clean_error([&] { f.read_column_text("text"); }, "takes more page data to decode than",
                     "shared_pages.parquet");
}

// Random damage to valid files: any outcome but a crash, a hang, or an error that is not one line.
void fuzz(const std::string& good, const std::string& name, int iterations, uint64_t seed) {
  iterations *= fuzz_scale();
  seed += 1000003 * static_cast<uint64_t>(fuzz_scale() - 1);
  std::mt19937_64 rng(seed);
  const size_t footer = std::min(good.size(), 8 + footer_length(good));
  size_t failures = 0;
  for (int it = 0; it < iterations; ++it) {
    std::string bad = good;
    const int kind = static_cast<int>(rng() % 5);
    const auto any = [&] { return static_cast<size_t>(rng() % bad.size()); };
    const auto in_footer = [&] { return bad.size() - 1 - static_cast<size_t>(rng() % footer); };
    if (kind == 0) {  // a few bit flips anywhere
      for (int k = 1 + static_cast<int>(rng() % 4); k > 0; --k) bad[any()] ^= static_cast<char>(1 << (rng() % 8));
    } else if (kind == 1) {  // random bytes in the footer
      for (int k = 1 + static_cast<int>(rng() % 3); k > 0; --k) bad[in_footer()] = static_cast<char>(rng());
    } else if (kind == 2) {  // boundary values anywhere (lengths, counts, varints)
      static const uint8_t kValues[] = {0x00, 0x01, 0x7F, 0x80, 0xFF, 0x15, 0x19, 0x1C};
      bad[any()] = static_cast<char>(kValues[rng() % sizeof kValues]);
    } else if (kind == 3) {  // a run of random bytes anywhere
      const size_t at = any(), n = std::min<size_t>(bad.size() - at, 1 + rng() % 16);
      for (size_t k = 0; k < n; ++k) bad[at + k] = static_cast<char>(rng());
    } else {  // a byte removed or inserted (everything after it shifts)
      const size_t at = any();
      if (rng() & 1) bad.erase(at, 1);
      else bad.insert(at, 1, static_cast<char>(rng()));
    }
    std::string msg;
    const std::string problem = error_problem([&] { read_everything(bad, name); }, name, &msg);
    if (!problem.empty()) {
      ADD_FAILURE() << name << ", iteration " << it << " (seed " << seed << "): " << problem;
      return;  // the first one is enough to reproduce
    }
    failures += !msg.empty();
  }
  EXPECT_GT(failures, 0u) << "no damage was ever noticed";
}

TEST(ParquetCorrupt, RandomDamageToWrittenFiles) {
  uint64_t seed = 1;
  for (int32_t codec : {kUncompressed, kSnappy, kGzip, kZstd})
    for (bool dictionary : {false, true})
      for (bool v2 : {false, true}) {
        SCOPED_TRACE(str(codec_label(codec), dictionary ? " dict" : " plain", v2 ? " v2" : " v1"));
        fuzz(sample_file(codec, dictionary, v2), "fuzz.parquet", 600, seed++);
      }
}

TEST(ParquetCorrupt, RandomDamageToSharedFiles) {
  QF_REQUIRE_DATA(kParquetDir);
  uint64_t seed = 100;
  for (const char* name : {"alltypes_plain.parquet", "alltypes_dictionary.parquet", "datapage_v2.snappy.parquet",
                           "nested_lists.snappy.parquet", "list_columns.parquet", "nulls.snappy.parquet",
                           "page_v2_empty_compressed.parquet", "byte_stream_split.zstd.parquet",
                           "concatenated_gzip_members.parquet", "delta_length_byte_array.parquet",
                           "rle-dict-snappy-checksum.parquet", "data_index_bloom_encoding_stats.parquet",
                           "binary.parquet"}) {
    SCOPED_TRACE(name);
    fuzz(slurp(parquet_path(std::string("parquet-testing/") + name)), name, 500, seed++);
  }
  // The larger files: fewer rounds (each reads tens of KB).
  fuzz(slurp(parquet_path("parquet-testing/delta_byte_array.parquet")), "delta_byte_array.parquet", 100, seed++);
  fuzz(slurp(parquet_path("hf-datasets-style/financial-sentiment-test-00000-of-00001.parquet")), "financial.parquet",
       40, seed++);
}

}  // namespace
}  // namespace qf
