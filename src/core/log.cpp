#include "core/log.h"

#include <atomic>
#include <cstdio>

namespace qf {

namespace {
constexpr size_t kMaxMessageBytes = 4096;
std::atomic<int> g_level{static_cast<int>(LogLevel::Warn)};
}

void set_log_level(LogLevel level) { g_level = static_cast<int>(level); }
LogLevel log_level() { return static_cast<LogLevel>(g_level.load()); }

void log_message(LogLevel level, const std::string& msg) {
  if (static_cast<int>(level) < g_level.load()) return;
  const char* tag = level == LogLevel::Warn ? "warning: " : level == LogLevel::Error ? "error: " : "";
  // Messages quote file contents (tensor names, tokens, paths): one escaped line each, so a file
  // can neither forge a second line nor send escape sequences to the terminal.
  std::fprintf(stderr, "%s%s\n", tag, escape_text(msg, kMaxMessageBytes).c_str());
}

}  // namespace qf
