// A sharded model folder (formats/safetensors.cpp: TensorStore::open_dir): the first part of the
// input is model.safetensors.index.json, each further part one shard, written as
// model-0000k-of-0000n.safetensors (the names the seeds' index files use). An empty first part
// means no index file. Covers the index checks (stale index, names outside the folder, tensors
// missing from the file the index names) and tensors repeated across shards.
#include "formats/safetensors.h"
#include "fuzz_common.h"

using namespace qf;

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const auto parts = fuzz::split_parts(data, size, 5);
  const auto dir = fuzz::fresh_subdir("model");
  if (!parts[0].empty()) fuzz::write_file(dir / "model.safetensors.index.json", parts[0]);
  const size_t shards = parts.size() - 1;
  for (size_t k = 1; k < parts.size(); ++k) {
    char name[64];
    std::snprintf(name, sizeof(name), "model-%05zu-of-%05zu.safetensors", k, shards);
    fuzz::write_file(dir / name, parts[k]);
  }
  fuzz::expect_errors([&] {
    const TensorStore s = TensorStore::open_dir(dir);
    for (const auto& n : s.names()) {
      (void)s.get(n);
      (void)s.file_of(n);
    }
    for (const auto& note : s.notes()) fuzz::check_message(note.c_str());
    (void)s.total_bytes();
  });
  return 0;
}
