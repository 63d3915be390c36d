// JSON files with errors that name the file (nlohmann::json does the parsing).
#pragma once
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

namespace qf {

using json = nlohmann::json;

// Deepest [ / { nesting accepted in any JSON we read. Real files (tokenizer.json, config.json,
// safetensors headers, measurement.json) need fewer than 10 levels.
constexpr int kMaxJsonDepth = 128;
// Largest JSON file read_json_file accepts (the biggest real tokenizer.json files are ~35 MB;
// nlohmann needs about ten times the text size in memory).
constexpr size_t kMaxJsonFileBytes = size_t{256} << 20;

// The one path for JSON text: refuses nesting deeper than kMaxJsonDepth, then parses. Throws
// qf::Error "<where>: malformed JSON (...)" or "<where>: JSON nested deeper than 128 levels ...".
json parse_json(std::string_view text, const std::string& where);
// Only the nesting check of parse_json (for callers that parse with their own options).
void check_json_depth(std::string_view text, const std::string& where, int max_depth = kMaxJsonDepth);

// Parses a whole file with parse_json; throws "<path>: cannot open: permission denied" etc.
json read_json_file(const std::filesystem::path& path);
// The whole file as bytes. Errors say what happened ("cannot open: no such file", "permission
// denied", "cannot read: is a directory", over max_bytes). Pipes and devices are read to the end.
std::string read_text_file(const std::filesystem::path& path, size_t max_bytes = SIZE_MAX);

// nlohmann's exception text without its "[json.exception.type_error.302] " tag.
std::string json_error_text(const json::exception& e);

// Typed field access that reports "<where>: field 'k' ..." instead of nlohmann's generic text.
int64_t json_int(const json& j, const char* key, const std::string& where);
double json_number(const json& j, const char* key, const std::string& where);

}  // namespace qf
