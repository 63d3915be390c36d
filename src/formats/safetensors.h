// Safetensors files: an 8-byte little-endian header length, a JSON header mapping tensor names to
// {dtype, shape, data_offsets}, then the raw data. Files are memory-mapped; every header field is
// validated against the file before any tensor is handed out.
#pragma once
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/mapped_file.h"
#include "core/tensor.h"

namespace qf {

class SafetensorsFile {
 public:
  static std::shared_ptr<SafetensorsFile> open(const std::filesystem::path& path);

  const std::filesystem::path& path() const { return file_->path(); }
  const std::map<std::string, TensorView>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

 private:
  std::shared_ptr<MappedFile> file_;
  std::map<std::string, TensorView> tensors_;
  std::map<std::string, std::string> metadata_;
};

// All tensors of a model folder: every *.safetensors file in it, cross-checked against
// model.safetensors.index.json when there is one.
class TensorStore {
 public:
  static TensorStore open_dir(const std::filesystem::path& dir);
  static TensorStore from_files(const std::vector<std::filesystem::path>& files);
  // Tensors held in memory (the views keep their data alive), e.g. a layer just quantized.
  static TensorStore from_views(std::map<std::string, TensorView> views);

  bool has(const std::string& name) const { return index_.count(name) != 0; }
  const TensorView& get(const std::string& name) const;  // throws naming the tensor
  const TensorView* find(const std::string& name) const;
  std::filesystem::path file_of(const std::string& name) const;
  std::vector<std::string> names() const;
  const std::vector<std::shared_ptr<SafetensorsFile>>& files() const { return files_; }
  size_t total_bytes() const;
  // Notes about the folder worth telling the user (e.g. a stale index file).
  const std::vector<std::string>& notes() const { return notes_; }

 private:
  std::vector<std::shared_ptr<SafetensorsFile>> files_;
  std::map<std::string, std::pair<size_t, const TensorView*>> index_;  // name -> (file, view)
  std::vector<std::string> notes_;
  std::shared_ptr<const std::map<std::string, TensorView>> memory_;  // from_views
};

// Writes tensors into a new safetensors file (used by tests and by converters). Writes to a
// temporary name and renames, so a crash never leaves a partial file under the final name.
struct TensorToWrite {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  const void* data;
};
void write_safetensors(const std::filesystem::path& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace qf
