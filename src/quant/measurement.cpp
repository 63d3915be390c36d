#include "quant/measurement.h"

#include <cmath>
#include <deque>
#include <future>
#include <map>

#include "core/error.h"
#include "core/progress.h"
#include "quant/block_quantizer.h"

namespace qf {

std::string block_key(int64_t layer, BlockKind kind) {
  return "model.layers." + std::to_string(layer) + "." + block_kind_name(kind);
}

namespace {

std::pair<int64_t, int64_t> projection_shape(const ModelConfig& c, BlockKind kind, size_t p) {
  if (kind == BlockKind::Attention) {
    switch (p) {
      case 0: return {c.hidden, c.q_dim()};
      case 1:
      case 2: return {c.hidden, c.kv_dim()};
      default: return {c.q_dim(), c.hidden};
    }
  }
  return p == 2 ? std::pair{c.intermediate, c.hidden} : std::pair{c.hidden, c.intermediate};
}

}  // namespace

int64_t option_bits(const ModelConfig& config, BlockKind kind, const std::vector<LinearSpec>& specs) {
  int64_t bits = 0;
  for (size_t p = 0; p < specs.size(); ++p) {
    const auto [K, N] = projection_shape(config, kind, p);
    bits += specs[p].storage_bits(K, N);
  }
  return bits;
}

json Measurement::to_json() const {
  json blocks_json = json::object();
  for (const auto& [key, results] : blocks) {
    json list = json::array();
    const BlockKind kind = key.size() > 4 && key.compare(key.size() - 4, 4, ".mlp") == 0 ? BlockKind::Mlp : BlockKind::Attention;
    for (const auto& r : results) {
      json e = {{"accuracy", r.accuracy}, {"total_bits", r.total_bits}};
      for (size_t p = 0; p < r.specs.size(); ++p) e[block_projections(kind)[p]] = r.specs[p].to_qparams();
      list.push_back(std::move(e));
    }
    blocks_json[key] = std::move(list);
  }
  return {{"measurement", blocks_json}, {"last_module_idx", 2 * layers}, {"qforge_layers", layers}};
}

namespace {

Measurement parse_measurement(const json& j, const ModelConfig& config, const std::string& where, int64_t layers) {
  if (!j.is_object() || !j.contains("measurement") || !j["measurement"].is_object())
    fail(where, ": not a measurement file (no 'measurement' object)");
  Measurement m;
  const json& blocks = j["measurement"];
  for (int64_t layer = 0; layer < layers; ++layer) {
    for (BlockKind kind : {BlockKind::Attention, BlockKind::Mlp}) {
      const std::string key = block_key(layer, kind);
      auto it = blocks.find(key);
      if (it == blocks.end() || !it->is_array() || it->empty())
        fail(where, ": no measurement for ", key, " (a measurement of another model, or an unfinished one?)");
      std::vector<OptionResult> results;
      for (const json& e : *it) {
        const std::string at = where + ": " + key;
        if (!e.is_object() || !e.contains("accuracy") || !e["accuracy"].is_number())
          fail(at, ": an option without a numeric 'accuracy'");
        OptionResult r;
        r.accuracy = e["accuracy"].get<double>();
        if (!std::isfinite(r.accuracy) || r.accuracy > 1.0) fail(at, ": accuracy ", r.accuracy, " out of range");
        for (const auto& proj : block_projections(kind)) {
          if (!e.contains(proj)) fail(at, ": an option without QParams for ", proj);
          r.specs.push_back(LinearSpec::from_qparams(e[proj], at + "." + proj));
        }
        r.total_bits = option_bits(config, kind, r.specs);
        if (e.contains("total_bits") && e["total_bits"].is_number() &&
            std::llround(e["total_bits"].get<double>()) != r.total_bits)
          fail(at, ": total_bits ", e["total_bits"].dump(), " do not match this model's shapes (", r.total_bits,
               "): a measurement of another model?");
        results.push_back(std::move(r));
      }
      m.blocks[key] = std::move(results);
    }
  }
  m.layers = layers;
  return m;
}

}  // namespace

Measurement Measurement::from_json(const json& j, const ModelConfig& config, const std::string& where) {
  Measurement m = parse_measurement(j, config, where, config.n_layers);
  for (const auto& [key, v] : j["measurement"].items()) {
    if (!m.blocks.count(key)) fail(where, ": block ", key, " is not in this ", config.n_layers, "-layer model");
  }
  return m;
}

Measurement Measurement::from_json_partial(const json& j, const ModelConfig& config) {
  const int64_t layers = j.is_object() && j.contains("qforge_layers") ? j["qforge_layers"].get<int64_t>() : 0;
  if (layers < 0 || layers > config.n_layers) fail("the job's measurement is damaged (remove the output folder and start again)");
  return parse_measurement(j, config, "the job's measurement", layers);
}

namespace {
// Mixes whose codes wait for packing at once: enough to keep the device busy, few enough that the
// codes (one byte per weight) stay small beside the states in host memory.
constexpr size_t kPackingInFlight = 8;
}  // namespace

void measure_layer(BlockQuantizer& q, int64_t layer, const LayerWeights& w, DeviceLayer& l, float* x, int64_t rows,
                   Measurement& m, Progress* progress) {
  Backend& b = q.backend();
  const size_t floats = static_cast<size_t>(rows * q.row_floats());
  DeviceBuffer ref = b.alloc(floats), trial = b.alloc(floats);
  for (BlockKind kind : {BlockKind::Attention, BlockKind::Mlp}) {
    const std::string key = block_key(layer, kind);
    // The reference output and the Hessians of its inputs.
    b.copy_rows(x, 0, rows * q.length(), q.config().hidden, ref.data());
    BlockHessians h = q.new_hessians(kind);
    q.run(kind, l, ref.data(), rows, &h);
    BlockQuantizer::Solvers solvers = q.solvers(h, kind, key);
    h = BlockHessians{};

    // Each distinct mix of each projection is quantized once and shared by the options using it.
    // The device runs GPTQ mix after mix while host threads pack the codes of the previous ones.
    const auto weights = block_weights(w, kind);
    const auto& options = block_options(kind);
    std::vector<std::map<std::string, std::unique_ptr<DeviceLinear>>> variants(weights.size());
    struct Packing {
      size_t p;
      std::string mix;
      std::future<LinearWeight> linear;
    };
    std::deque<Packing> packing;
    const auto finish_oldest = [&] {
      Packing& k = packing.front();
      variants[k.p][k.mix] = b.make_linear(k.linear.get());
      packing.pop_front();
    };
    for (size_t p = 0; p < weights.size(); ++p) {
      GptqSolver& s = solvers.of(kind, p);
      s.load(s.arrange(*weights[p]), weights[p]->out_features);
      for (const auto& o : options) {
        const std::string d = o.specs[p].describe();
        if (variants[p].count(d)) continue;
        variants[p][d] = nullptr;  // claimed; filled when packed
        auto pack = [&s, spec = o.specs[p], w = weights[p], codes = s.codes(o.specs[p], q.scale_search())] {
          return exl2_linear(s.pack(codes, spec, w->bias), w->name);
        };
        packing.push_back({p, d, std::async(std::launch::async, std::move(pack))});
        if (packing.size() >= kPackingInFlight) finish_oldest();
      }
    }
    while (!packing.empty()) finish_oldest();
    q.note_memory();
    std::vector<OptionResult> results;
    for (size_t i = 0; i < options.size(); ++i) {
      for (size_t p = 0; p < weights.size(); ++p) std::swap(block_slot(l, kind, p), variants[p][options[i].specs[p].describe()]);
      b.copy_rows(x, 0, rows * q.length(), q.config().hidden, trial.data());
      q.run(kind, l, trial.data(), rows);
      for (size_t p = 0; p < weights.size(); ++p) std::swap(block_slot(l, kind, p), variants[p][options[i].specs[p].describe()]);
      OptionResult r;
      r.specs = options[i].specs;
      r.total_bits = option_bits(q.config(), kind, r.specs);
      r.accuracy = std::max(1e-6, 1.0 - q.mean_relative_error(trial.data(), ref.data(), rows));
      results.push_back(std::move(r));
      if (progress)
        progress->update(2 * layer + (kind == BlockKind::Mlp ? 1 : 0),
                         key + " option " + std::to_string(i + 1) + "/" + std::to_string(options.size()));
    }
    m.blocks[key] = std::move(results);
    b.copy_rows(ref.data(), 0, rows * q.length(), q.config().hidden, x);
  }
  m.layers = layer + 1;
}

}  // namespace qf
