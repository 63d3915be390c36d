// Decoding with the sampler on the device: from one captured CUDA graph (Backend::capture_decode:
// device-resident token, position and sampler state, one replay and one 4-byte read per token), or
// eagerly with host-side token and position where only the sampling moves to the device
// (Backend::sample_on_device).
#include <memory>

#include "backends/cuda/cuda_backend.h"
#include "backends/sampler.h"

namespace qf {

namespace {

class CudaDecodeGraph final : public DecodeGraph {
 public:
  CudaDecodeGraph(CudaBackend& b, int32_t pending) : b_(b), pending_(pending) {}
  ~CudaDecodeGraph() override {
    b_.set_sample_on_download(false);
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

class CudaDeviceSampling final : public DeviceSampling {
 public:
  explicit CudaDeviceSampling(CudaBackend& b) : b_(b) {}
  ~CudaDeviceSampling() override { b_.set_sample_on_download(false); }
  int32_t token() override { return b_.read_token(); }

 private:
  CudaBackend& b_;
};

}  // namespace

std::unique_ptr<DecodeGraph> CudaBackend::capture_decode(const std::function<void()>& step, int32_t token,
                                                         int64_t pos, int64_t capacity, const SamplerParams& sampling,
                                                         const std::vector<int32_t>& history) {
  Sampler check(sampling);  // the host sampler's parameter checks
  set_device_inputs(true, capacity);
  // An unbounded penalty window holds at most every position of the cache plus the last token.
  set_sampler(sampling, history, capacity + 1);
  set_sample_on_download(true);
  set_decode_state(token, pos);
  step();  // eager warm-up: sizes every scratch buffer (no allocation may happen while capturing)
  const int32_t first = read_token();
  begin_capture();
  step();
  end_capture();
  return std::make_unique<CudaDecodeGraph>(*this, first);
}

std::unique_ptr<DeviceSampling> CudaBackend::sample_on_device(const SamplerParams& sampling,
                                                              const std::vector<int32_t>& history, int64_t capacity) {
  Sampler check(sampling);
  set_sampler(sampling, history, capacity + 1);
  set_sample_on_download(true);
  return std::make_unique<CudaDeviceSampling>(*this);
}

}  // namespace qf
