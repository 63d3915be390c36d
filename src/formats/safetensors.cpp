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
// Largest element count of one tensor (2^50, a petabyte of bytes): with it, no byte size
// (elements x 8 at most) or offset computed from a shape can overflow 64 bits.
constexpr uint64_t kMaxElements = uint64_t{1} << 50;

// Parses JSON text with nlohmann, also refusing what it would silently accept: a key repeated in
// the top-level object, or in the object under the top-level key `dup_parent` (nlohmann keeps the
// last value), and nesting deeper than `max_depth` (nothing legitimate nests that deep; a deep tree
// is costly to walk and to print). On failure *problem says why; `what` names the keys ("tensor").
json parse_strict(const char* begin, const char* end, int max_depth, const std::string& dup_parent,
                  const char* what, std::string* problem) {
  std::set<std::string> top, nested;
  std::string parent, dup, dup_in;
  bool too_deep = false;
  json::parser_callback_t cb = [&](int depth, json::parse_event_t ev, json& parsed) {
    if (depth > max_depth) {
      too_deep = true;
      return false;  // discard: the tree never gets deep
    }
    if (ev == json::parse_event_t::key && dup.empty()) {
      const std::string& k = parsed.get_ref<const std::string&>();
      if (depth == 1) {
        parent = k;
        if (!top.insert(k).second) dup = k;
      } else if (depth == 2 && !dup_parent.empty() && parent == dup_parent && !nested.insert(k).second) {
        dup = k;
        dup_in = dup_parent;
      }
    }
    return true;
  };
  json j;
  try {
    j = json::parse(begin, end, cb, /*allow_exceptions=*/true);
  } catch (const json::exception& e) {  // parse_error, or out_of_range for a number like 1e999
    *problem = str("malformed JSON (", e.what(), ")");
    return json();
  }
  if (too_deep) *problem = str("JSON nested deeper than ", max_depth, " levels");
  else if (!dup.empty())
    *problem = dup_in.empty() ? str(dup_parent.empty() ? what : "key", " ", quote_for_error(dup), " appears twice")
                              : str(dup_in, " lists ", what, " ", quote_for_error(dup), " twice");
  return j;
}

// "[d0, d1, ...]" from the header's own numbers (a bad shape may not fit int64_t).
std::string raw_shape(const json& sh) {
  std::string s = "[";
  for (size_t i = 0; i < sh.size(); ++i) s += (i ? ", " : "") + (sh[i].is_number() ? sh[i].dump() : std::string("?"));
  return s + "]";
}

TensorView parse_entry(const std::string& file, const std::string& name, const json& e,
                       const unsigned char* data, uint64_t data_size) {
  const std::string where = file + ": tensor " + quote_for_error(name);
  if (!e.is_object()) fail(where, ": header entry is not an object");
  auto dt = e.find("dtype");
  if (dt == e.end() || !dt->is_string()) fail(where, ": missing dtype");
  TensorView v;
  const std::string dtype = dt->get<std::string>();
  if (!dtype_from_name(dtype, &v.dtype))
    fail(where, ": unknown dtype ", quote_for_error(dtype.size() > 32 ? dtype.substr(0, 32) + "..." : dtype),
         " (known: F32, F16, BF16, F64, I8, U8, I16, U16, I32, U32, I64, U64, BOOL)");
  auto sh = e.find("shape");
  if (sh == e.end() || !sh->is_array()) fail(where, ": missing shape");
  if (sh->size() > 16) fail(where, ": shape has ", sh->size(), " dimensions (at most 16 supported)");
  // Checked products: the element count of the non-zero dimensions must stay below kMaxElements
  // even when another dimension is 0 (a [0, 2^64-1] tensor has no data but an absurd shape).
  uint64_t numel = 1, nonzero = 1;
  for (const auto& d : *sh) {
    if (!d.is_number_unsigned() && !(d.is_number_integer() && d.get<int64_t>() >= 0))
      fail(where, ": shape ", raw_shape(*sh), " must hold non-negative integers");
    const uint64_t n = d.get<uint64_t>();
    if (n != 0 && (n > kMaxElements || nonzero > kMaxElements / n))
      fail(where, ": shape ", raw_shape(*sh), " has more than 2^50 elements");
    if (n != 0) nonzero *= n;
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
  const uint64_t expect = numel * dtype_size(v.dtype);  // < 2^53: no overflow
  if (end - begin != expect)
    fail(where, ": shape ", v.shape_str(), " of ", dtype, " needs ", expect, " bytes but data_offsets span ",
         end - begin);
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
  if (header_len > size - 8)
    fail(name, ": header length ", header_len, " exceeds the file size ", size, " (truncated or not safetensors)");
  if (header_len > kMaxHeaderBytes)
    fail(name, ": header length ", header_len, " is more than the ", kMaxHeaderBytes >> 20,
         " MiB a safetensors header may have");
  const char* hp = reinterpret_cast<const char*>(base + 8);
  // A header is {name: {dtype, shape: [...], data_offsets: [...]}, "__metadata__": {k: v}}: 3 levels.
  std::string problem;
  json header = parse_strict(hp, hp + header_len, 3, "", "tensor", &problem);
  if (!problem.empty()) fail(name, ": safetensors header: ", problem);
  if (!header.is_object()) fail(name, ": safetensors header is not a JSON object (", header.type_name(), ")");

  const unsigned char* data = base + 8 + header_len;
  const uint64_t data_size = size - 8 - header_len;
  // Keep the mapping alive as long as any view of it is alive.
  std::shared_ptr<const void> keep(st->file_, st->file_->data());
  std::vector<std::pair<uint64_t, uint64_t>> spans;
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") {
      if (!it->is_object()) fail(name, ": __metadata__ must be an object of strings");
      for (auto m = it->begin(); m != it->end(); ++m) {
        if (!m->is_string()) fail(name, ": __metadata__ value ", quote_for_error(m.key()), " is not a string");
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
        fail(f.string(), ": tensor ", quote_for_error(name), " is also in ", s.files_[it->second.first]->path().string());
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

  const auto index_path = dir / "model.safetensors.index.json";
  if (!std::filesystem::exists(index_path)) return from_files(files);

  // The index: weight_map {tensor: file}, every file a plain name in this folder.
  const std::string iname = index_path.string();
  const std::string text = read_text_file(index_path);
  std::string problem;
  const json idx = parse_strict(text.data(), text.data() + text.size(), 64, "weight_map", "tensor", &problem);
  if (!problem.empty()) fail(iname, ": ", problem);
  if (!idx.is_object()) fail(iname, ": expected a JSON object");
  auto wm = idx.find("weight_map");
  if (wm == idx.end() || !wm->is_object()) fail(iname, ": missing object 'weight_map'");
  std::map<std::string, std::vector<std::string>> by_file;  // file -> tensors it should hold
  for (auto it = wm->begin(); it != wm->end(); ++it) {
    if (!it->is_string()) fail(iname, ": weight_map value for ", quote_for_error(it.key()), " is not a string");
    const std::string file = it->get<std::string>();
    if (file.empty() || file == "." || file == ".." || file.find('/') != std::string::npos ||
        file.find('\\') != std::string::npos || file.find('\0') != std::string::npos)
      fail(iname, ": weight_map names a file outside the folder: ", quote_for_error(file), " (for tensor ",
           quote_for_error(it.key()), ")");
    by_file[file].push_back(it.key());
  }
  std::vector<std::filesystem::path> listed;
  std::vector<std::string> missing;
  for (const auto& [file, _] : by_file) {
    std::error_code ec;  // a name the file system cannot hold (too long) is a missing shard, not a throw
    if (std::filesystem::is_regular_file(dir / file, ec)) listed.push_back(dir / file);
    else missing.push_back(file);
  }
  TensorStore s;
  if (listed.empty()) {
    // None of the files it names is here: an index left over from another model (EXL2 uploads
    // often carry the FP16 model's). Use the files that are really there.
    s = from_files(files);
    s.notes_.push_back(str(index_path.filename().string(), " names ", missing.size(),
                           " file(s) that are not in the folder (e.g. ", quote_for_error(missing.front()),
                           "): the index is stale; using the ", s.index_.size(), " tensors found in ", files.size(),
                           " *.safetensors file(s) instead"));
    return s;
  }
  if (!missing.empty()) {
    const auto& lost = by_file[missing.front()];
    fail(iname, ": shard ", quote_for_error(missing.front()), " is missing from the folder (it holds ", lost.size(),
         " tensor(s), e.g. ", quote_for_error(lost.front()), ")",
         missing.size() > 1 ? str(", and ", missing.size() - 1, " more shard(s)") : std::string());
  }
  // Load the shards the index names, as transformers does; other *.safetensors files (a
  // consolidated.safetensors beside the shards, an adapter) are not part of this model.
  std::sort(listed.begin(), listed.end());
  s = from_files(listed);
  for (const auto& [file, names] : by_file)
    for (const auto& n : names)
      if (s.file_of(n).filename() != file)
        fail(iname, ": tensor ", quote_for_error(n), " is not in ", quote_for_error(file));
  if (files.size() > listed.size()) {
    std::string extra;
    for (const auto& f : files)
      if (!std::binary_search(listed.begin(), listed.end(), f)) {
        extra = f.filename().string();
        break;
      }
    s.notes_.push_back(str("ignoring ", files.size() - listed.size(), " *.safetensors file(s) that ",
                           index_path.filename().string(), " does not name (e.g. ", quote_for_error(extra), ")"));
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
