// Internal state of qf::Tokenizer, shared by tokenizer.cpp (loading, encode/decode) and
// stream_decoder.cpp.
#pragma once
#include <array>
#include <optional>
#include <string>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "tokenizer/bpe.h"
#include "tokenizer/pipeline.h"
#include "tokenizer/tokenizer.h"

namespace qf {

struct AddedToken {
  std::string content;
  int32_t id = -1;
  bool special = false, lstrip = false, rstrip = false, single_word = false, normalized = false;
};

struct Tokenizer::Impl {
  TokenizerInfo info;
  tok::BpeModel model;
  tok::Normalizer normalizer;
  tok::PreTokenizer pre;
  tok::Decoder decoder;

  std::vector<AddedToken> added;
  std::unordered_map<int32_t, size_t> added_by_id;
  std::array<std::vector<uint32_t>, 256> added_by_byte;  // candidates by first byte, longest first
  std::unordered_set<int32_t> special_ids, eos_ids;

  // Post-processing: template ids, and tokenizer_config.json overrides.
  std::vector<int32_t> template_prefix, template_suffix, prefix, suffix;
  std::optional<bool> cfg_add_bos, cfg_add_eos;
  bool cfg_names_bos = false, cfg_names_eos = false;
  std::vector<std::string> cfg_specials;  // bos/eos/unk/pad/additional tokens named in the config
  std::string cfg_where;                  // tokenizer_config.json, for errors about its settings

  // Loading.
  void add_added(AddedToken t, const std::string& where);
  void parse_post_processor(const json& p, const std::string& where);
  void apply_config(const json& cfg, const std::string& where);
  void finalize(const std::string& kind, const std::string& where);  // where: the main file

  // Encoding / decoding.
  void encode_text(std::string_view text, bool at_start, std::vector<int32_t>& out) const;
  std::string decode_raw(const int32_t* ids, size_t n, bool skip_special) const;  // bytes, unrepaired
  const std::string* token_str(int32_t id) const;
  std::optional<int32_t> find(std::string_view s) const;
};

}  // namespace qf
