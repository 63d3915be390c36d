// Progress of long work, on stderr. On a terminal: one line redrawn in place with the stage, a
// bar, counts, elapsed time and an ETA. Otherwise (a log file, CI): a plain line every few
// seconds and one when the stage ends, so logs stay readable.
#pragma once
#include <chrono>
#include <cstdint>
#include <string>

namespace qf {

class Progress {
 public:
  // `total` steps of `unit` (e.g. "layer"); total 0 = unknown (no bar, no ETA).
  Progress(std::string stage, int64_t total, std::string unit);
  ~Progress();  // ends the line if finish() was not called
  Progress(const Progress&) = delete;
  Progress& operator=(const Progress&) = delete;

  // `done` of `total` steps so far; `detail` is a short note (e.g. "option 7/19"). Cheap to call
  // often: output is throttled.
  void update(int64_t done, const std::string& detail = "");
  // Ends the stage with a summary line (elapsed time added).
  void finish(const std::string& summary = "");

  double elapsed() const;
  // "1h02m", "3m05s", "12.3s"
  static std::string format_duration(double seconds);
  // Overrides terminal detection (tests); -1 = detect.
  static void force_terminal(int on);
  // Silences every progress line (a command's --quiet).
  static void set_quiet(bool quiet);

 private:
  void draw(bool final_line);

  std::string stage_, unit_, detail_;
  int64_t total_ = 0, done_ = 0;
  bool terminal_ = false, finished_ = false, drawn_ = false;
  std::chrono::steady_clock::time_point start_, last_draw_;
};

}  // namespace qf
