// Errors: one exception type whose message is the one line a user sees.
#pragma once
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

// Quotes text for a one-line error message: 'text', with control bytes escaped as \xNN.
std::string quote_for_error(std::string_view s);

#define QF_CHECK(cond, ...)                 \
  do {                                      \
    if (!(cond)) ::qf::fail(__VA_ARGS__);   \
  } while (0)

}  // namespace qf
