// The paged KV cache's block manager (issue 10): allocation on demand, freeing without leaks,
// prefix sharing, copy-on-write, eviction of cached blocks, and out-of-blocks as an answer.
#include <map>
#include <random>

#include "engine/block_manager.h"
#include "test_util.h"

namespace qf {
namespace {

std::vector<int32_t> iota_tokens(int32_t n, int32_t from = 0) {
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (int32_t i = 0; i < n; ++i) t[static_cast<size_t>(i)] = from + i;
  return t;
}

TEST(BlockManager, AllocatesOnDemandAndFreesEverything) {
  BlockManager m(8, 4);
  ASSERT_EQ(m.allocate(1, iota_tokens(6)), 0);  // 2 blocks, nothing cached yet
  EXPECT_EQ(m.block_table(1).size(), 2u);
  EXPECT_EQ(m.used_blocks(), 2);
  std::vector<BlockCopy> copies;
  EXPECT_TRUE(m.append(1, 6, &copies));  // fills block 2 of 2
  EXPECT_TRUE(m.append(1, 7, &copies));
  EXPECT_EQ(m.block_table(1).size(), 2u);
  EXPECT_TRUE(m.append(1, 8, &copies));  // a third block
  EXPECT_EQ(m.block_table(1).size(), 3u);
  EXPECT_TRUE(copies.empty());
  EXPECT_EQ(m.length(1), 9);
  m.check_invariants();
  m.free(1);
  EXPECT_EQ(m.used_blocks(), 0);
  EXPECT_EQ(m.available_blocks(), 8);
  m.check_invariants();
  EXPECT_NE(test::error_of([&] { m.free(1); }), "");
  ASSERT_EQ(m.allocate(2, {}), 0);  // an empty sequence holds no block until its first token
  EXPECT_TRUE(m.block_table(2).empty());
  EXPECT_NE(test::error_of([&] { m.allocate(2, {1}); }), "");  // the id is taken
}

TEST(BlockManager, OutOfBlocksIsAnAnswerThatChangesNothing) {
  BlockManager m(3, 4);
  ASSERT_EQ(m.allocate(1, iota_tokens(8)), 0);  // 2 blocks
  EXPECT_EQ(m.allocate(2, iota_tokens(8, 100)), std::nullopt);
  EXPECT_FALSE(m.has(2));
  EXPECT_EQ(m.used_blocks(), 2);
  std::vector<BlockCopy> copies;
  EXPECT_TRUE(m.append(1, 8, &copies));  // the third block
  for (int t = 9; t < 12; ++t) EXPECT_TRUE(m.append(1, t, &copies));
  EXPECT_FALSE(m.append(1, 12, &copies));  // a fourth block does not exist
  EXPECT_EQ(m.length(1), 12);
  m.check_invariants();
  m.free(1);
  EXPECT_EQ(m.allocate(2, iota_tokens(12, 100)), 0);
}

TEST(BlockManager, SharesCommittedPrefixBlocks) {
  const int32_t bs = 16;
  BlockManager m(200, bs);
  std::vector<int32_t> prompt = iota_tokens(1000);  // a 1,000-token system prompt
  std::vector<int32_t> a = prompt, b = prompt;
  a.push_back(5000);
  b.push_back(6000);
  ASSERT_EQ(m.allocate(1, a), 0);
  // Not committed yet: nothing to share (its KV is not computed).
  EXPECT_EQ(m.blocks_needed(b), 63);
  m.commit(1, static_cast<int64_t>(a.size()));
  // Committed: the 62 full blocks of the prefix are shared; the 63rd holds tokens 992..1000.
  EXPECT_EQ(m.blocks_needed(b), 1);
  ASSERT_EQ(m.allocate(2, b), 62 * bs);
  for (size_t i = 0; i < 62; ++i) EXPECT_EQ(m.block_table(1)[i], m.block_table(2)[i]) << i;
  EXPECT_NE(m.block_table(1)[62], m.block_table(2)[62]);
  EXPECT_EQ(m.ref_count(m.block_table(1)[0]), 2);
  EXPECT_EQ(m.used_blocks(), 63 + 1);
  m.check_invariants();
  // A prompt that differs in its first block shares nothing; the same prompt again shares all.
  std::vector<int32_t> c = prompt;
  c[3] = 999999;
  EXPECT_EQ(m.allocate(3, c), 0);
  EXPECT_EQ(m.allocate(4, prompt), 62 * bs);
  // Freed, the blocks stay cached: a later request still finds them.
  for (SeqId s : {1, 2, 3, 4}) m.free(s);
  EXPECT_EQ(m.used_blocks(), 0);
  EXPECT_EQ(m.allocate(5, b), 62 * bs);
  m.check_invariants();
}

TEST(BlockManager, WholePromptCachedStillComputesItsLastToken) {
  BlockManager m(10, 4);
  ASSERT_EQ(m.allocate(1, iota_tokens(8)), 0);
  m.commit(1, 8);
  m.free(1);
  // Both blocks are cached, but the last token's logits are needed: only the first is reused.
  EXPECT_EQ(m.allocate(2, iota_tokens(8)), 4);
  m.check_invariants();
}

TEST(BlockManager, CopyOnWriteAfterFork) {
  BlockManager m(10, 4);
  ASSERT_EQ(m.allocate(1, iota_tokens(6)), 0);
  m.fork(1, 2);  // shares both blocks; the second is half full
  EXPECT_EQ(m.block_table(1), m.block_table(2));
  EXPECT_EQ(m.ref_count(m.block_table(1)[1]), 2);
  std::vector<BlockCopy> copies;
  ASSERT_TRUE(m.append(2, 100, &copies));
  ASSERT_EQ(copies.size(), 1u);
  EXPECT_EQ(copies[0].from, m.block_table(1)[1]);
  EXPECT_EQ(copies[0].to, m.block_table(2)[1]);
  EXPECT_NE(m.block_table(1)[1], m.block_table(2)[1]);
  EXPECT_EQ(m.block_table(1)[0], m.block_table(2)[0]);  // the full block stays shared
  copies.clear();
  ASSERT_TRUE(m.append(1, 200, &copies));  // the parent's block is its own again: no copy
  EXPECT_TRUE(copies.empty());
  m.check_invariants();
  // A full shared last block needs no copy: the next token starts a new block.
  BlockManager f(10, 4);
  ASSERT_EQ(f.allocate(1, iota_tokens(4)), 0);
  f.fork(1, 2);
  ASSERT_TRUE(f.append(2, 7, &copies));
  EXPECT_TRUE(copies.empty());
  // Copy-on-write needs a block too: without one, the append is refused and nothing changes.
  BlockManager g(2, 4);
  ASSERT_EQ(g.allocate(1, iota_tokens(6)), 0);
  g.fork(1, 2);
  const auto before = g.block_table(2);
  EXPECT_FALSE(g.append(2, 9, &copies));
  EXPECT_EQ(g.block_table(2), before);
  EXPECT_EQ(g.length(2), 6);
  g.check_invariants();
}

TEST(BlockManager, EvictsTheLeastRecentlyUsedCachedBlocks) {
  BlockManager m(4, 2);
  ASSERT_EQ(m.allocate(1, {1, 2, 3}), 0);  // blocks for [1 2] [3]
  m.commit(1, 3);
  m.free(1);  // [1 2] cached, [3] free
  ASSERT_EQ(m.allocate(2, {7, 8, 9}), 0);
  m.commit(2, 3);
  m.free(2);  // [7 8] cached after [1 2]
  EXPECT_EQ(m.available_blocks(), 4);
  // Four new blocks: the free ones first, then [1 2] (least recently used), then [7 8].
  ASSERT_EQ(m.allocate(3, iota_tokens(6, 50)), 0);  // 3 blocks: 2 free + [1 2] evicted
  m.check_invariants();
  m.free(3);  // never committed: its blocks are plain free ones
  EXPECT_EQ(m.allocate(4, {7, 8, 9}), 2);  // [7 8] is still cached
  EXPECT_EQ(m.allocate(5, {1, 2, 3}), 0);  // [1 2] is gone
  m.check_invariants();
}

// 10,000 random steps of admission, decoding, commits, forks, finishing and cancelling over shared
// prompt prefixes, with every invariant checked after each step and no block left held at the end.
TEST(BlockManager, RandomStepsLeakNothing) {
  BlockManager m(64, 8);
  std::mt19937 rng(12345);
  std::map<SeqId, int> live;
  SeqId next = 1;
  std::vector<BlockCopy> copies;
  int admitted = 0, refused = 0, hits = 0, forks = 0, copied = 0, append_refused = 0;
  const std::vector<int32_t> prefixes[3] = {iota_tokens(40, 1000), iota_tokens(20, 2000), iota_tokens(70, 3000)};
  for (int step = 0; step < 10000; ++step) {
    const int op = static_cast<int>(rng() % 10);
    if (op < 3 || live.empty()) {  // admit
      std::vector<int32_t> p = prefixes[rng() % 3];
      p.resize(p.size() - rng() % 12);
      for (int i = static_cast<int>(rng() % 20); i > 0; --i) p.push_back(static_cast<int32_t>(rng() % 50));
      const auto hit = m.allocate(next, p);
      if (hit) {
        ++admitted;
        hits += *hit > 0;
        EXPECT_EQ(*hit % 8, 0);
        EXPECT_LT(*hit, static_cast<int32_t>(p.size()));
        live[next] = 0;
        if (rng() % 2) m.commit(next, static_cast<int64_t>(p.size()));
        ++next;
      } else {
        ++refused;
      }
    } else {
      auto it = live.begin();
      std::advance(it, static_cast<long>(rng() % live.size()));
      const SeqId s = it->first;
      if (op < 7) {  // decode a token
        const size_t before = copies.size();
        if (m.append(s, static_cast<int32_t>(rng() % 50), &copies)) m.commit(s, m.length(s) - 1);
        else ++append_refused;
        copied += static_cast<int>(copies.size() - before);
      } else if (op == 7 && live.size() < 40) {  // fork
        m.fork(s, next);
        live[next++] = 0;
        ++forks;
      } else {  // finish or cancel
        m.free(s);
        live.erase(it);
      }
    }
    m.check_invariants();
    EXPECT_EQ(m.used_blocks() + m.available_blocks(), 64);
  }
  for (const auto& [s, unused] : live) m.free(s);
  m.check_invariants();
  EXPECT_EQ(m.used_blocks(), 0);
  EXPECT_EQ(m.available_blocks(), 64);
  // The run exercised every path.
  EXPECT_GT(admitted, 100);
  EXPECT_GT(refused, 10);
  EXPECT_GT(hits, 50);
  EXPECT_GT(forks, 50);
  EXPECT_GT(copied, 10);
  EXPECT_GT(append_refused, 10);
}

}  // namespace
}  // namespace qf
