#include "engine/block_manager.h"

#include <algorithm>
#include <unordered_set>

#include "core/error.h"

namespace qf {

BlockManager::BlockManager(int32_t num_blocks, int32_t block_size) : block_size_(block_size) {
  QF_CHECK(num_blocks >= 0 && block_size > 0, "a KV block pool needs a positive block size");
  blocks_.resize(static_cast<size_t>(num_blocks));
  free_.reserve(static_cast<size_t>(num_blocks));
  for (int32_t b = num_blocks - 1; b >= 0; --b) free_.push_back(b);  // block 0 is taken first
}

uint64_t BlockManager::chain_hash(uint64_t parent, const int32_t* tokens, int32_t n) {
  // FNV-1a over the parent's hash and the tokens, then a final mix (splitmix64).
  uint64_t h = 1469598103934665603ull ^ parent;
  for (int32_t i = 0; i < n; ++i) h = (h ^ static_cast<uint32_t>(tokens[i])) * 1099511628211ull;
  h ^= h >> 30;
  h *= 0xbf58476d1ce4e5b9ull;
  h ^= h >> 27;
  h *= 0x94d049bb133111ebull;
  return h ^ (h >> 31);
}

std::optional<int32_t> BlockManager::cached_block(uint64_t hash, int32_t parent, const int32_t* tokens) const {
  const auto it = by_hash_.find(hash);
  if (it == by_hash_.end()) return std::nullopt;
  const Block& b = blocks_[static_cast<size_t>(it->second)];
  if (b.parent != parent || !std::equal(b.tokens.begin(), b.tokens.end(), tokens)) return std::nullopt;
  return it->second;
}

int32_t BlockManager::take_block() {
  if (!free_.empty()) {
    const int32_t b = free_.back();
    free_.pop_back();
    return b;
  }
  QF_CHECK(!evictable_.empty(), "KV block pool: no block to take (callers check availability first)");
  const int32_t b = evictable_.front();  // least recently used
  evictable_.pop_front();
  Block& blk = blocks_[static_cast<size_t>(b)];
  by_hash_.erase(blk.hash);
  blk.cached = false;
  blk.parent = -1;
  blk.tokens.clear();
  return b;
}

void BlockManager::hold(int32_t block) {
  Block& b = blocks_[static_cast<size_t>(block)];
  if (b.refs == 0 && b.cached) evictable_.erase(b.lru);
  ++b.refs;
}

void BlockManager::release(int32_t block) {
  Block& b = blocks_[static_cast<size_t>(block)];
  QF_CHECK(b.refs > 0, "KV block pool: block released more often than held");
  if (--b.refs > 0) return;
  if (b.cached) {
    evictable_.push_back(block);  // most recently used at the back
    b.lru = std::prev(evictable_.end());
  } else {
    free_.push_back(block);
  }
}

std::vector<BlockManager::Hit> BlockManager::cached_prefix(const std::vector<int32_t>& tokens) const {
  const int64_t n = static_cast<int64_t>(tokens.size());
  // Reused blocks end before the last token: its logits must be computed, so its block is new.
  const int64_t reusable = n > 0 ? (n - 1) / block_size_ : 0;
  std::vector<Hit> hits;
  uint64_t h = 0;
  int32_t parent = -1;
  for (int64_t i = 0; i < reusable; ++i) {
    const int32_t* t = tokens.data() + i * block_size_;
    h = chain_hash(h, t, block_size_);
    const auto b = cached_block(h, parent, t);
    if (!b) break;
    hits.push_back({*b, h});
    parent = *b;
  }
  return hits;
}

int32_t BlockManager::blocks_needed(const std::vector<int32_t>& tokens, const std::vector<Hit>& hits) const {
  const int64_t n = static_cast<int64_t>(tokens.size());
  int64_t needed = (n + block_size_ - 1) / block_size_;
  // A cached block nobody holds still counts: holding it takes it out of the available ones.
  for (const Hit& hit : hits)
    if (blocks_[static_cast<size_t>(hit.block)].refs > 0) --needed;
  return static_cast<int32_t>(needed);
}

int32_t BlockManager::blocks_needed(const std::vector<int32_t>& tokens) const {
  return blocks_needed(tokens, cached_prefix(tokens));
}

std::optional<int32_t> BlockManager::allocate(SeqId seq, const std::vector<int32_t>& tokens) {
  if (seqs_.count(seq)) fail("KV cache: sequence ", seq, " is already allocated");
  const std::vector<Hit> hits = cached_prefix(tokens);
  if (blocks_needed(tokens, hits) > available_blocks()) return std::nullopt;
  const int64_t total = (static_cast<int64_t>(tokens.size()) + block_size_ - 1) / block_size_;
  Seq s;
  s.tokens = tokens;
  for (const Hit& hit : hits) {
    hold(hit.block);
    s.table.push_back(hit.block);
    s.hashes.push_back(hit.hash);
  }
  const int32_t hit_tokens = static_cast<int32_t>(s.table.size()) * block_size_;
  while (static_cast<int64_t>(s.table.size()) < total) {
    const int32_t b = take_block();
    hold(b);
    s.table.push_back(b);
  }
  seqs_.emplace(seq, std::move(s));
  return hit_tokens;
}

bool BlockManager::append(SeqId seq, int32_t token, std::vector<BlockCopy>* copies) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) fail("KV cache: no sequence ", seq);
  Seq& s = it->second;
  const bool new_block = s.tokens.size() % static_cast<size_t>(block_size_) == 0;
  if (new_block) {
    if (available_blocks() == 0) return false;
    const int32_t b = take_block();
    hold(b);
    s.table.push_back(b);
  } else if (blocks_[static_cast<size_t>(s.table.back())].refs > 1) {
    // The partly filled last block is shared (a fork): this sequence writes into a copy.
    if (available_blocks() == 0) return false;
    const int32_t b = take_block();
    hold(b);
    if (copies) copies->push_back({s.table.back(), b});
    release(s.table.back());
    s.table.back() = b;
  }
  s.tokens.push_back(token);
  return true;
}

void BlockManager::commit(SeqId seq, int64_t n_computed) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) fail("KV cache: no sequence ", seq);
  Seq& s = it->second;
  const int64_t full = std::min<int64_t>(n_computed, static_cast<int64_t>(s.tokens.size())) / block_size_;
  for (int64_t i = static_cast<int64_t>(s.hashes.size()); i < full; ++i) {
    const int32_t* t = s.tokens.data() + i * block_size_;
    const uint64_t h = chain_hash(s.hashes.empty() ? 0 : s.hashes.back(), t, block_size_);
    s.hashes.push_back(h);
    const int32_t b = s.table[static_cast<size_t>(i)];
    Block& blk = blocks_[static_cast<size_t>(b)];
    if (blk.cached || by_hash_.count(h)) continue;  // already reusable (this block or an equal one)
    blk.cached = true;
    blk.hash = h;
    blk.parent = i > 0 ? s.table[static_cast<size_t>(i - 1)] : -1;
    blk.tokens.assign(t, t + block_size_);
    by_hash_.emplace(h, b);
  }
}

void BlockManager::fork(SeqId parent, SeqId child) {
  auto it = seqs_.find(parent);
  if (it == seqs_.end()) fail("KV cache: no sequence ", parent);
  if (seqs_.count(child)) fail("KV cache: sequence ", child, " is already allocated");
  Seq s = it->second;
  for (int32_t b : s.table) hold(b);
  seqs_.emplace(child, std::move(s));
}

void BlockManager::free(SeqId seq) {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) fail("KV cache: no sequence ", seq);
  // Last block first, so that a prompt's later blocks are evicted before its earlier ones (which
  // more requests share).
  for (auto b = it->second.table.rbegin(); b != it->second.table.rend(); ++b) release(*b);
  seqs_.erase(it);
}

const std::vector<int32_t>& BlockManager::block_table(SeqId seq) const {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) fail("KV cache: no sequence ", seq);
  return it->second.table;
}

int64_t BlockManager::length(SeqId seq) const {
  auto it = seqs_.find(seq);
  if (it == seqs_.end()) fail("KV cache: no sequence ", seq);
  return static_cast<int64_t>(it->second.tokens.size());
}

void BlockManager::check_invariants() const {
  std::vector<int32_t> refs(blocks_.size(), 0);
  for (const auto& [id, s] : seqs_) {
    const size_t want = (s.tokens.size() + static_cast<size_t>(block_size_) - 1) / static_cast<size_t>(block_size_);
    QF_CHECK(s.table.size() == want, "KV pool: sequence ", id, " holds ", s.table.size(), " blocks for ",
             s.tokens.size(), " tokens");
    std::unordered_set<int32_t> mine;
    for (int32_t b : s.table) {
      QF_CHECK(b >= 0 && b < num_blocks() && mine.insert(b).second, "KV pool: bad block table of sequence ", id);
      ++refs[static_cast<size_t>(b)];
    }
  }
  std::vector<int> where(blocks_.size(), 0);  // 1 free, 2 evictable
  for (int32_t b : free_) {
    QF_CHECK(where[static_cast<size_t>(b)] == 0, "KV pool: block ", b, " listed twice");
    where[static_cast<size_t>(b)] = 1;
  }
  for (int32_t b : evictable_) {
    QF_CHECK(where[static_cast<size_t>(b)] == 0, "KV pool: block ", b, " listed twice");
    where[static_cast<size_t>(b)] = 2;
  }
  for (size_t b = 0; b < blocks_.size(); ++b) {
    const Block& blk = blocks_[b];
    QF_CHECK(blk.refs == refs[b], "KV pool: block ", b, " counts ", blk.refs, " holders, the tables ", refs[b]);
    if (blk.refs > 0) QF_CHECK(where[b] == 0, "KV pool: held block ", b, " is also listed as available");
    else QF_CHECK(where[b] == (blk.cached ? 2 : 1), "KV pool: unheld block ", b, " is neither free nor evictable");
    if (blk.cached) {
      const auto it = by_hash_.find(blk.hash);
      QF_CHECK(it != by_hash_.end() && it->second == static_cast<int32_t>(b), "KV pool: cached block ", b,
               " is not indexed");
      QF_CHECK(static_cast<int32_t>(blk.tokens.size()) == block_size_, "KV pool: cached block ", b, " is not full");
    }
  }
  for (const auto& [h, b] : by_hash_)
    QF_CHECK(blocks_[static_cast<size_t>(b)].cached && blocks_[static_cast<size_t>(b)].hash == h,
             "KV pool: index entry for block ", b, " is stale");
}

}  // namespace qf
