#include "core/log.h"

#include <atomic>
#include <cstdio>

namespace qf {

namespace {
std::atomic<int> g_level{static_cast<int>(LogLevel::Warn)};
}

void set_log_level(LogLevel level) { g_level = static_cast<int>(level); }
LogLevel log_level() { return static_cast<LogLevel>(g_level.load()); }

void log_message(LogLevel level, const std::string& msg) {
  if (static_cast<int>(level) < g_level.load()) return;
  const char* tag = level == LogLevel::Warn ? "warning: " : level == LogLevel::Error ? "error: " : "";
  std::fprintf(stderr, "%s%s\n", tag, msg.c_str());
}

}  // namespace qf
