#include "core/progress.h"

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>

namespace qf {

namespace {

int g_force_terminal = -1;
bool g_quiet = false;

bool stderr_is_terminal() {
  if (g_force_terminal >= 0) return g_force_terminal == 1;
  const char* term = std::getenv("TERM");
  return isatty(STDERR_FILENO) && !(term && std::strcmp(term, "dumb") == 0);
}

constexpr double kTerminalInterval = 0.1;  // seconds between redraws
constexpr double kLogInterval = 10.0;      // seconds between plain lines

}  // namespace

void Progress::force_terminal(int on) { g_force_terminal = on; }
void Progress::set_quiet(bool quiet) { g_quiet = quiet; }

Progress::Progress(std::string stage, int64_t total, std::string unit)
    : stage_(std::move(stage)), unit_(std::move(unit)), total_(total), terminal_(stderr_is_terminal()) {
  start_ = last_draw_ = std::chrono::steady_clock::now();
}

Progress::~Progress() {
  if (!finished_ && drawn_ && terminal_) std::fputc('\n', stderr);
}

double Progress::elapsed() const {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
}

std::string Progress::format_duration(double s) {
  char buf[32];
  if (s < 60) std::snprintf(buf, sizeof buf, "%.1fs", s);
  else if (s < 3600) std::snprintf(buf, sizeof buf, "%dm%02ds", static_cast<int>(s) / 60, static_cast<int>(s) % 60);
  else std::snprintf(buf, sizeof buf, "%dh%02dm", static_cast<int>(s) / 3600, static_cast<int>(s) % 3600 / 60);
  return buf;
}

void Progress::update(int64_t done, const std::string& detail) {
  done_ = done;
  detail_ = detail;
  const auto now = std::chrono::steady_clock::now();
  const double since = std::chrono::duration<double>(now - last_draw_).count();
  if (since < (terminal_ ? kTerminalInterval : kLogInterval)) return;
  last_draw_ = now;
  draw(false);
}

void Progress::finish(const std::string& summary) {
  if (finished_) return;
  finished_ = true;
  if (!summary.empty()) detail_ = summary;
  done_ = total_ > 0 ? total_ : done_;
  draw(true);
}

void Progress::draw(bool final_line) {
  if (g_quiet) return;
  const double t = elapsed();
  std::string line = stage_ + ": ";
  if (total_ > 0) {
    if (terminal_) {
      constexpr int kWidth = 24;
      const int fill = static_cast<int>(kWidth * done_ / total_);
      line.push_back('[');
      line.append(static_cast<size_t>(fill), '#');
      line.append(static_cast<size_t>(kWidth - fill), '.');
      line.append("] ");
    }
    line += unit_ + " " + std::to_string(done_) + "/" + std::to_string(total_);
    line += " (" + std::to_string(100 * done_ / total_) + "%)";
  } else if (done_ > 0) {
    line += std::to_string(done_) + " " + unit_;
  }
  line += ", " + format_duration(t);
  if (!final_line && total_ > 0 && done_ > 0 && done_ < total_)
    line += ", ETA " + format_duration(t / static_cast<double>(done_) * static_cast<double>(total_ - done_));
  if (!detail_.empty()) line += "  " + detail_;
  if (terminal_) std::fprintf(stderr, "\r%s\x1b[K%s", line.c_str(), final_line ? "\n" : "");
  else std::fprintf(stderr, "%s\n", line.c_str());
  std::fflush(stderr);
  drawn_ = true;
}

}  // namespace qf
