// Quantized linear layers (EXL2 and GPTQ) on the GPU.
//
// Both formats are brought to one device layout, so that one GEMV and one dequantize kernel serve
// them:
//   qweight  [packed_rows (+8 zero rows of slack), stride] uint32: codes packed along K, one
//            little-endian bit stream per output column, as the files store them (EXL2 q_weight;
//            GPTQ qweight, or with its rows re-sorted by g_idx when the checkpoint uses act-order,
//            like ExLlamaV2's make_sequential), each row padded with zero columns to a stride of
//            whole 128-column tiles.
//   units    [units] int2: K is walked in "units" of 32 consecutive stored rows. A unit of b-bit
//            codes is exactly b words of each column (no code straddles two units), and lies in
//            one quantization group. Entry = (first packed row, group << 8 | bits).
//   perm     [K] int32 or null: stored row j holds input feature perm[j] (EXL2 act-order, GPTQ
//            after the g_idx sort); the kernels gather x through it once per block.
//   EXL2:    q_scale 4-bit codes [G, stride/8] and q_scale_max/256 as fp32 [G]; zero = 2^(b-1).
//   GPTQ:    scales fp16 [G, stride] and the real zero point (v1 offset applied) as uint8 [G, stride].
// Layers whose groups are not whole units (e.g. 2-bit groups of 16 rows) are dequantized on the
// host and run as dense fp16 layers instead (counted by CudaBackend::quant_fallbacks()).
#pragma once
#include <algorithm>
#include <memory>
#include <vector>

#include "backends/cuda/cuda_internal.cuh"
#include "formats/linear_weight.h"

namespace qf::cuda {

class CudaQuantLinear final : public DeviceLinear {
 public:
  ~CudaQuantLinear() override;
  LinearFormat format = LinearFormat::EXL2;
  int units = 0;
  int64_t stride = 0, packed_rows = 0, groups = 0;  // stride: words per packed row, whole 128-column tiles
  int max_bits = 0;  // widest unit
  float mean_bits = 0;  // mean unit width (the GEMV's launch shape depends on both)
  uint32_t* qweight = nullptr;
  int2* unit_tab = nullptr;
  int32_t* perm = nullptr;
  uint32_t* qscale = nullptr;  // EXL2
  int64_t qscale_stride = 0;
  float* scale_max = nullptr;  // EXL2: q_scale_max / 256
  __half* scales = nullptr;    // GPTQ
  uint8_t* zeros = nullptr;    // GPTQ
  float* bias = nullptr;
  size_t bytes = 0;            // device bytes one GEMV reads (weights, scales, tables, perm)
  size_t allocated = 0;
};

// Builds the device layer for an EXL2 / GPTQ LinearWeight; dense fallback as described above.
std::unique_ptr<DeviceLinear> make_quant_linear(CudaBackend& b, const LinearWeight& w, int* fallbacks);

void quant_linear_forward(CudaBackend& b, const CudaQuantLinear& w, const float* x, float* y, int64_t rows);
// The layer's weights in fp16 as out [K, N] (row k: input feature k, the permutation undone), on the
// stream: what cuBLAS multiplies for many rows (cuda_cublas_linear.cu).
void dequantize_half(CudaBackend& b, const CudaQuantLinear& w, __half* out);

// y = x W^T for 1 to 64 rows of x on tensor cores, each weight read once (cuda_qgemm.cu); false
// (nothing launched) for more rows.
bool quant_gemm_small(CudaBackend& b, const CudaQuantLinear& w, const float* x, float* y, int64_t rows);
// Backend::fused_linear for 2 to 64 rows when every matrix is a quantized layer of one input size:
// the RMSNorm folded into the preparation of x (one launch for all matrices), the residual added
// by the GEMM itself; for SwiGLU the gate goes to y[0] and the up projection to up_scratch
// (rows x out floats), and the caller applies silu(gate) * up. False (nothing launched) otherwise.
bool quant_gemm_fused(CudaBackend& b, const FusedLinear& op, float* up_scratch);

// The decode GEMV (cuda_qgemv.cu) for one row: runs `op` and returns true when every matrix is a
// quantized layer of one format and input size (else false, and nothing is launched).
bool quant_gemv_fused(CudaBackend& b, const FusedLinear& op);

// ---- assembling a device layer from host-built parts (cuda_quant.cu) -----------------------------

template <typename T>
T* upload_vec(const std::vector<T>& v, size_t* allocated, size_t extra_bytes = 0) {
  T* p = nullptr;
  const size_t bytes = v.size() * sizeof(T);
  QF_CUDA(cudaMalloc(&p, std::max<size_t>(bytes + extra_bytes, 4)));
  if (bytes) QF_CUDA(cudaMemcpy(p, v.data(), bytes, cudaMemcpyHostToDevice));
  if (extra_bytes) QF_CUDA(cudaMemset(reinterpret_cast<char*>(p) + bytes, 0, extra_bytes));
  *allocated += bytes + extra_bytes;
  return p;
}
// The unit table, the permutation (dropped when it is the identity) and the bias of `w`.
void finish_common(CudaQuantLinear& l, const LinearWeight& w, const std::vector<int2>& tab,
                   const std::vector<int32_t>& perm);
// Device row stride: whole 128-column tiles, so the GEMV's 16-byte loads never need a bound check.
int64_t padded_stride(int64_t n);
int max_bits_of(const std::vector<int2>& tab);

}  // namespace qf::cuda
