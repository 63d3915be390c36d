// Quantized linear layers built in memory in the published on-disk layouts, for the tests of the
// EXL2/GPTQ loaders and of every backend's kernels: known integer codes are packed exactly as
// ExLlamaV2 and AutoGPTQ pack them, and the weights they must decode to are kept alongside.
#pragma once
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "formats/quant_linear.h"

namespace qf {
class CpuLinear;
}

namespace qf::test {

// ---- EXL2 (shared/reference/exl2-format.md, section 1) -------------------------------------------

struct Exl2GroupSpec {
  int bits;
  int64_t rows;
};

struct Exl2Case {
  int64_t K = 256, N = 48;
  std::vector<Exl2GroupSpec> groups;
  bool permute = true;
  bool pad_columns = false;  // q_weight padded to a multiple of 32 columns
  bool bias = false;
  uint32_t seed = 1;
};

// The tensors of one layer, plus the weights they must decode to ([N][K], original row order).
struct Exl2Tensors {
  int64_t K = 0, N = 0, W = 0, P = 0, G = 0;
  std::vector<int32_t> q_weight, q_scale, q_invperm;
  std::vector<uint16_t> q_scale_max, bias;
  std::vector<int16_t> q_groups;
  std::vector<float> expected;
};

int unit_values(int bits);           // codes per packing unit of a width
uint32_t wshift(uint32_t x, int j);  // x << j, or x >> -j; 0 past 31
Exl2Tensors build_exl2(const Exl2Case& c);
// Writes the layer as "<prefix>.q_weight" etc. into a fresh scratch folder; returns the file.
std::filesystem::path write_exl2(const Exl2Tensors& t, const std::string& name, const std::string& prefix = "layer");

// ---- GPTQ (AutoGPTQ / GPTQModel) -------------------------------------------------------------------

struct GptqCase {
  int64_t K = 256, N = 64;
  int bits = 4;
  int64_t group_size = 32;  // -1: one group
  bool sym = true, v2 = false, act_order = false, write_g_idx = true, bias = false;
  bool hint_bits = true;    // pass bits/group size through QuantHints (else inferred)
  uint32_t seed = 1;
};

struct GptqTensors {
  int64_t K = 0, N = 0, G = 0, rows = 0, zcols = 0;
  std::vector<int32_t> qweight, qzeros, g_idx;
  std::vector<uint16_t> scales, bias;
  std::vector<float> expected;  // [N][K]
};

struct GptqOverrides {
  std::vector<int64_t> qzeros_shape, g_idx_shape, qweight_shape, scales_shape;
};

std::vector<uint32_t> pack_gptq(const std::vector<uint32_t>& v, int bits);
GptqTensors build_gptq(const GptqCase& c);
GptqOverrides qzeros_shape(std::vector<int64_t> s);
GptqOverrides g_idx_shape(std::vector<int64_t> s);
GptqOverrides qweight_shape(std::vector<int64_t> s);
GptqOverrides scales_shape(std::vector<int64_t> s);
std::filesystem::path write_gptq(const GptqTensors& t, const std::string& name, bool write_g_idx = true,
                                 const GptqOverrides& o = {});
QuantHints hints_for(const GptqCase& c);

// y = x W^T + b in double: the reference every kernel is compared with. w is [N][K].
std::vector<float> naive_linear(const std::vector<float>& w, const std::vector<float>& x,
                                const std::vector<float>& bias, int64_t rows, int64_t K, int64_t N);

// A load error of a layer written by write_exl2/write_gptq: one line, naming the file and the
// quoted tensor.
void expect_one_line(const std::string& msg, const std::string& tensor);

// Runs a CPU linear layer on random inputs of 1..17 rows and expects naive_linear(w) within 1e-4
// relative error overall and 1e-3 of the output's RMS at every element.
void expect_cpu_linear_matches(const CpuLinear& lin, const std::vector<float>& w, const std::vector<float>& bias,
                               int64_t K, int64_t N, uint32_t seed);

}  // namespace qf::test
