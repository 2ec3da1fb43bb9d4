#pragma once
// A router's own backward against central differences in double, for the routers that fill a
// RouterOutput (TopKRouter, ExpertChoiceRouter). The layer tests reach a router's backward only
// through the whole layer; these checks name the router that is wrong.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include <moe/moe.hpp>

#include "reference.hpp"

namespace moe_test {

// Which terms L has besides the routing weights' (see RouterGradientCheck).
enum class RouterLoss {
  with_lost_weight,  // the weight capacity took from dropped tokens (DroppedTokens::pass_through)
  with_logits,       // the logits themselves (an auxiliary loss)
};

// L = Σ_a weight_grad(t, e) · weight_a over the plan's assignments, plus either
// Σ_dropped lost_grad(t) · (token t's lost weight) or Σ logit_grad(t, e) · logit(t, e).
class RouterGradientCheck {
 public:
  static constexpr index_t kTokens = 9, kWidth = 5;
  const moe::Matrix<double> x0;
  const moe::Matrix<double> W0;  // a starting gate weight [E, kWidth]; each case copies it

  explicit RouterGradientCheck(index_t num_experts)
      : x0(random_matrix<double>(kTokens, kWidth, 41, 1.5)), W0(random_matrix<double>(num_experts, kWidth, 42, 1.0)),
        ids_(static_cast<std::size_t>(kTokens)) {
    for (std::size_t t = 0; t < ids_.size(); ++t) ids_[t] = static_cast<std::int64_t>(100 + 3 * t);
  }

  static double weight_grad(index_t t, index_t e) { return 0.4 - 0.15 * double(e) + 0.09 * double(t); }
  static double lost_grad(index_t t) { return 0.7 - 0.2 * double(t); }
  static double logit_grad(index_t t, index_t e) { return 0.05 * double((3 * t + 5 * e) % 7) - 0.15; }

  // Routes x0 in training (with token ids, for jitter) through `router`, which views W; runs its
  // backward onto dx and dW that hold 0.25 (backward adds); checks every entry of both against
  // central differences of L with the selection held. Returns the route, for the caller's checks
  // that the case exercises what it names.
  template <class Router>
  const moe::RouterOutput<double>& run(const Router& router, moe::Matrix<double>& W, RouterLoss which) {
    const index_t E = router.num_experts();
    moe::Matrix<double> x = x0;
    loss(router, x, which, out_);
    const moe::Routing<double>& plan = out_.plan;
    std::vector<double> grad_weight(static_cast<std::size_t>(plan.num_assignments()));
    for (index_t a = 0; a < plan.num_assignments(); ++a) grad_weight[std::size_t(a)] = weight_grad(plan.token[a], plan.expert_of_assignment(a));
    std::vector<double> grad_lost(static_cast<std::size_t>(kTokens), 1e300);  // entries of tokens not dropped are not read
    for (const index_t t : plan.dropped) grad_lost[std::size_t(t)] = lost_grad(t);
    moe::Matrix<double> extra(kTokens, E);
    for (index_t t = 0; t < kTokens; ++t)
      for (index_t e = 0; e < E; ++e) extra(t, e) = logit_grad(t, e);
    const bool lost = which == RouterLoss::with_lost_weight;
    const double before = 0.25;
    moe::Matrix<double> dx = moe::Matrix<double>::Constant(kTokens, kWidth, before);
    moe::Matrix<double> dW = moe::Matrix<double>::Constant(E, kWidth, before);
    router.backward(x, out_, grad_weight.data(), lost ? grad_lost.data() : nullptr, lost ? nullptr : extra.data(), dx, dW);

    const std::vector<index_t> expert_begin(plan.expert_begin.begin(), plan.expert_begin.end());
    const std::vector<index_t> token(plan.token.begin(), plan.token.end());
    auto slope = [&](double& entry) {
      const double keep = entry, h = 1e-6;
      moe::RouterOutput<double> probe;
      entry = keep + h;
      const double up = loss(router, x, which, probe);
      const bool same_up = probe.plan.expert_begin == expert_begin && probe.plan.token == token;
      entry = keep - h;
      const double down = loss(router, x, which, probe);
      const bool same_down = probe.plan.expert_begin == expert_begin && probe.plan.token == token;
      entry = keep;
      REQUIRE(same_up);  // a selection that flips within ±h has no derivative to compare
      REQUIRE(same_down);
      return (up - down) / (2 * h);
    };
    auto near = [](double got, double want) { return std::abs(got - want) <= 1e-7 * std::max(1.0, std::abs(want)); };
    double largest = 0;
    // Every entry of `wrt` (x or W, which the router views) against its gradient.
    auto check_entries = [&](const char* name, moe::Matrix<double>& wrt, const moe::Matrix<double>& grad) {
      for (index_t r = 0; r < wrt.rows(); ++r)
        for (index_t c = 0; c < wrt.cols(); ++c) {
          const double want = slope(wrt(r, c));
          CAPTURE(name, r, c, want);
          CHECK(near(grad(r, c) - before, want));
          largest = std::max(largest, std::abs(want));
        }
    };
    check_entries("dx", x, dx);
    check_entries("dW", W, dW);
    CHECK(largest > 0.01);  // the gradients are not all zero
    return out_;
  }

 private:
  std::vector<std::int64_t> ids_;
  moe::RouterOutput<double> out_;

  template <class Router>
  double loss(const Router& router, const moe::Matrix<double>& x, RouterLoss which, moe::RouterOutput<double>& out) const {
    moe::RouteContext ctx;
    ctx.token_ids = ids_.data();
    ctx.training = true;
    router.route(x, ctx, out);
    const moe::Routing<double>& plan = out.plan;
    double L = 0;
    for (index_t a = 0; a < plan.num_assignments(); ++a) L += weight_grad(plan.token[a], plan.expert_of_assignment(a)) * plan.weight[a];
    if (which == RouterLoss::with_lost_weight) {
      for (index_t i = 0; i < index_t(plan.dropped.size()); ++i) L += lost_grad(plan.dropped[i]) * plan.dropped_weight[i];
    } else {
      for (index_t t = 0; t < x.rows(); ++t)
        for (index_t e = 0; e < router.num_experts(); ++e) L += logit_grad(t, e) * out.logits()(t, e);
    }
    return L;
  }
};

}  // namespace moe_test
