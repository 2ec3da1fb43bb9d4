#pragma once
// Routing statistics, cheap enough to leave on: per-expert load, drops, load imbalance and
// entropies of one batch's routing.
#include <algorithm>
#include <cmath>

#include "../core/error.hpp"
#include "../core/types.hpp"
#include "../routing/routing.hpp"

MOE_NAMESPACE_BEGIN

struct RoutingStats {
  PlanArray<index_t> load;         // [E] assignments per expert
  index_t assignments = 0;         // Σ load
  index_t dropped_tokens = 0;      // tokens that lost a choice to capacity
  index_t rerouted_tokens = 0;     // tokens with a choice moved to another expert
  double imbalance = 0;            // max load / mean load (1 = perfectly balanced; 0 when empty)
  double load_entropy = 0;         // entropy (nats) of the load fractions; log E when balanced
  double mean_score_entropy = 0;   // mean over tokens of the entropy of their score row (if given)
};

// Statistics of `plan`; `scores` [T, E] (softmax rows, the plan's tokens and experts) adds
// mean_score_entropy when non-empty. A score outside [0, 1] (or NaN) throws moe::numeric_error.
template <class T>
RoutingStats routing_stats(const Routing<T>& plan, const ConstMatrixMap<T>& scores = ConstMatrixMap<T>(nullptr, 0, 0)) {
  if (scores.rows() != 0 || scores.cols() != 0) {
    detail::check_dim("routing_stats", "scores.rows()", scores.rows(), "plan.num_tokens", plan.num_tokens);
    detail::check_dim("routing_stats", "scores.cols()", scores.cols(), "plan.num_experts", plan.num_experts);
  }
  RoutingStats s;
  const index_t E = plan.num_experts;
  s.load.resize(static_cast<std::size_t>(E));
  index_t max_load = 0;
  for (index_t e = 0; e < E; ++e) {
    s.load[e] = plan.tokens_of(e);
    max_load = std::max(max_load, plan.tokens_of(e));
  }
  s.assignments = plan.num_assignments();
  s.dropped_tokens = static_cast<index_t>(plan.dropped.size());
  s.rerouted_tokens = static_cast<index_t>(plan.rerouted.size());
  if (s.assignments > 0) {
    const double mean = static_cast<double>(s.assignments) / static_cast<double>(E);
    s.imbalance = static_cast<double>(max_load) / mean;
    for (index_t l : s.load) {
      if (l == 0) continue;
      const double f = static_cast<double>(l) / static_cast<double>(s.assignments);
      s.load_entropy -= f * std::log(f);
    }
  }
  if (scores.rows() > 0) {
    double total = 0;
    for (index_t t = 0; t < scores.rows(); ++t) {
      for (index_t e = 0; e < scores.cols(); ++e) {
        const double p = static_cast<double>(scores(t, e));
        if (!(p >= 0 && p <= 1)) {  // (NaN too: it would have been skipped silently)
          detail::throw_numeric("routing_stats: scores(", t, ", ", e, ") is not a probability (", p, ")");
        }
        if (p > 0) total -= p * std::log(p);
      }
    }
    s.mean_score_entropy = total / static_cast<double>(scores.rows());
  }
  return s;
}

MOE_NAMESPACE_END
