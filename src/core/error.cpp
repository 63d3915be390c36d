#include "core/error.h"

#include <cstdint>
#include <cstdio>

namespace qf {

std::string quote_for_error(std::string_view s) {
  std::string out = "'";
  for (char c : s) {
    if (static_cast<uint8_t>(c) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof(buf), "\\x%02X", static_cast<uint8_t>(c));
      out += buf;
    } else {
      out += c;
    }
  }
  return out + "'";
}

}  // namespace qf
