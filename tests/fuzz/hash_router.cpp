// libFuzzer target: HashRouter (routing/hash.hpp) — the seeded random hash, a user table and the
// balanced table — with random shapes, k, seeds, token ids (negative, extreme, outside the table),
// frequencies (including NaN, ±Inf and negative), routing groups and missing ids.
//
// Checked: moe::invalid_argument exactly when an argument is outside its documented range; the
// plan's structure; k distinct experts per token (1 with a table) with weight 1/k, in hash order,
// equal to an independent implementation of the documented hash (partial Fisher–Yates over
// SplitMix64 keys) or to the table; expert 0 the same for every k; logits zero and scores the
// routing weights; the balanced table equal to the documented greedy assignment, its loads within
// the largest frequency of each other.
#include <cmath>
#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include <moe/routing/hash.hpp>

#include "fuzz_common.hpp"

namespace {

using namespace moe_fuzz;

// The documented key: m(m(m(id) ^ seed) ^ j), m the SplitMix64 step.
std::uint64_t splitmix(std::uint64_t z) {
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
std::uint64_t key(std::int64_t id, std::uint64_t seed, std::uint64_t j) {
  return splitmix(splitmix(splitmix(static_cast<std::uint64_t>(id)) ^ seed) ^ j);
}

// Hash j picks the r_j-th (ascending) expert not chosen yet, r_j = key mod (E − j).
std::vector<index_t> documented_experts(std::int64_t id, std::uint64_t seed, index_t E, index_t k) {
  std::vector<index_t> unused(sz(E));
  for (index_t e = 0; e < E; ++e) unused[sz(e)] = e;
  std::vector<index_t> out;
  for (index_t j = 0; j < k; ++j) {
    const auto r = key(id, seed, static_cast<std::uint64_t>(j)) % static_cast<std::uint64_t>(E - j);
    out.push_back(unused[r]);
    unused.erase(unused.begin() + static_cast<std::ptrdiff_t>(r));
  }
  return out;
}

// Ids by decreasing frequency (ties: lower id), each into the lightest bucket (ties: lower expert).
std::vector<index_t> documented_balanced(const std::vector<double>& freq, index_t E) {
  std::vector<std::size_t> order(freq.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(), [&](std::size_t a, std::size_t b) { return freq[a] > freq[b]; });
  std::vector<double> load(sz(E), 0.0);
  std::vector<index_t> table(freq.size());
  for (const std::size_t id : order) {
    index_t best = 0;
    for (index_t e = 1; e < E; ++e)
      if (load[sz(e)] < load[sz(best)]) best = e;
    table[id] = best;
    load[sz(best)] += freq[id];
  }
  return table;
}

template <class T>
void run(FuzzedDataProvider& fdp) {
  const int kind = fdp.ConsumeIntegralInRange<int>(0, 2);  // 0: random hash, 1: table, 2: balanced
  const index_t E = fdp.ConsumeIntegralInRange<int>(0, 31) == 0 ? fdp.ConsumeIntegralInRange<index_t>(-1, 0)
                                                                  : size_in(fdp, 1, 32);
  const index_t d = fdp.ConsumeIntegralInRange<int>(0, 31) == 0 ? index_t(-1) : size_in(fdp, 0, 48);
  const index_t T_ = size_in(fdp, 0, 64);
  moe::HashOptions o;
  o.k = index_in(fdp, 1, std::max<index_t>(E, 1));
  o.seed = fdp.ConsumeIntegral<std::uint64_t>();
  bool valid = E >= 1 && d >= 1;

  std::vector<index_t> table;
  std::vector<double> freq;
  if (kind == 0) {
    valid = valid && o.k >= 1 && o.k <= E;
  } else if (kind == 1) {
    const index_t V = fdp.ConsumeIntegralInRange<index_t>(0, 64);
    for (index_t i = 0; i < V; ++i) table.push_back(index_in(fdp, 0, std::max<index_t>(E - 1, 0)));
    valid = valid && !table.empty();
    for (const index_t e : table) valid = valid && e >= 0 && e < E;
  } else {
    const index_t V = fdp.ConsumeIntegralInRange<index_t>(0, 64);
    const bool special = fdp.ConsumeIntegralInRange<int>(0, 3) == 0;
    for (index_t i = 0; i < V; ++i) {
      const auto b = fdp.ConsumeIntegral<std::uint8_t>();
      freq.push_back(special && b >= 0xF0 ? static_cast<double>(special_value<double>(b)) : static_cast<double>(b % 32));
    }
    valid = valid && !freq.empty();  // the table must not be empty
    for (const double f : freq) valid = valid && std::isfinite(f) && f >= 0;
  }

  const index_t V = kind == 0 ? 0 : static_cast<index_t>(kind == 1 ? table.size() : freq.size());
  // Token ids: near the table (inside and just outside it), or anything for the random hash.
  std::vector<std::int64_t> ids = token_ids(fdp, T_);
  if (kind != 0 && !ids.empty() && fdp.ConsumeBool())
    for (auto& id : ids) id = fdp.ConsumeIntegralInRange<std::int64_t>(-1, V);
  const index_t pad = fdp.ConsumeBool() ? 2 : 0;
  bool moderate = true;
  const moe::Matrix<T> x_storage = matrix<T>(fdp, T_, std::max<index_t>(d, 0) + pad, true, moderate);
  const bool wrong_width = pad > 0 && fdp.ConsumeIntegralInRange<int>(0, 15) == 0;
  const Groups g = groups(fdp, T_);
  {
    char text[200];
    std::snprintf(text, sizeof text, "%s kind=%d E=%td d=%td T=%td k=%td seed=%llu V=%td ids=%zu groups=%zu",
                  sizeof(T) == 4 ? "float" : "double", kind, E, d, T_, o.k, static_cast<unsigned long long>(o.seed), V,
                  ids.size(), g.boundaries.size());
    case_description() = text;
  }

  // The route's own checks come after construction.
  std::optional<moe::HashRouter<T>> router;
  bool constructed = false;
  try {
    if (kind == 0) router.emplace(E, d, o);
    else if (kind == 1) router.emplace(moe::HashRouter<T>::with_table(E, d, table));
    else router.emplace(moe::HashRouter<T>::balanced(freq, E, d));
    constructed = true;
  } catch (const moe::invalid_argument&) {
  }
  MOE_FUZZ_CHECK(constructed == valid);
  if (!constructed) return;

  const index_t k = kind == 0 ? o.k : 1;
  MOE_FUZZ_CHECK(router->num_experts() == E && router->d_model() == d);
  if (kind == 2) {
    MOE_FUZZ_CHECK(router->table() == documented_balanced(freq, E));
    // The loads differ by at most the largest frequency.
    std::vector<double> load(sz(E), 0.0);
    double largest = 0, total = 0;
    for (std::size_t i = 0; i < freq.size(); ++i) load[sz(router->table()[i])] += freq[i], largest = std::max(largest, freq[i]), total += freq[i];
    if (std::isfinite(total)) {
      const auto [lo, hi] = std::minmax_element(load.begin(), load.end());
      MOE_FUZZ_CHECK(*hi - *lo <= largest * (1 + 1e-12));
    }
  }

  const index_t x_cols = wrong_width ? d + 1 : d;
  const moe::ConstMatrixRef<T> x = x_storage.leftCols(x_cols);
  bool route_valid = !wrong_width && !g.invalid && (T_ == 0 || !ids.empty());
  if (kind != 0 && !ids.empty())
    for (const std::int64_t id : ids) route_valid = route_valid && id >= 0 && id < V;
  moe::RouterOutput<T> out;
  moe::RouteContext ctx;
  try {
    ctx = context(g, ids);
    ctx.layer_id = fdp.ConsumeIntegral<std::uint64_t>();  // must not matter
    router->route(x, ctx, out);
  } catch (const moe::invalid_argument&) {
    MOE_FUZZ_CHECK(!route_valid);
    return;
  }
  MOE_FUZZ_CHECK(route_valid);

  const moe::Routing<T>& plan = out.plan;
  check_plan(plan, T_, E);
  MOE_FUZZ_CHECK(plan.dropped.empty() && plan.rerouted.empty());
  const T w = T(1) / static_cast<T>(k);
  std::vector<index_t> experts(sz(k));
  for (index_t t = 0; t < T_; ++t) {
    const std::vector<Choice<T>> c = choices_of(plan, t);
    MOE_FUZZ_CHECK(static_cast<index_t>(c.size()) == k);
    const std::int64_t id = ids[sz(t)];
    router->experts_of(id, experts.data());
    const std::vector<index_t> expected = kind == 0 ? documented_experts(id, o.seed, E, k)
                                                    : std::vector<index_t>{router->table()[static_cast<std::size_t>(id)]};
    MOE_FUZZ_CHECK(experts == expected);
    for (index_t j = 0; j < k; ++j) {
      MOE_FUZZ_CHECK(c[sz(j)].expert == expected[sz(j)]);
      MOE_FUZZ_CHECK(same_value(c[sz(j)].weight, w));
    }
    for (index_t e = 0; e < E; ++e) {
      MOE_FUZZ_CHECK(out.logits()(t, e) == T(0));
      const bool chosen = std::find(expected.begin(), expected.end(), e) != expected.end();
      MOE_FUZZ_CHECK(out.scores()(t, e) == (chosen ? w : T(0)));
    }
    if (kind == 0 && k > 1) {  // expert 0 of a token is the same for every k
      const moe::HashRouter<T> single(E, d, moe::HashOptions{1, o.seed});
      index_t first = -1;
      single.experts_of(id, &first);
      MOE_FUZZ_CHECK(first == expected[0]);
    }
  }
  // Reusing the output for a prefix of the batch, then the whole batch again.
  const moe::Routing<T> saved = plan;
  if (T_ > 0) {
    const index_t n = fdp.ConsumeIntegralInRange<index_t>(0, T_);
    moe::RouteContext prefix;
    prefix.token_ids = ids.data();
    router->route(x.topRows(n), prefix, out);
    check_plan(out.plan, n, E);
    router->route(x, ctx, out);
    MOE_FUZZ_CHECK(same_plan(saved, out.plan));
  }
}

}  // namespace

MOE_FUZZ_FLOAT_AND_DOUBLE(run)
