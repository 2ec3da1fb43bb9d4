#pragma once
// Soft MoE dispatch and combine (routing/soft.hpp): dense mixtures instead of row gathers.
//
//   dispatch: slot inputs X̃_g = D_gᵀ · x_g   [S, d] per group g (D_g, x_g: the group's rows)
//   combine:  y_g = C_g · Ỹ_g                [n_g, d] per group
//
// The slot buffers are [G·S, d] in the expert-major order of SoftRouting::slot_row, so each
// expert's rows are contiguous. Both are overloads of dispatch/combine on the routing type.
//
// Both products run on simd::matmul_tn and matmul_nn: each element one chain of FMAs in a fixed
// order (over the group's tokens for dispatch, over its slots for combine), with no heap allocation
// and the same bits on any thread count, so a group's slot inputs and outputs depend on nothing but
// its own rows. With several groups a group's S slot rows are not contiguous in the expert-major
// buffer, so they pass through `scratch` ([S, d]); with one group they are, and nothing is copied.
#include <cstddef>

#include "../core/types.hpp"
#include "../core/workspace.hpp"
#include "../routing/soft.hpp"
#include "../simd/matmul_nn.hpp"
#include "../simd/rows.hpp"

MOE_NAMESPACE_BEGIN

// Scratch elements dispatch() and combine() need for `routing` and width d.
template <class T>
index_t soft_dispatch_scratch_size(const SoftRouting<T>& routing, index_t d) noexcept {
  return routing.num_groups() > 1 ? routing.num_slots() * d : 0;
}

// slots [G·S, d] = per group, D_gᵀ · x_g; x rows are `ldx` apart. Slots of an empty group are 0.
// `scratch` grows to soft_dispatch_scratch_size.
template <class Arch, class T>
void dispatch(Arch arch, const SoftRouting<T>& routing, const T* x, index_t ldx, index_t d, T* slots, Buffer<T>& scratch) {
  const index_t S = routing.num_slots();
  const index_t s = routing.slots_per_expert();
  const index_t G = routing.num_groups();
  const ConstMatrixMap<T> dispatch_w = routing.dispatch_weights();  // [T, S]
  T* group_slots = G == 1 ? slots : scratch.ensure(soft_dispatch_scratch_size(routing, d));  // [S, d] slot-major
  for (index_t g = 0; g < G; ++g) {
    const index_t first = routing.group_begin(g);
    const index_t n = routing.group_size(g);
    // Slot j = Σ_t D[t, j] · x row t over the group's tokens (none: 0).
    simd::matmul_tn_strided(arch, dispatch_w.data() + first * S, static_cast<std::size_t>(S), static_cast<std::size_t>(n),
                            static_cast<std::size_t>(S), x + first * ldx, static_cast<std::size_t>(ldx),
                            static_cast<std::size_t>(d), group_slots, static_cast<std::size_t>(d), false);
    if (G == 1) break;
    for (index_t e = 0; e < routing.num_experts(); ++e) {
      simd::copy_row(arch, group_slots + e * s * d, slots + routing.slot_row(e, g, 0) * d, static_cast<std::size_t>(s * d));
    }
  }
}

// y [T, d] (rows `ldy` apart) = per group, C_g · Ỹ_g with slot_out [G·S, d] the expert outputs in
// slot-buffer order. Each row of y is written once. `scratch` grows to soft_dispatch_scratch_size.
template <class Arch, class T>
void combine(Arch arch, const SoftRouting<T>& routing, const T* slot_out, index_t d, T* y, index_t ldy, Buffer<T>& scratch) {
  const index_t S = routing.num_slots();
  const index_t s = routing.slots_per_expert();
  const index_t G = routing.num_groups();
  const ConstMatrixMap<T> combine_w = routing.combine_weights();  // [T, S]
  T* gathered = G == 1 ? nullptr : scratch.ensure(soft_dispatch_scratch_size(routing, d));  // [S, d] slot-major
  for (index_t g = 0; g < G; ++g) {
    const index_t first = routing.group_begin(g);
    const index_t n = routing.group_size(g);
    if (n == 0) continue;
    const T* group_out = slot_out;
    if (G > 1) {
      for (index_t e = 0; e < routing.num_experts(); ++e) {
        simd::copy_row(arch, slot_out + routing.slot_row(e, g, 0) * d, gathered + e * s * d, static_cast<std::size_t>(s * d));
      }
      group_out = gathered;
    }
    // y row t = Σ_j C[t, j] · Ỹ_g row j.
    simd::matmul_nn_strided(arch, combine_w.data() + first * S, static_cast<std::size_t>(S), static_cast<std::size_t>(n),
                            static_cast<std::size_t>(S), group_out, static_cast<std::size_t>(d), static_cast<std::size_t>(d),
                            y + first * ldy, static_cast<std::size_t>(ldy), false);
  }
}

MOE_NAMESPACE_END
