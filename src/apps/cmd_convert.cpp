// qforge convert: quantize an FP16/BF16 Hugging Face folder to EXL2 at any bit rate
// (quant/converter.h does the work; this file is the command line).
#include <climits>
#include <cmath>

#include "apps/commands.h"
#include "core/log.h"
#include "core/progress.h"
#include "quant/converter.h"

namespace qf::app {

void register_convert(CLI::App& app, std::function<int()>* run) {
  auto s = std::make_shared<ConvertSettings>();
  auto quiet = std::make_shared<bool>(false);
  auto* cmd = app.add_subcommand(
      "convert",
      "Quantize an FP16/BF16 Hugging Face model to EXL2 at any bits per weight (2.0-8.0).\n"
      "Measures every candidate option of every attention and MLP block with GPTQ, chooses per block the\n"
      "options that fit the target size with the least error, quantizes layer by layer and writes a\n"
      "self-contained folder (shards, config.json with quantization_config, tokenizer and other files,\n"
      "quantization_report.json, measurement.json). Interrupted runs continue with --resume.");
  cmd->add_option("-i,--input", s->input, "Hugging Face model folder (FP16/BF16/FP32 safetensors)")->required();
  cmd->add_option("-o,--output", s->output, "Output folder: new or empty (or an unfinished job with --resume)")->required();
  cmd->add_option("-b,--bits", s->bpw, "Target bits per weight of the decoder layers, 2.0 to 8.0")
      ->capture_default_str()
      ->check(real_in(-HUGE_VAL, HUGE_VAL));  // the range is checked by convert() with its own message
  cmd->add_option("--head-bits", s->head_bits, "Bits of the output head: 2, 3, 4, 5, 6 or 8")
      ->capture_default_str()
      ->check(integer_in(2, 8, "2, 3, 4, 5, 6 or 8"));
  cmd->add_option("-c,--calibration", s->calibration,
                  "Calibration text: .parquet (column --column), .jsonl (field --column) or plain text, "
                  "mixed with rows the model samples itself (--sampled-share). "
                  "Default: only text the model samples itself (seeded), with random-token rows mixed in");
  cmd->add_option("--column", s->column, "Parquet column or JSONL field holding the text")->capture_default_str();
  cmd->add_option("--sampled-share", s->sampled_share,
                  "With -c: the share of the rows the model samples itself, mixed among the file's rows "
                  "(0 = the file only). Keeps the quantized model good outside the file's domain")
      ->capture_default_str()
      ->check(real_in(-HUGE_VAL, HUGE_VAL));  // [0, 1) is checked by convert()
  cmd->add_option("--rows", s->rows, "Calibration rows (default: 100 from a file, 128 self-sampled)")
      ->check(integer_in(0, 1000000, "0 (the default) or a row count up to 1000000"));
  cmd->add_option("--length", s->length, "Tokens per calibration row (default: 2048 from a file, 512 self-sampled; "
                                         "at most the model's context)")
      ->check(integer_in(0, INT_MAX, "0 (the default) or a token count from 16 to 2147483647 (at most the model's context)"));
  cmd->add_option("--measure-tokens", s->measure_tokens, "Tokens of the measurement pass (the first rows)")
      ->capture_default_str()
      ->check(integer_in(1, INT_MAX, "a token count from 1 to 2147483647"));
  cmd->add_option("--measurement", s->measurement,
                  "Reuse this measurement.json (from an earlier convert of the same model) and skip measuring");
  cmd->add_flag("--measure-only", s->measure_only, "Measure, write OUTPUT/measurement.json and stop");
  cmd->add_option("--device", s->device, "auto (the GPU when there is one), cpu, cuda or cuda:N")->capture_default_str();
  add_threads_option(cmd, &s->threads);
  cmd->add_flag("--resume", s->resume, "Finish the unfinished conversion in OUTPUT (same settings)");
  cmd->add_option("--damp", s->damp, "GPTQ dampening, as a fraction of the mean Hessian diagonal")
      ->capture_default_str()
      ->check(real_in(0, 1, /*lo_open=*/true));
  auto seed = std::make_shared<SeedOption>(SeedOption{s->seed, false});
  add_seed_option(cmd, seed.get(), "Seed of the self-sampled calibration");
  cmd->add_option("--shard-size", s->shard_mb, "Output shard size in MB (0 = one file)")
      ->capture_default_str()
      ->check(real_in(0, 1e9));
  cmd->add_flag("-q,--quiet", *quiet, "Only warnings, errors and the final table");
  cmd->callback([run, s, quiet, seed] {
    *run = [s, quiet, seed] {
      set_log_level(*quiet ? LogLevel::Warn : LogLevel::Info);
      Progress::set_quiet(*quiet);
      s->seed = resolve_seed(*seed);
      convert(*s);
      return 0;
    };
  });
}

}  // namespace qf::app
