#include "core/json_file.h"

#include <fstream>
#include <sstream>

#include "core/error.h"

namespace qf {

std::string read_text_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail(path.string(), ": cannot open (missing file?)");
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

json read_json_file(const std::filesystem::path& path) {
  const std::string text = read_text_file(path);
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) {
    // Parse again only to get nlohmann's position message.
    try {
      json again = json::parse(text);
      (void)again;
    } catch (const json::parse_error& e) {
      fail(path.string(), ": malformed JSON (", e.what(), ")");
    }
    fail(path.string(), ": malformed JSON");
  }
  return j;
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
