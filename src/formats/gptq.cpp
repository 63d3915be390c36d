#include "formats/gptq.h"

#include <algorithm>

#include "formats/quant_bits.h"

namespace qf {

namespace {

bool is_int(DType d) { return d == DType::I32 || d == DType::U32; }
bool is_float(DType d) { return d == DType::F16 || d == DType::BF16 || d == DType::F32; }

float float_at(const TensorView& t, int64_t i) {
  switch (t.dtype) {
    case DType::F16: return fp16_to_f32(t.as<uint16_t>()[i]);
    case DType::BF16: return bf16_to_f32(t.as<uint16_t>()[i]);
    default: return t.as<float>()[i];
  }
}

int64_t int_at(const TensorView& t, int64_t i) {
  switch (t.dtype) {
    case DType::I16: return t.as<int16_t>()[i];
    case DType::I64: return t.as<int64_t>()[i];
    default: return t.as<int32_t>()[i];
  }
}

constexpr int kBits[] = {2, 3, 4, 8};

}  // namespace

std::shared_ptr<const GptqLinear> GptqLinear::load(const TensorStore& store, const std::string& prefix,
                                                    int64_t in_features, int64_t out_features,
                                                    const QuantHints& hints) {
  const int64_t K = in_features, N = out_features;
  auto where = [&](const char* suffix) { return tensor_where(store, prefix + suffix); };
  if (hints.method == "awq")
    fail(where(".qweight"), ": AWQ checkpoints (packed along the output features) are not supported");
  if (hints.checkpoint_format == "marlin")
    fail(where(".qweight"), ": GPTQ checkpoint_format 'marlin' (repacked for the Marlin kernel) is not supported");
  auto need = [&](const char* suffix) -> const TensorView& {
    const TensorView* t = store.find(prefix + suffix);
    if (!t) fail(where(".qweight"), ": GPTQ layer '", prefix, "' has no ", prefix, suffix);
    return *t;
  };
  std::shared_ptr<GptqLinear> L(new GptqLinear());
  L->format = LinearFormat::GPTQ;
  L->in_features = K;
  L->out_features = N;
  L->v2_ = hints.checkpoint_format == "gptq_v2";

  const TensorView& qw = need(".qweight");
  const TensorView& qz = need(".qzeros");
  const TensorView& sc = need(".scales");
  if (!is_int(qw.dtype)) fail(where(".qweight"), ": dtype ", dtype_name(qw.dtype), " where I32 is expected");
  if (qw.rank() != 2 || qw.dim(1) != N)
    fail(where(".qweight"), ": shape ", qw.shape_str(), " does not fit a layer with ", N,
         " output features (expected [K*bits/32, ", N, "])");
  if (!is_float(sc.dtype)) fail(where(".scales"), ": dtype ", dtype_name(sc.dtype), " where F16 is expected");
  if (sc.rank() != 2 || sc.dim(1) != N || sc.dim(0) < 1)
    fail(where(".scales"), ": shape ", sc.shape_str(), " where [groups, ", N, "] is expected");
  const int64_t G = sc.dim(0);
  if (!is_int(qz.dtype)) fail(where(".qzeros"), ": dtype ", dtype_name(qz.dtype), " where I32 is expected");
  if (qz.rank() != 2 || qz.dim(0) != G)
    fail(where(".qzeros"), ": shape ", qz.shape_str(), " but scales has ", G, " groups");

  // Bit width: from the config when it says, else the one width whose packing fits qweight (and,
  // when K is too small to tell, qzeros).
  int bits = hints.bits;
  if (bits != 0) {
    if (std::find(std::begin(kBits), std::end(kBits), bits) == std::end(kBits))
      fail(where(".qweight"), ": the config says ", bits, "-bit GPTQ (supported: 2, 3, 4, 8)");
    if (qw.dim(0) != ceil_div(K * bits, 32))
      fail(where(".qweight"), ": shape ", qw.shape_str(), " but ", bits, "-bit codes for ", K, " input features need [",
           ceil_div(K * bits, 32), ", ", N, "]");
  } else {
    std::vector<int> fit;
    for (int b : kBits)
      if (qw.dim(0) == ceil_div(K * b, 32)) fit.push_back(b);
    if (fit.size() > 1) {
      std::vector<int> both;
      for (int b : fit)
        if (qz.dim(1) == ceil_div(N * b, 32)) both.push_back(b);
      if (!both.empty()) fit = both;
    }
    if (fit.empty())
      fail(where(".qweight"), ": shape ", qw.shape_str(), " fits no GPTQ bit width (2, 3, 4, 8) for ", K,
           " input features");
    if (fit.size() > 1)
      fail(where(".qweight"), ": shape ", qw.shape_str(), " fits both ", fit[0], " and ", fit[1],
           " bits; the config must say which (quantization_config.bits)");
    bits = fit[0];
  }
  L->bits_ = bits;
  if (qz.dim(1) != ceil_div(N * bits, 32))
    fail(where(".qzeros"), ": shape ", qz.shape_str(), " has width ", qz.dim(1), " but ", bits, "-bit zeros for ", N,
         " output features need ", ceil_div(N * bits, 32), " words per group");

  // Group of each input row.
  L->g_idx_.resize(static_cast<size_t>(K));
  if (const TensorView* gi = store.find(prefix + ".g_idx")) {
    if (!(gi->dtype == DType::I32 || gi->dtype == DType::I64 || gi->dtype == DType::I16))
      fail(where(".g_idx"), ": dtype ", dtype_name(gi->dtype), " where I32 is expected");
    if (gi->rank() != 1 || gi->dim(0) != K)
      fail(where(".g_idx"), ": shape ", gi->shape_str(), " but the layer has ", K, " input features");
    L->g_idx_view_ = aligned_view(*gi);
    for (int64_t k = 0; k < K; ++k) {
      const int64_t g = int_at(L->g_idx_view_, k);
      if (g < 0 || g >= G)
        fail(where(".g_idx"), ": entry ", k, " is ", g, ", outside the ", G, " groups of scales/qzeros");
      L->g_idx_[static_cast<size_t>(k)] = static_cast<int32_t>(g);
    }
  } else {
    if (hints.desc_act)
      fail(where(".qweight"), ": the config says desc_act (act-order) but there is no ", prefix,
           ".g_idx to say which group each input row belongs to");
    int64_t gs = hints.group_size > 0 ? hints.group_size : (G == 1 ? K : ceil_div(K, G));
    if (ceil_div(K, gs) != G)
      fail(where(".scales"), ": ", G, " groups do not fit ", K, " input features in groups of ", gs, " (and there is no ",
           prefix, ".g_idx)");
    for (int64_t k = 0; k < K; ++k) L->g_idx_[static_cast<size_t>(k)] = static_cast<int32_t>(k / gs);
  }
  // Describe the grouping: plain groups of gs rows, or act-order.
  {
    int64_t n0 = 0;
    for (int32_t g : L->g_idx_) n0 += g == 0;
    const int64_t gs = G == 1 ? K : n0;
    bool plain = gs > 0;
    for (int64_t k = 0; k < K && plain; ++k) plain = L->g_idx_[static_cast<size_t>(k)] == k / gs;
    L->act_order_ = !plain;
    L->group_size_ = plain ? gs : (hints.group_size > 0 ? hints.group_size : n0);
  }

  L->qweight_ = aligned_view(qw);
  L->qzeros_ = aligned_view(qz);
  L->scales_ = aligned_view(sc);
  // G x N scales (1/group_size of the weights' count): cheap to check, and one NaN or inf here makes
  // a whole group of weights, then every output, NaN.
  if (const int64_t i = first_non_finite(L->scales_); i >= 0)
    fail(where(".scales"), ": element ", element_index(sc.shape, i), " is ", float_text(L->scales_, i),
         " (scales must be finite)");
  L->qw_ = L->qweight_.as<uint32_t>();
  L->qz_ = L->qzeros_.as<uint32_t>();
  L->groups_ = G;
  L->zeros_width_ = qz.dim(1);
  L->sym_ = true;
  for (int64_t g = 0; g < G && L->sym_; ++g)
    for (int64_t n = 0; n < N && L->sym_; ++n) L->sym_ = L->zero(g, n) == (1 << (bits - 1));
  return L;
}

size_t GptqLinear::storage_bytes() const {
  return qweight_.nbytes() + qzeros_.nbytes() + scales_.nbytes() + g_idx_view_.nbytes();
}

int GptqLinear::zero(int64_t g, int64_t n) const {
  const uint32_t z = read_packed(qz_ + g * zeros_width_, 1, n * bits_, bits_);
  // v1 files store zero-1; like AutoGPTQ's reference dequantization, the +1 wraps within the bit
  // width (a stored 2^bits-1 means zero 0, the value v1 cannot otherwise express).
  return static_cast<int>(v2_ ? z : (z + 1u) & ((1u << bits_) - 1u));
}

float GptqLinear::scale(int64_t g, int64_t n) const { return float_at(scales_, g * out_features + n); }

void GptqLinear::dequantize(float* out) const {
  const int64_t K = in_features, N = out_features;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) {
      const int64_t g = g_idx_[static_cast<size_t>(k)];
      const int q = static_cast<int>(read_packed(qw_ + n, N, k * bits_, bits_));
      out[n * K + k] = static_cast<float>(q - zero(g, n)) * scale(g, n);
    }
}

std::string GptqLinear::describe() const {
  std::string s = str(bits_, "-bit ");
  s += groups_ == 1 ? std::string("g-1") : str("g", group_size_);
  s += sym_ ? " sym" : " asym";
  if (act_order_) s += " act-order";
  s += v2_ ? " (gptq_v2)" : "";
  return s;
}

void GptqLinear::tile_params(int64_t n0, int nt, float* scales, int32_t* zeros, int64_t ld) const {
  for (int64_t g = 0; g < groups_; ++g)
    for (int j = 0; j < nt; ++j) {
      scales[g * ld + j] = scale(g, n0 + j);
      zeros[g * ld + j] = zero(g, n0 + j);
    }
}

void GptqLinear::decode_tile(int64_t n0, int nt, int64_t k0, int64_t k1, const float* scales,
                             const int32_t* zeros, float* buf, int64_t ld) const {
  const int64_t N = out_features;
  const int bits = bits_;
  const uint32_t mask = (1u << bits) - 1u;
  for (int64_t k = k0; k < k1; ++k) {
    const int64_t pos = k * bits;
    const int off = static_cast<int>(pos & 31);
    const uint32_t* p0 = qw_ + (pos >> 5) * N + n0;
    const int64_t g = g_idx_[static_cast<size_t>(k)];
    const float* s = scales + g * ld;
    const int32_t* z = zeros + g * ld;
    float* dst = buf + (k - k0) * ld;
    if (off + bits <= 32) {
      for (int j = 0; j < nt; ++j) dst[j] = static_cast<float>(static_cast<int>((p0[j] >> off) & mask) - z[j]) * s[j];
    } else {
      const uint32_t* p1 = p0 + N;
      const int up = 32 - off;
      for (int j = 0; j < nt; ++j)
        dst[j] = static_cast<float>(static_cast<int>(((p0[j] >> off) | (p1[j] << up)) & mask) - z[j]) * s[j];
    }
  }
}

}  // namespace qf
