// qforge bench: prefill and decode speed in the manner of llama-bench. Runs a model folder (-m) or
// a random model of a known shape (--random llama2-7b), generated directly in GPU memory with no
// files. Prints prefill tok/s, decode tok/s at several context depths (mean ± stddev over -r
// repetitions), time to first token, peak device memory, and each decode figure as a share of the
// memory-bandwidth roofline (bytes read per token / bandwidth).
#include <algorithm>
#include <array>
#include <charconv>
#include <chrono>
#include <climits>
#include <cmath>
#include <cstdio>
#include <memory>
#include <numeric>
#include <sstream>

#include "apps/bench_engine.h"
#include "apps/commands.h"
#include "backends/backend.h"
#include "core/error.h"
#include "core/json_file.h"
#include "core/log.h"
#include "core/sizes.h"
#include "model/config.h"
#include "model/model.h"
#include "model/rope.h"
#include "backends/random_weights.h"
#include "backends/sampler.h"

namespace qf::app {

namespace {

struct BenchArgs {
  std::string model_dir;
  std::string random;
  std::string format = "fp16";
  std::string device = "auto";
  std::string depths = "0,4096,16384";
  int threads = 0;
  int p = 512, n = 128, r = 5;
  double bandwidth_tbs = 3.35;
  bool no_graph = false;
  std::string concurrency;  // "1,8,32": the serving benchmark instead of the pp/tg tests
  int prefix_sharing = 0;   // > 0: the prefix-sharing TTFT benchmark with a prefix this long
  int token_budget = 8192;  // engine tokens per step (bench/NOTES.md: the best of 2048, 4096 and 8192 at 64 streams)
  std::string kv_cache = "fp16";
  int block_size = 16;
  SeedOption seed{1234, false};
};

using Clock = std::chrono::steady_clock;
double seconds_since(Clock::time_point t0) {
  return std::chrono::duration<double>(Clock::now() - t0).count();
}

struct Shape {
  const char* name;
  int64_t hidden, intermediate, layers, heads, kv_heads, vocab;
  double rope_theta;
};
constexpr Shape kShapes[] = {
    {"llama2-7b", 4096, 11008, 32, 32, 32, 32000, 10000.0},
    {"llama3-8b", 4096, 14336, 32, 32, 8, 128256, 500000.0},
    {"llama2-70b", 8192, 28672, 80, 64, 8, 32000, 10000.0},
    {"tiny", 256, 688, 4, 8, 4, 1000, 10000.0},  // for quick runs on the CPU
};

// What the benchmark runs: a loaded model, or random weights of a known shape placed directly on
// the device. Either way the forward pass is Model::forward.
struct BenchModel {
  std::unique_ptr<RandomWeights> maker;  // random models: owns the host values behind CPU weights (outlives model)
  std::unique_ptr<Model> model;
  size_t linear_bytes = 0;  // weights read per decoded token
  std::string description;
};

BenchModel load_file_model(const std::string& dir, Backend& b, const MemoryPlan& plan) {
  BenchModel bm;
  bm.model = Model::load(dir, b, [&](const ModelConfig&) { return plan; });
  const auto& w = bm.model->weights();
  for (const auto& l : w.layers)
    for (const LinearWeight* lw : l.linears()) bm.linear_bytes += lw->storage_bytes();
  bm.linear_bytes += w.head.storage_bytes();
  const char* fmt = linear_format_name(w.layers.empty() ? LinearFormat::Dense : w.layers[0].q.format);
  bm.description = str(bm.model->config().dir.filename().string(), " (", fmt, ", ", bm.model->config().dtype, ")");
  return bm;
}

// An EXL2 layer's bit-width mix: shares of its rows at given widths and group sizes.
using Mix = std::vector<QuantMixPart>;

// The weight format of a random model: fp16/bf16/fp32, "exl2:BPW" (e.g. exl2:4.0), "exl2:REPORT"
// (the per-layer mixes of a converted folder's quantization_report.json) or "gptq:BITSgGROUP"
// (e.g. gptq:4g128, gptq:4g128-act for act-order).
struct WeightFormat {
  enum Kind { Dense, Exl2, Gptq } kind = Dense;
  DType dtype = DType::F16;  // dense weights, and the embedding (and GPTQ head) of quantized ones
  double bpw = 0;            // EXL2 decoder target, overhead included (as ExLlamaV2 counts it)
  // EXL2 from a report: per decoder layer the mixes of q, k, v, o, gate, up, down, and the head's.
  std::vector<std::array<Mix, 7>> layer_mixes;
  Mix head_mix;
  int bits = 4;              // GPTQ
  int64_t group = 128;       // GPTQ (-1: one group)
  bool act_order = false;    // GPTQ
};

// "0.1:5b_32g/0.9:4b_32g" (the mix notation of quantization_report.json).
Mix parse_mix(const std::string& spec, const std::string& where) {
  Mix mix;
  std::stringstream ss(spec);
  std::string part;
  while (std::getline(ss, part, '/')) {
    QuantMixPart m;
    char b = 0, u = 0, g = 0, colon = 0;
    std::istringstream ps(part);
    if (!(ps >> m.frac >> colon >> m.bits >> b >> u >> m.group >> g) || ps.peek() != EOF || colon != ':' || b != 'b' || u != '_' ||
        g != 'g' || !(m.frac > 0 && m.frac <= 1) || m.bits < 2 || m.bits > 8 || m.bits == 7 || m.group < 32 ||
        m.group % 32 != 0)
      fail(where, ": mix '", escape_text(spec), "' is not of the form 0.1:5b_32g/0.9:4b_32g");
    mix.push_back(m);
  }
  if (mix.empty()) fail(where, ": empty mix");
  return mix;
}

// The per-layer mixes of a converted folder (its quantization_report.json): a random model with
// exactly the bit widths `qforge convert` chose, to time them without the folder.
void read_mix_report(const std::string& path, WeightFormat& w) {
  const json r = read_json_file(path);
  const std::string where = path;
  if (!r.is_object() || !r.contains("blocks") || !r["blocks"].is_array() || !r.contains("head"))
    fail(where, ": not a quantization_report.json (no blocks and head)");
  static const char* kAttn[] = {"q_proj", "k_proj", "v_proj", "o_proj"};
  static const char* kMlp[] = {"gate_proj", "up_proj", "down_proj"};
  for (const auto& blk : r["blocks"]) {
    const std::string name = blk.value("block", "");
    const size_t dot = name.rfind('.');
    const std::string prefix = "model.layers.";
    if (name.rfind(prefix, 0) != 0 || dot == std::string::npos || !blk.contains("mix") || !blk["mix"].is_object())
      fail(where, ": block '", escape_text(name), "' is not model.layers.N.self_attn or .mlp with a mix");
    int layer = -1;
    const char* first = name.data() + prefix.size();
    const auto [end, ec] = std::from_chars(first, name.data() + dot, layer);
    if (ec != std::errc() || end != name.data() + dot || layer < 0 || layer > 4096)
      fail(where, ": block '", escape_text(name), "': no layer number");
    if (static_cast<size_t>(layer) >= w.layer_mixes.size()) w.layer_mixes.resize(static_cast<size_t>(layer) + 1);
    const bool attn = name.compare(dot + 1, std::string::npos, "self_attn") == 0;
    const auto& mix = blk["mix"];
    for (int i = 0; i < (attn ? 4 : 3); ++i) {
      const char* proj = attn ? kAttn[i] : kMlp[i];
      if (!mix.contains(proj) || !mix[proj].is_string()) fail(where, ": block '", escape_text(name), "' has no ", proj);
      w.layer_mixes[static_cast<size_t>(layer)][static_cast<size_t>(attn ? i : 4 + i)] =
          parse_mix(mix[proj].get<std::string>(), where);
    }
  }
  for (size_t l = 0; l < w.layer_mixes.size(); ++l)
    for (const Mix& m : w.layer_mixes[l])
      if (m.empty()) fail(where, ": layer ", l, " is incomplete");
  const json& head = r["head"];
  if (!head.is_object() || !head.contains("mix") || !head["mix"].is_string()) fail(where, ": head has no mix");
  w.head_mix = parse_mix(head["mix"].get<std::string>(), where);
  w.bpw = r.value("decoder_bpw", 4.0);
}

WeightFormat parse_format(const std::string& f) {
  WeightFormat w;
  if (f == "fp16" || f == "bf16" || f == "fp32") {
    w.dtype = f == "fp16" ? DType::F16 : (f == "bf16" ? DType::BF16 : DType::F32);
    return w;
  }
  try {
    if (f.rfind("exl2:", 0) == 0 && f.size() > 10 && f.compare(f.size() - 5, 5, ".json") == 0) {
      w.kind = WeightFormat::Exl2;
      read_mix_report(f.substr(5), w);
      return w;
    }
    if (f.rfind("exl2:", 0) == 0) {
      w.kind = WeightFormat::Exl2;
      w.bpw = std::stod(f.substr(5));
      if (w.bpw < 2.2 || w.bpw > 8.0) fail("--format ", f, ": EXL2 bits per weight must be in 2.2 .. 8.0");
      return w;
    }
    if (f.rfind("gptq:", 0) == 0) {
      w.kind = WeightFormat::Gptq;
      std::string r = f.substr(5);
      if (r.size() > 4 && r.compare(r.size() - 4, 4, "-act") == 0) {
        w.act_order = true;
        r.resize(r.size() - 4);
      }
      const size_t gpos = r.find('g');
      w.bits = std::stoi(r.substr(0, gpos));
      if (gpos != std::string::npos) w.group = std::stoll(r.substr(gpos + 1));
      if (w.bits != 2 && w.bits != 3 && w.bits != 4 && w.bits != 8) fail("--format ", f, ": GPTQ bits must be 2, 3, 4 or 8");
      if (w.group != -1 && (w.group < 32 || w.group % 32 != 0)) fail("--format ", f, ": GPTQ group size must be a multiple of 32 (or -1)");
      return w;
    }
  } catch (const std::logic_error&) {
  }
  fail("--format ", f, " is not known (use fp16, bf16, fp32, exl2:BPW such as exl2:4.0, or gptq:4g128[-act])");
}

// The bit-width mix of one EXL2 decoder layer that averages `bpw` bits per weight including the
// scale/group/permutation overhead (ExLlamaV2's QParams.total_bits): two adjacent widths, groups of
// 32 rows below 3.0 bpw, 64 below 4.0, else 128 (the shape of ExLlamaV2's own options).
std::vector<QuantMixPart> exl2_mix(double bpw, int64_t out) {
  const int64_t gs = bpw < 3.0 ? 32 : (bpw < 4.0 ? 64 : 128);
  const double N = static_cast<double>(out);
  const double eff = bpw - (4.0 / gs + 48.0 / (gs * N) + 32.0 / N);
  const int widths[] = {2, 3, 4, 5, 6, 8};
  int lo = 2;
  for (int b : widths)
    if (b <= eff + 1e-9) lo = b;
  if (lo == 8) return {{8, 1.0, gs}};
  int hi = 8;
  for (int b : widths)
    if (b > lo) { hi = b; break; }
  const double p = std::clamp((eff - lo) / (hi - lo), 0.0, 1.0);
  if (p < 1.0 / 64) return {{lo, 1.0, gs}};
  return {{hi, p, gs}, {lo, 1.0 - p, gs}};
}
// ExLlamaV2's default head (-hb 6): 0.15 of the rows at 8 bits, 0.85 at 6, groups of 128.
const std::vector<QuantMixPart> kExl2Head = {{8, 0.15, 128}, {6, 0.85, 128}};

// The random weights of a shape in one format, made by the backend's RandomWeights (generated on
// the GPU, host values elsewhere), counting the bytes a decoded token reads.
class ShapeWeights {
 public:
  ShapeWeights(RandomWeights& maker, const WeightFormat& fmt, BenchModel* bm) : rw_(maker), fmt_(fmt), bm_(bm) {
    if (fmt.kind != WeightFormat::Dense && !maker.on_device()) fail("--format exl2/gptq random models need --device cuda");
  }

  // A decoder linear layer (head = false) or the output head.
  std::unique_ptr<DeviceLinear> linear(int64_t in, int64_t out, uint64_t seed, bool head = false) {
    if (fmt_.kind != WeightFormat::Dense && !(head && fmt_.kind == WeightFormat::Gptq)) {
      size_t bytes = 0;
      auto l = fmt_.kind == WeightFormat::Exl2 ? rw_.exl2(in, out, exl2_parts(out, head), seed, &bytes)
                                                : rw_.gptq(in, out, fmt_.bits, fmt_.group, fmt_.act_order, seed, &bytes);
      bm_->linear_bytes += bytes;
      if (head) {
        head_bits_ = 8.0 * static_cast<double>(bytes) / static_cast<double>(in * out);
      } else {
        decoder_bytes_ += static_cast<double>(bytes);
        decoder_weights_ += static_cast<double>(in * out);
      }
      return l;
    }
    bm_->linear_bytes += static_cast<size_t>(in * out) * dtype_size(fmt_.dtype);
    return rw_.dense(in, out, fmt_.dtype, 1.0f / std::sqrt(static_cast<float>(in)), seed);
  }

  // The mix of the next EXL2 layer: from the report (decoder linears come in the order q, k, v, o,
  // gate, up, down of each layer) or the one of --format exl2:BPW.
  std::vector<QuantMixPart> exl2_parts(int64_t out, bool head) {
    if (fmt_.layer_mixes.empty()) return head ? kExl2Head : exl2_mix(fmt_.bpw, out);
    if (head) return fmt_.head_mix;
    const size_t layer = decoder_linears_ / 7, slot = decoder_linears_ % 7;
    ++decoder_linears_;
    if (layer >= fmt_.layer_mixes.size())
      fail("--format: the report has ", fmt_.layer_mixes.size(), " layers, the shape more");
    return fmt_.layer_mixes[layer][slot];
  }

  // "decoder 4.02 bpw, head 6.35 bpw" for quantized formats, "" otherwise.
  std::string bits_summary() const {
    if (decoder_weights_ == 0) return "";
    std::string s = str(", decoder ", std::round(800.0 * decoder_bytes_ / decoder_weights_) / 100.0, " bpw as read");
    if (head_bits_ > 0) s += str(", head ", std::round(100.0 * head_bits_) / 100.0, " bpw");
    return s;
  }

  std::unique_ptr<DeviceEmbedding> embedding(int64_t vocab, int64_t dim, uint64_t seed) {
    return rw_.embedding(vocab, dim, fmt_.dtype, 1.0f, seed);
  }
  DeviceBuffer vector(int64_t n, uint64_t seed) { return rw_.vector(n, 1.0f, 0.1f, seed); }

 private:
  RandomWeights& rw_;
  WeightFormat fmt_;
  BenchModel* bm_;
  double decoder_bytes_ = 0, decoder_weights_ = 0, head_bits_ = 0;
  size_t decoder_linears_ = 0;
};

ModelConfig shape_config(const Shape& s, const WeightFormat& fmt, const std::string& format) {
  ModelConfig c;
  c.arch = find_architecture("LlamaForCausalLM", "llama");
  c.hf_class = "LlamaForCausalLM";
  c.dtype = fmt.kind == WeightFormat::Dense ? format : "fp16";
  c.hidden = s.hidden;
  c.intermediate = s.intermediate;
  c.n_layers = s.layers;
  c.n_heads = s.heads;
  c.n_kv_heads = s.kv_heads;
  c.head_dim = s.hidden / s.heads;
  c.vocab = s.vocab;
  c.rms_eps = 1e-5;
  c.rope.theta = s.rope_theta;
  c.max_position = 1 << 20;
  return c;
}

// Bytes the random weights of `c` take on the device (approximately, for quantized formats),
// and on the CPU the host floats of the largest matrix while it is converted.
std::vector<MemoryItem> random_weight_needs(const ModelConfig& c, const WeightFormat& fmt, bool on_device) {
  const double decoder = static_cast<double>(c.n_layers) *
                         (static_cast<double>(c.hidden) * (2.0 * c.q_dim() + 2.0 * c.kv_dim()) +
                          3.0 * static_cast<double>(c.hidden) * static_cast<double>(c.intermediate));
  const double head = static_cast<double>(c.hidden) * static_cast<double>(c.vocab);
  const double dense_bytes = static_cast<double>(dtype_size(fmt.dtype));
  double per_weight = dense_bytes, head_per_weight = dense_bytes;
  if (fmt.kind == WeightFormat::Exl2) {
    per_weight = fmt.bpw / 8.0;
    head_per_weight = 6.4 / 8.0;
  } else if (fmt.kind == WeightFormat::Gptq) {
    const double group = fmt.group > 0 ? static_cast<double>(fmt.group) : static_cast<double>(c.hidden);
    per_weight = fmt.bits / 8.0 + (2.0 + fmt.bits / 8.0) / group;
  }
  const double embed = head * dense_bytes;
  const double norms = static_cast<double>(2 * c.n_layers + 1) * static_cast<double>(c.hidden) * 4.0;
  std::vector<MemoryItem> items{{"weights", decoder * per_weight + head * head_per_weight + embed + norms}};
  if (!on_device) {
    const double largest = std::max({static_cast<double>(c.hidden) * static_cast<double>(c.intermediate),
                                     head, static_cast<double>(c.hidden) * static_cast<double>(c.q_dim())});
    items.push_back({"conversion buffer", largest * 4.0});
  }
  return items;
}

BenchModel random_model(const Shape& s, const std::string& format, Backend& b, uint64_t seed, const MemoryPlan& plan) {
  const WeightFormat fmt = parse_format(format);
  ModelConfig c = shape_config(s, fmt, format);
  BenchModel bm;
  bm.maker = make_random_weights(b);
  {
    // Checked before a byte is allocated: the weights, the KV cache and scratch of the runs.
    std::vector<MemoryItem> need = random_weight_needs(c, fmt, bm.maker->on_device());
    for (const auto& it : memory_needs(c, b, 0.0, plan))
      if (it.what != "weights") need.push_back(it);
    check_memory(b, s.name, need, " (use a smaller --random shape, --depth or -p)");
  }

  bm.description = str(s.name, " (random ", format, ")");
  ShapeWeights rw(*bm.maker, fmt, &bm);
  DeviceWeights w;
  uint64_t sd = seed;
  w.embed = rw.embedding(c.vocab, c.hidden, ++sd);
  w.layers.resize(static_cast<size_t>(c.n_layers));
  for (auto& l : w.layers) {
    l.attn_norm = rw.vector(c.hidden, ++sd);
    l.ffn_norm = rw.vector(c.hidden, ++sd);
    l.q = rw.linear(c.hidden, c.q_dim(), ++sd);
    l.k = rw.linear(c.hidden, c.kv_dim(), ++sd);
    l.v = rw.linear(c.hidden, c.kv_dim(), ++sd);
    l.o = rw.linear(c.q_dim(), c.hidden, ++sd);
    l.gate = rw.linear(c.hidden, c.intermediate, ++sd);
    l.up = rw.linear(c.hidden, c.intermediate, ++sd);
    l.down = rw.linear(c.intermediate, c.hidden, ++sd);
  }
  w.final_norm = rw.vector(c.hidden, ++sd);
  w.head = rw.linear(c.hidden, c.vocab, ++sd, /*head=*/true);
  bm.description += rw.bits_summary();
  b.synchronize();
  bm.model = Model::from_device_weights(std::move(c), std::move(w), b);
  return bm;
}

struct Stat {
  double mean = 0, sd = 0;
};
Stat stat(const std::vector<double>& v) {
  Stat s;
  if (v.empty()) return s;
  s.mean = std::accumulate(v.begin(), v.end(), 0.0) / static_cast<double>(v.size());
  double ss = 0;
  for (double x : v) ss += (x - s.mean) * (x - s.mean);
  s.sd = v.size() > 1 ? std::sqrt(ss / static_cast<double>(v.size() - 1)) : 0.0;
  return s;
}

std::vector<int64_t> parse_depths(const std::string& s, const char* option = "--depth") {
  std::vector<int64_t> out;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) {
    if (item.empty()) continue;
    size_t used = 0;
    try {
      out.push_back(std::stoll(item, &used));
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != item.size() || out.back() < 0 || out.back() > INT_MAX)
      fail(option, " ", quote_for_error(s), ": each value must be an integer from 0 to 2147483647 (e.g. 0,4096,16384)");
  }
  if (out.empty()) out.push_back(0);
  return out;
}

int run_bench(const BenchArgs& a) {
  if (a.model_dir.empty() == a.random.empty()) fail("give exactly one of -m DIR or --random SHAPE");
  DeviceSpec spec = parse_device(a.device);
  spec.threads = a.threads;
  auto backend = make_backend(spec);
  Backend& b = *backend;
  size_t peak_used = 0;
  auto sample_mem = [&] { peak_used = std::max(peak_used, b.used_memory()); };

  // The cache holds the deepest test plus its decode steps; prefill runs -p rows (at least 512)
  // per step.
  auto depths = parse_depths(a.depths);
  const int64_t max_depth = *std::max_element(depths.begin(), depths.end());
  const int64_t capacity = checked_add(checked_add(std::max<int64_t>(a.p, max_depth), a.n, "--depth + -n"), 8, "--depth + -n");
  MemoryPlan plan;
  plan.context = capacity;
  plan.rows = std::max<int64_t>({a.p, std::min<int64_t>(max_depth, 512), 1});  // (the paged cache checks itself)

  const uint64_t seed = resolve_seed(a.seed);
  const auto t_load = Clock::now();
  BenchModel bm;
  if (!a.model_dir.empty()) {
    Step step(str("loading ", a.model_dir));
    bm = load_file_model(a.model_dir, b, plan);
  } else {
    const Shape* shape = nullptr;
    for (const auto& s : kShapes)
      if (a.random == s.name) shape = &s;
    if (!shape) fail("--random ", quote_for_error(a.random), ": unknown shape (llama2-7b, llama3-8b, llama2-70b, tiny)");
    Step step(str("building the random ", a.random, " model"));
    bm = random_model(*shape, a.format, b, seed, plan);
  }
  b.synchronize();
  const double load_s = seconds_since(t_load);
  sample_mem();
  Model& model = *bm.model;
  const ModelConfig& c = model.config();
  Step step("benchmarking");
  if (a.prefix_sharing > 0) {
    std::printf("qforge bench: %s on %s, prefix sharing (engine)\n", bm.description.c_str(), b.name().c_str());
    PrefixBench pb;
    pb.prefix = a.prefix_sharing;
    pb.block_size = a.block_size;
    pb.token_budget = a.token_budget;
    pb.kv_format = parse_kv_format(a.kv_cache);
    pb.repeats = std::max(1, a.r);
    pb.seed = seed;
    run_prefix_bench(model, pb);
    return 0;
  }
  if (!a.concurrency.empty()) {
    std::printf("qforge bench: %s on %s, many requests at once (engine)\n", bm.description.c_str(), b.name().c_str());
    ConcurrencyBench cb;
    cb.concurrency = parse_depths(a.concurrency, "--concurrency");
    for (int64_t v : cb.concurrency)
      if (v < 1 || v > 4096) fail("--concurrency ", v, ": requests in flight must be 1 to 4096");
    cb.max_prompt = std::max(a.p, 1);
    cb.new_tokens = a.n;
    cb.block_size = a.block_size;
    cb.token_budget = a.token_budget;
    cb.kv_format = parse_kv_format(a.kv_cache);
    cb.seed = seed;
    cb.graphs = !a.no_graph;
    run_concurrency_bench(model, cb);
    return 0;
  }
  sample_mem();
  const double bw = a.bandwidth_tbs * 1e12;
  const size_t kv_elem = b.kv_element_bytes();

  std::printf("qforge bench: %s on %s\n", bm.description.c_str(), b.name().c_str());
  std::printf("  %lld layers, hidden %lld, ffn %lld, heads %lld/%lld, vocab %lld; load %.1f s\n",
              static_cast<long long>(c.n_layers), static_cast<long long>(c.hidden),
              static_cast<long long>(c.intermediate), static_cast<long long>(c.n_heads),
              static_cast<long long>(c.n_kv_heads), static_cast<long long>(c.vocab), load_s);
  std::printf("  linear weights read per token: %.3f GB; roofline bandwidth %.2f TB/s (--bandwidth)\n",
              bm.linear_bytes / 1e9, a.bandwidth_tbs);
  std::fflush(stdout);

  // One request at a time through the engine, as generate runs it.
  StreamBench sb;
  sb.prompt = a.p;
  sb.new_tokens = a.n;
  sb.repeats = a.r;
  sb.depths = depths;
  sb.graphs = !a.no_graph;
  sb.seed = seed;
  const StreamResult res = run_stream_bench(model, sb, sample_mem);
  const std::vector<double>& pp = res.pp;
  const std::vector<double>& ttft = res.ttft_ms;
  struct Row {
    int64_t depth;
    Stat tps;
    double bytes;
  };
  std::vector<Row> rows;
  const bool graph = res.graphs;
  for (size_t i = 0; i < depths.size(); ++i) {
    const int64_t depth = depths[i];
    const double kv_bytes = static_cast<double>(depth + a.n / 2) * c.n_layers * c.kv_dim() * 2 * kv_elem;
    rows.push_back({depth, stat(res.tg[i]), static_cast<double>(bm.linear_bytes) + kv_bytes});
  }

  std::printf("\n| test | tok/s | GB read/token | roofline share |\n|---|---:|---:|---:|\n");
  if (!pp.empty()) {
    const Stat s = stat(pp);
    std::printf("| pp%d | %.1f ± %.1f | | |\n", a.p, s.mean, s.sd);
  }
  for (const auto& r : rows) {
    const double share = r.tps.mean * r.bytes / bw;
    std::printf("| tg%d @ d%lld%s | %.1f ± %.1f | %.3f | %.1f%% |\n", a.n, static_cast<long long>(r.depth),
                graph ? " (graph)" : "", r.tps.mean, r.tps.sd, r.bytes / 1e9, 100.0 * share);
  }
  if (!ttft.empty()) {
    const Stat s = stat(ttft);
    std::printf("\ntime to first token (pp%d + logits): %.2f ± %.2f ms\n", a.p, s.mean, s.sd);
  }
  if (peak_used > 0) std::printf("peak device memory in use: %.2f GiB\n", peak_used / 1073741824.0);
  std::printf("roofline share = tok/s x (linear weights + KV cache read per token) / %.2f TB/s\n", a.bandwidth_tbs);
  return 0;
}

}  // namespace

void register_bench(CLI::App& app, std::function<int()>* run) {
  auto a = std::make_shared<BenchArgs>();
  auto* cmd = app.add_subcommand("bench", "Measure prefill and decode speed (like llama-bench)");
  cmd->add_option("-m,--model", a->model_dir, "Model folder")->check(CLI::ExistingDirectory);
  cmd->add_option("--random", a->random, "Random model of a known shape: llama2-7b, llama3-8b, llama2-70b, tiny");
  cmd->add_option("--format", a->format, "Weights of a random model: fp16, bf16, fp32, exl2:BPW (e.g. exl2:4.0), exl2:DIR/quantization_report.json (the bit widths qforge convert chose, layer by layer), gptq:BITSgGROUP[-act] (e.g. gptq:4g128)")->capture_default_str();
  cmd->add_option("--device", a->device, "auto (the GPU when there is one), cpu, cuda or cuda:N")->capture_default_str();
  add_threads_option(cmd, &a->threads);
  cmd->add_option("-p,--prompt-tokens", a->p, "Prompt tokens for the prefill test (0 = skip)")
      ->capture_default_str()
      ->check(integer_in(0, INT_MAX, "0 (skip) or a token count up to 2147483647"));
  cmd->add_option("-n,--gen-tokens", a->n, "Tokens decoded per decode test")
      ->capture_default_str()
      ->check(integer_in(1, INT_MAX, "a token count from 1 to 2147483647"));
  cmd->add_option("-r,--repetitions", a->r, "Timed repetitions of each test")
      ->capture_default_str()
      ->check(integer_in(1, 1000000, "a count from 1 to 1000000"));
  cmd->add_option("--depth", a->depths, "Comma-separated cache depths for the decode tests")->capture_default_str();
  cmd->add_option("--bandwidth", a->bandwidth_tbs, "Memory bandwidth for the roofline, TB/s (H100 SXM: 3.35)")
      ->capture_default_str()
      ->check(real_in(0, 1000, /*lo_open=*/true));
  cmd->add_flag("--no-graph", a->no_graph,
                "Decode eagerly instead of replaying CUDA graphs (the tg test, and the engine's decode steps for "
                "--concurrency)");
  cmd->add_option("--concurrency", a->concurrency,
                  "Comma-separated request counts: run that many requests at once through the engine (prompts of "
                  "-p/2..-p tokens, -n new tokens each) and report output tok/s, per-stream tok/s, TTFT and "
                  "inter-token latency");
  cmd->add_option("--prefix-sharing", a->prefix_sharing,
                  "Prefix length N: time to first token of a request whose first N tokens another request left in "
                  "the paged cache, against the same request cold (-r repeats)")
      ->check(integer_in(1, 1000000, "a prefix of 1 to 1000000 tokens"));
  cmd->add_option("--token-budget", a->token_budget,
                  "Tokens per engine step (decode tokens and prefill chunks) for --concurrency and --prefix-sharing")
      ->capture_default_str()
      ->check(integer_in(1, 1 << 20, "1 to 1048576 tokens"));
  cmd->add_option("--kv-cache", a->kv_cache, "KV cache for --concurrency and --prefix-sharing: fp16, q8 or q4 (8- or 4-bit, one scale per 32 values)")
      ->capture_default_str()
      ->check(CLI::IsMember({"fp16", "q8", "q4"}));
  cmd->add_option("--block-size", a->block_size, "KV cache block size for --concurrency and --prefix-sharing")
      ->capture_default_str()
      ->check(integer_in(1, 4096, "1 to 4096 positions"));
  add_seed_option(cmd, &a->seed, "Seed of the random weights");
  cmd->callback([run, a] { *run = [a] { return run_bench(*a); }; });
}

}  // namespace qf::app
