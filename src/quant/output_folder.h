// The converted folder: the quantized tensors with every other tensor of the input as it was,
// in safetensors shards (+ index when there are several), the input's non-weight files
// (tokenizer, generation config, chat template...) copied, the report and the measurement, and
// config.json with its quantization_config written last, so a folder without it is unfinished.
#pragma once
#include <filesystem>
#include <set>
#include <string>
#include <vector>

#include "core/json_file.h"
#include "formats/safetensors.h"

namespace qf {

struct OutputFolder {
  std::filesystem::path input, output;
  int64_t shard_bytes = 0;  // 0 = one file
  const TensorStore* input_tensors = nullptr;
  std::set<std::string> replaced_prefixes;            // linears whose .weight/.bias are not copied
  std::vector<std::filesystem::path> quantized_files;  // safetensors files of packed tensors
  json quantization_config, report, measurement;
};

// Writes everything; returns the bytes of the tensor shards.
int64_t write_output_folder(const OutputFolder& f);

// Whether a file of a model folder holds weights (not copied to the output).
bool is_weight_file(const std::filesystem::path& name);

}  // namespace qf
