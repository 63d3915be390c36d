// One decoder layer's forward pass, written once against the Backend and shared by the model
// (generation), the converter (calibration, measurement, quantization) and the calibration
// sampler: the attention block and the MLP block, each updating the residual stream in place.
// Taps let a caller see what the linear layers of a block read (to accumulate Hessians).
#pragma once
#include <functional>
#include <memory>
#include <vector>

#include "backends/backend.h"
#include "model/config.h"
#include "model/weights.h"

namespace qf {

// One layer's weights on a backend.
struct DeviceLayer {
  DeviceBuffer attn_norm, ffn_norm;
  std::unique_ptr<DeviceLinear> q, k, v, o, gate, up, down;
};

// Uploads the weights of one layer (norms and the seven linears) to `b`.
DeviceLayer upload_layer(Backend& b, const LayerWeights& w);

// What a block's linear layers read: the normalised input of q/k/v, the attention output that o
// reads, the normalised input of gate/up, and the SwiGLU activation that down reads.
enum class Tap { AttnInput, OInput, MlpInput, DownInput };
// A tap sees `rows` rows of `cols` floats in the backend's memory, valid during the call.
using TapFn = std::function<void(Tap tap, const float* data, int64_t rows, int64_t cols)>;

class LayerRunner {
 public:
  LayerRunner(const ModelConfig& config, Backend& backend);

  // Attention block for the sequences of a batch over a paged cache, in place: x [rows, hidden]
  // holds every sequence's rows; x += o(attention(rope(q(norm x)), ...)), the q/k/v and o
  // projections once over all of them. The batch must be prepared (Backend::prepare_batch). `tap`
  // sees the normalised input and o's input (the converter's Hessians).
  void attention_paged(const DeviceLayer& l, float* x, int64_t rows, const std::vector<BatchSeq>& seqs,
                       PagedKVCache& cache, int64_t cache_layer, const TapFn* tap = nullptr);
  // MLP block on x [rows, hidden], in place: x += down(silu(gate(norm x)) * up(norm x)).
  void mlp(const DeviceLayer& l, float* x, int64_t rows, const TapFn* tap = nullptr);
  // The final norm and the head for `rows` rows of x: logits [rows, vocab] in the backend's memory.
  void head(const DeviceBuffer& final_norm, const DeviceLinear& head, const float* x, int64_t rows, float* logits);

  // One FusedLinear: the backend's fused kernel where it has one, else the separate operations.
  void linear_op(const FusedLinear& op);
  void ensure_scratch(int64_t rows);
  const AttentionParams& attention_params() const { return ap_; }

 private:
  const ModelConfig& c_;
  Backend& b_;
  AttentionParams ap_;
  float eps_ = 0;
  int64_t scratch_rows_ = 0;
  DeviceBuffer xn_, q_, k_, v_, attn_, gate_, up_, act_, sum_;
};

}  // namespace qf
