// Minimal leveled logging to stderr (stdout is reserved for generated text).
#pragma once
#include <string>

#include "core/error.h"

namespace qf {

enum class LogLevel { Debug = 0, Info = 1, Warn = 2, Error = 3, Quiet = 4 };

void set_log_level(LogLevel level);
LogLevel log_level();
void log_message(LogLevel level, const std::string& msg);

template <typename... Args> void log_info(Args&&... a) { log_message(LogLevel::Info, str(std::forward<Args>(a)...)); }
template <typename... Args> void log_warn(Args&&... a) { log_message(LogLevel::Warn, str(std::forward<Args>(a)...)); }
template <typename... Args> void log_debug(Args&&... a) { log_message(LogLevel::Debug, str(std::forward<Args>(a)...)); }

}  // namespace qf
