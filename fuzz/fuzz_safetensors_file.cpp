// One safetensors file (formats/safetensors.cpp: SafetensorsFile::open), the input being the
// whole file: 8-byte header length, JSON header, data.
//
// Besides crashes: every tensor handed out is read end to end (a view past the mapping faults),
// its shape must be non-negative and its size computable, and a header that names a tensor twice
// must not load (the JSON parser keeps only one of the two, silently).
#include <limits>
#include <set>

#include "core/json_file.h"
#include "formats/safetensors.h"
#include "fuzz_common.h"

using namespace qf;

namespace {

// Finds a key that appears twice in the top-level object of the header (a SAX pass: the DOM
// that SafetensorsFile builds cannot show it).
struct DuplicateKeys : nlohmann::json_sax<json> {
  int depth = 0;
  std::set<std::string> seen;
  std::string duplicate;
  bool null() override { return true; }
  bool boolean(bool) override { return true; }
  bool number_integer(number_integer_t) override { return true; }
  bool number_unsigned(number_unsigned_t) override { return true; }
  bool number_float(number_float_t, const string_t&) override { return true; }
  bool string(string_t&) override { return true; }
  bool binary(binary_t&) override { return true; }
  bool start_object(std::size_t) override { return ++depth, true; }
  bool end_object() override { return --depth, true; }
  bool start_array(std::size_t) override { return ++depth, true; }
  bool end_array() override { return --depth, true; }
  bool key(string_t& k) override {
    if (depth == 1 && !seen.insert(k).second && duplicate.empty()) duplicate = k;
    return true;
  }
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception&) override { return false; }
};

void check_tensors(const SafetensorsFile& f, const uint8_t* data, size_t size) {
  for (const auto& [name, v] : f.tensors()) {
    uint64_t numel = 1;
    for (int64_t d : v.shape) {
      if (d < 0) fuzz::finding(str("tensor ", quote_for_error(name), " loaded with shape ", v.shape_str()));
      if (__builtin_mul_overflow(numel, static_cast<uint64_t>(d), &numel))
        fuzz::finding(str("tensor ", quote_for_error(name), ": element count of ", v.shape_str(), " overflows"));
    }
    uint64_t bytes = 0;
    if (__builtin_mul_overflow(numel, dtype_size(v.dtype), &bytes) || bytes != v.nbytes())
      fuzz::finding(str("tensor ", quote_for_error(name), ": nbytes() ", v.nbytes(), " for shape ", v.shape_str()));
    // Touch every byte: a view that runs off the mapping faults here.
    const auto* p = static_cast<const volatile uint8_t*>(v.data);
    uint8_t sum = 0;
    for (uint64_t i = 0; i < bytes; ++i) sum ^= p[i];
    (void)sum;
  }
  if (size >= 8) {
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | data[i];
    if (n <= size - 8) {
      DuplicateKeys sax;
      json::sax_parse(data + 8, data + 8 + n, &sax);
      if (!sax.duplicate.empty())
        fuzz::finding(str("header names tensor ", quote_for_error(sax.duplicate), " twice and the file loaded"));
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto path = fuzz::scratch_dir() / "model.safetensors";
  fuzz::write_file(path, std::string_view(reinterpret_cast<const char*>(data), size));
  fuzz::expect_errors([&] {
    auto f = SafetensorsFile::open(path);
    check_tensors(*f, data, size);
    // The store over it: the index every loader looks tensors up in.
    TensorStore s = TensorStore::from_files({path});
    for (const auto& n : s.names()) (void)s.get(n);
  });
  return 0;
}
