#include "engine/engine.h"

#include <algorithm>

#include "core/error.h"
#include "core/log.h"
#include "core/sizes.h"

namespace qf {

EngineOptions EngineOptions::for_one_request(int64_t max_context, int32_t token_budget) {
  EngineOptions eo;
  eo.block_size = 16;
  eo.max_context = max_context;
  eo.num_blocks = kv_block_count(max_context, eo.block_size) + 1;
  eo.max_running = 1;
  eo.token_budget = token_budget;
  return eo;
}

Engine::Engine(Model& model, const EngineOptions& options)
    : model_(model),
      opt_(options),
      blocks_(options.num_blocks, options.block_size),
      sched_(blocks_, options.token_budget, options.max_running),
      cache_(model.new_paged_cache(options.num_blocks + 1, options.block_size, options.max_context, options.kv_format)),
      pad_block_(options.num_blocks) {
  pad_sampling_.temperature = 0;
  pad_sampling_.repeat_penalty = 1;
}

namespace {
// Rows of a decode graph: 1, 2, 4, 8, then multiples of 8 (little padding, few graphs).
int64_t bucket_rows(int64_t n) {
  if (n <= 8) {
    int64_t b = 1;
    while (b < n) b *= 2;
    return b;
  }
  return (n + 7) / 8 * 8;
}
// The history length a decode graph's attention is launched for: a multiple of 256, or of an
// eighth of the power of two above n for long histories (at most 1/8 more than needed, 8 graphs
// per doubling of the context).
int64_t bucket_len(int64_t n) {
  int64_t p = 1;
  while (p < n) p *= 2;
  const int64_t step = std::max<int64_t>(256, p / 8);
  return std::max<int64_t>(step, (n + step - 1) / step * step);
}
}  // namespace

void Engine::decode_from_graph(Batch& batch, std::vector<SampleRow>& rows, std::vector<int32_t>& sampled) {
  Backend& backend = model_.backend();
  const auto n = static_cast<int64_t>(batch.tokens.size());
  const int64_t padded = bucket_rows(n);
  int64_t longest = 0;
  for (const BatchSeq& s : batch.seqs) longest = std::max(longest, s.pos0 + s.rows);
  for (int64_t r = n; r < padded; ++r) {
    BatchSeq s;
    s.first_row = r;
    s.rows = 1;
    s.pos0 = 0;
    s.block_table = &pad_block_;
    s.n_blocks = 1;
    batch.tokens.push_back(0);
    batch.seqs.push_back(s);
    batch.logit_rows.push_back(r);
    rows.push_back({&pad_sampling_, nullptr, 0});
  }
  const GraphKey key{padded, bucket_len(longest), all_greedy(rows)};
  model_.prepare_batch(batch, *cache_, key.min_len);
  backend.stage_sampling(rows, model_.config().vocab);
  std::unique_ptr<StepGraph>& graph = graphs_[key];
  std::vector<int32_t> ids(static_cast<size_t>(padded));
  if (graph && graph->valid()) {
    graph->replay();
    ++graph_steps_;
  } else {
    graph.reset();
    // This step runs eagerly, sizing every buffer for the shape; the graph serves the next ones.
    backend.sample_staged(model_.run_prepared(batch, *cache_));
    try {
      graph = backend.capture([&] { backend.sample_staged(model_.run_prepared(batch, *cache_)); });
    } catch (const Error& e) {  // a step that cannot be recorded still runs, only eagerly
      log_warn("decode steps run without graphs: ", e.what());
    }
    if (graph) ++graph_captures_;
    else can_capture_ = false;  // every later step runs eagerly
  }
  backend.fetch_sampled(ids.data());
  std::copy(ids.begin(), ids.begin() + static_cast<long>(sampled.size()), sampled.begin());
}

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
  // Each row by its sequence's own parameters, on the device where the logits are: only ids cross.
  std::vector<SampleRow> rows;
  for (SeqId id : logit_seqs) {
    const auto& toks = sched_.tokens(id);
    rows.push_back({&sampling_.at(id), toks.data(), static_cast<int64_t>(toks.size())});
  }
  std::vector<int32_t> sampled(rows.size());
  // A decode row: one token with logits (so the sequence's newest). A step of only those is a
  // decode step; the tokens of the other chunks are prompt (or recomputed) tokens.
  const auto decode_row = [](const Chunk& c) { return c.count == 1 && c.logits; };
  const bool decode = std::all_of(plan.chunks.begin(), plan.chunks.end(), decode_row);
  last_decode_only_ = decode;
  last_prefill_tokens_ = 0;
  for (const Chunk& c : plan.chunks)
    if (!decode_row(c)) last_prefill_tokens_ += c.count;
  if (opt_.graphs && can_capture_ && decode) {
    decode_from_graph(batch, rows, sampled);
  } else {
    float* logits = model_.forward_batch_device(batch, *cache_);
    if (!rows.empty()) model_.backend().sample_rows(logits, model_.config().vocab, rows, sampled.data());
  }
  for (size_t i = 0; i < logit_seqs.size(); ++i)
    if (sampled[i] == Sampler::kNonFinite) {
      const auto& dir = model_.config().dir;
      fail(dir.empty() ? std::string("the model") : dir.string(), ": the model produced non-finite logits (NaN or ",
           "infinity) for request ", logit_seqs[i], " at position ", sched_.tokens(logit_seqs[i]).size() - 1,
           "; its weights likely hold NaN or Inf values");
    }
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
