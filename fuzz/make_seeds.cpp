// Builds the seed corpus of one fuzz target (scripts/fuzz.sh runs it once per target):
//   - real files from ../shared/data, cut down where they are too big to mutate well (safetensors
//     tensors shrunk to a few elements, an EXL2 layer sliced to 32 output columns, GPT-2 style
//     vocabularies cut to their first few hundred tokens with the merges that stay inside them);
//   - the hand-written seeds in fuzz/seeds/<target>/ (for the safetensors targets these are header
//     JSON texts, framed here into files);
//   - the saved findings in fuzz/regressions/<target>/;
//   - generated cases too big to keep in git (JSON nested 150000 deep), written to a second
//     folder that scripts/fuzz.sh replays whole as regression inputs (libFuzzer would cut corpus
//     files down to -max_len).
// Without ../shared/data it says so and makes the rest.
//
//   fuzz_make_seeds TARGET MAX_LEN SHARED_DATA_DIR REPO_FUZZ_DIR OUT_CORPUS_DIR OUT_REPLAY_DIR
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "parquet_writer.h"  // tests/: the Parquet reader tests' writer

namespace fs = std::filesystem;
using json = nlohmann::ordered_json;

namespace {

const std::string kSep = "\n#qf-fuzz-part#\n";  // fuzz_common.h: kPartSeparator

std::string target, shared, repo_fuzz;
fs::path out_corpus, out_replay;
size_t max_len = 0;
int written = 0, skipped = 0;

std::string read_file(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void put(const fs::path& dir, const std::string& name, const std::string& bytes) {
  std::ofstream(dir / name, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

// A generated regression input: replayed whole, never mutated.
void replay(const std::string& name, const std::string& bytes) { put(out_replay, name, bytes); }

// A corpus seed; one over the target's -max_len is replayed whole instead.
void seed(const std::string& name, const std::string& bytes) {
  if (bytes.size() > max_len) {
    std::printf("  %s: %zu bytes > max_len %zu: replayed, not mutated\n", name.c_str(), bytes.size(), max_len);
    replay(name, bytes);
    ++skipped;
    return;
  }
  put(out_corpus, name, bytes);
  ++written;
}

bool have_shared(const std::string& rel) { return !shared.empty() && fs::exists(fs::path(shared) / rel); }
std::string shared_file(const std::string& rel) { return read_file(fs::path(shared) / rel); }

std::string nested(size_t depth, const std::string& inner = "") {
  return std::string(depth, '[') + inner + std::string(depth, ']');
}

// ---- safetensors -------------------------------------------------------------------------------

struct Tensor {
  std::string name, dtype;
  std::vector<int64_t> shape;
  std::string data;
};

size_t dtype_size(const std::string& d) {
  if (d == "F64" || d == "I64" || d == "U64") return 8;
  if (d == "F32" || d == "I32" || d == "U32") return 4;
  if (d == "F16" || d == "BF16" || d == "I16" || d == "U16") return 2;
  return 1;
}

// The tensors of a safetensors file (and its __metadata__), in header order.
std::vector<Tensor> read_safetensors(const std::string& bytes, json* metadata = nullptr) {
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(bytes[static_cast<size_t>(i)]);
  const json h = json::parse(bytes.substr(8, n));
  std::vector<Tensor> out;
  for (auto it = h.begin(); it != h.end(); ++it) {
    if (it.key() == "__metadata__") {
      if (metadata) *metadata = it.value();
      continue;
    }
    Tensor t{it.key(), it.value()["dtype"], it.value()["shape"].get<std::vector<int64_t>>(), {}};
    const uint64_t b = it.value()["data_offsets"][0], e = it.value()["data_offsets"][1];
    t.data = bytes.substr(8 + n + b, e - b);
    out.push_back(std::move(t));
  }
  return out;
}

std::string write_safetensors(const std::vector<Tensor>& ts, const json& metadata = nullptr) {
  json h = json::object();
  if (!metadata.is_null()) h["__metadata__"] = metadata;
  uint64_t off = 0;
  std::string data;
  for (const auto& t : ts) {
    h[t.name] = {{"dtype", t.dtype}, {"shape", t.shape}, {"data_offsets", {off, off + t.data.size()}}};
    off += t.data.size();
    data += t.data;
  }
  std::string hs = h.dump();
  while ((hs.size() + 8) % 8) hs.push_back(' ');
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[static_cast<size_t>(i)] = static_cast<char>(hs.size() >> (8 * i));
  return out + hs + data;
}

// Every tensor cut to at most 4 elements per dimension (the data: the first bytes of the real one).
std::vector<Tensor> shrink(std::vector<Tensor> ts, size_t max_tensors = SIZE_MAX) {
  if (ts.size() > max_tensors) ts.resize(max_tensors);
  for (auto& t : ts) {
    uint64_t numel = 1;
    for (auto& d : t.shape) numel *= static_cast<uint64_t>(d = std::min<int64_t>(d, 4));
    t.data.resize(numel * dtype_size(t.dtype));
  }
  return ts;
}

// A header JSON text framed into a file: length, header, zero bytes up to the largest offset.
std::string frame_header(const std::string& header) {
  uint64_t end = 0;
  const json h = json::parse(header, nullptr, false);
  if (h.is_object())
    for (const auto& [k, v] : h.items())
      if (v.is_object() && v.contains("data_offsets") && v["data_offsets"].is_array() && v["data_offsets"].size() == 2 &&
          v["data_offsets"][1].is_number_unsigned())
        end = std::max<uint64_t>(end, v["data_offsets"][1]);
  end = std::min<uint64_t>(end, 1 << 20);
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[static_cast<size_t>(i)] = static_cast<char>(header.size() >> (8 * i));
  return out + header + std::string(end, '\0');
}

// A folder seed written as text: the parts after the index that are header JSON are framed.
std::string frame_shards(const std::string& text) {
  std::string out;
  size_t pos = 0;
  for (int part = 0;; ++part) {
    const size_t at = text.find(kSep, pos);
    std::string p = text.substr(pos, at == std::string::npos ? std::string::npos : at - pos);
    if (part > 0 && !p.empty() && p[0] == '{') p = frame_header(p);
    out += (part > 0 ? kSep : "") + p;
    if (at == std::string::npos) return out;
    pos = at + kSep.size();
  }
}

// The vocabulary with its ids renumbered 0..n-1 in id order: cut-down files keep their original,
// sparse ids (up to 128000), and every load of such a seed would fill a table that long.
json dense_ids(const json& vocab) {
  std::vector<std::pair<int64_t, std::string>> by_id;
  for (const auto& [tok, id] : vocab.items())
    if (id.is_number_integer()) by_id.emplace_back(id.get<int64_t>(), tok);
  std::sort(by_id.begin(), by_id.end());
  json out = json::object();
  for (size_t i = 0; i < by_id.size(); ++i) out[by_id[i].second] = i;
  return out;
}

// ---- per target --------------------------------------------------------------------------------

void config_json() {
  for (const char* m : {"stories260K-hf", "testmodel-llama-20m", "testmodel-llama-20m-exl2-4.0bpw"}) {
    const std::string dir = std::string("models/") + m;
    if (!have_shared(dir + "/config.json")) continue;
    const std::string c = shared_file(dir + "/config.json");
    seed(std::string(m) + ".json", c);
    if (have_shared(dir + "/generation_config.json"))
      seed(std::string(m) + "+generation.json", c + kSep + shared_file(dir + "/generation_config.json"));
  }
  // Nesting deep enough to overflow a recursive walk or copy of the document.
  const std::string base = R"({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
 "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 32, )";
  for (const char* field : {"rope_scaling", "eos_token_id", "quantization_config"}) {
    replay(std::string("nested-150000-") + field + ".json", base + "\"" + field + "\": " + nested(150000) + "}");
    seed(std::string("nested-") + field + ".json", base + "\"" + field + "\": " + nested(500) + "}");
  }
}

void safetensors_file() {
  for (const char* f : {"models/stories260K-hf/model.safetensors", "models/testmodel-llama-20m/model-00003-of-00003.safetensors",
                        "models/testmodel-llama-20m-exl2-4.0bpw/output.safetensors"}) {
    if (!have_shared(f)) continue;
    json meta;
    const auto ts = read_safetensors(shared_file(f), &meta);
    seed(fs::path(f).parent_path().filename().string() + "-" + fs::path(f).stem().string() + ".safetensors",
         write_safetensors(shrink(ts, 40), meta));
  }
  replay("nested-150000-header.safetensors", frame_header(R"({"a": )" + nested(150000) + "}"));
  replay("nested-150000-metadata.safetensors", frame_header(R"({"__metadata__": {"format": )" + nested(150000) + "}}"));
  seed("nested-header.safetensors", frame_header(R"({"a": )" + nested(500) + "}"));
}

void safetensors_dir() {
  const std::string m = "models/testmodel-llama-20m/";
  if (have_shared(m + "model.safetensors.index.json")) {
    std::string all = shared_file(m + "model.safetensors.index.json");
    for (int k = 1; k <= 3; ++k) {
      json meta;
      const std::string shard = m + "model-0000" + std::to_string(k) + "-of-00003.safetensors";
      all += kSep + write_safetensors(shrink(read_safetensors(shared_file(shard), &meta)), meta);
    }
    seed("llama-20m-sharded", all);
  }
  const std::string e = "models/testmodel-llama-20m-exl2-4.0bpw/";
  if (have_shared(e + "model.safetensors.index.json"))  // the stale FP16 index EXL2 uploads carry
    seed("exl2-stale-index", shared_file(e + "model.safetensors.index.json") + kSep +
                                 write_safetensors(shrink(read_safetensors(shared_file(e + "output.safetensors")), 30)));
  if (have_shared("models/stories260K-hf/model.safetensors"))  // one file, no index
    seed("stories260K-no-index", kSep + write_safetensors(shrink(read_safetensors(shared_file("models/stories260K-hf/model.safetensors")))));
  const std::string shard = write_safetensors({{"a.weight", "F16", {2}, std::string(4, '\0')}});
  replay("nested-150000-index", R"({"metadata": {}, "weight_map": {"a.weight": )" + nested(150000) + "}}" + kSep + shard);
  seed("nested-index", R"({"weight_map": )" + nested(500) + "}" + kSep + shard);
}

// A small tokenizer.json of our own (the nesting cases must not depend on ../shared).
const char* kSmallTokenizer = R"({"version": "1.0", "added_tokens": [{"id": 0, "content": "<unk>", "special": true}],
 "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": null,
 "model": {"type": "BPE", "unk_token": "<unk>", "vocab": {"<unk>": 0, "a": 1, "b": 2, "ab": 3}, "merges": ["a b"]}})";

void tokenizer_json() {
  for (const char* m : {"models/stories260K-hf/"}) {
    if (!have_shared(std::string(m) + "tokenizer.json")) continue;
    const std::string t = shared_file(std::string(m) + "tokenizer.json");
    seed("stories260K.json", t);
    seed("stories260K+config.json", t + kSep + shared_file(std::string(m) + "tokenizer_config.json"));
  }
  if (have_shared("tokenizers/llama3.2-bpe/mini_llama_tokenizer.json")) {
    json mini = json::parse(shared_file("tokenizers/llama3.2-bpe/mini_llama_tokenizer.json"));
    mini["model"]["vocab"] = dense_ids(mini["model"]["vocab"]);  // its added tokens stay at 128000+
    const std::string t = mini.dump(1);
    seed("mini-llama3.json", t);
    if (have_shared("tokenizers/qwen2-bpe/tokenizer_config.json"))
      seed("mini-llama3+qwen2-config.json", t + kSep + shared_file("tokenizers/qwen2-bpe/tokenizer_config.json"));
  }
  // Each field the loader walks, nested 150000 deep (replayed) and 500 deep (a corpus seed).
  const json small = json::parse(kSmallTokenizer);
  const std::string marker = "\"@NESTED@\"";
  auto with = [&](const std::function<void(json&)>& place) {
    json j = small;
    place(j);
    return j.dump();
  };
  const std::map<std::string, std::function<void(json&)>> fields = {
      {"normalizer", [](json& j) { j["normalizer"] = "@NESTED@"; }},
      {"pre_tokenizer", [](json& j) { j["pre_tokenizer"] = "@NESTED@"; }},
      {"decoder", [](json& j) { j["decoder"] = "@NESTED@"; }},
      {"post_processor", [](json& j) { j["post_processor"] = "@NESTED@"; }},
      {"merge", [](json& j) { j["model"]["merges"].push_back("@NESTED@"); }},
      {"vocab-id", [](json& j) { j["model"]["vocab"]["c"] = "@NESTED@"; }},
      {"added-token", [](json& j) { j["added_tokens"].push_back("@NESTED@"); }},
      {"normalizer-sequence", [](json& j) { j["normalizer"] = {{"type", "Sequence"}, {"normalizers", "@NESTED@"}}; }},
      {"template-special-tokens",
       [](json& j) {
         j["post_processor"] = {{"type", "TemplateProcessing"}, {"single", json::array()}, {"special_tokens", "@NESTED@"}};
       }},
  };
  for (const auto& [name, place] : fields) {
    std::string t = with(place);
    const size_t at = t.find(marker);
    replay("nested-150000-" + name + ".json", t.substr(0, at) + nested(150000) + t.substr(at + marker.size()));
    seed("nested-" + name + ".json", t.substr(0, at) + nested(500) + t.substr(at + marker.size()));
  }
  // Sequences of sequences: a recursive parse of the pipeline.
  std::string seq_n, seq_p, seq_d, close;
  for (int i = 0; i < 50000; ++i) {
    seq_n += R"({"type": "Sequence", "normalizers": [)";
    seq_p += R"({"type": "Sequence", "pretokenizers": [)";
    seq_d += R"({"type": "Sequence", "decoders": [)";
    close += "]}";
  }
  const std::string t = small.dump();
  auto put_field = [&](const std::string& field, const std::string& value) {
    const std::string key = "\"" + field + "\":null";
    const size_t at = t.find(key);
    return t.substr(0, at) + "\"" + field + "\":" + value + t.substr(at + key.size());
  };
  replay("sequence-50000-normalizer.json", put_field("normalizer", seq_n + close));
  replay("sequence-50000-pre_tokenizer.json", put_field("pre_tokenizer", seq_p + close));
  replay("sequence-50000-decoder.json", put_field("decoder", seq_d + close));
  // Empty vocabulary; a vocabulary id of 6e7 (a 60M-entry table from a 100-byte file).
  seed("empty-vocab.json", R"({"model": {"type": "BPE", "vocab": {}, "merges": []}})");
  seed("vocab-id-6e7.json", R"({"model": {"type": "BPE", "vocab": {"a": 60000000}, "merges": []}})");
}

// The first `n` ids of a GPT-2 style vocab.json and the merges (merges.txt lines, or tokenizer.json
// pairs) whose parts and result stay inside them.
std::pair<std::string, std::string> cut_vocab(const json& vocab, const std::vector<std::pair<std::string, std::string>>& merges, int n) {
  json v = json::object();
  std::set<std::string> kept;
  for (const auto& [tok, id] : vocab.items())
    if (id.is_number_integer() && id.get<int>() < n) v[tok] = id, kept.insert(tok);
  v = dense_ids(v);
  std::string m = "#version: 0.2\n";
  for (const auto& [a, b] : merges)
    if (kept.count(a) && kept.count(b) && kept.count(a + b)) m += a + " " + b + "\n";
  return {v.dump(), m};
}

std::vector<std::pair<std::string, std::string>> merges_txt(const std::string& text) {
  std::vector<std::pair<std::string, std::string>> out;
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    const size_t sp = line.find(' ');
    if (sp != std::string::npos && !line.starts_with("#version")) out.emplace_back(line.substr(0, sp), line.substr(sp + 1));
  }
  return out;
}

void vocab_merges() {
  if (have_shared("tokenizers/qwen2-bpe/vocab.json")) {
    const auto [v, m] = cut_vocab(json::parse(shared_file("tokenizers/qwen2-bpe/vocab.json")),
                                  merges_txt(shared_file("tokenizers/qwen2-bpe/merges.txt")), 400);
    seed("qwen2-400", v + kSep + m);
    seed("qwen2-400+config", v + kSep + m + kSep + shared_file("tokenizers/qwen2-bpe/tokenizer_config.json"));
  }
  if (have_shared("tokenizers/llama3.2-bpe/encoder.json")) {
    const auto [v, m] = cut_vocab(json::parse(shared_file("tokenizers/llama3.2-bpe/encoder.json")),
                                  merges_txt(shared_file("tokenizers/llama3.2-bpe/vocab.bpe")), 400);
    seed("llama3-400", v + kSep + m);
  }
  if (have_shared("tokenizers/llama3.2-bpe/mini_llama_tokenizer.json")) {
    const json t = json::parse(shared_file("tokenizers/llama3.2-bpe/mini_llama_tokenizer.json"));
    std::vector<std::pair<std::string, std::string>> merges;
    for (const auto& e : t["model"]["merges"]) {
      const std::string s = e.is_string() ? e.get<std::string>() : e[0].get<std::string>() + " " + e[1].get<std::string>();
      merges.emplace_back(s.substr(0, s.find(' ')), s.substr(s.find(' ') + 1));
    }
    const auto [v, m] = cut_vocab(t["model"]["vocab"], merges, 1 << 30);
    seed("mini-llama3", v + kSep + m);
  }
  replay("nested-150000-vocab", R"({"a": )" + nested(150000) + "}" + kSep + "");
  seed("nested-vocab", R"({"a": )" + nested(500) + "}" + kSep + "");
  seed("vocab-id-6e7", R"({"a": 60000000, "b": 1})" + kSep + "");
  seed("empty-vocab", std::string("{}") + kSep + "");
}

void tokenizer_config() {
  for (const char* f : {"models/stories260K-hf/tokenizer_config.json", "tokenizers/qwen2-bpe/tokenizer_config.json"})
    if (have_shared(f)) seed(fs::path(f).parent_path().filename().string() + ".json", shared_file(f));
  for (const char* field : {"bos_token", "added_tokens_decoder", "chat_template", "additional_special_tokens"}) {
    replay(std::string("nested-150000-") + field + ".json", std::string("{\"") + field + "\": " + nested(150000) + "}");
    seed(std::string("nested-") + field + ".json", std::string("{\"") + field + "\": " + nested(500) + "}");
  }
}

// A GPTQ layer of K=64 inputs, N=32 outputs: symmetric v1 zeros, scales 0.01, group size 32 (or
// act-order), codes from the data part. The spec format is fuzz_quant_layer.cpp's.
std::string gptq_seed(int bits, bool act_order, const std::string& qcfg) {
  const int K = 64, N = 32, G = 2;
  // v1 stores zero - 1; every code of the stream is 2^(bits-1) - 1.
  std::vector<uint32_t> zrow((N * bits + 31) / 32, 0);
  for (int n = 0; n < N; ++n)
    for (int b = 0; b < bits; ++b)
      if (((1u << (bits - 1)) - 1) >> b & 1) zrow[static_cast<size_t>((n * bits + b) / 32)] |= 1u << ((n * bits + b) % 32);
  json zeros = json::array(), gidx = json::array();
  for (uint32_t w : zrow) zeros.push_back(static_cast<int64_t>(static_cast<int32_t>(w)));
  for (int k = 0; k < K; ++k) gidx.push_back(act_order ? (k * 7 % K) % G : k / 32);
  json spec = {{"quantization_config", json::parse(qcfg)}, {"in", K}, {"out", N},
               {"tensors",
                {{"qweight", {{"dtype", "I32"}, {"shape", {K * bits / 32, N}}}},
                 {"qzeros", {{"dtype", "I32"}, {"shape", {G, zrow.size()}}, {"values", zeros}}},
                 {"scales", {{"dtype", "F16"}, {"shape", {G, N}}, {"values", {0.01, 0.02}}}},
                 {"g_idx", {{"dtype", "I32"}, {"shape", {K}}, {"values", gidx}}}}}};
  std::mt19937 rng(static_cast<uint32_t>(bits * 2 + act_order));
  std::string data(static_cast<size_t>(K * bits / 32 * N * 4), '\0');
  for (auto& c : data) c = static_cast<char>(rng());
  return spec.dump(1) + kSep + data;
}

void quant_layer() {
  const std::string e = "models/testmodel-llama-20m-exl2-4.0bpw/";
  if (have_shared(e + "output.safetensors")) {
    const auto ts = read_safetensors(shared_file(e + "output.safetensors"));
    const json qcfg = json::parse(shared_file(e + "config.json"))["quantization_config"];
    for (const char* layer : {"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.5.self_attn.v_proj"}) {
      // Sliced to the first 32 output columns: q_weight [P, 32], q_scale [G, 4]; the rest whole.
      std::map<std::string, const Tensor*> parts;
      for (const auto& t : ts)
        if (t.name.starts_with(std::string(layer) + ".")) parts[t.name.substr(std::strlen(layer) + 1)] = &t;
      if (!parts.count("q_weight") || !parts.count("q_invperm")) continue;
      json tensors = json::object();
      std::string data;
      for (const auto& [suffix, t] : parts) {  // name order, as the harness reads the data part
        std::vector<int64_t> shape = t->shape;
        std::string bytes = t->data;
        const int64_t cols = suffix == "q_weight" ? 32 : suffix == "q_scale" ? 4 : 0;
        if (cols) {
          const size_t row = static_cast<size_t>(shape[1]) * 4;
          std::string cut;
          for (int64_t r = 0; r < shape[0]; ++r) cut += bytes.substr(static_cast<size_t>(r) * row, static_cast<size_t>(cols) * 4);
          bytes = cut;
          shape[1] = cols;
        }
        tensors[suffix] = {{"dtype", t->dtype}, {"shape", shape}};
        data += bytes;
      }
      const json spec = {{"quantization_config", qcfg}, {"in", parts["q_invperm"]->shape[0]}, {"out", 32}, {"tensors", tensors}};
      seed(std::string("exl2-") + layer, spec.dump(1) + kSep + data);
    }
  }
  for (int bits : {2, 3, 4, 8}) {
    seed("gptq-" + std::to_string(bits) + "bit", gptq_seed(bits, false, R"({"quant_method": "gptq", "bits": )" + std::to_string(bits) + "}"));
    seed("gptq-" + std::to_string(bits) + "bit-actorder",
         gptq_seed(bits, true, R"({"quant_method": "gptq", "desc_act": true, "checkpoint_format": "gptq_v2"})"));
  }
  // The issue's cases on a valid 4-bit layer: fractional and absurd bits in the config.
  seed("gptq-bits-4.7", gptq_seed(4, false, R"({"quant_method": "gptq", "bits": 4.7})"));
  seed("gptq-bits-1e30", gptq_seed(4, false, R"({"quant_method": "gptq", "bits": 1e30})"));
}

void parquet() {
  // Every layout the tests' writer makes: codecs, dictionaries, page v2, nulls, several pages.
  const std::vector<std::optional<std::string>> rows = {"Once upon a time", "", std::nullopt, "\xc3\xa9t\xc3\xa9",
                                                        "the end", std::nullopt, "Once upon a time"};
  struct Variant { const char* name; qf::test::ParquetWriteOptions o; };
  std::vector<Variant> variants;
  auto add = [&](const char* name, auto set) {
    qf::test::ParquetWriteOptions o;
    o.optional = true;
    o.rows_per_page = 3;
    set(o);
    variants.push_back({name, o});
  };
  add("plain", [](auto&) {});
  add("required", [](auto& o) { o.optional = false; });
  add("snappy-dict", [](auto& o) { o.codec = 1, o.dictionary = true; });
  add("gzip-legacy-dict", [](auto& o) { o.codec = 2, o.dictionary = o.legacy_dictionary = true; });
  add("zstd-v2", [](auto& o) { o.codec = 6, o.page_v2 = true; });
  add("v2-uncompressed-dict", [](auto& o) { o.page_v2 = o.v2_uncompressed = o.dictionary = true; });
  add("bit-packed-levels", [](auto& o) { o.bit_packed_levels = true; });
  add("row-groups", [](auto& o) { o.rows_per_group = 2, o.dictionary = true, o.dictionary_pages = 1; });
  for (auto& v : variants) {
    auto r = rows;
    if (!v.o.optional)
      for (auto& x : r) if (!x) x = "null";
    seed(std::string("writer-") + v.name + ".parquet", qf::test::write_parquet(r, v.o));
  }
  const fs::path dir = fs::path(shared) / "parquet";
  if (shared.empty() || !fs::is_directory(dir)) return;
  std::vector<fs::path> files;
  for (const auto& e : fs::recursive_directory_iterator(dir))
    if (e.path().extension() == ".parquet") files.push_back(e.path());
  std::sort(files.begin(), files.end());
  for (const auto& f : files) seed(f.filename().string(), read_file(f));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 7) {
    std::fprintf(stderr, "usage: %s TARGET MAX_LEN SHARED_DATA_DIR REPO_FUZZ_DIR OUT_CORPUS_DIR OUT_REPLAY_DIR\n", argv[0]);
    return 2;
  }
  target = argv[1];
  max_len = std::stoul(argv[2]);
  shared = argv[3];
  repo_fuzz = argv[4];
  out_corpus = argv[5];
  out_replay = argv[6];
  fs::create_directories(out_corpus);
  fs::create_directories(out_replay);
  if (!fs::is_directory(shared)) {
    std::printf("  %s: no shared data at %s: seeds from fuzz/seeds and generated cases only\n", target.c_str(), shared.c_str());
    shared.clear();
  }
  const std::map<std::string, void (*)()> makers = {
      {"config_json", config_json},   {"safetensors_file", safetensors_file}, {"safetensors_dir", safetensors_dir},
      {"tokenizer_json", tokenizer_json}, {"tokenizer_config", tokenizer_config}, {"vocab_merges", vocab_merges},
      {"quant_layer", quant_layer},   {"parquet", parquet}};
  auto it = makers.find(target);
  if (it == makers.end()) {
    std::fprintf(stderr, "unknown target '%s'\n", target.c_str());
    return 2;
  }
  it->second();
  // Hand-written seeds (header JSON texts for the single-file safetensors target, framed here)
  // and saved findings.
  for (const char* sub : {"seeds", "regressions"}) {
    const fs::path d = fs::path(repo_fuzz) / sub / target;
    if (!fs::is_directory(d)) continue;
    for (const auto& e : fs::directory_iterator(d)) {
      const std::string name = std::string(sub) + "-" + e.path().filename().string();
      std::string bytes = read_file(e.path());
      if (std::string(sub) == "seeds" && target == "safetensors_file" && e.path().extension() == ".json")
        bytes = frame_header(bytes);
      if (std::string(sub) == "seeds" && target == "safetensors_dir") bytes = frame_shards(bytes);
      seed(name, bytes);
    }
  }
  std::printf("  %s: %d seeds (and %d too long to mutate)\n", target.c_str(), written, skipped);
  return 0;
}
