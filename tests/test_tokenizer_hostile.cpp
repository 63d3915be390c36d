// Hostile tokenizer and JSON files (issue 9): every broken input ends in one qf::Error line that
// names the file and the limit, never a crash, a huge allocation or silently wrong special tokens.
// Also the escaping of file text in messages and the read errors of core/json_file.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>

#include "core/error.h"
#include "core/json_file.h"
#include "test_util.h"
#include "tokenizer/tokenizer.h"

namespace {

namespace fs = std::filesystem;
using qf::json;
using qf::Tokenizer;
using qf::test::error_of;
using qf::test::expect_error;
using qf::test::write_file;

const char* const kMeta = "\xE2\x96\x81";  // ▁

// A small valid SentencePiece-style tokenizer.json (the same layout as test_tokenizer's).
json base_json() {
  json j;
  j["added_tokens"] = json::array({
      {{"id", 0}, {"content", "<unk>"}, {"special", true}},
      {{"id", 1}, {"content", "<s>"}, {"special", true}},
      {{"id", 2}, {"content", "</s>"}, {"special", true}},
  });
  json vocab = {{"<unk>", 0}, {"<s>", 1}, {"</s>", 2}, {kMeta, 3}, {"h", 4}, {"i", 5}, {"hi", 6},
                {std::string(kMeta) + "hi", 7}};
  j["model"] = {{"type", "BPE"}, {"vocab", vocab}, {"merges", json::array({"h i", std::string(kMeta) + " hi"})},
                {"unk_token", "<unk>"}, {"byte_fallback", true}, {"fuse_unk", true}};
  j["normalizer"] = {{"type", "Sequence"}, {"normalizers", json::array({
      {{"type", "Prepend"}, {"prepend", kMeta}},
      {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", kMeta}}})}};
  j["pre_tokenizer"] = nullptr;
  j["post_processor"] = nullptr;
  j["decoder"] = nullptr;
  return j;
}

// Writes tokenizer.json (+ tokenizer_config.json when given) into a fresh folder.
fs::path folder(const std::string& name, const std::string& tokenizer_json, const std::string& config = "") {
  const fs::path dir = qf::test::tmp_dir("hostile_" + name);
  write_file(dir / "tokenizer.json", tokenizer_json);
  if (!config.empty()) write_file(dir / "tokenizer_config.json", config);
  return dir;
}

// `n` nested arrays: [[[...]]].
std::string nested(size_t n) { return std::string(n, '[') + std::string(n, ']'); }

// j.dump() with the string value "@@" replaced by raw JSON text.
std::string dump_with(const json& j, const std::string& raw) {
  std::string s = j.dump();
  const size_t at = s.find("\"@@\"");
  EXPECT_NE(at, std::string::npos);
  return s.replace(at, 4, raw);
}

// The message fn() throws when run as an unprivileged user (root reads every file), or "".
std::string error_as_nobody(const std::function<void()>& fn) {
  if (geteuid() != 0) return error_of(fn);
  int fds[2];
  if (pipe(fds) != 0) return "pipe failed";
  const pid_t pid = fork();
  if (pid == 0) {
    close(fds[0]);
    std::string msg = "could not drop privileges";
    if (setgid(65534) == 0 && setuid(65534) == 0) msg = error_of(fn);
    (void)!write(fds[1], msg.data(), msg.size());
    _exit(0);
  }
  close(fds[1]);
  std::string msg;
  char buf[512];
  ssize_t n;
  while ((n = read(fds[0], buf, sizeof buf)) > 0) msg.append(buf, static_cast<size_t>(n));
  close(fds[0]);
  waitpid(pid, nullptr, 0);
  return msg;
}

// ---- JSON nesting: one rule for every file read through core/json_file -----------------------

TEST(TokenizerHostile, JsonDepthLimit) {
  EXPECT_NO_THROW(qf::parse_json(nested(qf::kMaxJsonDepth), "ok.json"));
  expect_error([] { qf::parse_json(nested(qf::kMaxJsonDepth + 1), "deep.json"); },
               "deep.json: JSON nested deeper than 128 levels");
  // Objects count too, and brackets inside strings (with escaped quotes) do not.
  std::string objs;
  for (int i = 0; i < 200; ++i) objs += "{\"k\":";
  objs += "1" + std::string(200, '}');
  expect_error([&] { qf::parse_json(objs, "objs.json"); }, "nested deeper than 128 levels");
  const std::string in_string = "{\"a\": \"\\\"" + std::string(1000, '[') + "\\\\\", \"b\": [1]}";
  const json j = qf::parse_json(in_string, "str.json");
  EXPECT_EQ(j.at("b").at(0), 1);
  // Malformed JSON still says so.
  expect_error([] { qf::parse_json("{\"a\": [1, 2", "bad.json"); }, "bad.json: malformed JSON");
}

TEST(TokenizerHostile, DeepNestingInEveryTokenizerField) {
  // ~150,000 levels overflowed the stack (recursive copy, dump, Sequence parsing) before.
  const std::string deep = nested(150000);
  for (const char* field : {"normalizer", "pre_tokenizer", "decoder", "post_processor", "added_tokens"}) {
    json j = base_json();
    j[field] = "@@";
    const fs::path dir = folder(std::string("deep_") + field, dump_with(j, deep));
    expect_error([&] { Tokenizer::load(dir); }, (dir / "tokenizer.json").string() + ": JSON nested deeper than 128 levels");
  }
  {  // a merges entry
    json j = base_json();
    j["model"]["merges"].push_back("@@");
    const fs::path dir = folder("deep_merge", dump_with(j, deep));
    expect_error([&] { Tokenizer::load(dir); }, "tokenizer.json: JSON nested deeper than 128 levels");
  }
  {  // tokenizer_config.json and the vocab.json + merges.txt pair
    const fs::path dir = folder("deep_config", base_json().dump(), "{\"bos_token\": " + deep + "}");
    expect_error([&] { Tokenizer::load(dir); }, "tokenizer_config.json: JSON nested deeper than 128 levels");
    const fs::path dir2 = qf::test::tmp_dir("hostile_deep_vocab");
    write_file(dir2 / "vocab.json", "{\"a\": " + deep + "}");
    write_file(dir2 / "merges.txt", "");
    expect_error([&] { Tokenizer::load(dir2); }, "vocab.json: JSON nested deeper than 128 levels");
  }
  // Nesting within the limit is parsed and refused for what it is, without crashing.
  json j = base_json();
  j["normalizer"] = "@@";
  const fs::path dir = folder("deep_ok", dump_with(j, nested(100)));
  const std::string msg = error_of([&] { Tokenizer::load(dir); });
  EXPECT_NE(msg.find("tokenizer.json"), std::string::npos) << msg;
  // Deeply nested Sequence steps (within the limit) work.
  json seq = {{"type", "NFC"}};
  for (int i = 0; i < 40; ++i) seq = {{"type", "Sequence"}, {"normalizers", json::array({seq})}};
  j = base_json();
  j["normalizer"] = seq;
  EXPECT_NO_THROW(Tokenizer::load(folder("deep_seq", j.dump())));
}

// ---- read errors say what happened ---------------------------------------------------------------

TEST(TokenizerHostile, ReadErrorsSayWhatHappened) {
  const fs::path dir = qf::test::tmp_dir("hostile_read");
  expect_error([&] { qf::read_json_file(dir / "nope.json"); }, "nope.json: cannot open: no such file");
  fs::create_directories(dir / "adir.json");
  expect_error([&] { qf::read_json_file(dir / "adir.json"); }, "adir.json: cannot read: is a directory");
  write_file(dir / "big.txt", std::string(100, 'x'));
  expect_error([&] { qf::read_text_file(dir / "big.txt", 64); }, "big.txt: file is 100 bytes, more than the limit of 64 bytes");
  write_file(dir / "secret.json", "{}");
  fs::permissions(dir / "secret.json", fs::perms::none);
  const std::string msg = error_as_nobody([&] { qf::read_json_file(dir / "secret.json"); });
  EXPECT_NE(msg.find("secret.json: cannot open: permission denied"), std::string::npos) << msg;
  EXPECT_EQ(msg.find("missing file"), std::string::npos) << msg;
  // A FIFO with no writer reads as empty instead of hanging.
  ASSERT_EQ(mkfifo((dir / "fifo.json").c_str(), 0644), 0);
  expect_error([&] { qf::read_json_file(dir / "fifo.json"); }, "fifo.json: malformed JSON");
  // tokenizer.json that is a folder, and a model folder that may not be searched.
  fs::create_directories(dir / "tokdir" / "tokenizer.json");
  expect_error([&] { Tokenizer::load(dir / "tokdir"); }, "tokenizer.json: cannot read: is a directory");
  const fs::path locked = dir / "locked";
  fs::create_directories(locked);
  write_file(locked / "tokenizer.json", base_json().dump());
  fs::permissions(locked, fs::perms::none);
  const std::string msg2 = error_as_nobody([&] { Tokenizer::load(locked); });
  fs::permissions(locked, fs::perms::owner_all);
  EXPECT_NE(msg2.find("cannot access: permission denied"), std::string::npos) << msg2;
}

// ---- messages: file text is escaped ------------------------------------------------------------

TEST(TokenizerHostile, EscapeText) {
  using qf::escape_text;
  EXPECT_EQ(escape_text("plain ascii"), "plain ascii");
  EXPECT_EQ(escape_text("a\nb\rc\td\x1b[31me\x7f"), "a\\x0Ab\\x0Dc\\x09d\\x1B[31me\\x7F");
  // Valid UTF-8 stays readable; C1 controls (CSI U+009B), separators and bidi overrides do not.
  EXPECT_EQ(escape_text("\xC3\xA9t\xC3\xA9 \xE2\x96\x81 \xF0\x9F\xA6\x99"), "\xC3\xA9t\xC3\xA9 \xE2\x96\x81 \xF0\x9F\xA6\x99");
  EXPECT_EQ(escape_text("\xC2\x9B" "31m"), "\\xC2\\x9B31m");
  EXPECT_EQ(escape_text("\xE2\x80\xAE" "txt"), "\\xE2\\x80\\xAEtxt");
  EXPECT_EQ(escape_text("\xE2\x80\xA8"), "\\xE2\\x80\\xA8");
  // Invalid UTF-8: stray bytes, overlong forms, surrogates, a cut-off sequence.
  EXPECT_EQ(escape_text("\xFF\x80"), "\\xFF\\x80");
  EXPECT_EQ(escape_text("\xC0\xAF"), "\\xC0\\xAF");
  EXPECT_EQ(escape_text("\xED\xA0\x80"), "\\xED\\xA0\\x80");
  EXPECT_EQ(escape_text("ok\xE2\x82"), "ok\\xE2\\x82");
  EXPECT_EQ(escape_text(std::string("a\0b", 3)), "a\\x00b");
  // Escaping twice changes nothing; long text is cut with a note.
  const std::string nasty = "x\n\x1b\xC2\x9B\xFF\xE2\x80\xAE\xC3\xA9";
  EXPECT_EQ(escape_text(escape_text(nasty)), escape_text(nasty));
  EXPECT_EQ(escape_text(std::string(100, 'a'), 10), std::string(10, 'a') + "... (90 more bytes)");
  // quote_for_error uses the same rules and cuts long names.
  EXPECT_EQ(qf::quote_for_error("a\nb\xFF"), "'a\\x0Ab\\xFF'");
  const std::string q = qf::quote_for_error(std::string(100000, 'n'));
  EXPECT_LT(q.size(), 300u);
  EXPECT_NE(q.find("(100000 bytes)"), std::string::npos) << q;
}

TEST(TokenizerHostile, FileTextInErrorsIsEscaped) {
  json j = base_json();
  j["normalizer"] = {{"type", "Evil\nqforge: error: forged\x1b[31m"}};
  const std::string msg = error_of([&] { Tokenizer::load(folder("evil_type", j.dump())); });
  EXPECT_EQ(msg.find('\n'), std::string::npos) << msg;
  EXPECT_EQ(msg.find('\x1b'), std::string::npos) << msg;
  EXPECT_NE(msg.find("unsupported normalizer type 'Evil\\x0Aqforge: error: forged\\x1B[31m'"), std::string::npos) << msg;
  j = base_json();
  j["pre_tokenizer"] = {{"type", "Split"}, {"pattern", {{"Regex", "(\n\x1b"}}}, {"behavior", "Isolated"}};
  const std::string msg2 = error_of([&] { Tokenizer::load(folder("evil_regex", j.dump())); });
  EXPECT_NE(msg2.find("regex '(\\x0A\\x1B' does not compile"), std::string::npos) << msg2;
  // A megabyte-long token in a message is cut.
  j = base_json();
  j["model"]["merges"].push_back(std::string(1 << 20, 'z') + " h");
  const std::string msg3 = error_of([&] { Tokenizer::load(folder("long_merge", j.dump())); });
  EXPECT_LT(msg3.size(), 1000u);
  EXPECT_NE(msg3.find("bytes)"), std::string::npos) << msg3.substr(0, 400);
}

// ---- special tokens of tokenizer_config.json -----------------------------------------------------

TEST(TokenizerHostile, BosTokenNullMeansNoBos) {
  const std::string tj = base_json().dump();
  // null: the model has no BOS (Qwen2 ships "bos_token": null); nothing is guessed.
  auto t = Tokenizer::load(folder("bos_null", tj, R"({"bos_token": null, "eos_token": "</s>"})"));
  EXPECT_FALSE(t.info().bos_id.has_value());
  EXPECT_FALSE(t.info().add_bos);
  EXPECT_EQ(t.encode("hi", true), (std::vector<int32_t>{7}));
  EXPECT_EQ(t.info().eos_id, 2);
  // ... but asking to add a BOS that does not exist is refused (as transformers does).
  expect_error([&] { Tokenizer::load(folder("bos_null_add", tj, R"({"bos_token": null, "add_bos_token": true})")); },
               "tokenizer_config.json: add_bos_token is true but there is no BOS token");
  expect_error([&] { Tokenizer::load(folder("eos_null_add", tj, R"({"eos_token": null, "add_eos_token": true})")); },
               "tokenizer_config.json: add_eos_token is true but there is no EOS token");
  // The object form works like the string.
  auto t2 = Tokenizer::load(folder("bos_obj", tj, R"({"bos_token": {"content": "<s>", "special": true}, "add_bos_token": true})"));
  EXPECT_EQ(t2.encode("hi", true), (std::vector<int32_t>{1, 7}));
}

TEST(TokenizerHostile, UnknownOrMalformedSpecialTokens) {
  const std::string tj = base_json().dump();
  expect_error([&] { Tokenizer::load(folder("bos_unknown", tj, R"({"bos_token": "<bos>", "add_bos_token": true})")); },
               "tokenizer_config.json: bos_token '<bos>' is not a token of the vocabulary or the added tokens");
  expect_error([&] { Tokenizer::load(folder("eos_unknown", tj, R"({"eos_token": "<|eot|>"})")); },
               "eos_token '<|eot|>' is not a token");
  expect_error([&] { Tokenizer::load(folder("bos_number", tj, R"({"bos_token": 1})")); },
               "tokenizer_config.json: bos_token must be a string, {\"content\": string} or null, not '1'");
  expect_error([&] { Tokenizer::load(folder("bos_badobj", tj, R"({"bos_token": {"content": 5}})")); },
               "bos_token must be a string");
  expect_error([&] { Tokenizer::load(folder("extra_bad", tj, R"({"additional_special_tokens": [7]})")); },
               "additional_special_tokens entry '7' is not a token");
  // unk/pad only matter in corner cases: an unknown one is ignored (with a warning).
  auto t = Tokenizer::load(folder("pad_unknown", tj, R"({"pad_token": "<pad>", "unk_token": "<unk>"})"));
  EXPECT_FALSE(t.info().pad_id.has_value());
  EXPECT_EQ(t.info().unk_id, 0);
  // Invalid UTF-8 in the name comes back escaped.
  const std::string msg = error_of([&] { Tokenizer::load(folder("bos_bytes", tj, "{\"bos_token\": \"<\\u001b\\u0085>\"}")); });
  EXPECT_NE(msg.find("bos_token '<\\x1B\\xC2\\x85>'"), std::string::npos) << msg;
}

TEST(TokenizerHostile, Qwen2ConfigHasNoBos) {
  QF_REQUIRE_DATA("tokenizers/qwen2-bpe/tokenizer_config.json");
  const fs::path d = qf::test::data_dir() / "tokenizers/qwen2-bpe";
  auto t = Tokenizer::from_vocab_merges(d / "vocab.json", d / "merges.txt", "", d / "tokenizer_config.json");
  EXPECT_FALSE(t.info().bos_id.has_value());
  EXPECT_FALSE(t.info().add_bos);
  EXPECT_EQ(t.info().eos_id, 151643);
  EXPECT_EQ(t.encode("<|im_start|>hello<|im_end|>"), (std::vector<int32_t>{151644, 14990, 151645}));
}

// ---- vocabularies --------------------------------------------------------------------------------

TEST(TokenizerHostile, EmptyVocabulary) {
  json j = base_json();
  j["model"]["vocab"] = json::object();
  j["model"]["merges"] = json::array();
  j["added_tokens"] = json::array();
  expect_error([&] { Tokenizer::load(folder("empty", j.dump())); }, "tokenizer.json: model.vocab is empty");
  const fs::path dir = qf::test::tmp_dir("hostile_empty_pair");
  write_file(dir / "vocab.json", "{}");
  write_file(dir / "merges.txt", "#version: 0.2\n");
  expect_error([&] { Tokenizer::load(dir); }, "vocab.json: the vocabulary is empty");
}

TEST(TokenizerHostile, HugeIdsAreRefused) {
  // One id of 6e7 made a 2.1 GB id -> token table.
  json j = base_json();
  j["model"]["vocab"]["big"] = 60000000;
  expect_error([&] { Tokenizer::load(folder("huge_vocab_id", j.dump())); },
               "vocab token 'big' has id 60000000, out of range: 9 tokens may use ids below 1048585");
  j = base_json();
  j["added_tokens"].push_back({{"id", 60000000}, {"content", "<big>"}, {"special", true}});
  expect_error([&] { Tokenizer::load(folder("huge_added_id", j.dump())); },
               "added token '<big>' has id 60000000, out of range");
  expect_error([&] { Tokenizer::load(folder("huge_cfg_id", base_json().dump(),
                                            R"({"added_tokens_decoder": {"999999999": {"content": "<x>"}}})")); },
               "tokenizer_config.json: added_tokens_decoder entry has id 999999999, out of range (0 to 67108863)");
  j = base_json();
  j["model"]["vocab"]["neg"] = -1;
  expect_error([&] { Tokenizer::load(folder("neg_id", j.dump())); }, "has id -1, out of range");
  j = base_json();
  j["model"]["vocab"]["float"] = 1e300;
  expect_error([&] { Tokenizer::load(folder("float_id", j.dump())); }, "vocab token 'float' has a non-integer id");
  j = base_json();
  j["model"]["vocab"]["u64"] = 18446744073709551615ull;
  expect_error([&] { Tokenizer::load(folder("u64_id", j.dump())); }, "has id 18446744073709551615, out of range");
  // Sparse but moderate ids (trimmed test vocabularies keep their original ids) still load.
  j = base_json();
  j["model"]["vocab"]["far"] = 500000;
  j["added_tokens"].push_back({{"id", 128000}, {"content", "<|begin_of_text|>"}, {"special", true}});
  auto t = Tokenizer::load(folder("sparse_ok", j.dump()));
  EXPECT_EQ(t.vocab_size(), 500001);
  EXPECT_EQ(t.id_to_token(500000), "far");
}

TEST(TokenizerHostile, PostProcessorIdsMustBeTokens) {
  json j = base_json();
  j["post_processor"] = {{"type", "TemplateProcessing"},
                         {"single", json::array({{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}},
                                                 {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}})},
                         {"special_tokens", {{"<s>", {{"id", "<s>"}, {"ids", {99999}}, {"tokens", {"<s>"}}}}}}};
  expect_error([&] { Tokenizer::load(folder("tpl_unknown", j.dump())); },
               "tokenizer.json: post_processor adds token id 99999, which is not in the vocabulary");
  j["post_processor"]["special_tokens"]["<s>"]["ids"] = {1.5};
  expect_error([&] { Tokenizer::load(folder("tpl_float", j.dump())); },
               "post_processor special token '<s>' has a non-integer id '1.5'");
  j["post_processor"]["special_tokens"]["<s>"]["ids"] = {1};
  EXPECT_EQ(Tokenizer::load(folder("tpl_ok", j.dump())).encode("hi"), (std::vector<int32_t>{1, 7}));
  j["post_processor"] = {{"type", "RobertaProcessing"}, {"cls", {"<s>", -4}}, {"sep", {"</s>", 2}}};
  expect_error([&] { Tokenizer::load(folder("roberta_neg", j.dump())); }, "post_processor cls token has id -4, out of range");
}

TEST(TokenizerHostile, MalformedFieldsNameTheirSection) {
  const std::string tj = base_json().dump();
  json j = base_json();
  j["added_tokens"].push_back({{"id", 5}, {"content", 7}});
  expect_error([&] { Tokenizer::load(folder("added_num", j.dump())); }, "tokenizer.json: added_tokens: type must be string");
  j = base_json();
  j["normalizer"] = {{"type", 5}};
  expect_error([&] { Tokenizer::load(folder("norm_num", j.dump())); }, "tokenizer.json: normalizer: type must be string");
  j = base_json();
  j["post_processor"] = {{"type", "TemplateProcessing"}, {"single", json::array({5})}};
  expect_error([&] { Tokenizer::load(folder("tpl_item", j.dump())); }, "post_processor TemplateProcessing: item '5' is neither");
  expect_error([&] { Tokenizer::load(folder("cfg_flag", tj, R"({"add_bos_token": "true"})")); },
               "tokenizer_config.json: add_bos_token must be true or false, not '\"true\"'");
  expect_error([&] { Tokenizer::load(folder("cfg_chat", tj, R"({"chat_template": 5})")); },
               "tokenizer_config.json: chat_template must be a string");
  expect_error([&] { Tokenizer::load(folder("cfg_atd", tj, R"({"added_tokens_decoder": [1]})")); },
               "added_tokens_decoder must be an object");
  expect_error([&] { Tokenizer::load(folder("cfg_atd_val", tj, R"({"added_tokens_decoder": {"5": 3}})")); },
               "tokenizer_config.json: added_tokens_decoder: cannot use at() with number");
}

TEST(TokenizerHostile, BadDecoderCounts) {
  json j = base_json();
  j["decoder"] = {{"type", "Strip"}, {"content", " "}, {"start", 1e300}, {"stop", 0}};
  expect_error([&] { Tokenizer::load(folder("strip_float", j.dump())); },
               "tokenizer.json: field 'start' must be a non-negative integer");
  j["decoder"]["start"] = -1;
  expect_error([&] { Tokenizer::load(folder("strip_neg", j.dump())); }, "field 'start' must be a non-negative integer");
}

TEST(TokenizerHostile, PresentOnlyWhenFilesAre) {
  const fs::path dir = qf::test::tmp_dir("hostile_present");
  EXPECT_FALSE(Tokenizer::present(dir));
  write_file(dir / "vocab.json", "{}");
  EXPECT_FALSE(Tokenizer::present(dir));  // merges.txt missing
  write_file(dir / "merges.txt", "");
  EXPECT_TRUE(Tokenizer::present(dir));
}

}  // namespace
