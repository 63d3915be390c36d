#include "quant/optimizer.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "core/error.h"

namespace qf {

namespace {
constexpr int64_t kBudgetUnits = 40000;  // budget resolution: 1/40000 of the target
// Not inlined into an expression, so the compiler cannot fuse it with a subtraction.
[[gnu::noinline]] double square(double e) { return e * e; }
}

double strategy_objective(const std::vector<std::vector<SlotOption>>& slots, const std::vector<size_t>& choice) {
  double sum = 0;
  for (size_t s = 0; s < slots.size(); ++s) {
    sum += square(slots[s][choice[s]].error);
  }
  return sum;
}

Strategy choose_options(const std::vector<std::vector<SlotOption>>& slots, int64_t budget_bits) {
  const size_t S = slots.size();
  Strategy st;
  st.choice.assign(S, 0);
  int64_t cheapest = 0;
  for (size_t s = 0; s < S; ++s) {
    QF_CHECK(!slots[s].empty(), "internal: a block with no measured options");
    size_t best = 0;
    for (size_t o = 1; o < slots[s].size(); ++o)
      if (slots[s][o].bits < slots[s][best].bits) best = o;
    st.choice[s] = best;
    cheapest += slots[s][best].bits;
  }
  if (cheapest > budget_bits || S == 0) {
    st.bits = cheapest;
    st.objective = strategy_objective(slots, st.choice);
    st.fits = cheapest <= budget_bits;
    return st;
  }

  // Costs rounded up to units, so that whatever fits in units fits in bits.
  const double unit = std::max(1.0, static_cast<double>(budget_bits) / kBudgetUnits);
  const auto units_of = [&](int64_t bits) { return static_cast<int64_t>(std::ceil(static_cast<double>(bits) / unit)); };
  const int64_t U = static_cast<int64_t>(std::floor(static_cast<double>(budget_bits) / unit));
  constexpr double kInf = std::numeric_limits<double>::infinity();
  // best[u]: least objective of the slots so far using at most u units; pick[s][u] the option.
  std::vector<double> best(static_cast<size_t>(U + 1), 0.0), next(static_cast<size_t>(U + 1));
  std::vector<std::vector<uint16_t>> pick(S, std::vector<uint16_t>(static_cast<size_t>(U + 1), 0));
  for (size_t s = 0; s < S; ++s) {
    std::fill(next.begin(), next.end(), kInf);
    for (size_t o = 0; o < slots[s].size(); ++o) {
      const int64_t c = units_of(slots[s][o].bits);
      const double e2 = square(slots[s][o].error);
      for (int64_t u = c; u <= U; ++u) {
        const double v = best[static_cast<size_t>(u - c)] + e2;
        if (v < next[static_cast<size_t>(u)]) {
          next[static_cast<size_t>(u)] = v;
          pick[s][static_cast<size_t>(u)] = static_cast<uint16_t>(o);
        }
      }
    }
    best.swap(next);
  }
  if (std::isfinite(best[static_cast<size_t>(U)])) {
    int64_t u = U;
    for (size_t s = S; s-- > 0;) {
      const size_t o = pick[s][static_cast<size_t>(u)];
      st.choice[s] = o;
      u -= units_of(slots[s][o].bits);
    }
  }
  // Polish with exact bits: the rounding left up to one unit per slot unused.
  auto total_bits = [&] {
    int64_t b = 0;
    for (size_t s = 0; s < S; ++s) b += slots[s][st.choice[s]].bits;
    return b;
  };
  for (bool improved = true; improved;) {
    improved = false;
    const int64_t used = total_bits();
    double gain_best = 0;
    size_t bs = 0, bo = 0;
    for (size_t s = 0; s < S; ++s) {
      const SlotOption& cur = slots[s][st.choice[s]];
      const double cur_e2 = square(cur.error);
      for (size_t o = 0; o < slots[s].size(); ++o) {
        const SlotOption& alt = slots[s][o];
        if (o == st.choice[s] || used - cur.bits + alt.bits > budget_bits) continue;
        // A real gain only: with fused multiply-adds, e*e - e*e need not be 0.
        const double gain = cur_e2 - square(alt.error);
        if (gain > gain_best && gain > 1e-14 * cur_e2) gain_best = gain, bs = s, bo = o;
      }
    }
    if (gain_best > 0) {
      st.choice[bs] = bo;
      improved = true;
    }
  }
  st.bits = total_bits();
  st.objective = strategy_objective(slots, st.choice);
  return st;
}

}  // namespace qf
