#include "core/json_file.h"

#include "core/error.h"
#include "core/file_reader.h"

namespace qf {

std::string read_text_file(const std::filesystem::path& path, size_t max_bytes) {
  FileReader f(path);
  if (f.size() && *f.size() > max_bytes)
    fail(f.where(), ": file is ", *f.size(), " bytes, more than the limit of ", max_bytes, " bytes");
  std::string text;
  if (f.size()) text.reserve(static_cast<size_t>(*f.size()));
  // Read to the end (not to the size): pipes and /dev/stdin work, and a file that grows is read
  // whole up to the limit.
  for (bool more = true; more;) {
    more = f.read_into(text, 1 << 16);
    if (text.size() > max_bytes) fail(f.where(), ": more than the limit of ", max_bytes, " bytes");
  }
  return text;
}

void check_json_depth(std::string_view text, const std::string& where, int max_depth) {
  // Counts [ and { outside strings. For valid JSON this is exactly the nesting depth; for invalid
  // JSON it only decides which of two errors comes first.
  int depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\') ++i;
      else if (c == '"') in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > max_depth)
        fail(where, ": JSON nested deeper than ", max_depth, " levels (at byte ", i, ")");
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
}

json parse_json(std::string_view text, const std::string& where) {
  // nlohmann parses iteratively, but copying, dumping and comparing values recurse, and so do the
  // readers of nested structures (tokenizer Sequence steps): deep nesting is refused up front.
  check_json_depth(text, where, kMaxJsonDepth);
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) {
    // Parse again only to get nlohmann's position message.
    try {
      json again = json::parse(text);
      (void)again;
    } catch (const json::exception& e) {  // parse_error, or out_of_range for a number like 1e999
      fail(where, ": malformed JSON (", e.what(), ")");
    }
    fail(where, ": malformed JSON");
  }
  return j;
}

json read_json_file(const std::filesystem::path& path) {
  return parse_json(read_text_file(path, kMaxJsonFileBytes), path.string());
}

std::string json_error_text(const json::exception& e) {
  std::string_view s = e.what();
  if (s.starts_with("[json.exception.")) {
    const size_t close = s.find("] ");
    if (close != std::string_view::npos) s.remove_prefix(close + 2);
  }
  return std::string(s);
}

int64_t json_int(const json& j, const char* key, const std::string& where) {
  auto it = j.find(key);
  if (it == j.end()) fail(where, ": missing field '", key, "'");
  if (!it->is_number_integer()) fail(where, ": field '", key, "' must be an integer");
  return it->get<int64_t>();
}

double json_number(const json& j, const char* key, const std::string& where) {
  auto it = j.find(key);
  if (it == j.end()) fail(where, ": missing field '", key, "'");
  if (!it->is_number()) fail(where, ": field '", key, "' must be a number");
  return it->get<double>();
}

}  // namespace qf
