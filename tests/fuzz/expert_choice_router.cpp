// libFuzzer target: ExpertChoiceRouter (routing/expert_choice.hpp) with random shapes,
// capacity factors (ordinary, tiny, huge, invalid), routing groups (valid and invalid) and values
// that include NaN, ±Inf, ±1e30 and denormals.
//
// Checked: moe::invalid_argument exactly when an argument is outside its documented range;
// moe::numeric_error only with check_finite on and values that are not moderate; the plan's
// structure; every expert takes exactly c_g = min(ceil(cf · Tg / E), Tg) tokens of each group,
// the best by score (ties to the lower token), weighted by the score; each token's assignments
// best first; `dropped`/`rerouted` empty; batch isolation per routing group.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

#include <moe/routing/expert_choice.hpp>

#include "fuzz_common.hpp"

namespace {

using namespace moe_fuzz;

// c = min(ceil(cf · n / E), n), as documented.
index_t capacity_of(double cf, index_t n, index_t E) {
  const double c = cf * static_cast<double>(n) / static_cast<double>(E);
  return c >= static_cast<double>(n) ? n : static_cast<index_t>(std::ceil(c));
}

template <class T>
bool before(T va, index_t ia, T vb, index_t ib) {
  return va > vb || (va == vb && ia < ib);
}

template <class T>
void run(FuzzedDataProvider& fdp) {
  const index_t E = fdp.ConsumeIntegralInRange<int>(0, 31) == 0 ? 0 : size_in(fdp, 1, 32);
  const index_t d = size_in(fdp, 0, 48);
  const index_t T_ = size_in(fdp, 0, 64);
  moe::ExpertChoiceOptions o;
  o.capacity_factor = pick(fdp, {1.0, 2.0, 0.5, 0.25, 1.5, 4.0, 3.0, 8.0, 32.0, 1e-300, kDenorm, 1e300, 0.0, -1.0, kNaN, kInf});
  o.check_finite = fdp.ConsumeIntegralInRange<int>(0, 7) != 0;
  bool valid = E >= 1 && d >= 1 && std::isfinite(o.capacity_factor) && o.capacity_factor > 0;
  bool moderate = true;
  const bool special_w = fdp.ConsumeIntegralInRange<int>(0, 3) == 0;
  const bool special_x = fdp.ConsumeIntegralInRange<int>(0, 3) == 0;
  const moe::Matrix<T> w = matrix<T>(fdp, E, d, special_w, moderate);  // [E, d]
  const index_t pad = fdp.ConsumeBool() ? fdp.ConsumeIntegralInRange<index_t>(1, 5) : 0;
  const moe::Matrix<T> x_storage = matrix<T>(fdp, T_, d + pad, special_x, moderate);
  const bool wrong_width = pad > 0 && fdp.ConsumeIntegralInRange<int>(0, 31) == 0;
  if (wrong_width) valid = false;
  const moe::ConstMatrixRef<T> x = x_storage.leftCols(wrong_width ? d + 1 : d);
  const Groups g = groups(fdp, T_);
  if (g.invalid) valid = false;
  const bool view_weight = fdp.ConsumeBool();
  {
    char text[200];
    std::snprintf(text, sizeof text, "%s E=%td d=%td T=%td cf=%g check_finite=%d groups=%zu moderate=%d",
                  sizeof(T) == 4 ? "float" : "double", E, d, T_, o.capacity_factor, int(o.check_finite), g.boundaries.size(),
                  int(moderate));
    case_description() = text;
  }

  std::unique_ptr<moe::ExpertChoiceRouter<T>> router;
  moe::RouterOutput<T> out;
  const std::vector<std::int64_t> no_ids;
  moe::RouteContext ctx;
  try {
    router = view_weight ? std::make_unique<moe::ExpertChoiceRouter<T>>(moe::ConstMatrixMap<T>(w.data(), E, d), o)
                         : std::make_unique<moe::ExpertChoiceRouter<T>>(w, o);
    ctx = context(g, no_ids);
    router->route(x, ctx, out);
  } catch (const moe::invalid_argument&) {
    MOE_FUZZ_CHECK(!valid);
    return;
  } catch (const moe::numeric_error&) {
    MOE_FUZZ_CHECK(valid && o.check_finite && !moderate);
    return;
  }
  MOE_FUZZ_CHECK(valid);

  const std::vector<index_t> bounds = g.bounds(T_);
  const moe::Routing<T>& plan = out.plan;
  check_plan(plan, T_, E);
  // A token chooses nothing, so it loses nothing to capacity: the router's lists stay empty.
  MOE_FUZZ_CHECK(plan.dropped.empty() && plan.dropped_weight.empty() && plan.rerouted.empty());
  const bool logits_finite = all_finite(out.logits());
  if (o.check_finite || moderate) MOE_FUZZ_CHECK(logits_finite);

  // Every expert takes exactly C = Σ_g c_g tokens, c_g of them from group g.
  index_t C = 0;
  for (std::size_t gi = 0; gi + 1 < bounds.size(); ++gi) {
    const index_t n = bounds[gi + 1] - bounds[gi];
    MOE_FUZZ_CHECK(router->capacity(n) == capacity_of(o.capacity_factor, n, E));
    C += capacity_of(o.capacity_factor, n, E);
  }
  const moe::ConstMatrixMap<T> S = out.scores();
  for (index_t e = 0; e < E; ++e) {
    MOE_FUZZ_CHECK(plan.expert_begin[sz(e)] == e * C);
    std::vector<char> taken(sz(T_), 0);
    for (index_t a = plan.expert_begin[sz(e)]; a < plan.expert_begin[sz(e + 1)]; ++a) {
      taken[sz(plan.token[sz(a)])] = 1;
      MOE_FUZZ_CHECK(same_value(plan.weight[sz(a)], S(plan.token[sz(a)], e)));  // weight = S[t, e]
    }
    for (std::size_t gi = 0; gi + 1 < bounds.size(); ++gi) {
      const index_t first = bounds[gi], last = bounds[gi + 1];
      index_t count = 0;
      bool has_nan = false;
      for (index_t t = first; t < last; ++t) count += taken[sz(t)], has_nan = has_nan || std::isnan(S(t, e));
      MOE_FUZZ_CHECK(count == capacity_of(o.capacity_factor, last - first, E));
      if (has_nan) continue;  // the top-c selection has no order to check
      // Each taken token ranks before each token left out (score descending, lower token first):
      // the last-ranked taken token before the best one left out.
      index_t worst_taken = -1, best_left = -1;
      for (index_t t = first; t < last; ++t) {
        if (taken[sz(t)]) {
          if (worst_taken < 0 || before(S(worst_taken, e), worst_taken, S(t, e), t)) worst_taken = t;
        } else if (best_left < 0 || before(S(t, e), t, S(best_left, e), best_left)) {
          best_left = t;
        }
      }
      if (worst_taken >= 0 && best_left >= 0) MOE_FUZZ_CHECK(before(S(worst_taken, e), worst_taken, S(best_left, e), best_left));
    }
  }
  // Each token's assignments best first (descending weight, then lower expert).
  for (index_t t = 0; t < T_; ++t) {
    const std::vector<Choice<T>> c = choices_of(plan, t);
    for (std::size_t j = 1; j < c.size(); ++j) {
      if (!std::isnan(c[j - 1].weight) && !std::isnan(c[j].weight))
        MOE_FUZZ_CHECK(before(c[j - 1].weight, c[j - 1].expert, c[j].weight, c[j].expert));
    }
  }
  if (logits_finite) {
    for (index_t t = 0; t < T_; ++t) {
      double sum = 0;
      for (index_t e = 0; e < E; ++e) {
        MOE_FUZZ_CHECK(S(t, e) >= T(0) && S(t, e) <= T(1));
        sum += static_cast<double>(S(t, e));
      }
      MOE_FUZZ_CHECK(std::fabs(sum - 1.0) <= 1e-4);
    }
  }

  // Determinism, and a reused output after a different batch.
  const moe::Routing<T> first_plan = plan;
  moe::RouterOutput<T> again;
  router->route(x, ctx, again);
  MOE_FUZZ_CHECK(same_plan(first_plan, again.plan));

  // Batch isolation: a routing group routed on its own gets the same experts and weights.
  if (bounds.size() > 2) {
    const auto gi = fdp.ConsumeIntegralInRange<std::size_t>(0, bounds.size() - 2);
    const index_t begin = bounds[gi], n = bounds[gi + 1] - begin;
    router->route(x.middleRows(begin, n), out);  // reuses `out`
    check_plan(out.plan, n, E);
    for (index_t i = 0; i < n; ++i) {
      const auto a = choices_of(out.plan, i), b = choices_of(first_plan, begin + i);
      MOE_FUZZ_CHECK(a.size() == b.size());
      for (std::size_t j = 0; j < a.size(); ++j) MOE_FUZZ_CHECK(a[j].expert == b[j].expert && same_value(a[j].weight, b[j].weight));
    }
    router->route(x, ctx, out);
    MOE_FUZZ_CHECK(same_plan(first_plan, out.plan));
  }
}

}  // namespace

MOE_FUZZ_FLOAT_AND_DOUBLE(run)
