// qforge convert: an FP16/BF16 Hugging Face folder in, a self-contained EXL2 folder out.
// Stages, as a resumable job (OUT_DIR/.qforge-convert/job.json, every file written atomically):
//   calibrate -> measure -> optimize -> quantize (layer by layer) -> head -> compile -> done
// A killed run continues with --resume from its last checkpoint and ends byte-identical to an
// uninterrupted one; the folder gets its config.json last, so it never looks finished early.
#pragma once
#include <cstdint>
#include <filesystem>
#include <string>

namespace qf {

struct ConvertSettings {
  std::filesystem::path input, output;
  double bpw = 4.0;                    // decoder bits per weight, 2.0 to 8.0
  int head_bits = 6;                   // 2, 3, 4, 5, 6 or 8
  std::filesystem::path calibration;   // empty: self-sampled
  std::string column = "text";         // Parquet column / JSONL field
  double sampled_share = 0.5;          // with a file: share of the rows the model samples itself
  int64_t rows = 0, length = 0;        // 0: defaults (see convert_help_defaults)
  int64_t measure_tokens = 32768;      // tokens of the measurement pass (its first rows)
  std::filesystem::path measurement;   // reuse this measurement.json
  bool measure_only = false;
  std::string device = "auto";         // auto | cpu | cuda | cuda:N
  int threads = 0;                     // CPU threads, 0 = all
  bool resume = false;
  double damp = 0.01;                  // GPTQ dampening, fraction of the mean Hessian diagonal
  uint64_t seed = 1;                   // self-sampled calibration
  double shard_mb = 8192;              // output shard size in MB (0: one file)
};

// Runs (or resumes) a conversion; throws qf::Error with one line on any failure.
void convert(const ConvertSettings& settings);

}  // namespace qf
