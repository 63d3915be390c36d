// Dense (fp32/fp16/bf16) linear layers read straight from the mapped file. Decode (one row) dots
// each stored row with x directly; prefill converts blocks of weight rows to fp32 once and reuses
// them for every token, so the weights are never expanded whole.
#include <algorithm>

#include "backends/cpu/cpu_linear.h"
#include "core/error.h"

namespace qf {

void CpuLinear::add_bias(float* y, int64_t rows) const {
  if (bias.empty()) return;
  for (int64_t t = 0; t < rows; ++t)
    for (int64_t o = 0; o < out_features; ++o) y[t * out_features + o] += bias[static_cast<size_t>(o)];
}

namespace {

class DenseCpuLinear final : public CpuLinear {
 public:
  explicit DenseCpuLinear(const LinearWeight& w) : w_(w.weight) {
    in_features = w.in_features;
    out_features = w.out_features;
    if (w.bias) bias = to_f32(*w.bias);
  }

  void forward(const float* x, float* y, int64_t rows, ThreadPool& pool) const override {
    const int64_t in = in_features, out = out_features;
    // Keep each chunk worth ~64K multiply-adds so tiny layers are not split across threads.
    const int64_t grain = std::max<int64_t>(16, (1 << 16) / std::max<int64_t>(1, in * rows));
    if (rows == 1) {
      pool.parallel_for(out, grain, [&](int64_t o0, int64_t o1) {
        for (int64_t o = o0; o < o1; ++o) {
          switch (w_.dtype) {
            case DType::F32: y[o] = dot_f32(w_.as<float>() + o * in, x, in); break;
            case DType::F16: y[o] = dot_f16_f32(w_.as<uint16_t>() + o * in, x, in); break;
            default: y[o] = dot_bf16_f32(w_.as<uint16_t>() + o * in, x, in); break;
          }
        }
      });
    } else {
      // Blocks of weight rows: converted to fp32 once (fits L2 for in <= 4K) and used for every row of x.
      const int64_t block = std::clamp<int64_t>((256 << 10) / (4 * in), 16, 256);
      const int64_t blocks = (out + block - 1) / block;
      pool.parallel_for(blocks, 1, [&](int64_t b0, int64_t b1) {
        std::vector<float> buf(w_.dtype == DType::F32 ? 0 : static_cast<size_t>(block * in));
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t o0 = b * block, o1 = std::min(out, o0 + block);
          const float* wb = buf.data();
          if (w_.dtype == DType::F32) wb = w_.as<float>() + o0 * in;
          else convert_to_f32(w_.dtype, w_.as<uint16_t>() + o0 * in, buf.data(), static_cast<size_t>((o1 - o0) * in));
          sgemm_xwt(x, rows, in, wb, o1 - o0, y + o0, out);
        }
      });
    }
    add_bias(y, rows);
  }

 private:
  TensorView w_;
};

}  // namespace

std::unique_ptr<CpuLinear> make_dense_cpu_linear(const LinearWeight& w) {
  if (w.weight.dtype != DType::F32 && w.weight.dtype != DType::F16 && w.weight.dtype != DType::BF16)
    fail("linear layer '", w.name, "': unsupported dtype ", dtype_name(w.weight.dtype));
  return std::make_unique<DenseCpuLinear>(w);
}

}  // namespace qf
