#include "formats/exl2.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>

#include "formats/quant_bits.h"

namespace qf {

namespace {

bool known_bits(int64_t b) { return b == 2 || b == 3 || b == 4 || b == 5 || b == 6 || b == 8; }

// Integer element i of an I16/I32/I64 view (the dtype was checked by the caller).
int64_t int_at(const TensorView& t, int64_t i) {
  switch (t.dtype) {
    case DType::I16: return t.as<int16_t>()[i];
    case DType::I32: return t.as<int32_t>()[i];
    case DType::I64: return t.as<int64_t>()[i];
    default: return 0;
  }
}

float float_at(const TensorView& t, int64_t i) {
  switch (t.dtype) {
    case DType::F16: return fp16_to_f32(t.as<uint16_t>()[i]);
    case DType::BF16: return bf16_to_f32(t.as<uint16_t>()[i]);
    case DType::F32: return t.as<float>()[i];
    default: return 0;
  }
}

bool is_int(DType d) { return d == DType::I16 || d == DType::I32 || d == DType::I64; }
bool is_float(DType d) { return d == DType::F16 || d == DType::BF16 || d == DType::F32; }

}  // namespace

std::shared_ptr<const Exl2Linear> Exl2Linear::load(const TensorStore& store, const std::string& prefix,
                                                    int64_t in_features, int64_t out_features) {
  const int64_t K = in_features, N = out_features;
  auto where = [&](const char* suffix) { return tensor_where(store, prefix + suffix); };
  auto need = [&](const char* suffix) -> const TensorView& {
    const TensorView* t = store.find(prefix + suffix);
    if (!t)
      fail(tensor_where(store, prefix + ".q_weight"), ": EXL2 layer '", prefix, "' has no ", prefix, suffix);
    return *t;
  };
  std::shared_ptr<Exl2Linear> L(new Exl2Linear());
  L->format = LinearFormat::EXL2;
  L->in_features = K;
  L->out_features = N;

  // q_weight: int32 [packed rows, N or N padded to 32].
  const TensorView& qw = need(".q_weight");
  if (qw.dtype != DType::I32 && qw.dtype != DType::U32)
    fail(where(".q_weight"), ": dtype ", dtype_name(qw.dtype), " where I32 is expected");
  if (qw.rank() != 2 || qw.dim(0) < 1 || !(qw.dim(1) == N || qw.dim(1) == ceil_div(N, 32) * 32))
    fail(where(".q_weight"), ": shape ", qw.shape_str(), " does not fit a linear layer with ", N,
         " output features (expected [packed rows, ", N, "])");
  const int64_t P = qw.dim(0), W = qw.dim(1);

  // q_groups: int16 [2G] of (bits, first packed row).
  const TensorView& qg = need(".q_groups");
  if (!is_int(qg.dtype)) fail(where(".q_groups"), ": dtype ", dtype_name(qg.dtype), " where I16 is expected");
  if (qg.rank() != 1 || qg.dim(0) < 2 || qg.dim(0) % 2 != 0)
    fail(where(".q_groups"), ": shape ", qg.shape_str(), " where [2 x groups] is expected");
  const int64_t G = qg.dim(0) / 2;

  // q_scale: int32 [G, ceil(W/8)]; q_scale_max: fp16 [G].
  const TensorView& qs = need(".q_scale");
  if (qs.dtype != DType::I32 && qs.dtype != DType::U32)
    fail(where(".q_scale"), ": dtype ", dtype_name(qs.dtype), " where I32 is expected");
  if (qs.rank() != 2 || qs.dim(0) != G || qs.dim(1) != ceil_div(W, 8))
    fail(where(".q_scale"), ": shape ", qs.shape_str(), " but q_groups lists ", G, " groups and q_weight has ", W,
         " columns (expected [", G, ", ", ceil_div(W, 8), "])");
  const TensorView& qm = need(".q_scale_max");
  if (!is_float(qm.dtype)) fail(where(".q_scale_max"), ": dtype ", dtype_name(qm.dtype), " where F16 is expected");
  if (qm.rank() != 1 || qm.dim(0) != G)
    fail(where(".q_scale_max"), ": shape ", qm.shape_str(), " but q_groups lists ", G, " groups");

  // q_invperm: int32 [K], a permutation of 0..K-1.
  const TensorView& qi = need(".q_invperm");
  if (!is_int(qi.dtype) || qi.dtype == DType::I16)
    fail(where(".q_invperm"), ": dtype ", dtype_name(qi.dtype), " where I32 is expected");
  if (qi.rank() != 1 || qi.dim(0) != K)
    fail(where(".q_invperm"), ": shape ", qi.shape_str(), " but the layer has ", K, " input features");

  L->q_weight_ = aligned_view(qw);
  L->q_groups_ = aligned_view(qg);
  L->q_scale_ = aligned_view(qs);
  L->q_scale_max_ = aligned_view(qm);
  L->q_invperm_ = aligned_view(qi);
  L->qw_ = L->q_weight_.as<uint32_t>();
  L->qs_ = L->q_scale_.as<uint32_t>();
  L->width_ = W;
  L->qs_width_ = qs.dim(1);

  // perm = argsort(invperm); every value must appear exactly once.
  L->perm_.assign(static_cast<size_t>(K), -1);
  for (int64_t i = 0; i < K; ++i) {
    const int64_t v = int_at(L->q_invperm_, i);
    if (v < 0 || v >= K)
      fail(where(".q_invperm"), ": entry ", i, " is ", v, ", outside 0..", K - 1, " (not a permutation)");
    if (L->perm_[static_cast<size_t>(v)] >= 0)
      fail(where(".q_invperm"), ": value ", v, " appears twice (not a permutation)");
    L->perm_[static_cast<size_t>(v)] = static_cast<int32_t>(i);
  }
  if (const TensorView* qp = store.find(prefix + ".q_perm")) {
    if (!is_int(qp->dtype) || qp->rank() != 1 || qp->dim(0) != K)
      fail(where(".q_perm"), ": dtype ", dtype_name(qp->dtype), " shape ", qp->shape_str(), " where I32 [", K,
           "] is expected");
    const TensorView p = aligned_view(*qp);
    for (int64_t j = 0; j < K; ++j)
      if (int_at(p, j) != L->perm_[static_cast<size_t>(j)])
        fail(where(".q_perm"), ": entry ", j, " is ", int_at(p, j), " but argsort(q_invperm) gives ",
             L->perm_[static_cast<size_t>(j)]);
  }

  // Groups: consecutive runs of packed rows; a group of `words` packed rows at `bits` holds
  // words*32/bits weight rows (the last group may be padded up to a whole packing unit).
  int64_t row = 0;
  for (int64_t g = 0; g < G; ++g) {
    Exl2Group gr;
    const int64_t bits = int_at(L->q_groups_, 2 * g), w0 = int_at(L->q_groups_, 2 * g + 1);
    const int64_t w1 = g + 1 < G ? int_at(L->q_groups_, 2 * g + 3) : P;
    if (!known_bits(bits))
      fail(where(".q_groups"), ": group ", g, " has bit width ", bits, " (EXL2 uses 2, 3, 4, 5, 6 or 8)");
    if (g == 0 && w0 != 0) fail(where(".q_groups"), ": the first group starts at packed row ", w0, ", not 0");
    if (w1 <= w0 || w1 > P)
      fail(where(".q_groups"), ": group ", g, " spans packed rows ", w0, "..", w1, ", outside 1..", P,
           " or empty (q_weight has ", P, " packed rows)");
    gr.bits = static_cast<int>(bits);
    gr.word0 = w0;
    gr.words = w1 - w0;
    gr.row0 = row;
    if (g + 1 < G) {
      if (gr.words * 32 % bits != 0)
        fail(where(".q_groups"), ": group ", g, " has ", gr.words, " packed rows, not a whole number of ", bits,
             "-bit weight rows");
      gr.rows = gr.words * 32 / bits;
    } else {
      // The last group takes the remainder of K. Its codes fill either exactly the words they need
      // or whole packing units (pack_columns_kernel packs 32 3/5-bit, 16 2/6-bit, 8 4-bit or 4
      // 8-bit codes at a time).
      gr.rows = K - row;
      const int64_t unit = bits == 3 || bits == 5 ? 32 : bits == 2 || bits == 6 ? 16 : 32 / bits;
      if (gr.rows <= 0 ||
          (gr.words != ceil_div(gr.rows * bits, 32) && gr.words != ceil_div(gr.rows, unit) * unit * bits / 32))
        fail(where(".q_groups"), ": the group rows add up to ", row + gr.words * 32 / bits, " but the layer has ",
             K, " input features");
    }
    if (row + gr.rows > K)
      fail(where(".q_groups"), ": the group rows add up to more than the layer's ", K, " input features");
    row += gr.rows;
    gr.scale_max = float_at(L->q_scale_max_, g);
    if (!std::isfinite(gr.scale_max) || gr.scale_max < 0)
      fail(where(".q_scale_max"), ": group ", g, " has scale ", gr.scale_max);
    L->groups_.push_back(gr);
  }
  return L;
}

size_t Exl2Linear::storage_bytes() const {
  // As ExLlamaV2 counts them (QParams.total_bits): q_weight, q_scale, q_scale_max, q_groups and
  // q_invperm. A q_perm, which EX2 never writes, is not counted.
  return q_weight_.nbytes() + q_scale_.nbytes() + q_scale_max_.nbytes() + q_groups_.nbytes() +
         q_invperm_.nbytes();
}

float Exl2Linear::scale(size_t g, int64_t n) const {
  const uint32_t word = qs_[static_cast<int64_t>(g) * qs_width_ + n / 8];
  const int q = static_cast<int>((word >> (4 * (n % 8))) & 15u) + 1;
  return static_cast<float>(q * q) * groups_[g].scale_max / 256.0f;
}

void Exl2Linear::dequantize(float* out) const {
  const int64_t K = in_features, N = out_features;
  for (size_t g = 0; g < groups_.size(); ++g) {
    const Exl2Group& gr = groups_[g];
    const int zero = 1 << (gr.bits - 1);
    for (int64_t n = 0; n < N; ++n) {
      const float s = scale(g, n);
      const uint32_t* col = qw_ + gr.word0 * width_ + n;
      for (int64_t r = 0; r < gr.rows; ++r) {
        const int q = static_cast<int>(read_packed(col, width_, r * gr.bits, gr.bits));
        out[n * K + perm_[static_cast<size_t>(gr.row0 + r)]] = static_cast<float>(q - zero) * s;
      }
    }
  }
}

std::string Exl2Linear::describe() const {
  std::map<int, int64_t, std::greater<int>> rows_by_bits;
  int64_t gmin = INT64_MAX, gmax = 0;
  for (const auto& g : groups_) {
    rows_by_bits[g.bits] += g.rows;
    if (&g != &groups_.back() || groups_.size() == 1) {
      gmin = std::min(gmin, g.rows);
      gmax = std::max(gmax, g.rows);
    }
  }
  std::string s;
  for (const auto& [bits, rows] : rows_by_bits) {
    char buf[32];
    std::snprintf(buf, sizeof buf, "%s%db:%.0f%%", s.empty() ? "" : " ", bits,
                  100.0 * static_cast<double>(rows) / static_cast<double>(in_features));
    s += buf;
  }
  s += str(", ", groups_.size(), groups_.size() == 1 ? " group" : " groups");
  if (gmax > 0) s += gmin == gmax ? str(" g", gmin) : str(" g", gmin, "-", gmax);
  bool identity = true;
  for (size_t j = 0; j < perm_.size() && identity; ++j) identity = perm_[j] == static_cast<int32_t>(j);
  if (!identity) s += ", act-order";
  return s;
}

void Exl2Linear::group_scales(size_t g, int64_t n0, int nt, float* s) const {
  const float smax = groups_[g].scale_max / 256.0f;
  const uint32_t* qsrow = qs_ + static_cast<int64_t>(g) * qs_width_;
  for (int j = 0; j < nt; ++j) {
    const uint32_t q = ((qsrow[(n0 + j) / 8] >> (4 * ((n0 + j) % 8))) & 15u) + 1u;
    s[j] = static_cast<float>(q * q) * smax;
  }
}

void Exl2Linear::decode_tile(int64_t n0, int nt, int64_t k0, int64_t k1, float* buf, int64_t ld) const {
  float s[64];
  for (size_t g = 0; g < groups_.size(); ++g) {
    const Exl2Group& gr = groups_[g];
    const int64_t r0 = std::max(k0, gr.row0), r1 = std::min(k1, gr.row0 + gr.rows);
    if (r0 >= r1) continue;
    const int bits = gr.bits, zero = 1 << (bits - 1);
    const uint32_t mask = (1u << bits) - 1u;
    group_scales(g, n0, nt, s);
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t pos = (r - gr.row0) * bits;
      const int off = static_cast<int>(pos & 31);
      const uint32_t* p0 = qw_ + (gr.word0 + (pos >> 5)) * width_ + n0;
      float* dst = buf + (r - k0) * ld;
      if (off + bits <= 32) {
        for (int j = 0; j < nt; ++j)
          dst[j] = static_cast<float>(static_cast<int>((p0[j] >> off) & mask) - zero) * s[j];
      } else {
        const uint32_t* p1 = p0 + width_;
        const int up = 32 - off;
        for (int j = 0; j < nt; ++j)
          dst[j] = static_cast<float>(static_cast<int>(((p0[j] >> off) | (p1[j] << up)) & mask) - zero) * s[j];
      }
    }
  }
}

}  // namespace qf
