#include "engine/engine.h"

#include "core/error.h"

namespace qf {

Engine::Engine(Model& model, const EngineOptions& options)
    : model_(model),
      opt_(options),
      blocks_(options.num_blocks, options.block_size),
      sched_(blocks_, options.token_budget, options.max_running),
      cache_(model.new_paged_cache(options.num_blocks, options.block_size, options.max_context, options.kv_format)) {}

void Engine::add(Request r, const SamplerParams& sampling) {
  if (static_cast<int64_t>(r.prompt.size()) + r.max_new_tokens > opt_.max_context)
    fail("request ", r.id, ": ", r.prompt.size(), " prompt tokens and ", r.max_new_tokens,
         " new ones exceed the context of ", opt_.max_context);
  for (int32_t t : r.prompt)
    if (t < 0 || t >= model_.config().vocab) fail("request ", r.id, ": token id ", t, " is outside the vocabulary");
  Sampler check(sampling);  // its parameter checks, before the request is queued
  const SeqId id = r.id;
  sched_.add(std::move(r));
  sampling_.insert_or_assign(id, sampling);
}

bool Engine::step() {
  if (sched_.idle()) return false;
  const StepPlan plan = sched_.schedule();
  if (!plan.copies.empty()) {
    std::vector<std::pair<int32_t, int32_t>> from_to;
    for (const BlockCopy& c : plan.copies) from_to.emplace_back(c.from, c.to);
    model_.backend().copy_kv_blocks(*cache_, from_to);
  }
  QF_CHECK(!plan.chunks.empty(), "engine: a step with nothing to run (requests wait for blocks that never free)");
  Batch batch;
  std::vector<SeqId> logit_seqs;
  for (const Chunk& c : plan.chunks) {
    const auto& toks = sched_.tokens(c.id);
    const auto& table = blocks_.block_table(c.id);
    BatchSeq s;
    s.first_row = static_cast<int64_t>(batch.tokens.size());
    s.rows = c.count;
    s.pos0 = c.start;
    s.block_table = table.data();
    s.n_blocks = static_cast<int64_t>(table.size());
    batch.tokens.insert(batch.tokens.end(), toks.begin() + c.start, toks.begin() + c.start + c.count);
    batch.seqs.push_back(s);
    if (c.logits) {
      batch.logit_rows.push_back(s.first_row + s.rows - 1);
      logit_seqs.push_back(c.id);
    }
  }
  const int64_t vocab = model_.config().vocab;
  float* logits = model_.forward_batch_device(batch, *cache_);
  // Each row by its sequence's own parameters, on the device where the logits are: only ids cross.
  std::vector<SampleRow> rows;
  for (SeqId id : logit_seqs) {
    const auto& toks = sched_.tokens(id);
    rows.push_back({&sampling_.at(id), toks.data(), static_cast<int64_t>(toks.size())});
  }
  std::vector<int32_t> sampled(rows.size());
  if (!rows.empty()) model_.backend().sample_rows(logits, vocab, rows, sampled.data());
  for (size_t i = 0; i < logit_seqs.size(); ++i)
    if (sampled[i] == Sampler::kNonFinite) fail("request ", logit_seqs[i], ": the model produced non-finite logits");
  sched_.complete(plan, sampled);
  ++steps_;
  return true;
}

void Engine::run_to_completion() {
  while (step()) {
  }
}

std::vector<Finished> Engine::take_finished() {
  auto f = sched_.take_finished();
  for (const Finished& x : f) sampling_.erase(x.id);
  return f;
}

}  // namespace qf
