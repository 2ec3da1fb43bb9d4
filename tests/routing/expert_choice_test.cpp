// ExpertChoiceRouter: per-group top-c selection against a plain reference, ties, batch
// isolation, edge shapes, errors, and the MoE layer against a per-token double reference.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include <catch2/catch.hpp>
#include <moe/moe.hpp>

#include "../support/reference.hpp"
#include "../support/router_gradient.hpp"

// (A namespace of its own: this file may share a translation unit with other test files.)
namespace expert_choice_test {

namespace {

using moe::index_t;
template <class T>
using Mat = moe::Matrix<T>;

using moe_test::at;
using moe_test::normal_matrix;

// Multiples of 1/4 in [-2, 2]: products and short sums of them are exact in float, so equal
// rows give bit-equal logits however they are summed.
template <class T>
Mat<T> quarter_matrix(std::mt19937& rng, index_t rows, index_t cols) {
  std::uniform_int_distribution<int> pick(-8, 8);
  Mat<T> m(rows, cols);
  for (index_t i = 0; i < m.size(); ++i) m.data()[i] = static_cast<T>(pick(rng)) / T(4);
  return m;
}

// Double softmax(x · Wᵀ) [T, E].
template <class T>
std::vector<std::vector<double>> reference_scores(const Mat<T>& x, const Mat<T>& w) {
  std::vector<std::vector<double>> s(static_cast<std::size_t>(x.rows()));
  for (index_t t = 0; t < x.rows(); ++t) {
    std::vector<double> logit(static_cast<std::size_t>(w.rows()));
    for (index_t e = 0; e < w.rows(); ++e) {
      double acc = 0.0;
      for (index_t i = 0; i < x.cols(); ++i) acc += static_cast<double>(x(t, i)) * static_cast<double>(w(e, i));
      logit[static_cast<std::size_t>(e)] = acc;
    }
    double m = -std::numeric_limits<double>::infinity();
    for (const double l : logit) m = std::max(m, l);
    double sum = 0.0;
    for (double& l : logit) sum += (l = std::exp(l - m));
    for (double& l : logit) l /= sum;
    s[static_cast<std::size_t>(t)] = logit;
  }
  return s;
}

index_t reference_capacity(double cf, index_t group_tokens, index_t experts) {
  const double c = std::ceil(cf * static_cast<double>(group_tokens) / static_cast<double>(experts));
  return c >= static_cast<double>(group_tokens) ? group_tokens : static_cast<index_t>(c);
}

// Tokens of expert e, ascending: per group, the c best by score (ties to the lower token), by a
// full stable sort of the group.
template <class T>
std::vector<std::vector<index_t>> reference_selection(const moe::ConstMatrixMap<T>& scores, const std::vector<index_t>& bounds,
                                                      double cf) {
  const index_t E = scores.cols();
  std::vector<std::vector<index_t>> chosen(static_cast<std::size_t>(E));
  for (std::size_t g = 0; g + 1 < bounds.size(); ++g) {
    const index_t first = bounds[g];
    const index_t size = bounds[g + 1] - first;
    const index_t c = reference_capacity(cf, size, E);
    for (index_t e = 0; e < E; ++e) {
      std::vector<index_t> order(static_cast<std::size_t>(size));
      std::iota(order.begin(), order.end(), first);
      std::stable_sort(order.begin(), order.end(), [&](index_t a, index_t b) { return scores(a, e) > scores(b, e); });
      order.resize(static_cast<std::size_t>(c));
      std::sort(order.begin(), order.end());
      auto& dst = chosen[static_cast<std::size_t>(e)];
      dst.insert(dst.end(), order.begin(), order.end());
    }
  }
  return chosen;
}

// The plan's structural invariants, and the token order: descending weight, then lower expert.
template <class T>
void check_plan(const moe::Routing<T>& plan, index_t T_, index_t E) {
  REQUIRE(plan.num_tokens == T_);
  REQUIRE(plan.num_experts == E);
  const index_t A = plan.num_assignments();
  REQUIRE(plan.expert_begin.size() == static_cast<std::size_t>(E + 1));
  REQUIRE(plan.expert_begin.front() == 0);
  REQUIRE(plan.expert_begin.back() == A);
  REQUIRE(plan.weight.size() == static_cast<std::size_t>(A));
  for (index_t e = 0; e < E; ++e) {
    REQUIRE(plan.expert_begin[e] <= plan.expert_begin[e + 1]);
    for (index_t a = plan.expert_begin[e]; a < plan.expert_begin[e + 1]; ++a) {
      REQUIRE(plan.token[a] >= 0);
      REQUIRE(plan.token[a] < T_);
      if (a > plan.expert_begin[e]) REQUIRE(plan.token[a - 1] < plan.token[a]);
    }
  }
  REQUIRE(plan.token_begin.size() == static_cast<std::size_t>(T_ + 1));
  REQUIRE(plan.token_begin.front() == 0);
  REQUIRE(plan.token_begin.back() == A);
  REQUIRE(plan.assignment.size() == static_cast<std::size_t>(A));
  std::vector<int> seen(static_cast<std::size_t>(A), 0);
  for (index_t t = 0; t < T_; ++t) {
    REQUIRE(plan.token_begin[t] <= plan.token_begin[t + 1]);
    for (index_t i = plan.token_begin[t]; i < plan.token_begin[t + 1]; ++i) {
      const index_t a = plan.assignment[i];
      REQUIRE(a >= 0);
      REQUIRE(a < A);
      ++seen[static_cast<std::size_t>(a)];
      REQUIRE(plan.token[a] == t);
      if (i > plan.token_begin[t]) {
        const index_t prev = plan.assignment[i - 1];
        const bool ordered = plan.weight[prev] > plan.weight[a] ||
                             (plan.weight[prev] == plan.weight[a] && plan.expert_of_assignment(prev) < plan.expert_of_assignment(a));
        REQUIRE(ordered);
      }
    }
  }
  for (int count : seen) REQUIRE(count == 1);
  // A token chooses nothing, so nothing is dropped; unrouted tokens simply have no assignments.
  REQUIRE(plan.dropped.empty());
  REQUIRE(plan.rerouted.empty());
}

template <class T>
double tolerance() {
  return std::is_same<T, float>::value ? 2e-5 : 1e-12;
}

// Random boundaries of `groups` groups, some empty, covering [0, total) for the returned total.
std::vector<index_t> random_bounds(std::mt19937& rng, index_t groups, index_t max_size) {
  std::uniform_int_distribution<index_t> size(0, max_size);
  std::vector<index_t> bounds{0};
  for (index_t g = 0; g < groups; ++g) bounds.push_back(bounds.back() + size(rng));
  return bounds;
}


template <class T>
std::vector<moe::SwiGLU<T>> random_experts(std::mt19937& rng, index_t E, index_t d, index_t ff) {
  std::vector<moe::SwiGLU<T>> experts;
  for (index_t e = 0; e < E; ++e) {
    experts.emplace_back(normal_matrix<T>(rng, ff, d, 0.5), normal_matrix<T>(rng, ff, d, 0.5), normal_matrix<T>(rng, d, ff, 0.5));
  }
  return experts;
}

moe::RouteContext context_for(const std::vector<index_t>& bounds) { return moe::RouteContext::with_groups(bounds); }

}  // namespace

TEMPLATE_TEST_CASE("ExpertChoiceRouter selects the top c tokens per expert and group", "[routing][expert_choice]", float, double) {
  using T = TestType;
  std::mt19937 rng(20220201);
  const index_t expert_counts[] = {1, 2, 3, 8, 13};
  const index_t widths[] = {1, 7, 8, 9, 37};
  const double factors[] = {0.25, 0.5, 1.0, 2.0, 3.7, 1e6};
  std::uniform_int_distribution<index_t> group_count(0, 4);
  moe::RouterOutput<T> out;  // reused across shapes, as a workspace is
  for (const index_t E : expert_counts) {
    for (const index_t d : widths) {
      for (const double cf : factors) {
        const index_t groups = group_count(rng);
        std::vector<index_t> bounds = groups == 0 ? std::vector<index_t>{0, 0} : random_bounds(rng, groups, 19);
        if (groups == 0) bounds.back() = std::uniform_int_distribution<index_t>(0, 40)(rng);
        const index_t T_ = bounds.back();
        INFO("E = " << E << ", d = " << d << ", cf = " << cf << ", T = " << T_ << ", groups = " << groups);
        const Mat<T> w = normal_matrix<T>(rng, E, d, 0.7);
        const Mat<T> x = normal_matrix<T>(rng, T_, d);
        const moe::ExpertChoiceRouter<T> router(moe::ConstMatrixMap<T>(w.data(), E, d), {cf});
        if (groups == 0) {
          router.route(x, out);
        } else {
          router.route(x, context_for(bounds), out);
        }
        check_plan(out.plan, T_, E);

        // Logits and scores against double.
        const auto ref = reference_scores(x, w);
        REQUIRE(out.logits().rows() == T_);
        REQUIRE(out.scores().cols() == E);
        for (index_t t = 0; t < T_; ++t) {
          double logit_scale = 0.0;
          for (index_t i = 0; i < d; ++i) logit_scale += std::abs(static_cast<double>(x(t, i))) * 0.7 * 4;
          for (index_t e = 0; e < E; ++e) {
            double exact = 0.0;
            for (index_t i = 0; i < d; ++i) exact += static_cast<double>(x(t, i)) * static_cast<double>(w(e, i));
            REQUIRE(std::abs(static_cast<double>(out.logits()(t, e)) - exact) <= tolerance<T>() * (1.0 + logit_scale));
            REQUIRE(std::abs(static_cast<double>(out.scores()(t, e)) - at(at(ref, t), e)) <= tolerance<T>() * (1.0 + logit_scale));
          }
        }

        // Selection: the reference top-c per group on the router's own scores; weights are scores.
        const auto chosen = reference_selection(out.scores(), bounds, cf);
        for (index_t e = 0; e < E; ++e) {
          const auto& expected = at(chosen, e);
          REQUIRE(out.plan.tokens_of(e) == static_cast<index_t>(expected.size()));
          for (index_t i = 0; i < out.plan.tokens_of(e); ++i) {
            const index_t a = out.plan.expert_begin[e] + i;
            REQUIRE(out.plan.token[a] == at(expected, i));
            REQUIRE(out.plan.weight[a] == out.scores()(at(expected, i), e));
          }
          // Exactly min(c, Tg) tokens of each group.
          for (std::size_t g = 0; g + 1 < bounds.size(); ++g) {
            const index_t size = bounds[g + 1] - bounds[g];
            const auto in_group = std::count_if(expected.begin(), expected.end(),
                                                [&](index_t t) { return t >= bounds[g] && t < bounds[g + 1]; });
            REQUIRE(in_group == std::min(reference_capacity(cf, size, E), size));
            REQUIRE(router.capacity(size) == reference_capacity(cf, size, E));
          }
        }
      }
    }
  }
}

TEST_CASE("ExpertChoiceRouter breaks ties by the lower token index", "[routing][expert_choice]") {
  using T = float;
  SECTION("identical tokens: each expert takes the first c of its group") {
    const index_t E = 3;
    const index_t d = 5;
    std::mt19937 rng(7);
    const Mat<T> w = normal_matrix<T>(rng, E, d);
    const Mat<T> row = normal_matrix<T>(rng, 1, d);
    const std::vector<index_t> bounds{0, 4, 4, 11};
    const Mat<T> x = row.replicate(bounds.back(), 1);
    const double cf = 1.5;
    const moe::ExpertChoiceRouter<T> router(w, {cf});
    moe::RouterOutput<T> out;
    router.route(x, context_for(bounds), out);
    check_plan(out.plan, x.rows(), E);
    for (index_t e = 0; e < E; ++e) {
      std::vector<index_t> expected;
      for (std::size_t g = 0; g + 1 < bounds.size(); ++g) {
        const index_t c = reference_capacity(cf, bounds[g + 1] - bounds[g], E);
        for (index_t t = bounds[g]; t < bounds[g] + c; ++t) expected.push_back(t);
      }
      const std::vector<index_t> got(out.plan.token.begin() + out.plan.expert_begin[e],
                                     out.plan.token.begin() + out.plan.expert_begin[e + 1]);
      REQUIRE(got == expected);
    }
  }

  SECTION("duplicated rows among others, exact logits") {
    std::mt19937 rng(11);
    index_t straddling_ties = 0;  // ties that decide which token an expert takes
    for (int trial = 0; trial < 60; ++trial) {
      const index_t E = std::uniform_int_distribution<index_t>(2, 6)(rng);
      const index_t d = std::uniform_int_distribution<index_t>(1, 12)(rng);
      const index_t distinct = std::uniform_int_distribution<index_t>(1, 4)(rng);
      const std::vector<index_t> bounds = random_bounds(rng, 3, 12);
      const index_t T_ = bounds.back();
      const Mat<T> w = quarter_matrix<T>(rng, E, d);
      const Mat<T> base = quarter_matrix<T>(rng, distinct, d);
      Mat<T> x(T_, d);
      std::vector<index_t> source(static_cast<std::size_t>(T_));
      for (index_t t = 0; t < T_; ++t) {
        at(source, t) = std::uniform_int_distribution<index_t>(0, distinct - 1)(rng);
        x.row(t) = base.row(at(source, t));
      }
      const double cf = std::uniform_real_distribution<double>(0.3, 2.5)(rng);
      INFO("trial " << trial << ": E = " << E << ", d = " << d << ", T = " << T_ << ", cf = " << cf);
      const moe::ExpertChoiceRouter<T> router(w, {cf});
      moe::RouterOutput<T> out;
      router.route(x, context_for(bounds), out);
      check_plan(out.plan, T_, E);
      // Equal rows give bit-equal scores, so the ties are real.
      for (index_t t = 0; t < T_; ++t) {
        for (index_t u = 0; u < t; ++u) {
          if (at(source, t) == at(source, u)) REQUIRE(std::memcmp(out.scores().data() + t * E, out.scores().data() + u * E, sizeof(T) * static_cast<std::size_t>(E)) == 0);
        }
      }
      const auto chosen = reference_selection(out.scores(), bounds, cf);
      for (index_t e = 0; e < E; ++e) {
        const std::vector<index_t> got(out.plan.token.begin() + out.plan.expert_begin[e],
                                       out.plan.token.begin() + out.plan.expert_begin[e + 1]);
        REQUIRE(got == at(chosen, e));
        // Count the groups where a chosen and an unchosen token have equal scores.
        for (std::size_t g = 0; g + 1 < bounds.size(); ++g) {
          for (index_t t = bounds[g]; t < bounds[g + 1]; ++t) {
            for (index_t u = bounds[g]; u < bounds[g + 1]; ++u) {
              const bool t_in = std::count(got.begin(), got.end(), t) > 0;
              const bool u_in = std::count(got.begin(), got.end(), u) > 0;
              if (t_in && !u_in && out.scores()(t, e) == out.scores()(u, e)) {
                REQUIRE(t < u);
                ++straddling_ties;
              }
            }
          }
        }
      }
    }
    REQUIRE(straddling_ties > 0);
  }
}

TEMPLATE_TEST_CASE("ExpertChoiceRouter edge shapes", "[routing][expert_choice]", float, double) {
  using T = TestType;
  std::mt19937 rng(3);
  moe::RouterOutput<T> out;

  SECTION("T = 0, with and without groups") {
    const Mat<T> w = normal_matrix<T>(rng, 4, 6);
    const moe::ExpertChoiceRouter<T> router(w, {2.0});
    const Mat<T> x(0, 6);
    router.route(x, out);
    check_plan(out.plan, 0, 4);
    REQUIRE(out.plan.num_assignments() == 0);
    const std::vector<index_t> bounds{0, 0, 0};
    router.route(x, context_for(bounds), out);
    check_plan(out.plan, 0, 4);
    REQUIRE(out.logits().rows() == 0);
  }

  SECTION("E = 1: the one expert takes the first c tokens of each group with weight 1") {
    const index_t d = 9;
    const Mat<T> w = normal_matrix<T>(rng, 1, d);
    const std::vector<index_t> bounds{0, 5, 6, 6, 13};
    const Mat<T> x = normal_matrix<T>(rng, bounds.back(), d);
    for (const double cf : {0.5, 1.0, 4.0}) {
      const moe::ExpertChoiceRouter<T> router(w, {cf});
      router.route(x, context_for(bounds), out);
      check_plan(out.plan, x.rows(), 1);
      std::vector<index_t> expected;
      for (std::size_t g = 0; g + 1 < bounds.size(); ++g) {
        const index_t size = bounds[g + 1] - bounds[g];
        const index_t c = std::min(static_cast<index_t>(std::ceil(cf * static_cast<double>(size))), size);
        for (index_t t = bounds[g]; t < bounds[g] + c; ++t) expected.push_back(t);
      }
      const std::vector<index_t> got(out.plan.token.begin(), out.plan.token.end());
      REQUIRE(got == expected);
      for (const T weight : out.plan.weight) REQUIRE(weight == T(1));
    }
  }

  SECTION("a large capacity factor caps c at the group size: every token gets every expert") {
    const index_t E = 5;
    const index_t d = 8;
    const Mat<T> w = normal_matrix<T>(rng, E, d);
    const Mat<T> x = normal_matrix<T>(rng, 7, d);
    const moe::ExpertChoiceRouter<T> router(w, {1e300});
    router.route(x, out);
    check_plan(out.plan, 7, E);
    REQUIRE(router.capacity(7) == 7);
    REQUIRE(out.plan.num_assignments() == 7 * E);
    for (index_t t = 0; t < 7; ++t) REQUIRE(out.plan.experts_of(t) == E);
    REQUIRE(out.plan.dropped.empty());
  }

  SECTION("capacity rounds up, and exact quotients are not rounded up") {
    const Mat<T> w = normal_matrix<T>(rng, 4, 3);
    const moe::ExpertChoiceRouter<T> one(w, {1.0});
    REQUIRE(one.capacity(8) == 2);
    REQUIRE(one.capacity(9) == 3);
    REQUIRE(one.capacity(1) == 1);
    REQUIRE(one.capacity(0) == 0);
    const moe::ExpertChoiceRouter<T> small(w, {0.01});
    REQUIRE(small.capacity(3) == 1);
  }

  SECTION("a view and an owning router route alike; x may be a row block of a wider matrix") {
    const index_t E = 3;
    const index_t d = 10;
    const Mat<T> w = normal_matrix<T>(rng, E, d);
    const Mat<T> wide = normal_matrix<T>(rng, 9, d + 3);
    const Mat<T> x = wide.leftCols(d);
    const moe::ExpertChoiceRouter<T> view(moe::ConstMatrixMap<T>(w.data(), E, d), {1.0});
    const moe::ExpertChoiceRouter<T> owner(Mat<T>(w), {1.0});
    moe::RouterOutput<T> a;
    view.route(wide.leftCols(d), a);
    owner.route(x, out);
    REQUIRE(a.plan.token == out.plan.token);
    REQUIRE(a.plan.weight == out.plan.weight);
    REQUIRE(a.plan.assignment == out.plan.assignment);
  }
}

TEST_CASE("ExpertChoiceRouter errors name the parameter and the values", "[routing][expert_choice]") {
  using T = float;
  std::mt19937 rng(5);
  const Mat<T> w = normal_matrix<T>(rng, 4, 6);
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  REQUIRE_THROWS_AS(moe::ExpertChoiceRouter<T>(w, {0.0}), moe::invalid_argument);
  REQUIRE_THROWS_WITH(moe::ExpertChoiceRouter<T>(w, {0.0}), Catch::Contains("capacity_factor = 0"));
  REQUIRE_THROWS_WITH(moe::ExpertChoiceRouter<T>(w, moe::ExpertChoiceOptions{}), Catch::Contains("capacity_factor = 0"));
  REQUIRE_THROWS_WITH(moe::ExpertChoiceRouter<T>(w, {-1.5}), Catch::Contains("capacity_factor = -1.5"));
  REQUIRE_THROWS_WITH(moe::ExpertChoiceRouter<T>(w, {nan}), Catch::Contains("capacity_factor = nan"));
  REQUIRE_THROWS_WITH(moe::ExpertChoiceRouter<T>(w, {inf}), Catch::Contains("capacity_factor = inf"));
  REQUIRE_THROWS_AS(moe::ExpertChoiceRouter<T>(Mat<T>(0, 6), {1.0}), moe::invalid_argument);
  REQUIRE_THROWS_WITH(moe::ExpertChoiceRouter<T>(Mat<T>(0, 6), {1.0}), Catch::Contains("num_experts = 0"));

  const moe::ExpertChoiceRouter<T> router(w, {1.0});
  moe::RouterOutput<T> out;
  const Mat<T> narrow = normal_matrix<T>(rng, 3, 5);
  REQUIRE_THROWS_AS(router.route(narrow, out), moe::invalid_argument);
  REQUIRE_THROWS_WITH(router.route(narrow, out), Catch::Contains("x.cols() = 5") && Catch::Contains("d_model = 6"));

  Mat<T> x = normal_matrix<T>(rng, 4, 6);
  x(2, 3) = std::numeric_limits<T>::infinity();
  REQUIRE_THROWS_AS(router.route(x, out), moe::numeric_error);
  REQUIRE_THROWS_WITH(router.route(x, out), Catch::Contains("token = 2") && Catch::Contains("not finite"));

  const Mat<T> ok = normal_matrix<T>(rng, 4, 6);
  const std::vector<index_t> short_bounds{0, 3};
  REQUIRE_THROWS_AS(router.route(ok, context_for(short_bounds), out), moe::invalid_argument);
  REQUIRE_THROWS_WITH(router.route(ok, context_for(short_bounds), out),
                      Catch::Contains("ExpertChoiceRouter::route") && Catch::Contains("group_begin[num_groups] = 3") &&
                          Catch::Contains("tokens = 4"));
  const std::vector<index_t> decreasing{0, 3, 2, 4};
  REQUIRE_THROWS_WITH(router.route(ok, context_for(decreasing), out), Catch::Contains("group_begin[2] = 2"));
}

TEST_CASE("ExpertChoiceRouter isolates routing groups bit for bit", "[routing][expert_choice][layer]") {
  using T = float;
  std::mt19937 rng(2024);
  const index_t E = 4;
  const index_t d = 13;
  const index_t ff = 6;
  // cf = 1.5: selection decides; cf = 4 = E: every token takes every expert, so every score
  // of the target is a combine weight.
  const double cf = GENERATE(1.5, 4.0);
  const Mat<T> w = normal_matrix<T>(rng, E, d);
  const moe::ExpertChoiceRouter<T> router(w, {cf});
  const moe::MoELayer<moe::ExpertChoiceRouter<T>, moe::SwiGLU<T>> layer(router, random_experts<T>(rng, E, d, ff));

  // The target group has duplicated rows (ties inside it) and is 7 tokens long.
  Mat<T> target = normal_matrix<T>(rng, 7, d);
  target.row(4) = target.row(1);
  target.row(6) = target.row(1);

  struct Routed {
    std::vector<std::vector<std::pair<index_t, T>>> plan_rows;  // per target token: (expert, weight)
    Mat<T> logits;                                              // [7, E]
    Mat<T> scores;                                              // [7, E]
    Mat<T> y;                                                   // [7, d]
  };
  const auto same_bits = [](const Mat<T>& a, const Mat<T>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), sizeof(T) * static_cast<std::size_t>(a.size())) == 0;
  };
  const auto run = [&](const Mat<T>& x, const std::vector<index_t>& bounds, index_t first) {
    moe::Workspace<T> ws;
    Mat<T> y(x.rows(), d);
    layer.forward(x, context_for(bounds), y, ws);
    const auto& plan = ws.routing.plan;
    check_plan(plan, x.rows(), E);
    Routed r;
    for (index_t t = first; t < first + 7; ++t) {
      std::vector<std::pair<index_t, T>> row;
      for (index_t i = plan.token_begin[t]; i < plan.token_begin[t + 1]; ++i) {
        const index_t a = plan.assignment[i];
        row.emplace_back(plan.expert_of_assignment(a), plan.weight[a]);
      }
      r.plan_rows.push_back(row);
    }
    r.logits = ws.routing.logits().middleRows(first, 7);
    r.scores = ws.routing.scores().middleRows(first, 7);
    r.y = y.middleRows(first, 7);
    return r;
  };

  const Routed alone = run(target, {0, 7}, 0);
  std::uniform_int_distribution<index_t> group_size(0, 30);  // experts get 3 to about 50 tokens
  std::uniform_int_distribution<int> group_count(0, 2);
  for (int trial = 0; trial < 40; ++trial) {
    // Other groups before and after the target, random sizes; some rows copy the target's rows
    // (the tie-based prompt-stealing setup).
    std::vector<index_t> sizes_before(static_cast<std::size_t>(group_count(rng)));
    std::vector<index_t> sizes_after(static_cast<std::size_t>(group_count(rng)));
    for (auto& s : sizes_before) s = group_size(rng);
    for (auto& s : sizes_after) s = group_size(rng);
    std::vector<index_t> bounds{0};
    for (const index_t s : sizes_before) bounds.push_back(bounds.back() + s);
    const index_t first = bounds.back();
    bounds.push_back(first + 7);
    for (const index_t s : sizes_after) bounds.push_back(bounds.back() + s);
    const index_t T_ = bounds.back();
    Mat<T> x = normal_matrix<T>(rng, T_, d, 2.0);
    for (index_t t = 0; t < T_; ++t) {
      if (std::uniform_int_distribution<int>(0, 2)(rng) == 0) x.row(t) = target.row(t % 7);
    }
    x.middleRows(first, 7) = target;
    INFO("trial " << trial << ": T = " << T_ << ", target at " << first);
    const Routed r = run(x, bounds, first);
    REQUIRE(same_bits(r.logits, alone.logits));
    REQUIRE(same_bits(r.scores, alone.scores));
    REQUIRE(r.plan_rows == alone.plan_rows);
    REQUIRE(same_bits(r.y, alone.y));
  }
}

TEMPLATE_TEST_CASE("MoELayer with ExpertChoiceRouter matches a per-token double reference", "[routing][expert_choice][layer]",
                   float, double) {
  using T = TestType;
  std::mt19937 rng(99);
  struct Shape {
    index_t E, d, ff;
    std::vector<index_t> bounds;
    double cf;
  };
  const Shape shapes[] = {
      {1, 5, 3, {0, 4}, 1.0},
      {2, 9, 7, {0, 40}, 1.0},  // 20 tokens per expert
      {3, 8, 4, {0, 5, 5, 12}, 2.0},
      {4, 17, 6, {0, 1, 9, 16}, 0.75},
      {6, 4, 5, {0, 0}, 2.0},
  };
  for (const Shape& s : shapes) {
    const index_t T_ = s.bounds.back();
    INFO("E = " << s.E << ", d = " << s.d << ", T = " << T_ << ", cf = " << s.cf);
    const Mat<T> w = normal_matrix<T>(rng, s.E, s.d, 0.5);
    const Mat<T> x = normal_matrix<T>(rng, T_, s.d);
    const moe::ExpertChoiceRouter<T> router(w, {s.cf});
    const moe::MoELayer<moe::ExpertChoiceRouter<T>, moe::SwiGLU<T>> layer(router, random_experts<T>(rng, s.E, s.d, s.ff));
    moe::Workspace<T> ws;
    Mat<T> y(T_, s.d);
    layer.forward(x, context_for(s.bounds), y, ws);

    const auto chosen = reference_selection(ws.routing.scores(), s.bounds, s.cf);
    const auto probs = reference_scores(x, w);
    for (index_t t = 0; t < T_; ++t) {
      std::vector<double> expected(static_cast<std::size_t>(s.d), 0.0);
      for (index_t e = 0; e < s.E; ++e) {
        if (std::count(at(chosen, e).begin(), at(chosen, e).end(), t) == 0) continue;
        const auto out_e = moe_test::swiglu_row(at(layer.experts(), e), &x(t, 0));
        for (index_t i = 0; i < s.d; ++i) at(expected, i) += at(at(probs, t), e) * at(out_e, i);
      }
      for (index_t i = 0; i < s.d; ++i) {
        REQUIRE(std::abs(static_cast<double>(y(t, i)) - at(expected, i)) <= 50 * tolerance<T>() * (1.0 + std::abs(at(expected, i))));
      }
    }
  }
}

TEST_CASE("MoELayer backward through ExpertChoiceRouter matches central differences", "[routing][expert_choice][gradient]") {
  using T = double;
  std::mt19937 rng(404);
  const index_t E = 3;
  const index_t d = 6;
  const index_t ff = 5;
  const std::vector<index_t> bounds{0, 5, 5, 9};
  const index_t T_ = bounds.back();
  Mat<T> w = normal_matrix<T>(rng, E, d, 0.5);  // the router views it, so perturbing w perturbs the layer
  const Mat<T> x = normal_matrix<T>(rng, T_, d);
  const moe::ExpertChoiceRouter<T> router(moe::ConstMatrixMap<T>(w.data(), E, d), {1.0});
  const moe::MoELayer<moe::ExpertChoiceRouter<T>, moe::SwiGLU<T>> layer(router, random_experts<T>(rng, E, d, ff));
  const Mat<T> r = normal_matrix<T>(rng, T_, d);  // L = Σ r ⊙ y, so dy = r

  moe::TrainingWorkspace<T> tws;
  Mat<T> y(T_, d);
  layer.forward_train(x, context_for(bounds), y, tws);
  const std::vector<index_t> selection = tws.routing.plan.token;
  Mat<T> dx(T_, d);
  auto grads = layer.make_gradients();
  layer.backward(x, r, dx, grads, tws);

  // The loss at a perturbed input; `same` is false when the perturbation changed the selection.
  const auto loss = [&](const Mat<T>& xx, bool& same) {
    moe::Workspace<T> ws;
    Mat<T> yy(T_, d);
    layer.forward(xx, context_for(bounds), yy, ws);
    same = same && ws.routing.plan.token == selection;
    return yy.cwiseProduct(r).sum();
  };
  const double h = 1e-5;
  index_t checked = 0;
  for (index_t t = 0; t < T_; ++t) {
    for (index_t i = 0; i < d; ++i) {
      Mat<T> xp = x;
      Mat<T> xm = x;
      xp(t, i) += h;
      xm(t, i) -= h;
      bool same = true;
      const double fd = (loss(xp, same) - loss(xm, same)) / (2 * h);
      if (!same) continue;  // a selection boundary: no derivative there
      ++checked;
      REQUIRE(std::abs(fd - dx(t, i)) <= 1e-6 * (1.0 + std::abs(fd)));
    }
  }
  for (index_t e = 0; e < E; ++e) {
    for (index_t i = 0; i < d; ++i) {
      const T saved = w(e, i);
      bool same = true;
      w(e, i) = saved + h;
      const double lp = loss(x, same);
      w(e, i) = saved - h;
      const double lm = loss(x, same);
      w(e, i) = saved;
      if (!same) continue;
      ++checked;
      const double fd = (lp - lm) / (2 * h);
      REQUIRE(std::abs(fd - grads.router(e, i)) <= 1e-6 * (1.0 + std::abs(fd)));
    }
  }
  REQUIRE(checked >= (T_ + E) * d * 3 / 4);

  SECTION("extra logit gradients join as dW += Gᵀ x, dx += G W") {
    const Mat<T> g = normal_matrix<T>(rng, T_, E);
    const std::vector<T> zero(tws.routing.plan.weight.size(), T(0));
    Mat<T> dx2 = Mat<T>::Zero(T_, d);
    Mat<T> dw2 = Mat<T>::Zero(E, d);
    router.backward(x, tws.routing, zero.data(), nullptr, g.data(), dx2, dw2);
    for (index_t e = 0; e < E; ++e) {
      for (index_t i = 0; i < d; ++i) {
        double expected = 0.0;
        for (index_t t = 0; t < T_; ++t) expected += g(t, e) * x(t, i);
        REQUIRE(std::abs(dw2(e, i) - expected) <= 1e-12 * (1.0 + std::abs(expected)));
      }
    }
    for (index_t t = 0; t < T_; ++t) {
      for (index_t i = 0; i < d; ++i) {
        double expected = 0.0;
        for (index_t e = 0; e < E; ++e) expected += g(t, e) * w(e, i);
        REQUIRE(std::abs(dx2(t, i) - expected) <= 1e-12 * (1.0 + std::abs(expected)));
      }
    }
    Mat<T> wrong(E + 1, d);
    REQUIRE_THROWS_WITH(router.backward(x, tws.routing, zero.data(), nullptr, nullptr, dx2, wrong),
                        Catch::Contains("dweight.rows() = 4") && Catch::Contains("num_experts = 3"));
  }
}

TEST_CASE("ExpertChoiceRouter backward matches central differences", "[routing][expert_choice][gradient]") {
  const index_t E = 4;
  moe_test::RouterGradientCheck check(E);
  for (const double capacity_factor : {0.5, 1.0, 3.0}) {  // experts of 2, 3 and 7 of the 9 tokens
    for (const auto loss : {moe_test::RouterLoss::with_lost_weight, moe_test::RouterLoss::with_logits}) {
      CAPTURE(capacity_factor, int(loss));
      Mat<double> w = check.W0;
      const moe::ExpertChoiceRouter<double> router(moe::ConstMatrixMap<double>(w.data(), w.rows(), w.cols()), {capacity_factor});
      CHECK(check.run(router, w, loss).plan.num_assignments() == E * index_t(std::ceil(capacity_factor * 9 / E)));
    }
  }
}

TEST_CASE("ExpertChoiceRouter::max_assignments bounds every split into routing groups", "[routing][expert_choice]") {
  // The most assignments T tokens in at most G groups can get, E · max Σ_g capacity(T_g) over all
  // splits (empty groups allowed), by dynamic programming over the reference capacity; the bound
  // must hold it, and a route of an even split must stay within it.
  using T = float;
  std::mt19937 rng(7);
  for (const index_t E : {3, 8}) {
    for (const double cf : {0.5, 1.1, 2.0, 3.7, 10.0}) {
      moe::ExpertChoiceOptions o;
      o.capacity_factor = cf;
      const moe::ExpertChoiceRouter<T> router(normal_matrix<T>(rng, E, 4), o);
      for (index_t tokens = 0; tokens <= 24; ++tokens) {
        // most[g][t]: the largest Σ capacity of t tokens in g groups.
        std::vector<std::vector<index_t>> most(6, std::vector<index_t>(std::size_t(tokens) + 1, -1));
        most[0][0] = 0;
        for (std::size_t g = 1; g < most.size(); ++g) {
          for (index_t t = 0; t <= tokens; ++t) {
            for (index_t last = 0; last <= t; ++last) {
              const index_t before = most[g - 1][std::size_t(t - last)];
              if (before >= 0) most[g][std::size_t(t)] = std::max(most[g][std::size_t(t)], before + reference_capacity(cf, last, E));
            }
          }
          const auto groups = static_cast<index_t>(g);
          INFO("E = " << E << ", capacity_factor = " << cf << ", tokens = " << tokens << ", groups = " << groups);
          REQUIRE(E * most[g][std::size_t(tokens)] <= router.max_assignments(tokens, groups));
          std::vector<index_t> bounds;
          for (index_t b = 0; b <= groups; ++b) bounds.push_back(tokens * b / groups);
          moe::RouterOutput<T> out;
          router.route(normal_matrix<T>(rng, tokens, 4), moe::RouteContext::with_groups(bounds), out);
          REQUIRE(out.plan.num_assignments() <= router.max_assignments(tokens, groups));
        }
      }
    }
  }
}

}  // namespace expert_choice_test
