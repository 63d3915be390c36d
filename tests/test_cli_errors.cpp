// Bad input through the CLI: one "qforge: error: ..." line naming the file and problem, a
// non-zero exit, never a crash (this binary is also built with ASan+UBSan in CI).
#include <fstream>

#include "formats/safetensors.h"
#include "test_util.h"

namespace qf {
namespace {

namespace fs = std::filesystem;

using test::write_file;

// Runs qforge with `args`; expects exit 1 and exactly one stderr line containing each needle.
void expect_cli_error(const std::string& args, std::initializer_list<std::string> needles) {
  std::string out, err;
  const int rc = test::run_command(test::binary() + " " + args, &out, &err);
  EXPECT_EQ(rc, 1) << args << "\n" << err;
  ASSERT_FALSE(err.empty()) << args;
  while (!err.empty() && err.back() == '\n') err.pop_back();
  // Warnings may precede the error; the error itself is the last line and is one line.
  const std::string last = err.substr(err.rfind('\n') == std::string::npos ? 0 : err.rfind('\n') + 1);
  EXPECT_EQ(last.rfind("qforge: error: ", 0), 0u) << err;
  for (const auto& n : needles) EXPECT_NE(last.find(n), std::string::npos) << "wanted '" << n << "' in: " << err;
  EXPECT_TRUE(out.empty()) << out;  // nothing half-written on stdout
}

const char* kConfig = R"({"architectures": ["LlamaForCausalLM"], "hidden_size": 8,
  "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 6,
  "tie_word_embeddings": true})";

TEST(CliErrors, MissingAndMalformedFiles) {
  auto dir = test::tmp_dir("cli_missing");
  expect_cli_error("inspect -m " + dir.string(), {"config.json", "cannot open"});
  write_file(dir / "config.json", "{ not json");
  expect_cli_error("generate -m " + dir.string() + " -p hi", {"config.json", "malformed JSON"});
  write_file(dir / "config.json", R"({"architectures": ["FalconForCausalLM"]})");
  expect_cli_error("inspect -m " + dir.string(), {"config.json", "unknown architecture 'FalconForCausalLM'"});
  write_file(dir / "config.json", kConfig);
  expect_cli_error("inspect -m " + dir.string(), {"no *.safetensors files"});
}

TEST(CliErrors, LyingSafetensorsHeader) {
  auto dir = test::tmp_dir("cli_lying");
  write_file(dir / "config.json", kConfig);
  std::string header = R"({"model.embed_tokens.weight": {"dtype": "F32", "shape": [6, 8], "data_offsets": [0, 999999]}})";
  std::string file(8, '\0');
  for (int i = 0; i < 8; ++i) file[static_cast<size_t>(i)] = static_cast<char>(header.size() >> (8 * i));
  write_file(dir / "model.safetensors", file + header + std::string(192, '\0'));
  expect_cli_error("generate -m " + dir.string() + " -p hi", {"model.safetensors", "model.embed_tokens.weight", "out of range"});
  // Truncated file: the header promises more bytes than the file has.
  write_file(dir / "model.safetensors", file + header.substr(0, 10));
  expect_cli_error("inspect -m " + dir.string(), {"model.safetensors", "exceeds the file size"});
  // Shape / dtype disagreeing with the config.
  std::vector<int64_t> z(48, 0);  // big enough for every dtype written below
  write_safetensors(dir / "model.safetensors", {{"model.embed_tokens.weight", DType::F32, {6, 7}, z.data()}});
  expect_cli_error("inspect -m " + dir.string(), {"model.embed_tokens.weight", "shape [6, 7]"});
  write_safetensors(dir / "model.safetensors", {{"model.embed_tokens.weight", DType::I64, {6, 8}, z.data()}});
  expect_cli_error("inspect -m " + dir.string(), {"model.embed_tokens.weight", "dtype I64"});
}

TEST(CliErrors, BadTokenizerAndOptions) {
  QF_REQUIRE_DATA("models/stories260K-hf/model.safetensors");
  auto dir = test::tmp_dir("cli_badtok");
  for (const char* f : {"config.json", "model.safetensors"})
    fs::copy_file(test::data_dir() / "models/stories260K-hf" / f, dir / f);
  expect_cli_error("generate -m " + dir.string() + " -p hi", {"tokenizer"});
  write_file(dir / "tokenizer.json", R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1}, "merges": ["a c"]}})");
  expect_cli_error("generate -m " + dir.string() + " -p hi", {"tokenizer.json"});
  fs::copy_file(test::data_dir() / "models/stories260K-hf/tokenizer.json", dir / "tokenizer.json",
                fs::copy_options::overwrite_existing);
  expect_cli_error("generate -m " + dir.string() + " -p hi --top-p 0", {"top-p"});
  expect_cli_error("generate -m " + dir.string() + " -p hi --device tpu", {"--device"});
  std::string out, err;
  EXPECT_NE(test::run_command(test::binary() + " generate", &out, &err), 0);  // -m is required
  EXPECT_NE(err.find("--model"), std::string::npos) << err;
}

}  // namespace
}  // namespace qf
