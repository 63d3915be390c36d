// Small JSON accessors for tokenizer files: optional fields that may be missing or null.
#pragma once
#include <string>

#include "core/error.h"
#include "core/json_file.h"

namespace qf::tok {

inline bool jbool(const json& j, const char* key, bool dflt) {
  auto it = j.find(key);
  return it == j.end() || it->is_null() ? dflt : it->get<bool>();
}
inline std::string jstr(const json& j, const char* key, const std::string& dflt = "") {
  auto it = j.find(key);
  return it == j.end() || it->is_null() ? dflt : it->get<std::string>();
}
// A count: a non-negative integer (a float such as 1e300 would overflow the conversion).
inline size_t jsize(const json& j, const char* key, size_t dflt, const std::string& where) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return dflt;
  if (!it->is_number_unsigned()) fail(where, ": field '", key, "' must be a non-negative integer");
  return it->get<size_t>();
}

}  // namespace qf::tok
