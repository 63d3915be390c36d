// PCRE2 wrapper for pre-tokenizer patterns. Compiled with UTF + UCP (so \p{L}, \s follow
// Unicode like the Oniguruma regexes of HF tokenizers) and MATCH_INVALID_UTF so arbitrary
// bytes never make matching fail: invalid sequences are simply never part of a match.
#pragma once
#include <cstddef>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace qf::tok {

class Regex {
 public:
  // Throws qf::Error("regex ...: <reason>") on a bad pattern; callers prefix the file name.
  explicit Regex(const std::string& pattern, bool literal = false);
  ~Regex();
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // Appends the [start, end) byte spans of all non-overlapping matches, left to right.
  void find_all(std::string_view s, std::vector<std::pair<size_t, size_t>>& out) const;
  const std::string& pattern() const { return pattern_; }

 private:
  std::string pattern_;
  void* code_ = nullptr;  // pcre2_code_8*
};

// The default GPT-2 pre-tokenizer pattern (ByteLevel use_regex, vocab.json + merges.txt).
extern const char* const kGpt2Pattern;
extern const char* const kQwen2Pattern;

}  // namespace qf::tok
