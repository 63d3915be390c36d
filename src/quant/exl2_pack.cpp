#include "quant/exl2_pack.h"

#include "core/error.h"
#include "formats/quant_linear.h"
#include "quant/options.h"

namespace qf {

std::vector<TensorToWrite> Exl2Tensors::tensors(const std::string& prefix) const {
  std::vector<TensorToWrite> ts = {
      {prefix + ".q_weight", DType::I32, {P, W}, q_weight.data()},
      {prefix + ".q_scale", DType::I32, {G, (W + 7) / 8}, q_scale.data()},
      {prefix + ".q_scale_max", DType::F16, {G}, q_scale_max.data()},
      {prefix + ".q_groups", DType::I16, {2 * G}, q_groups.data()},
      {prefix + ".q_invperm", DType::I32, {K}, q_invperm.data()},
  };
  if (!bias.empty()) ts.push_back({prefix + ".bias", DType::F16, {N}, bias.data()});
  return ts;
}

std::map<std::string, TensorView> Exl2Tensors::views(const std::string& prefix,
                                                     std::shared_ptr<const Exl2Tensors> self) const {
  std::map<std::string, TensorView> out;
  for (const auto& t : tensors(prefix)) {
    TensorView v;
    v.dtype = t.dtype;
    v.shape = t.shape;
    v.data = t.data;
    v.keepalive = self;
    out.emplace(t.name, std::move(v));
  }
  return out;
}

size_t Exl2Tensors::bytes() const {
  return 4 * (q_weight.size() + q_scale.size() + q_invperm.size()) + 2 * (q_scale_max.size() + q_groups.size() + bias.size());
}

Exl2Tensors pack_exl2(const GptqCodes& c, const std::vector<GptqGroup>& groups, const std::vector<int32_t>& perm) {
  Exl2Tensors t;
  t.K = c.K;
  t.N = c.N;
  t.W = (c.N + 31) / 32 * 32;
  t.G = static_cast<int64_t>(groups.size());
  QF_CHECK(static_cast<int64_t>(perm.size()) == c.K, "internal: permutation of ", perm.size(), " rows for ", c.K);
  for (const auto& g : groups) t.P += packed_words(g.rows, g.bits);
  t.q_weight.assign(static_cast<size_t>(t.P * t.W), 0);
  t.q_scale.assign(static_cast<size_t>(t.G * ((t.W + 7) / 8)), 0);
  t.q_scale_max = c.scale_max;
  t.q_invperm.assign(static_cast<size_t>(c.K), 0);
  for (int64_t i = 0; i < c.K; ++i) t.q_invperm[static_cast<size_t>(perm[static_cast<size_t>(i)])] = static_cast<int32_t>(i);

  int64_t row = 0, word = 0;
  for (size_t g = 0; g < groups.size(); ++g) {
    const int bits = groups[g].bits;
    const int64_t rows = groups[g].rows;
    QF_CHECK(word <= INT16_MAX, "layer too tall for EXL2's int16 group table (", word, " packed rows)");
    t.q_groups.push_back(static_cast<int16_t>(bits));
    t.q_groups.push_back(static_cast<int16_t>(word));
    // Scale codes: nibble n % 8 of word n / 8 holds qs - 1; padded columns keep code 0.
    for (int64_t n = 0; n < c.N; ++n) {
      const uint32_t qs = c.qscale[g * static_cast<size_t>(c.N) + static_cast<size_t>(n)] - 1u;
      auto& w = t.q_scale[static_cast<size_t>(static_cast<int64_t>(g) * ((t.W + 7) / 8) + n / 8)];
      w = static_cast<int32_t>(static_cast<uint32_t>(w) | (qs << (4 * (n % 8))));
    }
    // Codes: one little-endian bit stream per column over the group's words; padded columns hold
    // the zero point, rows past the group's end (a last partial unit) hold 0. Row by row, so that
    // codes are read and words written contiguously (a 7B MLP matrix packs in tens of ms).
    const int64_t words = packed_words(rows, bits);
    const uint32_t zero = 1u << (bits - 1);
    uint32_t* base = reinterpret_cast<uint32_t*>(t.q_weight.data()) + word * t.W;
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t pos = r * bits;
      const int off = static_cast<int>(pos % 32);
      const bool spills = off + bits > 32;
      uint32_t* w0 = base + (pos / 32) * t.W;
      const uint8_t* q = c.q.data() + (row + r) * c.N;
      for (int64_t n = 0; n < c.N; ++n) w0[n] |= static_cast<uint32_t>(q[n]) << off;
      if (spills)
        for (int64_t n = 0; n < c.N; ++n) w0[n + t.W] |= static_cast<uint32_t>(q[n]) >> (32 - off);
      for (int64_t n = c.N; n < t.W; ++n) {
        w0[n] |= zero << off;
        if (spills) w0[n + t.W] |= zero >> (32 - off);
      }
    }
    row += rows;
    word += words;
  }
  QF_CHECK(row == c.K, "internal: groups cover ", row, " of ", c.K, " rows");
  return t;
}

LinearWeight exl2_linear(std::shared_ptr<const Exl2Tensors> t, const std::string& prefix) {
  TensorStore store = TensorStore::from_views(t->views(prefix, t));
  LinearWeight w;
  w.name = prefix;
  w.in_features = t->K;
  w.out_features = t->N;
  w.format = LinearFormat::EXL2;
  w.quant = detect_quantized_linear(store, prefix, t->K, t->N);
  QF_CHECK(w.quant && w.quant->format == LinearFormat::EXL2, "internal: packed layer '", prefix, "' is not EXL2");
  if (!t->bias.empty()) w.bias = store.get(prefix + ".bias");
  return w;
}

}  // namespace qf
