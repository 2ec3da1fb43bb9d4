#pragma once
// Token-choice top-k routing (Switch, GShard, Mixtral, Qwen, DeepSeek-V3 scoring).
//
//   logits = x · Wᵀ                       W [E, d] (PyTorch gate.weight)
//   scores = softmax(logits) over E, or sigmoid(logits)
//   chosen = the k best of (selection values + selection bias), ties to the lower expert index;
//            selection values are the scores, or the logits when the softmax comes after top-k
//   weight = score of each chosen expert (or softmax over the k chosen logits), optionally
//            divided by the sum of the k, then multiplied by `scale`
// The selection bias (DeepSeek e_score_correction_bias) changes which experts are chosen, never
// the weights.
#include <cmath>
#include <cstddef>
#include <limits>
#include <utility>

#include "../core/error.hpp"
#include "../core/types.hpp"
#include "../core/weight.hpp"
#include "../simd/softmax.hpp"
#include "../simd/top_k.hpp"
#include "context.hpp"
#include "router_output.hpp"

MOE_NAMESPACE_BEGIN

enum class ScoreFunction {
  softmax,  // probabilities over the E experts (Switch, Mixtral, Qwen)
  sigmoid,  // independent per-expert scores (DeepSeek-V3)
};

// Where the softmax sits relative to the top-k selection. The two give the same experts; the
// weights agree in exact arithmetic when `normalize` is on, and differ without it.
// Note the naming: Megatron-Core's `moe_router_pre_softmax = true` is `before_top_k`, its default
// is `after_top_k`.
enum class SoftmaxPlacement {
  before_top_k,  // softmax over all E, then top-k of the probabilities (Mixtral, Switch)
  after_top_k,   // top-k of the logits, then softmax over the k chosen (Megatron default)
};

struct TopKOptions {
  index_t k = 1;
  ScoreFunction score = ScoreFunction::softmax;
  SoftmaxPlacement softmax_placement = SoftmaxPlacement::before_top_k;
  bool normalize = false;     // divide the k weights by their sum (Mixtral: yes, Switch: no)
  double scale = 1.0;         // routed scaling factor applied to the final weights (DeepSeek-V3: 2.5)
  bool check_finite = true;   // throw moe::numeric_error on a non-finite logit
};

template <class T>
class TopKRouter {
 public:
  using Scalar = T;

  // Views the caller's gate weight W [E, d] (no copy).
  TopKRouter(ConstMatrixMap<T> weight, TopKOptions options = {}) : TopKRouter(Weight<T>::view(weight), options) {}
  // Owns its gate weight.
  TopKRouter(Matrix<T> weight, TopKOptions options = {}) : TopKRouter(Weight<T>::own(std::move(weight)), options) {}
  TopKRouter(Weight<T> weight, TopKOptions options) : weight_(std::move(weight)), options_(options) {
    const index_t E = num_experts();
    if (E < 1) detail::throw_invalid("TopKRouter: num_experts must be at least 1 (num_experts = ", E, ")");
    if (options_.k < 1 || options_.k > E) {
      detail::throw_invalid("TopKRouter: k must satisfy 1 <= k <= num_experts (k = ", options_.k, ", num_experts = ", E, ")");
    }
    if (!std::isfinite(options_.scale)) detail::throw_invalid("TopKRouter: scale must be finite (scale = ", options_.scale, ")");
    if (options_.score == ScoreFunction::sigmoid && options_.softmax_placement == SoftmaxPlacement::after_top_k) {
      detail::throw_invalid("TopKRouter: softmax_placement = after_top_k needs score = softmax (score = sigmoid)");
    }
  }

  index_t num_experts() const noexcept { return weight_.rows(); }
  index_t d_model() const noexcept { return weight_.cols(); }
  index_t k() const noexcept { return options_.k; }
  const TopKOptions& options() const noexcept { return options_; }
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
    const index_t T_ = x.rows();
    const index_t E = num_experts();
    const index_t k = options_.k;
    const GroupBounds groups(ctx, T_, "TopKRouter::route");
    (void)groups;  // plain top-k has no cross-token dependence; capacity will use the groups
    out.reshape(T_, E);
    MatrixMap<T> logits = out.mutable_logits();
    if (T_ > 0) logits.noalias() = x * weight().transpose();
    if (options_.check_finite) check_finite_logits(logits);
    compute_scores(arch, logits, out.mutable_scores());
    select(arch, out, T_, E, k);
    out.plan.dropped.clear();
    build_routing(T_, E, out.choice_begin.ensure(T_ + 1), out.choice_expert.ensure(T_ * k),
                  out.choice_weight.ensure(T_ * k), out.plan);
  }

 private:
  static void check_finite_logits(const MatrixMap<T>& logits) {
    for (index_t t = 0; t < logits.rows(); ++t) {
      for (index_t e = 0; e < logits.cols(); ++e) {
        if (!std::isfinite(logits(t, e))) {
          detail::throw_numeric("TopKRouter::route: logit is not finite (token = ", t, ", expert = ", e,
                                ", logit = ", logits(t, e), ")");
        }
      }
    }
  }

  template <class Arch>
  void compute_scores(Arch arch, const MatrixMap<T>& logits, MatrixMap<T> scores) const {
    const auto E = static_cast<std::size_t>(logits.cols());
    for (index_t t = 0; t < logits.rows(); ++t) {
      if (options_.score == ScoreFunction::softmax) {
        simd::softmax(arch, &logits(t, 0), &scores(t, 0), E);
      } else {
        simd::sigmoid(arch, &logits(t, 0), &scores(t, 0), E);
      }
    }
  }

  template <class Arch>
  void select(Arch arch, RouterOutput<T>& out, index_t T_, index_t E, index_t k) const {
    index_t* begin = out.choice_begin.ensure(T_ + 1);
    index_t* chosen = out.choice_expert.ensure(T_ * k);
    T* weights = out.choice_weight.ensure(T_ * k);
    T* values = out.row_values.ensure(E);
    T* scratch = out.row_scratch.ensure(E);
    index_t* indices = out.row_indices.ensure(E);
    const bool select_on_logits = options_.softmax_placement == SoftmaxPlacement::after_top_k;
    const bool has_bias = selection_bias_.size() > 0;
    const ConstMatrixMap<T> logits = out.logits();
    const ConstMatrixMap<T> scores = out.scores();

    for (index_t t = 0; t < T_; ++t) {
      begin[t] = t * k;
      const T* source = (select_on_logits ? logits.data() : scores.data()) + t * E;
      for (index_t e = 0; e < E; ++e) values[e] = source[e] + (has_bias ? selection_bias_[e] : T(0));
      index_t* row_chosen = chosen + t * k;
      T* row_weights = weights + t * k;
      simd::top_k(arch, values, static_cast<std::size_t>(E), static_cast<std::size_t>(k), row_chosen, scratch, indices);

      if (select_on_logits) {
        for (index_t j = 0; j < k; ++j) row_weights[j] = logits(t, row_chosen[j]);
        simd::softmax(arch, row_weights, row_weights, static_cast<std::size_t>(k));
      } else {
        for (index_t j = 0; j < k; ++j) row_weights[j] = scores(t, row_chosen[j]);
      }
      if (options_.normalize) {
        T sum(0);
        for (index_t j = 0; j < k; ++j) sum += row_weights[j];
        // Sigmoid scores can all underflow to 0; DeepSeek-V3 adds 1e-20 to the denominator.
        if (options_.score == ScoreFunction::sigmoid) sum += T(1e-20);
        for (index_t j = 0; j < k; ++j) row_weights[j] /= sum;
      }
      if (options_.scale != 1.0) {
        for (index_t j = 0; j < k; ++j) row_weights[j] *= static_cast<T>(options_.scale);
      }
    }
    begin[T_] = T_ * k;
  }

  Weight<T> weight_;  // [E, d]
  TopKOptions options_;
  Vector<T> selection_bias_;  // [E] or empty
};

MOE_NAMESPACE_END
