// make_random_model: writes a Hugging Face Llama folder of a real model's shape (Llama-2-7B,
// Llama-3-8B, Llama-2-70B, or a tiny one for tests) filled with random FP16 weights, so converters
// and loaders can be benchmarked at full size without downloading 13-140 GB of weights.
//
//   make_random_model --shape llama2-7b --out DIR [--tokenizer-from HF_DIR] [--seed S]
//
// Weights: linear layers approximately normal with std 1/sqrt(fan_in), so every projection keeps
// its input's scale and activations stay finite through all the layers; RMSNorm weights 1. Values
// come from a counter-based generator (splitmix64 of seed, tensor name and element index), so they
// depend only on the seed: not on the thread count, the shard size or the order of writing.
// Files are written like transformers' save_pretrained (model-0000X-of-0000Y.safetensors of at most
// --max-shard-mb each, plus model.safetensors.index.json; one model.safetensors when it fits),
// into a staging folder that is renamed to DIR at the end: DIR never holds half a model.
#include <CLI/CLI.hpp>

#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <future>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>
#if defined(__F16C__)
#include <immintrin.h>
#endif

#include "core/atomic_file.h"
#include "core/dtype.h"
#include "core/error.h"
#include "core/progress.h"
#include "core/thread_pool.h"
#include "tokenizer/tokenizer.h"

namespace qf {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

struct Shape {
  const char* name;
  int64_t hidden, intermediate, layers, heads, kv_heads, vocab;
  double rope_theta;
  int64_t max_position, bos, eos;
};
// The published configs of these models. tiny (~6 MB) is for tests; its sizes are multiples of
// 128 so that EXL2/GPTQ groups fit it as they fit the real shapes.
constexpr Shape kShapes[] = {
    {"llama2-7b", 4096, 11008, 32, 32, 32, 32000, 10000.0, 4096, 1, 2},
    {"llama3-8b", 4096, 14336, 32, 32, 8, 128256, 500000.0, 8192, 128000, 128001},
    {"llama2-70b", 8192, 28672, 80, 64, 8, 32000, 10000.0, 4096, 1, 2},
    {"tiny", 256, 512, 4, 4, 2, 1024, 10000.0, 2048, 1, 2},
};

// The head's std is this many times 1/sqrt(hidden): logits of std ~3 give next-token
// distributions about as peaked as a trained model's (entropy ~6 nats over 32K tokens, not ~10).
constexpr float kHeadGain = 3.0f;
constexpr uint16_t kFp16One = 0x3C00;
constexpr uint64_t kGolden = 0x9e3779b97f4a7c15ULL;

uint64_t mix64(uint64_t z) {  // splitmix64's finalizer
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// About standard normal from 64 random bits: the sum of four 16-bit uniforms (Irwin-Hall),
// centred and scaled to unit variance. Tails stop at +-3.46, which real weights rarely pass.
inline float normal_from_bits(uint64_t r) {
  const uint32_t s = static_cast<uint32_t>((r & 0xffff) + ((r >> 16) & 0xffff) + ((r >> 32) & 0xffff) + (r >> 48));
  return (static_cast<float>(s) - 131070.0f) * (1.0f / 37837.23f);
}

struct TensorPlan {
  std::string name;
  std::vector<int64_t> shape;
  float std = 0;  // 0: all ones (norm weights)
  uint64_t seed = 0;

  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
  uint64_t bytes() const { return static_cast<uint64_t>(numel()) * 2; }
};

// Elements [begin, begin + n) of a tensor, as fp16.
void fill_fp16(const TensorPlan& t, int64_t begin, int64_t n, uint16_t* out) {
  if (t.std == 0) {
    std::fill(out, out + n, kFp16One);
    return;
  }
  const uint64_t base = t.seed + static_cast<uint64_t>(begin + 1) * kGolden;
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= n; i += 8) {
    alignas(32) float f[8];
    for (int k = 0; k < 8; ++k) f[k] = t.std * normal_from_bits(mix64(base + static_cast<uint64_t>(i + k) * kGolden));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), _mm256_cvtps_ph(_mm256_load_ps(f), _MM_FROUND_TO_NEAREST_INT));
  }
#endif
  for (; i < n; ++i) out[i] = f32_to_fp16(t.std * normal_from_bits(mix64(base + static_cast<uint64_t>(i) * kGolden)));
}

uint64_t name_seed(uint64_t seed, const std::string& name) {
  uint64_t h = 0xcbf29ce484222325ULL;  // FNV-1a
  for (unsigned char c : name) h = (h ^ c) * 0x100000001b3ULL;
  return mix64(seed * kGolden ^ h);
}

std::vector<TensorPlan> plan_tensors(const Shape& s, uint64_t seed) {
  const int64_t H = s.hidden, I = s.intermediate, q_dim = s.hidden, kv_dim = s.hidden / s.heads * s.kv_heads;
  const auto inv_sqrt = [](int64_t n) { return 1.0f / std::sqrt(static_cast<float>(n)); };
  std::vector<TensorPlan> t;
  t.push_back({"model.embed_tokens.weight", {s.vocab, H}, 1.0f});
  for (int64_t l = 0; l < s.layers; ++l) {
    const std::string p = "model.layers." + std::to_string(l) + ".";
    t.push_back({p + "input_layernorm.weight", {H}, 0.f});
    t.push_back({p + "self_attn.q_proj.weight", {q_dim, H}, inv_sqrt(H)});
    t.push_back({p + "self_attn.k_proj.weight", {kv_dim, H}, inv_sqrt(H)});
    t.push_back({p + "self_attn.v_proj.weight", {kv_dim, H}, inv_sqrt(H)});
    t.push_back({p + "self_attn.o_proj.weight", {H, q_dim}, inv_sqrt(q_dim)});
    t.push_back({p + "post_attention_layernorm.weight", {H}, 0.f});
    t.push_back({p + "mlp.gate_proj.weight", {I, H}, inv_sqrt(H)});
    t.push_back({p + "mlp.up_proj.weight", {I, H}, inv_sqrt(H)});
    t.push_back({p + "mlp.down_proj.weight", {H, I}, inv_sqrt(I)});
  }
  t.push_back({"model.norm.weight", {H}, 0.f});
  t.push_back({"lm_head.weight", {s.vocab, H}, kHeadGain * inv_sqrt(H)});
  for (auto& x : t) x.seed = name_seed(seed, x.name);
  return t;
}

// Consecutive tensors, each shard as large as fits under max_bytes (a larger tensor alone), the
// way transformers shards.
std::vector<std::vector<const TensorPlan*>> split_shards(const std::vector<TensorPlan>& tensors, uint64_t max_bytes) {
  std::vector<std::vector<const TensorPlan*>> shards(1);
  uint64_t size = 0;
  for (const auto& t : tensors) {
    if (!shards.back().empty() && size + t.bytes() > max_bytes) {
      shards.emplace_back();
      size = 0;
    }
    shards.back().push_back(&t);
    size += t.bytes();
  }
  return shards;
}

std::string shard_name(size_t i, size_t n) {
  if (n == 1) return "model.safetensors";
  char buf[64];
  std::snprintf(buf, sizeof buf, "model-%05zu-of-%05zu.safetensors", i + 1, n);
  return buf;
}

// Generates chunk after chunk on the thread pool while the previous chunk is written on another
// thread: generation and the disk overlap, and memory stays at two chunks.
class ChunkPipeline {
 public:
  static constexpr int64_t kChunk = int64_t{32} << 20;  // elements (64 MB of fp16)

  explicit ChunkPipeline(Progress& progress) : progress_(progress) {
    for (auto& b : bufs_) b.resize(static_cast<size_t>(kChunk));
  }

  void write_tensor(AtomicFile& file, const TensorPlan& t) {
    for (int64_t begin = 0; begin < t.numel(); begin += kChunk) {
      const int64_t n = std::min(kChunk, t.numel() - begin);
      uint16_t* buf = bufs_[next_].data();
      next_ ^= 1;
      // The write in flight (if any) reads the other buffer.
      ThreadPool::global().parallel_for(n, 1 << 16, [&](int64_t a, int64_t b) { fill_fp16(t, begin + a, b - a, buf + a); });
      drain();  // rethrows a failed write (e.g. a full disk)
      pending_ = std::async(std::launch::async, [&file, buf, n] { file.write(buf, static_cast<size_t>(n) * 2); });
      done_bytes_ += static_cast<uint64_t>(n) * 2;
      progress_.update(static_cast<int64_t>(done_bytes_ >> 20));
    }
  }

  void drain() {
    if (pending_.valid()) pending_.get();
  }

 private:
  Progress& progress_;
  std::array<std::vector<uint16_t>, 2> bufs_;
  int next_ = 0;
  std::future<void> pending_;
  uint64_t done_bytes_ = 0;
};

void write_shard(const fs::path& path, const std::vector<const TensorPlan*>& tensors, ChunkPipeline& pipe) {
  json header = json::object();
  header["__metadata__"] = {{"format", "pt"}};  // transformers refuses files without it
  uint64_t offset = 0;
  for (const TensorPlan* t : tensors) {
    header[t->name] = {{"dtype", "F16"}, {"shape", t->shape}, {"data_offsets", {offset, offset + t->bytes()}}};
    offset += t->bytes();
  }
  std::string h = header.dump();
  while (h.size() % 8) h.push_back(' ');  // the data section starts 8-byte aligned
  AtomicFile file(path);
  {
    unsigned char len[8];
    for (int i = 0; i < 8; ++i) len[i] = static_cast<unsigned char>(static_cast<uint64_t>(h.size()) >> (8 * i));
    file.write(len, 8);
    file.write(h);
    // Declared after `file`: should a chunk fail, the write in flight ends before the file closes.
    struct Drain {
      ChunkPipeline& p;
      ~Drain() {
        try {
          p.drain();
        } catch (...) {
        }
      }
    } drain_on_error{pipe};
    for (const TensorPlan* t : tensors) pipe.write_tensor(file, *t);
    pipe.drain();
  }
  file.commit();
}

json config_json(const Shape& s, int64_t vocab) {
  // transformers 4's layout, as the real checkpoints of these models have it.
  return {{"architectures", {"LlamaForCausalLM"}},
          {"model_type", "llama"},
          {"hidden_size", s.hidden},
          {"intermediate_size", s.intermediate},
          {"num_hidden_layers", s.layers},
          {"num_attention_heads", s.heads},
          {"num_key_value_heads", s.kv_heads},
          {"vocab_size", vocab},
          {"max_position_embeddings", s.max_position},
          {"rms_norm_eps", 1e-5},
          {"rope_theta", s.rope_theta},
          {"rope_scaling", nullptr},
          {"hidden_act", "silu"},
          {"attention_bias", false},
          {"mlp_bias", false},
          {"tie_word_embeddings", false},
          {"bos_token_id", s.bos},
          {"eos_token_id", s.eos},
          {"initializer_range", 0.02},
          {"torch_dtype", "float16"},
          {"use_cache", true}};
}

// Tokenizer files of a Hugging Face folder, whichever kinds it has.
std::vector<fs::path> tokenizer_files(const fs::path& dir) {
  std::vector<fs::path> files;
  for (const char* name : {"tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                           "added_tokens.json", "vocab.json", "merges.txt"})
    if (fs::is_regular_file(dir / name)) files.push_back(dir / name);
  return files;
}

std::string read_bytes(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  if (!in) fail(p.string(), ": cannot open");
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

struct Args {
  std::string shape, out, tokenizer_from;
  uint64_t seed = 1;
  int64_t vocab = 0;
  int64_t layers = 0;
  double max_shard_mb = 4000;  // transformers writes "4GB" shards as 4e9 bytes
  int threads = 0;
  bool force = false;
};

int run(const Args& a) {
  const Shape* found = nullptr;
  for (const auto& s : kShapes)
    if (a.shape == s.name) found = &s;
  if (!found) fail("unknown --shape '", a.shape, "' (llama2-7b, llama3-8b, llama2-70b, tiny)");
  Shape shape = *found;
  if (a.vocab > 0) shape.vocab = a.vocab;
  if (a.layers < 0) fail("--layers must be positive");
  if (a.layers > 0) shape.layers = a.layers;
  if (a.max_shard_mb <= 0) fail("--max-shard-mb must be > 0");
  if (a.threads > 0) ThreadPool::set_global_threads(a.threads);

  const fs::path out = fs::absolute(a.out).lexically_normal();
  if (out.filename().empty() || out == out.root_path()) fail("--out ", a.out, ": not a folder name");
  if (fs::exists(out) && !(fs::is_directory(out) && fs::is_empty(out)) && !a.force)
    fail(out.string(), ": exists and is not empty (--force replaces it)");

  std::vector<fs::path> tok_files;
  if (!a.tokenizer_from.empty()) {
    tok_files = tokenizer_files(a.tokenizer_from);
    if (tok_files.empty()) fail(a.tokenizer_from, ": no tokenizer files (tokenizer.json, tokenizer.model, vocab.json, ...)");
    // Token ids past the embedding would make the model unusable with this tokenizer.
    const int64_t tok_vocab = Tokenizer::load(a.tokenizer_from).vocab_size();
    if (tok_vocab > shape.vocab)
      fail(a.tokenizer_from, ": the tokenizer has ", tok_vocab, " tokens but the ", shape.name, " shape has a vocabulary of ",
           shape.vocab, " (pass --vocab ", tok_vocab, ")");
  }

  // Everything goes into a staging folder beside DIR, renamed into place when complete.
  const fs::path staging = out.string() + ".partial-make_random_model";
  fs::remove_all(staging);  // left by an interrupted run
  fs::create_directories(staging);
  struct RemoveOnError {  // a failed run (e.g. a full disk) leaves nothing behind
    const fs::path& dir;
    bool done = false;
    ~RemoveOnError() {
      std::error_code ec;
      if (!done) fs::remove_all(dir, ec);
    }
  } cleanup{staging};

  const auto t0 = std::chrono::steady_clock::now();
  const std::vector<TensorPlan> tensors = plan_tensors(shape, a.seed);
  const auto shards = split_shards(tensors, static_cast<uint64_t>(a.max_shard_mb * 1e6));
  uint64_t total = 0, params = 0;
  for (const auto& t : tensors) {
    total += t.bytes();
    params += static_cast<uint64_t>(t.numel());
  }
  std::fprintf(stderr, "%s: %.1f M parameters, %.1f MB of FP16 in %zu file(s), seed %llu, %d threads\n", shape.name,
               static_cast<double>(params) / 1e6, static_cast<double>(total) / 1e6, shards.size(),
               static_cast<unsigned long long>(a.seed), ThreadPool::global().size());

  json weight_map = json::object();
  {
    Progress progress("writing weights", static_cast<int64_t>(total >> 20), "MiB");
    ChunkPipeline pipe(progress);
    for (size_t i = 0; i < shards.size(); ++i) {
      const std::string name = shard_name(i, shards.size());
      write_shard(staging / name, shards[i], pipe);
      for (const TensorPlan* t : shards[i]) weight_map[t->name] = name;
    }
    progress.finish();
  }
  if (shards.size() > 1) {
    const json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
    write_file_atomic(staging / "model.safetensors.index.json", index.dump(2) + "\n");
  }
  write_file_atomic(staging / "config.json", config_json(shape, shape.vocab).dump(2) + "\n");
  const json gen = {{"bos_token_id", shape.bos}, {"eos_token_id", shape.eos}, {"do_sample", false}};
  write_file_atomic(staging / "generation_config.json", gen.dump(2) + "\n");
  for (const auto& f : tok_files) write_file_atomic(staging / f.filename(), read_bytes(f));

  if (fs::exists(out)) fs::remove_all(out);  // empty, or --force
  fs::rename(staging, out);
  cleanup.done = true;
  sync_directory(out.parent_path());
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::fprintf(stderr, "wrote %s in %.1f s (%.0f MB/s)\n", out.string().c_str(), secs,
               secs > 0 ? static_cast<double>(total) / 1e6 / secs : 0.0);
  return 0;
}

}  // namespace
}  // namespace qf

int main(int argc, char** argv) {
  CLI::App app{"make_random_model: a Hugging Face Llama folder of a real model's shape with random FP16 weights "
               "(for convert/load benchmarks without downloads)",
               "make_random_model"};
  qf::Args a;
  app.add_option("--shape", a.shape, "llama2-7b (13.5 GB), llama3-8b (16.1 GB), llama2-70b (138 GB) or tiny (~6 MB)")
      ->required();
  app.add_option("--out", a.out, "Folder to create (must be absent or empty unless --force)")->required();
  app.add_option("--tokenizer-from", a.tokenizer_from,
                 "Copy the tokenizer files of this Hugging Face folder (its vocabulary must fit the shape's)")
      ->check(CLI::ExistingDirectory);
  app.add_option("--seed", a.seed, "Seed of the weights (same seed, same weights)")->capture_default_str();
  app.add_option("--vocab", a.vocab, "Vocabulary size instead of the shape's (e.g. to fit --tokenizer-from)");
  app.add_option("--layers", a.layers,
                 "Decoder layers instead of the shape's (timings of per-layer work scale with it)");
  app.add_option("--max-shard-mb", a.max_shard_mb, "Largest safetensors file, in MB (1e6 bytes)")->capture_default_str();
  app.add_option("-t,--threads", a.threads, "Threads generating the weights (0 = all cores)")->capture_default_str();
  app.add_flag("--force", a.force, "Replace --out if it exists");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    return qf::run(a);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "make_random_model: error: %s\n", e.what());
  }
  return 1;
}
