// Continuous batching (vLLM's scheduler, our code): a queue of requests, each step one batch of
// decode tokens and prefill chunks up to a token budget. Sequences join when their blocks fit and
// leave when they finish or are cancelled, at step boundaries. When a running sequence needs a
// block and none is left, the most recently admitted one is preempted: its blocks are freed and it
// goes back to the front of the queue with every token it has, to be computed again (recompute;
// the output is the same, only later).
//
// The scheduler decides what runs; it does not run it. A step is: plan = schedule(); the caller
// copies the blocks plan.copies names, runs the forward pass over plan.chunks (each chunk's tokens
// at its positions, writing KV into the sequence's block table) and samples one token for every
// chunk with logits; then complete(plan, tokens).
#pragma once
#include <cstdint>
#include <deque>
#include <vector>

#include "engine/block_manager.h"

namespace qf {

struct Request {
  SeqId id = 0;
  std::vector<int32_t> prompt;  // at least one token
  int32_t max_new_tokens = 16;
  std::vector<int32_t> eos;     // stop at any of these tokens (which is not part of the output)
};

// Tokens [start, start + count) of one sequence in this step's batch.
struct Chunk {
  SeqId id = 0;
  int64_t start = 0;
  int32_t count = 0;
  bool logits = false;  // the chunk ends at the sequence's last token: sample the next one
};

struct StepPlan {
  std::vector<BlockCopy> copies;  // before the forward pass (copy-on-write)
  std::vector<Chunk> chunks;      // running sequences first (oldest first), then new ones
  int32_t tokens() const;
};

struct Finished {
  SeqId id = 0;
  std::vector<int32_t> output;  // the generated tokens
  enum Reason { Length, Eos, Cancelled } reason = Length;
};

class Scheduler {
 public:
  // token_budget: tokens per step (decode tokens and prefill chunks together); max_running: the
  // most sequences in one batch.
  Scheduler(BlockManager& blocks, int32_t token_budget, int32_t max_running);

  void add(Request r);    // queued until its blocks fit; fails on an id in use or an empty prompt
  void cancel(SeqId id);  // at any step boundary; reported by take_finished as Cancelled
  StepPlan schedule();
  // `sampled` holds one token per chunk with logits, in the plan's order.
  void complete(const StepPlan& plan, const std::vector<int32_t>& sampled);
  std::vector<Finished> take_finished();

  bool idle() const { return waiting_.empty() && running_.empty(); }
  size_t waiting() const { return waiting_.size(); }
  size_t running() const { return running_.size(); }
  int64_t preemptions() const { return preemptions_; }
  bool has(SeqId id) const;  // waiting or running
  const std::vector<int32_t>& tokens(SeqId id) const;  // prompt and generated tokens so far

 private:
  struct Seq {
    Request req;
    std::vector<int32_t> tokens;   // prompt + generated
    int64_t computed = 0;          // tokens whose KV is in the cache
    bool needs_slot = false;       // its last token has no KV slot yet (no block was free)
  };
  Seq* find_running(SeqId id);
  void preempt(size_t index);      // running_[index] back to the front of the queue
  bool give_slot(size_t index, std::vector<BlockCopy>* copies);  // preempting younger ones if needed

  BlockManager& blocks_;
  int32_t budget_, max_running_;
  std::deque<Seq> waiting_;
  std::vector<Seq> running_;  // in admission order
  std::vector<BlockCopy> pending_copies_;
  std::vector<Finished> finished_;
  int64_t preemptions_ = 0;
};

}  // namespace qf
