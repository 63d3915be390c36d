#include "quant/options.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>

#include "core/error.h"

namespace qf {

namespace {

bool valid_bits(int b) { return b == 2 || b == 3 || b == 4 || b == 5 || b == 6 || b == 8; }
bool valid_group(int64_t g) { return g == 32 || g == 64 || g == 128; }

// Codes per packing unit and words per unit (ExLlamaV2's pack_columns: 16 2-bit codes in 1 word,
// 32 3-bit in 3, 8 4-bit in 1, 32 5-bit in 5, 16 6-bit in 3, 4 8-bit in 1).
int unit_codes(int bits) { return bits == 3 || bits == 5 ? 32 : bits == 2 || bits == 6 ? 16 : 32 / bits; }

void check_parts(const std::vector<MixPart>& parts, const std::string& where) {
  if (parts.empty()) fail(where, ": a quantization mix needs at least one part");
  double sum = 0;
  for (size_t i = 0; i < parts.size(); ++i) {
    const auto& p = parts[i];
    if (!valid_bits(p.bits)) fail(where, ": ", p.bits, "-bit part (EXL2 uses 2, 3, 4, 5, 6 or 8 bits)");
    if (!valid_group(p.group_size)) fail(where, ": group size ", p.group_size, " (use 32, 64 or 128)");
    if (!(p.frac > 0 && p.frac <= 1)) fail(where, ": part share ", p.frac, " outside (0, 1]");
    if (i > 0 && p.bits >= parts[i - 1].bits) fail(where, ": parts must be in descending bit width");
    sum += p.frac;
  }
  if (std::fabs(sum - 1.0) > 1e-3) fail(where, ": part shares add up to ", sum, ", not 1");
}

}  // namespace

int64_t packed_words(int64_t rows, int bits) {
  const int u = unit_codes(bits);
  return (rows + u - 1) / u * (u * bits / 32);
}

std::string LinearSpec::describe() const {
  std::string s;
  for (const auto& p : parts) {
    char buf[48];
    std::snprintf(buf, sizeof buf, "%s%g:%db_%lldg", s.empty() ? "" : "/", p.frac, p.bits,
                  static_cast<long long>(p.group_size));
    s += buf;
  }
  return s;
}

LinearSpec LinearSpec::parse(const std::string& desc) {
  LinearSpec spec;
  size_t pos = 0;
  while (pos <= desc.size()) {
    const size_t end = std::min(desc.find('/', pos), desc.size());
    const std::string part = desc.substr(pos, end - pos);
    MixPart p;
    double frac = 0;
    int bits = 0;
    long long g = 0;
    char tail = 0;
    if (std::sscanf(part.c_str(), "%lf:%db_%lldg%c", &frac, &bits, &g, &tail) != 3)
      fail("bad quantization mix ", quote_for_error(desc), " (expected e.g. 0.1:5b_128g/0.9:4b_128g)");
    p.frac = frac;
    p.bits = bits;
    p.group_size = g;
    spec.parts.push_back(p);
    pos = end + 1;
  }
  check_parts(spec.parts, "quantization mix " + quote_for_error(desc));
  return spec;
}

std::vector<GptqGroup> LinearSpec::groups(int64_t K) const {
  std::vector<GptqGroup> out;
  int64_t remaining = K;
  for (size_t i = 0; i < parts.size() && remaining > 0; ++i) {
    const MixPart& p = parts[i];
    int64_t rows = remaining;
    if (i + 1 < parts.size()) {
      // Whole groups; the small epsilon keeps 0.1 * 640 from rounding up to a second group.
      const auto n = static_cast<int64_t>(std::ceil(p.frac * static_cast<double>(K) / static_cast<double>(p.group_size) - 1e-9));
      rows = std::min(remaining, n * p.group_size);
    }
    for (int64_t r = 0; r < rows; r += p.group_size) out.push_back({p.bits, std::min(p.group_size, rows - r)});
    remaining -= rows;
  }
  return out;
}

int64_t LinearSpec::storage_bits(int64_t K, int64_t N) const {
  const int64_t W = (N + 31) / 32 * 32;
  int64_t words = 0;
  const auto gs = groups(K);
  for (const auto& g : gs) words += packed_words(g.rows, g.bits);
  const auto G = static_cast<int64_t>(gs.size());
  return 32 * words * W + 32 * G * ((W + 7) / 8) + 16 * G + 16 * 2 * G + 32 * K;
}

json LinearSpec::to_qparams() const {
  json gs = json::object(), bits = json::array(), prop = json::array();
  for (const auto& p : parts) {
    gs[std::to_string(p.bits)] = p.group_size;
    bits.push_back(p.bits);
    prop.push_back(p.frac);
  }
  return {{"group_size", gs}, {"bits", bits}, {"bits_prop", prop}, {"scale_bits", 4}};
}

LinearSpec LinearSpec::from_qparams(const json& j, const std::string& where) {
  if (!j.is_object()) fail(where, ": expected a QParams object");
  auto bits = j.find("bits"), prop = j.find("bits_prop"), gs = j.find("group_size");
  if (bits == j.end() || !bits->is_array() || prop == j.end() || !prop->is_array() || gs == j.end() ||
      bits->size() != prop->size() || bits->empty() || bits->size() > 8)
    fail(where, ": QParams need 'bits' and 'bits_prop' lists of one length and 'group_size'");
  LinearSpec spec;
  for (size_t i = 0; i < bits->size(); ++i) {
    if (!(*bits)[i].is_number_integer() || !(*prop)[i].is_number())
      fail(where, ": QParams 'bits' must be integers and 'bits_prop' numbers");
    MixPart p;
    p.bits = (*bits)[i].get<int>();
    p.frac = (*prop)[i].get<double>();
    const json* g = nullptr;
    if (gs->is_object()) {
      auto it = gs->find(std::to_string(p.bits));
      if (it != gs->end()) g = &*it;
    } else if (gs->is_array() && i < gs->size()) {
      g = &(*gs)[i];
    } else if (gs->is_number_integer()) {
      g = &*gs;
    }
    if (!g || !g->is_number_integer()) fail(where, ": QParams 'group_size' has no entry for ", p.bits, " bits");
    p.group_size = g->get<int64_t>();
    spec.parts.push_back(p);
  }
  check_parts(spec.parts, where);
  return spec;
}

const char* block_kind_name(BlockKind k) { return k == BlockKind::Attention ? "self_attn" : "mlp"; }

const std::vector<std::string>& block_projections(BlockKind k) {
  static const std::vector<std::string> attn = {"q_proj", "k_proj", "v_proj", "o_proj"};
  static const std::vector<std::string> mlp = {"gate_proj", "up_proj", "down_proj"};
  return k == BlockKind::Attention ? attn : mlp;
}

namespace {

std::vector<BlockOption> make_options(const std::vector<std::vector<const char*>>& rows) {
  std::vector<BlockOption> out;
  for (const auto& r : rows) {
    BlockOption o;
    for (const char* d : r) o.specs.push_back(LinearSpec::parse(d));
    out.push_back(std::move(o));
  }
  return out;
}

}  // namespace

// From about 2.1 to 8 bits. Attention gives v (and then o) a step more than q/k, the MLP gives
// down more than gate/up: those see the most error amplification. Neighbouring options differ
// by small amounts so that the optimizer can land close to any target.
const std::vector<BlockOption>& block_options(BlockKind k) {
  static const std::vector<BlockOption> attn = make_options({
      {"1:2b_128g", "1:2b_128g", "1:2b_128g", "1:2b_128g"},
      {"0.05:3b_64g/0.95:2b_64g", "0.05:3b_64g/0.95:2b_64g", "0.05:3b_64g/0.95:2b_64g", "0.05:3b_64g/0.95:2b_64g"},
      {"0.1:3b_64g/0.9:2b_64g", "0.1:3b_64g/0.9:2b_64g", "0.25:3b_64g/0.75:2b_64g", "0.1:3b_64g/0.9:2b_64g"},
      {"0.1:3b_64g/0.9:2b_64g", "0.1:3b_64g/0.9:2b_64g", "0.1:4b_128g/0.9:3b_128g", "0.1:3b_64g/0.9:2b_64g"},
      {"0.1:3b_64g/0.9:2b_64g", "0.1:3b_64g/0.9:2b_64g", "0.1:4b_128g/0.9:3b_128g", "0.1:4b_128g/0.9:3b_128g"},
      {"0.1:4b_128g/0.9:3b_128g", "0.1:4b_128g/0.9:3b_128g", "0.1:4b_128g/0.9:3b_128g", "0.1:4b_128g/0.9:3b_128g"},
      {"0.1:4b_128g/0.9:3b_128g", "0.1:4b_128g/0.9:3b_128g", "1:4b_128g", "0.1:4b_128g/0.9:3b_128g"},
      {"1:4b_128g", "1:4b_128g", "1:4b_128g", "1:4b_128g"},
      {"1:4b_128g", "1:4b_128g", "1:4b_64g", "1:4b_128g"},
      {"1:4b_64g", "1:4b_64g", "1:4b_32g", "1:4b_64g"},
      {"1:4b_32g", "1:4b_32g", "1:4b_32g", "1:4b_32g"},
      {"0.1:5b_128g/0.9:4b_128g", "0.1:5b_128g/0.9:4b_128g", "0.1:5b_64g/0.9:4b_64g", "0.1:5b_128g/0.9:4b_128g"},
      {"0.1:5b_64g/0.9:4b_64g", "0.1:5b_64g/0.9:4b_64g", "1:5b_64g", "0.1:5b_64g/0.9:4b_64g"},
      {"0.1:5b_32g/0.9:4b_32g", "0.1:5b_32g/0.9:4b_32g", "1:5b_32g", "0.1:5b_32g/0.9:4b_32g"},
      {"1:5b_128g", "1:5b_128g", "1:6b_128g", "1:5b_128g"},
      {"0.1:6b_128g/0.9:5b_128g", "0.1:6b_128g/0.9:5b_128g", "1:6b_128g", "0.1:6b_128g/0.9:5b_128g"},
      {"1:6b_128g", "1:6b_128g", "1:6b_128g", "1:6b_128g"},
      {"1:6b_32g", "1:6b_32g", "1:8b_32g", "1:6b_32g"},
      {"1:8b_128g", "1:8b_128g", "1:8b_128g", "1:8b_128g"},
  });
  static const std::vector<BlockOption> mlp = make_options({
      {"1:2b_128g", "1:2b_128g", "1:2b_128g"},
      {"0.05:3b_64g/0.95:2b_64g", "0.05:3b_64g/0.95:2b_64g", "0.05:6b_32g/0.2:3b_64g/0.75:2b_64g"},
      {"0.1:3b_64g/0.9:2b_64g", "0.25:3b_64g/0.75:2b_64g", "0.05:5b_32g/0.95:3b_32g"},
      {"0.1:3b_64g/0.9:2b_64g", "0.3:3b_64g/0.7:2b_64g", "0.05:5b_32g/0.95:4b_32g"},
      {"0.1:4b_128g/0.9:3b_128g", "0.25:4b_128g/0.75:3b_128g", "0.05:8b_32g/0.1:4b_128g/0.85:3b_128g"},
      {"0.1:4b_32g/0.9:3b_32g", "0.25:4b_32g/0.75:3b_32g", "0.05:8b_32g/0.1:4b_32g/0.85:3b_32g"},
      {"0.1:4b_32g/0.9:3b_32g", "0.25:4b_32g/0.75:3b_32g", "0.05:8b_32g/0.95:4b_128g"},
      {"1:4b_128g", "1:4b_128g", "0.05:8b_32g/0.95:4b_128g"},
      {"1:4b_32g", "1:4b_32g", "0.05:8b_32g/0.95:4b_32g"},
      {"0.1:5b_128g/0.9:4b_128g", "0.25:5b_128g/0.75:4b_128g", "0.05:8b_32g/0.1:5b_128g/0.85:4b_128g"},
      {"0.1:5b_32g/0.9:4b_32g", "0.25:5b_32g/0.75:4b_32g", "0.05:8b_32g/0.1:5b_32g/0.85:4b_32g"},
      {"1:5b_128g", "1:5b_128g", "0.05:8b_32g/0.95:5b_128g"},
      {"0.1:6b_128g/0.9:5b_128g", "0.25:6b_128g/0.75:5b_128g", "0.05:8b_32g/0.1:6b_128g/0.85:5b_128g"},
      {"0.1:6b_32g/0.9:5b_32g", "0.25:6b_32g/0.75:5b_32g", "0.05:8b_32g/0.1:6b_32g/0.85:5b_32g"},
      {"1:6b_128g", "1:6b_128g", "0.05:8b_32g/0.95:6b_128g"},
      {"0.1:8b_128g/0.9:6b_128g", "0.1:8b_128g/0.9:6b_128g", "0.15:8b_128g/0.85:6b_128g"},
      {"0.1:8b_128g/0.9:6b_128g", "0.1:8b_128g/0.9:6b_128g", "1:8b_128g"},
      {"1:8b_128g", "1:8b_128g", "1:8b_128g"},
  });
  return k == BlockKind::Attention ? attn : mlp;
}

LinearSpec head_spec(int head_bits) {
  switch (head_bits) {
    case 2: return LinearSpec::parse("0.3:4b_32g/0.7:2b_32g");
    case 3: return LinearSpec::parse("0.15:4b_32g/0.85:3b_32g");
    case 4: return LinearSpec::parse("0.15:6b_32g/0.85:4b_32g");
    case 5: return LinearSpec::parse("0.15:6b_128g/0.85:5b_128g");
    case 6: return LinearSpec::parse("0.15:8b_128g/0.85:6b_128g");
    case 8: return LinearSpec::parse("1:8b_128g");
    default: fail("--head-bits ", head_bits, " (use 2, 3, 4, 5, 6 or 8)");
  }
}

}  // namespace qf
