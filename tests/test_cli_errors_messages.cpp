// Hostile files and option values through the CLI (issue 9): the output ends with exactly one
// "qforge: error: <file or option>: <problem>" line and exit status 1; nothing a file holds
// (newlines, escape sequences, invalid UTF-8) reaches the terminal raw, so no line can be forged.
#include <unistd.h>


#include "formats/safetensors.h"
#include "test_util.h"

namespace qf {
namespace {

namespace fs = std::filesystem;

using test::write_file;

using test::CliRun;
using test::slurp;
CliRun run(const std::string& args) { return test::run_cli(args); }

bool has_raw_control(const std::string& s) {
  for (char c : s)
    if ((static_cast<unsigned char>(c) < 0x20 && c != '\n') || c == 0x7f) return true;
  return false;
}

// Exit 1, stderr is exactly one line (the error), it contains every needle, and no raw control
// bytes anywhere. stdout may hold what a command printed before failing (inspect) when allowed.
void expect_one_error_line(const CliRun& r, std::initializer_list<std::string> needles, bool stdout_ok = false) {
  EXPECT_EQ(r.rc, 1) << r.err;
  ASSERT_FALSE(r.err.empty());
  EXPECT_EQ(r.err.back(), '\n');
  const std::string line = r.err.substr(0, r.err.size() - 1);
  EXPECT_EQ(line.find('\n'), std::string::npos) << "more than one line:\n" << r.err;
  EXPECT_EQ(line.rfind("qforge: error: ", 0), 0u) << r.err;
  for (const auto& n : needles) EXPECT_NE(line.find(n), std::string::npos) << "wanted '" << n << "' in: " << r.err;
  EXPECT_FALSE(has_raw_control(r.err)) << r.err;
  if (!stdout_ok) {
    EXPECT_TRUE(r.out.empty()) << r.out;
  }
  EXPECT_FALSE(has_raw_control(r.out)) << r.out;
}

// A runnable model folder (stories260K-hf) in a scratch folder, files writable.
fs::path model_copy(const std::string& name) {
  const fs::path dir = test::tmp_dir(name);
  for (const char* f : {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"})
    fs::copy_file(test::data_dir() / "models/stories260K-hf" / f, dir / f);
  for (const auto& e : fs::directory_iterator(dir))
    fs::permissions(e.path(), fs::perms::owner_read | fs::perms::owner_write | fs::perms::group_read |
                                  fs::perms::others_read);
  return dir;
}

std::string nested(size_t n) { return std::string(n, '[') + std::string(n, ']'); }

// Replaces the first `"key": ` value in `text` by `raw` (the key must be followed by an object
// or null, as in the stories260K-hf files).
std::string with_field(std::string text, const std::string& key, const std::string& raw) {
  const std::string k = "\"" + key + "\": ";
  const size_t at = text.find(k);
  EXPECT_NE(at, std::string::npos) << key;
  return text.insert(at + k.size(), raw + ", \"was_" + key + "\": ");
}

TEST(CliErrorMessages, DeepJsonNestingIsOneRule) {
  QF_REQUIRE_DATA("models/stories260K-hf/model.safetensors");
  const fs::path dir = model_copy("cli_deep");
  write_file(dir / "text.txt", "Once upon a time there was a little girl named Lily.");
  const std::string tok = slurp(dir / "tokenizer.json");
  const std::string deep = nested(150000);
  // Before: a stack overflow (exit 139) in inspect, generate and ppl.
  for (const char* field : {"normalizer", "pre_tokenizer", "decoder", "post_processor"}) {
    write_file(dir / "tokenizer.json", with_field(tok, field, deep));
    for (const std::string& cmd : {std::string("generate -n 2 -p hi -m "), "ppl -q -f " + (dir / "text.txt").string() + " -m "})
      expect_one_error_line(run(cmd + dir.string()), {"tokenizer.json: JSON nested deeper than 128 levels"});
    expect_one_error_line(run("inspect --no-layers -m " + dir.string()),
                          {"tokenizer.json: JSON nested deeper than 128 levels"}, true);
  }
  std::string merges = tok;
  merges.insert(merges.find("\"merges\": [") + 11, deep + ", ");
  write_file(dir / "tokenizer.json", merges);
  expect_one_error_line(run("generate -n 2 -p hi -m " + dir.string()), {"tokenizer.json: JSON nested deeper than 128 levels"});
  write_file(dir / "tokenizer.json", tok);
  // The same limit, with the same words, for config.json and tokenizer_config.json.
  const std::string cfg = slurp(dir / "config.json");
  write_file(dir / "config.json", "{\"x\": " + deep + ", " + cfg.substr(cfg.find('{') + 1));
  expect_one_error_line(run("inspect -m " + dir.string()), {"config.json: JSON nested deeper than 128 levels"});
  write_file(dir / "config.json", cfg);
  write_file(dir / "tokenizer_config.json", "{\"chat_template\": " + deep + "}");
  expect_one_error_line(run("generate -n 2 -p hi -m " + dir.string()),
                        {"tokenizer_config.json: JSON nested deeper than 128 levels"});
}

TEST(CliErrorMessages, ForgedTensorNamesAreEscaped) {
  // No shared data needed: a one-tensor file whose name tries to end the error line, start a
  // forged one in red and smuggle a C1 CSI and invalid UTF-8.
  const fs::path dir = test::tmp_dir("cli_forged");
  write_file(dir / "config.json", R"({"architectures": ["LlamaForCausalLM"], "hidden_size": 8,
    "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 6,
    "tie_word_embeddings": true})");
  std::string header = "{\"" + std::string("model.embed_tokens.weight\\n\\u001b[31mqforge: error: forged\\u001b[0m\\u009b") +
                       "\xFF\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 999]}}";
  std::string file(8, '\0');
  for (int i = 0; i < 8; ++i) file[static_cast<size_t>(i)] = static_cast<char>(header.size() >> (8 * i));
  write_file(dir / "model.safetensors", file + header + std::string(8, '\0'));
  const CliRun r = run("inspect -m " + dir.string());
  // nlohmann refuses the 0xFF byte, or the name gets to the offsets check: either way one line.
  expect_one_error_line(r, {"model.safetensors"});
  // Valid UTF-8 this time: the name reaches the message, escaped.
  header = "{\"" + std::string("model.embed_tokens.weight\\n\\u001b[31mqforge: error: forged\\u001b[0m\\u009b") +
           "\": {\"dtype\": \"F32\", \"shape\": [2], \"data_offsets\": [0, 999]}}";
  for (int i = 0; i < 8; ++i) file[static_cast<size_t>(i)] = static_cast<char>(header.size() >> (8 * i));
  write_file(dir / "model.safetensors", file + header + std::string(8, '\0'));
  expect_one_error_line(run("inspect -m " + dir.string()),
                        {"model.embed_tokens.weight\\x0A\\x1B[31mqforge: error: forged\\x1B[0m\\xC2\\x9B'"});
}

TEST(CliErrorMessages, InspectListsForgedNamesEscaped) {
  QF_REQUIRE_DATA("models/stories260K-hf/model.safetensors");
  const fs::path dir = model_copy("cli_forged_inspect");
  // An extra tensor the model does not use, in a second file, with a hostile name.
  const float z[2] = {0, 0};
  write_safetensors(dir / "extra.safetensors", {{"extra\n\x1b]0;pwned\x07\xC2\x85", DType::F32, {2}, z}});
  const CliRun r = run("inspect --tensors --no-layers -m " + dir.string());
  ASSERT_EQ(r.rc, 0) << r.err;
  EXPECT_FALSE(has_raw_control(r.out));
  EXPECT_NE(r.out.find("extra\\x0A\\x1B]0;pwned\\x07\\xC2\\x85"), std::string::npos) << r.out;
  EXPECT_NE(r.out.find("bos 1 '<s>'"), std::string::npos) << r.out;
}

TEST(CliErrorMessages, BadCommandLinesAreOneEscapedLine) {
  // Option values are typed (or pasted) by the user and may hold any bytes.
  const CliRun r = run("generate -p hi -m \"$(printf 'no\\033[31m\\nqforge: error: forged')\"");
  expect_one_error_line(r, {"--model", "no\\x1B[31m\\x0Aqforge: error: forged"});
  expect_one_error_line(run("generate"), {"--model is required"});
  expect_one_error_line(run("inspect --frobnicate -m " + test::tmp_dir("cli_badopt").string()), {"--frobnicate"});
  expect_one_error_line(run("nosuchcommand"), {"A subcommand is required"});
  // --help is not an error: several lines on stdout, exit 0.
  const CliRun h = run("generate --help");
  EXPECT_EQ(h.rc, 0) << h.err;
  EXPECT_NE(h.out.find("--model"), std::string::npos) << h.out;
  EXPECT_TRUE(h.err.empty()) << h.err;
}

TEST(CliErrorMessages, InspectFailsOnABrokenTokenizer) {
  QF_REQUIRE_DATA("models/stories260K-hf/model.safetensors");
  const fs::path dir = model_copy("cli_inspect_tok");
  // Before: "tokenizer not loaded: ..." on stdout and exit 0.
  write_file(dir / "tokenizer.json", "{\"model\": {\"type\": \"BPE\", \"vocab\": {}}}");
  const CliRun r = run("inspect --no-layers -m " + dir.string());
  expect_one_error_line(r, {"tokenizer.json: model.vocab is empty"}, true);
  EXPECT_NE(r.out.find("architecture  LlamaForCausalLM"), std::string::npos) << r.out;  // described so far
  EXPECT_NE(r.out.find("tokenizer     does not load (error below)"), std::string::npos) << r.out;
  // No tokenizer at all is a description, not an error.
  fs::remove(dir / "tokenizer.json");
  const CliRun none = run("inspect --no-layers -m " + dir.string());
  EXPECT_EQ(none.rc, 0) << none.err;
  EXPECT_NE(none.out.find("tokenizer     none"), std::string::npos) << none.out;
}

TEST(CliErrorMessages, TokenizerGarbageIsRefused) {
  QF_REQUIRE_DATA("models/stories260K-hf/model.safetensors");
  const fs::path dir = model_copy("cli_tok_garbage");
  const std::string tok = slurp(dir / "tokenizer.json");
  // Empty vocabulary: before, exit 0 with no output.
  write_file(dir / "tokenizer.json", "{\"model\": {\"type\": \"BPE\", \"vocab\": {}, \"merges\": []}}");
  expect_one_error_line(run("generate -n 2 -p hi -m " + dir.string()), {"tokenizer.json: model.vocab is empty"});
  // One vocab id of 6e7: before, 2.1 GB for the id table.
  std::string huge = tok;
  huge.insert(huge.find("\"vocab\": {") + 10, "\"zzhuge\": 60000000, ");
  write_file(dir / "tokenizer.json", huge);
  expect_one_error_line(run("generate -n 2 -p hi -m " + dir.string()),
                        {"tokenizer.json: vocab token 'zzhuge' has id 60000000, out of range", "ids below"});
  write_file(dir / "tokenizer.json", tok);
  // An unknown BOS: before, silently no BOS.
  write_file(dir / "tokenizer_config.json", R"({"add_bos_token": true, "bos_token": "<|begin|>"})");
  expect_one_error_line(run("generate -n 2 -p hi -m " + dir.string()),
                        {"tokenizer_config.json: bos_token '<|begin|>' is not a token"});
  // null BOS with add_bos_token: refused as transformers does; null alone is a model without BOS.
  write_file(dir / "tokenizer_config.json", R"({"add_bos_token": true, "bos_token": null})");
  expect_one_error_line(run("generate -n 2 -p hi -m " + dir.string()), {"add_bos_token is true but there is no BOS token"});
  write_file(dir / "tokenizer_config.json", R"({"bos_token": null, "eos_token": "</s>"})");
  const CliRun ok = run("inspect --no-layers -m " + dir.string());
  EXPECT_EQ(ok.rc, 0) << ok.err;
  EXPECT_NE(ok.out.find("special       bos none"), std::string::npos) << ok.out;
}

TEST(CliErrorMessages, PermissionDeniedSaysSo) {
  QF_REQUIRE_DATA("models/stories260K-hf/model.safetensors");
  const fs::path dir = model_copy("cli_perm");
  fs::permissions(dir / "tokenizer.json", fs::perms::none);
  // Root reads every file: run as nobody then (setpriv from util-linux).
  std::string prefix;
  if (geteuid() == 0) {
    if (test::run_command("setpriv --version", nullptr, nullptr) != 0) GTEST_SKIP() << "running as root without setpriv";
    prefix = "setpriv --reuid=65534 --regid=65534 --clear-groups ";
  }
  std::string out, err;
  const int rc = test::run_command(prefix + test::binary() + " generate -n 2 -p hi -m " + dir.string(), &out, &err);
  EXPECT_EQ(rc, 1) << err;
  EXPECT_NE(err.find("tokenizer.json: cannot open: permission denied"), std::string::npos) << err;
  EXPECT_EQ(err.find("missing file"), std::string::npos) << err;
  fs::permissions(dir / "tokenizer.json", fs::perms::owner_read | fs::perms::owner_write);
  fs::remove(dir / "config.json");
  fs::create_directories(dir / "config.json");
  expect_one_error_line(run("inspect -m " + dir.string()), {"config.json: cannot read: is a directory"});
}

// bench --format exl2:REPORT reads a converted folder's quantization_report.json: a bad one is one
// line naming the file and what is wrong; a good one is parsed (and then needs a GPU).
TEST(CliMessages, BenchMixReport) {
  const fs::path dir = test::tmp_dir("bench_report");
  const std::string good = R"({"blocks": [
    {"block": "model.layers.0.self_attn", "mix": {"q_proj": "0.1:5b_32g/0.9:4b_32g", "k_proj": "1:4b_128g",
     "v_proj": "1:4b_128g", "o_proj": "1:3b_64g"}},
    {"block": "model.layers.0.mlp", "mix": {"gate_proj": "1:4b_128g", "up_proj": "1:4b_128g",
     "down_proj": "0.05:8b_32g/0.95:4b_32g"}}],
    "head": {"mix": "0.15:8b_128g/0.85:6b_128g"}, "decoder_bpw": 4.05})";
  const std::string bench = "bench --random tiny --device cpu -p 8 -n 2 -r 1 --depth 0 --format exl2:";
  write_file(dir / "good.json", good);
  expect_one_error_line(run(bench + (dir / "good.json").string()), {"random models need --device cuda"});
  auto bad = [&](const std::string& name, const std::string& from, const std::string& to, const std::string& needle) {
    std::string text = good;
    const size_t at = text.find(from);
    ASSERT_NE(at, std::string::npos) << from;
    text.replace(at, from.size(), to);
    write_file(dir / name, text);
    expect_one_error_line(run(bench + (dir / name).string()), {name + ": ", needle});
  };
  bad("bits.json", "0.9:4b_32g", "0.9:4x_32g", "is not of the form 0.1:5b_32g/0.9:4b_32g");
  bad("seven.json", "1:3b_64g", "1:7b_64g", "is not of the form");
  bad("group.json", "1:3b_64g", "1:3b_48g", "is not of the form");
  bad("trail.json", "1:3b_64g", "1:3b_64gX", "is not of the form");
  bad("layer.json", "layers.0.mlp", "layers.x.mlp", "block 'model.layers.x.mlp': no layer number");
  bad("missing.json", R"("up_proj": "1:4b_128g",)", "", "has no up_proj");
  bad("nohead.json", R"("head": {"mix": "0.15:8b_128g/0.85:6b_128g"})", R"("tail": 1)", "no blocks and head");
  expect_one_error_line(run(bench + (dir / "absent.json").string()), {"absent.json: cannot open: no such file"});
}

}  // namespace
}  // namespace qf
