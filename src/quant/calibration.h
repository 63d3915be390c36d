// Calibration rows: the token sequences the converter runs through the model to measure errors
// and build GPTQ's Hessians. Either cut from a file the user gives (Parquet, JSONL or plain text)
// or, with no file, sampled from the model itself (seeded) with some random-token rows mixed in,
// so that a conversion never needs a download.
#pragma once
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "backends/backend.h"
#include "tokenizer/tokenizer.h"

namespace qf {

struct CalibrationRows {
  int64_t length = 0;                      // tokens per row
  std::vector<std::vector<int32_t>> rows;  // each of `length` tokens
  std::string dataset;                     // what they came from, for config.json and the report
  int64_t count() const { return static_cast<int64_t>(rows.size()); }
};

// The texts of a calibration file: a Parquet column (`column`, usually "text"), the `column`
// field of each JSONL line (or the line itself when it is a JSON string), or a plain text file
// as it is. Throws one line when the file is missing, unreadable, malformed or holds no text.
std::vector<std::string> read_calibration_texts(const std::filesystem::path& path, const std::string& column);

// The texts joined into one token stream (each text starts a new piece; no BOS) and cut into
// `rows` rows of `length` tokens, fewer (with a warning) when the stream is shorter; fails when
// it cannot fill one row.
CalibrationRows rows_from_texts(const Tokenizer& tok, const std::vector<std::string>& texts, int64_t rows,
                                int64_t length, const std::string& dataset);

// Rows the model writes itself: each starts with BOS (when the model has one) and continues with
// tokens sampled at temperature 1 from the model; about one row in ten is uniformly random
// tokens instead (as ExLlamaV2's built-in set has) so that rare embeddings are exercised too.
// The rows are the engine's requests (continuous batching, sampling on the device); row i
// depends only on (seed, i), not on which rows run beside it. Loads the whole model on `b`.
CalibrationRows sample_calibration(const std::filesystem::path& model_dir, Backend& b, int64_t rows, int64_t length,
                                   uint64_t seed);

// A file's rows with self-sampled rows spread evenly among them, so that every prefix (the
// measurement uses the first rows) holds about the same share of each. Both must have one length.
CalibrationRows mix_rows(const CalibrationRows& file, const CalibrationRows& sampled);

}  // namespace qf
