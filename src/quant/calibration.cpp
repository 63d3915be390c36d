#include "quant/calibration.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <random>

#include "core/error.h"
#include "core/json_file.h"
#include "core/log.h"
#include "core/progress.h"
#include "core/sizes.h"
#include "formats/parquet.h"
#include "engine/engine.h"
#include "model/model.h"

namespace qf {

namespace {

bool starts_with_parquet_magic(const std::filesystem::path& path) {
  std::ifstream f(path, std::ios::binary);
  char magic[4] = {};
  f.read(magic, 4);
  return f.gcount() == 4 && std::string(magic, 4) == "PAR1";
}

std::vector<std::string> jsonl_texts(const std::filesystem::path& path, const std::string& column) {
  std::ifstream f(path);
  std::vector<std::string> out;
  std::string line;
  for (int64_t n = 1; std::getline(f, line); ++n) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const json j = parse_json(line, str(path.string(), ": line ", n));
    if (j.is_string()) {
      out.push_back(j.get<std::string>());
    } else if (j.is_object() && j.contains(column) && j[column].is_string()) {
      out.push_back(j[column].get<std::string>());
    } else {
      fail(path.string(), ": line ", n, " has no string field '", column, "' (choose one with --column)");
    }
  }
  return out;
}

// Plain text in pieces of about 64 KB cut at line ends, so that a large file is tokenized only as
// far as the rows need.
std::vector<std::string> text_pieces(const std::string& text) {
  constexpr size_t kPiece = 64 * 1024;
  std::vector<std::string> out;
  size_t start = 0;
  while (start < text.size()) {
    size_t end = std::min(text.size(), start + kPiece);
    if (end < text.size()) {
      const size_t nl = text.find('\n', end);
      end = nl == std::string::npos ? text.size() : nl + 1;
    }
    out.push_back(text.substr(start, end - start));
    start = end;
  }
  return out;
}

}  // namespace

std::vector<std::string> read_calibration_texts(const std::filesystem::path& path, const std::string& column) {
  std::error_code ec;
  if (!std::filesystem::is_regular_file(path, ec)) fail(path.string(), ": no such calibration file");
  std::vector<std::string> texts;
  std::string ext = path.extension().string();
  std::transform(ext.begin(), ext.end(), ext.begin(), [](unsigned char c) { return std::tolower(c); });
  if (ext == ".parquet" || starts_with_parquet_magic(path)) {
    texts = read_parquet_text_column(path, column);
  } else if (ext == ".jsonl" || ext == ".ndjson") {
    texts = jsonl_texts(path, column);
  } else {
    const std::string text = read_text_file(path);
    texts = text_pieces(text);
  }
  texts.erase(std::remove_if(texts.begin(), texts.end(),
                             [](const std::string& s) { return s.find_first_not_of(" \t\r\n") == std::string::npos; }),
              texts.end());
  if (texts.empty()) fail(path.string(), ": the calibration file holds no text");
  return texts;
}

CalibrationRows rows_from_texts(const Tokenizer& tok, const std::vector<std::string>& texts, int64_t rows,
                                int64_t length, const std::string& dataset) {
  QF_CHECK(rows > 0 && length > 1, "calibration needs at least one row of two tokens");
  const size_t want = static_cast<size_t>(rows * length);
  std::vector<int32_t> stream;
  for (const auto& t : texts) {
    const std::vector<int32_t> ids = tok.encode(t, /*add_special=*/false);
    stream.insert(stream.end(), ids.begin(), ids.end());
    if (stream.size() >= want) break;
  }
  CalibrationRows out;
  out.length = length;
  out.dataset = dataset;
  const int64_t full = static_cast<int64_t>(stream.size()) / length;
  if (full == 0)
    fail(dataset, ": the calibration text gives only ", stream.size(), " tokens; one row needs ", length,
         " (use a longer text or a smaller --length)");
  const int64_t n = std::min(rows, full);
  if (n < rows) log_warn(dataset, ": the calibration text fills only ", n, " rows of ", length, " tokens (", rows, " asked)");
  for (int64_t r = 0; r < n; ++r)
    out.rows.emplace_back(stream.begin() + r * length, stream.begin() + (r + 1) * length);
  return out;
}

CalibrationRows sample_calibration(const std::filesystem::path& model_dir, Backend& b, int64_t rows, int64_t length,
                                   uint64_t seed) {
  QF_CHECK(rows > 0 && length > 1, "calibration needs at least one row of two tokens");
  std::unique_ptr<Model> model = Model::load(model_dir, b);
  const ModelConfig& c = model->config();
  if (length > c.max_position)
    fail("calibration rows of ", length, " tokens are longer than the model's context (", c.max_position, ")");
  CalibrationRows out;
  out.length = length;
  out.dataset = "self-sampled (seed " + std::to_string(seed) + ")";
  out.rows.resize(static_cast<size_t>(rows));

  // Every tenth row is random tokens; the others are sampled in batches.
  std::vector<int64_t> sampled;
  for (int64_t r = 0; r < rows; ++r) {
    auto& row = out.rows[static_cast<size_t>(r)];
    if (r % 10 == 9) {
      std::mt19937_64 rng(seed * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(r));
      row.resize(static_cast<size_t>(length));
      for (auto& t : row) t = static_cast<int32_t>(rng() % static_cast<uint64_t>(c.vocab));
    } else {
      sampled.push_back(r);
    }
  }
  // The sampled rows are requests to the engine (continuous batching over a paged cache, sampling
  // on the device): as many at once as a third of the free memory holds caches for (up to 128),
  // since wide steps keep the matrix products efficient. Each row draws from the full softmax at
  // temperature 1 with its own seed, so its tokens do not depend on which rows run beside it.
  const double cache_bytes = 4.0 * 2 * static_cast<double>(c.n_layers * c.kv_dim() * length);
  const auto fit = static_cast<int64_t>(static_cast<double>(b.free_memory()) / 3 / cache_bytes);
  const int64_t batch = std::clamp<int64_t>(std::min<int64_t>(fit, 128), 1, std::max<int64_t>(1, static_cast<int64_t>(sampled.size())));
  EngineOptions eo;
  eo.max_context = length;
  eo.max_running = static_cast<int32_t>(batch);
  eo.token_budget = static_cast<int32_t>(std::max<int64_t>(batch, 512));
  eo.num_blocks = kv_block_count(length, eo.block_size, batch);
  Engine engine(*model, eo);
  SamplerParams softmax;
  softmax.temperature = 1;
  softmax.top_k = 0;
  softmax.top_p = 1;
  softmax.min_p = 0;
  softmax.repeat_penalty = 1;
  for (int64_t r : sampled) {
    const uint64_t row_seed = seed * 1000003ull + static_cast<uint64_t>(r);
    Request req;
    req.id = r;
    // The first token: BOS, or (a model without one) a random token from the row's seed.
    req.prompt = {c.bos_id ? static_cast<int32_t>(*c.bos_id)
                           : static_cast<int32_t>(std::mt19937_64(row_seed)() % static_cast<uint64_t>(c.vocab))};
    out.rows[static_cast<size_t>(r)] = req.prompt;
    req.max_new_tokens = static_cast<int32_t>(length - 1);
    softmax.seed = row_seed;
    engine.add(std::move(req), softmax);
  }
  Progress progress("calibration: sampling", static_cast<int64_t>(sampled.size()) * (length - 1), "tokens");
  int64_t finished_tokens = 0;
  while (engine.step()) {
    for (Finished& f : engine.take_finished()) {
      QF_CHECK(static_cast<int64_t>(f.output.size()) == length - 1, "internal: calibration row ", f.id, " stopped after ",
               f.output.size(), " tokens");
      auto& row = out.rows[static_cast<size_t>(f.id)];
      row.insert(row.end(), f.output.begin(), f.output.end());
      finished_tokens += length - 1;
    }
    int64_t running_tokens = 0;
    for (int64_t r : sampled)
      if (engine.scheduler().has(r)) running_tokens += static_cast<int64_t>(engine.scheduler().tokens(r).size()) - 1;
    progress.update(finished_tokens + running_tokens);
  }
  progress.finish();
  return out;
}

CalibrationRows mix_rows(const CalibrationRows& file, const CalibrationRows& sampled) {
  QF_CHECK(sampled.rows.empty() || file.length == sampled.length, "internal: mixing calibration rows of two lengths");
  CalibrationRows out;
  out.length = file.length;
  out.dataset = sampled.rows.empty() ? file.dataset
                                     : file.dataset + " + " + std::to_string(sampled.count()) + " rows " + sampled.dataset;
  const int64_t n = file.count() + sampled.count(), k = sampled.count();
  int64_t next_file = 0, next_sampled = 0;
  for (int64_t i = 0; i < n; ++i) {
    // Row i is a sampled one when the running share k*(i+1)/n passes the next whole number.
    const bool take_sampled = k * (i + 1) / n > next_sampled;
    out.rows.push_back(take_sampled ? sampled.rows[static_cast<size_t>(next_sampled++)]
                                    : file.rows[static_cast<size_t>(next_file++)]);
  }
  return out;
}

}  // namespace qf
