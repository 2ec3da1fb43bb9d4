// libFuzzer target: TopKRouter (routing/top_k.hpp) with random shapes, every TopKOptions field,
// a selection bias, routing groups (valid and invalid boundaries), token ids and jitter, on
// values that include NaN, ±Inf, ±1e30 and denormals.
//
// Checked on every input:
//  - moe::invalid_argument exactly when an argument is outside its documented range;
//    moe::numeric_error only with check_finite on and values that are not moderate;
//  - the plan's structure (fuzz_common.hpp), at most k experts per token, capacity respected
//    per routing group, dropped/rerouted consistent with the experts each token kept;
//  - the selection and weights against a reference written from the documented semantics
//    (whenever the selection values are not NaN);
//  - weights finite when the logits are and the documented weight is within T's range; softmax
//    rows summing to 1;
//  - determinism, buffer reuse, and batch isolation: a routing group routed on its own gets the
//    same plan, bit for bit.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <numeric>
#include <vector>

#include <moe/routing/top_k.hpp>

#include "fuzz_common.hpp"
#include "top_k_options.hpp"

namespace {

using namespace moe_fuzz;

// Library issues this fuzzer found, all fixed: a top_p rounding to 0 in T chose no expert; a zero
// weight denominator gave 0/0; the after_top_k softmax overflowed for the chosen experts; a
// rerouting candidate's exp(logit − the largest chosen logit) overflowed when a selection bias
// ranked experts whose logits are far above the chosen ones (NaN weights when renormalized).

bool capped(const TopKOptions& o) { return o.capacity_factor > 0 || o.fixed_capacity > 0; }

// Capacity of a group of n tokens, in double so an extreme capacity_factor cannot overflow here.
double capacity_of(const TopKOptions& o, index_t n, index_t E) {
  if (o.fixed_capacity > 0) return static_cast<double>(o.fixed_capacity);
  return std::ceil(static_cast<double>(n * o.k) / static_cast<double>(E) * o.capacity_factor);  // Megatron-Core's order
}

// The selection order: larger value first, equal values by the lower index, NaN after every number.
template <class T>
bool before(T va, index_t ia, T vb, index_t ib) {
  if (std::isnan(va) || std::isnan(vb)) return std::isnan(va) == std::isnan(vb) ? ia < ib : std::isnan(vb);
  return va > vb || (va == vb && ia < ib);
}

// Indices of v[0, n) in the selection order (larger first, ties to the lower index).
template <class T>
std::vector<index_t> ranking(const T* v, index_t n) {
  std::vector<index_t> order(sz(n));
  std::iota(order.begin(), order.end(), index_t(0));
  std::sort(order.begin(), order.end(), [v](index_t a, index_t b) { return before(v[a], a, v[b], b); });
  return order;
}

// One token's candidates as the documentation describes them.
template <class T>
struct Candidates {
  std::vector<index_t> expert;  // [R] in rank order
  std::vector<T> raw;           // [R]
  index_t num_chosen = 0;
  index_t num_ranked = 0;       // candidates a rerouted choice may take (masked experts excluded)
};

// Returns false when the reference does not apply (a NaN among the selection values: the
// router's precondition is violated and only memory safety and the plan's structure are checked).
template <class T>
bool reference_candidates(const TopKOptions& o, const moe::Vector<T>& bias, const T* logits, const T* scores, index_t E,
                          index_t R, Candidates<T>& c) {
  const bool on_logits = o.softmax_placement == SoftmaxPlacement::after_top_k;
  std::vector<T> v(sz(E));
  for (index_t e = 0; e < E; ++e) v[sz(e)] = (on_logits ? logits[e] : scores[e]) + (bias.size() > 0 ? bias[e] : T(0));
  for (const T x : v)
    if (std::isnan(x)) return false;
  if (o.expert_groups > 1) {
    const index_t G = o.expert_groups, size = E / G;
    std::vector<T> group_score(sz(G));
    for (index_t g = 0; g < G; ++g) {
      const std::vector<index_t> members = ranking(v.data() + g * size, size);
      T sum(0);
      for (index_t j = 0; j < o.group_score_top; ++j) sum += v[sz(g * size + members[sz(j)])];
      group_score[sz(g)] = sum;
    }
    for (const T x : group_score)
      if (std::isnan(x)) return false;
    const std::vector<index_t> best = ranking(group_score.data(), G);
    const T masked = o.group_mask == GroupMask::zero ? T(0) : -std::numeric_limits<T>::infinity();
    for (index_t r = o.selected_groups; r < G; ++r)
      std::fill(v.begin() + best[sz(r)] * size, v.begin() + (best[sz(r)] + 1) * size, masked);
  }
  const std::vector<index_t> order = ranking(v.data(), E);
  c.expert.assign(order.begin(), order.begin() + R);
  c.num_ranked = R;
  while (c.num_ranked > o.k && v[sz(c.expert[sz(c.num_ranked - 1)])] == -std::numeric_limits<T>::infinity()) --c.num_ranked;
  c.num_chosen = o.k;
  if (o.top_p > 0) {
    T cumulative(0);
    c.num_chosen = 0;
    do {  // at least one
      cumulative += scores[c.expert[sz(c.num_chosen++)]];
    } while (c.num_chosen < o.k && cumulative < static_cast<T>(o.top_p));
  }
  c.raw.resize(sz(R));
  if (on_logits) {
    T top = logits[c.expert[0]];  // the largest chosen logit
    for (index_t j = 1; j < o.k; ++j) top = std::max(top, logits[c.expert[sz(j)]]);
    T sum(0);
    for (index_t j = 0; j < R; ++j) c.raw[sz(j)] = std::exp(logits[c.expert[sz(j)]] - top);
    for (index_t j = 0; j < o.k; ++j) sum += c.raw[sz(j)];
    for (index_t j = 0; j < R; ++j) c.raw[sz(j)] /= sum;
    for (index_t j = o.k; j < R; ++j)  // e^(l − top) / sum in one exp where e^(l − top) overflows
      if (std::isinf(c.raw[sz(j)])) c.raw[sz(j)] = std::exp(logits[c.expert[sz(j)]] - top - std::log(sum));
  } else {
    for (index_t j = 0; j < R; ++j) c.raw[sz(j)] = scores[c.expert[sz(j)]];
  }
  return true;
}

// Which candidates survive capacity in one group [first, last), as capacity.hpp documents it.
template <class T>
void reference_capacity(const TopKOptions& o, index_t E, index_t first, index_t last, const std::vector<Candidates<T>>& cand,
                        std::vector<std::vector<char>>& kept) {
  const double capacity = capacity_of(o, last - first, E);
  std::vector<double> load(sz(E), 0.0);
  auto take = [&](index_t t, index_t j) {
    const index_t e = cand[sz(t)].expert[sz(j)];
    if (load[sz(e)] >= capacity) return false;
    load[sz(e)] += 1;
    kept[sz(t)][sz(j)] = 1;
    return true;
  };
  if (o.capacity_priority == CapacityPriority::position) {
    for (index_t t = first; t < last; ++t)
      for (index_t j = 0; j < cand[sz(t)].num_chosen; ++j) take(t, j);
  } else {
    struct Entry {
      index_t t, j;
    };
    std::vector<Entry> order;
    for (index_t t = first; t < last; ++t)
      for (index_t j = 0; j < cand[sz(t)].num_chosen; ++j) order.push_back({t, j});
    std::sort(order.begin(), order.end(), [&](const Entry& a, const Entry& b) {  // ties: earlier token, better rank
      return before(cand[sz(a.t)].raw[sz(a.j)], a.t * E + a.j, cand[sz(b.t)].raw[sz(b.j)], b.t * E + b.j);
    });
    for (const Entry& en : order) take(en.t, en.j);
  }
  if (o.overflow == OverflowPolicy::reroute) {
    for (index_t t = first; t < last; ++t) {
      index_t next = cand[sz(t)].num_chosen;
      for (index_t j = 0; j < cand[sz(t)].num_chosen; ++j) {
        if (kept[sz(t)][sz(j)]) continue;
        while (next < cand[sz(t)].num_ranked && !take(t, next)) ++next;
        if (next < cand[sz(t)].num_ranked) ++next;
      }
    }
  }
}

template <class T>
bool close(T actual, double expected) {
  if (!std::isfinite(expected) || !std::isfinite(actual)) return same_value(static_cast<double>(actual), expected);
  const double tol = 8.0 * static_cast<double>(std::numeric_limits<T>::epsilon()) * std::fabs(expected) + 4.0 * static_cast<double>(std::numeric_limits<T>::min());
  return std::fabs(static_cast<double>(actual) - expected) <= tol;
}

// Returns, per token, whether a documented weight of it is beyond T's range (more than half the
// largest T; empty when the reference does not apply). That happens with a selection bias (or a
// zero group mask) and rerouting: the selection can choose an expert whose raw score is far below
// the one a choice is rerouted to, and the rerouted weight raw / Σ chosen raw is then unbounded, so
// even moderate values can exceed the largest T. The router throws moe::numeric_error for it when
// check_finite, and passes an infinite weight otherwise.
template <class T>
std::vector<char> check_against_reference(const TopKOptions& o, const moe::Vector<T>& bias, const moe::RouterOutput<T>& out,
                                          const std::vector<index_t>& bounds, index_t T_, index_t E) {
  const bool is_capped = capped(o);
  const index_t R = is_capped && o.overflow == OverflowPolicy::reroute ? E : o.k;
  std::vector<Candidates<T>> cand(sz(T_));
  for (index_t t = 0; t < T_; ++t) {
    if (!reference_candidates(o, bias, out.logits().data() + t * E, out.scores().data() + t * E, E, R, cand[sz(t)])) return {};
  }
  std::vector<std::vector<char>> kept(sz(T_));
  for (index_t t = 0; t < T_; ++t) {
    kept[sz(t)].assign(sz(R), 0);
    if (!is_capped)
      for (index_t j = 0; j < cand[sz(t)].num_chosen; ++j) kept[sz(t)][sz(j)] = 1;
  }
  if (is_capped)
    for (std::size_t g = 0; g + 1 < bounds.size(); ++g) reference_capacity(o, E, bounds[g], bounds[g + 1], cand, kept);

  const moe::Routing<T>& plan = out.plan;
  auto dump = [&](index_t t) {
    std::fprintf(stderr, "token %td: logits", t);
    for (index_t e = 0; e < E; ++e) std::fprintf(stderr, " %a", static_cast<double>(out.logits()(t, e)));
    std::fprintf(stderr, "\n  scores");
    for (index_t e = 0; e < E; ++e) std::fprintf(stderr, " %a", static_cast<double>(out.scores()(t, e)));
    std::fprintf(stderr, "\n  plan");
    for (const Choice<T>& c : choices_of(plan, t)) std::fprintf(stderr, " (%td, %a)", c.expert, static_cast<double>(c.weight));
    std::fprintf(stderr, "\n  reference");
    for (index_t j = 0; j < R; ++j)
      std::fprintf(stderr, " (%td, raw %a%s)", cand[sz(t)].expert[sz(j)], static_cast<double>(cand[sz(t)].raw[sz(j)]),
                   kept[sz(t)][sz(j)] ? "" : " lost");
    std::fprintf(stderr, "\n");
  };
#define MOE_FUZZ_CHECK_TOKEN(...) \
  do {                            \
    if (!(__VA_ARGS__)) {         \
      dump(t);                    \
      MOE_FUZZ_CHECK(__VA_ARGS__); \
    }                             \
  } while (false)
  const T eps = o.score == ScoreFunction::sigmoid ? T(1e-20) : T(0);
  const T scale = static_cast<T>(o.scale);
  const bool on_logits = o.softmax_placement == SoftmaxPlacement::after_top_k;
  std::size_t next_dropped = 0, next_rerouted = 0;
  std::vector<char> token_beyond(sz(T_), 0);
  for (index_t t = 0; t < T_; ++t) {
    const Candidates<T>& c = cand[sz(t)];
    MOE_FUZZ_CHECK_TOKEN(c.num_chosen >= 1 && c.num_chosen <= o.k);
    // The documented weight: raw / (Σ chosen raw, or Σ kept raw after drops) · scale, in T.
    T chosen_sum(0), kept_sum(0);
    bool kept_any = false;
    for (index_t j = 0; j < c.num_chosen; ++j) chosen_sum += c.raw[sz(j)];
    for (index_t j = 0; j < R; ++j) {
      kept_sum += kept[sz(t)][sz(j)] ? c.raw[sz(j)] : T(0);
      kept_any = kept_any || kept[sz(t)][sz(j)];
    }
    // Lost choices keep the plain normalization; kept ones are renormalized over the survivors
    // when asked. A zero sum (every summed probability underflowed) counts as 1: raw zeros.
    T plain(1);
    if (o.normalize) plain = chosen_sum + eps;
    if (plain == T(0)) plain = T(1);
    T denominator = plain;
    const bool renormalized = o.renormalize_after_drop && is_capped && kept_any;
    if (renormalized) {
      denominator = kept_sum + eps;
      if (denominator == T(0)) denominator = T(1);
    }
    const T* l = out.logits().data() + t * E;  // the token's logits
    // Renormalized, raw / Σ kept raw is a softmax over the kept logits: computed so where a
    // rerouted raw weight overflowed T (softmax after top-k).
    std::vector<T> share(sz(R), T(0));
    const bool shares_from_logits = renormalized && on_logits && std::isinf(kept_sum);
    if (shares_from_logits) {
      T top = -std::numeric_limits<T>::infinity(), sum(0);
      for (index_t j = 0; j < R; ++j)
        if (kept[sz(t)][sz(j)]) top = std::max(top, l[c.expert[sz(j)]]);
      for (index_t j = 0; j < R; ++j) {
        if (kept[sz(t)][sz(j)]) share[sz(j)] = std::exp(l[c.expert[sz(j)]] - top);
        sum += share[sz(j)];
      }
      for (T& v : share) v /= sum;
    }
    // After top-k, the exact raw weights e^(l_j − top) / Σ_{i<k} e^(l_i − top) come from the logits
    // in long double, since raw itself may be beyond T.
    long double exact_top = -std::numeric_limits<long double>::infinity(), exact_sum = 0;
    if (on_logits) {
      for (index_t i = 0; i < o.k; ++i) exact_top = std::max(exact_top, static_cast<long double>(l[c.expert[sz(i)]]));
      for (index_t i = 0; i < o.k; ++i) exact_sum += std::exp(static_cast<long double>(l[c.expert[sz(i)]]) - exact_top);
    }
    const std::vector<Choice<T>> got = choices_of(plan, t);
    std::size_t q = 0;
    T lost(0);
    bool rerouted = false;
    // Reroute moves a token's lost choices in rank order until one finds no room: the first
    // `moved` lost choices are not lost.
    std::size_t moved = 0;
    for (index_t j = c.num_chosen; j < R; ++j) moved += kept[sz(t)][sz(j)] ? 1 : 0;
    for (index_t j = 0; j < R; ++j) {
      const bool from_logits = shares_from_logits && kept[sz(t)][sz(j)];
      const T den = kept[sz(t)][sz(j)] ? denominator : plain;
      const T w = (from_logits ? share[sz(j)] : c.raw[sz(j)] / den) * scale;
      // The same weight in long double (range beyond double's), with a margin for T's rounding.
      const long double exact_raw = on_logits ? std::exp(static_cast<long double>(l[c.expert[sz(j)]]) - exact_top) / exact_sum
                                              : static_cast<long double>(c.raw[sz(j)]);
      const long double exact = from_logits ? static_cast<long double>(w)
                                            : exact_raw / static_cast<long double>(den) * static_cast<long double>(scale);
      const bool beyond_range = !(std::fabs(exact) <= static_cast<long double>(std::numeric_limits<T>::max()) / 2);
      if (beyond_range && (kept[sz(t)][sz(j)] || j < c.num_chosen)) token_beyond[sz(t)] = 1;
      if (kept[sz(t)][sz(j)]) {
        MOE_FUZZ_CHECK_TOKEN(q < got.size());
        MOE_FUZZ_CHECK_TOKEN(got[q].expert == c.expert[sz(j)]);
        // In T's own order where that is finite; else (a rerouted raw weight beyond T) the exact
        // value, which the router reaches in the log domain. Near or beyond T's range: unchecked.
        if (!beyond_range)
          MOE_FUZZ_CHECK_TOKEN(close(got[q].weight, std::isfinite(w) ? static_cast<double>(w) : static_cast<double>(exact)));
        ++q;
        rerouted = rerouted || j >= c.num_chosen;
      } else if (j < c.num_chosen) {
        if (moved > 0) {
          --moved;
        } else {
          lost += w;
        }
      }
    }
    MOE_FUZZ_CHECK_TOKEN(q == got.size());
    if (static_cast<index_t>(q) < c.num_chosen) {
      MOE_FUZZ_CHECK_TOKEN(next_dropped < plan.dropped.size() && plan.dropped[next_dropped] == t);
      MOE_FUZZ_CHECK_TOKEN(close(plan.dropped_weight[next_dropped], static_cast<double>(lost)));
      ++next_dropped;
    }
    if (rerouted) {
      MOE_FUZZ_CHECK_TOKEN(next_rerouted < plan.rerouted.size() && plan.rerouted[next_rerouted] == t);
      ++next_rerouted;
    }
  }
  MOE_FUZZ_CHECK(next_dropped == plan.dropped.size());
  MOE_FUZZ_CHECK(next_rerouted == plan.rerouted.size());
#undef MOE_FUZZ_CHECK_TOKEN
  return token_beyond;
}

template <class T>
void run(FuzzedDataProvider& fdp) {
  const index_t E = fdp.ConsumeIntegralInRange<int>(0, 31) == 0 ? fdp.ConsumeIntegralInRange<index_t>(0, 1)
                                                                   : size_in(fdp, 1, 32);
  const index_t d = size_in(fdp, 0, 48);
  const index_t T_ = size_in(fdp, 0, 64);
  const TopKOptions o = decode_options(fdp, E, T_);
  bool valid = options_valid<T>(o, E) && d >= 1;  // a zero width is refused
  bool moderate = true;
  const bool special_w = fdp.ConsumeIntegralInRange<int>(0, 3) == 0;
  const bool special_x = fdp.ConsumeIntegralInRange<int>(0, 3) == 0;
  const bool special_b = fdp.ConsumeIntegralInRange<int>(0, 3) == 0;

  const moe::Matrix<T> w = matrix<T>(fdp, E, d, special_w, moderate);  // [E, d]
  // x [T, d], sometimes the left block of a wider matrix (a strided view).
  const index_t pad = fdp.ConsumeBool() ? fdp.ConsumeIntegralInRange<index_t>(1, 5) : 0;
  const moe::Matrix<T> x_storage = matrix<T>(fdp, T_, d + pad, special_x, moderate);
  const bool wrong_width = fdp.ConsumeIntegralInRange<int>(0, 31) == 0 && pad > 0;
  const index_t x_cols = wrong_width ? d + 1 : d;
  if (wrong_width) valid = false;
  const moe::ConstMatrixRef<T> x = x_storage.leftCols(x_cols);

  moe::Vector<T> bias;
  const int bias_mode = fdp.ConsumeIntegralInRange<int>(0, 15);
  if (bias_mode >= 10) {
    const index_t n = bias_mode == 15 ? index_in(fdp, E, E) : E;
    bias.resize(std::max<index_t>(n, 0));
    bool bias_moderate = true;
    fill(fdp, bias.data(), bias.size(), special_b, bias_moderate);
    bool bias_valid = bias.size() == E;
    for (index_t e = 0; e < bias.size(); ++e) bias_valid = bias_valid && std::isfinite(bias[e]);
    valid = valid && bias_valid;
    moderate = moderate && bias_moderate;
  }

  const Groups g = groups(fdp, T_);
  const std::vector<std::int64_t> ids = token_ids(fdp, T_);
  const bool training = fdp.ConsumeBool();
  const std::uint64_t layer_id = fdp.ConsumeIntegralInRange<std::uint64_t>(0, 3);
  if (g.invalid) valid = false;
  if (T_ > 0 && training && o.jitter > 0 && ids.empty()) valid = false;
  const bool view_weight = fdp.ConsumeBool();

  {
    char text[512];
    std::snprintf(text, sizeof text,
                  "%s E=%td d=%td T=%td k=%td score=%d placement=%d normalize=%d scale=%g groups=%td/%td top=%td mask=%d "
                  "top_p=%g cf=%g fixed=%td priority=%d overflow=%d renorm=%d jitter=%g check_finite=%d bias=%td "
                  "route groups=%zu training=%d ids=%zu",
                  sizeof(T) == 4 ? "float" : "double", E, d, T_, o.k, int(o.score), int(o.softmax_placement), int(o.normalize),
                  o.scale, o.selected_groups, o.expert_groups, o.group_score_top, int(o.group_mask), o.top_p,
                  o.capacity_factor, o.fixed_capacity, int(o.capacity_priority), int(o.overflow),
                  int(o.renormalize_after_drop), o.jitter, int(o.check_finite), bias.size(), g.boundaries.size(),
                  int(training), ids.size());
    case_description() = text;
  }

  std::unique_ptr<moe::TopKRouter<T>> router;
  moe::RouterOutput<T> out;
  moe::RouteContext ctx;
  try {
    router = view_weight ? std::make_unique<moe::TopKRouter<T>>(moe::ConstMatrixMap<T>(w.data(), E, d), o)
                         : std::make_unique<moe::TopKRouter<T>>(w, o);
    if (bias.size() > 0 || bias_mode >= 10) router->set_selection_bias(bias);
    ctx = context(g, ids);
    ctx.training = training;
    ctx.layer_id = layer_id;
    router->route(x, ctx, out);
  } catch (const moe::invalid_argument&) {
    MOE_FUZZ_CHECK(!valid);
    return;
  } catch (const moe::numeric_error& e) {
    MOE_FUZZ_CHECK(valid && o.check_finite);
    // Moderate values throw only for a routing weight beyond T's range.
    const bool weight_beyond = std::strstr(e.what(), "routing weight is beyond") != nullptr;
    if (moderate) MOE_FUZZ_CHECK(weight_beyond);
    if (weight_beyond) {
      // It leaves an empty plan; routed again without the check, the named token's weight for the
      // named expert is infinite, and the reference finds that token's weights beyond T's range.
      MOE_FUZZ_CHECK(out.plan.num_tokens == 0 && out.plan.num_assignments() == 0 && out.plan.dropped.empty() &&
                     out.plan.rerouted.empty());
      std::ptrdiff_t token = -1, expert = -1;
      const char* named = std::strstr(e.what(), "token = ");
      MOE_FUZZ_CHECK(named != nullptr && std::sscanf(named, "token = %td, expert = %td", &token, &expert) == 2);
      MOE_FUZZ_CHECK(token >= 0 && token < T_ && expert >= 0 && expert < E);
      TopKOptions unchecked = o;
      unchecked.check_finite = false;
      moe::TopKRouter<T> lenient(w, unchecked);
      if (bias.size() > 0) lenient.set_selection_bias(bias);
      lenient.route(x, ctx, out);
      bool named_infinite = false;
      for (const Choice<T>& c : choices_of(out.plan, token)) named_infinite = named_infinite || (c.expert == expert && std::isinf(c.weight));
      MOE_FUZZ_CHECK(named_infinite);
      const std::vector<index_t> bounds = g.bounds(T_);
      const std::vector<char> beyond = check_against_reference(unchecked, bias, out, bounds, T_, E);
      if (moderate) MOE_FUZZ_CHECK(!beyond.empty());
      if (!beyond.empty()) MOE_FUZZ_CHECK(beyond[sz(token)]);
    }
    return;
  }
  MOE_FUZZ_CHECK(valid);

  // --- invariants ---------------------------------------------------------------------------
  const moe::Routing<T>& plan = out.plan;
  check_plan(plan, T_, E);
  MOE_FUZZ_CHECK(out.num_tokens() == T_ && out.num_experts() == E);
  const bool logits_finite = all_finite(out.logits());
  if (o.check_finite) MOE_FUZZ_CHECK(logits_finite);
  if (moderate) MOE_FUZZ_CHECK(logits_finite);
  std::vector<index_t> bounds = g.bounds(T_);

  if (logits_finite) {
    for (index_t t = 0; t < T_; ++t) {
      double sum = 0;
      for (index_t e = 0; e < E; ++e) {
        const T s = out.scores()(t, e);
        MOE_FUZZ_CHECK(s >= T(0) && s <= T(1));
        sum += static_cast<double>(s);
      }
      if (o.score == ScoreFunction::softmax) MOE_FUZZ_CHECK(std::fabs(sum - 1.0) <= 1e-4);
    }
  }

  // At most k experts per token; capacity per group and expert.
  for (index_t t = 0; t < T_; ++t) MOE_FUZZ_CHECK(plan.experts_of(t) <= o.k);
  if (!capped(o)) {
    MOE_FUZZ_CHECK(plan.dropped.empty() && plan.rerouted.empty());
    if (o.top_p == 0)
      for (index_t t = 0; t < T_; ++t) MOE_FUZZ_CHECK(plan.experts_of(t) == o.k);
  } else {
    for (std::size_t gi = 0; gi + 1 < bounds.size(); ++gi) {
      const double capacity = capacity_of(o, bounds[gi + 1] - bounds[gi], E);
      std::vector<double> load(sz(E), 0.0);
      for (index_t t = bounds[gi]; t < bounds[gi + 1]; ++t)
        for (const Choice<T>& c : choices_of(plan, t)) load[sz(c.expert)] += 1;
      for (const double l : load) MOE_FUZZ_CHECK(l <= capacity);
    }
    if (o.overflow == OverflowPolicy::drop) MOE_FUZZ_CHECK(plan.rerouted.empty());
  }

  const std::vector<char> beyond_range = check_against_reference(o, bias, out, bounds, T_, E);

  // Weights finite whenever the logits are finite, and within [0, |scale|] when the selection
  // follows the raw weights' order. A selection bias, or a zero group mask (a masked expert can
  // win at 0 over negative logits), can choose an expert whose raw weight is far below a rerouting
  // target's, and a rerouted weight keeps the chosen experts' denominator (routing/top_k.hpp).
  const T scale = static_cast<T>(o.scale);
  const bool selection_follows_raw = bias.size() == 0 && !(o.expert_groups > 1 && o.group_mask == GroupMask::zero);
  if (logits_finite && std::isfinite(scale)) {
    for (index_t t = 0; t < T_; ++t) {
      if (!o.check_finite && !beyond_range.empty() && beyond_range[sz(t)]) continue;  // documented inf
      for (const Choice<T>& c : choices_of(plan, t)) {
        MOE_FUZZ_CHECK(std::isfinite(c.weight));
        if (selection_follows_raw) {
          const double m = static_cast<double>(c.weight) * (std::signbit(scale) ? -1.0 : 1.0);
          MOE_FUZZ_CHECK(m >= 0 && m <= std::fabs(static_cast<double>(scale)) * (1 + 1e-5));
        }
      }
    }
    // Lost weights are bounded like the kept ones, except after renormalization, where they are
    // divided by the surviving raw weights only (Σ lost raw / Σ kept raw can be any size).
    for (std::size_t i = 0; i < plan.dropped.size() && !o.renormalize_after_drop; ++i) {
      if (beyond_range.empty() || !beyond_range[sz(plan.dropped[i])]) MOE_FUZZ_CHECK(std::isfinite(plan.dropped_weight[i]));
    }
  }

  // Determinism and reuse: a second router output, and the same output reused after a
  // different batch, give the same plan bit for bit.
  const moe::Routing<T> first = plan;
  moe::RouterOutput<T> again;
  router->route(x, ctx, again);
  MOE_FUZZ_CHECK(same_plan(first, again.plan));

  // Batch isolation: a routing group routed on its own gets the same choices and weights.
  if (bounds.size() > 2) {
    const auto gi = fdp.ConsumeIntegralInRange<std::size_t>(0, bounds.size() - 2);
    const index_t begin = bounds[gi], n = bounds[gi + 1] - begin;
    std::vector<std::int64_t> sub_ids;
    if (!ids.empty()) sub_ids.assign(ids.begin() + begin, ids.begin() + begin + n);
    moe::RouteContext sub_ctx;
    sub_ctx.token_ids = sub_ids.empty() ? nullptr : sub_ids.data();
    sub_ctx.training = training;
    sub_ctx.layer_id = layer_id;
    router->route(x.middleRows(begin, n), sub_ctx, out);  // reuses `out`
    const moe::Routing<T>& sub = out.plan;
    check_plan(sub, n, E);
    for (index_t i = 0; i < n; ++i) {
      const auto a = choices_of(sub, i), b = choices_of(first, begin + i);
      MOE_FUZZ_CHECK(a.size() == b.size());
      for (std::size_t j = 0; j < a.size(); ++j) MOE_FUZZ_CHECK(a[j].expert == b[j].expert && same_value(a[j].weight, b[j].weight));
    }
    std::vector<index_t> dropped_in_group;
    for (const index_t t : first.dropped)
      if (t >= begin && t < begin + n) dropped_in_group.push_back(t - begin);
    MOE_FUZZ_CHECK(dropped_in_group == sub.dropped);
    router->route(x, ctx, out);  // and back to the full batch
    MOE_FUZZ_CHECK(same_plan(first, out.plan));
  }
}

}  // namespace

MOE_FUZZ_FLOAT_AND_DOUBLE(run)
