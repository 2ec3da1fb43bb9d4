#pragma once
// Hash routing (Roller et al. 2021, "Hash Layers For Large Sparse Models"): no parameters, no
// loss; a token's experts are a fixed function of its vocabulary id (RouteContext::token_ids),
// never of its activations, its position or its neighbours.
//
// Three kinds of hash:
//  - random (HashOptions{k, seed}): k distinct experts from seeded 64-bit mixes of the id.
//    Hash j is r_j = hash_key(id, seed, j) mod (E − j), and the j-th expert is the r_j-th
//    (counting from 0, ascending) of the experts not yet chosen: a partial Fisher–Yates draw, so
//    the k experts are distinct without rejection loops, and expert 0 of a token is the same
//    for every k (r_0 = hash_key(id, seed, 0) mod E).
//      hash_key(id, seed, j) = mix64(id, seed, j) = m(m(m(id) ^ seed) ^ j)
//    with m the SplitMix64 step of core/random.hpp (state += 0x9E3779B97F4A7C15, then the
//    finalizer) and id taken as its two's-complement uint64. RouteContext::layer_id is not
//    mixed in: the function is fixed by the router alone (give each layer its own seed).
//  - a table vocab id -> expert (HashRouter::with_table, k = 1), e.g. a clustering of the vocabulary;
//  - a balanced table built from token frequencies (HashRouter::balanced, balanced_table): ids in order of
//    decreasing frequency (equal frequencies: lower id first), each into the bucket with the
//    smallest load so far (equal loads: lower expert index). The loads then differ by at most the
//    largest frequency. Ids of frequency 0 all land in one bucket; pass counts + 1 to spread ids
//    never seen in the corpus.
//
// Weights: 1 for k = 1 (as in the paper); 1/k for each of the k experts when k > 1, so the
// output stays on the scale of a single expert's. A token's assignments are in hash order
// (hash j = 0 first). The router has no logits: RouterOutput::logits() is all zeros and
// scores() holds the routing weights (1/k at the chosen experts, 0 elsewhere).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <numeric>
#include <queue>
#include <utility>
#include <vector>

#include "../core/error.hpp"
#include "../core/fingerprint.hpp"
#include "../core/random.hpp"
#include "../core/types.hpp"
#include "../simd/arch.hpp"
#include "context.hpp"
#include "router_output.hpp"
#include "routing.hpp"

MOE_NAMESPACE_BEGIN

// The 64-bit key of hash j of token `id` under `seed` (see the header comment).
inline constexpr std::uint64_t hash_key(std::int64_t id, std::uint64_t seed, std::uint64_t j) noexcept {
  return mix64(static_cast<std::uint64_t>(id), seed, j);
}

struct HashOptions {
  index_t k = 1;           // experts per token, 1 <= k <= num_experts
  std::uint64_t seed = 0;  // selects the hash function (use a different seed per layer)
};

template <class T>
class HashRouter {
 public:
  using Scalar = T;

  // Random hash: k distinct experts per token from seeded mixes of its id. `d_model` is the
  // width of the activations the layer passes in (the router reads only their shape).
  HashRouter(index_t num_experts, index_t d_model, HashOptions options = {})
      : num_experts_(num_experts), d_model_(d_model), options_(options) {
    check_shape("HashRouter");
    if (options_.k < 1 || options_.k > num_experts_) {
      detail::throw_invalid("HashRouter: k must satisfy 1 <= k <= num_experts (k = ", options_.k,
                            ", num_experts = ", num_experts_, ")");
    }
  }

  // Table: token id i goes to expert table[i] (k = 1). Every entry must be in [0, num_experts).
  // (A named constructor: a braced HashOptions would be ambiguous with a braced table.)
  static HashRouter with_table(index_t num_experts, index_t d_model, std::vector<index_t> table) {
    return HashRouter(num_experts, d_model, std::move(table), TableTag{});
  }

  // The balanced table for ids 0..V-1 with the given frequencies (counts or probabilities,
  // finite and >= 0), over `num_experts` buckets; see the header comment.
  static std::vector<index_t> balanced_table(const std::vector<double>& frequencies, index_t num_experts) {
    if (num_experts < 1) {
      detail::throw_invalid("HashRouter::balanced_table: num_experts must be at least 1 (num_experts = ", num_experts, ")");
    }
    const std::size_t V = frequencies.size();
    for (std::size_t i = 0; i < V; ++i) {
      if (!std::isfinite(frequencies[i]) || frequencies[i] < 0.0) {
        detail::throw_invalid("HashRouter::balanced_table: frequencies must be finite and >= 0 (frequencies[", i,
                              "] = ", frequencies[i], ")");
      }
    }
    std::vector<std::size_t> order(V);
    std::iota(order.begin(), order.end(), std::size_t(0));
    std::stable_sort(order.begin(), order.end(),
                     [&frequencies](std::size_t a, std::size_t b) { return frequencies[a] > frequencies[b]; });

    // Min-heap on (load, bucket): the top is the lightest bucket, the lower index on equal loads.
    using Bucket = std::pair<double, index_t>;
    std::priority_queue<Bucket, std::vector<Bucket>, std::greater<Bucket>> buckets;
    for (index_t e = 0; e < num_experts; ++e) buckets.emplace(0.0, e);
    std::vector<index_t> table(V);
    for (const std::size_t id : order) {
      Bucket lightest = buckets.top();
      buckets.pop();
      table[id] = lightest.second;
      lightest.first += frequencies[id];
      buckets.push(lightest);
    }
    return table;
  }

  // A table router over the balanced table of `frequencies` (see balanced_table).
  static HashRouter balanced(const std::vector<double>& frequencies, index_t num_experts, index_t d_model) {
    if (frequencies.empty()) detail::throw_invalid("HashRouter::balanced: frequencies must not be empty (one per vocabulary id)");
    return with_table(num_experts, d_model, balanced_table(frequencies, num_experts));
  }

  index_t num_experts() const noexcept { return num_experts_; }
  index_t d_model() const noexcept { return d_model_; }
  index_t k() const noexcept { return options_.k; }
  // k per token, whatever the groups (MoELayer::reserve).
  index_t max_assignments(index_t tokens, index_t /*groups*/) const noexcept { return tokens * options_.k; }
  // k, the seed, the expert count, the width and the table's size: backward refuses a
  // RouterOutput this fingerprint did not stamp. Not the table's contents: two tables of one size
  // fill routings of one layout, which is what the stamp guards (and hash backward adds nothing).
  std::uint64_t config_fingerprint() const noexcept {
    return detail::Fingerprint().add(3).add(num_experts_).add(d_model_).add(options_.k).add(options_.seed).add(table_.size()).value();
  }
  const HashOptions& options() const noexcept { return options_; }
  // The id -> expert table; empty for the random hash.
  const std::vector<index_t>& table() const noexcept { return table_; }

  // The experts of token `id`, in hash order, written to out[0, k).
  void experts_of(std::int64_t id, index_t* out) const {
    if (!table_.empty()) {
      if (!in_table(id)) {
        detail::throw_invalid("HashRouter::experts_of: token id is outside the table (token id = ", id,
                              ", table size = ", table_.size(), ")");
      }
      out[0] = table_[static_cast<std::size_t>(id)];
      return;
    }
    const index_t k = options_.k;
    const auto E = static_cast<std::uint64_t>(num_experts_);
    for (index_t j = 0; j < k; ++j) {
      const auto r = static_cast<index_t>(hash_key(id, options_.seed, static_cast<std::uint64_t>(j)) %
                                          (E - static_cast<std::uint64_t>(j)));
      // The r-th unused expert is the least e with e = r + #{chosen experts <= e}; iterating that
      // map from e = r climbs to it (it is nondecreasing), in at most j steps.
      index_t e = r;
      for (;;) {
        index_t at_or_below = 0;
        for (index_t i = 0; i < j; ++i) at_or_below += out[i] <= e ? 1 : 0;
        if (r + at_or_below == e) break;
        e = r + at_or_below;
      }
      out[j] = e;
    }
  }

  // Without a RouteContext there are no token ids: only an empty batch can be routed, any other
  // throws moe::invalid_argument.
  template <class Arch = simd::default_arch>
  void route(const ConstMatrixRef<T>& x, RouterOutput<T>& out, Arch arch = {}) const {
    route(x, RouteContext{}, out, arch);
  }
  // Routes the tokens of x [T, d] by ctx.token_ids [T]. Groups in ctx are checked but do not
  // matter: each token is routed on its own.
  template <class Arch = simd::default_arch>
  void route(const ConstMatrixRef<T>& x, const RouteContext& ctx, RouterOutput<T>& out, Arch = {}) const {
    detail::check_dim("HashRouter::route", "x.cols()", x.cols(), "d_model", d_model());
    const index_t T_ = x.rows();
    const index_t E = num_experts_;
    const index_t k = table_.empty() ? options_.k : index_t(1);
    const GroupBounds groups(ctx, T_, "HashRouter::route");
    (void)groups;
    if (T_ > 0 && ctx.token_ids == nullptr) {
      detail::throw_invalid("HashRouter::route: RouteContext::token_ids must not be null; hash routing keys on token ids (tokens = ",
                            T_, ")");
    }
    out.reshape(T_, E, config_fingerprint());  // (an empty plan from here on, until the last line)
    for (index_t t = 0; t < T_ && !table_.empty(); ++t) {
      const std::int64_t id = ctx.token_ids[t];
      if (!in_table(id)) {
        detail::throw_invalid("HashRouter::route: token_ids[", t, "] is outside the table (token_ids[", t, "] = ", id,
                              ", table size = ", table_.size(), ")");
      }
    }
    index_t* begin = out.choice_begin.ensure(T_ + 1);
    index_t* chosen = out.choice_expert.ensure(T_ * k);
    T* weights = out.choice_weight.ensure(T_ * k);
    const T w = T(1) / static_cast<T>(k);
    MatrixMap<T> logits = out.mutable_logits();
    MatrixMap<T> scores = out.mutable_scores();
    logits.setZero();
    scores.setZero();
    for (index_t t = 0; t < T_; ++t) {
      begin[t] = t * k;
      experts_of(ctx.token_ids[t], chosen + t * k);
      for (index_t j = 0; j < k; ++j) {
        weights[t * k + j] = w;
        scores(t, chosen[t * k + j]) = w;
      }
    }
    begin[T_] = T_ * k;
    build_routing(T_, E, begin, chosen, weights, out.plan);
  }

  // Backward (the TopKRouter contract, for MoELayer::backward): the routing depends on token ids
  // only, never on x, and the router has no parameters, so it adds nothing to dx or dweight
  // [E, d] (kept at zero by the layer), and needs no scratch. The shapes are still checked.
  template <class Arch = simd::default_arch>
  void backward(const ConstMatrixRef<T>& x, const RouterOutput<T>& out, const T* grad_weight, const T* grad_lost,
                const T* extra_dlogits, MatrixRef<T> dx, MatrixRef<T> dweight, Arch = {}, Buffer<T>* = nullptr) const {
    (void)grad_weight;
    (void)grad_lost;
    (void)extra_dlogits;
    detail::check_dim("HashRouter::backward", "out.num_tokens()", out.num_tokens(), "x.rows()", x.rows());
    detail::check_dim("HashRouter::backward", "out.plan.num_tokens", out.plan.num_tokens, "x.rows()", x.rows());
    detail::check_dim("HashRouter::backward", "out.num_experts()", out.num_experts(), "num_experts", num_experts_);
    detail::check_dim("HashRouter::backward", "x.cols()", x.cols(), "d_model", d_model_);
    detail::check_dim("HashRouter::backward", "dx.rows()", dx.rows(), "x.rows()", x.rows());
    detail::check_dim("HashRouter::backward", "dx.cols()", dx.cols(), "d_model", d_model_);
    detail::check_dim("HashRouter::backward", "dweight.rows()", dweight.rows(), "num_experts", num_experts_);
    detail::check_dim("HashRouter::backward", "dweight.cols()", dweight.cols(), "d_model", d_model_);
    detail::check_disjoint("HashRouter::backward", "dx", dx, "x", x);
    detail::check_router_config("HashRouter::backward", "out", out.router_config(), config_fingerprint());
  }

 private:
  struct TableTag {};
  HashRouter(index_t num_experts, index_t d_model, std::vector<index_t> table, TableTag)
      : num_experts_(num_experts), d_model_(d_model), table_(std::move(table)) {
    check_shape("HashRouter::with_table");
    if (table_.empty()) detail::throw_invalid("HashRouter::with_table: table must not be empty (table size = 0)");
    for (std::size_t i = 0; i < table_.size(); ++i) {
      if (table_[i] < 0 || table_[i] >= num_experts_) {
        detail::throw_invalid("HashRouter::with_table: table entries must be in [0, num_experts) (table[", i,
                              "] = ", table_[i], ", num_experts = ", num_experts_, ")");
      }
    }
  }

  // Whether a token id has an entry in the table (route checks the batch's ids before it fills the
  // plan; experts_of checks the one it is given).
  bool in_table(std::int64_t id) const noexcept { return id >= 0 && static_cast<std::uint64_t>(id) < table_.size(); }

  void check_shape(const char* where) const {
    if (num_experts_ < 1) detail::throw_invalid(where, ": num_experts must be at least 1 (num_experts = ", num_experts_, ")");
    detail::check_positive(where, "d_model", d_model_);
  }

  index_t num_experts_ = 0;
  index_t d_model_ = 0;
  HashOptions options_;
  std::vector<index_t> table_;  // [V] id -> expert, or empty for the random hash
};

MOE_NAMESPACE_END
