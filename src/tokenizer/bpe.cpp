#include "tokenizer/bpe.h"

#include <cstdio>
#include <queue>
#include <tuple>

#include "core/error.h"
#include "tokenizer/unicode.h"

namespace qf::tok {

namespace {
uint64_t pair_key(int32_t a, int32_t b) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(a)) << 32) | static_cast<uint32_t>(b);
}
inline std::string qtok(std::string_view s) { return quote_for_error(s); }
}  // namespace

void BpeModel::set_vocab(std::vector<std::pair<std::string, int32_t>> vocab, const std::string& where) {
  if (vocab.empty()) fail(where, ": the vocabulary is empty (a tokenizer needs tokens)");
  const int64_t limit = std::min<int64_t>(static_cast<int64_t>(vocab.size()) + kMaxIdGap, kMaxTokenId);
  int32_t max_id = -1;
  for (const auto& [tok, id] : vocab) {
    if (id < 0 || id >= limit)
      fail(where, ": vocab token ", qtok(tok), " has id ", id, ", out of range: ", vocab.size(),
           " tokens may use ids below ", limit);
    max_id = std::max(max_id, id);
  }
  id_to_tok_.assign(static_cast<size_t>(max_id + 1), std::string());
  has_id_.assign(static_cast<size_t>(max_id + 1), 0);
  vocab_.clear();
  vocab_.reserve(vocab.size());
  for (auto& [tok, id] : vocab) {
    if (has_id_[id])
      fail(where, ": vocab id ", id, " is used by both ", qtok(id_to_tok_[id]), " and ", qtok(tok));
    has_id_[id] = 1;
    id_to_tok_[id] = tok;
    vocab_.emplace(std::move(tok), id);
  }
}

void BpeModel::set_merges(const std::vector<std::pair<std::string, std::string>>& merges,
                          const std::string& where) {
  merges_.clear();
  merges_.reserve(merges.size());
  int32_t rank = 0;
  for (const auto& [a, b] : merges) {
    auto ia = find(a), ib = find(b);
    if (!ia || !ib)
      fail(where, ": merge ", rank, " (", qtok(a + " " + b), ") references token ",
           qtok(!ia ? a : b), " which is not in the vocab");
    auto inew = find(a + b);
    if (!inew)
      fail(where, ": merge ", rank, " (", qtok(a + " " + b), ") produces ", qtok(a + b),
           " which is not in the vocab");
    merges_[pair_key(*ia, *ib)] = {rank, *inew};
    ++rank;
  }
  n_merges_ = rank;
}

void BpeModel::set_options(std::optional<int32_t> unk_id, bool fuse_unk, bool byte_fallback,
                           bool ignore_merges, bool byte_level) {
  unk_id_ = unk_id;
  fuse_unk_ = fuse_unk;
  byte_fallback_ = byte_fallback;
  ignore_merges_ = ignore_merges;
  byte_level_ = byte_level;
  const auto& table = byte_to_unicode();
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    byte_token_[b] = find(name).value_or(-1);
    byte_char_[b] = find(table[b]).value_or(-1);
  }
}

void BpeModel::add_unk(std::vector<BpeSymbol>& syms, uint32_t len, bool& prev_unk) const {
  if (!unk_id_) return;  // HF would fail; dropping the piece keeps encode total
  if (fuse_unk_ && prev_unk) {
    syms.back().len += len;
  } else {
    const auto n = static_cast<int32_t>(syms.size());
    syms.push_back({*unk_id_, n - 1, n + 1, len});
  }
  prev_unk = true;
}

void BpeModel::encode_word(std::string_view word, std::vector<int32_t>& out) const {
  if (word.empty()) return;
  const auto& table = byte_to_unicode();
  if (ignore_merges_) {  // Llama 3: a pre-token that is itself a token is emitted whole
    if (byte_level_) {
      std::string mapped;
      mapped.reserve(word.size() * 2);
      for (char c : word) mapped += table[static_cast<uint8_t>(c)];
      if (auto id = find(mapped)) return out.push_back(*id);
    } else if (auto id = find(word)) {
      return out.push_back(*id);
    }
  }

  thread_local std::vector<BpeSymbol> syms;
  syms.clear();
  auto push = [&](int32_t id, uint32_t len) {
    const auto n = static_cast<int32_t>(syms.size());
    syms.push_back({id, n - 1, n + 1, len});
  };
  bool prev_unk = false;
  auto fallback_or_unk = [&](std::string_view piece) {
    if (byte_fallback_) {
      bool all = true;
      for (char c : piece) all = all && byte_token_[static_cast<uint8_t>(c)] >= 0;
      if (all) {
        for (char c : piece) push(byte_token_[static_cast<uint8_t>(c)], 1);
        prev_unk = false;
        return;
      }
    }
    add_unk(syms, static_cast<uint32_t>(piece.size()), prev_unk);
  };
  if (byte_level_) {
    for (size_t i = 0; i < word.size(); ++i) {
      const int32_t id = byte_char_[static_cast<uint8_t>(word[i])];
      if (id >= 0) {
        push(id, 1);
        prev_unk = false;
      } else {
        fallback_or_unk(word.substr(i, 1));
      }
    }
  } else {
    size_t i = 0;
    while (i < word.size()) {  // one symbol per character; an invalid byte is its own symbol
      const Utf8Step st = utf8_step(word, i);
      const size_t len = st.kind == Utf8Step::kValid ? st.len : 1;
      const std::string_view ch = word.substr(i, len);
      if (auto id = find(ch)) {
        push(*id, static_cast<uint32_t>(len));
        prev_unk = false;
      } else {
        fallback_or_unk(ch);
      }
      i += len;
    }
  }
  if (syms.empty()) return;
  syms.back().next = -1;

  // Candidate merges ordered by (rank, left position) - the order HF's BinaryHeap pops them.
  using Cand = std::tuple<int32_t, int32_t, int32_t>;  // rank, pos, new id
  thread_local std::vector<Cand> heap_store;
  heap_store.clear();
  std::priority_queue<Cand, std::vector<Cand>, std::greater<Cand>> heap(std::greater<Cand>(),
                                                                        std::move(heap_store));
  auto consider = [&](int32_t pos) {
    const int32_t nx = syms[pos].next;
    if (nx < 0) return;
    auto it = merges_.find(pair_key(syms[pos].id, syms[nx].id));
    if (it != merges_.end()) heap.emplace(it->second.first, pos, it->second.second);
  };
  for (int32_t i = 0; i + 1 < static_cast<int32_t>(syms.size()); ++i) consider(i);
  while (!heap.empty()) {
    const auto [rank, pos, new_id] = heap.top();
    heap.pop();
    BpeSymbol& s = syms[pos];
    if (s.len == 0 || s.next < 0) continue;
    BpeSymbol& r = syms[s.next];
    // Stale entry: one side was merged since it was queued.
    auto it = merges_.find(pair_key(s.id, r.id));
    if (it == merges_.end() || it->second.second != new_id) continue;
    s.id = new_id;
    s.len += r.len;
    r.len = 0;
    s.next = r.next;
    if (s.next >= 0) syms[s.next].prev = pos;
    if (s.prev >= 0) consider(s.prev);
    consider(pos);
  }
  for (int32_t i = 0; i >= 0; i = syms[i].next) out.push_back(syms[i].id);
}

}  // namespace qf::tok
