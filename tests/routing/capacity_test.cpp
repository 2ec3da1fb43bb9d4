// Token-choice options beyond plain top-k: capacity with each priority and overflow policy,
// group-limited selection, dynamic top-p and training jitter; against plain references.
#include <catch2/catch.hpp>

#include <limits>
#include <type_traits>
#include <map>
#include <set>

#include "../support/reference.hpp"

// (A namespace of its own: this file may share a translation unit with other test files.)
namespace capacity_test {

using namespace moe_test;

namespace {

struct Assigned {
  index_t expert;
  double weight;
};

// The plan as token -> list of (expert, weight) in the token's order.
template <class T>
std::vector<std::vector<Assigned>> by_token(const moe::Routing<T>& plan) {
  std::vector<std::vector<Assigned>> out(std::size_t(plan.num_tokens));
  for (index_t t = 0; t < plan.num_tokens; ++t)
    for (index_t j = plan.token_begin[std::size_t(t)]; j < plan.token_begin[std::size_t(t + 1)]; ++j) {
      const index_t a = plan.assignment[std::size_t(j)];
      out[std::size_t(t)].push_back({plan.expert_of_assignment(a), double(plan.weight[std::size_t(a)])});
    }
  return out;
}

// Unlimited top-k routing of the same batch: what each token chose before capacity.
std::vector<std::vector<Assigned>> dropless(const moe::Matrix<double>& W, const moe::Matrix<double>& x, moe::TopKOptions o) {
  o.capacity_factor = 0;
  moe::RouterOutput<double> out;
  moe::TopKRouter<double>(W, o).route(x, out);
  return by_token(out.plan);
}

// Megatron-Core's get_capacity(num_tokens = tokens · k, E, cf): ceil((num_tokens / E) · cf) in double.
index_t capacity_of(double cf, index_t tokens, index_t k, index_t E) {
  return index_t(std::ceil(double(tokens * k) / double(E) * cf));
}

}  // namespace

TEST_CASE("expert_capacity rounds as Megatron-Core's get_capacity", "[routing][capacity]") {
  // Megatron-Core: math.ceil((num_tokens / num_experts) * capacity_factor), num_tokens = T · k.
  // 45 · 4 / 6 = 30 exactly, and 30 · 1.1 rounds to 33.0 in double; cf · T · k / E in that order
  // rounds 1.1 · 45 up to 49.50000000000001 and ends above 33 (ceil 34).
  REQUIRE(30.0 * 1.1 == 33.0);
  REQUIRE(1.1 * 45.0 * 4.0 / 6.0 > 33.0);
  CHECK(moe::expert_capacity(1.1, 45, 4, 6) == 33);
  CHECK(moe::expert_capacity(1.25, 10, 2, 4) == 7);  // 5 · 1.25 = 6.25
  CHECK(moe::expert_capacity(1.0, 0, 2, 4) == 0);
  // The smallest positive factor still leaves room for one; a factor past index_t saturates.
  CHECK(moe::expert_capacity(std::numeric_limits<double>::denorm_min(), 10, 2, 4) == 1);
  CHECK(moe::expert_capacity(1e300, 10, 2, 4) == std::numeric_limits<index_t>::max());
}

TEST_CASE("expert_capacity refuses a factor that is not finite and > 0, and counts out of range", "[routing][capacity]") {
  using Catch::Contains;
  const double nan = std::numeric_limits<double>::quiet_NaN(), inf = std::numeric_limits<double>::infinity();
  for (const double cf : {0.0, -1.0, -1e300, nan, inf}) {
    CAPTURE(cf);
    CHECK_THROWS_AS(moe::expert_capacity(cf, 10, 2, 4), moe::invalid_argument);
  }
  CHECK_THROWS_WITH(moe::expert_capacity(-1.5, 10, 2, 4), Contains("capacity_factor = -1.5"));
  CHECK_THROWS_WITH(moe::expert_capacity(1.0, -3, 2, 4), Contains("tokens = -3"));
  CHECK_THROWS_WITH(moe::expert_capacity(1.0, 10, 0, 4), Contains("k = 0"));
  CHECK_THROWS_WITH(moe::expert_capacity(1.0, 10, 2, 0), Contains("num_experts = 0"));
}

TEST_CASE("Capacity drops by position: per expert the earliest tokens win", "[routing][capacity]") {
  const index_t E = GENERATE(2, 4, 7), d = 9, Tn = GENERATE(1, 10, 37);
  const index_t k = GENERATE_COPY(filter([E](index_t v) { return v <= E; }, values<index_t>({1, 2, 3})));
  const double cf = GENERATE(0.5, 1.0, 1.25);
  const bool renormalize = GENERATE(false, true);
  CAPTURE(E, Tn, k, cf, renormalize);
  const moe::Matrix<double> W = random_matrix<double>(E, d, 11, 1.0), x = random_matrix<double>(Tn, d, 12);
  moe::TopKOptions o;
  o.k = k;
  o.normalize = true;
  o.capacity_factor = cf;
  o.renormalize_after_drop = renormalize;
  moe::RouterOutput<double> out;
  moe::TopKRouter<double>(W, o).route(x, out);
  const auto got = by_token(out.plan);
  const auto wanted = dropless(W, x, o);
  const index_t C = capacity_of(cf, Tn, k, E);

  // Reference, per expert column: the first C tokens (by index) that chose it keep it.
  std::map<std::pair<index_t, index_t>, bool> keeps;  // (token, expert) -> kept
  for (index_t e = 0; e < E; ++e) {
    index_t taken = 0;
    for (index_t t = 0; t < Tn; ++t)
      for (const Assigned& a : wanted[std::size_t(t)])
        if (a.expert == e) keeps[{t, e}] = taken++ < C;
  }
  std::vector<index_t> ref_dropped;
  for (index_t t = 0; t < Tn; ++t) {
    std::vector<Assigned> ref;
    double kept_sum = 0;
    for (const Assigned& a : wanted[std::size_t(t)])
      if (keeps[{t, a.expert}]) ref.push_back(a), kept_sum += a.weight;
    if (ref.size() < wanted[std::size_t(t)].size()) ref_dropped.push_back(t);
    REQUIRE(got[std::size_t(t)].size() == ref.size());
    for (std::size_t j = 0; j < ref.size(); ++j) {
      CHECK(got[std::size_t(t)][j].expert == ref[j].expert);
      // Dropless weights are normalized over the k choices; renormalize_after_drop rescales the
      // survivors to sum to 1.
      const double w = renormalize ? ref[j].weight / kept_sum : ref[j].weight;
      CHECK(got[std::size_t(t)][j].weight == Approx(w).epsilon(1e-12));
    }
  }
  REQUIRE(out.plan.dropped == ref_dropped);
  for (index_t e = 0; e < E; ++e) REQUIRE(out.plan.tokens_of(e) <= C);
  REQUIRE(out.plan.rerouted.empty());
}

TEST_CASE("Capacity drops by score: per expert the highest weights win", "[routing][capacity]") {
  const index_t E = 4, d = 6, Tn = 23, k = 2;
  const moe::Matrix<double> W = random_matrix<double>(E, d, 21, 1.5), x = random_matrix<double>(Tn, d, 22);
  moe::TopKOptions o;
  o.k = k;
  o.capacity_factor = 0.75;
  o.capacity_priority = moe::CapacityPriority::score;
  moe::RouterOutput<double> out;
  moe::TopKRouter<double>(W, o).route(x, out);
  const auto got = by_token(out.plan);
  const auto wanted = dropless(W, x, o);
  const index_t C = capacity_of(0.75, Tn, k, E);
  for (index_t e = 0; e < E; ++e) {
    // Reference: sort the tokens that chose e by weight (descending, earlier token on ties).
    std::vector<std::pair<double, index_t>> column;
    for (index_t t = 0; t < Tn; ++t)
      for (const Assigned& a : wanted[std::size_t(t)])
        if (a.expert == e) column.push_back({-a.weight, t});
    std::sort(column.begin(), column.end());
    std::set<index_t> ref;
    for (std::size_t i = 0; i < column.size() && index_t(i) < C; ++i) ref.insert(column[i].second);
    std::set<index_t> kept;
    for (index_t a = out.plan.expert_begin[std::size_t(e)]; a < out.plan.expert_begin[std::size_t(e + 1)]; ++a)
      kept.insert(out.plan.token[std::size_t(a)]);
    CAPTURE(e);
    REQUIRE(kept == ref);
  }
  (void)got;
}

TEST_CASE("Reroute moves lost choices to the next-best expert with room", "[routing][capacity]") {
  const index_t E = 6, d = 7, Tn = GENERATE(5, 40), k = 2;
  const auto priority = GENERATE(moe::CapacityPriority::position, moe::CapacityPriority::score);
  CAPTURE(Tn, int(priority));
  // A skewed router: experts 0 and 1 are popular, so they overflow.
  moe::Matrix<double> W = random_matrix<double>(E, d, 31, 0.5);
  const moe::Matrix<double> x = random_matrix<double>(Tn, d, 32).cwiseAbs();
  W.row(0).setConstant(0.6);
  W.row(1).setConstant(0.5);
  moe::TopKOptions o;
  o.k = k;
  o.capacity_factor = 1.0;
  o.capacity_priority = priority;
  o.overflow = moe::OverflowPolicy::reroute;
  moe::RouterOutput<double> out;
  moe::TopKRouter<double>(W, o).route(x, out);
  const auto& plan = out.plan;
  const index_t C = capacity_of(1.0, Tn, k, E);
  for (index_t e = 0; e < E; ++e) REQUIRE(plan.tokens_of(e) <= C);
  REQUIRE_FALSE(plan.rerouted.empty());

  // Reference: choose the kept primaries as the drop policy would, then walk the token's full
  // ranking (descending probability) for each lost choice, in token order.
  moe::TopKOptions drop = o;
  drop.overflow = moe::OverflowPolicy::drop;
  moe::RouterOutput<double> dropped_out;
  moe::TopKRouter<double>(W, drop).route(x, dropped_out);
  const auto primaries = by_token(dropped_out.plan);
  std::vector<index_t> load(std::size_t(E), 0);
  for (index_t e = 0; e < E; ++e) load[std::size_t(e)] = dropped_out.plan.tokens_of(e);
  const auto got = by_token(plan);
  std::size_t next_dropped = 0;
  for (index_t t = 0; t < Tn; ++t) {
    std::vector<double> p(static_cast<std::size_t>(E));
    for (index_t e = 0; e < E; ++e) p[std::size_t(e)] = out.scores()(t, e);
    const std::vector<index_t> ranking = top_k(p, E);
    std::vector<index_t> ref;
    for (const Assigned& a : primaries[std::size_t(t)]) ref.push_back(a.expert);
    // The token's lost choices in rank order; the first ones move to other experts, and only
    // those that found no room are lost (dropped, with their weight).
    std::vector<index_t> lost_choices;
    for (std::size_t j = 0; j < std::size_t(k); ++j)
      if (std::find(ref.begin(), ref.end(), ranking[j]) == ref.end()) lost_choices.push_back(ranking[j]);
    std::size_t next = std::size_t(k), moved = 0;
    for (; moved < lost_choices.size(); ++moved) {
      while (next < ranking.size() && load[std::size_t(ranking[next])] >= C) ++next;
      if (next == ranking.size()) break;
      ref.push_back(ranking[next]);
      ++load[std::size_t(ranking[next++])];
    }
    double lost_weight = 0;
    for (std::size_t j = moved; j < lost_choices.size(); ++j) lost_weight += p[std::size_t(lost_choices[j])];
    if (moved < lost_choices.size()) {
      REQUIRE(next_dropped < plan.dropped.size());
      CHECK(plan.dropped[next_dropped] == t);
      CHECK(plan.dropped_weight[next_dropped++] == Approx(lost_weight).epsilon(1e-12));
    }
    // The plan lists a token's experts in rank order, so its weights never increase.
    std::vector<index_t> ref_in_rank_order;
    for (index_t e : ranking)
      if (std::find(ref.begin(), ref.end(), e) != ref.end()) ref_in_rank_order.push_back(e);
    REQUIRE(got[std::size_t(t)].size() == ref_in_rank_order.size());
    for (std::size_t j = 0; j < ref_in_rank_order.size(); ++j) {
      CHECK(got[std::size_t(t)][j].expert == ref_in_rank_order[j]);
      CHECK(got[std::size_t(t)][j].weight == Approx(p[std::size_t(ref_in_rank_order[j])]).epsilon(1e-12));
      if (j > 0) CHECK(got[std::size_t(t)][j].weight <= got[std::size_t(t)][j - 1].weight);
    }
  }
  CHECK(next_dropped == plan.dropped.size());
}

TEST_CASE("A rerouted choice keeps the chosen experts' denominator, even above scale", "[routing][capacity]") {
  // Three tokens with logits (-10, -5, -1); capacity 1 per expert, so tokens 1 and 2 are rerouted
  // down their ranking. When the selection ranks an expert first whose raw weight is the smallest,
  // a rerouted weight is raw(target) / raw(chosen) × scale, far above scale (routing/top_k.hpp).
  const index_t E = 3, Tn = 3;
  moe::Matrix<double> W(E, 1);
  W << -10, -5, -1;
  const moe::Matrix<double> x = moe::Matrix<double>::Ones(Tn, 1);
  moe::TopKOptions o;
  o.k = 1;
  o.scale = 2.5;
  o.capacity_factor = 0.5;  // ceil(0.5 · 3 · 1 / 3) = 1 slot per expert
  o.overflow = moe::OverflowPolicy::reroute;
  double chosen_raw = 0, target_raw[2] = {0, 0};
  index_t target[2] = {0, 0};
  moe::Vector<double> bias;  // empty: none

  SECTION("a zero group mask lets a masked expert win at 0 over negative logits") {
    // Groups of one expert, the best two kept by logit (experts 2 and 1); expert 0 is masked to
    // 0, which beats -1 and -5. Softmax after top-k over the one chosen logit: raw = e^(l - l0).
    o.softmax_placement = moe::SoftmaxPlacement::after_top_k;
    o.expert_groups = 3;
    o.selected_groups = 2;
    o.group_score_top = 1;
    o.group_mask = moe::GroupMask::zero;
    chosen_raw = 1;
    target[0] = 2, target_raw[0] = std::exp(-1.0 + 10.0);
    target[1] = 1, target_raw[1] = std::exp(-5.0 + 10.0);
  }
  SECTION("a selection bias ranks the least likely expert first") {
    o.normalize = true;  // the denominator is the chosen expert's probability p0
    bias = (moe::Vector<double>(E) << 100, 0, 0).finished();
    const double Z = std::exp(-10.0) + std::exp(-5.0) + std::exp(-1.0);
    chosen_raw = std::exp(-10.0) / Z;
    target[0] = 2, target_raw[0] = std::exp(-1.0) / Z;
    target[1] = 1, target_raw[1] = std::exp(-5.0) / Z;
  }
  moe::TopKRouter<double> router(W, o);
  if (bias.size() > 0) router.set_selection_bias(bias);
  moe::RouterOutput<double> out;
  router.route(x, out);
  const auto got = by_token(out.plan);
  REQUIRE(got[0].size() == 1);
  CHECK(got[0][0].expert == 0);
  CHECK(got[0][0].weight == Approx(o.scale).epsilon(1e-12));
  for (index_t t = 1; t < Tn; ++t) {
    REQUIRE(got[std::size_t(t)].size() == 1);
    CHECK(got[std::size_t(t)][0].expert == target[t - 1]);
    CHECK(got[std::size_t(t)][0].weight == Approx(target_raw[t - 1] / chosen_raw * o.scale).epsilon(1e-12));
    CHECK(got[std::size_t(t)][0].weight > o.scale);
  }
  CHECK(out.plan.rerouted == std::vector<index_t>{1, 2});
  CHECK(out.plan.dropped.empty());
}

// Two tokens, E = 4, k = 2, softmax after top-k, one slot per expert (x rows are the logits: W = I).
// A selection bias picks experts 0 and 1 for both; token 1 loses both to token 0 and is rerouted to
// experts 2 and 3, whose logits (gap, gap − 1) sit far above its chosen ones (0, −1): e^gap
// overflows T, so both raw weights of token 1's kept choices are beyond T's range.
template <class T>
struct FarReroute {
  static constexpr index_t E = 4, Tn = 2;
  moe::Matrix<T> W = moe::Matrix<T>::Identity(E, E);
  moe::Matrix<T> x;
  moe::TopKOptions o;
  moe::Vector<T> bias = (moe::Vector<T>(E) << 1000, 1000, 0, 0).finished();
  explicit FarReroute(double gap) : x(Tn, E) {
    x << 0.5, -0.25, 3, 2,  //
        0, -1, T(gap), T(gap - 1);
    o.k = 2;
    o.softmax_placement = moe::SoftmaxPlacement::after_top_k;
    o.fixed_capacity = 1;
    o.overflow = moe::OverflowPolicy::reroute;
    o.scale = 1.5;
  }
  moe::TopKRouter<T> router() const {
    moe::TopKRouter<T> r(W, o);
    r.set_selection_bias(bias);
    return r;
  }
};

// ∂L/∂weight of token t's assignment to expert e in the tests below.
double far_grad(index_t t, index_t e) { return 0.3 + 0.25 * double(e) - 0.7 * double(t); }

// L = Σ over token t's assignments of far_grad(t, e) · weight, for the finite differences.
double far_loss(const moe::TopKRouter<double>& router, const moe::Matrix<double>& x) {
  moe::RouterOutput<double> out;
  router.route(x, out);
  double L = 0;
  const auto got = by_token(out.plan);
  for (index_t t = 0; t < index_t(got.size()); ++t)
    for (const Assigned& a : got[std::size_t(t)]) L += far_grad(t, a.expert) * a.weight;
  return L;
}

TEMPLATE_TEST_CASE("Renormalized over choices rerouted far above the chosen logits: exact weights and gradients", "[routing][capacity][backward]",
                   float, double) {
  using T = TestType;
  const double gap = std::is_same<T, float>::value ? 150.0 : 800.0;  // e^gap overflows T
  REQUIRE(std::isinf(std::exp(T(gap))));
  FarReroute<T> f(gap);
  f.o.renormalize_after_drop = true;
  const moe::TopKRouter<T> router = f.router();
  moe::RouterOutput<T> out;
  router.route(f.x, out);
  const auto got = by_token(out.plan);
  CHECK(out.plan.rerouted == std::vector<index_t>{1});
  CHECK(out.plan.dropped.empty());
  // Kept weights: scale · softmax over the kept logits, w_j = e^(l_j − top) / Σ_kept e^(l_i − top);
  // ∂L/∂l_j = scale · w_j · (g_j − Σ_kept w_i g_i) for kept j.
  const index_t expected[2][2] = {{0, 1}, {2, 3}};
  moe::Matrix<double> dlogits = moe::Matrix<double>::Zero(f.Tn, f.E);
  for (index_t t = 0; t < f.Tn; ++t) {
    REQUIRE(got[std::size_t(t)].size() == 2);
    const double l0 = double(f.x(t, expected[t][0])), l1 = double(f.x(t, expected[t][1]));
    const double top = std::max(l0, l1);
    const double w[2] = {std::exp(l0 - top) / (std::exp(l0 - top) + std::exp(l1 - top)),
                         std::exp(l1 - top) / (std::exp(l0 - top) + std::exp(l1 - top))};
    double mean_g = 0;
    for (int j = 0; j < 2; ++j) {
      const Assigned& a = got[std::size_t(t)][std::size_t(j)];
      CHECK(a.expert == expected[t][j]);
      REQUIRE(std::isfinite(a.weight));
      CHECK(a.weight == Approx(f.o.scale * w[j]).epsilon(1e-5));
      mean_g += w[j] * far_grad(t, expected[t][j]);
    }
    for (int j = 0; j < 2; ++j) dlogits(t, expected[t][j]) = f.o.scale * w[j] * (far_grad(t, expected[t][j]) - mean_g);
  }

  std::vector<T> grad_weight(out.plan.weight.size());
  for (std::size_t a = 0; a < grad_weight.size(); ++a) grad_weight[a] = T(far_grad(out.plan.token[a], out.plan.expert_of_assignment(index_t(a))));
  moe::Matrix<T> dx = moe::Matrix<T>::Zero(f.Tn, f.E), dW = moe::Matrix<T>::Zero(f.E, f.E);
  router.backward(f.x, out, grad_weight.data(), nullptr, nullptr, dx, dW);
  // With W = I: ∂L/∂x = ∂L/∂logits, ∂L/∂W = (∂L/∂logits)ᵀ x.
  const moe::Matrix<double> dW_ref = dlogits.transpose() * f.x.template cast<double>();
  for (index_t t = 0; t < f.Tn; ++t)
    for (index_t e = 0; e < f.E; ++e) {
      CAPTURE(t, e, dx(t, e), dlogits(t, e));
      REQUIRE(std::isfinite(dx(t, e)));
      CHECK(std::abs(double(dx(t, e)) - dlogits(t, e)) <= 1e-5);
    }
  for (index_t r = 0; r < f.E; ++r)
    for (index_t c = 0; c < f.E; ++c) {
      CAPTURE(r, c, dW(r, c), dW_ref(r, c));
      REQUIRE(std::isfinite(dW(r, c)));
      CHECK(std::abs(double(dW(r, c)) - dW_ref(r, c)) <= 1e-5 * (1 + std::abs(dW_ref(r, c))));
    }
  CHECK(std::abs(dlogits(1, 2)) > 0.01);  // token 1's gradient is not small: 1.5 · 0.73 · 0.27 · 0.25

  if (std::is_same<T, double>::value) {  // and central differences of L over x, in double
    FarReroute<double> fd(gap);
    fd.o.renormalize_after_drop = true;
    const moe::TopKRouter<double> r = fd.router();
    const double h = 1e-5;
    for (index_t t = 0; t < f.Tn; ++t)
      for (index_t e = 0; e < f.E; ++e) {
        moe::Matrix<double> xp = fd.x, xm = fd.x;
        xp(t, e) += h, xm(t, e) -= h;
        const double numeric = (far_loss(r, xp) - far_loss(r, xm)) / (2 * h);
        CAPTURE(t, e, numeric, dx(t, e));
        CHECK(std::abs(numeric - double(dx(t, e))) <= 1e-7);
      }
  }
}

TEST_CASE("A rerouted weight beyond the scalar's range throws a named numeric_error, or passes as inf", "[routing][capacity][errors]") {
  // As above, without renormalization: token 1's weights are e^150 / (1 + e^-1) · 1.5 and e^149 / ...,
  // beyond float.
  FarReroute<float> f(150.0);
  moe::RouterOutput<float> out;
  // What the throw leaves behind, after plans that rerouted a choice and that dropped two.
  for (const bool dropping : {false, true}) {
    FarReroute<float> warm(150.0);
    warm.o.renormalize_after_drop = !dropping;
    if (dropping) warm.o.overflow = moe::OverflowPolicy::drop;
    warm.router().route(warm.x, out);
    REQUIRE(out.plan.num_assignments() == (dropping ? 2 : 4));
    REQUIRE(out.plan.rerouted.size() == (dropping ? 0u : 1u));
    REQUIRE(out.plan.dropped.size() == (dropping ? 1u : 0u));
    REQUIRE_THROWS_WITH(f.router().route(f.x, out), Catch::Contains("token = 1") && Catch::Contains("expert = 2") &&
                                                          Catch::Contains("renormalize_after_drop"));
    CHECK(out.plan.num_tokens == 0);  // an empty plan, not a half-built one
    CHECK(out.plan.num_assignments() == 0);
    CHECK(out.plan.dropped.empty());
    CHECK(out.plan.dropped_weight.empty());
    CHECK(out.plan.rerouted.empty());
    // Nor the failed batch's choices for the losses (top_k_ids() held them before the fix).
    CHECK_THROWS_WITH(out.top_k_ids(), Catch::Contains("a route that threw records none"));
  }
  REQUIRE_THROWS_AS(f.router().route(f.x, out), moe::numeric_error);
  // Backward through what the throw left is refused, not read out of bounds.
  moe::Matrix<float> dx = moe::Matrix<float>::Zero(f.Tn, f.E), dW = moe::Matrix<float>::Zero(f.E, f.E);
  const std::vector<float> grad_weight(4, 1.0f);
  REQUIRE_THROWS_WITH(f.router().backward(f.x, out, grad_weight.data(), nullptr, nullptr, dx, dW),
                      Catch::Contains("out.plan.num_tokens = 0"));

  f.o.check_finite = false;  // documented: the infinite weight then passes through
  f.router().route(f.x, out);
  const auto got = by_token(out.plan);
  REQUIRE(got[1].size() == 2);
  CHECK(got[1][0].expert == 2);
  CHECK(std::isinf(got[1][0].weight));
  CHECK(std::isinf(got[1][1].weight));
}

TEMPLATE_TEST_CASE("A rerouted weight whose raw weight overflows but whose scaled value fits is exact", "[routing][capacity]",
                   float, double) {
  // Token 1's weights are e^gap / (1 + e^-1) · scale and e^(gap − 1) / (1 + e^-1) · scale: e^gap is
  // beyond T, the products are not (or are 0 for scale 0). Expected values in the log domain.
  using T = TestType;
  const bool is_float = std::is_same<T, float>::value;
  FarReroute<T> f(is_float ? 150.0 : 800.0);
  const double gap = double(f.x(1, 2));
  f.o.scale = GENERATE(as<double>{}, 1e-30, -1e-30, 1e-300, -1e-300, 0.0, 0.5);
  CAPTURE(f.o.scale);
  if (is_float && std::abs(f.o.scale) == 1e-300) return;  // 0 in float: the scale 0 case
  const double log_value = f.o.scale == 0 ? -std::numeric_limits<double>::infinity()
                                          : gap + std::log(std::abs(f.o.scale)) - std::log1p(std::exp(-1.0));
  moe::RouterOutput<T> out;
  if (log_value > std::log(double(std::numeric_limits<T>::max()))) {  // 0.5 in both, 1e-30 in double
    REQUIRE_THROWS_AS(f.router().route(f.x, out), moe::numeric_error);
    return;
  }
  f.router().route(f.x, out);
  const auto got = by_token(out.plan);
  REQUIRE(got[1].size() == 2);
  CHECK(got[1][0].expert == 2);
  CHECK(got[1][1].expert == 3);
  const double sign = f.o.scale < 0 ? -1.0 : 1.0;
  for (int j = 0; j < 2; ++j) {
    const double expected = sign * std::exp(log_value - double(j));
    CAPTURE(j, expected);
    REQUIRE(std::isfinite(got[1][std::size_t(j)].weight));
    CHECK(got[1][std::size_t(j)].weight == Approx(expected).epsilon(is_float ? 1e-5 : 1e-12));
  }
  // Its gradient (the raw weight's inf times scale gave NaN): with L = Σ weights and logits = x,
  // ∂L/∂l2 = w2 and ∂L/∂l3 = w3 (each weight is e^(l_j − lse(l0, l1)) · scale), and ∂L/∂l_i =
  // −(w2 + w3) · softmax(l0, l1)_i for the two chosen logits, whose softmax the weights divide by.
  const std::vector<T> ones(static_cast<std::size_t>(out.plan.num_assignments()), T(1));
  moe::Matrix<T> dx = moe::Matrix<T>::Zero(FarReroute<T>::Tn, FarReroute<T>::E), dW = moe::Matrix<T>::Zero(4, 4);
  f.router().backward(f.x, out, ones.data(), nullptr, nullptr, dx, dW);
  const double w2 = sign * std::exp(log_value), w3 = sign * std::exp(log_value - 1.0);
  const double p0 = 1 / (1 + std::exp(-1.0)), p1 = 1 - p0;
  const double expected_dx[4] = {-(w2 + w3) * p0, -(w2 + w3) * p1, w2, w3};
  for (index_t i = 0; i < 4; ++i) {
    CAPTURE(i, expected_dx[i]);
    REQUIRE(std::isfinite(dx(1, i)));
    CHECK(double(dx(1, i)) == Approx(expected_dx[i]).epsilon(is_float ? 1e-5 : 1e-12).margin(1e-300));
  }
}

TEST_CASE("A scale beyond the scalar's range is refused, naming it", "[routing][errors]") {
  moe::TopKOptions o;
  o.scale = 1e300;  // finite in double, not in float
  REQUIRE_THROWS_WITH(moe::TopKRouter<float>(moe::Matrix<float>::Identity(4, 4), o), Catch::Contains("scale = 1e+300"));
  CHECK_NOTHROW(moe::TopKRouter<double>(moe::Matrix<double>::Identity(4, 4), o));
}

TEST_CASE("A rerouted weight whose exp overflows but whose value fits the scalar is exact", "[routing][capacity]") {
  // Token 1's chosen logits are (0, 0), so its raw weights are e^l / 2; e^89 overflows float but
  // e^89 / 2 = 2.2e38 fits.
  FarReroute<float> f(150.0);
  f.x.row(1) << 0, 0, 89, -50;
  f.o.scale = 1;
  REQUIRE(std::isinf(std::exp(89.0f)));
  moe::RouterOutput<float> out;
  f.router().route(f.x, out);
  const auto got = by_token(out.plan);
  REQUIRE(got[1].size() == 2);
  CHECK(got[1][0].expert == 2);
  REQUIRE(std::isfinite(got[1][0].weight));
  CHECK(got[1][0].weight == Approx(std::exp(89.0) / 2).epsilon(1e-5));
  CHECK(got[1][1].weight == Approx(std::exp(-50.0) / 2).epsilon(1e-5));
}

TEST_CASE("Renormalized after a drop, survivors of probability 1e-30 get finite, exact gradients", "[routing][capacity][backward]") {
  // Token 0 takes expert 0's only slot; token 1 (logits 40, -30, -31, -50, -50) loses its first
  // choice and keeps experts 1 and 2, of probability e^-70 and e^-71: their kept sum D is ~6e-31,
  // and D · D underflows float. Renormalized over them, the weights are a softmax over the kept
  // logits alone, w_j = e^(l_j) / Σ_kept e^(l_i), so ∂L/∂l_j = w_j · (g_j − Σ_kept w_i g_i) for kept
  // j and 0 elsewhere. The lost weight keeps the plain normalization, v_0 with v the softmax over
  // the 3 chosen logits (not v_0 / D ≈ 1e30), adding g_lost · v_0 · (δ_0j − v_j) for chosen j
  // (pass-through only). Then ∂L/∂W = (∂L/∂l)ᵀ x and ∂L/∂x = (∂L/∂l) W. Token 0 keeps its 3 choices.
  const index_t E = 5, d = 2, Tn = 2;
  moe::Matrix<double> W(E, d), x(Tn, d);
  W << 40, 40, -30, -50, -31, -50, -50, 10, -50, 9;
  x << 0, 1, 1, 0;
  moe::TopKOptions o;
  o.k = 3;
  o.normalize = true;
  o.fixed_capacity = 1;
  o.renormalize_after_drop = true;
  o.softmax_placement = GENERATE(moe::SoftmaxPlacement::before_top_k, moe::SoftmaxPlacement::after_top_k);
  CAPTURE(o.softmax_placement == moe::SoftmaxPlacement::after_top_k);
  const moe::Matrix<float> Wf = W.cast<float>(), xf = x.cast<float>();
  const moe::TopKRouter<float> router(Wf, o);
  moe::RouterOutput<float> out;
  router.route(xf, out);
  const auto got = by_token(out.plan);
  REQUIRE(got[0].size() == 3);
  REQUIRE(got[1].size() == 2);
  REQUIRE(out.plan.dropped == std::vector<index_t>{1});
  const moe::Matrix<double> logits1 = x.row(1) * W.transpose();
  std::vector<double> v(3);  // softmax over token 1's chosen logits (experts 0, 1, 2)
  for (index_t j = 0; j < 3; ++j) v[std::size_t(j)] = 1.0 / (1.0 + std::exp(logits1(0, (j + 1) % 3) - logits1(0, j)) +
                                                              std::exp(logits1(0, (j + 2) % 3) - logits1(0, j)));
  REQUIRE(out.plan.dropped_weight.size() == 1);
  CHECK(out.plan.dropped_weight[0] == Approx(v[0]).epsilon(1e-6));
  const bool pass_through = GENERATE(false, true);
  CAPTURE(pass_through);
  const std::vector<float> grad_lost{0.0f, 0.9f};  // ∂L/∂(lost weight) per token

  auto g_of = [](index_t t, index_t e) { return 0.3 + 0.25 * double(e) - 0.7 * double(t); };  // ∂L/∂weight
  std::vector<float> grad_weight(out.plan.weight.size());
  for (std::size_t a = 0; a < grad_weight.size(); ++a) {
    grad_weight[a] = float(g_of(out.plan.token[a], out.plan.expert_of_assignment(index_t(a))));
  }
  moe::Matrix<float> dx = moe::Matrix<float>::Zero(Tn, d), dW = moe::Matrix<float>::Zero(E, d);
  router.backward(xf, out, grad_weight.data(), pass_through ? grad_lost.data() : nullptr, nullptr, dx, dW);

  moe::Matrix<double> dlogits = moe::Matrix<double>::Zero(Tn, E);
  for (index_t t = 0; t < Tn; ++t) {
    const moe::Matrix<double> logits = x.row(t) * W.transpose();
    double top = -1e300, sum = 0, mean_g = 0;
    for (const Assigned& a : got[std::size_t(t)]) top = std::max(top, logits(0, a.expert));
    for (const Assigned& a : got[std::size_t(t)]) sum += std::exp(logits(0, a.expert) - top);
    for (const Assigned& a : got[std::size_t(t)]) {
      const double w = std::exp(logits(0, a.expert) - top) / sum;
      CHECK(a.weight == Approx(w).epsilon(1e-5));
      mean_g += w * g_of(t, a.expert);
    }
    for (const Assigned& a : got[std::size_t(t)]) {
      const double w = std::exp(logits(0, a.expert) - top) / sum;
      dlogits(t, a.expert) = w * (g_of(t, a.expert) - mean_g);
    }
  }
  CHECK(std::abs(dlogits(1, 1)) > 0.04);  // not small: 0.731 · (-0.15 + 0.083) = -0.049
  if (pass_through) {
    for (index_t j = 0; j < 3; ++j) dlogits(1, j) += 0.9 * v[0] * ((j == 0 ? 1.0 : 0.0) - v[std::size_t(j)]);
  }
  const moe::Matrix<double> dW_ref = dlogits.transpose() * x, dx_ref = dlogits * W;
  for (index_t e = 0; e < E; ++e)
    for (index_t i = 0; i < d; ++i) {
      CAPTURE(e, i, dW(e, i), dW_ref(e, i));
      REQUIRE(std::isfinite(dW(e, i)));
      CHECK(std::abs(double(dW(e, i)) - dW_ref(e, i)) <= 1e-5);
    }
  for (index_t t = 0; t < Tn; ++t)
    for (index_t i = 0; i < d; ++i) {
      CAPTURE(t, i, dx(t, i), dx_ref(t, i));
      REQUIRE(std::isfinite(dx(t, i)));
      CHECK(std::abs(double(dx(t, i)) - dx_ref(t, i)) <= 1e-5 * 50);  // W's entries reach 50
    }
}

TEST_CASE("Capacity is counted per routing group, and groups are isolated", "[routing][capacity][groups]") {
  const index_t E = 4, d = 8, k = 2;
  const moe::Matrix<float> W = random_matrix<float>(E, d, 41, 1.0);
  moe::TopKOptions o;
  o.k = k;
  o.capacity_factor = 1.0;
  o.normalize = true;
  const moe::TopKRouter<float> router(W, o);
  // Victim group (6 tokens) after adversary groups of different sizes and contents.
  const moe::Matrix<float> victim = random_matrix<float>(6, d, 42);
  std::vector<std::vector<Assigned>> reference;
  for (int trial = 0; trial < 4; ++trial) {
    const index_t adversary_tokens = 3 + 7 * trial;
    moe::Matrix<float> x(adversary_tokens + 6, d);
    x.topRows(adversary_tokens) = random_matrix<float>(adversary_tokens, d, 100 + std::uint32_t(trial), 5.0);
    x.bottomRows(6) = victim;
    const std::vector<index_t> groups = {0, adversary_tokens, adversary_tokens + 6};
    moe::RouterOutput<float> out;
    router.route(x, moe::RouteContext::with_groups(groups), out);
    const index_t C = capacity_of(1.0, 6, k, E);
    std::vector<index_t> victim_load(std::size_t(E), 0);
    auto tokens = by_token(out.plan);
    std::vector<std::vector<Assigned>> victim_tokens(tokens.begin() + adversary_tokens, tokens.end());
    for (const auto& v : victim_tokens)
      for (const Assigned& a : v) ++victim_load[std::size_t(a.expert)];
    for (index_t l : victim_load) REQUIRE(l <= C);
    if (trial == 0) reference = victim_tokens;
    for (std::size_t t = 0; t < victim_tokens.size(); ++t) {
      REQUIRE(victim_tokens[t].size() == reference[t].size());
      for (std::size_t j = 0; j < reference[t].size(); ++j) {
        REQUIRE(victim_tokens[t][j].expert == reference[t][j].expert);
        REQUIRE(victim_tokens[t][j].weight == reference[t][j].weight);  // bit-identical
      }
    }
  }
}

TEST_CASE("Group-limited routing keeps the best groups by top-2 sum", "[routing][groups]") {
  const index_t E = 12, d = 10, Tn = 30;
  const index_t G = GENERATE(2, 3, 4), kept_groups = GENERATE(1, 2);
  const auto mask = GENERATE(moe::GroupMask::exclude, moe::GroupMask::zero);
  const bool with_bias = GENERATE(false, true);
  CAPTURE(G, kept_groups, int(mask), with_bias);
  const moe::Matrix<double> W = random_matrix<double>(E, d, 51, 1.0), x = random_matrix<double>(Tn, d, 52);
  moe::TopKOptions o;
  o.k = 3;
  o.score = moe::ScoreFunction::sigmoid;
  o.expert_groups = G;
  o.selected_groups = kept_groups;
  o.group_mask = mask;
  o.normalize = true;
  if (o.k > kept_groups * (E / G)) return;
  moe::TopKRouter<double> router(W, o);
  std::vector<double> bias(std::size_t(E), 0.0);
  if (with_bias) {
    moe::Vector<double> b(E);
    for (index_t e = 0; e < E; ++e) b[e] = bias[std::size_t(e)] = 0.4 * std::sin(double(e)) - 0.5;  // mostly negative
    router.set_selection_bias(b);
  }
  moe::RouterOutput<double> out;
  router.route(x, out);
  const auto got = by_token(out.plan);
  const index_t size = E / G;
  for (index_t t = 0; t < Tn; ++t) {
    std::vector<double> s(static_cast<std::size_t>(E)), sel(static_cast<std::size_t>(E));
    for (index_t e = 0; e < E; ++e) {
      s[std::size_t(e)] = sigmoid(double(out.logits()(t, e)));
      sel[std::size_t(e)] = s[std::size_t(e)] + bias[std::size_t(e)];
    }
    std::vector<double> group_score(static_cast<std::size_t>(G));
    for (index_t g = 0; g < G; ++g) {
      std::vector<double> members(sel.begin() + g * size, sel.begin() + (g + 1) * size);
      std::sort(members.rbegin(), members.rend());
      group_score[std::size_t(g)] = members[0] + members[1];
    }
    const std::vector<index_t> best_groups = top_k(group_score, kept_groups);
    std::vector<double> masked = sel;
    for (index_t e = 0; e < E; ++e) {
      const bool kept = std::find(best_groups.begin(), best_groups.end(), e / size) != best_groups.end();
      if (!kept) masked[std::size_t(e)] = mask == moe::GroupMask::zero ? 0.0 : -std::numeric_limits<double>::infinity();
    }
    const std::vector<index_t> chosen = top_k(masked, o.k);
    double sum = 0;
    for (index_t e : chosen) sum += s[std::size_t(e)];
    CAPTURE(t);
    REQUIRE(got[std::size_t(t)].size() == std::size_t(o.k));
    for (std::size_t j = 0; j < chosen.size(); ++j) {
      CHECK(got[std::size_t(t)][j].expert == chosen[j]);
      CHECK(got[std::size_t(t)][j].weight == Approx(s[std::size_t(chosen[j])] / (sum + 1e-20)).epsilon(1e-12));
    }
  }
}

TEST_CASE("Dynamic top-p takes experts until the cumulative probability reaches p", "[routing][top_p]") {
  const index_t E = 8, d = 6, Tn = 50;
  const double p = GENERATE(0.3, 0.5, 0.9, 1.0);
  const index_t k_max = GENERATE(1, 3, 8);
  CAPTURE(p, k_max);
  const moe::Matrix<double> W = random_matrix<double>(E, d, 61, 1.5), x = random_matrix<double>(Tn, d, 62);
  moe::TopKOptions o;
  o.k = k_max;
  o.top_p = p;
  moe::RouterOutput<double> out;
  moe::TopKRouter<double>(W, o).route(x, out);
  const auto got = by_token(out.plan);
  for (index_t t = 0; t < Tn; ++t) {
    std::vector<double> probs(static_cast<std::size_t>(E));
    for (index_t e = 0; e < E; ++e) probs[std::size_t(e)] = out.scores()(t, e);
    const std::vector<index_t> order = top_k(probs, E);
    std::vector<index_t> ref;
    double cumulative = 0;
    for (index_t e : order) {
      if (cumulative >= p || index_t(ref.size()) == k_max) break;
      ref.push_back(e);
      cumulative += probs[std::size_t(e)];
    }
    REQUIRE(got[std::size_t(t)].size() == ref.size());
    for (std::size_t j = 0; j < ref.size(); ++j) {
      CHECK(got[std::size_t(t)][j].expert == ref[j]);
      CHECK(got[std::size_t(t)][j].weight == Approx(probs[std::size_t(ref[j])]).epsilon(1e-12));
    }
  }
}

TEST_CASE("Dynamic top-p stops where the cumulative probability reaches p exactly", "[routing][top_p]") {
  // A zero gate gives every expert probability exactly 1/8, so the partial sums 1/8, 2/8, ... are
  // exact and hit p = m/8 on the nose: the smallest set with Σ >= p has m experts, the lowest
  // indices (ties), each weighted 1/8.
  const index_t E = 8, d = 3;
  const index_t m = GENERATE(1, 2, 5);
  const double p = double(m) / double(E);
  CAPTURE(m, p);
  moe::TopKOptions o;
  o.k = E;
  o.top_p = p;
  moe::RouterOutput<double> out;
  moe::TopKRouter<double>(moe::Matrix<double>::Zero(E, d), o).route(random_matrix<double>(4, d, 65), out);
  const auto got = by_token(out.plan);
  for (const auto& token : got) {
    REQUIRE(index_t(token.size()) == m);
    for (std::size_t j = 0; j < token.size(); ++j) {
      CHECK(token[j].expert == index_t(j));
      CHECK(token[j].weight == 1.0 / double(E));
    }
  }
}

TEST_CASE("Rerouting under group-limited routing stays within the token's kept groups", "[routing][capacity][groups]") {
  // Two groups {0, 1} and {2, 3}, one kept, k = 1, one slot per expert: three tokens that all
  // rank 0 > 1 > 2 > 3 keep group {0, 1}. Token 0 takes expert 0, token 1 is rerouted to expert 1,
  // and token 2 finds its group full: dropped, though experts 2 and 3 (excluded) have room.
  moe::TopKOptions o;
  o.k = 1;
  o.expert_groups = 2;
  o.selected_groups = 1;
  o.group_score_top = 1;
  o.group_mask = moe::GroupMask::exclude;
  o.fixed_capacity = 1;
  o.overflow = moe::OverflowPolicy::reroute;
  moe::Matrix<double> x(3, 4);
  for (index_t t = 0; t < 3; ++t) x.row(t) << 5.0, 4.0, 0.0, -1.0;
  moe::RouterOutput<double> out;
  moe::TopKRouter<double>(moe::Matrix<double>::Identity(4, 4), o).route(x, out);
  const auto got = by_token(out.plan);
  REQUIRE(got[0].size() == 1);
  CHECK(got[0][0].expert == 0);
  REQUIRE(got[1].size() == 1);
  CHECK(got[1][0].expert == 1);
  CHECK(got[2].empty());
  CHECK(out.plan.rerouted == std::vector<index_t>{1});
  CHECK(out.plan.dropped == std::vector<index_t>{2});
}

TEST_CASE("Training jitter is keyed by token id, not by batch position", "[routing][jitter]") {
  const index_t E = 5, d = 7, Tn = 9;
  const moe::Matrix<double> W = random_matrix<double>(E, d, 71, 1.0), x = random_matrix<double>(Tn, d, 72);
  moe::TopKOptions o;
  o.k = 2;
  o.jitter = 0.1;
  o.jitter_seed = 123;
  const moe::TopKRouter<double> router(W, o);
  std::vector<std::int64_t> ids(static_cast<std::size_t>(Tn));
  for (index_t t = 0; t < Tn; ++t) ids[std::size_t(t)] = 1000 + 17 * t;
  moe::RouteContext ctx;
  ctx.token_ids = ids.data();
  ctx.training = true;
  moe::RouterOutput<double> out, plain, reversed;
  router.route(x, ctx, out);
  router.route(x, plain);  // not training: no jitter

  const moe::Matrix<double> exact = x * W.transpose();
  REQUIRE(moe::Matrix<double>(plain.logits()).isApprox(exact, 1e-14));
  REQUIRE_FALSE(moe::Matrix<double>(out.logits()).isApprox(exact, 1e-6));
  // Each jittered input lies in x · [0.9, 1.1], so each logit is within Σ|x_i w_i| · 0.1.
  for (index_t t = 0; t < Tn; ++t)
    for (index_t e = 0; e < E; ++e) {
      double bound = 0;
      for (index_t i = 0; i < d; ++i) bound += std::fabs(x(t, i) * W(e, i)) * 0.1;
      REQUIRE(std::fabs(out.logits()(t, e) - exact(t, e)) <= bound + 1e-12);
    }
  // Reverse the batch (ids travel with their tokens): logits reverse bit for bit.
  const moe::Matrix<double> x_rev = x.colwise().reverse();
  std::vector<std::int64_t> ids_rev(ids.rbegin(), ids.rend());
  moe::RouteContext ctx_rev = ctx;
  ctx_rev.token_ids = ids_rev.data();
  router.route(x_rev, ctx_rev, reversed);
  for (index_t t = 0; t < Tn; ++t) REQUIRE(moe::Matrix<double>(reversed.logits().row(Tn - 1 - t)) == moe::Matrix<double>(out.logits().row(t)));
  // Another layer draws other noise.
  moe::RouteContext other_layer = ctx;
  other_layer.layer_id = 1;
  moe::RouterOutput<double> out_layer1;
  router.route(x, other_layer, out_layer1);
  REQUIRE(moe::Matrix<double>(out_layer1.logits()) != moe::Matrix<double>(out.logits()));

  moe::RouteContext no_ids;
  no_ids.training = true;
  REQUIRE_THROWS_WITH(router.route(x, no_ids, out), Catch::Contains("token_ids = null") && Catch::Contains("jitter = 0.1"));
}

TEST_CASE("Routing options are validated with named values", "[routing][errors]") {
  const moe::Matrix<float> W = random_matrix<float>(8, 4, 1);
  auto make = [&](auto edit) {
    moe::TopKOptions o;
    o.k = 2;
    edit(o);
    return moe::TopKRouter<float>(W, o);
  };
  REQUIRE_THROWS_WITH(make([](moe::TopKOptions& o) { o.capacity_factor = -1; }), Catch::Contains("capacity_factor = -1"));
  REQUIRE_THROWS_WITH(make([](moe::TopKOptions& o) { o.expert_groups = 3; }),
                      Catch::Contains("expert_groups = 3") && Catch::Contains("num_experts = 8"));
  REQUIRE_THROWS_WITH(make([](moe::TopKOptions& o) { o.expert_groups = 4, o.selected_groups = 5; }), Catch::Contains("selected_groups = 5"));
  REQUIRE_THROWS_WITH(make([](moe::TopKOptions& o) { o.expert_groups = 4, o.selected_groups = 1, o.k = 3; }),
                      Catch::Contains("k = 3") && Catch::Contains("experts per group = 2"));
  REQUIRE_THROWS_WITH(make([](moe::TopKOptions& o) { o.expert_groups = 4, o.group_score_top = 3; }), Catch::Contains("group_score_top = 3"));
  REQUIRE_THROWS_WITH(make([](moe::TopKOptions& o) { o.top_p = 1.5; }), Catch::Contains("top_p = 1.5"));
  REQUIRE_THROWS_WITH(make([](moe::TopKOptions& o) { o.top_p = 0.5, o.score = moe::ScoreFunction::sigmoid; }), Catch::Contains("top_p"));
  REQUIRE_THROWS_WITH(make([](moe::TopKOptions& o) { o.jitter = 1.0; }), Catch::Contains("jitter = 1"));
}

}  // namespace capacity_test
