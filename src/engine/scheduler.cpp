#include "engine/scheduler.h"

#include <algorithm>

#include "core/error.h"

namespace qf {

int32_t StepPlan::tokens() const {
  int32_t n = 0;
  for (const Chunk& c : chunks) n += c.count;
  return n;
}

Scheduler::Scheduler(BlockManager& blocks, int32_t token_budget, int32_t max_running)
    : blocks_(blocks), budget_(token_budget), max_running_(max_running) {
  QF_CHECK(token_budget > 0 && max_running > 0, "scheduler: the token budget and the batch size must be positive");
}

void Scheduler::add(Request r) {
  if (r.prompt.empty()) fail("request ", r.id, ": empty prompt");
  if (r.max_new_tokens < 1) fail("request ", r.id, ": max_new_tokens must be at least 1");
  const int64_t bs = blocks_.block_size();
  const int64_t need = (static_cast<int64_t>(r.prompt.size()) + r.max_new_tokens + bs - 1) / bs;
  if (need > blocks_.num_blocks())
    fail("request ", r.id, ": ", r.prompt.size(), " prompt tokens and ", r.max_new_tokens, " new ones need ", need,
         " KV blocks; the cache has ", blocks_.num_blocks());
  if (has(r.id)) fail("request ", r.id, ": the id is in use");
  Seq s;
  s.tokens = r.prompt;
  s.req = std::move(r);
  waiting_.push_back(std::move(s));
}

Scheduler::Seq* Scheduler::find_running(SeqId id) {
  for (Seq& s : running_)
    if (s.req.id == id) return &s;
  return nullptr;
}

bool Scheduler::has(SeqId id) const {
  const auto same = [&](const Seq& s) { return s.req.id == id; };
  return std::any_of(running_.begin(), running_.end(), same) || std::any_of(waiting_.begin(), waiting_.end(), same);
}

const std::vector<int32_t>& Scheduler::tokens(SeqId id) const {
  for (const Seq& s : running_)
    if (s.req.id == id) return s.tokens;
  for (const Seq& s : waiting_)
    if (s.req.id == id) return s.tokens;
  fail("scheduler: no sequence ", id);
}

void Scheduler::cancel(SeqId id) {
  const auto same = [&](const Seq& s) { return s.req.id == id; };
  auto finish = [&](const Seq& s) {
    finished_.push_back({id, std::vector<int32_t>(s.tokens.begin() + static_cast<long>(s.req.prompt.size()), s.tokens.end()),
                         Finished::Cancelled});
  };
  if (auto w = std::find_if(waiting_.begin(), waiting_.end(), same); w != waiting_.end()) {
    finish(*w);
    waiting_.erase(w);
  } else if (auto r = std::find_if(running_.begin(), running_.end(), same); r != running_.end()) {
    finish(*r);
    blocks_.free(id);
    running_.erase(r);
  }
}

void Scheduler::preempt(size_t index) {
  Seq s = std::move(running_[index]);
  running_.erase(running_.begin() + static_cast<long>(index));
  blocks_.free(s.req.id);
  s.computed = 0;
  s.needs_slot = false;
  waiting_.push_front(std::move(s));
  ++preemptions_;
}

bool Scheduler::give_slot(size_t index, std::vector<BlockCopy>* copies) {
  for (;;) {
    Seq& s = running_[index];
    if (blocks_.append(s.req.id, s.tokens.back(), copies)) {
      s.needs_slot = false;
      return true;
    }
    // No block: the youngest sequence makes room, this one itself when it is the youngest.
    const size_t youngest = running_.size() - 1;
    preempt(youngest);
    if (youngest == index) return false;
  }
}

StepPlan Scheduler::schedule() {
  StepPlan plan;
  plan.copies = std::move(pending_copies_);
  pending_copies_.clear();
  for (size_t i = 0; i < running_.size();)
    if (!running_[i].needs_slot || give_slot(i, &plan.copies)) ++i;
  // A copy planned for a sequence preempted since may land in a block another sequence now owns; it
  // is applied before the forward pass, and the new owner writes every slot before it reads it.

  int32_t budget = budget_;
  for (const Seq& s : running_) {
    if (budget == 0) break;
    const int64_t left = static_cast<int64_t>(s.tokens.size()) - s.computed;
    if (left <= 0) continue;
    const int32_t n = static_cast<int32_t>(std::min<int64_t>(left, budget));
    plan.chunks.push_back({s.req.id, s.computed, n, s.computed + n == static_cast<int64_t>(s.tokens.size())});
    budget -= n;
  }
  while (budget > 0 && !waiting_.empty() && static_cast<int32_t>(running_.size()) < max_running_) {
    Seq& s = waiting_.front();
    const auto hit = blocks_.allocate(s.req.id, s.tokens);
    if (!hit) break;  // waits for blocks (first come, first served: nobody overtakes it)
    s.computed = *hit;
    const int64_t left = static_cast<int64_t>(s.tokens.size()) - s.computed;
    const int32_t n = static_cast<int32_t>(std::min<int64_t>(left, budget));
    plan.chunks.push_back({s.req.id, s.computed, n, s.computed + n == static_cast<int64_t>(s.tokens.size())});
    budget -= n;
    running_.push_back(std::move(s));
    waiting_.pop_front();
  }
  return plan;
}

void Scheduler::complete(const StepPlan& plan, const std::vector<int32_t>& sampled) {
  size_t k = 0;
  std::vector<SeqId> done;
  for (const Chunk& c : plan.chunks) {
    Seq* s = find_running(c.id);
    QF_CHECK(s && s->computed == c.start, "scheduler: the plan does not match the running sequences");
    s->computed = c.start + c.count;
    blocks_.commit(c.id, s->computed);
    if (!c.logits) continue;
    QF_CHECK(k < sampled.size(), "scheduler: fewer sampled tokens than chunks with logits");
    const int32_t tok = sampled[k++];
    const int64_t generated = static_cast<int64_t>(s->tokens.size() - s->req.prompt.size()) + 1;
    const bool eos = std::find(s->req.eos.begin(), s->req.eos.end(), tok) != s->req.eos.end();
    if (eos || generated >= s->req.max_new_tokens) {
      std::vector<int32_t> out(s->tokens.begin() + static_cast<long>(s->req.prompt.size()), s->tokens.end());
      if (!eos) out.push_back(tok);
      finished_.push_back({c.id, std::move(out), eos ? Finished::Eos : Finished::Length});
      blocks_.free(c.id);
      done.push_back(c.id);
      continue;
    }
    s->tokens.push_back(tok);
    s->needs_slot = !blocks_.append(c.id, tok, &pending_copies_);
  }
  QF_CHECK(k == sampled.size(), "scheduler: more sampled tokens than chunks with logits");
  running_.erase(std::remove_if(running_.begin(), running_.end(),
                                [&](const Seq& s) { return std::find(done.begin(), done.end(), s.req.id) != done.end(); }),
                 running_.end());
}

std::vector<Finished> Scheduler::take_finished() { return std::exchange(finished_, {}); }

}  // namespace qf
