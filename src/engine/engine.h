// Many sequences through one model: the scheduler decides each step's batch, the block manager
// hands out the paged cache's blocks, the model runs the batch, and each sequence's next token is
// drawn on the device by its own sampling parameters (Backend::sample_rows; greedy at temperature 0). One step at a time, so a caller (a server,
// a benchmark) can add and cancel requests between steps.
#pragma once
#include <map>
#include <memory>
#include <tuple>

#include "backends/sampler.h"
#include "engine/block_manager.h"
#include "engine/scheduler.h"
#include "model/model.h"

namespace qf {

struct EngineOptions {
  int32_t num_blocks = 256, block_size = 16;
  int32_t token_budget = 512;   // tokens per step (decode tokens and prefill chunks)
  int32_t max_running = 64;     // sequences per step
  int64_t max_context = 4096;   // positions a sequence may reach
  KVFormat kv_format = KVFormat::Full;  // the paged cache's keys and values: native, 8- or 4-bit
  // Decode steps (one new token per sequence) replay a graph recorded per batch-size bucket where
  // the backend can capture (CUDA); the other steps, and every step elsewhere, run eagerly.
  bool graphs = true;

  // One request at a time (generate, bench's pp/tg) with up to max_context positions, prompts in
  // steps of token_budget: blocks for the whole context and one more, so a finished request's
  // cached blocks (prefix sharing) never stand in the way of the next.
  static EngineOptions for_one_request(int64_t max_context, int32_t token_budget);
};

class Engine {
 public:
  Engine(Model& model, const EngineOptions& options);

  // Queued; `sampling` draws its tokens (temperature 0: greedy), seeded per request.
  void add(Request r, const SamplerParams& sampling);
  void cancel(SeqId id) { sched_.cancel(id); }
  // One step; false when there was nothing to run.
  bool step();
  // Steps until every request has finished.
  void run_to_completion();
  std::vector<Finished> take_finished();

  const Scheduler& scheduler() const { return sched_; }
  const BlockManager& blocks() const { return blocks_; }
  int64_t steps() const { return steps_; }
  int64_t graph_steps() const { return graph_steps_; }  // steps replayed from a recorded graph
  int64_t graph_captures() const { return graph_captures_; }
  // The last step's shape: whether every row was a one-token chunk at its sequence's end (a
  // decode step, which decode graphs serve), and how many tokens came in other chunks (prompt
  // chunks, or a preempted sequence computed again).
  int64_t last_step_prefill_tokens() const { return last_prefill_tokens_; }
  bool last_step_decode_only() const { return last_decode_only_; }

 private:
  // A decode step padded to a bucket of rows and run from its graph (recorded on first use, after
  // an eager run that sizes every buffer; eager only where the backend cannot capture).
  void decode_from_graph(Batch& batch, std::vector<SampleRow>& rows, std::vector<int32_t>& sampled);

  Model& model_;
  EngineOptions opt_;
  BlockManager blocks_;
  Scheduler sched_;
  std::unique_ptr<PagedKVCache> cache_;
  std::map<SeqId, SamplerParams> sampling_;
  // Graph padding rows write their keys and values to this block, which no sequence owns (the
  // cache holds one block more than the block manager hands out), and are drawn greedily.
  int32_t pad_block_ = 0;
  SamplerParams pad_sampling_;
  struct GraphKey {
    int64_t rows, min_len;
    bool greedy;
    bool operator<(const GraphKey& o) const {
      return std::tie(rows, min_len, greedy) < std::tie(o.rows, o.min_len, o.greedy);
    }
  };
  std::map<GraphKey, std::unique_ptr<StepGraph>> graphs_;
  bool can_capture_ = true;
  int64_t steps_ = 0, graph_steps_ = 0, graph_captures_ = 0;
  int64_t last_prefill_tokens_ = 0;
  bool last_decode_only_ = false;
};

}  // namespace qf
