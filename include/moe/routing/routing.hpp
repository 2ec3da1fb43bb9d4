#pragma once
// The Routing plan: the one hand-off between every sparse router and the hot path.
//
// A plan is a list of assignments (token, expert, weight), stored twice:
//  - grouped by expert: expert e owns assignments [expert_begin[e], expert_begin[e+1]) of
//    `token` and `weight`, tokens ascending inside each expert (the dispatch order);
//  - grouped by token: token t owns [token_begin[t], token_begin[t+1]) of `assignment`, which
//    holds indices into the expert-grouped arrays in the token's rank order (best expert first),
//    so combine sums each token's contributions in a fixed order without atomics.
#include <algorithm>
#include <cstddef>
#include <type_traits>
#include <vector>

#include "../core/error.hpp"
#include "../core/types.hpp"
#include "../core/workspace.hpp"

MOE_NAMESPACE_BEGIN

// The plan's arrays: a std::vector that takes any integer index, so that moe's signed index_t (the
// type of every count and index in a plan, as Eigen's Index is signed) indexes it without a cast
// or clang's -Wsign-conversion warning, in moe and in your loops over a plan. Everything else is
// std::vector's; it binds to const std::vector<U>&.
template <class U>
class PlanArray : public std::vector<U> {
 public:
  using std::vector<U>::vector;
  template <class I, std::enable_if_t<std::is_integral<I>::value, int> = 0>
  U& operator[](I i) noexcept {
    return std::vector<U>::operator[](static_cast<std::size_t>(i));
  }
  template <class I, std::enable_if_t<std::is_integral<I>::value, int> = 0>
  const U& operator[](I i) const noexcept {
    return std::vector<U>::operator[](static_cast<std::size_t>(i));
  }
};

template <class T>
struct Routing {
  index_t num_tokens = 0;
  index_t num_experts = 0;
  PlanArray<index_t> expert_begin;    // [E + 1]
  PlanArray<index_t> token;           // [A] token of each assignment, grouped by expert
  PlanArray<T> weight;                // [A] combine weight of each assignment, grouped by expert
  PlanArray<index_t> token_begin;     // [T + 1]
  PlanArray<index_t> assignment;      // [A] per token, in rank order: index into token/weight
  PlanArray<index_t> dropped;         // tokens left with fewer experts than they chose (capacity), ascending
  PlanArray<T> dropped_weight;        // [dropped] total weight of the choices each of them lost (not those rerouted)
  PlanArray<index_t> rerouted;        // tokens with a choice moved to a next-best expert, ascending
  PlanArray<index_t> fill_cursor;     // [E] scratch for build_routing, kept to avoid reallocation

  index_t num_assignments() const noexcept { return static_cast<index_t>(token.size()); }
  index_t tokens_of(index_t expert) const noexcept { return expert_begin[expert + 1] - expert_begin[expert]; }
  index_t experts_of(index_t tok) const noexcept { return token_begin[tok + 1] - token_begin[tok]; }
  // Rows dispatch or combine moves for tokens [0, tok): one per token (its x row read, or its y row
  // written) and one per assignment. Threads share those kernels' tokens out by it.
  index_t rows_moved_before(index_t tok) const noexcept { return tok + token_begin[tok]; }

  // Makes this the empty plan (no tokens) of `experts` experts, keeping the memory. Routers start
  // every route with it (RouterOutput::reshape), so a route that throws leaves this, never the
  // plan of an earlier batch beside the new batch's logits.
  void clear(index_t experts) {
    num_tokens = 0;
    num_experts = experts;
    expert_begin.assign(static_cast<std::size_t>(experts + 1), index_t(0));
    token_begin.assign(1, index_t(0));
    token.clear();
    weight.clear();
    assignment.clear();
    dropped.clear();
    dropped_weight.clear();
    rerouted.clear();
  }

  // Room for plans of up to `tokens` tokens, `experts` experts and `assignments` assignments: a
  // router building such a plan here then allocates nothing (MoELayer::reserve).
  void reserve(index_t tokens, index_t experts, index_t assignments) {
    const auto T_ = static_cast<std::size_t>(tokens), E = static_cast<std::size_t>(experts);
    const auto A = static_cast<std::size_t>(assignments);
    expert_begin.reserve(E + 1);
    fill_cursor.reserve(E);
    token_begin.reserve(T_ + 1);
    token.reserve(A);
    weight.reserve(A);
    assignment.reserve(A);
    dropped.reserve(T_);
    dropped_weight.reserve(T_);
    rerouted.reserve(T_);
  }

  // The expert that owns expert-grouped assignment `a` (binary search over expert_begin).
  index_t expert_of_assignment(index_t a) const noexcept {
    const auto it = std::upper_bound(expert_begin.begin(), expert_begin.end(), a);
    return static_cast<index_t>(it - expert_begin.begin()) - 1;
  }
};

namespace detail {

// Throws unless every array of `plan` has its size and every index in it is in range: what
// dispatch, the experts and combine index by. A router of the user's own may fill the arrays by
// hand; moe's routers build them with build_routing, which these checks cannot fail. O(T + E + A).
template <class T>
void check_plan_bounds(const char* where, const Routing<T>& plan, index_t tokens, index_t experts) {
  if (plan.num_tokens != tokens || plan.num_experts != experts) {
    throw_invalid(where, ": the router's plan must cover x's tokens and the layer's experts (plan tokens = ", plan.num_tokens,
                  ", x.rows() = ", tokens, ", plan experts = ", plan.num_experts, ", layer experts = ", experts, ")");
  }
  const index_t A = plan.num_assignments();
  auto size_must_be = [&](const char* name, std::size_t size, index_t expected, const char* expected_name) {
    if (static_cast<index_t>(size) != expected) {
      throw_invalid(where, ": the router's plan.", name, ".size() must be ", expected_name, " (plan.", name, ".size() = ", size,
                    ", ", expected_name, " = ", expected, ")");
    }
  };
  size_must_be("weight", plan.weight.size(), A, "plan.token.size()");
  size_must_be("assignment", plan.assignment.size(), A, "plan.token.size()");
  size_must_be("expert_begin", plan.expert_begin.size(), experts + 1, "num_experts + 1");
  size_must_be("token_begin", plan.token_begin.size(), tokens + 1, "num_tokens + 1");
  size_must_be("dropped_weight", plan.dropped_weight.size(), static_cast<index_t>(plan.dropped.size()), "plan.dropped.size()");
  // Offsets run from 0 to A without decreasing; indices lie in [0, bound).
  auto offsets = [&](const char* name, const PlanArray<index_t>& begin) {
    const std::size_t last = begin.size() - 1;  // (at least one element: the sizes are checked above)
    for (std::size_t i = 0; i <= last; ++i) {
      const bool fits = (i == 0 ? begin[i] == 0 : begin[i] >= begin[i - 1]) && (i != last || begin[i] == A);
      if (!fits) {
        throw_invalid(where, ": the router's plan.", name, " must run from 0 to the assignment count without decreasing (plan.", name,
                      "[", i, "] = ", begin[i], ", assignments = ", A, ")");
      }
    }
  };
  offsets("expert_begin", plan.expert_begin);
  offsets("token_begin", plan.token_begin);
  auto indices = [&](const char* name, const PlanArray<index_t>& values, index_t bound, const char* bound_name) {
    for (std::size_t i = 0; i < values.size(); ++i) {
      if (values[i] < 0 || values[i] >= bound) {
        throw_invalid(where, ": the router's plan.", name, "[", i, "] must be in [0, ", bound_name, ") (plan.", name, "[", i,
                      "] = ", values[i], ", ", bound_name, " = ", bound, ")");
      }
    }
  };
  indices("token", plan.token, tokens, "num_tokens");
  indices("assignment", plan.assignment, A, "assignments");
  indices("dropped", plan.dropped, tokens, "num_tokens");
  indices("rerouted", plan.rerouted, tokens, "num_tokens");
}

}  // namespace detail

// Builds `plan` from token-major choices: token t chose experts[c] with weight weights[c] for c in
// [choice_begin[t], choice_begin[t+1]), best first. O(T·k) counting sort; reuses the plan's
// memory. `dropped`, `dropped_weight` and `rerouted` are left untouched (the router owns them).
template <class T>
void build_routing(index_t num_tokens, index_t num_experts, const index_t* choice_begin, const index_t* experts,
                   const T* weights, Routing<T>& plan) {
  if (num_tokens < 0 || num_experts < 0) {
    detail::throw_invalid("build_routing: num_tokens and num_experts must be >= 0 (num_tokens = ", num_tokens,
                          ", num_experts = ", num_experts, ")");
  }
  // choice_begin must start at 0 and never decrease: the fill below writes by it.
  if (num_tokens > 0 && choice_begin[0] != 0) {
    detail::throw_invalid("build_routing: choice_begin[0] must be 0 (choice_begin[0] = ", choice_begin[0], ")");
  }
  for (index_t t = 0; t < num_tokens; ++t) {
    if (choice_begin[t + 1] < choice_begin[t]) {
      detail::throw_invalid("build_routing: choice_begin must not decrease (choice_begin[", t, "] = ", choice_begin[t],
                            ", choice_begin[", t + 1, "] = ", choice_begin[t + 1], ")");
    }
  }
  const index_t num_choices = num_tokens > 0 ? choice_begin[num_tokens] : 0;
  for (index_t c = 0; c < num_choices; ++c) {
    if (experts[c] < 0 || experts[c] >= num_experts) {
      detail::throw_invalid("build_routing: expert id out of range (expert = ", experts[c], ", num_experts = ", num_experts,
                            ", choice = ", c, ")");
    }
  }
  plan.num_tokens = num_tokens;
  plan.num_experts = num_experts;
  resize_keep(plan.expert_begin, num_experts + 1);
  resize_keep(plan.token, num_choices);
  resize_keep(plan.weight, num_choices);
  resize_keep(plan.token_begin, num_tokens + 1);
  resize_keep(plan.assignment, num_choices);

  // Count per expert, exclusive scan, then a stable fill in token order (tokens ascend within
  // each expert because t ascends).
  std::fill(plan.expert_begin.begin(), plan.expert_begin.end(), index_t(0));
  for (index_t c = 0; c < num_choices; ++c) ++plan.expert_begin[experts[c] + 1];
  for (index_t e = 0; e < num_experts; ++e) plan.expert_begin[e + 1] += plan.expert_begin[e];
  plan.fill_cursor.assign(plan.expert_begin.begin(), plan.expert_begin.end() - 1);
  for (index_t t = 0; t < num_tokens; ++t) {
    plan.token_begin[t] = choice_begin[t];
    for (index_t c = choice_begin[t]; c < choice_begin[t + 1]; ++c) {
      const index_t slot = plan.fill_cursor[experts[c]]++;
      plan.token[slot] = t;
      plan.weight[slot] = weights[c];
      plan.assignment[c] = slot;
    }
  }
  plan.token_begin[num_tokens] = num_choices;
}

MOE_NAMESPACE_END
