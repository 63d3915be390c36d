// Random weights for benchmarks and tests, made where the backend keeps its weights: on a GPU they
// are generated in device memory (a 70B shape never passes through the host), elsewhere uploaded
// from host values that the maker keeps, so it must outlive what it made. Deterministic per seed.
// Production code loads real weights; only `qforge bench --random`, bench/ and tests use this.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "backends/backend.h"

namespace qf {

// One part of a random EXL2 layer's bit-width mix: `frac` of the input rows at `bits`, in groups of
// `group` rows (ExLlamaV2 QParams style).
struct QuantMixPart {
  int bits = 4;
  double frac = 1.0;
  int64_t group = 128;
};

class RandomWeights {
 public:
  virtual ~RandomWeights() = default;
  // True when the weights are generated in device memory.
  virtual bool on_device() const = 0;
  // [out, in], uniform in [-scale, scale], stored as `dtype`.
  virtual std::unique_ptr<DeviceLinear> dense(int64_t in, int64_t out, DType dtype, float scale, uint64_t seed) = 0;
  virtual std::unique_ptr<DeviceEmbedding> embedding(int64_t vocab, int64_t dim, DType dtype, float scale,
                                                     uint64_t seed) = 0;
  // n floats center + spread * u, u uniform in [-1, 1).
  virtual DeviceBuffer vector(int64_t n, float center, float spread, uint64_t seed) = 0;
  // Quantized layers in the backend's own kernel layouts: EXL2 codes of the mix with 4-bit scale
  // codes and a random act-order permutation; GPTQ codes with fp16 scales (optionally act-order).
  // *bytes_read receives the bytes one decode pass reads. Where the backend has no such layouts:
  // a one-line error.
  virtual std::unique_ptr<DeviceLinear> exl2(int64_t in, int64_t out, const std::vector<QuantMixPart>& mix,
                                             uint64_t seed, size_t* bytes_read);
  virtual std::unique_ptr<DeviceLinear> gptq(int64_t in, int64_t out, int bits, int64_t group, bool act_order,
                                             uint64_t seed, size_t* bytes_read);
};

// The maker for `b`: generated on the device for CUDA, host values uploaded otherwise.
std::unique_ptr<RandomWeights> make_random_weights(Backend& b);

// n floats center + spread * u from a xorshift stream of `seed` (the host makers' values).
std::vector<float> host_random(size_t n, float center, float spread, uint64_t seed);

}  // namespace qf
