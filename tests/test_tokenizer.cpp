// Tokenizer: the SentencePiece-layout test models, small hand-made tokenizer.json files for each
// pipeline feature, streaming decode, and error reporting on broken files.
#include <gtest/gtest.h>

#include <chrono>
#include <fstream>

#include "core/error.h"
#include "core/json_file.h"
#include "test_util.h"
#include "tokenizer/tokenizer.h"

namespace {

namespace fs = std::filesystem;
using qf::json;
using qf::StreamDecoder;
using qf::Tokenizer;
using qf::test::expect_error;
using qf::test::write_file;

#if defined(__SANITIZE_ADDRESS__)
constexpr bool kSanitized = true;
#else
constexpr bool kSanitized = false;
#endif

bool valid_utf8(const std::string& s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<uint8_t>(s[i]);
    size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 0;
    if (n == 0 || i + n > s.size()) return false;
    for (size_t k = 1; k < n; ++k)
      if ((static_cast<uint8_t>(s[i + k]) & 0xC0) != 0x80) return false;
    i += n;
  }
  return true;
}

const Tokenizer& spm() {  // shared: loading 32K vocab + 61K merges is slow under ASan
  static Tokenizer t = Tokenizer::load(qf::test::data_dir() / "models/testmodel-llama-20m");
  return t;
}

// ---- the test models -----------------------------------------------------------------------------

TEST(Tokenizer, TestModelInfo) {
  QF_REQUIRE_DATA("models/testmodel-llama-20m/tokenizer.json");
  const auto& info = spm().info();
  EXPECT_EQ(info.kind, "spm-bpe");
  EXPECT_EQ(info.vocab_size, 32000);
  EXPECT_EQ(info.n_merges, 61249);
  EXPECT_EQ(info.n_added, 3);
  EXPECT_EQ(info.bos_id, 1);
  EXPECT_EQ(info.eos_id, 2);
  EXPECT_EQ(info.unk_id, 0);
  EXPECT_TRUE(info.add_bos);
  EXPECT_FALSE(info.add_eos);
  EXPECT_EQ(info.pre_tokenizer, "");
  EXPECT_TRUE(spm().is_eos(2));
  EXPECT_FALSE(spm().is_eos(1));
  EXPECT_TRUE(spm().is_special(1));
  EXPECT_FALSE(spm().is_special(450));
  EXPECT_EQ(spm().id_to_token(450), "\xE2\x96\x81The");
  EXPECT_EQ(spm().token_to_id("<s>"), 1);
  EXPECT_EQ(spm().token_to_id("no such token"), std::nullopt);
  EXPECT_THROW(spm().id_to_token(32000), qf::Error);
}

TEST(Tokenizer, TestModelReferenceOutputs) {
  QF_REQUIRE_DATA("models/testmodel-llama-20m/reference_outputs.json");
  const json ref = qf::read_json_file(qf::test::data_dir() / "models/testmodel-llama-20m/reference_outputs.json");
  ASSERT_EQ(ref.at("prompts").size(), 5u);
  for (const auto& p : ref.at("prompts")) {
    const std::string prompt = p.at("prompt").get<std::string>();
    const auto want = p.at("input_ids").get<std::vector<int32_t>>();
    EXPECT_EQ(spm().encode(prompt), want) << prompt;
    EXPECT_EQ(spm().decode(want, /*skip_special=*/true), prompt);
    // The greedy continuation decodes to the reference text (mid-stream: no leading-space strip
    // issue because the reference was decoded on its own too).
    const auto cont = p.at("greedy_32_ids").get<std::vector<int32_t>>();
    EXPECT_EQ(spm().decode(cont, true), p.at("greedy_32_text").get<std::string>());
  }
}

TEST(Tokenizer, Stories260K) {
  QF_REQUIRE_DATA("models/stories260K-hf/tokenizer.json");
  const fs::path d = qf::test::data_dir() / "models/stories260K-hf";
  auto tok = Tokenizer::load(d);
  EXPECT_EQ(tok.vocab_size(), 512);
  const json ref = qf::read_json_file(d / "reference_outputs.json");
  // ["<s>", "▁Once", "▁upon", "▁a", "▁time", ",", "▁Lily"]
  EXPECT_EQ(tok.encode("Once upon a time, Lily"), ref.at("encode_once_upon_a_time_lily").get<std::vector<int32_t>>());
  const auto greedy = ref.at("hf_greedy_ids").get<std::vector<int32_t>>();
  EXPECT_EQ(tok.decode(greedy, true), ref.at("hf_greedy_text").get<std::string>());
}

TEST(Tokenizer, SpecialTokensSplitFirst) {
  QF_REQUIRE_DATA("models/testmodel-llama-20m/tokenizer.json");
  const auto& t = spm();
  const int32_t hi = *t.token_to_id("\xE2\x96\x81hi");
  // Legacy layout: each text piece between added tokens gets its own "▁" prefix.
  EXPECT_EQ(t.encode("<s>hi", false), (std::vector<int32_t>{1, hi}));
  EXPECT_EQ(t.encode("hi</s>", true), (std::vector<int32_t>{1, hi, 2}));
  // parse_special=false: "<s>" is plain text.
  const auto plain = t.encode("<s>hi", false, false);
  EXPECT_EQ(std::count(plain.begin(), plain.end(), 1), 0);
  EXPECT_EQ(t.decode(plain), "<s>hi");
  EXPECT_EQ(t.decode({1, hi, 2}), "<s> hi</s>");
  EXPECT_EQ(t.decode({1, hi, 2}, true), "hi");
  EXPECT_TRUE(t.encode("", false).empty());
  EXPECT_EQ(t.encode(""), (std::vector<int32_t>{1}));
}

TEST(Tokenizer, SpmByteFallback) {
  QF_REQUIRE_DATA("models/testmodel-llama-20m/tokenizer.json");
  // U+1F999 is not in the Llama 2 vocab: its 4 UTF-8 bytes become <0xF0><0x9F><0xA6><0x99>.
  const auto ids = spm().encode("\xF0\x9F\xA6\x99", false);
  ASSERT_EQ(ids.size(), 5u);
  EXPECT_EQ(spm().id_to_token(ids[0]), "\xE2\x96\x81");
  EXPECT_EQ(spm().id_to_token(ids[1]), "<0xF0>");
  EXPECT_EQ(spm().id_to_token(ids[4]), "<0x99>");
  EXPECT_EQ(spm().decode(ids), "\xF0\x9F\xA6\x99");
  // Invalid UTF-8 never fails: bytes go through byte fallback, decode repairs with U+FFFD.
  const std::string bad = "a\xFF" "b\xC3";
  const auto bad_ids = spm().encode(bad, false);
  EXPECT_EQ(spm().decode(bad_ids), "a\xEF\xBF\xBD" "b\xEF\xBF\xBD");
}

// Legacy SPM round trip: the normalizer prepends exactly one "▁" and the decoder strips exactly
// one leading space, so decode(encode(t)) == t for any text - also one starting with spaces.
TEST(Tokenizer, SpmRoundTripCorpora) {
  QF_REQUIRE_DATA("text/heldout/heldout.txt");
  const fs::path d = qf::test::data_dir();
  const size_t cap = kSanitized ? 60000 : 400000;  // the big corpora are cut to keep the test fast
  for (const char* rel : {"text/heldout/heldout.txt", "text/tinyshakespeare/input.txt", "text/war-and-peace/war-and-peace.txt"}) {
    std::string text = qf::read_text_file(d / rel);
    if (text.size() > cap) text.resize(cap);
    const auto ids = spm().encode(text, false);
    EXPECT_EQ(spm().decode(ids), text) << rel;
  }
  for (const std::string t : {" leading space", "  two", "\n\nnewlines first", "tab\tand trailing  "})
    EXPECT_EQ(spm().decode(spm().encode(t, false)), t);
}

TEST(Tokenizer, SpmEncodeSpeed) {
  QF_REQUIRE_DATA("text/heldout/heldout.txt");
  const std::string text = qf::read_text_file(qf::test::data_dir() / "text/heldout/heldout.txt");
  const auto t0 = std::chrono::steady_clock::now();
  const auto ids = spm().encode(text);  // the whole 355 KB is one BPE word in this layout
  const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::printf("heldout.txt: %zu bytes -> %zu tokens in %.3f s\n", text.size(), ids.size(), s);
  EXPECT_GT(ids.size(), 80000u);
  EXPECT_LT(s, kSanitized ? 20.0 : 1.5);
}

// ---- streaming --------------------------------------------------------------------------------

void check_stream(const Tokenizer& tok, const std::string& text) {
  const auto ids = tok.encode(text, true);
  StreamDecoder sd(tok);
  std::string all;
  for (auto id : ids) {
    const std::string piece = sd.push(id);
    EXPECT_TRUE(valid_utf8(piece)) << "push returned a cut-off character for: " << text;
    all += piece;
  }
  all += sd.flush();
  EXPECT_EQ(all, tok.decode(ids, true)) << text;
}

TEST(Tokenizer, StreamDecoderSpm) {
  QF_REQUIRE_DATA("models/testmodel-llama-20m/tokenizer.json");
  for (const std::string t : {"F\xC3\xBChrer \xF0\x9F\xA6\x99 \xD0\xBD\xD0\xB5\xD1\x89\xD0\xBE", "Hello world",
                              " leading", "\xF0\x9F\xA6\x99\xF0\x9F\xA6\x99 3 33 \xE6\x88\x91\xE6\x83\xB3", "a\n\n b",
                              "<s>x</s>y \xE2\x96\x81 z"})
    check_stream(spm(), t);
  // Byte-fallback pieces of one character come out together, only when complete.
  const auto ids = spm().encode("\xF0\x9F\xA6\x99!", false);  // ▁ <0xF0> <0x9F> <0xA6> <0x99> !
  StreamDecoder sd(spm());
  std::vector<std::string> outs;
  for (auto id : ids) outs.push_back(sd.push(id));
  EXPECT_EQ(outs, (std::vector<std::string>{"", "", "", "", "\xF0\x9F\xA6\x99", "!"}));
  EXPECT_EQ(sd.flush(), "");
  // A long generation: chunks still add up.
  std::string longtext;
  for (int i = 0; i < 300; ++i) longtext += "Pierre \xC3\xA9t\xC3\xA9 \xF0\x9F\x98\x81 " + std::to_string(i) + ". ";
  check_stream(spm(), longtext);
  // A cut-off character at the end is repaired by flush().
  StreamDecoder sd2(spm());
  EXPECT_EQ(sd2.push(*spm().token_to_id("<0xF0>")), "");
  EXPECT_EQ(sd2.flush(), "\xEF\xBF\xBD");
}

// ---- small hand-made tokenizer.json files -------------------------------------------------------

const char* const kMeta = "\xE2\x96\x81";  // ▁

json base_json() {
  json j;
  j["version"] = "1.0";
  j["added_tokens"] = json::array({
      {{"id", 0}, {"content", "<unk>"}, {"special", true}},
      {{"id", 1}, {"content", "<s>"}, {"special", true}},
      {{"id", 2}, {"content", "</s>"}, {"special", true}},
  });
  json vocab = {{"<unk>", 0}, {"<s>", 1}, {"</s>", 2}, {kMeta, 3}, {"h", 4}, {"i", 5}, {"hi", 6},
                {std::string(kMeta) + "hi", 7}, {"<0xC3>", 8}, {"<0xA9>", 9}, {" ", 10}};
  j["model"] = {{"type", "BPE"}, {"vocab", vocab}, {"merges", json::array({"h i", std::string(kMeta) + " hi"})},
                {"unk_token", "<unk>"}, {"byte_fallback", true}, {"fuse_unk", true}};
  j["normalizer"] = nullptr;
  j["pre_tokenizer"] = nullptr;
  j["post_processor"] = nullptr;
  j["decoder"] = nullptr;
  return j;
}

Tokenizer load_json(const json& j, const std::string& name) {
  const fs::path dir = qf::test::tmp_dir("tok_" + name);
  write_file(dir / "tokenizer.json", j.dump());
  return Tokenizer::from_tokenizer_json(dir / "tokenizer.json");
}

json metaspace(const std::string& scheme) {
  json j = base_json();
  j["pre_tokenizer"] = {{"type", "Metaspace"}, {"replacement", kMeta}, {"prepend_scheme", scheme}, {"split", true}};
  j["decoder"] = {{"type", "Metaspace"}, {"replacement", kMeta}, {"prepend_scheme", scheme}, {"split", true}};
  return j;
}

TEST(Tokenizer, MetaspaceSchemes) {
  auto first = load_json(metaspace("first"), "ms_first");
  EXPECT_EQ(first.info().kind, "spm-bpe");
  EXPECT_EQ(first.encode("hi hi", false), (std::vector<int32_t>{7, 7}));
  EXPECT_EQ(first.encode("<s>hi", false), (std::vector<int32_t>{1, 6}));  // not at offset 0: no prefix
  EXPECT_EQ(first.encode(" hi", false), (std::vector<int32_t>{7}));       // already starts with ▁
  EXPECT_EQ(first.decode({7, 7}), "hi hi");
  auto always = load_json(metaspace("always"), "ms_always");
  EXPECT_EQ(always.encode("<s>hi", false), (std::vector<int32_t>{1, 7}));
  auto never = load_json(metaspace("never"), "ms_never");
  EXPECT_EQ(never.encode("hi hi", false), (std::vector<int32_t>{6, 7}));
  EXPECT_EQ(never.decode({6, 7}), "hi hi");
  // Byte fallback: é = C3 A9; without byte pieces: one fused <unk> for a run of unknown chars.
  EXPECT_EQ(never.encode("\xC3\xA9", false), (std::vector<int32_t>{8, 9}));
  EXPECT_EQ(never.encode("xyz", false), (std::vector<int32_t>{0}));
  json nofuse = metaspace("never");
  nofuse["model"]["fuse_unk"] = false;
  EXPECT_EQ(load_json(nofuse, "ms_nofuse").encode("xyz", false), (std::vector<int32_t>{0, 0, 0}));
  json nofallback = metaspace("never");
  nofallback["model"]["byte_fallback"] = false;
  EXPECT_EQ(load_json(nofallback, "ms_nofb").encode("\xC3\xA9hi", false), (std::vector<int32_t>{0, 6}));
}

TEST(Tokenizer, LegacyNormalizerAndPairMerges) {
  json j = base_json();
  j["normalizer"] = {{"type", "Sequence"}, {"normalizers", json::array({
      {{"type", "Prepend"}, {"prepend", kMeta}},
      {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", kMeta}}})}};
  j["decoder"] = {{"type", "Sequence"}, {"decoders", json::array({
      {{"type", "Replace"}, {"pattern", {{"String", kMeta}}}, {"content", " "}},
      {{"type", "ByteFallback"}}, {{"type", "Fuse"}},
      {{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}}})}};
  j["post_processor"] = {{"type", "TemplateProcessing"},
                         {"single", json::array({{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}},
                                                 {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}})},
                         {"special_tokens", {{"<s>", {{"id", "<s>"}, {"ids", {1}}, {"tokens", {"<s>"}}}}}}};
  auto a = load_json(j, "legacy_str");
  j["model"]["merges"] = json::array({json::array({"h", "i"}), json::array({kMeta, "hi"})});
  auto b = load_json(j, "legacy_pair");
  for (const Tokenizer* t : {&a, &b}) {
    EXPECT_EQ(t->encode("hi hi"), (std::vector<int32_t>{1, 7, 7}));
    EXPECT_EQ(t->encode("<s>hi", false), (std::vector<int32_t>{1, 7}));
    EXPECT_EQ(t->encode("hi\xC3\xA9", false), (std::vector<int32_t>{7, 8, 9}));
    EXPECT_EQ(t->decode({1, 7, 8, 9}, true), "hi\xC3\xA9");
    EXPECT_EQ(t->info().n_merges, 2);
    EXPECT_TRUE(t->info().add_bos);
  }
}

TEST(Tokenizer, AddedTokenOptions) {
  json j = metaspace("never");
  j["model"]["vocab"]["x"] = 11;
  j["added_tokens"].push_back({{"id", 20}, {"content", "<tag>"}, {"special", false}, {"lstrip", true}, {"rstrip", true}});
  j["added_tokens"].push_back({{"id", 21}, {"content", "<tag>more"}, {"special", true}});
  j["added_tokens"].push_back({{"id", 22}, {"content", "xx"}, {"special", false}, {"single_word", true}});
  auto t = load_json(j, "added");
  EXPECT_EQ(t.vocab_size(), 23);
  EXPECT_EQ(t.info().n_added, 6);
  // lstrip/rstrip swallow the spaces around; non-special added tokens match even without
  // parse_special, the longer special one only with it.
  EXPECT_EQ(t.encode("hi  <tag> hi", false), (std::vector<int32_t>{6, 20, 6}));
  EXPECT_EQ(t.encode("hi<tag>more", false, true), (std::vector<int32_t>{6, 21}));
  EXPECT_EQ(t.encode("hi<tag>more", false, false), (std::vector<int32_t>{6, 20, 0}));
  // single_word: only as a whole word.
  EXPECT_EQ(t.encode("xx hi", false), (std::vector<int32_t>{22, 7}));
  EXPECT_EQ(t.encode("xxx", false), (std::vector<int32_t>{11, 11, 11}));
  EXPECT_FALSE(t.is_special(20));
  EXPECT_TRUE(t.is_special(21));
  EXPECT_EQ(t.decode({6, 20, 21}, true), "hi<tag>");
}

TEST(Tokenizer, ByteLevelGpt2Style) {
  // Vocab = the 256 byte characters plus a few merges; ByteLevel does the regex split itself.
  json j = base_json();
  j["added_tokens"] = json::array({{{"id", 300}, {"content", "<|endoftext|>"}, {"special", true}}});
  json vocab = json::object();
  std::vector<std::string> bytes(256);
  {  // GPT-2 byte -> unicode table
    int extra = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
      const uint32_t cp = printable ? b : 256 + extra++;
      std::string s;
      if (cp < 0x80) s += static_cast<char>(cp);
      else s += static_cast<char>(0xC0 | (cp >> 6)), s += static_cast<char>(0x80 | (cp & 0x3F));
      bytes[b] = s;
      vocab[s] = b;
    }
  }
  const std::string G = bytes[' '];  // "Ġ"
  vocab[G + "h"] = 256, vocab["el"] = 257, vocab[G + "hel"] = 258, vocab["lo"] = 259, vocab[G + "hello"] = 260;
  j["model"] = {{"type", "BPE"}, {"vocab", vocab},
                {"merges", json::array({G + " h", "e l", G + "h el", "l o", G + "hel lo"})}};
  j["pre_tokenizer"] = {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"use_regex", true}};
  j["decoder"] = {{"type", "ByteLevel"}};
  auto t = load_json(j, "bytelevel");
  EXPECT_EQ(t.info().kind, "byte-bpe");
  EXPECT_FALSE(t.info().pre_tokenizer.empty());
  // add_prefix_space: "hello" is encoded as " hello".
  EXPECT_EQ(t.encode("hello", false), (std::vector<int32_t>{260}));
  EXPECT_EQ(t.encode("hello hello", false), (std::vector<int32_t>{260, 260}));
  EXPECT_EQ(t.encode("hello<|endoftext|>", false), (std::vector<int32_t>{260, 300}));
  EXPECT_EQ(t.decode({260, 260, 300}), " hello hello<|endoftext|>");
  EXPECT_EQ(t.decode({260, 300}, true), " hello");
  const std::string odd = "\xF0\x9F\xA6\x99 \xFF\x01";
  EXPECT_EQ(t.decode(t.encode(odd, false)), " \xF0\x9F\xA6\x99 \xEF\xBF\xBD\x01");
  EXPECT_TRUE(t.is_eos(300));
}

TEST(Tokenizer, MiniLlamaFixture) {
  QF_REQUIRE_DATA("tokenizers/llama3.2-bpe/mini_llama_tokenizer.json");
  auto t = Tokenizer::from_tokenizer_json(qf::test::data_dir() / "tokenizers/llama3.2-bpe/mini_llama_tokenizer.json");
  EXPECT_EQ(t.info().kind, "byte-bpe");
  EXPECT_NE(t.info().pre_tokenizer.find("\\p{N}{1,3}"), std::string::npos);
  EXPECT_EQ(t.info().bos_id, 128000);
  EXPECT_EQ(t.vocab_size(), 128002);
  const std::string text = "Hello, world! 123 <|begin_of_text|>";
  const auto ids = t.encode(text, false);
  EXPECT_EQ(ids.back(), 128000);
  EXPECT_EQ(t.decode(ids), text);
}

// ---- broken files -------------------------------------------------------------------------------

TEST(Tokenizer, Errors) {
  const fs::path dir = qf::test::tmp_dir("tok_errors");
  expect_error([&] { Tokenizer::from_tokenizer_json(dir / "missing.json"); }, "missing.json");
  expect_error([&] { Tokenizer::load(dir); }, "tok_errors");

  write_file(dir / "malformed.json", "{\"model\": {\"type\": \"BPE\",");
  expect_error([&] { Tokenizer::from_tokenizer_json(dir / "malformed.json"); }, "malformed.json");

  json j = base_json();
  j["model"]["type"] = "Unigram";
  write_file(dir / "unigram.json", j.dump());
  expect_error([&] { Tokenizer::from_tokenizer_json(dir / "unigram.json"); }, "unigram.json");

  j = base_json();
  j["model"]["merges"] = json::array({"h i", "q z"});
  write_file(dir / "badmerge.json", j.dump());
  expect_error([&] { Tokenizer::from_tokenizer_json(dir / "badmerge.json"); }, "badmerge.json");

  j = base_json();
  j["model"]["merges"] = json::array({"hi"});
  write_file(dir / "merge1.json", j.dump());
  expect_error([&] { Tokenizer::from_tokenizer_json(dir / "merge1.json"); }, "merge1.json");

  j = base_json();
  j["added_tokens"].push_back({{"id", 4}, {"content", "<clash>"}, {"special", true}});
  write_file(dir / "clash.json", j.dump());
  expect_error([&] { Tokenizer::from_tokenizer_json(dir / "clash.json"); }, "clash.json");

  j = base_json();
  j["model"]["vocab"]["bad"] = "seven";
  write_file(dir / "badid.json", j.dump());
  expect_error([&] { Tokenizer::from_tokenizer_json(dir / "badid.json"); }, "badid.json");

  j = base_json();
  j["pre_tokenizer"] = {{"type", "Split"}, {"pattern", {{"Regex", "(unclosed"}}}, {"behavior", "Isolated"}};
  write_file(dir / "badregex.json", j.dump());
  expect_error([&] { Tokenizer::from_tokenizer_json(dir / "badregex.json"); }, "badregex.json");

  j = base_json();
  j["model"] = json::array();
  write_file(dir / "nomodel.json", j.dump());
  expect_error([&] { Tokenizer::from_tokenizer_json(dir / "nomodel.json"); }, "nomodel.json");

  write_file(dir / "vocab.json", "[1, 2, 3]");
  write_file(dir / "merges.txt", "#version: 0.2\na b\n");
  expect_error([&] { Tokenizer::from_vocab_merges(dir / "vocab.json", dir / "merges.txt"); }, "vocab.json");
  write_file(dir / "vocab.json", "{\"a\": 0, \"b\": 1, \"ab\": 2}");
  write_file(dir / "merges.txt", "#version: 0.2\na b\na c\n");
  expect_error([&] { Tokenizer::from_vocab_merges(dir / "vocab.json", dir / "merges.txt"); }, "merges.txt");
  write_file(dir / "merges.txt", "a b\nabc\n");
  expect_error([&] { Tokenizer::from_vocab_merges(dir / "vocab.json", dir / "merges.txt"); }, "merges.txt");
  write_file(dir / "merges.txt", "a b\n");
  write_file(dir / "tokenizer_config.json", "{\"added_tokens_decoder\": {\"1\": {\"content\": \"<x>\"}}}");
  expect_error([&] { Tokenizer::from_vocab_merges(dir / "vocab.json", dir / "merges.txt", "", dir / "tokenizer_config.json"); },
               "tokenizer_config.json");
  // ... and the good version of the same files loads (merges.txt without a #version line).
  auto ok = Tokenizer::from_vocab_merges(dir / "vocab.json", dir / "merges.txt");
  EXPECT_EQ(ok.info().n_merges, 1);
  EXPECT_EQ(ok.encode("ab", false), (std::vector<int32_t>{2}));
}

}  // namespace
