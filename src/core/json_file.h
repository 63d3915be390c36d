// JSON files with errors that name the file (nlohmann::json does the parsing).
#pragma once
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>

namespace qf {

using json = nlohmann::json;

// Parses a whole file; throws qf::Error "<path>: malformed JSON: ..." or "<path>: cannot open".
json read_json_file(const std::filesystem::path& path);
std::string read_text_file(const std::filesystem::path& path);

// Typed field access that reports "<where>: field 'k' ..." instead of nlohmann's generic text.
int64_t json_int(const json& j, const char* key, const std::string& where);
double json_number(const json& j, const char* key, const std::string& where);

}  // namespace qf
