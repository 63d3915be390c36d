// Random weights generated in device memory (backends/random_weights.h): dense and embedding tables
// of any stored dtype, EXL2 and GPTQ layers in the layouts the CUDA kernels read, and a filled KV
// cache. This header needs no CUDA headers.
#pragma once
#include <memory>

#include "backends/cuda/cuda_backend.h"
#include "backends/random_weights.h"

namespace qf {

std::unique_ptr<RandomWeights> make_cuda_random_weights(CudaBackend& b);

}  // namespace qf
