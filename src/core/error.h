// Errors: one exception type whose message is the one line a user sees.
#pragma once
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>

namespace qf {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& msg) : std::runtime_error(msg) {}
};

// Concatenates anything streamable into a string: str("layer ", i, ": bad shape").
template <typename... Args>
std::string str(Args&&... args) {
  std::ostringstream os;
  (os << ... << std::forward<Args>(args));
  return os.str();
}

template <typename... Args>
[[noreturn]] void fail(Args&&... args) {
  throw Error(str(std::forward<Args>(args)...));
}

// Text from a file or the command line made safe for one line of a terminal: C0 controls
// (newline, ESC, ...), DEL, C1 controls, line separators, bidi overrides and bytes that are not
// valid UTF-8 become \xNN; valid UTF-8 text stays readable. Output beyond max_bytes is cut off
// with a "... (N more bytes)" note. Escaping escaped text (not cut) changes nothing.
std::string escape_text(std::string_view s, size_t max_bytes = SIZE_MAX);

// errno in the words of an error line: "no such file", "permission denied", "is a directory", ...
std::string errno_message(int err);

// Quotes text for a one-line error message: 'text', escaped as escape_text does; text longer
// than 200 bytes is cut: 'first 200 bytes'... (N bytes).
std::string quote_for_error(std::string_view s);

#define QF_CHECK(cond, ...)                 \
  do {                                      \
    if (!(cond)) ::qf::fail(__VA_ARGS__);   \
  } while (0)

}  // namespace qf
