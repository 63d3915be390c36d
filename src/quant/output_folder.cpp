#include "quant/output_folder.h"

#include <algorithm>
#include <cstdio>
#include <map>
#include <tuple>

#include "core/atomic_file.h"
#include "core/error.h"
#include "core/log.h"

namespace qf {

namespace {

// Module order: embeddings, then layer by layer, then the rest (final norm, head).
std::tuple<int, int64_t, std::string> order_key(const std::string& name) {
  const std::string prefix = "model.layers.";
  if (name.rfind(prefix, 0) == 0) {
    const int64_t n = std::strtoll(name.c_str() + prefix.size(), nullptr, 10);
    return {1, n, name};
  }
  if (name.find("embed") != std::string::npos) return {0, 0, name};
  return {2, 0, name};
}

}  // namespace

bool is_weight_file(const std::filesystem::path& name) {
  const std::string n = name.filename().string();
  for (const char* ext : {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx"}) {
    const std::string e = ext;
    if (n.size() >= e.size() && n.compare(n.size() - e.size(), e.size(), e) == 0) return true;
  }
  return n.size() > 11 && n.compare(n.size() - 11, 11, ".index.json") == 0;
}

int64_t write_output_folder(const OutputFolder& f) {
  namespace fs = std::filesystem;
  // Every tensor that goes out, with its source.
  std::vector<std::shared_ptr<SafetensorsFile>> packed;
  std::vector<std::pair<std::string, const TensorView*>> tensors;
  for (const auto& name : f.input_tensors->names()) {
    const size_t dot = name.rfind('.');
    const std::string prefix = dot == std::string::npos ? name : name.substr(0, dot);
    const std::string leaf = dot == std::string::npos ? "" : name.substr(dot + 1);
    if (f.replaced_prefixes.count(prefix) && (leaf == "weight" || leaf == "bias")) continue;
    tensors.emplace_back(name, &f.input_tensors->get(name));
  }
  for (const auto& p : f.quantized_files) {
    packed.push_back(SafetensorsFile::open(p));
    for (const auto& [name, view] : packed.back()->tensors()) tensors.emplace_back(name, &view);
  }
  std::sort(tensors.begin(), tensors.end(),
            [](const auto& a, const auto& b) { return order_key(a.first) < order_key(b.first); });
  for (size_t i = 1; i < tensors.size(); ++i)
    QF_CHECK(tensors[i].first != tensors[i - 1].first, "internal: tensor ", tensors[i].first, " written twice");

  // Shards in order, each up to shard_bytes (a larger tensor gets a shard of its own).
  std::vector<std::vector<size_t>> shards(1);
  int64_t in_shard = 0, total = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const auto bytes = static_cast<int64_t>(tensors[i].second->nbytes());
    if (f.shard_bytes > 0 && in_shard > 0 && in_shard + bytes > f.shard_bytes) {
      shards.emplace_back();
      in_shard = 0;
    }
    shards.back().push_back(i);
    in_shard += bytes;
    total += bytes;
  }
  json weight_map = json::object();
  for (size_t s = 0; s < shards.size(); ++s) {
    char name[64];
    if (shards.size() == 1)
      std::snprintf(name, sizeof name, "model.safetensors");
    else
      std::snprintf(name, sizeof name, "model-%05zu-of-%05zu.safetensors", s + 1, shards.size());
    std::vector<TensorToWrite> out;
    for (size_t i : shards[s]) {
      const TensorView& v = *tensors[i].second;
      out.push_back({tensors[i].first, v.dtype, v.shape, v.data});
      weight_map[tensors[i].first] = name;
    }
    write_safetensors(f.output / name, out, {{"format", "pt"}});
  }
  if (shards.size() > 1) {
    const json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
    write_file_atomic(f.output / "model.safetensors.index.json", index.dump(2) + "\n");
  }

  // The input's other files: tokenizer, generation config, chat template, license, readme...
  for (const auto& e : fs::directory_iterator(f.input)) {
    const std::string n = e.path().filename().string();
    if (!e.is_regular_file() || is_weight_file(n) || n == "config.json" || n == "quantization_report.json" ||
        n == "measurement.json" || n.empty() || n[0] == '.')
      continue;
    write_file_atomic(f.output / n, read_text_file(e.path()));
  }
  write_file_atomic(f.output / "quantization_report.json", f.report.dump(2) + "\n");
  if (!f.measurement.is_null()) write_file_atomic(f.output / "measurement.json", f.measurement.dump(1) + "\n");
  json config = read_json_file(f.input / "config.json");
  config["quantization_config"] = f.quantization_config;
  write_file_atomic(f.output / "config.json", config.dump(2) + "\n");
  return total;
}

}  // namespace qf
