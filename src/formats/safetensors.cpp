#include "formats/safetensors.h"

#include <algorithm>
#include <cstring>
#include <fstream>
#include <limits>
#include <set>

#include "core/atomic_file.h"
#include "core/error.h"
#include "core/json_file.h"
#include "core/log.h"

namespace qf {

namespace {

// Largest header we accept: real headers are a few MB at most; this bounds the parse cost.
constexpr uint64_t kMaxHeaderBytes = 256ull << 20;

TensorView parse_entry(const std::string& file, const std::string& name, const json& e,
                       const unsigned char* data, uint64_t data_size) {
  const std::string where = file + ": tensor '" + name + "'";
  if (!e.is_object()) fail(where, ": header entry is not an object");
  auto dt = e.find("dtype");
  if (dt == e.end() || !dt->is_string()) fail(where, ": missing dtype");
  TensorView v;
  if (!dtype_from_name(dt->get<std::string>(), &v.dtype))
    fail(where, ": unknown dtype '", dt->get<std::string>(), "'");
  auto sh = e.find("shape");
  if (sh == e.end() || !sh->is_array()) fail(where, ": missing shape");
  uint64_t numel = 1;
  for (const auto& d : *sh) {
    if (!d.is_number_unsigned() && !(d.is_number_integer() && d.get<int64_t>() >= 0))
      fail(where, ": shape must hold non-negative integers");
    const uint64_t n = d.get<uint64_t>();
    if (n != 0 && numel > std::numeric_limits<uint64_t>::max() / 8 / n) fail(where, ": shape too large");
    numel *= n;
    v.shape.push_back(static_cast<int64_t>(n));
  }
  auto off = e.find("data_offsets");
  if (off == e.end() || !off->is_array() || off->size() != 2 || !(*off)[0].is_number_unsigned() ||
      !(*off)[1].is_number_unsigned())
    fail(where, ": data_offsets must be two non-negative integers");
  const uint64_t begin = (*off)[0].get<uint64_t>(), end = (*off)[1].get<uint64_t>();
  if (begin > end || end > data_size)
    fail(where, ": data_offsets [", begin, ", ", end, "] out of range (data is ", data_size, " bytes)");
  const uint64_t expect = numel * dtype_size(v.dtype);
  if (end - begin != expect)
    fail(where, ": shape ", v.shape_str(), " of ", dt->get<std::string>(), " needs ", expect,
         " bytes but data_offsets span ", end - begin);
  v.data = data + begin;
  return v;
}

}  // namespace

std::shared_ptr<SafetensorsFile> SafetensorsFile::open(const std::filesystem::path& path) {
  auto st = std::shared_ptr<SafetensorsFile>(new SafetensorsFile());
  st->file_ = MappedFile::open(path);
  const std::string name = path.string();
  const auto* base = st->file_->data();
  const uint64_t size = st->file_->size();
  if (size < 8) fail(name, ": truncated safetensors file (", size, " bytes, no header)");
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | base[i];
  if (header_len > kMaxHeaderBytes || header_len > size - 8)
    fail(name, ": header length ", header_len, " exceeds the file size ", size, " (truncated or not safetensors)");
  const char* hp = reinterpret_cast<const char*>(base + 8);
  json header = json::parse(hp, hp + header_len, nullptr, /*allow_exceptions=*/false);
  if (header.is_discarded() || !header.is_object()) fail(name, ": malformed safetensors header JSON");

  const unsigned char* data = base + 8 + header_len;
  const uint64_t data_size = size - 8 - header_len;
  // Keep the mapping alive as long as any view of it is alive.
  std::shared_ptr<const void> keep(st->file_, st->file_->data());
  std::vector<std::pair<uint64_t, uint64_t>> spans;
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") {
      if (!it->is_object()) fail(name, ": __metadata__ must be an object");
      for (auto m = it->begin(); m != it->end(); ++m) {
        if (!m->is_string()) fail(name, ": __metadata__ value '", m.key(), "' is not a string");
        st->metadata_[m.key()] = m->get<std::string>();
      }
      continue;
    }
    TensorView v = parse_entry(name, it.key(), it.value(), data, data_size);
    v.keepalive = keep;
    const uint64_t b = static_cast<const unsigned char*>(v.data) - data;
    if (v.nbytes() > 0) spans.emplace_back(b, b + v.nbytes());
    st->tensors_.emplace(it.key(), std::move(v));
  }
  std::sort(spans.begin(), spans.end());
  for (size_t i = 1; i < spans.size(); ++i)
    if (spans[i].first < spans[i - 1].second) fail(name, ": tensors overlap in the data section");
  return st;
}

TensorStore TensorStore::from_files(const std::vector<std::filesystem::path>& files) {
  TensorStore s;
  for (const auto& f : files) {
    s.files_.push_back(SafetensorsFile::open(f));
    const size_t fi = s.files_.size() - 1;
    for (const auto& [name, view] : s.files_.back()->tensors()) {
      auto [it, inserted] = s.index_.emplace(name, std::make_pair(fi, &view));
      if (!inserted)
        fail(f.string(), ": tensor '", name, "' also in ", s.files_[it->second.first]->path().string());
    }
  }
  return s;
}

TensorStore TensorStore::from_views(std::map<std::string, TensorView> views) {
  TensorStore s;
  auto owned = std::make_shared<const std::map<std::string, TensorView>>(std::move(views));
  for (const auto& [name, view] : *owned) s.index_.emplace(name, std::make_pair(SIZE_MAX, &view));
  s.memory_ = std::move(owned);
  return s;
}

TensorStore TensorStore::open_dir(const std::filesystem::path& dir) {
  if (!std::filesystem::is_directory(dir)) fail(dir.string(), ": not a directory");
  std::vector<std::filesystem::path> files;
  for (const auto& e : std::filesystem::directory_iterator(dir))
    if (e.is_regular_file() && e.path().extension() == ".safetensors") files.push_back(e.path());
  std::sort(files.begin(), files.end());
  if (files.empty()) fail(dir.string(), ": no *.safetensors files");
  TensorStore s = from_files(files);

  const auto index_path = dir / "model.safetensors.index.json";
  if (std::filesystem::exists(index_path)) {
    const json idx = read_json_file(index_path);
    auto wm = idx.find("weight_map");
    if (wm == idx.end() || !wm->is_object()) fail(index_path.string(), ": missing object 'weight_map'");
    std::set<std::string> missing_files;
    size_t listed = 0;
    for (auto it = wm->begin(); it != wm->end(); ++it) {
      if (!it->is_string()) fail(index_path.string(), ": weight_map value for '", it.key(), "' is not a string");
      const std::string file = it->get<std::string>();
      if (file.find('/') != std::string::npos || file.find("..") != std::string::npos)
        fail(index_path.string(), ": weight_map names a file outside the folder: '", file, "'");
      if (!std::filesystem::exists(dir / file)) {
        missing_files.insert(file);
        continue;
      }
      ++listed;
      if (!s.has(it.key())) fail(index_path.string(), ": tensor '", it.key(), "' is not in ", file);
    }
    if (!missing_files.empty()) {
      // EXL2 uploads often carry the FP16 model's index: trust the files that are really there.
      s.notes_.push_back(str(index_path.filename().string(), " names ", missing_files.size(),
                             " file(s) that are not in the folder (e.g. ", *missing_files.begin(),
                             "): the index is stale; using the ", s.index_.size(), " tensors found in ",
                             files.size(), " *.safetensors file(s) instead"));
    }
  }
  return s;
}

const TensorView* TensorStore::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : it->second.second;
}

const TensorView& TensorStore::get(const std::string& name) const {
  const TensorView* v = find(name);
  if (!v) {
    std::string where = files_.size() == 1 ? files_[0]->path().string()
                                           : files_.empty() ? std::string("model")
                                                            : files_[0]->path().parent_path().string();
    fail(where, ": missing tensor '", name, "'");
  }
  return *v;
}

std::filesystem::path TensorStore::file_of(const std::string& name) const {
  auto it = index_.find(name);
  if (it == index_.end() || it->second.first >= files_.size()) return {};
  return files_[it->second.first]->path();
}

std::vector<std::string> TensorStore::names() const {
  std::vector<std::string> out;
  out.reserve(index_.size());
  for (const auto& [n, _] : index_) out.push_back(n);
  return out;
}

size_t TensorStore::total_bytes() const {
  size_t n = 0;
  for (const auto& [_, p] : index_) n += p.second->nbytes();
  return n;
}

void write_safetensors(const std::filesystem::path& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  uint64_t offset = 0;
  for (const auto& t : tensors) {
    uint64_t n = dtype_size(t.dtype);
    for (int64_t d : t.shape) n *= static_cast<uint64_t>(d);
    header[t.name] = {{"dtype", std::string(dtype_name(t.dtype))}, {"shape", t.shape},
                      {"data_offsets", {offset, offset + n}}};
    offset += n;
  }
  std::string h = header.dump();
  while ((h.size() + 8) % 8) h.push_back(' ');  // align the data section
  AtomicFile out(path);
  uint64_t len = h.size();
  unsigned char lb[8];
  for (int i = 0; i < 8; ++i) lb[i] = static_cast<unsigned char>(len >> (8 * i));
  out.write(lb, 8);
  out.write(h);
  for (const auto& t : tensors) {
    uint64_t n = dtype_size(t.dtype);
    for (int64_t d : t.shape) n *= static_cast<uint64_t>(d);
    out.write(t.data, n);
  }
  out.commit();
}

}  // namespace qf
