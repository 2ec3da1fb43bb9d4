#pragma once
// Combine: y row t = Σ weight · expert output row, over token t's assignments in rank order.
// Each output row is written once; the fixed order makes the bits independent of threads.
#include <cstddef>

#include "../core/threads.hpp"
#include "../core/types.hpp"
#include "../routing/routing.hpp"
#include "../simd/rows.hpp"

MOE_NAMESPACE_BEGIN

// y [T, d] (rows `ldy` apart) from expert_out [A, d] in the plan's expert-grouped order. With
// `init` [T, d] (rows d apart; MoELayer's shared experts and dropped tokens), y row t sums from
// init row t instead of zeros: y is written once, not summed and then added to. Tokens with no
// assignment get init's row, or zeros.
template <class Arch, class T>
void combine(Arch arch, const Routing<T>& plan, const T* expert_out, index_t d, T* y, index_t ldy, const T* init = nullptr) {
  const index_t T_ = plan.num_tokens;
  // Threads take runs of tokens that move equal numbers of rows, as in dispatch.
  auto rows_before = [&](index_t t) { return plan.rows_moved_before(t); };
  parallel_for_balanced(T_, T_ * d > 65536, rows_before, [&](index_t t) {
    const index_t first = plan.token_begin[t];
    simd::weighted_row_sum(arch, expert_out, static_cast<std::size_t>(d), plan.assignment.data() + first,
                           plan.weight.data(), static_cast<std::size_t>(plan.token_begin[t + 1] - first), y + t * ldy,
                           static_cast<std::size_t>(d), init != nullptr ? init + t * d : nullptr);
  });
}

MOE_NAMESPACE_END
