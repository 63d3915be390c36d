// {sum (a - b)^2, sum b^2} of two device vectors: the converter compares every candidate's block
// output with the reference this way, so only two numbers per row cross to the host. A fixed grid
// and in-order sums make the result the same on every run.
#include <vector>

#include "backends/cuda/cuda_internal.cuh"

namespace qf {

namespace {

constexpr int kBlocks = 264, kThreads = 256;

__global__ void diff_norms_kernel(const float* __restrict__ a, const float* __restrict__ b, int64_t n,
                                  double* __restrict__ partial) {
  float d = 0.f, r = 0.f;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float e = a[i] - b[i];
    d = fmaf(e, e, d);
    r = fmaf(b[i], b[i], r);
  }
  d = cuda::warp_sum(d);
  r = cuda::warp_sum(r);
  __shared__ double sd[kThreads / 32], sr[kThreads / 32];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) sd[warp] = d, sr[warp] = r;
  __syncthreads();
  if (threadIdx.x == 0) {
    double td = 0, tr = 0;
    for (int w = 0; w < kThreads / 32; ++w) td += sd[w], tr += sr[w];
    partial[2 * blockIdx.x] = td;
    partial[2 * blockIdx.x + 1] = tr;
  }
}

}  // namespace

std::pair<double, double> CudaBackend::diff_norms(const float* a, const float* b, int64_t n) {
  auto s = cuda::stream_of(*this);
  double* partial = nullptr;  // from the stream-ordered pool: cheap, and right for any device
  QF_CUDA(cudaMallocAsync(reinterpret_cast<void**>(&partial), sizeof(double) * 2 * kBlocks, s));
  diff_norms_kernel<<<kBlocks, kThreads, 0, s>>>(a, b, n, partial);
  QF_CUDA_LAUNCH();
  std::vector<double> host(2 * kBlocks);
  QF_CUDA(cudaMemcpyAsync(host.data(), partial, sizeof(double) * host.size(), cudaMemcpyDeviceToHost, s));
  QF_CUDA(cudaFreeAsync(partial, s));
  QF_CUDA(cudaStreamSynchronize(s));
  double d = 0, r = 0;
  for (int i = 0; i < kBlocks; ++i) d += host[2 * i], r += host[2 * i + 1];
  return {d, r};
}

}  // namespace qf
