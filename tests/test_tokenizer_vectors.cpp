// llama.cpp's tokenizer conformance vectors (tests/test-tokenizer-0): each .inp holds inputs
// separated by "\n__ggml_vocab_test__\n", each .out line the ids HF produced (no BOS).
#include <gtest/gtest.h>

#include <fstream>
#include <sstream>

#include "core/json_file.h"
#include "test_util.h"
#include "tokenizer/tokenizer.h"

namespace {

namespace fs = std::filesystem;
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

TEST(TokenizerVectors, LlamaSpm) {
  QF_REQUIRE_DATA("models/testmodel-llama-20m/tokenizer.json");
  QF_REQUIRE_DATA("tokenizers/llama.cpp-vocab/ggml-vocab-llama-spm.gguf.out");
  EXPECT_EQ(check_vectors(spm(), "llama-spm"), 0);
}

TEST(TokenizerVectors, LlamaBpeFromVocabMerges) {
  QF_REQUIRE_DATA("tokenizers/llama3.2-bpe/encoder.json");
  const fs::path d = qf::test::data_dir() / "tokenizers/llama3.2-bpe";
  auto tok = Tokenizer::from_vocab_merges(d / "encoder.json", d / "vocab.bpe", kLlama3Pattern);
  EXPECT_EQ(check_vectors(tok, "llama-bpe"), 0);
}

TEST(TokenizerVectors, Qwen2) {
  QF_REQUIRE_DATA("tokenizers/qwen2-bpe/vocab.json");
  EXPECT_EQ(check_vectors(qwen2(), "qwen2"), 0);
  EXPECT_EQ(check_vectors(qwen2(), "deepseek-r1-qwen"), 0);
}

}  // namespace
