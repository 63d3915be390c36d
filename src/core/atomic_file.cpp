#include "core/atomic_file.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>

#include "core/error.h"

namespace qf {

namespace {

// Test hook: QFORGE_FAIL_WRITES_AFTER=N makes the write that crosses N bytes (over the whole
// process) fail with ENOSPC, so tests can see a full disk without one.
bool injected_full_disk(size_t n) {
  static const long long limit = [] {
    const char* v = std::getenv("QFORGE_FAIL_WRITES_AFTER");
    return v ? std::atoll(v) : -1LL;
  }();
  static size_t total = 0;
  if (limit < 0) return false;
  total += n;
  return total > static_cast<size_t>(limit);
}

}  // namespace

AtomicFile::AtomicFile(std::filesystem::path path) : path_(std::move(path)) {
  tmp_ = path_.string() + ".partial";
  fd_ = ::open(tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd_ < 0) fail(path_.string(), ": cannot create: ", std::strerror(errno));
}

AtomicFile::~AtomicFile() {
  if (fd_ >= 0) {
    ::close(fd_);
    ::unlink(tmp_.c_str());
  }
}

void AtomicFile::write(const void* data, size_t n) {
  QF_CHECK(fd_ >= 0, path_.string(), ": write after commit");
  const char* p = static_cast<const char*>(data);
  while (n > 0) {
    const size_t chunk = std::min<size_t>(n, size_t{1} << 30);
    ssize_t w = injected_full_disk(chunk) ? (errno = ENOSPC, -1) : ::write(fd_, p, chunk);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) {
      const int err = w < 0 ? errno : EIO;
      fail(path_.string(), ": write failed after ", written_, " bytes: ", std::strerror(err),
           err == ENOSPC ? " (the disk is full)" : "");
    }
    p += w;
    n -= static_cast<size_t>(w);
    written_ += static_cast<size_t>(w);
  }
}

void AtomicFile::commit() {
  QF_CHECK(fd_ >= 0, path_.string(), ": committed twice");
  if (::fsync(fd_) != 0) fail(path_.string(), ": fsync failed: ", std::strerror(errno));
  if (::close(fd_) != 0) {
    fd_ = -1;
    ::unlink(tmp_.c_str());
    fail(path_.string(), ": close failed: ", std::strerror(errno));
  }
  fd_ = -1;
  if (::rename(tmp_.c_str(), path_.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp_.c_str());
    fail(path_.string(), ": cannot rename into place: ", std::strerror(err));
  }
  sync_directory(path_.has_parent_path() ? path_.parent_path() : std::filesystem::path("."));
}

void write_file_atomic(const std::filesystem::path& path, std::string_view content) {
  AtomicFile f(path);
  f.write(content);
  f.commit();
}

void sync_directory(const std::filesystem::path& dir) {
  const int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return;  // best effort: some filesystems cannot open folders
  ::fsync(fd);
  ::close(fd);
}

}  // namespace qf
