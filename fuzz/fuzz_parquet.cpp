// A Parquet file (formats/parquet*.cpp, formats/thrift_compact.cpp: ParquetFile::from_memory), the
// input being the whole file: footer (Thrift compact), schema, column chunks, page headers, the
// encodings and codecs. Every leaf column is read, as `qforge convert -c` reads a text column
// (read_column_text is read_column_nullable without the nulls, so each column is read once).
#include "formats/parquet.h"
#include "fuzz_common.h"

using namespace qf;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  fuzz::expect_errors([&] {
    const ParquetFile f = ParquetFile::from_memory(std::string(reinterpret_cast<const char*>(data), size), "fuzz.parquet");
    (void)f.num_rows();
    (void)f.num_row_groups();
    (void)f.created_by();
    for (const auto& c : f.columns()) fuzz::expect_errors([&] { (void)f.read_column_nullable(c.path); });
    (void)f.read_column_text("no such column");
  });
  return 0;
}
