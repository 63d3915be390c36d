// A file read from its start, piece by piece: how read_text_file and ppl's tokenizer (which reads
// only the prefix it needs) open and read files, with the same one-line errors.
#pragma once
#include <cstdint>
#include <filesystem>
#include <optional>
#include <string>

namespace qf {

class FileReader {
 public:
  // Fails with "<path>: cannot open: <why>" or "<path>: cannot read: is a directory". A FIFO with
  // no writer does not hang the open; pipes and devices are read to their end.
  explicit FileReader(const std::filesystem::path& path);
  ~FileReader();
  FileReader(const FileReader&) = delete;
  FileReader& operator=(const FileReader&) = delete;

  // The size of a regular file; none for pipes and devices.
  std::optional<uint64_t> size() const { return size_; }
  // Appends up to n more bytes to text; false once the end of the file is reached.
  bool read_into(std::string& text, size_t n);
  const std::string& where() const { return where_; }

 private:
  std::string where_;
  int fd_ = -1;
  std::optional<uint64_t> size_;
  bool at_end_ = false;
};

}  // namespace qf
