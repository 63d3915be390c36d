// EXL2 and GPTQ linear layers on the GPU (layout: cuda_quant.cuh): building the device layers and
// prefill. Decode (one row) runs the GEMV in cuda_qgemv.cu; random layers: cuda_random_weights.cu.
// Prefill (more rows than the small-batch GEMM takes): dequantize to an fp16 [K, N] scratch matrix
// in input-feature order and multiply with cuBLAS (cuda_cublas_linear.cu).
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <numeric>
#include <vector>

#include "backends/cuda/cuda_quant.cuh"
#include "backends/cuda/cuda_quant_codes.cuh"
#include "core/log.h"
#include "formats/exl2.h"
#include "formats/gptq.h"
#include "formats/quant_bits.h"

namespace qf::cuda {

CudaQuantLinear::~CudaQuantLinear() {
  cudaFree(qweight);
  cudaFree(unit_tab);
  cudaFree(perm);
  cudaFree(qscale);
  cudaFree(scale_max);
  cudaFree(scales);
  cudaFree(zeros);
  cudaFree(bias);
}

// ---- assembling a device layer (also for the random layers, cuda_random_weights.cu) ----------------

static bool identity(const std::vector<int32_t>& p) {
  for (size_t j = 0; j < p.size(); ++j)
    if (p[j] != static_cast<int32_t>(j)) return false;
  return true;
}

void finish_common(CudaQuantLinear& l, const LinearWeight& w, const std::vector<int2>& tab,
                   const std::vector<int32_t>& perm) {
  l.units = static_cast<int>(tab.size());
  double bits = 0;
  for (const int2& t : tab) bits += t.y & 15;
  l.mean_bits = tab.empty() ? 0.f : static_cast<float>(bits / static_cast<double>(tab.size()));
  l.unit_tab = upload_vec(tab, &l.allocated);
  l.bytes += tab.size() * sizeof(int2);
  if (!perm.empty() && !identity(perm)) {
    l.perm = upload_vec(perm, &l.allocated);
    l.bytes += perm.size() * 4;
  }
  if (w.bias) {
    const std::vector<float> bv = to_f32(*w.bias);
    l.bias = upload_vec(bv, &l.allocated);
  }
}

int64_t padded_stride(int64_t n) { return (n + 127) / 128 * 128; }

int max_bits_of(const std::vector<int2>& tab) {
  int m = 0;
  for (const int2& t : tab) m = std::max(m, t.y & 15);
  return m;
}

namespace {


struct QArgs {
  const uint32_t* qw;
  int64_t stride;
  const int2* tab;
  const int32_t* perm;
  const uint32_t* qscale;
  int64_t qs_stride;
  const float* smax;
  const __half* scales;
  const uint8_t* zeros;
  int K, N, units;
};

__device__ __forceinline__ void load_unit(uint32_t (&r)[8], const QArgs& a, int2 t, int col) {
  const int bits = t.y & 15;
  const uint32_t* p = a.qw + static_cast<int64_t>(t.x) * a.stride + col;
#pragma unroll
  for (int j = 0; j < 8; ++j)
    if (j < bits) r[j] = __ldcs(p + j * a.stride);
}

// Scale (times 2^bits) and zero term (1 + z / 2^bits) of column `col` in group g.
template <bool GPTQ>
__device__ __forceinline__ void group_params(const QArgs& a, int g, int bits, int col, float& s, float& zt) {
  const float two_b = static_cast<float>(1 << bits);
  if constexpr (GPTQ) {
    s = __half2float(a.scales[static_cast<int64_t>(g) * a.stride + col]) * two_b;
    zt = 1.0f + static_cast<float>(a.zeros[static_cast<int64_t>(g) * a.stride + col]) / two_b;
  } else {
    const uint32_t word = __ldg(a.qscale + static_cast<int64_t>(g) * a.qs_stride + (col >> 3));
    const float q = static_cast<float>(((word >> ((col & 7) * 4)) & 15u) + 1u);
    s = q * q * __ldg(a.smax + g) * two_b;
    zt = 1.5f;
  }
}

// out[perm[j], n] = the weight of stored row j, column n, in fp16 (rows j < K; the permutation
// undone here, so x needs none); grid (column tiles, unit blocks of 8), one warp per unit.
template <bool GPTQ>
__global__ void __launch_bounds__(256) qdequant_kernel(QArgs a, __half* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int u = blockIdx.y * 8 + (threadIdx.x >> 5);
  const int n = blockIdx.x * 32 + lane;
  pdl_wait();
  if (u >= a.units) return;
  const int col = min(n, a.N - 1);
  const int2 t = __ldg(a.tab + u);
  uint32_t w[8];
  load_unit(w, a, t, col);
  const int bits = t.y & 15, g = t.y >> 8;
  float s, zt;
  group_params<GPTQ>(a, g, bits, col, s, zt);
  if (n >= a.N) return;
  float v[32];
  switch (bits) {
#define QF_DQ(B)                                                \
  case B:                                                       \
    _Pragma("unroll") for (int r = 0; r < 32; ++r) v[r] = code_f<B>(w, r); \
    break;
#define QF_DQ_PLANAR(B)                                                                                     \
  case B:                                                                                                   \
    _Pragma("unroll") for (int r = 0; r < 32; ++r) v[r] = 1.0f + static_cast<float>(planar_code<B>(w, r)) * (1.0f / (1 << B)); \
    break;
    QF_DQ(2) QF_DQ(4) QF_DQ_PLANAR(3) QF_DQ_PLANAR(5) QF_DQ_PLANAR(6)
    default:
      _Pragma("unroll") for (int r = 0; r < 32; ++r) v[r] = code_f<8>(w, r);
#undef QF_DQ
#undef QF_DQ_PLANAR
  }
  const int rmax = min(32, a.K - u * 32);
#pragma unroll
  for (int r = 0; r < 32; ++r)
    if (r < rmax) {
      const int j = u * 32 + r;
      out[static_cast<int64_t>(a.perm ? __ldg(a.perm + j) : j) * a.N + n] = __float2half_rn((v[r] - zt) * s);
    }
}

// The 3-, 5- and 6-bit units of a freshly uploaded qweight from the on-disk stream layout to the
// planar one (cuda_quant_codes.cuh); one thread per (unit, column).
__global__ void planar_repack_kernel(uint32_t* qw, int64_t stride, const int2* __restrict__ tab, int N) {
  const int n = blockIdx.x * blockDim.x + threadIdx.x;
  if (n >= N) return;
  const int2 t = tab[blockIdx.y];
  const int bits = t.y & 15;
  if (!planar_bits(bits)) return;
  uint32_t* p = qw + static_cast<int64_t>(t.x) * stride + n;
  uint32_t w[8] = {0u, 0u, 0u, 0u, 0u, 0u, 0u, 0u};
#pragma unroll
  for (int j = 0; j < 8; ++j)
    if (j < bits) w[j] = p[j * stride];
  if (bits == 3) to_planar<3>(w);
  else if (bits == 5) to_planar<5>(w);
  else to_planar<6>(w);
#pragma unroll
  for (int j = 0; j < 8; ++j)
    if (j < bits) p[j * stride] = w[j];
}

QArgs args_of(const CudaQuantLinear& w) {
  QArgs a;
  a.qw = w.qweight;
  a.stride = w.stride;
  a.tab = w.unit_tab;
  a.perm = w.perm;
  a.qscale = w.qscale;
  a.qs_stride = w.qscale_stride;
  a.smax = w.scale_max;
  a.scales = w.scales;
  a.zeros = w.zeros;
  a.K = static_cast<int>(w.in_features);
  a.N = static_cast<int>(w.out_features);
  a.units = w.units;
  return a;
}

// ---- host-side construction ----------------------------------------------------------------------

// Brings the layer's 3-, 5- and 6-bit units (if any) into the planar layout; after finish_common.
void make_planar(CudaQuantLinear& l, const std::vector<int2>& tab) {
  if (std::none_of(tab.begin(), tab.end(), [](const int2& t) { return planar_bits(t.y & 15); })) return;
  const dim3 grid(static_cast<unsigned>((l.out_features + 127) / 128), static_cast<unsigned>(tab.size()));
  planar_repack_kernel<<<grid, 128>>>(l.qweight, l.stride, l.unit_tab, static_cast<int>(l.out_features));
  QF_CUDA_LAUNCH();
  QF_CUDA(cudaDeviceSynchronize());
}

// Dense fp16 fallback through the format's own dequantize().
std::unique_ptr<DeviceLinear> dense_fallback(CudaBackend& b, const LinearWeight& w, const std::string& why,
                                             int* fallbacks) {
  log_warn("linear layer '", w.name, "' (", linear_format_name(w.format), "): ", why,
           "; running it dequantized to fp16 on the GPU");
  if (fallbacks) ++*fallbacks;
  const int64_t K = w.in_features, N = w.out_features;
  std::vector<float> f(static_cast<size_t>(K * N));
  w.quant->dequantize(f.data());
  auto h = std::make_shared<std::vector<uint16_t>>(f.size());
  for (size_t i = 0; i < f.size(); ++i) (*h)[i] = f32_to_fp16(f[i]);
  LinearWeight d;
  d.name = w.name;
  d.in_features = K;
  d.out_features = N;
  d.bias = w.bias;
  d.weight = TensorView{DType::F16, {N, K}, h->data(), h};
  return b.make_linear(d);
}

std::unique_ptr<DeviceLinear> make_exl2(CudaBackend& b, const LinearWeight& w, const Exl2Linear& q, int* fallbacks) {
  const int64_t K = w.in_features, N = w.out_features;
  const auto& groups = q.groups();
  std::vector<int2> tab;
  int64_t packed_rows = 0;
  for (size_t g = 0; g < groups.size(); ++g) {
    const Exl2Group& gr = groups[g];
    if (gr.row0 % 32 != 0 || (g + 1 < groups.size() && gr.rows % 32 != 0))
      return dense_fallback(b, w, str("group ", g, " (", gr.bits, "-bit, ", gr.rows, " rows) is not a whole number of 32-row units"), fallbacks);
    for (int64_t r = 0; r < gr.rows; r += 32)
      tab.push_back(make_int2(static_cast<int>(gr.word0 + r / 32 * gr.bits), static_cast<int>(g << 8) | gr.bits));
    packed_rows = std::max(packed_rows, gr.word0 + gr.words);
  }
  auto l = std::make_unique<CudaQuantLinear>();
  l->format = LinearFormat::EXL2;
  l->in_features = K;
  l->out_features = N;
  l->stride = padded_stride(N);
  l->packed_rows = packed_rows;
  l->groups = static_cast<int64_t>(groups.size());
  l->max_bits = max_bits_of(tab);
  // q_weight rows padded to the device stride with zero columns, plus 8 zero rows: a partial last
  // unit reads whole units.
  const int64_t src_stride = q.packed_stride();
  const size_t qw_bytes = static_cast<size_t>(packed_rows * l->stride) * 4, slack = static_cast<size_t>(8 * l->stride) * 4;
  b.check_fits(qw_bytes + slack, str("the model (layer '", w.name, "')"));
  QF_CUDA(cudaMalloc(&l->qweight, qw_bytes + slack));
  QF_CUDA(cudaMemset(l->qweight, 0, qw_bytes + slack));
  if (packed_rows > 0)
    QF_CUDA(cudaMemcpy2D(l->qweight, static_cast<size_t>(l->stride) * 4, q.packed(), static_cast<size_t>(src_stride) * 4,
                         static_cast<size_t>(std::min(src_stride, l->stride)) * 4, static_cast<size_t>(packed_rows),
                         cudaMemcpyHostToDevice));
  l->allocated += qw_bytes + slack;
  l->bytes += qw_bytes;
  // q_scale codes: recovered from the group scales (s = (qs+1)^2 * max / 256 exactly).
  l->qscale_stride = l->stride / 8;
  std::vector<uint32_t> qs(static_cast<size_t>(l->groups * l->qscale_stride), 0u);
  std::vector<float> smax(groups.size());
  float s[64];
  for (size_t g = 0; g < groups.size(); ++g) {
    smax[g] = groups[g].scale_max / 256.0f;
    for (int64_t n0 = 0; n0 < N; n0 += 64) {
      const int nt = static_cast<int>(std::min<int64_t>(64, N - n0));
      q.group_scales(g, n0, nt, s);
      for (int j = 0; j < nt; ++j) {
        const int64_t n = n0 + j;
        uint32_t code = 0;
        if (smax[g] > 0) {
          const double qq = std::sqrt(static_cast<double>(s[j]) / static_cast<double>(smax[g]));
          code = static_cast<uint32_t>(std::clamp(std::lround(qq) - 1, 0L, 15L));
        }
        qs[static_cast<size_t>(static_cast<int64_t>(g) * l->qscale_stride + n / 8)] |= code << (4 * (n % 8));
      }
    }
  }
  l->qscale = upload_vec(qs, &l->allocated);
  l->scale_max = upload_vec(smax, &l->allocated);
  l->bytes += qs.size() * 4 + smax.size() * 4;
  finish_common(*l, w, tab, q.perm());
  make_planar(*l, tab);
  b.note_weight_bytes(l->allocated);
  return l;
}

std::unique_ptr<DeviceLinear> make_gptq(CudaBackend& b, const LinearWeight& w, const GptqLinear& q, int* fallbacks) {
  const int64_t K = w.in_features, N = w.out_features;
  const int bits = q.bits();
  const auto& gidx = q.g_idx();
  // Stored order: rows sorted by group (stable), so that groups are contiguous.
  std::vector<int32_t> order(static_cast<size_t>(K));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t c) { return gidx[static_cast<size_t>(a)] < gidx[static_cast<size_t>(c)]; });
  std::vector<int2> tab;
  for (int64_t j = 0; j < K; j += 32) {
    const int32_t g = gidx[static_cast<size_t>(order[static_cast<size_t>(j)])];
    for (int64_t r = j; r < std::min<int64_t>(K, j + 32); ++r)
      if (gidx[static_cast<size_t>(order[static_cast<size_t>(r)])] != g)
        return dense_fallback(b, w, "its groups are not whole 32-row units", fallbacks);
    tab.push_back(make_int2(static_cast<int>(j / 32 * bits), (g << 8) | bits));
  }
  auto l = std::make_unique<CudaQuantLinear>();
  l->format = LinearFormat::GPTQ;
  l->in_features = K;
  l->out_features = N;
  l->stride = padded_stride(N);
  l->packed_rows = (K * bits + 31) / 32;
  l->groups = q.n_groups();
  l->max_bits = bits;
  const int64_t S = l->stride;
  const size_t qw_words = static_cast<size_t>(l->packed_rows * S);
  const size_t slack = static_cast<size_t>(8 * S) * 4;
  b.check_fits(qw_words * 4 + slack, str("the model (layer '", w.name, "')"));
  QF_CUDA(cudaMalloc(&l->qweight, qw_words * 4 + slack));
  QF_CUDA(cudaMemset(l->qweight, 0, qw_words * 4 + slack));
  l->allocated += qw_words * 4 + slack;
  l->bytes += qw_words * 4;
  const uint32_t* src = q.packed();
  if (identity(order)) {
    if (l->packed_rows > 0)
      QF_CUDA(cudaMemcpy2D(l->qweight, static_cast<size_t>(S) * 4, src, static_cast<size_t>(N) * 4, static_cast<size_t>(N) * 4,
                           static_cast<size_t>(l->packed_rows), cudaMemcpyHostToDevice));
  } else {
    // Act-order: re-pack the codes in the sorted row order (ExLlamaV2's make_sequential).
    std::vector<uint32_t> re(qw_words, 0u);
    for (int64_t j = 0; j < K; ++j) {
      const int64_t k = order[static_cast<size_t>(j)];
      const int64_t pos = j * bits;
      const int64_t wd = pos >> 5;
      const int off = static_cast<int>(pos & 31);
      for (int64_t n = 0; n < N; ++n) {
        const uint32_t v = read_packed(src + n, N, k * bits, bits);
        re[static_cast<size_t>(wd * S + n)] |= v << off;
        if (off + bits > 32) re[static_cast<size_t>((wd + 1) * S + n)] |= v >> (32 - off);
      }
    }
    QF_CUDA(cudaMemcpy(l->qweight, re.data(), qw_words * 4, cudaMemcpyHostToDevice));
  }
  // Scales and zero points [groups, stride]; the padding columns stay 0.
  std::vector<__half> sc(static_cast<size_t>(l->groups * S), __float2half_rn(0.f));
  std::vector<uint8_t> zr(static_cast<size_t>(l->groups * S), 0);
  for (int64_t g = 0; g < l->groups; ++g)
    for (int64_t n = 0; n < N; ++n) {
      sc[static_cast<size_t>(g * S + n)] = __float2half_rn(q.scale(g, n));
      zr[static_cast<size_t>(g * S + n)] = static_cast<uint8_t>(q.zero(g, n));
    }
  l->scales = upload_vec(sc, &l->allocated);
  l->zeros = upload_vec(zr, &l->allocated);
  l->bytes += sc.size() * 2 + zr.size();
  finish_common(*l, w, tab, order);
  make_planar(*l, tab);
  b.note_weight_bytes(l->allocated);
  return l;
}

}  // namespace

std::unique_ptr<DeviceLinear> make_quant_linear(CudaBackend& b, const LinearWeight& w, int* fallbacks) {
  QF_CHECK(w.quant, "linear layer '", w.name, "': ", linear_format_name(w.format), " layer without its tensors");
  if (w.in_features >= (1LL << 30) || w.out_features >= (1LL << 30))
    fail("linear layer '", w.name, "' is too large for the quantized kernels");
  if (const auto* e = dynamic_cast<const Exl2Linear*>(w.quant.get())) return make_exl2(b, w, *e, fallbacks);
  if (const auto* g = dynamic_cast<const GptqLinear*>(w.quant.get())) return make_gptq(b, w, *g, fallbacks);
  return dense_fallback(b, w, "unknown quantized layout", fallbacks);
}

void dequantize_half(CudaBackend& b, const CudaQuantLinear& w, __half* out) {
  const QArgs a = args_of(w);
  const dim3 grid(static_cast<unsigned>((w.out_features + 31) / 32), static_cast<unsigned>((w.units + 7) / 8));
  if (w.format == LinearFormat::GPTQ) launch(qdequant_kernel<true>, grid, dim3(256), 0, stream_of(b), a, out);
  else launch(qdequant_kernel<false>, grid, dim3(256), 0, stream_of(b), a, out);
  QF_CUDA_LAUNCH();
}

void quant_linear_forward(CudaBackend& b, const CudaQuantLinear& w, const float* x, float* y, int64_t rows) {
  const FusedLinear op = FusedLinear::single(w, x, y, rows);
  if (rows == 1 && quant_gemv_fused(b, op)) return;  // else a shape the GEMV cannot stage
  // A few rows (a batch of decode tokens): each weight read once, on tensor cores.
  if (quant_gemm_small(b, w, x, y, rows)) return;
  QF_CHECK(cublas_linear_fused(b, op, nullptr), "internal: no GEMM for quantized layer rows");
}

}  // namespace qf::cuda
