#include "core/json_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>

#include "core/error.h"

namespace qf {

namespace {

struct Fd {
  int fd;
  ~Fd() { if (fd >= 0) ::close(fd); }
};

}  // namespace

std::string read_text_file(const std::filesystem::path& path, size_t max_bytes) {
  const std::string where = path.string();
  // O_NONBLOCK only for the open itself: a FIFO with no writer must not hang us; reads block again.
  Fd f{::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK)};
  if (f.fd < 0) fail(where, ": cannot open: ", errno_message(errno));
  if (const int fl = ::fcntl(f.fd, F_GETFL); fl >= 0) ::fcntl(f.fd, F_SETFL, fl & ~O_NONBLOCK);
  struct stat st {};
  if (::fstat(f.fd, &st) != 0) fail(where, ": cannot read: ", errno_message(errno));
  if (S_ISDIR(st.st_mode)) fail(where, ": cannot read: is a directory");
  if (S_ISREG(st.st_mode) && static_cast<uint64_t>(st.st_size) > max_bytes)
    fail(where, ": file is ", st.st_size, " bytes, more than the limit of ", max_bytes, " bytes");
  std::string text;
  if (S_ISREG(st.st_mode)) text.reserve(static_cast<size_t>(st.st_size));
  // Read to the end (not to st_size): pipes and /dev/stdin work, and a file that grows is read whole
  // up to the limit.
  char buf[1 << 16];
  while (true) {
    const ssize_t n = ::read(f.fd, buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR) continue;
      fail(where, ": cannot read: ", errno_message(errno));
    }
    if (n == 0) break;
    if (text.size() + static_cast<size_t>(n) > max_bytes)
      fail(where, ": more than the limit of ", max_bytes, " bytes");
    text.append(buf, static_cast<size_t>(n));
  }
  return text;
}

void check_json_depth(std::string_view text, const std::string& where, int max_depth) {
  // Counts [ and { outside strings. For valid JSON this is exactly the nesting depth; for invalid
  // JSON it only decides which of two errors comes first.
  int depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\') ++i;
      else if (c == '"') in_string = false;
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      if (++depth > max_depth)
        fail(where, ": JSON nested deeper than ", max_depth, " levels (at byte ", i, ")");
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
}

json parse_json(std::string_view text, const std::string& where) {
  // nlohmann parses iteratively, but copying, dumping and comparing values recurse, and so do the
  // readers of nested structures (tokenizer Sequence steps): deep nesting is refused up front.
  check_json_depth(text, where, kMaxJsonDepth);
  json j = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) {
    // Parse again only to get nlohmann's position message.
    try {
      json again = json::parse(text);
      (void)again;
    } catch (const json::exception& e) {  // parse_error, or out_of_range for a number like 1e999
      fail(where, ": malformed JSON (", e.what(), ")");
    }
    fail(where, ": malformed JSON");
  }
  return j;
}

json read_json_file(const std::filesystem::path& path) {
  return parse_json(read_text_file(path, kMaxJsonFileBytes), path.string());
}

std::string json_error_text(const json::exception& e) {
  std::string_view s = e.what();
  if (s.starts_with("[json.exception.")) {
    const size_t close = s.find("] ");
    if (close != std::string_view::npos) s.remove_prefix(close + 2);
  }
  return std::string(s);
}

int64_t json_int(const json& j, const char* key, const std::string& where) {
  auto it = j.find(key);
  if (it == j.end()) fail(where, ": missing field '", key, "'");
  if (!it->is_number_integer()) fail(where, ": field '", key, "' must be an integer");
  return it->get<int64_t>();
}

double json_number(const json& j, const char* key, const std::string& where) {
  auto it = j.find(key);
  if (it == j.end()) fail(where, ": missing field '", key, "'");
  if (!it->is_number()) fail(where, ": field '", key, "' must be a number");
  return it->get<double>();
}

}  // namespace qf
