// Greedy decoding from one captured CUDA graph (Backend::capture_greedy): device-resident token
// and position, argmax on the device, one replay and one 4-byte read per token.
#include <memory>

#include "backends/cuda/cuda_backend.h"

namespace qf {

namespace {

class CudaGreedyGraph final : public GreedyDecodeGraph {
 public:
  CudaGreedyGraph(CudaBackend& b, int32_t pending) : b_(b), pending_(pending) {}
  ~CudaGreedyGraph() override {
    b_.set_argmax_on_download(false);
    b_.set_device_inputs(false);
  }
  int32_t next() override {
    if (pending_ >= 0) {  // the token the eager warm-up step already produced
      const int32_t t = pending_;
      pending_ = -1;
      return t;
    }
    b_.replay();
    return b_.read_token();
  }

 private:
  CudaBackend& b_;
  int32_t pending_;
};

}  // namespace

std::unique_ptr<GreedyDecodeGraph> CudaBackend::capture_greedy(const std::function<void()>& step, int32_t token,
                                                               int64_t pos, int64_t capacity) {
  set_device_inputs(true, capacity);
  set_argmax_on_download(true);
  set_decode_state(token, pos);
  step();  // eager warm-up: sizes every scratch buffer (no allocation may happen while capturing)
  const int32_t first = read_token();
  begin_capture();
  step();
  end_capture();
  return std::make_unique<CudaGreedyGraph>(*this, first);
}

}  // namespace qf
