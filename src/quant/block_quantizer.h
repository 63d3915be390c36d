// The converter's work on one block (attention or MLP) of one decoder layer, on a backend:
// running it over calibration rows (each row its own sequence from position 0) while the taps
// accumulate the Hessians of its linears' inputs, quantizing its projections with GPTQ, swapping
// quantized linears in, and measuring the relative error of the block's output.
#pragma once
#include <array>
#include <memory>
#include <vector>

#include "model/decoder_layer.h"
#include "model/weights.h"
#include "quant/gptq_solver.h"
#include "quant/options.h"

namespace qf {

// The Hessians of a block's two inputs: q/k/v's (or gate/up's) and o's (or down's).
struct BlockHessians {
  DeviceBuffer outer, inner;
  int64_t outer_k = 0, inner_k = 0;
};

// The LinearWeights of a block's projections, in block_projections order.
std::vector<const LinearWeight*> block_weights(const LayerWeights& w, BlockKind kind);
// The projection's slot in a DeviceLayer.
std::unique_ptr<DeviceLinear>& block_slot(DeviceLayer& l, BlockKind kind, size_t projection);
// Which Hessian a projection reads: q/k/v and gate/up the outer one, o and down the inner one.
bool reads_inner(BlockKind kind, size_t projection);

class BlockQuantizer {
 public:
  // Rows of `length` tokens. `damp`: GPTQ's dampening as a fraction of the mean Hessian diagonal.
  BlockQuantizer(const ModelConfig& config, Backend& b, int64_t length, double damp);

  const ModelConfig& config() const { return c_; }
  Backend& backend() const { return b_; }
  LayerRunner& runner() { return runner_; }
  int64_t length() const { return length_; }
  int64_t row_floats() const { return length_ * c_.hidden; }

  BlockHessians new_hessians(BlockKind kind);
  // A zeroed K x K matrix on the backend, for a Hessian to accumulate into.
  DeviceBuffer zero_square(int64_t k);
  // The block over `rows` rows of x [rows * length, hidden] in place; with `h`, the taps add the
  // rows' inputs to its Hessians.
  void run(BlockKind kind, const DeviceLayer& l, float* x, int64_t rows, BlockHessians* h = nullptr);
  // Mean over rows of ||x - ref|| / ||ref|| (per row, over the whole row).
  double mean_relative_error(const float* x, const float* ref, int64_t rows);

  // Act-order solvers for a block's two inputs.
  struct Solvers {
    std::unique_ptr<GptqSolver> outer, inner;
    GptqSolver& of(BlockKind kind, size_t projection) { return reads_inner(kind, projection) ? *inner : *outer; }
  };
  Solvers solvers(const BlockHessians& h, BlockKind kind, const std::string& where);

  const ScaleSearch& scale_search() const { return search_; }
  // Device memory in use now (free memory at start minus free memory now), kept as a peak: called
  // where the most is allocated (every variant of a block built, solvers factored).
  void note_memory();
  int64_t peak_memory() const { return peak_bytes_; }
  double damp() const { return damp_; }

 private:
  const ModelConfig& c_;
  Backend& b_;
  LayerRunner runner_;
  int64_t length_;
  double damp_;
  ScaleSearch search_;
  std::unique_ptr<SequenceCache> cache_;  // one layer: each row's keys and values in turn
  size_t free_at_start_ = 0;
  int64_t peak_bytes_ = 0;
};

}  // namespace qf
