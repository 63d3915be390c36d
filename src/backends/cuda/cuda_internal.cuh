// Shared by the CUDA backend's translation units: error checks, device objects, kernel launchers.
#pragma once
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <cstdint>
#include <type_traits>
#include <utility>
#include <vector>

#include "backends/cuda/cuda_backend.h"
#include "core/error.h"

#define QF_CUDA(call)                                                                        \
  do {                                                                                       \
    cudaError_t qf_err_ = (call);                                                            \
    if (qf_err_ != cudaSuccess)                                                              \
      ::qf::fail("CUDA error: ", cudaGetErrorString(qf_err_), " (", #call, ") at ", __FILE__, \
                 ":", __LINE__);                                                             \
  } while (0)

#define QF_CUBLAS(call)                                                                      \
  do {                                                                                       \
    cublasStatus_t qf_st_ = (call);                                                          \
    if (qf_st_ != CUBLAS_STATUS_SUCCESS)                                                     \
      ::qf::fail("cuBLAS error ", static_cast<int>(qf_st_), " (", #call, ") at ", __FILE__, ":", \
                 __LINE__);                                                                  \
  } while (0)

#define QF_CUDA_LAUNCH() QF_CUDA(cudaGetLastError())

namespace qf::cuda {

// Programmatic dependent launch (Hopper): a kernel may be scheduled while its predecessor drains;
// every kernel calls pdl_wait() before it touches activations (reads or writes), so only
// immutable weights are read early.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
  // Once every block of this grid is past its wait, the next kernel may be scheduled: its blocks
  // start streaming their weights while this one finishes.
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
bool& pdl_enabled();  // set by the backend for compute capability >= 9.0 (QFORGE_NO_PDL=1: off)

// Asynchronous global -> shared copies (sm_80+): the shared address, a 16-byte copy that bypasses
// L1 (src_bytes = 0 writes zeros and reads nothing), and copy groups.
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes = 16) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Sum of v over the 32 lanes of a warp (every lane gets it).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// rsqrt(mean(x[0..K)^2) + eps) of one row, summed by a whole block of THREADS threads (every thread
// gets it; each call needs all of them): lanes stride the row, then the warps' sums in order.
template <int THREADS>
__device__ __forceinline__ float block_inv_rms(const float* x, int K, float eps) {
  __shared__ float red[THREADS / 32];
  float ss = 0.f;
  for (int i = threadIdx.x; i < K; i += THREADS) ss = fmaf(x[i], x[i], ss);
  ss = warp_sum(ss);
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = ss;
  __syncthreads();
  ss = 0.f;
#pragma unroll
  for (int w = 0; w < THREADS / 32; ++w) ss += red[w];
  return rsqrtf(ss / static_cast<float>(K) + eps);
}

// A positive integer tuning knob from the environment, or `def` when unset or not positive.
inline int env_int(const char* name, int def) {
  const char* e = std::getenv(name);
  return e && std::atoi(e) > 0 ? std::atoi(e) : def;
}

// SplitMix64 finalizer: the per-element hash behind every deterministic random fill.
__host__ __device__ __forceinline__ uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// fp32 <-> stored element type (float, __half, __nv_bfloat16), round to nearest.
template <typename T>
__device__ __forceinline__ T from_float(float f) {
  if constexpr (std::is_same_v<T, float>) return f;
  else if constexpr (std::is_same_v<T, __half>) return __float2half_rn(f);
  else return __float2bfloat16_rn(f);
}
template <typename T>
__device__ __forceinline__ float to_float(T v) {
  if constexpr (std::is_same_v<T, float>) return v;
  else if constexpr (std::is_same_v<T, __half>) return __half2float(v);
  else return __bfloat162float(v);
}

// Blocks for a grid-stride loop over n items: at least 1, at most max_blocks.
inline int grid_for(int64_t n, int block, int max_blocks = 65535) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + block - 1) / block, max_blocks)));
}

template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t s, Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = s;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl_enabled() ? 1 : 0;
  QF_CUDA(cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...));
}

inline cudaStream_t stream_of(const CudaBackend& b) { return static_cast<cudaStream_t>(b.stream()); }

// A dense linear layer on the device: weight [out, in] in its stored dtype, optional fp32 bias.
class CudaLinear final : public DeviceLinear {
 public:
  ~CudaLinear() override;
  DType dtype = DType::F16;
  void* weight = nullptr;
  float* bias = nullptr;
  size_t bytes = 0;
};

class CudaEmbedding final : public DeviceEmbedding {
 public:
  ~CudaEmbedding() override;
  DType dtype = DType::F16;
  void* table = nullptr;
};

// Keys and values of many sequences: head rows in the order [layer][block][kv_head][slot], each
// head_dim values (fp16 or fp32), or for a quantized format (backends/kv_quant.h) head_dim codes
// in k / v and head_dim / 32 scales in sk / sv.
class CudaPagedKVCache final : public PagedKVCache {
 public:
  ~CudaPagedKVCache() override;
  bool f32 = false;
  void* k = nullptr;
  void* v = nullptr;
  float* sk = nullptr;
  float* sv = nullptr;
  size_t elem_size() const { return f32 ? 4 : 2; }
  size_t block_elems() const { return static_cast<size_t>(n_kv_heads * block_size * head_dim); }
  size_t layer_elems() const { return static_cast<size_t>(num_blocks) * block_elems(); }
  size_t layer_head_rows() const { return static_cast<size_t>(num_blocks * n_kv_heads * block_size); }
  // Bytes of one block of one layer: codes (or values), and scales.
  size_t block_code_bytes() const {
    return format == KVFormat::Full ? block_elems() * elem_size() : block_elems() * kv_bits(format) / 8;
  }
  size_t block_scale_bytes() const { return format == KVFormat::Full ? 0 : block_elems() / kKVGroup * 4; }
};

// A forward pass's sequences on the device (CudaBackend::prepare_batch): per batch row its token,
// its position and where its sequence's block table starts in `tables`; the rows of sequences too
// short for the tensor-core prefill kernel (`short_rows`), which the split kernel takes.
struct DeviceBatch {
  std::vector<BatchSeq> seqs;
  int rows = 0, n_short = 0;
  int64_t short_len = 0;  // the longest history among the short rows (at least prepare_batch's min_len)
  int32_t* tokens = nullptr;
  int* row_pos = nullptr;
  int* row_table = nullptr;
  int* short_rows = nullptr;
  int32_t* tables = nullptr;
  void* storage = nullptr;  // one device allocation holding the five arrays
  size_t capacity = 0;      // its size in ints
  std::vector<int> seq_table;  // per sequence, where its block table starts in `tables`
  std::vector<int32_t> host;   // staging
  ~DeviceBatch();
};

// The one RoPE kernel over `rows` rows of q and k (in place): at pos0 + t, or at row_pos[t]
// (cuda_backend.cu).
void launch_rope(const CudaBackend& b, float* q, float* k, int64_t rows, int64_t n_heads, int64_t n_kv_heads,
                 int64_t head_dim, int64_t pos0, const int* row_pos);

// Paged attention (cuda_attention.cu): the rows' keys and values written to their slots, and
// causal attention through the block tables. With `rope`, q and k are rotated first (for fp16/fp32
// caches in the same pass as the store).
void paged_attention_forward(CudaBackend& b, float* q, float* k, const float* v, CudaPagedKVCache& cache,
                             int64_t layer, const DeviceBatch& batch, const AttentionParams& p, float* out, bool rope);

// ids[r] = the argmax of row r of logits [rows, vocab] (or -1 for a non-finite row), on the device.
void launch_argmax_rows(CudaBackend& b, const float* logits, int64_t rows, int64_t vocab, int32_t* ids);

// Linear layers (cuda_linear.cu).
void linear_forward(CudaBackend& b, const CudaLinear& w, const float* x, float* y, int64_t rows);
// Backend::fused_linear for one row when every matrix is a dense layer of one dtype and input size.
bool dense_gemv_fused(CudaBackend& b, const FusedLinear& op);
// Backend::fused_linear for several rows through cuBLAS (cuda_cublas_linear.cu), dense and quantized
// layers alike, as long as all matrices take x in one type (dense layers of one dtype, or fp16
// dense and quantized ones): x converted once (normalised when the op says), the residual added by
// the GEMM. SwiGLU: gate into y[0], up into up_scratch (rows x out floats); the caller applies
// silu(gate) * up. False (nothing launched) otherwise.
bool cublas_linear_fused(CudaBackend& b, const FusedLinear& op, float* up_scratch);
// y[r][o] += bias[o] for rows x out outputs (dense and quantized layers alike).
void add_bias(float* y, const float* bias, int64_t rows, int64_t out, cudaStream_t s);

// Attention (cuda_attention.cu).
// Merges n_splits partial results per (row, head): part_o [rows][n_heads][n_splits][head_dim]
// unnormalized, part_ml [..][n_splits][2] = (max, sum) in natural-log units; writes out.
// Row r's result goes to output row out_rows[r] (or out_base + r).
void attention_combine(const float* part_o, const float* part_ml, float* out, int64_t rows, int n_heads,
                       int head_dim, int n_splits, cudaStream_t s, const int* out_rows = nullptr, int out_base = 0);
// The buffers attention_combine reads, for `rows` x n_heads x n_splits slices (scratch slots 1 and 2);
// both null for one slice (nothing to merge).
struct SplitPartials {
  float* o = nullptr;
  float* ml = nullptr;
};
SplitPartials split_partials(CudaBackend& b, int64_t rows, int n_heads, int head_dim, int n_splits);
// Tensor-core causal prefill over an fp16 cache whose new rows are already appended
// (cuda_flash_attention.cu). K and V point at the layer's [kv_head][position][head_dim] block.
// Returns false, doing nothing, where it does not apply (head_dim other than 64/128, few rows,
// pre-Ampere device, QFORGE_FLASH_ATTN=0); the caller then runs the general kernel.
// Fewer rows than this are left to the split kernel (a tile would be mostly padding).
constexpr int64_t kFlashMinRows = 16;
bool flash_attention_prefill(CudaBackend& b, const float* q, const __half* K, const __half* V, int64_t cap,
                             int64_t pos0, int64_t rows, const AttentionParams& p, float* out);

}  // namespace qf::cuda
