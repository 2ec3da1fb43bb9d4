// HashRouter: random hash against a plain reimplementation of the documented formula, purity
// (a token's experts depend only on its id), tables, the balanced table builder against a plain
// reference, errors, and the MoE layer against a per-token double reference.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <vector>

#include <catch2/catch.hpp>
#include <moe/moe.hpp>

#include "../support/reference.hpp"

// (A namespace of its own: this file may share a translation unit with other test files.)
namespace hash_test {

namespace {

using moe::index_t;
template <class T>
using Mat = moe::Matrix<T>;

using moe_test::at;
using moe_test::normal_matrix;

// SplitMix64 (Steele, Lea, Flood 2014): state += golden gamma, then the output mix.
std::uint64_t ref_splitmix64(std::uint64_t state) {
  const std::uint64_t golden = 0x9E3779B97F4A7C15ULL;
  std::uint64_t z = state + golden;
  z ^= z >> 30;
  z *= 0xBF58476D1CE4E5B9ULL;
  z ^= z >> 27;
  z *= 0x94D049BB133111EBULL;
  z ^= z >> 31;
  return z;
}

// The documented hash: expert j is the r_j-th unused expert, r_j = key_j mod (E − j).
std::vector<index_t> ref_hash_experts(std::int64_t id, std::uint64_t seed, index_t k, index_t E) {
  std::vector<index_t> unused(static_cast<std::size_t>(E));
  std::iota(unused.begin(), unused.end(), index_t(0));
  std::vector<index_t> experts;
  for (index_t j = 0; j < k; ++j) {
    const std::uint64_t key =
        ref_splitmix64(ref_splitmix64(ref_splitmix64(static_cast<std::uint64_t>(id)) ^ seed) ^ static_cast<std::uint64_t>(j));
    const auto r = static_cast<std::size_t>(key % static_cast<std::uint64_t>(E - j));
    experts.push_back(unused[r]);
    unused.erase(unused.begin() + static_cast<std::ptrdiff_t>(r));
  }
  return experts;
}

// The balanced table, plainly: ids by decreasing frequency (stable: lower id first on ties), each
// into the first bucket of least load found by a linear scan.
std::vector<index_t> ref_balanced_table(const std::vector<double>& freq, index_t E) {
  std::vector<std::size_t> ids(freq.size());
  std::iota(ids.begin(), ids.end(), std::size_t(0));
  // Insertion sort: move an id left past every id of strictly smaller frequency.
  for (std::size_t i = 1; i < ids.size(); ++i) {
    for (std::size_t j = i; j > 0 && freq[ids[j - 1]] < freq[ids[j]]; --j) std::swap(ids[j - 1], ids[j]);
  }
  std::vector<double> load(static_cast<std::size_t>(E), 0.0);
  std::vector<index_t> table(freq.size());
  for (const std::size_t id : ids) {
    std::size_t best = 0;
    for (std::size_t e = 1; e < load.size(); ++e) {
      if (load[e] < load[best]) best = e;
    }
    table[id] = static_cast<index_t>(best);
    load[best] += freq[id];
  }
  return table;
}

// Structural invariants of a hash plan: k assignments per token in hash order (`expected`),
// weight 1/k, tokens ascending inside each expert; scores hold the weights, logits are zero.
template <class T>
void check_hash_output(const moe::RouterOutput<T>& out, const std::vector<std::vector<index_t>>& expected, index_t E) {
  const auto& plan = out.plan;
  const auto T_ = static_cast<index_t>(expected.size());
  REQUIRE(plan.num_tokens == T_);
  REQUIRE(plan.num_experts == E);
  REQUIRE(plan.token_begin.size() == static_cast<std::size_t>(T_ + 1));
  REQUIRE(plan.expert_begin.size() == static_cast<std::size_t>(E + 1));
  REQUIRE(plan.dropped.empty());
  std::vector<int> seen(static_cast<std::size_t>(plan.num_assignments()), 0);
  for (index_t e = 0; e < E; ++e) {
    for (index_t a = plan.expert_begin[e] + 1; a < plan.expert_begin[e + 1]; ++a) REQUIRE(plan.token[a - 1] < plan.token[a]);
  }
  REQUIRE(out.logits().rows() == T_);
  REQUIRE(out.scores().rows() == T_);
  for (index_t t = 0; t < T_; ++t) {
    const auto& want = at(expected, t);
    const auto k = static_cast<index_t>(want.size());
    const T w = T(1) / static_cast<T>(k);
    REQUIRE(plan.experts_of(t) == k);
    for (index_t j = 0; j < k; ++j) {
      const index_t a = plan.assignment[plan.token_begin[t] + j];
      ++at(seen, a);
      REQUIRE(plan.token[a] == t);
      REQUIRE(plan.expert_of_assignment(a) == at(want, j));
      REQUIRE(plan.weight[a] == w);
    }
    for (index_t e = 0; e < E; ++e) {
      const bool chosen = std::count(want.begin(), want.end(), e) > 0;
      REQUIRE(out.scores()(t, e) == (chosen ? w : T(0)));
      REQUIRE(out.logits()(t, e) == T(0));
    }
  }
  for (const int count : seen) REQUIRE(count == 1);
}

moe::RouteContext ids_context(const std::vector<std::int64_t>& ids) {
  moe::RouteContext ctx;
  ctx.token_ids = ids.data();
  return ctx;
}

std::vector<std::int64_t> random_ids(std::mt19937_64& rng, index_t n) {
  std::vector<std::int64_t> ids(static_cast<std::size_t>(n));
  for (auto& id : ids) {
    switch (rng() % 3) {
      case 0: id = static_cast<std::int64_t>(rng() % 64); break;  // small ids repeat
      case 1: id = static_cast<std::int64_t>(rng()); break;        // any 64-bit id, negatives too
      default: id = static_cast<std::int64_t>(rng() % 50000); break;
    }
  }
  return ids;
}

}  // namespace

TEMPLATE_TEST_CASE("HashRouter random hash follows the documented formula", "[routing][hash]", float, double) {
  using T = TestType;
  std::mt19937_64 rng(1234);
  const index_t expert_counts[] = {1, 2, 3, 8, 16, 64};
  moe::RouterOutput<T> out;
  for (const index_t E : expert_counts) {
    for (const index_t k : {index_t(1), index_t(2), index_t(3), E}) {
      if (k > E) continue;
      for (const std::uint64_t seed : {std::uint64_t(0), std::uint64_t(42), ~std::uint64_t(0)}) {
        const index_t T_ = static_cast<index_t>(rng() % 50);
        const index_t d = 1 + static_cast<index_t>(rng() % 9);
        INFO("E = " << E << ", k = " << k << ", seed = " << seed << ", T = " << T_ << ", d = " << d);
        const moe::HashRouter<T> router(E, d, {k, seed});
        REQUIRE(router.num_experts() == E);
        REQUIRE(router.d_model() == d);
        const auto ids = random_ids(rng, T_);
        const Mat<T> x(T_, d);
        router.route(x, ids_context(ids), out);
        std::vector<std::vector<index_t>> expected;
        for (const std::int64_t id : ids) {
          expected.push_back(ref_hash_experts(id, seed, k, E));
          // Distinct experts, and k = E takes every expert.
          auto sorted = expected.back();
          std::sort(sorted.begin(), sorted.end());
          REQUIRE(std::adjacent_find(sorted.begin(), sorted.end()) == sorted.end());
          if (k == E) {
            for (index_t e = 0; e < E; ++e) REQUIRE(at(sorted, e) == e);
          }
        }
        check_hash_output(out, expected, E);
      }
    }
  }
}

TEST_CASE("HashRouter is a pure function of the token id", "[routing][hash]") {
  using T = float;
  std::mt19937_64 rng(77);
  const index_t E = 12;
  for (const index_t k : {index_t(1), index_t(4)}) {
    const moe::HashRouter<T> router(E, 6, {k, 9});
    const auto ids = random_ids(rng, 40);
    moe::RouterOutput<T> first;
    router.route(Mat<T>::Zero(40, 6), ids_context(ids), first);
    // The same ids at other positions, among other ids, in batches of other sizes and groups.
    for (int trial = 0; trial < 10; ++trial) {
      std::vector<std::int64_t> mixed = random_ids(rng, static_cast<index_t>(rng() % 30));
      mixed.insert(mixed.end(), ids.begin(), ids.end());
      std::shuffle(mixed.begin(), mixed.end(), rng);
      const auto T_ = static_cast<index_t>(mixed.size());
      const std::vector<index_t> bounds{0, T_ / 3, T_};
      moe::RouteContext ctx = moe::RouteContext::with_groups(bounds);
      ctx.token_ids = mixed.data();
      ctx.layer_id = static_cast<std::uint64_t>(trial);
      moe::RouterOutput<T> out;
      router.route(Mat<T>(0, 6), out);  // an empty batch first
      router.route(Mat<T>::Ones(T_, 6), ctx, out);
      for (index_t t = 0; t < T_; ++t) {
        const auto where = std::find(ids.begin(), ids.end(), mixed[static_cast<std::size_t>(t)]);
        if (where == ids.end()) continue;
        const index_t u = where - ids.begin();
        REQUIRE(out.plan.experts_of(t) == k);
        for (index_t j = 0; j < k; ++j) {
          const index_t a = out.plan.assignment[out.plan.token_begin[t] + j];
          const index_t b = at(first.plan.assignment, at(first.plan.token_begin, u) + j);
          REQUIRE(out.plan.expert_of_assignment(a) == first.plan.expert_of_assignment(b));
          REQUIRE(out.plan.weight[a] == at(first.plan.weight, b));
        }
      }
    }
  }
}

TEST_CASE("HashRouter random hash spreads ids evenly and depends on the seed", "[routing][hash]") {
  using T = float;
  const index_t E = 8;
  const index_t V = 16000;
  std::vector<std::int64_t> ids(static_cast<std::size_t>(V));
  std::iota(ids.begin(), ids.end(), std::int64_t(0));
  const Mat<T> x(V, 1);
  moe::RouterOutput<T> a;
  moe::RouterOutput<T> b;
  moe::HashRouter<T>(E, 1, {1, 1}).route(x, ids_context(ids), a);
  moe::HashRouter<T>(E, 1, {1, 2}).route(x, ids_context(ids), b);
  // Consecutive ids land in every bucket about equally (expected 2000 each, sd about 42).
  for (index_t e = 0; e < E; ++e) {
    REQUIRE(a.plan.tokens_of(e) > 1700);
    REQUIRE(a.plan.tokens_of(e) < 2300);
  }
  // Another seed is another function: about 7/8 of the ids move.
  index_t moved = 0;
  for (index_t t = 0; t < V; ++t) {
    moved += a.plan.expert_of_assignment(at(a.plan.assignment, t)) != b.plan.expert_of_assignment(at(b.plan.assignment, t)) ? 1 : 0;
  }
  REQUIRE(moved > V / 2);
}

TEMPLATE_TEST_CASE("HashRouter tables", "[routing][hash]", float, double) {
  using T = TestType;
  std::mt19937_64 rng(5);
  const index_t E = 5;
  const index_t V = 37;
  std::vector<index_t> table(static_cast<std::size_t>(V));
  for (auto& e : table) e = static_cast<index_t>(rng() % static_cast<std::uint64_t>(E));
  const auto router = moe::HashRouter<T>::with_table(E, 3, table);
  REQUIRE(router.k() == 1);
  REQUIRE(router.table() == table);
  moe::RouterOutput<T> out;

  std::vector<std::int64_t> ids(60);
  for (auto& id : ids) id = static_cast<std::int64_t>(rng() % static_cast<std::uint64_t>(V));
  ids.front() = 0;
  ids.back() = V - 1;
  router.route(Mat<T>(60, 3), ids_context(ids), out);
  std::vector<std::vector<index_t>> expected;
  for (const std::int64_t id : ids) expected.push_back({table[static_cast<std::size_t>(id)]});
  check_hash_output(out, expected, E);

  SECTION("ids outside the table") {
    for (const std::int64_t bad : {std::int64_t(-1), std::int64_t(V), std::numeric_limits<std::int64_t>::max()}) {
      std::vector<std::int64_t> with_bad{0, 1, bad, 2};
      REQUIRE_THROWS_AS(router.route(Mat<T>(4, 3), ids_context(with_bad), out), moe::invalid_argument);
      REQUIRE_THROWS_WITH(router.route(Mat<T>(4, 3), ids_context(with_bad), out),
                          Catch::Contains("token_ids[2] = " + std::to_string(bad)) && Catch::Contains("table size = 37"));
      std::vector<index_t> experts(1);
      REQUIRE_THROWS_WITH(router.experts_of(bad, experts.data()), Catch::Contains("HashRouter::experts_of: token id is outside the table (token id = " +
                                                                                  std::to_string(bad) + ", table size = 37)"));
    }
  }

  SECTION("table entries outside [0, E) and an empty table") {
    std::vector<index_t> bad_table = table;
    bad_table[2] = E;
    REQUIRE_THROWS_AS(moe::HashRouter<T>::with_table(E, 3, bad_table), moe::invalid_argument);
    REQUIRE_THROWS_WITH(moe::HashRouter<T>::with_table(E, 3, bad_table), Catch::Contains("table[2] = 5") && Catch::Contains("num_experts = 5"));
    bad_table[2] = -3;
    REQUIRE_THROWS_WITH(moe::HashRouter<T>::with_table(E, 3, bad_table), Catch::Contains("table[2] = -3"));
    REQUIRE_THROWS_WITH(moe::HashRouter<T>::with_table(E, 3, std::vector<index_t>{}), Catch::Contains("table size = 0"));
  }
}

TEST_CASE("HashRouter::balanced_table matches a plain greedy reference and balances the load", "[routing][hash]") {
  std::mt19937_64 rng(31);
  for (const index_t E : {1, 2, 3, 8, 13}) {
    for (const std::size_t V : {std::size_t(0), std::size_t(1), std::size_t(5), std::size_t(37), std::size_t(500)}) {
      for (const bool integer_counts : {true, false}) {
        std::vector<double> freq(V);
        for (auto& f : freq) {
          // Small integer counts make many equal frequencies and equal loads (the tie rules).
          f = integer_counts ? static_cast<double>(rng() % 6) : std::ldexp(static_cast<double>(rng() >> 11), -53) * 100.0;
        }
        INFO("E = " << E << ", V = " << V << ", integer counts = " << integer_counts);
        const auto table = moe::HashRouter<float>::balanced_table(freq, E);
        REQUIRE(table == ref_balanced_table(freq, E));
        std::vector<double> load(static_cast<std::size_t>(E), 0.0);
        for (std::size_t i = 0; i < V; ++i) load[static_cast<std::size_t>(table[i])] += freq[i];
        const double max_freq = V == 0 ? 0.0 : *std::max_element(freq.begin(), freq.end());
        const auto [lightest, heaviest] = std::minmax_element(load.begin(), load.end());
        REQUIRE(*heaviest <= *lightest + max_freq);
        if (V > 0) {
          const auto router = moe::HashRouter<float>::balanced(freq, E, 2);
          REQUIRE(router.table() == table);
        }
      }
    }
  }
}

TEST_CASE("HashRouter errors name the parameter and the values", "[routing][hash]") {
  using T = float;
  REQUIRE_THROWS_AS(moe::HashRouter<T>(4, 3, moe::HashOptions{0, 1}), moe::invalid_argument);
  REQUIRE_THROWS_WITH(moe::HashRouter<T>(4, 3, moe::HashOptions{0, 1}), Catch::Contains("k = 0") && Catch::Contains("num_experts = 4"));
  REQUIRE_THROWS_WITH(moe::HashRouter<T>(4, 3, moe::HashOptions{5, 1}), Catch::Contains("k = 5") && Catch::Contains("num_experts = 4"));
  REQUIRE_THROWS_WITH(moe::HashRouter<T>(0, 3, moe::HashOptions{1, 1}), Catch::Contains("num_experts = 0"));
  REQUIRE_THROWS_WITH(moe::HashRouter<T>(2, -1, moe::HashOptions{1, 1}), Catch::Contains("d_model = -1"));
  REQUIRE_THROWS_AS(moe::HashRouter<T>::balanced_table({1.0, -1.0}, 2), moe::invalid_argument);
  REQUIRE_THROWS_WITH(moe::HashRouter<T>::balanced_table({1.0, 2.0, 0.0, -1.0}, 2), Catch::Contains("frequencies[3] = -1"));
  REQUIRE_THROWS_WITH(moe::HashRouter<T>::balanced_table({std::numeric_limits<double>::quiet_NaN()}, 2),
                      Catch::Contains("frequencies[0] = nan"));
  REQUIRE_THROWS_WITH(moe::HashRouter<T>::balanced_table({1.0}, 0), Catch::Contains("num_experts = 0"));
  REQUIRE_THROWS_WITH(moe::HashRouter<T>::balanced({}, 2, 3), Catch::Contains("HashRouter::balanced: frequencies must not be empty"));

  const moe::HashRouter<T> router(4, 3, {2, 7});
  moe::RouterOutput<T> out;
  const Mat<T> x(3, 3);
  REQUIRE_THROWS_AS(router.route(x, out), moe::invalid_argument);
  REQUIRE_THROWS_WITH(router.route(x, out), Catch::Contains("token_ids must not be null") && Catch::Contains("tokens = 3"));
  REQUIRE_THROWS_WITH(router.route(x, moe::RouteContext{}, out), Catch::Contains("token_ids"));
  // An empty batch needs no ids.
  router.route(Mat<T>(0, 3), out);
  REQUIRE(out.plan.num_assignments() == 0);
  REQUIRE(out.plan.token_begin.size() == 1);

  const std::vector<std::int64_t> ids{1, 2, 3};
  REQUIRE_THROWS_WITH(router.route(Mat<T>(3, 4), ids_context(ids), out), Catch::Contains("x.cols() = 4") && Catch::Contains("d_model = 3"));
  const std::vector<index_t> bounds{0, 2};
  moe::RouteContext ctx = moe::RouteContext::with_groups(bounds);
  ctx.token_ids = ids.data();
  REQUIRE_THROWS_WITH(router.route(x, ctx, out), Catch::Contains("HashRouter::route") && Catch::Contains("tokens = 3"));
}

TEMPLATE_TEST_CASE("MoELayer with HashRouter matches a per-token double reference", "[routing][hash][layer]", float, double) {
  using T = TestType;
  std::mt19937 rng(17);
  std::mt19937_64 id_rng(18);
  struct Shape {
    index_t E, k, d, ff, T;
  };
  const Shape shapes[] = {{1, 1, 5, 3, 6}, {4, 2, 9, 7, 40}, {3, 3, 8, 4, 11}, {8, 1, 17, 6, 1}, {5, 2, 4, 5, 0}};
  for (const Shape& s : shapes) {
    INFO("E = " << s.E << ", k = " << s.k << ", d = " << s.d << ", T = " << s.T);
    std::vector<moe::SwiGLU<T>> experts;
    for (index_t e = 0; e < s.E; ++e) {
      experts.emplace_back(normal_matrix<T>(rng, s.ff, s.d, 0.5), normal_matrix<T>(rng, s.ff, s.d, 0.5),
                           normal_matrix<T>(rng, s.d, s.ff, 0.5));
    }
    const moe::HashRouter<T> router(s.E, s.d, {s.k, 3});
    const moe::MoELayer<moe::HashRouter<T>, moe::SwiGLU<T>> layer(router, experts);
    const Mat<T> x = normal_matrix<T>(rng, s.T, s.d);
    const auto ids = random_ids(id_rng, s.T);
    moe::Workspace<T> ws;
    Mat<T> y(s.T, s.d);
    layer.forward(x, ids_context(ids), y, ws);
    for (index_t t = 0; t < s.T; ++t) {
      std::vector<double> expected(static_cast<std::size_t>(s.d), 0.0);
      for (const index_t e : ref_hash_experts(ids[static_cast<std::size_t>(t)], 3, s.k, s.E)) {
        const auto out_e = moe_test::swiglu_row(at(layer.experts(), e), &x(t, 0));
        for (index_t i = 0; i < s.d; ++i) at(expected, i) += at(out_e, i) / static_cast<double>(s.k);
      }
      const double tol = std::is_same<T, float>::value ? 1e-5 : 1e-13;
      for (index_t i = 0; i < s.d; ++i) REQUIRE(std::abs(static_cast<double>(y(t, i)) - at(expected, i)) <= tol * (1.0 + std::abs(at(expected, i))));
    }
  }
}

TEST_CASE("MoELayer backward through HashRouter matches central differences", "[routing][hash][gradient]") {
  using T = double;
  std::mt19937 rng(505);
  std::mt19937_64 id_rng(506);
  const index_t E = 4;
  const index_t d = 5;
  const index_t ff = 3;
  const index_t T_ = 7;
  std::vector<moe::SwiGLU<T>> experts;
  for (index_t e = 0; e < E; ++e) {
    experts.emplace_back(normal_matrix<T>(rng, ff, d, 0.5), normal_matrix<T>(rng, ff, d, 0.5), normal_matrix<T>(rng, d, ff, 0.5));
  }
  const moe::MoELayer<moe::HashRouter<T>, moe::SwiGLU<T>> layer(moe::HashRouter<T>(E, d, {2, 11}), experts);
  const Mat<T> x = normal_matrix<T>(rng, T_, d);
  const Mat<T> r = normal_matrix<T>(rng, T_, d);  // L = Σ r ⊙ y
  const auto ids = random_ids(id_rng, T_);
  moe::TrainingWorkspace<T> tws;
  Mat<T> y(T_, d);
  layer.forward_train(x, ids_context(ids), y, tws);
  Mat<T> dx(T_, d);
  auto grads = layer.make_gradients();
  layer.backward(x, r, dx, grads, tws);
  // No parameters: the router's gradient stays zero.
  REQUIRE(grads.router.rows() == E);
  REQUIRE(grads.router.cols() == d);
  for (index_t i = 0; i < grads.router.size(); ++i) REQUIRE(grads.router.data()[i] == 0.0);
  const auto loss = [&](const Mat<T>& xx) {
    moe::Workspace<T> ws;
    Mat<T> yy(T_, d);
    layer.forward(xx, ids_context(ids), yy, ws);
    return yy.cwiseProduct(r).sum();
  };
  const double h = 1e-5;
  for (index_t t = 0; t < T_; ++t) {
    for (index_t i = 0; i < d; ++i) {
      Mat<T> xp = x;
      Mat<T> xm = x;
      xp(t, i) += h;
      xm(t, i) -= h;
      const double fd = (loss(xp) - loss(xm)) / (2 * h);
      REQUIRE(std::abs(fd - dx(t, i)) <= 1e-6 * (1.0 + std::abs(fd)));
    }
  }
}

}  // namespace hash_test
