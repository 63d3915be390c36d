// tokenizer_config.json (tokenizer/tokenizer.cpp: Tokenizer::load, its special tokens,
// added_tokens_decoder, add_bos_token/add_eos_token and chat_template), the whole input, beside
// a fixed small tokenizer.json written once: a Llama-style SentencePiece BPE with byte fallback,
// <unk>/<s>/</s> and chat markers in the vocabulary, so that names in the config resolve.
#include "core/json_file.h"
#include "fuzz_common.h"
#include "tokenizer_exercise.h"

using namespace qf;

namespace {

std::string fixed_tokenizer_json() {
  json vocab = json::object();
  int id = 0;
  for (const char* t : {"<unk>", "<s>", "</s>"}) vocab[t] = id++;
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    vocab[name] = id++;
  }
  const std::string sp = "\xe2\x96\x81";  // U+2581, SentencePiece's space
  for (const std::string& t : {sp, std::string("h"), std::string("e"), std::string("l"), std::string("o"),
                              sp + "h", std::string("he"), sp + "he", std::string("ll"), sp + "hell",
                              std::string("<|im_start|>"), std::string("<|im_end|>"), std::string("<pad>"),
                              std::string("<|endoftext|>"), std::string("<|eot_id|>")})
    vocab[t] = id++;
  const json merges = json::array({json::array({sp, "h"}), json::array({"h", "e"}), json::array({sp + "h", "e"}),
                                   json::array({"l", "l"}), json::array({sp + "he", "ll"})});
  json added = json::array();
  for (int i = 0; i < 3; ++i)
    added.push_back({{"id", i}, {"content", i == 0 ? "<unk>" : i == 1 ? "<s>" : "</s>"}, {"single_word", false},
                     {"lstrip", false}, {"rstrip", false}, {"normalized", false}, {"special", true}});
  const json j = {
      {"version", "1.0"},
      {"added_tokens", added},
      {"normalizer", {{"type", "Sequence"},
                      {"normalizers", json::array({{{"type", "Prepend"}, {"prepend", sp}},
                                                   {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", sp}}})}}},
      {"pre_tokenizer", nullptr},
      {"post_processor", {{"type", "TemplateProcessing"},
                          {"single", json::array({{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}},
                                                  {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}})},
                          {"special_tokens", {{"<s>", {{"id", "<s>"}, {"ids", {1}}, {"tokens", {"<s>"}}}}}}}},
      {"decoder", {{"type", "Sequence"},
                   {"decoders", json::array({{{"type", "Replace"}, {"pattern", {{"String", sp}}}, {"content", " "}},
                                             {{"type", "ByteFallback"}}, {{"type", "Fuse"}},
                                             {{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}}})}}},
      {"model", {{"type", "BPE"}, {"unk_token", "<unk>"}, {"fuse_unk", true}, {"byte_fallback", true},
                 {"vocab", vocab}, {"merges", merges}}},
  };
  return j.dump();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const std::filesystem::path dir = [] {
    auto d = fuzz::fresh_subdir("tok");
    fuzz::write_file(d / "tokenizer.json", fixed_tokenizer_json());
    Tokenizer::load(d);  // the fixed file alone must load
    return d;
  }();
  fuzz::write_file(dir / "tokenizer_config.json", std::string_view(reinterpret_cast<const char*>(data), size));
  fuzz::expect_errors([&] { fuzz::exercise_tokenizer(Tokenizer::load(dir)); });
  return 0;
}
