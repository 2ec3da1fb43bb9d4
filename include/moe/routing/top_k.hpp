#pragma once
// Token-choice top-k routing (Switch, GShard, Mixtral, Qwen, DeepSeek-V3, Megatron-Core).
//
//   logits = x · Wᵀ                       W [E, d] (PyTorch gate.weight); x jittered in training
//   scores = softmax(logits) over E, or sigmoid(logits)
//   selection values = scores (or logits when the softmax comes after top-k) + selection bias,
//            with experts outside the best expert groups excluded (group-limited routing)
//   chosen = the k best selection values, ties to the lower expert index; with top_p, the
//            fewest leading experts whose scores reach p (at most k)
//   raw    = score of each chosen expert (or softmax over the k chosen logits)
//   weight = raw / Σ raw over the choices if `normalize`, then × scale
// Capacity (capacity.hpp) may then drop or reroute choices, per routing group. A rerouted choice
// keeps the same denominator, so when the selection can choose experts whose raw weight is below
// the one a choice is rerouted to (a selection bias, or GroupMask::zero letting a masked expert win
// at 0 over negative logits), its weight can exceed `scale`, without bound as Σ raw → 0; one beyond
// T's range throws moe::numeric_error (with check_finite). Renormalized after drops, the weights are
// raw / Σ kept raw ≤ 1 however far the raw weights overflow T.
// The selection bias (DeepSeek e_score_correction_bias) changes which experts are chosen, never
// the weights.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "../core/error.hpp"
#include "../core/random.hpp"
#include "../core/types.hpp"
#include "../core/weight.hpp"
#include "../core/workspace.hpp"
#include "../simd/matmul.hpp"
#include "../simd/matmul_nn.hpp"
#include "../simd/softmax.hpp"
#include "../simd/top_k.hpp"
#include "capacity.hpp"
#include "context.hpp"
#include "router_output.hpp"

MOE_NAMESPACE_BEGIN

enum class ScoreFunction {
  softmax,  // probabilities over the E experts (Switch, Mixtral, Qwen)
  sigmoid,  // independent per-expert scores (DeepSeek-V3)
};

// Where the softmax sits relative to the top-k selection. Without expert bias or group limits the
// two choose the same experts in exact arithmetic (softmax is monotone; a bias added to, or group
// scores summed over, probabilities in one and logits in the other can rank differently; and in
// floating point, distinct logits whose probabilities round equal, or underflow to 0, tie and go
// to the lower index); their weights then agree in exact arithmetic when `normalize` is on, and
// differ without it.
// Naming: Megatron-Core's `moe_router_pre_softmax = true` is `before_top_k`; its default is
// `after_top_k`. ("pre/post-softmax" wording is ambiguous, so the enum says where.)
enum class SoftmaxPlacement {
  before_top_k,  // softmax over all E, then top-k of the probabilities (Mixtral, Switch)
  after_top_k,   // top-k of the logits, then softmax over the k chosen (Megatron default)
};

// What excluded expert groups look like to the final top-k in group-limited routing.
enum class GroupMask {
  exclude,  // never chosen (Megatron-Core, the DeepSeek-V3 paper)
  zero,     // selection value set to 0 (Hugging Face DeepSeek-V3 `masked_fill(..., 0.0)`): an
            // excluded expert can still win when every kept value is negative
};

namespace detail {
template <>
struct EnumNames<ScoreFunction> {
  static constexpr const char* names[] = {"softmax", "sigmoid"};
};
template <>
struct EnumNames<SoftmaxPlacement> {
  static constexpr const char* names[] = {"before_top_k", "after_top_k"};
};
template <>
struct EnumNames<GroupMask> {
  static constexpr const char* names[] = {"exclude", "zero"};
};
}  // namespace detail

struct TopKOptions {
  index_t k = 1;
  ScoreFunction score = ScoreFunction::softmax;
  SoftmaxPlacement softmax_placement = SoftmaxPlacement::before_top_k;
  // Divide the weights by their sum (Mixtral: yes, Switch: no). With sigmoid scores the sum gets
  // 1e-20 added, as in Megatron-Core and DeepSeek-V3: chosen scores all below ~1e-18 then give
  // weights that sum to less than 1, not 0/0.
  bool normalize = false;
  double scale = 1.0;      // routed scaling factor applied to the final weights (DeepSeek-V3: 2.5)

  // Group-limited routing (DeepSeek-V3 n_group / topk_group, Pangu MoGE): E experts in
  // `expert_groups` equal groups; a group's score is the sum of its best `group_score_top`
  // selection values; only the best `selected_groups` groups compete in the final top-k.
  index_t expert_groups = 1;
  index_t selected_groups = 1;
  index_t group_score_top = 2;
  GroupMask group_mask = GroupMask::exclude;

  // Dynamic top-p ("Harder tasks need more experts"): when > 0, a token takes experts in
  // descending score until their cumulative score reaches top_p, at most k of them: the paper's
  // smallest set with Σ ≥ top_p. (Its released code masks cumsum > p, so where a partial sum
  // equals p exactly it takes one expert more.)
  double top_p = 0.0;

  // Capacity (Switch, GShard): 0 means dropless (negative throws); otherwise C = ceil(cf · Tg · k
  // / E) per group (with top_p, k is the most a token may choose, so the room is that of every
  // token choosing k), evaluated in double as Megatron-Core does, ceil((Tg · k / E) · cf): where
  // the exact product is a whole number, rounding can add one slot (cf 1.1, Tg 50, k 1, E 11: 6,
  // not 5), as in Megatron-Core (expert_capacity in routing/capacity.hpp).
  double capacity_factor = 0.0;
  index_t fixed_capacity = 0;  // > 0: this many slots per expert and group, whatever capacity_factor says
  CapacityPriority capacity_priority = CapacityPriority::position;
  OverflowPolicy overflow = OverflowPolicy::drop;
  // Kept weights divided by the sum of the surviving raw weights. The lost weight (what
  // DroppedTokens::pass_through adds) keeps the plain normalization: the lost choices' weight before
  // the drop.
  bool renormalize_after_drop = false;

  // Training jitter (Switch): router inputs × U(1 − jitter, 1 + jitter), keyed by
  // (jitter_seed, RouteContext::layer_id, token id, feature); only when RouteContext::training.
  double jitter = 0.0;
  std::uint64_t jitter_seed = 0;

  // Throw moe::numeric_error on a non-finite logit, and on a routing weight beyond T's range (only
  // a rerouted choice's can be: see the top of this file; with check_finite = false it is ±inf).
  bool check_finite = true;
};

template <class T>
class TopKRouter {
 public:
  using Scalar = T;

  // Views the caller's gate weight W [E, d] (no copy).
  TopKRouter(ConstMatrixMap<T> weight, TopKOptions options = {}) : TopKRouter(Weight<T>::view(weight), options) {}
  // Owns its gate weight.
  TopKRouter(Matrix<T> weight, TopKOptions options = {}) : TopKRouter(Weight<T>::own(std::move(weight)), options) {}
  TopKRouter(Weight<T> weight, TopKOptions options) : weight_(std::move(weight)), options_(options) { check_options(); }

  index_t num_experts() const noexcept { return weight_.rows(); }
  index_t d_model() const noexcept { return weight_.cols(); }
  index_t k() const noexcept { return options_.k; }
  // At most k per token (top_p chooses up to k), whatever the groups (MoELayer::reserve).
  index_t max_assignments(index_t tokens, index_t /*groups*/) const noexcept { return tokens * options_.k; }
  const TopKOptions& options() const noexcept { return options_; }
  // Every option, k, the expert count and the width (not the weights or the selection bias):
  // backward refuses a RouterOutput this fingerprint did not stamp.
  std::uint64_t config_fingerprint() const noexcept {
    const TopKOptions& o = options_;
    return detail::Fingerprint()
        .add(1).add(num_experts()).add(d_model()).add(o.k).add(o.score).add(o.softmax_placement).add(o.normalize)
        .add(o.scale).add(o.expert_groups).add(o.selected_groups).add(o.group_score_top).add(o.group_mask).add(o.top_p)
        .add(o.capacity_factor).add(o.fixed_capacity).add(o.capacity_priority).add(o.overflow)
        .add(o.renormalize_after_drop).add(o.jitter).add(o.jitter_seed).add(o.check_finite)
        .value();
  }
  ConstMatrixMap<T> weight() const noexcept { return weight_.map(); }

  // Selection-only bias b [E]: experts are chosen by score + b, weighted by score alone.
  void set_selection_bias(const Vector<T>& bias) {
    detail::check_dim("TopKRouter::set_selection_bias", "bias.size()", bias.size(), "num_experts", num_experts());
    for (index_t e = 0; e < bias.size(); ++e) {
      if (!std::isfinite(bias[e])) detail::throw_invalid("TopKRouter::set_selection_bias: bias[", e, "] is not finite (", bias[e], ")");
    }
    selection_bias_ = bias;
  }
  void clear_selection_bias() { selection_bias_.resize(0); }
  const Vector<T>& selection_bias() const noexcept { return selection_bias_; }

  // Routes x [T, d] into `out` (logits, scores and plan). T = 0 gives an empty plan.
  template <class Arch = simd::default_arch>
  void route(const ConstMatrixRef<T>& x, RouterOutput<T>& out, Arch arch = {}) const {
    route(x, RouteContext{}, out, arch);
  }
  template <class Arch = simd::default_arch>
  void route(const ConstMatrixRef<T>& x, const RouteContext& ctx, RouterOutput<T>& out, Arch arch = {}) const {
    detail::check_dim("TopKRouter::route", "x.cols()", x.cols(), "d_model", d_model());
    detail::check_rows("TopKRouter::route", "x", x, false);
    const index_t T_ = x.rows();
    const index_t E = num_experts();
    const GroupBounds groups(ctx, T_, "TopKRouter::route");
    out.reshape(T_, E, config_fingerprint());
    out.input_jittered = T_ > 0 && ctx.training && options_.jitter > 0;
    if (T_ > 0) {
      const bool jitter = out.input_jittered;
      const T* input = jitter ? jittered(x, ctx, out) : x.data();
      route_rows(arch, input, static_cast<std::size_t>(jitter ? x.cols() : x.outerStride()), out, T_, E);
    }
    decide_and_build(out, groups, T_, E);
    // The pre-capacity ids for the losses, recorded once the route has succeeded: after one that
    // threw (a rerouted weight beyond T's range) top_k_ids() refuses, as the empty plan does.
    out.set_top_k_ids(options_.top_p > 0 ? 0 : options_.k, candidate_stride());
  }

  // Backward through the routing weights. Given, for this batch's `out`:
  //   grad_weight [A]  ∂L/∂(weight of each plan assignment), in the plan's expert-grouped order;
  //   grad_lost   [T]  ∂L/∂(total weight a token lost to capacity: plan.dropped_weight), or null
  //                    (DroppedTokens::zero); the entries of tokens not in plan.dropped are not read;
  //   extra_dlogits [T, E] ∂L/∂logits from auxiliary losses, or null;
  // adds ∂L/∂W to dweight [E, d] and ∂L/∂x to dx [T, d]. Selection (top-k, bias, groups,
  // capacity) is piecewise constant and has no gradient, as in every reference implementation.
  // Temporaries ([T, E] logit gradients, and [T, d] with jitter) go in `scratch`, grown as needed
  // and reused, so that a warm call allocates nothing; without one, backward allocates its own.
  template <class Arch = simd::default_arch>
  void backward(const ConstMatrixRef<T>& x, const RouterOutput<T>& out, const T* grad_weight, const T* grad_lost,
                const T* extra_dlogits, MatrixRef<T> dx, MatrixRef<T> dweight, Arch arch = {},
                Buffer<T>* scratch = nullptr) const {
    const index_t T_ = x.rows(), E = num_experts();
    detail::check_dim("TopKRouter::backward", "out.num_tokens()", out.num_tokens(), "x.rows()", T_);
    // (An empty plan beside T_ logits: the route that filled `out` threw.)
    detail::check_dim("TopKRouter::backward", "out.plan.num_tokens", out.plan.num_tokens, "x.rows()", T_);
    detail::check_dim("TopKRouter::backward", "out.num_experts()", out.num_experts(), "num_experts", E);
    detail::check_dim("TopKRouter::backward", "x.cols()", x.cols(), "d_model", d_model());
    detail::check_dim("TopKRouter::backward", "dx.rows()", dx.rows(), "x.rows()", T_);
    detail::check_dim("TopKRouter::backward", "dx.cols()", dx.cols(), "d_model", d_model());
    detail::check_dim("TopKRouter::backward", "dweight.rows()", dweight.rows(), "num_experts", E);
    detail::check_dim("TopKRouter::backward", "dweight.cols()", dweight.cols(), "d_model", d_model());
    detail::check_rows("TopKRouter::backward", "dweight", dweight, true);
    detail::check_disjoint("TopKRouter::backward", "dx", dx, "x", x);
    detail::check_router_config("TopKRouter::backward", "out", out.router_config(), config_fingerprint());
    const index_t R = candidate_stride();
    Buffer<T> own;
    T* const temporaries = (scratch != nullptr ? *scratch : own).ensure(T_ * E + 3 * R + (out.input_jittered ? T_ * d_model() : 0));
    MatrixMap<T> dlogits(temporaries, T_, E);  // [T, E]
    dlogits.setZero();
    T* const g_weight = temporaries + T_ * E;  // [R] per candidate: ∂L/∂(final weight)
    T* const g_log_raw = g_weight + R;         // [R] ∂L/∂raw · raw
    T* const shares = g_log_raw + R;           // [R] raw / D from the logits (logit_shares)
    const index_t* ranked = out.candidate_expert.data();
    const T* raw_all = out.candidate_raw.data();
    const std::uint8_t* kept_all = out.candidate_kept.data();
    const index_t* num_chosen = out.candidate_chosen.data();
    const Routing<T>& plan = out.plan;
    const bool capped = this->capped();
    const bool renormalize = options_.renormalize_after_drop && capped;
    const T eps = options_.score == ScoreFunction::sigmoid ? T(1e-20) : T(0);
    const T scale = static_cast<T>(options_.scale);
    const bool on_logits = options_.softmax_placement == SoftmaxPlacement::after_top_k;
    for (index_t t = 0; t < T_; ++t) {
      const T* raw = raw_all + t * R;
      const std::uint8_t* kept = kept_all + t * R;
      const index_t* row = ranked + t * R;
      const T* logits_row = out.logits().data() + t * E;
      // ∂L/∂(final weight) of every candidate: kept ones from their assignment, lost ones share
      // the token's lost-weight gradient (those reroute moved are not lost: decide_and_build).
      index_t q = plan.token_begin[t];
      index_t moved = detail::rerouted_choices(kept, num_chosen[t], R);
      for (index_t j = 0; j < R; ++j) {
        if (kept[j]) {
          g_weight[j] = grad_weight[plan.assignment[q++]];
        } else if (j < num_chosen[t] && moved > 0) {
          g_weight[j] = T(0);
          --moved;
        } else {
          g_weight[j] = (j < num_chosen[t] && grad_lost != nullptr) ? grad_lost[t] : T(0);
        }
      }
      // weight_j = raw_j / D · scale. Kept choices: D = Σ kept raw (+eps) when renormalized after
      // drops, else the plain D = Σ chosen raw (+eps) with `normalize`, or 1; lost choices always
      // take the plain D (as decide_and_build: a zero D counts as 1, un-normalized).
      bool kept_any = false;
      for (index_t j = 0; j < R; ++j) kept_any = kept_any || kept[j] != 0;
      const bool renormalized = renormalize && kept_any;
      // g_log_raw_j = ∂L/∂raw_j · raw_j, all that the scores' backward below needs. For a group of
      // weights raw_j / D over one D, with r_j = raw_j / D, the group adds
      //   scale · ([j in group] g_j · r_j − [j in D] · r_j · Σ_{i in group} g_i · r_i),
      // which stays finite however small D is. (The quotient form g_j / D − Σ_i g_i raw_i / D² does
      // not: with renormalize_after_drop keeping only choices of probability 1e-30, D · D underflows
      // to 0 and the gradient turned inf/NaN while every weight was moderate.) A zero g_j (a
      // candidate neither kept nor lost) contributes nothing.
      auto times = [](T g, T r) { return g == T(0) ? T(0) : g * r; };
      std::fill(g_log_raw, g_log_raw + R, T(0));
      // One group of weights raw_j / D, for j in_group, with D = eps + Σ_{in_denominator} raw when
      // normalized (a zero sum counts as un-normalized, as decide_and_build), else D = 1.
      auto add_group = [&](auto in_group, auto in_denominator, bool normalized) {
        T D(1);
        if (normalized) {
          D = eps;
          for (index_t j = 0; j < R; ++j) D += in_denominator(j) ? raw[j] : T(0);
          normalized = D != T(0);
          if (!normalized) D = T(1);
        }
        // Σ raw overflowed (renormalized over a rerouted choice far above the chosen logits, as
        // decide_and_build): r_j = raw_j / D from the logits.
        const bool from_logits = normalized && on_logits && std::isinf(D);
        if (from_logits) logit_shares(logits_row, row, R, in_denominator, shares);
        auto share = [&](index_t j) { return from_logits && in_denominator(j) ? shares[j] : raw[j] / D; };
        bool wide = false;  // a share beyond T's range whose scaled weight fits (decide_and_build's wide_weight)
        for (index_t j = 0; j < R; ++j) wide = wide || (in_group(j) && g_weight[j] != T(0) && !std::isfinite(share(j)));
        if (!wide) {
          T weighted(0);
          for (index_t j = 0; j < R; ++j) weighted += in_group(j) ? times(g_weight[j], share(j)) : T(0);
          for (index_t j = 0; j < R; ++j) {
            const T r = share(j);
            if (in_group(j)) g_log_raw[j] += scale * times(g_weight[j], r);
            if (normalized && in_denominator(j)) g_log_raw[j] -= scale * r * weighted;
          }
          return;
        }
        // The same sums over scale · r_j, the forward's weights, taken in the log domain where r_j
        // overflows (inf · scale gave NaN gradients beside finite weights).
        auto scaled_share = [&](index_t j) {
          const T r = share(j);
          return std::isfinite(r) ? scale * r : wide_weight(logits_row, row, j, raw[j], D);
        };
        T weighted(0);
        for (index_t j = 0; j < R; ++j) weighted += in_group(j) ? times(g_weight[j], scaled_share(j)) : T(0);
        for (index_t j = 0; j < R; ++j) {
          if (in_group(j)) g_log_raw[j] += times(g_weight[j], scaled_share(j));
          if (normalized && in_denominator(j)) g_log_raw[j] -= share(j) * weighted;
        }
      };
      const index_t chosen_count = num_chosen[t];
      auto is_chosen = [chosen_count](index_t j) { return j < chosen_count; };
      auto is_kept = [kept](index_t j) { return kept[j] != 0; };
      if (renormalized) {
        add_group(is_kept, is_kept, true);
        add_group([kept](index_t j) { return kept[j] == 0; }, is_chosen, options_.normalize);
      } else {
        add_group([](index_t) { return true; }, is_chosen, options_.normalize);
      }
      // raw → logits.
      T* dl = dlogits.data() + t * E;
      if (on_logits) {
        // raw_j = exp(l_j) / Σ_{i<k} exp(l_i): ∂raw_j/∂l_i = raw_j (δ_ij − [i<k] raw_i).
        T s(0);
        for (index_t j = 0; j < R; ++j) s += g_log_raw[j];
        for (index_t j = 0; j < R; ++j) dl[row[j]] += g_log_raw[j] - (j < options_.k ? raw[j] * s : T(0));
      } else if (options_.score == ScoreFunction::sigmoid) {
        for (index_t j = 0; j < R; ++j) dl[row[j]] += g_log_raw[j] * (T(1) - raw[j]);
      } else {
        // raw_j = p_{e_j}, p = softmax(l): ∂L/∂l = p ⊙ (g − Σ_e p_e g_e), g sparse on candidates.
        const T* p = out.scores().data() + t * E;
        T s(0);
        for (index_t j = 0; j < R; ++j) s += g_log_raw[j];
        for (index_t e = 0; e < E; ++e) dl[e] -= p[e] * s;
        for (index_t j = 0; j < R; ++j) dl[row[j]] += g_log_raw[j];
      }
    }
    if (extra_dlogits != nullptr) dlogits += ConstMatrixMap<T>(extra_dlogits, T_, E);
    // logits = x̃ · Wᵀ with x̃ = x ⊙ noise (noise = 1 without jitter).
    // dx through simd::matmul_nn: a token's row of dx does not depend on the other tokens;
    // dweight through simd::matmul_tn: one chain over the tokens in order, on any thread count.
    const auto rows = static_cast<std::size_t>(T_), experts = static_cast<std::size_t>(E);
    const auto d = static_cast<std::size_t>(d_model());
    const auto ld_dweight = static_cast<std::size_t>(dweight.outerStride());
    if (out.input_jittered) {
      simd::matmul_tn_strided(arch, dlogits.data(), experts, rows, experts, out.input_scratch.data(), d, d, dweight.data(),
                              ld_dweight, true);  // dlogitsᵀ · x̃
      const ConstMatrixMap<T> noise(out.input_noise.data(), T_, d_model());
      MatrixMap<T> d_noisy(shares + R, T_, d_model());  // [T, d] ∂L/∂x̃
      simd::matmul_nn(arch, dlogits.data(), rows, experts, weight().data(), d, d_noisy.data(), false);
      dx += d_noisy.cwiseProduct(noise);
    } else {
      simd::matmul_tn_strided(arch, dlogits.data(), experts, rows, experts, x.data(), static_cast<std::size_t>(x.outerStride()),
                              d, dweight.data(), ld_dweight, true);
      simd::matmul_nn_strided(arch, dlogits.data(), experts, rows, experts, weight().data(), d, d, dx.data(),
                              static_cast<std::size_t>(dx.outerStride()), true);
    }
  }

 private:
  bool capped() const noexcept { return options_.capacity_factor > 0 || options_.fixed_capacity > 0; }
  bool reroutes() const noexcept { return capped() && options_.overflow == OverflowPolicy::reroute; }
  // Candidates ranked per token: the k choices, or every expert when choices may be rerouted.
  index_t candidate_stride() const noexcept { return reroutes() ? num_experts() : options_.k; }

  void check_options() const {
    const TopKOptions& o = options_;
    const index_t E = num_experts();
    if (E < 1) detail::throw_invalid("TopKRouter: num_experts must be at least 1 (num_experts = ", E, ")");
    detail::check_positive("TopKRouter", "weight.cols() (d_model)", d_model());
    if (o.k < 1 || o.k > E) {
      detail::throw_invalid("TopKRouter: k must satisfy 1 <= k <= num_experts (k = ", o.k, ", num_experts = ", E, ")");
    }
    detail::check_enum("TopKRouter", "score", o.score);
    detail::check_enum("TopKRouter", "softmax_placement", o.softmax_placement);
    detail::check_enum("TopKRouter", "group_mask", o.group_mask);
    detail::check_enum("TopKRouter", "capacity_priority", o.capacity_priority);
    detail::check_enum("TopKRouter", "overflow", o.overflow);
    detail::check_finite_in<T>("TopKRouter", "scale", o.scale);
    if (o.score == ScoreFunction::sigmoid && o.softmax_placement == SoftmaxPlacement::after_top_k) {
      detail::throw_invalid("TopKRouter: softmax_placement = after_top_k needs score = softmax (score = sigmoid)");
    }
    if (o.expert_groups < 1 || E % o.expert_groups != 0) {
      detail::throw_invalid("TopKRouter: expert_groups must divide num_experts (expert_groups = ", o.expert_groups,
                            ", num_experts = ", E, ")");
    }
    const index_t group_size = E / o.expert_groups;
    if (o.selected_groups < 1 || o.selected_groups > o.expert_groups) {
      detail::throw_invalid("TopKRouter: selected_groups must satisfy 1 <= selected_groups <= expert_groups (selected_groups = ",
                            o.selected_groups, ", expert_groups = ", o.expert_groups, ")");
    }
    if (o.expert_groups > 1) {
      if (o.k > o.selected_groups * group_size) {
        detail::throw_invalid("TopKRouter: k must not exceed selected_groups * experts per group (k = ", o.k,
                              ", selected_groups = ", o.selected_groups, ", experts per group = ", group_size, ")");
      }
      if (o.group_score_top < 1 || o.group_score_top > group_size) {
        detail::throw_invalid("TopKRouter: group_score_top must satisfy 1 <= group_score_top <= experts per group (group_score_top = ",
                              o.group_score_top, ", experts per group = ", group_size, ")");
      }
    }
    if (!(o.top_p >= 0 && o.top_p <= 1)) detail::throw_invalid("TopKRouter: top_p must be in [0, 1] (top_p = ", o.top_p, ")");
    if (o.top_p > 0 && (o.score != ScoreFunction::softmax || o.softmax_placement != SoftmaxPlacement::before_top_k)) {
      detail::throw_invalid("TopKRouter: top_p needs score = softmax and softmax_placement = before_top_k (top_p = ", o.top_p, ")");
    }
    if (!std::isfinite(o.capacity_factor) || o.capacity_factor < 0) {
      detail::throw_invalid("TopKRouter: capacity_factor must be finite and >= 0, 0 meaning dropless (capacity_factor = ",
                            o.capacity_factor, ")");
    }
    if (o.fixed_capacity < 0) detail::throw_invalid("TopKRouter: fixed_capacity must be >= 0 (fixed_capacity = ", o.fixed_capacity, ")");
    if (!(o.jitter >= 0 && o.jitter < 1)) detail::throw_invalid("TopKRouter: jitter must be in [0, 1) (jitter = ", o.jitter, ")");
  }

  // x ⊙ U(1 − ε, 1 + ε), the noise a pure function of (seed, layer, token id, feature).
  const T* jittered(const ConstMatrixRef<T>& x, const RouteContext& ctx, RouterOutput<T>& out) const {
    if (ctx.token_ids == nullptr) {
      detail::throw_invalid("TopKRouter::route: jitter in training needs RouteContext::token_ids (token_ids = null, jitter = ",
                            options_.jitter, ")");
    }
    const index_t T_ = x.rows(), d = x.cols();
    T* noisy = out.input_scratch.ensure(T_ * d);
    T* noise = out.input_noise.ensure(T_ * d);  // kept for backward
    for (index_t t = 0; t < T_; ++t) {
      const auto id = static_cast<std::uint64_t>(ctx.token_ids[t]);
      for (index_t i = 0; i < d; ++i) {
        const double u = unit_double(mix64(options_.jitter_seed, ctx.layer_id, id, static_cast<std::uint64_t>(i)));
        noise[t * d + i] = static_cast<T>(1.0 - options_.jitter + 2.0 * options_.jitter * u);
        noisy[t * d + i] = x(t, i) * noise[t * d + i];
      }
    }
    return noisy;
  }

  // Scratch for selecting one token's experts; one set per run of tokens.
  struct RowScratch {
    T* values;           // [E] selection values
    T* scratch;          // [E] top_k's
    index_t* indices;    // [E] top_k's
    T* group_score;      // [expert groups]
    index_t* group_rank; // [selected_groups] the kept groups
  };

  // Tokens a thread takes, at least, when the threads share a route's tokens.
  static constexpr index_t kMinThreadRows = 32;
  // Logits per block (128 KiB of floats): a block's logits are still in L2 when its scores and
  // selection read them.
  static constexpr index_t kBlockLogits = 32768;

  // Every token's logits (x · Wᵀ), scores, ranked candidates and raw weights, a block of tokens at
  // a time, so that the scores and the selection read logits still in cache rather than a second
  // pass over [T, E] from memory. Where the product is worth_threads and each thread gets
  // kMinThreadRows tokens, the threads share the tokens in contiguous runs, product and selection
  // on the same thread (else one run, whose product may still share its weight panels over the
  // threads). A token's row depends on that token alone (batch isolation, simd/matmul.hpp), so the
  // bits do not depend on the split. With check_finite, throws moe::numeric_error naming the
  // first non-finite logit.
  template <class Arch>
  void route_rows(Arch arch, const T* input, std::size_t ldx, RouterOutput<T>& out, index_t T_, index_t E) const {
    const index_t R = candidate_stride(), G = options_.expert_groups;
    out.candidate_expert.ensure(T_ * R);
    out.candidate_raw.ensure(T_ * R);
    out.candidate_chosen.ensure(T_);
    out.candidate_ranked.ensure(T_);
    const auto d = static_cast<std::size_t>(d_model()), n = static_cast<std::size_t>(E);
    const bool parallel = open_region(worth_threads<T>(static_cast<std::size_t>(T_), n, d));
    const index_t runs = parallel && T_ >= max_threads() * kMinThreadRows ? max_threads() : 1;
    // Each run's scratch starts on a cache line of its own (16 elements of 4 or 8 bytes are whole
    // 64-byte lines), so that the threads do not write to one line.
    const index_t row_stride = whole_lines(E), groups_stride = whole_lines(G);
    T* values = out.row_values.ensure(runs * row_stride);
    T* scratch = out.row_scratch.ensure(runs * row_stride);
    index_t* indices = out.row_indices.ensure(runs * row_stride);
    T* group_score = out.group_scores.ensure(runs * groups_stride);
    index_t* group_rank = out.group_rank.ensure(runs * groups_stride);
    T* logits = out.mutable_logits().data();
    const index_t block = std::max<index_t>(1, kBlockLogits / E);
    std::atomic<bool> non_finite{false};
    parallel_for(runs, runs > 1, [&](std::ptrdiff_t run) {
      const RowScratch s{values + run * row_stride, scratch + run * row_stride, indices + run * row_stride,
                         group_score + run * groups_stride, group_rank + run * groups_stride};
      for (index_t begin = T_ * run / runs, end = T_ * (run + 1) / runs; begin < end; begin += block) {
        const index_t rows = std::min(block, end - begin);
        const auto first = static_cast<std::size_t>(begin), count = static_cast<std::size_t>(rows);
        simd::matmul_nt_strided(arch, input + first * ldx, ldx, count, d, weight_.data(), n, logits + first * n, n);
        if (options_.check_finite && !simd::all_finite(arch, logits + first * n, count * n)) {
          non_finite.store(true, std::memory_order_relaxed);
          return;  // this run's later rows stay unwritten: the scan below stops before them
        }
        for (index_t t = begin; t < begin + rows; ++t) score_row(arch, out, t, E);
        for (index_t t = begin; t < begin + rows; ++t) rank_row(arch, out, t, E, s);
      }
    });
    // The scan meets the first non-finite logit before any unwritten row: a run stops at its first
    // block holding one, and the runs before it finished.
    if (non_finite.load(std::memory_order_relaxed))
      detail::check_finite_logits("TopKRouter::route", out.logits(), 0, T_);
  }

  static index_t whole_lines(index_t count) noexcept { return (count + 15) / 16 * 16; }

  template <class Arch>
  void score_row(Arch arch, RouterOutput<T>& out, index_t t, index_t E) const {
    const T* logits = out.logits().data() + t * E;
    T* scores = out.mutable_scores().data() + t * E;
    if (options_.score == ScoreFunction::softmax) {
      simd::softmax(arch, logits, scores, static_cast<std::size_t>(E));
    } else {
      simd::sigmoid(arch, logits, scores, static_cast<std::size_t>(E));
    }
  }

  // Group-limited routing: keep the best selected_groups groups by the sum of their best
  // group_score_top values; mask the rest. (Which groups are kept is what top_k of the group
  // scores with k = selected_groups gives, ties to the lower group.)
  template <class Arch>
  void limit_groups(Arch arch, T* values, const RowScratch& s) const {
    const index_t G = options_.expert_groups, size = num_experts() / G, top = options_.group_score_top;
    const index_t kept = options_.selected_groups;
    index_t* best = s.group_rank;
    const auto group_size = static_cast<std::size_t>(size), group_top = static_cast<std::size_t>(top);
    for (index_t g = 0; g < G; ++g) s.group_score[g] = simd::sum_of_top(arch, values + g * size, group_size, group_top);
    simd::top_k(arch, s.group_score, static_cast<std::size_t>(G), static_cast<std::size_t>(kept), best, s.scratch,
                s.indices);
    const T masked = options_.group_mask == GroupMask::zero ? T(0) : -std::numeric_limits<T>::infinity();
    for (index_t g = 0; g < G; ++g) {
      if (std::find(best, best + kept, g) == best + kept) std::fill(values + g * size, values + (g + 1) * size, masked);
    }
  }

  // Token t's candidates in rank order, how many are chosen, and each candidate's raw weight.
  template <class Arch>
  void rank_row(Arch arch, RouterOutput<T>& out, index_t t, index_t E, const RowScratch& s) const {
    const index_t k = options_.k, R = candidate_stride();
    const bool on_logits = options_.softmax_placement == SoftmaxPlacement::after_top_k;
    const bool has_bias = selection_bias_.size() > 0;
    const T* logits = out.logits().data() + t * E;
    const T* scores = out.scores().data() + t * E;
    T* values = s.values;
    const T* source = on_logits ? logits : scores;
    for (index_t e = 0; e < E; ++e) values[e] = source[e] + (has_bias ? selection_bias_[e] : T(0));
    if (options_.expert_groups > 1) limit_groups(arch, values, s);
    index_t* row = out.candidate_expert.data() + t * R;
    simd::top_k(arch, values, static_cast<std::size_t>(E), static_cast<std::size_t>(R), row, s.scratch, s.indices);

    // Experts masked by GroupMask::exclude (-inf) are never rerouting targets; GroupMask::zero's
    // are candidates like any other (they may be chosen too), so reroute can leave the groups.
    index_t eligible = R;
    while (eligible > k && values[row[eligible - 1]] == -std::numeric_limits<T>::infinity()) --eligible;
    out.candidate_ranked.data()[t] = eligible;

    index_t chosen = k;
    if (options_.top_p > 0) {
      T cumulative(0);
      chosen = 0;
      do {  // at least one expert, even for a top_p that rounds to 0 in T
        cumulative += scores[row[chosen++]];
      } while (chosen < k && cumulative < static_cast<T>(options_.top_p));
    }
    out.candidate_chosen.data()[t] = chosen;

    T* row_raw = out.candidate_raw.data() + t * R;
    if (on_logits) {
      // Softmax over the k chosen logits; rerouting candidates share the same denominator.
      // Shifted by the largest chosen logit (with a selection bias the first-ranked expert
      // need not have it), so no chosen term overflows and their sum is at least 1.
      T top = logits[row[0]];
      for (index_t j = 1; j < k; ++j) top = std::max(top, logits[row[j]]);
      T sum(0);
      for (index_t j = 0; j < R; ++j) row_raw[j] = std::exp(logits[row[j]] - top);
      for (index_t j = 0; j < k; ++j) sum += row_raw[j];
      for (index_t j = 0; j < R; ++j) row_raw[j] /= sum;
      // A rerouting candidate whose logit is far above the chosen ones (ranked below them by a
      // selection bias or a zero group mask) overflows exp before the division: one exp then.
      for (index_t j = k; j < R; ++j)
        if (std::isinf(row_raw[j])) row_raw[j] = std::exp(logits[row[j]] - top - std::log(sum));
    } else {
      for (index_t j = 0; j < R; ++j) row_raw[j] = scores[row[j]];
    }
  }

  // Applies capacity, computes final weights, records drops and reroutes, builds the plan.
  void decide_and_build(RouterOutput<T>& out, const GroupBounds& groups, index_t T_, index_t E) const {
    const index_t k = options_.k, R = candidate_stride();
    detail::TokenCandidates<T> c;
    c.stride = R;
    c.expert = out.candidate_expert.ensure(T_ * R);
    c.raw = out.candidate_raw.ensure(T_ * R);
    c.num_chosen = out.candidate_chosen.ensure(T_);
    c.num_ranked = out.candidate_ranked.ensure(T_);
    std::uint8_t* kept = out.candidate_kept.ensure(T_ * R);
    const bool capped = this->capped();
    if (capped) {
      detail::apply_capacity(options_.capacity_factor, options_.fixed_capacity, options_.capacity_priority, options_.overflow, k,
                             E, groups, c, kept, out.expert_load.ensure(E), out.candidate_order.ensure(T_ * R));
    } else {
      for (index_t t = 0; t < T_; ++t)
        for (index_t j = 0; j < R; ++j) kept[t * R + j] = j < c.num_chosen[t] ? 1 : 0;
    }

    index_t* begin = out.choice_begin.ensure(T_ + 1);
    index_t* chosen = out.choice_expert.ensure(T_ * k);
    T* weights = out.choice_weight.ensure(T_ * k);
    Routing<T>& plan = out.plan;  // empty since route's reshape: dropped and rerouted are filled below
    const T eps = options_.score == ScoreFunction::sigmoid ? T(1e-20) : T(0);  // DeepSeek-V3's denominator guard
    const T scale = static_cast<T>(options_.scale);
    const bool on_logits = options_.softmax_placement == SoftmaxPlacement::after_top_k;
    T* shares = out.row_scratch.ensure(R);
    index_t n = 0;
    for (index_t t = 0; t < T_; ++t) {
      begin[t] = n;
      const T* raw = c.raw + t * R;
      const std::uint8_t* keep = kept + t * R;
      T chosen_sum(0), kept_sum(0), lost(0);
      for (index_t j = 0; j < c.num_chosen[t]; ++j) chosen_sum += raw[j];
      bool kept_any = false;
      for (index_t j = 0; j < R; ++j) {
        kept_sum += keep[j] ? raw[j] : T(0);
        kept_any = kept_any || keep[j] != 0;
      }
      // Lost choices keep the plain normalization (their weight before the drop, which only
      // DroppedTokens::pass_through uses): renormalizing the survivors must not inflate it, and
      // over survivors of probability 1e-30 it would be 1e30 times the lost probability.
      T plain(1);
      if (options_.normalize) plain = chosen_sum + eps;
      // Every summed probability underflowed to 0: keep those zeros rather than 0/0 = NaN.
      if (plain == T(0)) plain = T(1);
      T denominator = plain;
      bool shares_from_logits = false;
      if (options_.renormalize_after_drop && capped && kept_any) {
        denominator = kept_sum + eps;
        if (denominator == T(0)) denominator = T(1);
        // Only a rerouted raw weight can overflow (softmax after top-k); raw / Σ kept raw is then
        // the softmax over the kept logits.
        shares_from_logits = on_logits && std::isinf(kept_sum);
        if (shares_from_logits)
          logit_shares(out.logits().data() + t * E, c.expert + t * R, R, [keep](index_t j) { return keep[j] != 0; }, shares);
      }
      // A lost choice that reroute moved elsewhere is not lost: only the others count.
      index_t moved = detail::rerouted_choices(keep, c.num_chosen[t], R);
      const bool was_rerouted = moved > 0;
      for (index_t j = 0; j < R; ++j) {
        if (keep[j]) {
          T w = (shares_from_logits ? shares[j] : raw[j] / denominator) * scale;
          if (!std::isfinite(w)) w = wide_weight(out.logits().data() + t * E, c.expert + t * R, j, raw[j], denominator);
          if (options_.check_finite && !std::isfinite(w)) throw_weight_overflow(t, c.expert[t * R + j], w, E, plan);
          chosen[n] = c.expert[t * R + j];
          weights[n++] = w;
        } else if (j < c.num_chosen[t]) {
          if (moved > 0) --moved; else lost += raw[j] / plain * scale;
        }
      }
      if (n - begin[t] < c.num_chosen[t]) {
        plan.dropped.push_back(t);
        plan.dropped_weight.push_back(lost);
      }
      if (was_rerouted) plan.rerouted.push_back(t);
    }
    begin[T_] = n;
    build_routing(T_, E, begin, chosen, weights, plan);
  }

  // With softmax after top-k, raw_j / Σ_{i kept} raw_i for the kept candidates j of one token (0
  // for the others), computed as a softmax over their logits (raw_j = e^(l_j − top) / s, and top
  // and s cancel): exact where Σ kept raw overflows T.
  template <class IsKept>
  static void logit_shares(const T* logits, const index_t* experts, index_t R, IsKept is_kept, T* shares) {
    T top = -std::numeric_limits<T>::infinity();
    for (index_t j = 0; j < R; ++j)
      if (is_kept(j)) top = std::max(top, logits[experts[j]]);
    T sum(0);
    for (index_t j = 0; j < R; ++j) {
      shares[j] = is_kept(j) ? std::exp(logits[experts[j]] - top) : T(0);
      sum += shares[j];
    }
    for (index_t j = 0; j < R; ++j) shares[j] /= sum;
  }

  // raw_j / denominator · scale for candidate j of a token whose experts (in rank order) are
  // `experts`, where that form overflowed T (a rerouted choice: raw_j itself beyond T, or the
  // quotient) while the value may still fit: in the log domain, in long double (on x86 also a wider
  // range and precision). A value beyond T's range comes back infinite.
  T wide_weight(const T* logits, const index_t* experts, index_t j, T raw_j, T denominator) const {
    using W = long double;
    W log_raw = std::log(static_cast<W>(raw_j));
    if (options_.softmax_placement == SoftmaxPlacement::after_top_k) {  // raw_j = e^(l_j − top) / Σ_{i<k} e^(l_i − top)
      W top = -std::numeric_limits<W>::infinity(), sum(0);
      for (index_t i = 0; i < options_.k; ++i) top = std::max(top, static_cast<W>(logits[experts[i]]));
      for (index_t i = 0; i < options_.k; ++i) sum += std::exp(static_cast<W>(logits[experts[i]]) - top);
      log_raw = static_cast<W>(logits[experts[j]]) - top - std::log(sum);
    }
    const W magnitude = std::exp(log_raw - std::log(static_cast<W>(denominator)) + std::log(std::fabs(static_cast<W>(options_.scale))));
    return static_cast<T>(std::signbit(options_.scale) ? -magnitude : magnitude);
  }

  // Leaves an empty plan behind (never a half-built one) and names the weight.
  [[noreturn]] static void throw_weight_overflow(index_t t, index_t expert, T w, index_t E, Routing<T>& plan) {
    plan.clear(E);
    detail::throw_numeric("TopKRouter::route: routing weight is beyond the range of the scalar type (token = ", t,
                          ", expert = ", expert, ", weight = ", w,
                          "): the choice was rerouted to an expert whose score is far above the chosen experts', and keeps their "
                          "denominator; renormalize_after_drop or OverflowPolicy::drop avoid it, check_finite = false lets it through");
  }

  Weight<T> weight_;  // [E, d]
  TopKOptions options_;
  Vector<T> selection_bias_;  // [E] or empty
};

MOE_NAMESPACE_END
