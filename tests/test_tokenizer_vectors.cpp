// llama.cpp's tokenizer conformance vectors (tests/test-tokenizer-0): each .inp holds inputs
// separated by "\n__ggml_vocab_test__\n", each .out line the ids HF produced (no BOS).
#include <gtest/gtest.h>

#include <chrono>
#include <fstream>
#include <sstream>

#include "core/json_file.h"
#include "test_util.h"
#include "tokenizer/tokenizer.h"

namespace {

namespace fs = std::filesystem;
using qf::json;
using qf::Tokenizer;

const char* const kLlama3Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";
const char* const kQwen2Pattern =
    R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

struct Vector {
  std::string text;
  std::vector<int32_t> ids;
};

std::vector<Vector> read_vectors(const std::string& name) {
  const fs::path dir = qf::test::data_dir() / "tokenizers/llama.cpp-vocab";
  const std::string inp = qf::read_text_file(dir / ("ggml-vocab-" + name + ".gguf.inp"));
  const std::string out = qf::read_text_file(dir / ("ggml-vocab-" + name + ".gguf.out"));
  const std::string sep = "\n__ggml_vocab_test__\n";
  std::vector<std::string> texts;
  for (size_t pos = 0;;) {
    const size_t hit = inp.find(sep, pos);
    if (hit == std::string::npos) break;  // the file ends with a separator
    texts.push_back(inp.substr(pos, hit - pos));
    pos = hit + sep.size();
  }
  std::vector<Vector> v;
  std::istringstream lines(out);
  std::string line;
  for (const auto& t : texts) {
    std::getline(lines, line);
    Vector vec{t, {}};
    std::istringstream ids(line);
    int32_t id;
    while (ids >> id) vec.ids.push_back(id);
    v.push_back(std::move(vec));
  }
  return v;
}

std::string show(const std::vector<int32_t>& ids) {
  std::string s;
  for (auto id : ids) s += std::to_string(id) + " ";
  return s;
}

// Returns the number of mismatching vectors, printing each.
int check_vectors(const Tokenizer& tok, const std::string& name) {
  const auto vecs = read_vectors(name);
  EXPECT_GT(vecs.size(), 40u);
  int bad = 0;
  for (const auto& v : vecs) {
    const auto got = tok.encode(v.text, /*add_special=*/false);
    if (got != v.ids) {
      ++bad;
      ADD_FAILURE() << name << ": input '" << v.text << "'\n  want " << show(v.ids) << "\n  got  " << show(got);
    }
  }
  return bad;
}

// Loaded once per binary: the big vocabularies cost seconds under ASan.
const Tokenizer& spm() {
  static Tokenizer t = Tokenizer::load(qf::test::data_dir() / "models/testmodel-llama-20m");
  return t;
}
const Tokenizer& qwen2() {
  static Tokenizer t = [] {
    const fs::path d = qf::test::data_dir() / "tokenizers/qwen2-bpe";
    return Tokenizer::from_vocab_merges(d / "vocab.json", d / "merges.txt", kQwen2Pattern, d / "tokenizer_config.json");
  }();
  return t;
}

// Llama 3 as its tokenizer.json has it: assembled from encoder.json + vocab.bpe and the
// pre_tokenizer/decoder of mini_llama_tokenizer.json, with ignore_merges (no vocab.json route
// can express that flag).
const Tokenizer& llama3() {
  static Tokenizer t = [] {
    const fs::path d = qf::test::data_dir() / "tokenizers/llama3.2-bpe";
    const json mini = qf::read_json_file(d / "mini_llama_tokenizer.json");
    json j;
    j["version"] = "1.0";
    j["added_tokens"] = mini.at("added_tokens");
    j["normalizer"] = nullptr;
    j["pre_tokenizer"] = mini.at("pre_tokenizer");
    j["decoder"] = mini.at("decoder");
    j["post_processor"] = {
        {"type", "TemplateProcessing"},
        {"single", json::array({{{"SpecialToken", {{"id", "<|begin_of_text|>"}, {"type_id", 0}}}},
                                {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}})},
        {"special_tokens", {{"<|begin_of_text|>", {{"id", "<|begin_of_text|>"}, {"ids", {128000}}}}}}};
    json merges = json::array();
    const std::string text = qf::read_text_file(d / "vocab.bpe");
    std::istringstream lines(text);
    std::string line;
    while (std::getline(lines, line))
      if (!line.empty()) merges.push_back(line);
    j["model"] = {{"type", "BPE"}, {"vocab", qf::read_json_file(d / "encoder.json")}, {"merges", merges},
                  {"ignore_merges", true}, {"byte_fallback", false}, {"fuse_unk", false}};
    const fs::path out = qf::test::tmp_dir("tok_llama3") / "tokenizer.json";
    std::ofstream(out, std::ios::binary) << j.dump();
    return Tokenizer::from_tokenizer_json(out);
  }();
  return t;
}

TEST(TokenizerVectors, LlamaSpm) {
  QF_REQUIRE_DATA("models/testmodel-llama-20m/tokenizer.json");
  QF_REQUIRE_DATA("tokenizers/llama.cpp-vocab/ggml-vocab-llama-spm.gguf.out");
  EXPECT_EQ(check_vectors(spm(), "llama-spm"), 0);
}

TEST(TokenizerVectors, LlamaBpe) {
  QF_REQUIRE_DATA("tokenizers/llama3.2-bpe/encoder.json");
  EXPECT_EQ(llama3().info().kind, "byte-bpe");
  EXPECT_EQ(llama3().vocab_size(), 128002);
  EXPECT_EQ(check_vectors(llama3(), "llama-bpe"), 0);
  EXPECT_EQ(llama3().encode("Hello", true), (std::vector<int32_t>{128000, 9906}));
}

// The same files through the GPT-2 route (no ignore_merges): everything matches except the one
// vector whose word " Việt" is a Llama 3 token that merges cannot build - exactly what
// ignore_merges exists for.
TEST(TokenizerVectors, LlamaBpeWithoutIgnoreMerges) {
  QF_REQUIRE_DATA("tokenizers/llama3.2-bpe/encoder.json");
  const fs::path d = qf::test::data_dir() / "tokenizers/llama3.2-bpe";
  auto tok = Tokenizer::from_vocab_merges(d / "encoder.json", d / "vocab.bpe", kLlama3Pattern);
  EXPECT_EQ(tok.info().n_merges, 280147);
  int bad = 0;
  for (const auto& v : read_vectors("llama-bpe")) {
    const auto got = tok.encode(v.text, false);
    if (v.text == "Cửa Việt") {
      EXPECT_EQ(got, (std::vector<int32_t>{34, 91163, 11655, 26298, 83}));
      continue;
    }
    bad += got != v.ids;
  }
  EXPECT_EQ(bad, 0);
}

TEST(TokenizerVectors, Qwen2) {
  QF_REQUIRE_DATA("tokenizers/qwen2-bpe/vocab.json");
  EXPECT_EQ(check_vectors(qwen2(), "qwen2"), 0);
  EXPECT_EQ(check_vectors(qwen2(), "deepseek-r1-qwen"), 0);
  const auto& t = qwen2();
  EXPECT_EQ(t.encode("<|im_start|>hello<|im_end|>"), (std::vector<int32_t>{151644, 14990, 151645}));
  EXPECT_NE(t.encode("<|im_start|>", false, /*parse_special=*/false).front(), 151644);
  EXPECT_EQ(t.info().kind, "byte-bpe");
  EXPECT_EQ(t.vocab_size(), 151646);
  EXPECT_FALSE(t.info().add_bos);
  EXPECT_FALSE(t.info().bos_id.has_value());
  EXPECT_EQ(t.info().eos_id, 151643);
  EXPECT_EQ(t.info().pad_id, 151643);
  EXPECT_TRUE(t.is_eos(151643));
  EXPECT_TRUE(t.is_eos(151645));
  EXPECT_TRUE(t.is_special(151644));
  EXPECT_EQ(t.decode({151644, 14990, 151645}), "<|im_start|>hello<|im_end|>");
  EXPECT_EQ(t.decode({151644, 14990, 151645}, true), "hello");
  // NFC: "e" + combining acute is composed before tokenizing.
  EXPECT_EQ(t.encode("caf\x65\xCC\x81", false), t.encode("caf\xC3\xA9", false));
}

// Byte-level tokenizers round-trip any text exactly.
TEST(TokenizerVectors, ByteLevelRoundTrips) {
  QF_REQUIRE_DATA("tokenizers/qwen2-bpe/vocab.json");
  QF_REQUIRE_DATA("tokenizers/llama3.2-bpe/encoder.json");
  QF_REQUIRE_DATA("text/heldout/heldout.txt");
#if defined(__SANITIZE_ADDRESS__)
  const size_t cap = 60000;
#else
  const size_t cap = 400000;
#endif
  for (const char* rel : {"text/heldout/heldout.txt", "text/tinyshakespeare/input.txt",
                          "text/war-and-peace/war-and-peace.txt"}) {
    std::string text = qf::read_text_file(qf::test::data_dir() / rel);
    if (text.size() > cap) text.resize(cap);
    for (const Tokenizer* t : {&llama3(), &qwen2()}) {
      const auto t0 = std::chrono::steady_clock::now();
      const auto ids = t->encode(text, false);
      const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
      std::printf("%s: %zu bytes -> %zu tokens in %.3f s\n", rel, text.size(), ids.size(), s);
      EXPECT_EQ(t->decode(ids), text) << rel;
    }
  }
}

TEST(TokenizerVectors, ByteLevelStreaming) {
  QF_REQUIRE_DATA("tokenizers/qwen2-bpe/vocab.json");
  QF_REQUIRE_DATA("tokenizers/llama3.2-bpe/encoder.json");
  for (const Tokenizer* t : {&llama3(), &qwen2()}) {
    for (const auto& v : read_vectors("qwen2")) {
      const auto ids = t->encode(v.text, true);
      qf::StreamDecoder sd(*t);
      std::string all;
      for (auto id : ids) {
        const std::string piece = sd.push(id);
        // Every piece must be complete UTF-8 (a 4-byte emoji spans several byte-level tokens).
        all += piece;
        size_t i = 0;
        while (i < piece.size()) {
          const auto c = static_cast<uint8_t>(piece[i]);
          const size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : 4;
          ASSERT_LE(i + n, piece.size()) << "cut-off character in a push() result";
          i += n;
        }
      }
      all += sd.flush();
      EXPECT_EQ(all, t->decode(ids, true));
      EXPECT_EQ(all, v.text);
    }
  }
}

}  // namespace
