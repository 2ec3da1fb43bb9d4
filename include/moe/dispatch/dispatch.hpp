#pragma once
// Dispatch: gather each expert's tokens into one contiguous, expert-ordered buffer.
// Padding-free: the buffer has exactly one row per assignment, in the plan's expert-grouped order.
#include <cstddef>

#include "../core/threads.hpp"
#include "../core/types.hpp"
#include "../routing/routing.hpp"
#include "../simd/rows.hpp"

MOE_NAMESPACE_BEGIN

// buffer [A, d] row a = x row plan.token[a]; x rows are `ldx` apart.
// Token by token: each x row is read once, in order, and written to its assignments' rows (a
// token's k copies read it from L1). Against gathering in the buffer's order (scattered reads,
// in-order writes), one binary, random interleaving, medians of 9: S1–S3 at T = 128–2048 took
// 0.80–0.99 of the time, except S2 at T = 2048 (a 48 MiB buffer) on 4 KiB pages, 1.20–1.34 (one
// TLB miss per scattered row), which the workspace's 2 MiB pages (core/workspace.hpp) bring to 1.03.
template <class Arch, class T>
void dispatch(Arch arch, const Routing<T>& plan, const T* x, index_t ldx, index_t d, T* buffer) {
  const index_t T_ = plan.num_tokens;
  // Threads take runs of tokens that move equal numbers of rows: a token has k assignments under
  // top-k, but 0 to E under expert choice.
  auto rows_before = [&](index_t t) { return plan.rows_moved_before(t); };
  parallel_for_balanced(T_, plan.num_assignments() * d > 65536, rows_before, [&](index_t t) {
    const T* row = x + t * ldx;
    for (index_t c = plan.token_begin[t]; c < plan.token_begin[t + 1]; ++c)
      simd::copy_row(arch, row, buffer + plan.assignment[c] * d, static_cast<std::size_t>(d));
  });
}

MOE_NAMESPACE_END
