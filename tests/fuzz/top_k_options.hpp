#pragma once
// TopKOptions decoded from the fuzzer's bytes (mostly valid, sometimes extreme or invalid), and
// the documented constraints on them; shared by the top-k router and layer targets.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include <moe/routing/top_k.hpp>

#include "fuzz_common.hpp"

namespace moe_fuzz {

using moe::CapacityPriority;
using moe::GroupMask;
using moe::OverflowPolicy;
using moe::ScoreFunction;
using moe::SoftmaxPlacement;
using moe::TopKOptions;

inline moe::TopKOptions decode_options(FuzzedDataProvider& fdp, index_t E, index_t T) {
  TopKOptions o;
  o.k = index_in(fdp, 1, std::min<index_t>(E, 8));
  if (fdp.ConsumeIntegralInRange<int>(0, 7) == 0) o.k = index_in(fdp, 1, E);
  o.score = fdp.ConsumeBool() ? ScoreFunction::sigmoid : ScoreFunction::softmax;
  const int placement = fdp.ConsumeIntegralInRange<int>(0, 7);
  o.softmax_placement = (placement == 0 || (placement < 4 && o.score == ScoreFunction::softmax))
                            ? SoftmaxPlacement::after_top_k
                            : SoftmaxPlacement::before_top_k;
  o.normalize = fdp.ConsumeBool();
  o.scale = pick(fdp, {1.0, 1.0, 1.0, 2.5, 0.5, -1.0, 0.0, 16.0, 1e-30, 1e30, 1e300, kNaN, kInf, -kInf, kDenorm});

  if (fdp.ConsumeIntegralInRange<int>(0, 2) == 0) {
    std::vector<index_t> divisors;
    for (index_t g = 1; g <= E; ++g)
      if (E % g == 0) divisors.push_back(g);
    if (divisors.empty()) divisors.push_back(1);
    o.expert_groups = divisors[fdp.ConsumeIntegralInRange<std::size_t>(0, divisors.size() - 1)];
    if (fdp.ConsumeIntegralInRange<int>(0, 15) == 0) o.expert_groups = index_in(fdp, 0, E + 1);
    const index_t G = std::max<index_t>(o.expert_groups, 1);
    o.selected_groups = index_in(fdp, 1, G);
    o.group_score_top = index_in(fdp, 1, std::max<index_t>(E / G, 1));
    o.group_mask = fdp.ConsumeBool() ? GroupMask::zero : GroupMask::exclude;
    if (o.expert_groups > 1 && o.selected_groups >= 1 && o.k > o.selected_groups * (E / o.expert_groups) &&
        fdp.ConsumeIntegralInRange<int>(0, 3) != 0) {
      o.k = std::max<index_t>(1, o.selected_groups * (E / o.expert_groups));  // mostly keep it valid
    }
  }
  if (fdp.ConsumeIntegralInRange<int>(0, 3) == 0) {
    o.top_p = pick(fdp, {0.1, 0.5, 0.9, 1.0, 0.999, 1e-30, kDenorm, 0.25, 0.75, kNaN, 1.5, -0.1, kInf});
  }
  const int cap = fdp.ConsumeIntegralInRange<int>(0, 7);
  if (cap >= 4) {
    o.capacity_factor = pick(fdp, {0.5, 1.0, 1.25, 2.0, 4.0, 0.1, 1e-300, kDenorm, 1e300, 1e18, 9.3e18, kNaN, kInf, -1.0, 0.0});
  }
  if (cap == 3) o.fixed_capacity = fdp.ConsumeIntegralInRange<index_t>(-1, T + 1);
  o.capacity_priority = fdp.ConsumeBool() ? CapacityPriority::score : CapacityPriority::position;
  o.overflow = fdp.ConsumeBool() ? OverflowPolicy::reroute : OverflowPolicy::drop;
  o.renormalize_after_drop = fdp.ConsumeBool();
  if (fdp.ConsumeIntegralInRange<int>(0, 3) == 0) {
    o.jitter = pick(fdp, {0.01, 0.1, 0.5, 0.999999, kDenorm, 1.0, kNaN, -0.1});
    o.jitter_seed = fdp.ConsumeIntegral<std::uint64_t>();
  }
  o.check_finite = fdp.ConsumeIntegralInRange<int>(0, 7) != 0;
  return o;
}

// The documented constraints of TopKOptions (top_k.hpp) for a TopKRouter<T>, written out independently.
template <class T>
bool options_valid(const TopKOptions& o, index_t E) {
  if (E < 1 || o.k < 1 || o.k > E || !std::isfinite(static_cast<T>(o.scale))) return false;
  if (o.score == ScoreFunction::sigmoid && o.softmax_placement == SoftmaxPlacement::after_top_k) return false;
  if (o.expert_groups < 1 || E % o.expert_groups != 0) return false;
  const index_t size = E / o.expert_groups;
  if (o.selected_groups < 1 || o.selected_groups > o.expert_groups) return false;
  if (o.expert_groups > 1 && (o.k > o.selected_groups * size || o.group_score_top < 1 || o.group_score_top > size)) return false;
  if (!(o.top_p >= 0 && o.top_p <= 1)) return false;
  if (o.top_p > 0 && (o.score != ScoreFunction::softmax || o.softmax_placement != SoftmaxPlacement::before_top_k)) return false;
  if (!std::isfinite(o.capacity_factor) || o.capacity_factor < 0) return false;
  if (o.fixed_capacity < 0) return false;
  return o.jitter >= 0 && o.jitter < 1;
}

}  // namespace moe_fuzz
