// Tokenizers as Hugging Face folders ship them: tokenizer.json (+ tokenizer_config.json), or the
// GPT-2 style vocab.json + merges.txt pair. Two model families are supported:
//  - SentencePiece-style BPE with byte fallback (Llama 2, Mistral): normalizer-driven, no regex;
//  - byte-level BPE with regex pre-tokenization (GPT-2, Llama 3, Qwen2).
#pragma once
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace qf {

struct TokenizerInfo {
  std::string kind;            // "spm-bpe" or "byte-bpe"
  int32_t vocab_size = 0;      // including added tokens
  int32_t n_merges = 0;
  int32_t n_added = 0;
  std::optional<int32_t> bos_id, eos_id, unk_id, pad_id;
  bool add_bos = false, add_eos = false;
  std::string pre_tokenizer;   // regex pattern or "" for none
  std::optional<std::string> chat_template;
};

class Tokenizer {
 public:
  // Looks in `dir` for tokenizer.json, else vocab.json + merges.txt; reads tokenizer_config.json
  // when present (special tokens, add_bos_token/add_eos_token, chat_template).
  static Tokenizer load(const std::filesystem::path& dir);
  // Whether `dir` holds tokenizer files that load() would read (it may still fail to load them).
  static bool present(const std::filesystem::path& dir);
  static Tokenizer from_tokenizer_json(const std::filesystem::path& tokenizer_json,
                                       const std::optional<std::filesystem::path>& config = {});
  // GPT-2 style files; `pattern` is the pre-tokenizer regex (GPT-2's when empty).
  static Tokenizer from_vocab_merges(const std::filesystem::path& vocab_json,
                                     const std::filesystem::path& merges_txt,
                                     const std::string& pattern = "",
                                     const std::optional<std::filesystem::path>& config = {});

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  // add_special: add BOS/EOS as the tokenizer's rules say (add_bos_token etc.).
  // parse_special: recognise added/special token text such as "<|im_start|>" in the input.
  std::vector<int32_t> encode(std::string_view text, bool add_special = true,
                              bool parse_special = true) const;
  std::string decode(const std::vector<int32_t>& ids, bool skip_special = false) const;

  std::string id_to_token(int32_t id) const;               // raw vocabulary string
  std::optional<int32_t> token_to_id(std::string_view token) const;
  bool is_special(int32_t id) const;
  bool is_eos(int32_t id) const;                           // eos and other end-of-turn ids
  const TokenizerInfo& info() const;
  int32_t vocab_size() const { return info().vocab_size; }

 private:
  struct Impl;
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
  friend class StreamDecoder;
};

// Incremental decoding for streaming: push ids one at a time and get back only text that is
// complete UTF-8 and will not change when later ids arrive (e.g. byte-fallback pieces of one
// character, or the leading-space strip of SentencePiece decoders).
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tok, bool skip_special = true);
  std::string push(int32_t id);
  std::string flush();  // whatever is left, invalid bytes replaced by U+FFFD

 private:
  const Tokenizer& tok_;
  bool skip_special_;
  std::vector<int32_t> ids_;     // ids pushed (skipped specials left out)
  size_t window_ = 0;            // ids_[window_..] are re-decoded on each push
  size_t emitted_bytes_ = 0;     // bytes of decode(ids_[window_..]) already returned
};

}  // namespace qf
