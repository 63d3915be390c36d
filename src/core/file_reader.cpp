#include "core/file_reader.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>

#include "core/error.h"

namespace qf {

FileReader::FileReader(const std::filesystem::path& path) : where_(path.string()) {
  // O_NONBLOCK only for the open itself: a FIFO with no writer must not hang us; reads block again.
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NONBLOCK);
  if (fd_ < 0) fail(where_, ": cannot open: ", errno_message(errno));
  if (const int fl = ::fcntl(fd_, F_GETFL); fl >= 0) ::fcntl(fd_, F_SETFL, fl & ~O_NONBLOCK);
  struct stat st {};
  if (::fstat(fd_, &st) != 0) {
    const int err = errno;
    ::close(fd_);
    fail(where_, ": cannot read: ", errno_message(err));
  }
  if (S_ISDIR(st.st_mode)) {
    ::close(fd_);
    fail(where_, ": cannot read: is a directory");
  }
  if (S_ISREG(st.st_mode)) size_ = static_cast<uint64_t>(st.st_size);
}

FileReader::~FileReader() {
  if (fd_ >= 0) ::close(fd_);
}

bool FileReader::read_into(std::string& text, size_t n) {
  char buf[1 << 16];
  while (n > 0 && !at_end_) {
    const ssize_t got = ::read(fd_, buf, std::min(n, sizeof buf));
    if (got < 0) {
      if (errno == EINTR) continue;
      fail(where_, ": cannot read: ", errno_message(errno));
    }
    if (got == 0) at_end_ = true;
    text.append(buf, static_cast<size_t>(got));
    n -= static_cast<size_t>(got);
  }
  return !at_end_;
}

}  // namespace qf
