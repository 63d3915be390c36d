// Continuous batching over the paged KV cache (issue 10), driven by a fake model: every step's KV
// writes and reads go through the block tables into a simulated cache, so a wrong table, a missed
// copy-on-write or a stale prefix block shows up as a wrong read; outputs must equal each request
// decoded alone, however tight the cache (preemption) and whatever is cancelled.
#include <algorithm>
#include <map>
#include <random>

#include "engine/scheduler.h"
#include "test_util.h"

namespace qf {
namespace {

// The fake model: the next token is a function of the whole context.
int32_t next_token(const std::vector<int32_t>& ctx, size_t n) {
  uint64_t h = 1469598103934665603ull;
  for (size_t i = 0; i < n; ++i) h = (h ^ static_cast<uint32_t>(ctx[i])) * 1099511628211ull;
  return static_cast<int32_t>(1 + (h >> 33) % 40);
}

std::vector<int32_t> decode_alone(const Request& r) {
  std::vector<int32_t> ctx = r.prompt, out;
  while (static_cast<int32_t>(out.size()) < r.max_new_tokens) {
    const int32_t t = next_token(ctx, ctx.size());
    if (std::find(r.eos.begin(), r.eos.end(), t) != r.eos.end()) break;
    out.push_back(t);
    ctx.push_back(t);
  }
  return out;
}

struct BatchRun {
  std::map<SeqId, Finished> finished;
  int64_t preemptions = 0, steps = 0, computed = 0;  // tokens run through the fake forward pass
};

// Runs every request through the scheduler; `cancel_at` cancels id at a step.
BatchRun run_all(int32_t blocks, int32_t bs, int32_t budget, int32_t max_running, const std::vector<Request>& reqs,
            const std::map<int64_t, SeqId>& cancel_at = {}) {
  BlockManager bm(blocks, bs);
  Scheduler sched(bm, budget, max_running);
  for (const Request& r : reqs) sched.add(r);
  std::vector<std::vector<int32_t>> kv(static_cast<size_t>(blocks), std::vector<int32_t>(static_cast<size_t>(bs), -1));
  BatchRun run;
  while (!sched.idle()) {
    if (auto c = cancel_at.find(run.steps); c != cancel_at.end()) sched.cancel(c->second);
    const StepPlan plan = sched.schedule();
    EXPECT_LE(plan.tokens(), budget);
    run.computed += plan.tokens();
    if (plan.chunks.empty() && !sched.idle()) {
      ADD_FAILURE() << "no progress at step " << run.steps;
      break;
    }
    for (const BlockCopy& c : plan.copies) kv[static_cast<size_t>(c.to)] = kv[static_cast<size_t>(c.from)];
    std::vector<int32_t> sampled;
    for (const Chunk& c : plan.chunks) {
      const auto& table = bm.block_table(c.id);
      const auto& toks = sched.tokens(c.id);
      for (int64_t p = c.start; p < c.start + c.count; ++p)
        kv[static_cast<size_t>(table[static_cast<size_t>(p / bs)])][static_cast<size_t>(p % bs)] = toks[static_cast<size_t>(p)];
      // Attention reads every position up to the chunk's end through the table.
      for (int64_t p = 0; p < c.start + c.count; ++p) {
        const int32_t got = kv[static_cast<size_t>(table[static_cast<size_t>(p / bs)])][static_cast<size_t>(p % bs)];
        if (got != toks[static_cast<size_t>(p)]) {
          ADD_FAILURE() << "sequence " << c.id << " reads " << got << " at position " << p << ", wrote "
                        << toks[static_cast<size_t>(p)] << " (step " << run.steps << ")";
          return run;
        }
      }
      if (c.logits) sampled.push_back(next_token(toks, static_cast<size_t>(c.start + c.count)));
    }
    sched.complete(plan, sampled);
    for (Finished& f : sched.take_finished()) run.finished[f.id] = std::move(f);
    bm.check_invariants();
    ++run.steps;
  }
  EXPECT_EQ(bm.used_blocks(), 0);
  run.preemptions = sched.preemptions();
  return run;
}

std::vector<Request> requests(int n, uint64_t seed, int32_t shared_prefix) {
  std::mt19937 rng(static_cast<uint32_t>(seed));
  std::vector<int32_t> system(static_cast<size_t>(shared_prefix));
  for (auto& t : system) t = static_cast<int32_t>(100 + rng() % 900);
  std::vector<Request> reqs;
  for (int i = 0; i < n; ++i) {
    Request r;
    r.id = 1000 + i;
    r.prompt = system;
    for (int k = static_cast<int>(1 + rng() % 40); k > 0; --k) r.prompt.push_back(static_cast<int32_t>(100 + rng() % 900));
    r.max_new_tokens = static_cast<int32_t>(1 + rng() % 30);
    if (i % 3 == 0) r.eos = {5};
    reqs.push_back(std::move(r));
  }
  return reqs;
}

TEST(Scheduler, BatchedOutputsEqualEachRequestAlone) {
  const auto reqs = requests(24, 7, 0);
  const BatchRun run = run_all(256, 16, 64, 8, reqs);
  ASSERT_EQ(run.finished.size(), reqs.size());
  for (const Request& r : reqs) {
    const Finished& f = run.finished.at(r.id);
    EXPECT_EQ(f.output, decode_alone(r)) << r.id;
    EXPECT_NE(f.reason, Finished::Cancelled);
  }
  EXPECT_EQ(run.preemptions, 0);
}

TEST(Scheduler, PreemptedSequencesRecomputeToTheSameOutput) {
  const auto reqs = requests(24, 11, 24);
  // 12 blocks of 8 tokens: room for two or three sequences at a time, so decoding ones run out.
  const BatchRun run = run_all(12, 8, 32, 6, reqs);
  EXPECT_GT(run.preemptions, 5);
  ASSERT_EQ(run.finished.size(), reqs.size());
  for (const Request& r : reqs) EXPECT_EQ(run.finished.at(r.id).output, decode_alone(r)) << r.id;
}

TEST(Scheduler, SharedPrefixesAndChunkedPrefill) {
  // A 200-token system prompt shared by every request; prefill in chunks of at most 48 tokens.
  const auto reqs = requests(16, 3, 200);
  const BatchRun run = run_all(128, 16, 48, 4, reqs);
  ASSERT_EQ(run.finished.size(), reqs.size());
  for (const Request& r : reqs) EXPECT_EQ(run.finished.at(r.id).output, decode_alone(r)) << r.id;
  // Without sharing every prompt token and every generated one but the last is computed once. With
  // it, requests admitted after the first one's prefix is computed skip its 12 full blocks (192 of
  // its 200 tokens).
  int64_t unshared = 0;
  for (const Request& r : reqs)
    unshared += static_cast<int64_t>(r.prompt.size() + run.finished.at(r.id).output.size()) - 1;
  EXPECT_LE(run.computed, unshared - 8 * 192);
}

TEST(Scheduler, CancelAtAnyStep) {
  const auto reqs = requests(12, 5, 16);
  std::map<int64_t, SeqId> cancel_at = {{0, 1003}, {2, 1000}, {5, 1007}, {9, 1011}, {40, 1001}};
  const BatchRun run = run_all(40, 8, 24, 4, reqs, cancel_at);
  ASSERT_EQ(run.finished.size(), reqs.size());
  for (const Request& r : reqs) {
    const Finished& f = run.finished.at(r.id);
    const auto want = decode_alone(r);
    if (f.reason == Finished::Cancelled) {
      ASSERT_LE(f.output.size(), want.size()) << r.id;
      EXPECT_TRUE(std::equal(f.output.begin(), f.output.end(), want.begin())) << r.id;
    } else {
      EXPECT_EQ(f.output, want) << r.id;
    }
  }
  EXPECT_EQ(run.finished.at(1003).reason, Finished::Cancelled);
  EXPECT_TRUE(run.finished.at(1003).output.empty());
}

TEST(Scheduler, RejectsWhatCanNeverRun) {
  BlockManager bm(4, 8);
  Scheduler s(bm, 16, 2);
  EXPECT_NE(test::error_of([&] { s.add({1, {}, 4, {}}); }), "");
  EXPECT_NE(test::error_of([&] { s.add({2, std::vector<int32_t>(30, 1), 8, {}}); }), "");  // 38 tokens > 32 slots
  s.add({3, {1, 2, 3}, 4, {}});
  EXPECT_NE(test::error_of([&] { s.add({3, {1}, 1, {}}); }), "");  // id in use
}

}  // namespace
}  // namespace qf
