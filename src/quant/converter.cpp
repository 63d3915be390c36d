#include "quant/converter.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <fstream>

#include "core/atomic_file.h"
#include "core/error.h"
#include "core/json_file.h"
#include "core/log.h"
#include "core/progress.h"
#include "model/config.h"
#include "model/decoder_layer.h"
#include "model/weights.h"
#include "quant/block_quantizer.h"
#include "quant/calibration.h"
#include "quant/measurement.h"
#include "quant/optimizer.h"
#include "quant/output_folder.h"
#include "quant/sequential_quantizer.h"
#include "tokenizer/tokenizer.h"

namespace qf {

namespace fs = std::filesystem;

namespace {

constexpr const char* kJobDirName = ".qforge-convert";
constexpr const char* kJobFormat = "qforge-convert-job/1";
constexpr int64_t kChunkFloats = 64ll << 20;  // states moved through the device per chunk (256 MB)

// Tests stop the process for real at named points (QFORGE_CONVERT_KILL_AT=measure:1 etc.).
void kill_point(const std::string& point) {
  const char* at = std::getenv("QFORGE_CONVERT_KILL_AT");
  if (at && point == at) std::raise(SIGKILL);
}

double checkpoint_seconds() {
  const char* s = std::getenv("QFORGE_CHECKPOINT_SECONDS");
  return s ? std::atof(s) : 120.0;
}

uint64_t fnv1a(uint64_t h, const void* data, size_t n) {
  const auto* p = static_cast<const unsigned char*>(data);
  for (size_t i = 0; i < n; ++i) h = (h ^ p[i]) * 0x100000001b3ull;
  return h;
}

std::string file_digest(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  if (!f) fail(p.string(), ": cannot open");
  uint64_t h = 0xcbf29ce484222325ull;
  std::vector<char> buf(1 << 20);
  while (f) {
    f.read(buf.data(), static_cast<std::streamsize>(buf.size()));
    h = fnv1a(h, buf.data(), static_cast<size_t>(f.gcount()));
  }
  char out[20];
  std::snprintf(out, sizeof out, "%016llx", static_cast<unsigned long long>(h));
  return out;
}

// What the output depends on: the input model (config and weight files) and every setting.
json job_identity(const ConvertSettings& s, const std::string& device_kind) {
  json files = json::object();
  for (const auto& e : fs::directory_iterator(s.input))
    if (e.is_regular_file() && is_weight_file(e.path().filename())) files[e.path().filename().string()] = e.file_size();
  return {
      {"input", {{"config", file_digest(s.input / "config.json")}, {"weight_files", files}}},
      {"bits", s.bpw},
      {"head_bits", s.head_bits},
      {"calibration", s.calibration.empty() ? json("self-sampled") : json(file_digest(s.calibration))},
      {"column", s.calibration.empty() ? json("") : json(s.column)},
      {"sampled_share", s.calibration.empty() ? json(1.0) : json(s.sampled_share)},
      {"rows", s.rows},
      {"length", s.length},
      {"measure_tokens", s.measure_tokens},
      {"measurement", s.measurement.empty() ? json("") : json(file_digest(s.measurement))},
      {"measure_only", s.measure_only},
      {"damp", s.damp},
      {"seed", s.seed},
      {"shard_mb", s.shard_mb},
      {"device", device_kind},
  };
}

std::string fmt_gb(double gb) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f", gb);
  return buf;
}

// Names the first difference between a stored job and this run, for the refusal.
std::string identity_difference(const json& stored, const json& now) {
  for (const auto& [k, v] : now.items()) {
    if (!stored.contains(k)) return "'" + k + "' is new";
    if (stored[k] != v) {
      if (k == "input") return "the input model differs";
      return "'" + k + "' was " + stored[k].dump() + ", now " + v.dump();
    }
  }
  return "";
}

class Job {
 public:
  explicit Job(fs::path dir) : dir_(std::move(dir)) {}
  const fs::path& dir() const { return dir_; }
  fs::path file(const std::string& name) const { return dir_ / name; }
  json& operator[](const char* k) { return j_[k]; }
  bool has(const char* k) const { return j_.contains(k) && !j_[k].is_null(); }
  json& data() { return j_; }
  void load() { j_ = read_json_file(dir_ / "job.json"); }
  void save() { write_file_atomic(dir_ / "job.json", j_.dump(1) + "\n"); }

 private:
  fs::path dir_;
  json j_;
};

std::string layer_file(int64_t layer) {
  char b[48];
  std::snprintf(b, sizeof b, "layer-%05lld.safetensors", static_cast<long long>(layer));
  return b;
}

void save_states(const fs::path& path, const HostStates& s, int64_t hidden) {
  write_safetensors(path, {{"states", DType::F32, {static_cast<int64_t>(s.data.size()) / hidden, hidden}, s.data.data()}});
}

HostStates load_states(const fs::path& path, int64_t rows, int64_t row_floats) {
  auto f = SafetensorsFile::open(path);
  auto it = f->tensors().find("states");
  if (it == f->tensors().end() || it->second.dtype != DType::F32 || it->second.numel() != rows * row_floats)
    fail(path.string(), ": checkpoint of the wrong shape; the job is damaged (remove the output folder and start again)");
  HostStates s;
  s.rows = rows;
  s.data.assign(it->second.as<float>(), it->second.as<float>() + it->second.numel());
  return s;
}

// Writes a checkpoint of `states` as file `name`, points the job at it, drops the previous one.
void checkpoint(Job& job, const char* key, const std::string& name, const HostStates& states, int64_t hidden) {
  const std::string old = job.has(key) ? job[key].get<std::string>() : "";
  save_states(job.file(name), states, hidden);
  job[key] = name;
  job.save();
  if (!old.empty() && old != name) fs::remove(job.file(old));
}

void check_dense(const ModelWeights& w) {
  for (const auto& l : w.layers)
    for (const LinearWeight* lw : l.linears())
      if (lw->format != LinearFormat::Dense)
        fail(lw->name, " is already quantized (", linear_format_name(lw->format), "); convert needs an FP16/BF16/FP32 model");
}

std::unique_ptr<Backend> open_backend(const ConvertSettings& s, std::string* kind) {
  DeviceSpec spec = parse_device(s.device);
  spec.threads = s.threads;
  *kind = spec.kind;
  return make_backend(spec);
}

// Wall time of each stage this run did (stderr only: the output files carry no timings).
struct StageTimes {
  std::vector<std::pair<std::string, double>> done;
  std::chrono::steady_clock::time_point t = std::chrono::steady_clock::now();
  void mark(const std::string& stage) {
    const auto now = std::chrono::steady_clock::now();
    done.emplace_back(stage, std::chrono::duration<double>(now - t).count());
    t = now;
  }
  std::string summary() const {
    std::string s;
    double total = 0;
    for (const auto& [k, v] : done) s += (s.empty() ? "" : ", ") + k + " " + Progress::format_duration(v), total += v;
    return s + " (total " + Progress::format_duration(total) + ")";
  }
};


// The peak device memory the conversion used (sampled where the most is allocated); on the CPU
// the free-memory figure is the whole system's, so nothing is claimed there.
std::string memory_note(const std::string& device_kind, const BlockQuantizer& q) {
  if (device_kind == "cpu") return "";
  return "; peak device memory in use " + std::to_string(q.peak_memory() / 1048576) + " MiB";
}

}  // namespace

void convert(const ConvertSettings& settings) {
  ConvertSettings s = settings;
  // ---- Settings and input ----------------------------------------------------------------------
  if (!(s.bpw >= 2.0 && s.bpw <= 8.0)) fail("-b ", s.bpw, ": the target must be between 2.0 and 8.0 bits per weight");
  head_spec(s.head_bits);  // validates
  if (s.rows < 0 || s.length < 0 || s.measure_tokens <= 0) fail("--rows and --length must be positive");
  if (s.shard_mb < 0) fail("--shard-size must be positive (0: one file)");
  if (!(s.sampled_share >= 0 && s.sampled_share < 1))
    fail("--sampled-share ", s.sampled_share, " must be at least 0 and below 1 (for self-sampled rows only, leave out -c)");
  if (!fs::is_directory(s.input)) fail(s.input.string(), ": no such model folder");
  const ModelConfig config = load_config(s.input);
  const TensorStore store = TensorStore::open_dir(s.input);
  const ModelWeights w = load_weights(config, store);
  check_dense(w);
  const bool sampled = s.calibration.empty();
  // Read (and so checked) before any work; kept for the calibration stage.
  std::vector<std::string> texts;
  if (!sampled) texts = read_calibration_texts(s.calibration, s.column);
  if (s.length == 0) s.length = std::min<int64_t>(sampled ? 512 : 2048, config.max_position);
  if (s.rows == 0) s.rows = sampled ? 128 : 100;
  if (s.length < 16) fail("--length ", s.length, " is too short (at least 16 tokens)");
  if (s.length > config.max_position) fail("--length ", s.length, " exceeds the model's context of ", config.max_position);
  if (!s.measurement.empty() && s.measure_only) fail("--measurement and --measure-only do not go together");
  std::optional<Measurement> given;
  if (!s.measurement.empty())
    given = Measurement::from_json(read_json_file(s.measurement), config, s.measurement.string());

  // ---- Output folder and job ------------------------------------------------------------------
  std::string device_kind;
  std::unique_ptr<Backend> backend = open_backend(s, &device_kind);
  Backend& b = *backend;
  const json identity = job_identity(s, device_kind);
  Job job(s.output / kJobDirName);
  const bool has_job = fs::exists(job.file("job.json"));
  // Sampling is the one stage that runs the whole model at once; the others hold one layer.
  const double model_gb = static_cast<double>(store.total_bytes()) / 1e9;
  const double free_gb = static_cast<double>(b.free_memory()) / 1e9;
  const bool can_sample = model_gb < 0.85 * free_gb;
  if (sampled && !can_sample && !has_job)
    fail("self-sampled calibration runs the whole model at once (", fmt_gb(model_gb), " GB) and the device has ",
         fmt_gb(free_gb), " GB free: give a calibration file with -c (every other stage holds one layer at a time)");
  if (has_job && !s.resume)
    fail(s.output.string(), " holds an unfinished conversion: add --resume to finish it, or choose another folder");
  if (has_job) {
    job.load();
    if (!job.has("format") || job["format"] != kJobFormat) fail(job.file("job.json").string(), ": not a job of this qforge version");
    const std::string diff = identity_difference(job["identity"], identity);
    if (!diff.empty())
      fail(s.output.string(), ": the unfinished job there was started with other settings (", diff,
           "); resume with the same ones, or choose another folder");
    log_info("resuming the conversion in ", s.output.string(), " at stage ", job["stage"].get<std::string>());
  } else {
    if (fs::exists(s.output) && !fs::is_directory(s.output)) fail(s.output.string(), ": exists and is not a folder");
    // A job folder without its job file: a run killed before its first save; nothing to keep.
    if (fs::is_directory(job.dir())) fs::remove_all(job.dir());
    if (fs::exists(s.output) && !fs::is_empty(s.output))
      fail(s.output.string(), ": the output folder is not empty (choose a new or empty folder)");
    fs::create_directories(job.dir());
    job.data() = {{"format", kJobFormat}, {"identity", identity}, {"stage", "calibrate"}};
    job.save();
  }
  const auto stage = [&] { return job["stage"].get<std::string>(); };
  StageTimes times;
  const int64_t hidden = config.hidden, row_floats = s.length * config.hidden;

  // ---- Calibration ------------------------------------------------------------------------------
  CalibrationRows cal;
  if (stage() == "calibrate") {
    if (sampled) {
      cal = sample_calibration(s.input, b, s.rows, s.length, s.seed);
    } else {
      // The model's own samples beside the file's text keep the Hessians on the model's whole
      // distribution, not only the file's domain (see bench/NOTES.md for what each share gives).
      int64_t n_sampled = std::min<int64_t>(
          s.rows - 1, static_cast<int64_t>(std::llround(static_cast<double>(s.rows) * s.sampled_share)));
      if (n_sampled > 0 && !can_sample) {
        log_warn("the model (", fmt_gb(model_gb), " GB) does not fit in the device's ", fmt_gb(free_gb),
                 " GB free to sample its own calibration rows: calibrating on ", s.calibration.filename().string(),
                 " alone");
        n_sampled = 0;
      }
      const Tokenizer tok = Tokenizer::load(s.input);
      const CalibrationRows file_rows =
          rows_from_texts(tok, texts, s.rows - n_sampled, s.length, s.calibration.filename().string());
      CalibrationRows own;
      if (n_sampled > 0) own = sample_calibration(s.input, b, n_sampled, s.length, s.seed);
      cal = mix_rows(file_rows, own);
    }
    std::vector<int32_t> flat;
    for (const auto& r : cal.rows) flat.insert(flat.end(), r.begin(), r.end());
    write_safetensors(job.file("tokens.safetensors"), {{"input_ids", DType::I32, {cal.count(), cal.length}, flat.data()}},
                      {{"dataset", cal.dataset}});
    job["calibration"] = {{"rows", cal.count()}, {"length", cal.length}, {"dataset", cal.dataset}};
    if (given) job["measurement"] = given->to_json();
    job["stage"] = given ? "optimize" : "measure";
    job.save();
    times.mark("calibration");
    kill_point("calibrate");
  } else {
    auto f = SafetensorsFile::open(job.file("tokens.safetensors"));
    const TensorView& ids = f->tensors().at("input_ids");
    cal.length = ids.dim(1);
    cal.dataset = job["calibration"]["dataset"].get<std::string>();
    for (int64_t r = 0; r < ids.dim(0); ++r)
      cal.rows.emplace_back(ids.as<int32_t>() + r * cal.length, ids.as<int32_t>() + (r + 1) * cal.length);
  }
  QF_CHECK(cal.length == s.length, "internal: calibration rows of ", cal.length, " tokens, expected ", s.length);
  const int64_t measure_rows = std::min<int64_t>(cal.count(), std::max<int64_t>(1, (s.measure_tokens + s.length - 1) / s.length));
  const int64_t chunk_rows = std::max<int64_t>(1, kChunkFloats / row_floats);
  BlockQuantizer bq(config, b, s.length, s.damp);
  SequentialQuantizer sq(bq, chunk_rows);

  // ---- Measurement ------------------------------------------------------------------------------
  if (stage() == "measure") {
    Measurement m;
    int64_t first = 0;
    HostStates states;
    if (job.has("measure_states")) {
      m = Measurement::from_json_partial(job["measurement"], config);
      first = m.layers;
      states = load_states(job.file(job["measure_states"].get<std::string>()), measure_rows, row_floats);
    } else {
      const std::vector<std::vector<int32_t>> rows(cal.rows.begin(), cal.rows.begin() + measure_rows);
      states = embed_rows(b, w.embed, rows, s.length, hidden);
    }
    DeviceBuffer x = b.alloc(states.data.size());
    b.upload(x.data(), states.data.data(), states.data.size());
    Progress progress("measuring", 2 * config.n_layers, "block");
    progress.update(2 * first);
    auto last = std::chrono::steady_clock::now();
    for (int64_t L = first; L < config.n_layers; ++L) {
      DeviceLayer dl = upload_layer(b, w.layers[static_cast<size_t>(L)]);
      measure_layer(bq, L, w.layers[static_cast<size_t>(L)], dl, x.data(), measure_rows, m, &progress);
      progress.update(2 * (L + 1));
      const double since = std::chrono::duration<double>(std::chrono::steady_clock::now() - last).count();
      if (since >= checkpoint_seconds() || L + 1 == config.n_layers) {
        b.download(states.data.data(), x.data(), states.data.size());
        job["measurement"] = m.to_json();
        checkpoint(job, "measure_states", "measure-states-" + std::to_string(L + 1) + ".safetensors", states, hidden);
        last = std::chrono::steady_clock::now();
      }
      kill_point("measure:" + std::to_string(L));
    }
    progress.finish();
    // The unquantized model's perplexity on the measurement rows, for the quantized one to be compared with.
    DeviceBuffer norm = b.make_vector(w.final_norm);
    auto head = b.make_linear(w.head);
    job["reference_perplexity"] = sq.calibration_perplexity(*head, norm, states, cal.rows, measure_rows);
    times.mark("measurement");
    if (s.measure_only) {
      log_info("stage times: ", times.summary(), memory_note(device_kind, bq));
      write_file_atomic(s.output / "measurement.json", job["measurement"].dump(1) + "\n");
      fs::remove_all(job.dir());
      sync_directory(s.output);
      log_info("measurement written to ", (s.output / "measurement.json").string());
      return;
    }
    job["stage"] = "optimize";
    job.save();
    fs::remove(job.file(job["measure_states"].get<std::string>()));
    job["measure_states"] = nullptr;
    job.save();
  }
  const Measurement measurement = Measurement::from_json(job["measurement"], config, "the job's measurement");

  // ---- Optimization -----------------------------------------------------------------------------
  int64_t decoder_weights = 0;
  for (const auto& l : w.layers)
    for (const LinearWeight* lw : l.linears()) decoder_weights += lw->in_features * lw->out_features;
  if (stage() == "optimize") {
    std::vector<std::vector<SlotOption>> slots;
    for (int64_t L = 0; L < config.n_layers; ++L)
      for (BlockKind kind : {BlockKind::Attention, BlockKind::Mlp}) {
        std::vector<SlotOption> o;
        for (const auto& r : measurement.blocks.at(block_key(L, kind))) o.push_back({r.total_bits, r.error()});
        slots.push_back(std::move(o));
      }
    const auto budget = static_cast<int64_t>(std::floor(static_cast<double>(decoder_weights) * s.bpw));
    const Strategy st = choose_options(slots, budget);
    if (!st.fits)
      fail("-b ", s.bpw, " is below what this model allows: its smallest options need ",
           static_cast<double>(st.bits) / static_cast<double>(decoder_weights), " bits per weight");
    job["strategy"] = st.choice;
    job["stage"] = "quantize";
    job.save();
    times.mark("optimization");
    log_info("options chosen: ", static_cast<double>(st.bits) / static_cast<double>(decoder_weights),
             " bpw over the decoder (target ", s.bpw, "), expected error sum of squares ", st.objective);
    kill_point("optimize");
  }
  const std::vector<size_t> strategy = job["strategy"].get<std::vector<size_t>>();

  // ---- Quantization, layer by layer ---------------------------------------------------------------
  HostStates states;
  if (stage() == "quantize" || stage() == "head") {
    const int64_t first = job.has("quantized_layers") ? job["quantized_layers"].get<int64_t>() : 0;
    if (job.has("quant_states"))
      states = load_states(job.file(job["quant_states"].get<std::string>()), cal.count(), row_floats);
    else
      states = embed_rows(b, w.embed, cal.rows, s.length, hidden);
    if (stage() == "quantize") {
      Progress progress("quantizing", 2 * config.n_layers, "block");
      progress.update(2 * first);
      auto last = std::chrono::steady_clock::now();
      for (int64_t L = first; L < config.n_layers; ++L) {
        const LayerWeights& lw = w.layers[static_cast<size_t>(L)];
        DeviceLayer dl = upload_layer(b, lw);
        QuantizedTensors out;
        json reports = json::array();
        for (BlockKind kind : {BlockKind::Attention, BlockKind::Mlp}) {
          const size_t slot = static_cast<size_t>(2 * L + (kind == BlockKind::Mlp ? 1 : 0));
          const OptionResult& opt = measurement.blocks.at(block_key(L, kind)).at(strategy.at(slot));
          progress.update(static_cast<int64_t>(slot), block_key(L, kind));
          BlockReport r = sq.quantize_block(L, kind, lw, dl, opt.specs, states, out);
          json specs = json::object();
          for (size_t p = 0; p < opt.specs.size(); ++p) specs[block_projections(kind)[p]] = opt.specs[p].describe();
          reports.push_back({{"block", r.key}, {"option", strategy.at(slot)}, {"mix", specs},
                             {"bpw", static_cast<double>(r.bits) / static_cast<double>(r.weights)},
                             {"bits", r.bits}, {"weights", r.weights},
                             {"measured_error", opt.error()}, {"error", r.error}});
        }
        std::vector<TensorToWrite> tensors;
        for (const auto& [prefix, t] : out.linears)
          for (auto& tw : t->tensors(prefix)) tensors.push_back(tw);
        write_safetensors(job.file(layer_file(L)), tensors, {{"report", reports.dump()}});
        progress.update(2 * (L + 1));
        const double since = std::chrono::duration<double>(std::chrono::steady_clock::now() - last).count();
        if (since >= checkpoint_seconds() || L + 1 == config.n_layers) {
          job["quantized_layers"] = L + 1;
          checkpoint(job, "quant_states", "quant-states-" + std::to_string(L + 1) + ".safetensors", states, hidden);
          last = std::chrono::steady_clock::now();
        }
        kill_point("quantize:" + std::to_string(L));
      }
      progress.finish();
      job["stage"] = "head";
      job.save();
      times.mark("quantization");
    }
    // ---- The head ---------------------------------------------------------------------------------
    DeviceBuffer norm = b.make_vector(w.final_norm);
    std::unique_ptr<DeviceLinear> head;
    if (config.tie_embeddings) {
      log_info("the head shares the embedding table: it stays unquantized");
      head = b.make_linear(w.head);
    } else {
      Progress progress("quantizing the head", 1, "matrix");
      auto t = sq.quantize_head(w.head, w.final_norm, head_spec(s.head_bits), states);
      write_safetensors(job.file("head.safetensors"), t->tensors(w.head.name));
      head = b.make_linear(exl2_linear(t, w.head.name));
      progress.finish();
    }
    job["quantized_perplexity"] = sq.calibration_perplexity(*head, norm, states, cal.rows, measure_rows);
    times.mark("head");
    job["stage"] = "compile";
    job.save();
    if (job.has("quant_states")) {
      fs::remove(job.file(job["quant_states"].get<std::string>()));
      job["quant_states"] = nullptr;
      job.save();
    }
    kill_point("head");
  }

  // ---- The output folder ----------------------------------------------------------------------------
  if (stage() == "compile") {
    OutputFolder f;
    f.input = s.input;
    f.output = s.output;
    f.shard_bytes = static_cast<int64_t>(s.shard_mb * 1048576.0);
    f.input_tensors = &store;
    json blocks = json::array();
    int64_t bits = 0;
    for (int64_t L = 0; L < config.n_layers; ++L) {
      const fs::path p = job.file(layer_file(L));
      f.quantized_files.push_back(p);
      auto file = SafetensorsFile::open(p);
      for (const auto& r : parse_json(file->metadata().at("report"), p.string())) {
        bits += r["bits"].get<int64_t>();
        blocks.push_back(r);
      }
      for (const LinearWeight* lw : w.layers[static_cast<size_t>(L)].linears()) f.replaced_prefixes.insert(lw->name);
    }
    json head_report = {{"quantized", !config.tie_embeddings}};
    if (!config.tie_embeddings) {
      f.quantized_files.push_back(job.file("head.safetensors"));
      f.replaced_prefixes.insert(w.head.name);
      const LinearSpec hs = head_spec(s.head_bits);
      head_report["mix"] = hs.describe();
      head_report["bpw"] = static_cast<double>(hs.storage_bits(w.head.in_features, w.head.out_features)) /
                           static_cast<double>(w.head.in_features * w.head.out_features);
    }
    const double actual = static_cast<double>(bits) / static_cast<double>(decoder_weights);
    const json calibration = {{"rows", cal.count()}, {"length", cal.length}, {"dataset", cal.dataset}};
    f.quantization_config = {{"quant_method", "exl2"}, {"version", "qforge 0.1.0"}, {"bits", s.bpw},
                             {"head_bits", s.head_bits}, {"calibration", calibration}};
    f.report = {{"target_bpw", s.bpw}, {"decoder_bpw", actual}, {"decoder_bits", bits},
                {"decoder_weights", decoder_weights}, {"head", head_report}, {"calibration", calibration},
                {"calibration_perplexity",
                 {{"reference", job.has("reference_perplexity") ? job["reference_perplexity"] : json(nullptr)},
                  {"quantized", job["quantized_perplexity"]}}},
                {"blocks", blocks}};
    f.measurement = job["measurement"];
    kill_point("compile:start");
    const int64_t bytes = write_output_folder(f);
    kill_point("compile:written");
    fs::remove_all(job.dir());
    sync_directory(s.output);
    times.mark("output");

    // The table on stderr.
    std::fprintf(stderr, "\n%-28s %-6s %9s %9s  %s\n", "block", "bpw", "measured", "error", "mix");
    for (const auto& r : blocks) {
      std::string mix;
      for (const auto& [k, v] : r["mix"].items()) mix += (mix.empty() ? "" : " ") + k.substr(0, k.find('_')) + "=" + v.get<std::string>();
      std::fprintf(stderr, "%-28s %-6.3f %9.5f %9.5f  %s\n", r["block"].get<std::string>().c_str(), r["bpw"].get<double>(),
                   r["measured_error"].get<double>(), r["error"].get<double>(), mix.c_str());
    }
    std::fprintf(stderr, "decoder: %.4f bpw (target %.2f); head: %s; calibration perplexity %s -> %.3f; %.1f MB\n", actual,
                 s.bpw, config.tie_embeddings ? "tied, unquantized" : head_spec(s.head_bits).describe().c_str(),
                 f.report["calibration_perplexity"]["reference"].is_null()
                     ? "(measurement reused)"
                     : std::to_string(f.report["calibration_perplexity"]["reference"].get<double>()).c_str(),
                 job["quantized_perplexity"].get<double>(), static_cast<double>(bytes) / 1e6);
    std::fprintf(stderr, "stage times: %s%s\n", times.summary().c_str(), memory_note(device_kind, bq).c_str());
    log_info("converted model written to ", s.output.string());
  }
}

}  // namespace qf
