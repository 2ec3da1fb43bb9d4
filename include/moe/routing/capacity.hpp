#pragma once
// Expert capacity for token-choice routing (Switch, GShard, Megatron-Core).
//
// Each routing group of Tg tokens gives every expert room for C = ceil(capacity_factor · Tg · k / E)
// assignments (computed in Megatron-Core's order, see expert_capacity). Over-capacity choices are
// decided by priority:
//   position: per expert, earlier tokens win (Switch, Megatron "position");
//   score:    per expert, higher raw weights win, ties to the earlier token. The raw weight is the
//             softmax or sigmoid score before normalization and scale, so this is Megatron "probs"
//             where those do not reorder choices (softmax scores, or no normalization); with
//             sigmoid scores and `normalize`, Megatron ranks the normalized weights instead. Each
//             (token, choice) ranks on its own, not first choices before second ones as V-MoE's
//             batch prioritized routing does.
// and then either dropped, or rerouted to the token's next-best expert that still has room
// (Capacity-Aware Token Reroute). Capacity is counted within each group, so one group's tokens
// never displace another's.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "../core/error.hpp"
#include "../core/types.hpp"
#include "../simd/top_k.hpp"
#include "context.hpp"

MOE_NAMESPACE_BEGIN

enum class CapacityPriority { position, score };
enum class OverflowPolicy { drop, reroute };

namespace detail {
template <>
struct EnumNames<CapacityPriority> {
  static constexpr const char* names[] = {"position", "score"};
};
template <>
struct EnumNames<OverflowPolicy> {
  static constexpr const char* names[] = {"drop", "reroute"};
};
}  // namespace detail

// ceil(capacity_factor · tokens · k / E), the formula Megatron-Core and Switch use, rounded as
// Megatron-Core's get_capacity computes it in double, ceil((tokens · k / E) · capacity_factor): other
// orders of the same product round differently (cf 1.1, 45 tokens, k 4, E 6: 33 this way, 34 as
// ceil(cf · tokens · k / E)). A value past the range of index_t (a huge capacity_factor)
// saturates to its maximum: no expert ever fills. Needs a finite capacity_factor > 0 (a dropless
// router does not call this), tokens >= 0, k >= 1 and num_experts >= 1; otherwise moe::invalid_argument.
inline index_t expert_capacity(double capacity_factor, index_t tokens, index_t k, index_t num_experts) {
  if (!(capacity_factor > 0) || !std::isfinite(capacity_factor) || tokens < 0 || k < 1 || num_experts < 1) {
    detail::throw_invalid("expert_capacity: needs a finite capacity_factor > 0, tokens >= 0, k >= 1 and num_experts >= 1 "
                          "(capacity_factor = ", capacity_factor, ", tokens = ", tokens, ", k = ", k, ", num_experts = ",
                          num_experts, ")");
  }
  const double capacity =
      std::ceil(static_cast<double>(tokens) * static_cast<double>(k) / static_cast<double>(num_experts) * capacity_factor);
  // 2^63 exactly; every double below it converts to index_t without overflow.
  constexpr double kLimit = static_cast<double>(std::numeric_limits<index_t>::max());
  if (!(capacity < kLimit)) return std::numeric_limits<index_t>::max();
  return static_cast<index_t>(capacity);
}

namespace detail {

// Each token's candidates in rank order: the first num_chosen[t] are its choices; the rest (up to
// num_ranked[t]) are where a rerouted choice may go. Arrays are [T, stride] and [T].
template <class T>
struct TokenCandidates {
  index_t stride = 0;
  const index_t* expert = nullptr;
  const T* raw = nullptr;
  const index_t* num_chosen = nullptr;
  const index_t* num_ranked = nullptr;
};

// Decides which candidates survive capacity: kept[t·stride + j] = 1 for each surviving one.
// Scratch: load [E], order [T · stride].
// fixed_capacity > 0 overrides the formula (Hugging Face Switch's expert_capacity).
template <class T>
void apply_capacity(double capacity_factor, index_t fixed_capacity, CapacityPriority priority, OverflowPolicy overflow, index_t k,
                    index_t num_experts, const GroupBounds& groups, const TokenCandidates<T>& c, std::uint8_t* kept,
                    index_t* load, index_t* order) {
  const index_t R = c.stride;
  for (index_t g = 0; g < groups.count(); ++g) {
    const index_t first = groups.begin(g), last = groups.end(g);
    const index_t capacity =
        fixed_capacity > 0 ? fixed_capacity : expert_capacity(capacity_factor, last - first, k, num_experts);
    std::fill(load, load + num_experts, index_t(0));
    std::fill(kept + first * R, kept + last * R, std::uint8_t(0));
    auto try_take = [&](index_t t, index_t j) {
      const index_t e = c.expert[t * R + j];
      if (load[e] >= capacity) return false;
      ++load[e];
      kept[t * R + j] = 1;
      return true;
    };

    if (priority == CapacityPriority::position) {
      for (index_t t = first; t < last; ++t)
        for (index_t j = 0; j < c.num_chosen[t]; ++j) try_take(t, j);
    } else {
      index_t n = 0;
      for (index_t t = first; t < last; ++t)
        for (index_t j = 0; j < c.num_chosen[t]; ++j) order[n++] = t * R + j;
      // Higher raw weight first; equal weights by the earlier token, then the better rank (NaN
      // last, so the order stays a strict weak order whatever the weights).
      std::sort(order, order + n, [&](index_t a, index_t b) { return simd::ranks_before(c.raw[a], a, c.raw[b], b); });
      for (index_t i = 0; i < n; ++i) try_take(order[i] / R, order[i] % R);
    }

    if (overflow == OverflowPolicy::reroute) {
      // In token order, each lost choice moves to the next-ranked expert with room.
      for (index_t t = first; t < last; ++t) {
        index_t next = c.num_chosen[t];
        for (index_t j = 0; j < c.num_chosen[t]; ++j) {
          if (kept[t * R + j]) continue;
          while (next < c.num_ranked[t] && !try_take(t, next)) ++next;
          if (next < c.num_ranked[t]) ++next;
        }
      }
    }
  }
}

// How many of a token's lost choices reroute moved to other experts: its kept candidates past the
// chosen ones. apply_capacity moves lost choices in rank order until one finds no room, so these
// are its first lost choices in rank order; the rest stay lost (Routing::dropped).
inline index_t rerouted_choices(const std::uint8_t* kept, index_t num_chosen, index_t stride) noexcept {
  index_t moved = 0;
  for (index_t j = num_chosen; j < stride; ++j) moved += kept[j] != 0;
  return moved;
}

}  // namespace detail

MOE_NAMESPACE_END
