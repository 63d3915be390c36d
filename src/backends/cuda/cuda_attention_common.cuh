// Device helpers of the CUDA-core attention kernels (cuda_attention.cu).
#pragma once
#include "backends/cuda/cuda_internal.cuh"

namespace qf::cuda {

// Warps per attention block; block_reduce and the kernels' shared-memory layouts assume it.
constexpr int kAttnWarps = 4;

// 8 consecutive cached values (fp16 or fp32) as floats; p 16-byte aligned.
__device__ __forceinline__ void load8(const __half* p, float (&f)[8]) {
  const int4 r = *reinterpret_cast<const int4*>(p);
  const __half2* h = reinterpret_cast<const __half2*>(&r);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 t = __half22float2(h[i]);
    f[2 * i] = t.x;
    f[2 * i + 1] = t.y;
  }
}

__device__ __forceinline__ void load8(const float* p, float (&f)[8]) {
  const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
  f[0] = a.x; f[1] = a.y; f[2] = a.z; f[3] = a.w;
  f[4] = b.x; f[5] = b.y; f[6] = b.z; f[7] = b.w;
}

// Max or sum of v over a block of kAttnWarps warps; red: kAttnWarps floats of shared memory.
__device__ __forceinline__ float block_reduce(float v, bool is_max, float* red) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float t = __shfl_xor_sync(0xffffffffu, v, o);
    v = is_max ? fmaxf(v, t) : v + t;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // red may still be read by a previous reduction
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float r = red[0];
  for (int w = 1; w < kAttnWarps; ++w) r = is_max ? fmaxf(r, red[w]) : r + red[w];
  return r;
}

}  // namespace qf::cuda
