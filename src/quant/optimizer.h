// Chooses one measured option per block so that the decoder's bits stay within the budget
// (decoder weights x target bpw) and the summed squared block errors are smallest: errors of
// separate blocks add up roughly as independent perturbations of the output, so the sum of
// squares tracks the final KL divergence better than the product or the maximum.
// Solved exactly (up to a fine discretisation of the budget) as a multiple-choice knapsack by
// dynamic programming, then polished with exact bit counts.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

namespace qf {

struct SlotOption {
  int64_t bits = 0;
  double error = 0;  // 1 - accuracy
};

struct Strategy {
  std::vector<size_t> choice;  // option index per slot
  int64_t bits = 0;            // their total
  double objective = 0;        // sum of squared errors
  bool fits = true;            // false: even the cheapest options exceed the budget
};

// `slots[s]` lists slot s's options. When the cheapest choice exceeds the budget, returns it
// with fits = false (the caller reports the lowest bpw the model allows).
Strategy choose_options(const std::vector<std::vector<SlotOption>>& slots, int64_t budget_bits);

// The sum of squared errors of a choice (the objective above).
double strategy_objective(const std::vector<std::vector<SlotOption>>& slots, const std::vector<size_t>& choice);

}  // namespace qf
