// The bookkeeping of a paged KV cache shared by many sequences (vLLM's block manager, our code):
// fixed-size blocks from one pool, a block table per sequence, blocks taken on demand and returned
// when a sequence ends. Full blocks whose KV has been computed (commit) are indexed by their
// tokens and their predecessor, so a later request with the same prompt start reuses them (prefix
// sharing); freed ones stay cached until their space is needed (least recently used first). A
// block that several sequences hold is copied before one of them writes into it (copy-on-write).
// Running out of blocks is an answer (nullopt / false, nothing changed), never a crash: the
// scheduler then preempts or waits.
//
// The manager owns no device memory: block ids index the cache tensors a backend allocates, and
// the copies it asks for (BlockCopy) are carried out by the caller before the next forward pass.
#pragma once
#include <cstdint>
#include <list>
#include <optional>
#include <unordered_map>
#include <vector>

namespace qf {

using SeqId = int64_t;

// Copy the KV rows of block `from` into block `to` (copy-on-write).
struct BlockCopy {
  int32_t from = 0, to = 0;
};

class BlockManager {
 public:
  BlockManager(int32_t num_blocks, int32_t block_size);

  int32_t block_size() const { return block_size_; }
  int32_t num_blocks() const { return static_cast<int32_t>(blocks_.size()); }
  // Blocks a new allocation can take: never used, or cached with no sequence holding them.
  int32_t available_blocks() const { return static_cast<int32_t>(free_.size() + evictable_.size()); }
  // Blocks held by at least one sequence.
  int32_t used_blocks() const { return num_blocks() - available_blocks(); }

  // Blocks `tokens` would take from the available ones as a sequence's start: cached blocks that
  // other sequences hold are shared for free; a cached block nobody holds still counts.
  int32_t blocks_needed(const std::vector<int32_t>& tokens) const;
  // Tokens at the start of `tokens` whose KV is in the cache now (a multiple of block_size).
  int64_t cached_tokens(const std::vector<int32_t>& tokens) const {
    return static_cast<int64_t>(cached_prefix(tokens).size()) * block_size_;
  }
  // A new sequence holding `tokens` (its prompt). Returns how many of them were already in the cache
  // (a multiple of block_size, their KV need not be computed), or nullopt when the blocks do not
  // suffice: then nothing changed. Throws on an id already in use.
  std::optional<int32_t> allocate(SeqId seq, const std::vector<int32_t>& tokens);
  // Room for one more token `token` at the end of `seq`: a new block when the last is full, a copy
  // of the last block when it is shared (appended to *copies). False when no block is available:
  // then nothing changed.
  bool append(SeqId seq, int32_t token, std::vector<BlockCopy>* copies);
  // The first n_computed tokens of `seq` now have their KV in the cache: its full blocks among them
  // become reusable by later requests.
  void commit(SeqId seq, int64_t n_computed);
  // `child` starts as `parent` does now, sharing every block (parallel sampling, beam search).
  void fork(SeqId parent, SeqId child);
  // The sequence ended (finished, cancelled or preempted): its blocks go back; full ones stay cached.
  void free(SeqId seq);

  bool has(SeqId seq) const { return seqs_.count(seq) != 0; }
  const std::vector<int32_t>& block_table(SeqId seq) const;
  int64_t length(SeqId seq) const;  // tokens the sequence holds
  int32_t ref_count(int32_t block) const { return blocks_.at(static_cast<size_t>(block)).refs; }
  // Checks every invariant (reference counts equal the table entries, the free, evictable and used
  // sets partition the pool, cached hashes point at their blocks); throws on the first broken one.
  void check_invariants() const;

 private:
  struct Block {
    int32_t refs = 0;
    bool cached = false;  // in by_hash_: full, computed, reusable
    uint64_t hash = 0;
    int32_t parent = -1;           // the block before it in its sequence (-1: the first)
    std::vector<int32_t> tokens;   // its tokens while cached: a hit compares tokens and parent, so
                                   // it is exact, not merely likely
    std::list<int32_t>::iterator lru;  // its place in evictable_ while cached and unheld
  };
  struct Seq {
    std::vector<int32_t> table;
    std::vector<int32_t> tokens;
    std::vector<uint64_t> hashes;  // of its committed full blocks, in order
  };

  // A cached block that a sequence's start can reuse, and the prefix hash it is indexed by.
  struct Hit {
    int32_t block;
    uint64_t hash;
  };
  // The cached blocks `tokens` starts with, in order (never the block of its last token).
  std::vector<Hit> cached_prefix(const std::vector<int32_t>& tokens) const;
  int32_t blocks_needed(const std::vector<int32_t>& tokens, const std::vector<Hit>& hits) const;

  static uint64_t chain_hash(uint64_t parent, const int32_t* tokens, int32_t n);
  std::optional<int32_t> cached_block(uint64_t hash, int32_t parent, const int32_t* tokens) const;
  int32_t take_block();          // a free block, else the least recently used cached one
  void hold(int32_t block);      // one more sequence holds it
  void release(int32_t block);   // one fewer

  int32_t block_size_;
  std::vector<Block> blocks_;
  std::vector<int32_t> free_;       // never cached, refs == 0
  std::list<int32_t> evictable_;    // cached, refs == 0; front = least recently used
  std::unordered_map<uint64_t, int32_t> by_hash_;
  std::unordered_map<SeqId, Seq> seqs_;
};

}  // namespace qf
