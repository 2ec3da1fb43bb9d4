#pragma once
// Auxiliary-loss-free load balancing (Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing
// Strategy for Mixture-of-Experts"; DeepSeek-V3 e_score_correction_bias).
//
// Holds a selection bias b [E]. After each training step, given the per-expert load c_i of the
// step (tokens routed to expert i; sum it over the global batch):
//   b_i ← b_i + u · sign(mean_j c_j − c_i),   sign(0) = 0
// so an overloaded expert becomes less attractive and an underloaded one more. The bias enters
// selection only (TopKRouter::set_selection_bias: chosen by score + b, weighted by score alone),
// so it never changes a combine weight and adds no gradient. This is Megatron-Core's
// get_updated_expert_bias (moe_router_bias_update_rate = u).
#include <cmath>
#include <cstddef>
#include <limits>
#include <utility>
#include <vector>

#include "../core/error.hpp"
#include "../core/types.hpp"
#include "../routing/routing.hpp"
#include "../routing/top_k.hpp"
#include "losses.hpp"

MOE_NAMESPACE_BEGIN

template <class T>
class BiasBalancer {
 public:
  using Scalar = T;

  // b = 0. update_rate u must be finite and > 0 in T (DeepSeek-V3: 0.001): 1e39 overflows float
  // and 1e-50 rounds to 0, a balancer that never moves.
  BiasBalancer(index_t num_experts, double update_rate) : update_rate_(update_rate) {
    if (num_experts < 1) detail::throw_invalid("BiasBalancer: num_experts must be at least 1 (num_experts = ", num_experts, ")");
    if (!(detail::finite_in<T>(update_rate) && static_cast<T>(update_rate) > T(0))) {
      detail::throw_invalid("BiasBalancer: update_rate must be finite and > 0 in the scalar type (update_rate = ", update_rate,
                            ")");
    }
    bias_ = Vector<T>::Zero(num_experts);
  }

  index_t num_experts() const noexcept { return bias_.size(); }
  double update_rate() const noexcept { return update_rate_; }
  const Vector<T>& bias() const noexcept { return bias_; }  // [E]

  // Replaces b (e.g. restored from a checkpoint); [E], finite.
  void set_bias(const Vector<T>& bias) {
    detail::check_dim("BiasBalancer::set_bias", "bias.size()", bias.size(), "num_experts", num_experts());
    for (index_t e = 0; e < bias.size(); ++e) {
      if (!std::isfinite(bias[e])) detail::throw_invalid("BiasBalancer::set_bias: bias[", e, "] is not finite (", bias[e], ")");
    }
    bias_ = bias;
  }
  void reset() { bias_.setZero(); }

  // One step of the rule from per-expert loads [E] (non-negative). The comparison with the mean
  // is exact: the sign of Σ_j c_j − E · c_i, taken as (q − c_i, r) with Σ_j c_j = q · E + r so
  // that E · c_i cannot overflow.
  void update(const std::vector<index_t>& load) {
    const char* where = "BiasBalancer::update";
    const index_t E = num_experts();
    detail::check_dim(where, "load.size()", static_cast<index_t>(load.size()), "num_experts", E);
    index_t total = 0;
    for (std::size_t e = 0; e < load.size(); ++e) {
      if (load[e] < 0) detail::throw_invalid(where, ": load[", e, "] must be >= 0 (load[", e, "] = ", load[e], ")");
      if (load[e] > std::numeric_limits<index_t>::max() - total) {
        detail::throw_invalid(where, ": the loads' sum overflows index_t (load[", e, "] = ", load[e], ", sum before it = ", total, ")");
      }
      total += load[e];
    }
    const index_t mean_floor = total / E, remainder = total % E;
    const T step = static_cast<T>(update_rate_);
    auto updated = [&](index_t e) {
      const index_t c = load[static_cast<std::size_t>(e)];
      if (c < mean_floor || (c == mean_floor && remainder > 0)) return bias_[e] + step;  // c < mean
      if (c > mean_floor) return bias_[e] - step;                                         // c > mean
      return bias_[e];
    };
    // Every new bias is checked before any is written: a huge rate would otherwise overflow it.
    for (index_t e = 0; e < E; ++e) {
      if (!std::isfinite(updated(e))) {
        detail::throw_numeric(where, ": bias[", e, "] would overflow (bias[", e, "] = ", bias_[e], ", update_rate = ",
                              update_rate_, ")");
      }
    }
    for (index_t e = 0; e < E; ++e) bias_[e] = updated(e);
  }
  // Loads from a plan: the assignments each expert received (after capacity, if any).
  void update(const Routing<T>& plan) {
    detail::check_dim("BiasBalancer::update", "plan.num_experts", plan.num_experts, "num_experts", num_experts());
    std::vector<index_t> load(static_cast<std::size_t>(plan.num_experts));
    for (index_t e = 0; e < plan.num_experts; ++e) load[static_cast<std::size_t>(e)] = plan.tokens_of(e);
    update(load);
  }
  // Loads summed over micro-batches (and ranks) by a LoadAccumulator: the router's choices before
  // capacity over the global batch.
  void update(const LoadAccumulator& load) { update(load.counts()); }

  // Installs b as the router's selection bias.
  void apply(TopKRouter<T>& router) const {
    detail::check_dim("BiasBalancer::apply", "router.num_experts()", router.num_experts(), "num_experts", num_experts());
    router.set_selection_bias(bias_);
  }
  // Installs b in a layer's own copy of its router (MoELayer::set_selection_bias).
  template <class Layer>
  auto apply(Layer& layer) const -> decltype(layer.set_selection_bias(std::declval<const Vector<T>&>()), void()) {
    detail::check_dim("BiasBalancer::apply", "layer.num_experts()", layer.num_experts(), "num_experts", num_experts());
    layer.set_selection_bias(bias_);
  }

 private:
  Vector<T> bias_;  // [E]
  double update_rate_;
};

MOE_NAMESPACE_END
