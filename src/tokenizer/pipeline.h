// The text stages of an HF tokenizer.json around the BPE model: normalizer, pre-tokenizer and
// decoder, each parsed from its JSON object (Sequence nesting flattened) into a list of steps.
#pragma once
#include <memory>
#include <string>
#include <utility>
#include <string_view>
#include <vector>

#include "core/json_file.h"
#include "tokenizer/regex.h"

namespace qf::tok {

// ---- normalizer -------------------------------------------------------------------------------
class Normalizer {
 public:
  // `where` names the file for error messages; null JSON means no normalization.
  void parse(const json& j, const std::string& where);
  void add_nfc();  // Qwen2's slow tokenizer normalizes to NFC before pre-tokenizing
  std::string apply(std::string_view s) const;
  bool empty() const { return steps_.empty(); }

 private:
  struct Step {
    enum Kind { kPrepend, kReplace, kReplaceRegex, kNFC, kNFD, kNFKC, kNFKD, kLowercase, kStrip } kind;
    Step(Kind k, std::string a_ = {}, std::string b_ = {}) : kind(k), a(std::move(a_)), b(std::move(b_)) {}
    std::string a, b;
    bool left = false, right = false;
    std::shared_ptr<Regex> re;
  };
  std::vector<Step> steps_;
};

// ---- pre-tokenizer ----------------------------------------------------------------------------
struct PreToken {
  std::string text;
  bool at_start;  // begins at offset 0 of the whole input (Metaspace prepend_scheme "first")
};

class PreTokenizer {
 public:
  void parse(const json& j, const std::string& where);
  // GPT-2 layout: one Split(pattern, Isolated) + byte-level mapping.
  void set_regex(const std::string& pattern, const std::string& where);
  // Splits `pieces` in place.
  void apply(std::vector<PreToken>& pieces) const;
  bool byte_level() const { return byte_level_; }
  const std::string& pattern() const { return pattern_; }  // first regex, "" when none

 private:
  enum class Behavior { kIsolated, kRemoved, kMergedWithPrevious, kMergedWithNext, kContiguous };
  struct Step {
    enum Kind { kSplit, kByteLevel, kMetaspace } kind;
    explicit Step(Kind k) : kind(k) {}
    std::shared_ptr<Regex> re;
    Behavior behavior = Behavior::kIsolated;
    bool invert = false;
    bool add_prefix_space = false;
    std::string replacement;
    enum Scheme { kAlways, kFirst, kNever } scheme = kAlways;
    bool split = true;
  };
  void parse_one(const json& j, const std::string& where);
  static void split(const Step& st, std::vector<PreToken>& pieces);
  std::vector<Step> steps_;
  bool byte_level_ = false;
  std::string pattern_;
};

// ---- decoder ----------------------------------------------------------------------------------
// Works like HF's decode_chain on the list of token strings, except that bytes are kept raw:
// invalid UTF-8 is repaired once at the end (callers), so incremental decoding can hold back a
// character split across tokens.
class Decoder {
 public:
  void parse(const json& j, const std::string& where);
  void set_byte_level();
  std::string apply(std::vector<std::string> tokens) const;
  bool byte_level() const { return byte_level_; }
  bool empty() const { return steps_.empty(); }

 private:
  struct Step {
    enum Kind { kReplace, kByteFallback, kFuse, kStrip, kByteLevel, kMetaspace } kind;
    Step(Kind k, std::string a_ = {}, std::string b_ = {}) : kind(k), a(std::move(a_)), b(std::move(b_)) {}
    std::string a, b;
    size_t start = 0, stop = 0;
    bool strip_first = false;  // Metaspace: drop the first token's leading space
  };
  void parse_one(const json& j, const std::string& where);
  std::vector<Step> steps_;
  bool byte_level_ = false;
};

}  // namespace qf::tok
