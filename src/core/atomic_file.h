// Files that appear whole or not at all: data goes to "<name>.partial", is flushed to the disk
// (fsync), then renamed over the final name and the folder is synced. A crash at any moment leaves
// either the old file or the new one, never a torn one. Every write is checked, so a full disk
// (ENOSPC) or any other I/O error becomes one clear error line and the partial file is removed.
#pragma once
#include <cstddef>
#include <filesystem>
#include <string>
#include <string_view>

namespace qf {

class AtomicFile {
 public:
  explicit AtomicFile(std::filesystem::path path);  // creates "<path>.partial"
  ~AtomicFile();                                    // not committed: the partial file is removed
  AtomicFile(const AtomicFile&) = delete;
  AtomicFile& operator=(const AtomicFile&) = delete;

  void write(const void* data, size_t n);
  void write(std::string_view s) { write(s.data(), s.size()); }
  void commit();  // fsync, rename into place, fsync the folder
  size_t written() const { return written_; }

 private:
  std::filesystem::path path_, tmp_;
  int fd_ = -1;
  size_t written_ = 0;
};

// The whole file in one go.
void write_file_atomic(const std::filesystem::path& path, std::string_view content);
// Makes a rename or removal inside `dir` durable.
void sync_directory(const std::filesystem::path& dir);

}  // namespace qf
