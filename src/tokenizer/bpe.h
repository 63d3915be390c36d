// The BPE model of HF tokenizers: vocabulary, ranked merges, and the merge loop for one word
// (pre-token). The loop is a linked list of symbols plus a min-heap of candidate merges keyed
// by (rank, position), which is HF's order and O(n log n) - the SentencePiece layout feeds the
// whole text as one word, so the quadratic rescan is not an option.
#pragma once
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace qf::tok {

// Heterogeneous lookup: find a std::string key by string_view without allocating.
struct SvHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
using TokenMap = std::unordered_map<std::string, int32_t, SvHash, std::equal_to<>>;

// One symbol of the word being merged: a doubly linked list over a vector; len 0 = merged away.
struct BpeSymbol {
  int32_t id;
  int32_t prev, next;
  uint32_t len;
};

// Token ids: below kMaxTokenId at all, and below (number of tokens) + kMaxIdGap. Ids may have
// holes (hand-trimmed test vocabularies keep the original ids), but the id -> token table is
// dense, so one hostile id of 6e7 must not cost gigabytes. Real vocabularies are dense or nearly.
constexpr int32_t kMaxTokenId = 1 << 26;
constexpr int32_t kMaxIdGap = 1 << 20;

class BpeModel {
 public:
  // `where` names the file for error messages. Vocab ids may have holes.
  void set_vocab(std::vector<std::pair<std::string, int32_t>> vocab, const std::string& where);
  // Merges in rank order; a later duplicate pair overrides an earlier one (as HF's HashMap).
  void set_merges(const std::vector<std::pair<std::string, std::string>>& merges,
                  const std::string& where);
  void set_options(std::optional<int32_t> unk_id, bool fuse_unk, bool byte_fallback,
                   bool ignore_merges, bool byte_level);

  // Appends the ids of one pre-token. For byte-level models `word` holds raw bytes; they are
  // mapped through the GPT-2 byte table before lookup.
  void encode_word(std::string_view word, std::vector<int32_t>& out) const;

  std::optional<int32_t> find(std::string_view tok) const {
    auto it = vocab_.find(tok);
    if (it == vocab_.end()) return std::nullopt;
    return it->second;
  }
  int32_t size() const { return static_cast<int32_t>(id_to_tok_.size()); }  // largest id + 1
  int32_t n_tokens() const { return static_cast<int32_t>(vocab_.size()); }
  const std::string* token(int32_t id) const {
    if (id < 0 || id >= size() || !has_id_[id]) return nullptr;
    return &id_to_tok_[id];
  }
  int32_t n_merges() const { return n_merges_; }
  bool byte_level() const { return byte_level_; }

 private:
  void add_unk(std::vector<BpeSymbol>& syms, uint32_t len, bool& prev_unk) const;

  TokenMap vocab_;
  std::vector<std::string> id_to_tok_;
  std::vector<char> has_id_;
  std::unordered_map<uint64_t, std::pair<int32_t, int32_t>> merges_;  // (a,b) -> (rank, new id)
  int32_t n_merges_ = 0;
  std::optional<int32_t> unk_id_;
  bool fuse_unk_ = false, byte_fallback_ = false, ignore_merges_ = false, byte_level_ = false;
  int32_t byte_token_[256];  // id of "<0xXX>" (byte fallback), -1 when absent
  int32_t byte_char_[256];   // byte-level: id of the byte's mapped character, -1 when absent
};

}  // namespace qf::tok
