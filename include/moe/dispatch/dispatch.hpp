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
template <class Arch, class T>
void dispatch(Arch arch, const Routing<T>& plan, const T* x, index_t ldx, index_t d, T* buffer) {
  const index_t A = plan.num_assignments();
  parallel_for(A, A * d > 65536, [&](index_t a) {
    simd::copy_row(arch, x + plan.token[a] * ldx, buffer + a * d, static_cast<std::size_t>(d));
  });
}

MOE_NAMESPACE_END
