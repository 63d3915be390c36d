#include "fuzz_common.h"

#include <signal.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>

#include <fstream>
#include <system_error>

namespace qf::fuzz {

namespace fs = std::filesystem;

std::vector<std::string_view> split_parts(const uint8_t* data, size_t size, size_t max_parts) {
  std::string_view in(reinterpret_cast<const char*>(data), size);
  std::vector<std::string_view> parts;
  while (parts.size() + 1 < max_parts) {
    const size_t at = in.find(kPartSeparator);
    if (at == std::string_view::npos) break;
    parts.push_back(in.substr(0, at));
    in.remove_prefix(at + kPartSeparator.size());
  }
  parts.push_back(in);
  return parts;
}

namespace {

constexpr std::string_view kScratchPrefix = "qforge-fuzz-";

// A run that crashed (a finding aborts, a time limit kills) leaves its scratch folder behind, in
// RAM when it is /dev/shm: remove those whose process (the pid in the name) is gone.
void remove_orphaned_scratch(const fs::path& base) {
  std::error_code ec;
  for (fs::directory_iterator it(base, ec), end; !ec && it != end; it.increment(ec)) {
    const std::string name = it->path().filename().string();
    if (!name.starts_with(kScratchPrefix)) continue;
    const long pid = std::strtol(name.c_str() + kScratchPrefix.size(), nullptr, 10);
    const bool gone = pid > 0 && kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH;
    if (!gone) continue;  // running (or not ours to judge)
    std::error_code ignored;
    fs::remove_all(it->path(), ignored);
  }
}

fs::path make_scratch() {
  std::error_code ec;
  std::string base = "/dev/shm";
  if (!fs::is_directory(base, ec) || access(base.c_str(), W_OK) != 0) base = fs::temp_directory_path().string();
  remove_orphaned_scratch(base);
  std::string tmpl = base + "/" + std::string(kScratchPrefix) + std::to_string(getpid()) + "-XXXXXX";
  if (!mkdtemp(tmpl.data())) {
    std::perror("qforge fuzz: mkdtemp");
    std::abort();
  }
  static fs::path dir = tmpl;
  std::atexit([] {
    std::error_code ignored;
    fs::remove_all(dir, ignored);
  });
  return dir;
}

}  // namespace

const fs::path& scratch_dir() {
  static const fs::path dir = make_scratch();
  return dir;
}

fs::path fresh_subdir(const std::string& name) {
  const fs::path p = scratch_dir() / name;
  fs::remove_all(p);
  fs::create_directory(p);
  return p;
}

void write_file(const fs::path& path, std::string_view bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) {
    std::fprintf(stderr, "qforge fuzz: cannot write %s\n", path.c_str());
    std::abort();
  }
}

void finding(const std::string& what) {
  std::fprintf(stderr, "\n==qforge-fuzz== FINDING: %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();
}

bool verbose() {
  static const bool on = std::getenv("QFORGE_FUZZ_VERBOSE") != nullptr;
  return on;
}

void check_message(const char* what) {
  for (const char* p = what; *p; ++p)
    if (static_cast<unsigned char>(*p) < 0x20)
      finding(str("error message holds control byte 0x", std::hex, static_cast<int>(static_cast<unsigned char>(*p)),
                  " at offset ", std::dec, p - what, " (messages must be one line): ", quote_for_error(what)));
}

}  // namespace qf::fuzz
