#pragma once
// Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing").
//
//   logits = x · Wᵀ                       W [E, d] (PyTorch gate.weight)
//   S      = softmax(logits) over E       [T, E]
//   within each routing group of Tg tokens, expert e takes the c best tokens by S[:, e],
//            c = min(ceil(capacity_factor · Tg / E), Tg), ties to the lower token index
//   weight = S[t, e]
// Every expert takes exactly c tokens of each group, so the load is balanced by construction; a
// token may get anywhere from 0 to E experts. capacity_factor is the average number of experts
// per token (the paper's default is 2).
//
// The ranking is on S as computed in T, as the references rank their rounded softmax: scores
// that round to the same value tie, and the lower token index wins. A token whose top logit leads
// its others by more than ~17 (float) or ~37 (double) has S = 1 exactly for that expert, so such
// tokens tie for it however their exact probabilities differ (by less than T's rounding).
//
// Capacity and selection are computed per routing group (RouteContext, README, "Guarantees"), so one
// request's tokens can never displace another's. For the same reason the logits come from the
// row-independent product of simd/matmul.hpp: a packed GEMM (Eigen's) may round a row
// differently depending on the batch size and the row's position, and a near-tie inside one group
// would then be decided by what else shares the batch.
//
// The plan:
//  - grouped by expert: expert e owns [e · C, (e + 1) · C) with C = Σ_g c_g, tokens ascending;
//  - grouped by token: a token's assignments are in descending weight, equal weights by the
//    lower expert index (the same "best first" order as top-k routing);
//  - `dropped`, `dropped_weight` and `rerouted` stay empty: a token chooses nothing, so it loses
//    nothing to capacity. Tokens that no expert chose have no assignments (experts_of(t) == 0);
//    the layer gives them a zero expert output and the caller's residual path carries them.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <utility>

#include "../core/error.hpp"
#include "../core/fingerprint.hpp"
#include "../core/types.hpp"
#include "../core/weight.hpp"
#include "../core/workspace.hpp"
#include "../simd/matmul.hpp"
#include "../simd/matmul_nn.hpp"
#include "../simd/softmax.hpp"
#include "../simd/top_k.hpp"
#include "context.hpp"
#include "router_output.hpp"
#include "routing.hpp"

MOE_NAMESPACE_BEGIN

struct ExpertChoiceOptions {
  // Required, finite and > 0: the average number of experts per token. Each expert takes
  // c = min(ceil(capacity_factor · Tg / E), Tg) tokens of every group of Tg tokens.
  double capacity_factor = 0.0;
  bool check_finite = true;  // throw moe::numeric_error on a non-finite logit
};

template <class T>
class ExpertChoiceRouter {
 public:
  using Scalar = T;

  // Views the caller's gate weight W [E, d] (no copy).
  ExpertChoiceRouter(ConstMatrixMap<T> weight, ExpertChoiceOptions options)
      : ExpertChoiceRouter(Weight<T>::view(weight), options) {}
  // Owns its gate weight.
  ExpertChoiceRouter(Matrix<T> weight, ExpertChoiceOptions options)
      : ExpertChoiceRouter(Weight<T>::own(std::move(weight)), options) {}
  ExpertChoiceRouter(Weight<T> weight, ExpertChoiceOptions options) : weight_(std::move(weight)), options_(options) {
    const index_t E = num_experts();
    if (E < 1) detail::throw_invalid("ExpertChoiceRouter: num_experts must be at least 1 (num_experts = ", E, ")");
    detail::check_positive("ExpertChoiceRouter", "weight.cols() (d_model)", d_model());
    if (!std::isfinite(options_.capacity_factor) || !(options_.capacity_factor > 0.0)) {
      detail::throw_invalid("ExpertChoiceRouter: capacity_factor must be finite and > 0 (capacity_factor = ",
                            options_.capacity_factor, ")");
    }
  }

  index_t num_experts() const noexcept { return weight_.rows(); }
  index_t d_model() const noexcept { return weight_.cols(); }
  const ExpertChoiceOptions& options() const noexcept { return options_; }
  // Its options, the expert count and the width: backward refuses a RouterOutput this fingerprint
  // did not stamp.
  std::uint64_t config_fingerprint() const noexcept {
    return detail::Fingerprint().add(2).add(num_experts()).add(d_model()).add(options_.capacity_factor).add(options_.check_finite).value();
  }
  ConstMatrixMap<T> weight() const noexcept { return weight_.map(); }

  // Tokens each expert takes from a group of `group_tokens` tokens:
  // min(ceil(capacity_factor · group_tokens / E), group_tokens), evaluated in double. The product
  // rounds as doubles do, as top-k's expert_capacity (Megatron's formula): a factor with no exact
  // binary form can land just above a whole number and take one token more than exact arithmetic
  // would (1.1 · 100 / 2 = 55.00000000000001, so 56 tokens).
  index_t capacity(index_t group_tokens) const noexcept {
    const double c = options_.capacity_factor * static_cast<double>(group_tokens) / static_cast<double>(num_experts());
    if (!(c < static_cast<double>(group_tokens))) return group_tokens;
    return static_cast<index_t>(std::ceil(c));
  }

  // The most assignments a batch of `tokens` tokens in at most `groups` routing groups can get
  // (MoELayer::reserve): E · Σ_g capacity(T_g), where each group's capacity is below
  // capacity_factor · T_g / E + 1 and at most T_g, so Σ_g is at most
  // min(T, capacity(T) + groups).
  index_t max_assignments(index_t tokens, index_t groups) const noexcept {
    return num_experts() * std::min(tokens, capacity(tokens) + groups);
  }

  // Routes x [T, d] into `out` (logits, scores and plan), the whole batch as one group.
  // T = 0 gives an empty plan.
  template <class Arch = simd::default_arch>
  void route(const ConstMatrixRef<T>& x, RouterOutput<T>& out, Arch arch = {}) const {
    route(x, RouteContext{}, out, arch);
  }
  // As above, choosing within each routing group of `ctx` (empty groups are allowed).
  template <class Arch = simd::default_arch>
  void route(const ConstMatrixRef<T>& x, const RouteContext& ctx, RouterOutput<T>& out, Arch arch = {}) const {
    detail::check_dim("ExpertChoiceRouter::route", "x.cols()", x.cols(), "d_model", d_model());
    detail::check_rows("ExpertChoiceRouter::route", "x", x, false);
    const index_t T_ = x.rows();
    const index_t E = num_experts();
    const GroupBounds groups(ctx, T_, "ExpertChoiceRouter::route");
    out.reshape(T_, E, config_fingerprint());
    compute_logits(arch, x, out);
    const T* logits = out.logits().data();
    if (options_.check_finite && !simd::all_finite(arch, logits, static_cast<std::size_t>(T_ * E)))
      detail::check_finite_logits("ExpertChoiceRouter::route", out.logits(), 0, T_);
    T* scores = out.mutable_scores().data();
    for (index_t t = 0; t < T_; ++t) simd::softmax(arch, logits + t * E, scores + t * E, static_cast<std::size_t>(E));
    select(arch, groups, out);
  }

  // Backward through the routing weights (the TopKRouter contract, for MoELayer::backward). Given
  // this batch's `out`, grad_weight [A] = ∂L/∂(weight of each plan assignment) in the plan's
  // expert-grouped order, and extra_dlogits [T, E] (auxiliary losses) or null, adds ∂L/∂W to
  // dweight [E, d] and ∂L/∂x to dx [T, d]. weight = S[t, e] = softmax(logits[t])[e], so
  // ∂L/∂logits[t] = S[t] ⊙ (g[t] − Σ_e S[t, e] g[t, e]) with g[t, e] the gradient of the
  // assignment (t, e), 0 where expert e did not take t. The selection is piecewise constant and
  // has no gradient. Nothing is dropped, so grad_lost is ignored. The [T, E] logit gradients go in
  // `scratch` when given (grown as needed and reused: a warm call allocates nothing).
  template <class Arch = simd::default_arch>
  void backward(const ConstMatrixRef<T>& x, const RouterOutput<T>& out, const T* grad_weight, const T* grad_lost,
                const T* extra_dlogits, MatrixRef<T> dx, MatrixRef<T> dweight, Arch arch = {},
                Buffer<T>* scratch = nullptr) const {
    (void)grad_lost;
    const index_t T_ = x.rows();
    const index_t E = num_experts();
    detail::check_dim("ExpertChoiceRouter::backward", "out.num_tokens()", out.num_tokens(), "x.rows()", T_);
    // (An empty plan beside T_ logits: the route that filled `out` threw.)
    detail::check_dim("ExpertChoiceRouter::backward", "out.plan.num_tokens", out.plan.num_tokens, "x.rows()", T_);
    detail::check_dim("ExpertChoiceRouter::backward", "out.num_experts()", out.num_experts(), "num_experts", E);
    detail::check_dim("ExpertChoiceRouter::backward", "x.cols()", x.cols(), "d_model", d_model());
    detail::check_dim("ExpertChoiceRouter::backward", "dx.rows()", dx.rows(), "x.rows()", T_);
    detail::check_dim("ExpertChoiceRouter::backward", "dx.cols()", dx.cols(), "d_model", d_model());
    detail::check_dim("ExpertChoiceRouter::backward", "dweight.rows()", dweight.rows(), "num_experts", E);
    detail::check_dim("ExpertChoiceRouter::backward", "dweight.cols()", dweight.cols(), "d_model", d_model());
    detail::check_rows("ExpertChoiceRouter::backward", "dweight", dweight, true);
    detail::check_disjoint("ExpertChoiceRouter::backward", "dx", dx, "x", x);
    detail::check_router_config("ExpertChoiceRouter::backward", "out", out.router_config(), config_fingerprint());
    const Routing<T>& plan = out.plan;
    Buffer<T> own;
    MatrixMap<T> dlogits((scratch != nullptr ? *scratch : own).ensure(T_ * E), T_, E);  // [T, E]
    dlogits.setZero();
    for (index_t t = 0; t < T_; ++t) {
      T* dl = dlogits.data() + t * E;
      const T* p = out.scores().data() + t * E;
      T s(0);
      for (index_t j = plan.token_begin[t]; j < plan.token_begin[t + 1]; ++j) {
        const index_t a = plan.assignment[j];
        const T gp = grad_weight[a] * plan.weight[a];
        dl[plan.expert_of_assignment(a)] += gp;
        s += gp;
      }
      for (index_t e = 0; e < E; ++e) dl[e] -= p[e] * s;
    }
    if (extra_dlogits != nullptr) dlogits += ConstMatrixMap<T>(extra_dlogits, T_, E);
    const auto rows = static_cast<std::size_t>(T_), experts = static_cast<std::size_t>(E);
    const auto d = static_cast<std::size_t>(d_model());
    simd::matmul_tn_strided(arch, dlogits.data(), experts, rows, experts, x.data(), static_cast<std::size_t>(x.outerStride()), d,
                            dweight.data(), static_cast<std::size_t>(dweight.outerStride()), true);
    simd::matmul_nn_strided(arch, dlogits.data(), experts, rows, experts, weight().data(), d, d, dx.data(),
                            static_cast<std::size_t>(dx.outerStride()), true);
  }

 private:
  // logits [T, E] = x · Wᵀ with the row-independent product (simd/matmul.hpp): a token's logits
  // never depend on the batch.
  template <class Arch>
  void compute_logits(Arch arch, const ConstMatrixRef<T>& x, RouterOutput<T>& out) const {
    if (x.rows() == 0) return;
    simd::matmul_nt_strided(arch, x.data(), static_cast<std::size_t>(x.outerStride()), static_cast<std::size_t>(x.rows()),
                            static_cast<std::size_t>(d_model()), weight_.data(), static_cast<std::size_t>(num_experts()),
                            out.mutable_logits().data(), static_cast<std::size_t>(num_experts()));
  }

  // Fills the plan directly: every expert takes the same number of tokens, so the expert-grouped
  // layout is known before selection and no token-major staging is needed.
  template <class Arch>
  void select(Arch arch, const GroupBounds& groups, RouterOutput<T>& out) const {
    const index_t T_ = out.num_tokens();
    const index_t E = num_experts();
    const ConstMatrixMap<T> scores = out.scores();
    Routing<T>& plan = out.plan;

    index_t per_expert = 0;  // C = Σ_g c_g
    index_t largest_group = 0;
    for (index_t g = 0; g < groups.count(); ++g) {
      per_expert += capacity(groups.size(g));
      largest_group = std::max(largest_group, groups.size(g));
    }
    const index_t A = E * per_expert;
    plan.num_tokens = T_;
    plan.num_experts = E;
    resize_keep(plan.expert_begin, E + 1);
    resize_keep(plan.token, A);
    resize_keep(plan.weight, A);
    resize_keep(plan.token_begin, T_ + 1);
    resize_keep(plan.assignment, A);  // (dropped, dropped_weight, rerouted: left empty by route's reshape)
    index_t* expert_begin = plan.expert_begin.data();  // [E + 1]
    index_t* token = plan.token.data();                // [A]
    T* weight = plan.weight.data();                    // [A]
    index_t* token_begin = plan.token_begin.data();    // [T + 1]
    index_t* assignment = plan.assignment.data();      // [A]
    for (index_t e = 0; e <= E; ++e) expert_begin[e] = e * per_expert;

    // Expert-grouped side: per group and expert, the top c of the group's column of S.
    T* column = out.row_values.ensure(largest_group);
    T* top_values = out.row_scratch.ensure(largest_group);
    index_t* top_indices = out.row_indices.ensure(largest_group);
    index_t group_offset = 0;  // Σ of c over the groups before g
    for (index_t g = 0; g < groups.count(); ++g) {
      const index_t first = groups.begin(g);
      const index_t size = groups.size(g);
      const index_t c = capacity(size);
      if (c == 0) continue;
      for (index_t e = 0; e < E; ++e) {
        for (index_t i = 0; i < size; ++i) column[i] = scores(first + i, e);
        const index_t slot = e * per_expert + group_offset;
        index_t* chosen = token + slot;
        // The c best tokens, ascending inside each expert.
        simd::top_k_set(arch, column, static_cast<std::size_t>(size), static_cast<std::size_t>(c), chosen, top_values,
                        top_indices);
        for (index_t j = 0; j < c; ++j) {
          chosen[j] += first;
          weight[slot + j] = scores(chosen[j], e);
        }
      }
      group_offset += c;
    }

    // Token-grouped side: count, exclusive scan, fill in ascending assignment order (ascending
    // expert), then order each token's assignments best first.
    std::fill(token_begin, token_begin + T_ + 1, index_t(0));
    for (index_t a = 0; a < A; ++a) ++token_begin[token[a] + 1];
    for (index_t t = 0; t < T_; ++t) token_begin[t + 1] += token_begin[t];
    index_t* cursor = out.choice_begin.ensure(T_ + 1);
    std::copy(token_begin, token_begin + T_ + 1, cursor);
    for (index_t a = 0; a < A; ++a) assignment[cursor[token[a]]++] = a;
    for (index_t t = 0; t < T_; ++t) {
      // Assignment indices grow with the expert index, so "lower assignment" is "lower expert".
      std::sort(assignment + token_begin[t], assignment + token_begin[t + 1],
                [weight](index_t a, index_t b) { return simd::ranks_before(weight[a], a, weight[b], b); });
    }
  }

  Weight<T> weight_;  // [E, d]
  ExpertChoiceOptions options_;
};

MOE_NAMESPACE_END
