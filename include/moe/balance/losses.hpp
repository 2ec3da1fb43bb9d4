#pragma once
// Load-balancing losses for token-choice routers (README, "Training"). Each returns its value and writes
// its gradient with respect to the router logits z [T, E] (RouterOutput::logits()) into a [T, E]
// buffer the caller owns (a moe::Matrix, a MatrixMap or a row block). Values are accumulated in
// double whatever the scalar; each call allocates O(E) scratch (a loss is not the hot path).
//
// Notation. T tokens, E experts, k choices per token, α the coefficient.
//   p [T, E]  the scores the losses see: softmax(z_t) for softmax routers; for sigmoid routers the
//             sigmoid scores normalized per token, p_ti = σ(z_ti) / (Σ_j σ(z_tj) + 1e-20)
//             (Megatron-Core compute_routing_scores_for_aux_loss; DeepSeek-V3's s'_{i,t}).
//   c_i       tokens whose top-k holds expert i, counted *before* capacity drops, from the
//             token-major top-k ids [T, k] or from a dropless Routing plan. The counts are
//             constants: no gradient flows through the top-k, as in every reference.
//   P_i     = (1/T) Σ_t p_ti
//   f_i     = c_i / (T·k)   AuxLossNormalization::per_choice  (Megatron-Core, DeepSeek-V2/V3)
//   f_i     = c_i / T       AuxLossNormalization::per_token   (Hugging Face Mixtral, Qwen, Switch)
//
//   load_balancing_loss           L = α · E · Σ_i f_i · P_i
//   sequence_load_balancing_loss  L = α · (1/S) · Σ_s E · Σ_i f_si · P_si   f, P of each non-empty
//                                     sequence s alone (T → T_s); S = non-empty sequences
//   global_load_balancing_loss    L = α · E · Σ_i F_i · P_i   F_i = f_i of the counts a
//                                     LoadAccumulator summed over micro-batches (T → their tokens
//                                     N), P_i of this micro-batch
//   router_z_loss                 L = β · (1/T) · Σ_t (log Σ_e exp z_te)²                (ST-MoE)
//
// Values at the extremes (any score function): when every expert is chosen equally often
// (c_i = T·k/E) L = α under per_choice and α·k under per_token, whatever the scores, since Σ_i P_i
// = 1. When every token chooses the same k experts and puts all its score on them (collapse),
// L → α·E/k under per_choice and α·E under per_token; this is the maximum (f_i ≤ 1/k resp. 1).
//
// Gradients. Each loss is linear in p: L = Σ_t Σ_i w_ti p_ti with constant w (load_balancing_loss:
// w_ti = α·E·f_i/T). With d_t = Σ_i w_ti p_ti,
//   softmax:  ∂L/∂z_tj = p_tj · (w_tj − d_t)
//   sigmoid:  ∂L/∂z_tj = (w_tj − d_t) / (Σ_i σ(z_ti) + 1e-20) · σ(z_tj) · (1 − σ(z_tj))
//   z-loss:   ∂L/∂z_tj = 2β/T · lse_t · softmax(z_t)_j
//
// The references, and how to reproduce each:
// - Megatron-Core switch_load_balancing_loss_func(probs, tokens_per_expert, T, topk, E, coeff)
//   = coeff·E/(topk·T²) · Σ_i (Σ_t p_ti)·c_i: load_balancing_loss, AuxLossOptions::megatron.
//   Its sequence_load_balancing_loss_func ("seq_aux_loss") is sequence_load_balancing_loss with
//   the same options once its rows are reordered: Megatron's tokens are sequence-major (its probs
//   are viewed as [S, B, E], so row s·B + b is token s of sample b), where SequenceBounds needs
//   each sample's tokens contiguous (row b·S + s). Its "global_aux_loss" divides the running mean
//   of the counts over micro-batches by one micro-batch's token count: on one rank that equals F_i
//   here when the micro-batches have equal size (across ranks Megatron also divides the local
//   score sum by the global token count, i.e. P_i / ranks).
// - Hugging Face Mixtral / Qwen2-MoE / Qwen3-MoE load_balancing_loss_func: expert_mask =
//   one_hot(top-k ids) [T, k, E]; tokens_per_expert = mean over tokens [k, E], whose (j, i) entry
//   is the fraction of tokens whose j-th choice is i; router_prob_per_expert = mean over tokens of
//   softmax [E]; loss = E · Σ_{j,i} tokens_per_expert[j, i] · P_i = E · Σ_i (c_i/T) · P_i, and the
//   model adds router_aux_loss_coef · loss. That is load_balancing_loss with
//   AuxLossOptions::hf_mixtral(router_aux_loss_coef): balanced value α·k. HF concatenates every
//   layer's logits into one batch: stack the layers' logits and ids as rows to match; with an
//   attention mask, leave the padding rows out.
// - Hugging Face SwitchTransformers load_balancing_loss_func(router_probs [G, S, E], expert_index):
//   E² · mean over (g, i) of (c_gi/S)·P_gi = (1/G) Σ_g E · Σ_i (c_gi/S)·P_gi: that is
//   sequence_load_balancing_loss with AuxLossOptions::hf_switch and the G rows as sequences.
//   (HF passes argmax of the capacity-masked router mask, so a token dropped by capacity counts
//   for expert 0; pass such ids to reproduce that bit for bit.)
// - DeepSeek-V3 complementary sequence-wise loss: per sequence, L = α Σ_i f_i P_i with
//   f_i = E/(k·T_s) · c_i and P_i = (1/T_s) Σ_t s'_ti (s' normalized sigmoid scores), averaged over
//   the sequences: sequence_load_balancing_loss with AuxLossOptions::deepseek_v3. DeepSeek-V2's
//   expert-level loss is the same with softmax scores (AuxLossOptions::megatron).
// - Global-batch balance ("Demons in the Details", Qwen): f from the whole global batch (all
//   micro-batches, all ranks), P local: global_load_balancing_loss.
// - ST-MoE router z-loss (HF router_z_loss_func, Megatron z_loss_func): router_z_loss.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <type_traits>
#include <vector>

#include "../core/error.hpp"
#include "../core/types.hpp"
#include "../routing/routing.hpp"
#include "../routing/top_k.hpp"

MOE_NAMESPACE_BEGIN

enum class AuxLossNormalization {
  per_choice,  // f_i = c_i / (T·k), the fraction of the T·k choices (Megatron-Core, DeepSeek): balanced value α
  per_token,   // f_i = c_i / T, the fraction of tokens (Hugging Face Mixtral, Qwen, Switch): balanced value α·k
};

struct AuxLossOptions {
  double coefficient = 1.0;  // α
  ScoreFunction score = ScoreFunction::softmax;
  AuxLossNormalization normalization = AuxLossNormalization::per_choice;

  // Megatron-Core moe_aux_loss_coeff (aux_loss, seq_aux_loss, global_aux_loss).
  static AuxLossOptions megatron(double alpha, ScoreFunction score = ScoreFunction::softmax) {
    return {alpha, score, AuxLossNormalization::per_choice};
  }
  // Hugging Face Mixtral, Qwen2-MoE, Qwen3-MoE router_aux_loss_coef (load_balancing_loss).
  static AuxLossOptions hf_mixtral(double alpha) { return {alpha, ScoreFunction::softmax, AuxLossNormalization::per_token}; }
  // Hugging Face SwitchTransformers router_aux_loss_coef (sequence_load_balancing_loss, one
  // sequence per batch row).
  static AuxLossOptions hf_switch(double alpha) { return {alpha, ScoreFunction::softmax, AuxLossNormalization::per_token}; }
  // DeepSeek-V3 sequence-wise balance factor (sequence_load_balancing_loss).
  static AuxLossOptions deepseek_v3(double alpha) { return {alpha, ScoreFunction::sigmoid, AuxLossNormalization::per_choice}; }
};

// Sequence boundaries [num_sequences + 1]: sequence s is tokens [begin[s], begin[s+1]). They must
// start at 0, never decrease and end at T. A view: the caller keeps the boundaries alive.
struct SequenceBounds {
  const index_t* begin = nullptr;
  index_t num_sequences = 0;

  SequenceBounds() = default;
  SequenceBounds(const index_t* sequence_begin, index_t sequences) : begin(sequence_begin), num_sequences(sequences) {}
  SequenceBounds(const std::vector<index_t>& sequence_begin)  // NOLINT(google-explicit-constructor): a view, like Map
      : begin(sequence_begin.data()), num_sequences(std::max(static_cast<index_t>(sequence_begin.size()) - 1, index_t(0))) {}
};

// The per-token score normalizer's guard for sigmoid scores (Megatron-Core, DeepSeek-V3 code).
inline constexpr double kSigmoidScoreEpsilon = 1e-20;

namespace detail {

template <>
struct EnumNames<AuxLossNormalization> {
  static constexpr const char* names[] = {"per_choice", "per_token"};
};

template <class T>
void check_aux_options(const char* where, const AuxLossOptions& o) {
  check_finite_in<T>(where, "coefficient", o.coefficient);
  check_enum(where, "score", o.score);
  check_enum(where, "normalization", o.normalization);
}

inline void check_k(const char* where, index_t k, index_t num_experts) {
  if (k < 1 || k > num_experts) {
    throw_invalid(where, ": k must satisfy 1 <= k <= num_experts (k = ", k, ", num_experts = ", num_experts, ")");
  }
}

template <class T>
void check_loss_shapes(const char* where, const ConstMatrixRef<T>& logits, const MatrixRef<T>& grad) {
  if (logits.cols() < 1) {
    throw_invalid(where, ": logits must have one column per expert, at least one (logits.cols() = ", logits.cols(), ")");
  }
  check_dim(where, "grad.rows()", grad.rows(), "logits.rows()", logits.rows());
  check_dim(where, "grad.cols()", grad.cols(), "logits.cols()", logits.cols());
}

// Token-major top-k expert ids [T, k]: every id in [0, E), no id twice in a row. `rows` < 0 skips
// the row-count check.
inline void check_top_k_ids(const char* where, const ConstMatrixRef<index_t>& ids, index_t rows, index_t num_experts) {
  if (rows >= 0) check_dim(where, "top_k_ids.rows()", ids.rows(), "logits.rows()", rows);
  check_k(where, ids.cols(), num_experts);
  std::vector<index_t> seen(static_cast<std::size_t>(num_experts), index_t(-1));
  for (index_t t = 0; t < ids.rows(); ++t) {
    for (index_t j = 0; j < ids.cols(); ++j) {
      const index_t e = ids(t, j);
      if (e < 0 || e >= num_experts) {
        throw_invalid(where, ": top_k_ids holds an expert id out of range (top_k_ids(", t, ", ", j, ") = ", e,
                      ", num_experts = ", num_experts, ")");
      }
      if (seen[static_cast<std::size_t>(e)] == t) {
        throw_invalid(where, ": top_k_ids holds an expert twice for one token (token = ", t, ", expert = ", e, ")");
      }
      seen[static_cast<std::size_t>(e)] = t;
    }
  }
}

// A plan counts for the losses only if its assignments are the router's choices before capacity.
template <class T>
void check_plan(const char* where, const Routing<T>& plan, index_t k, index_t rows, index_t num_experts) {
  if (rows >= 0) check_dim(where, "plan.num_tokens", plan.num_tokens, "logits.rows()", rows);
  check_dim(where, "plan.num_experts", plan.num_experts, "num_experts", num_experts);
  check_k(where, k, num_experts);
  if (!plan.dropped.empty() || !plan.rerouted.empty()) {
    throw_invalid(where, ": the plan lost choices to capacity (dropped tokens = ", plan.dropped.size(), ", rerouted tokens = ",
                  plan.rerouted.size(), "); the counts must be taken before capacity: pass the top-k expert ids instead");
  }
  for (index_t t = 0; t < plan.num_tokens; ++t) {
    if (plan.experts_of(t) > k) {
      throw_invalid(where, ": a token of the plan holds more than k experts (token = ", t, ", experts = ", plan.experts_of(t),
                    ", k = ", k, ")");
    }
  }
}

// counts[e] += tokens in [begin, end) whose choices hold e.
inline void count_choices(const ConstMatrixRef<index_t>& ids, index_t begin, index_t end, index_t* counts) {
  for (index_t t = begin; t < end; ++t)
    for (index_t j = 0; j < ids.cols(); ++j) ++counts[ids(t, j)];
}
template <class T>
void count_choices(const Routing<T>& plan, index_t begin, index_t end, index_t* counts) {
  for (index_t t = begin; t < end; ++t) {
    for (index_t j = plan.token_begin[t]; j < plan.token_begin[t + 1]; ++j) {
      ++counts[plan.expert_of_assignment(plan.assignment[j])];
    }
  }
}

inline double stable_sigmoid(double z) noexcept {
  if (z >= 0) return 1.0 / (1.0 + std::exp(-z));
  const double e = std::exp(z);
  return e / (1.0 + e);
}

// For tokens [begin, end): returns Σ_t Σ_i w_i p_ti and writes ∂/∂z of it into grad's rows.
// `row` is [E] scratch.
template <class T>
double linear_score_loss(const char* where, const ConstMatrixRef<T>& logits, index_t begin, index_t end, const double* w,
                         ScoreFunction score, MatrixRef<T>& grad, std::vector<double>& row) {
  const index_t E = logits.cols();
  row.resize(static_cast<std::size_t>(E));
  double* p = row.data();
  double total = 0;
  for (index_t t = begin; t < end; ++t) {
    double top = -std::numeric_limits<double>::infinity();
    for (index_t e = 0; e < E; ++e) {
      const double z = static_cast<double>(logits(t, e));
      if (!std::isfinite(z)) throw_numeric(where, ": logit is not finite (token = ", t, ", expert = ", e, ", logit = ", z, ")");
      top = std::max(top, z);
    }
    double dot = 0;
    if (score == ScoreFunction::softmax) {
      double sum = 0;
      for (index_t e = 0; e < E; ++e) sum += (p[e] = std::exp(static_cast<double>(logits(t, e)) - top));
      for (index_t e = 0; e < E; ++e) dot += w[e] * (p[e] /= sum);
      for (index_t e = 0; e < E; ++e) grad(t, e) = static_cast<T>(p[e] * (w[e] - dot));
    } else {
      double sum = kSigmoidScoreEpsilon;
      for (index_t e = 0; e < E; ++e) sum += (p[e] = stable_sigmoid(static_cast<double>(logits(t, e))));  // σ
      for (index_t e = 0; e < E; ++e) dot += w[e] * p[e] / sum;
      for (index_t e = 0; e < E; ++e) {
        const double complement = stable_sigmoid(-static_cast<double>(logits(t, e)));  // 1 − σ, without cancellation
        grad(t, e) = static_cast<T>((w[e] - dot) / sum * p[e] * complement);
      }
    }
    total += dot;
  }
  return total;
}

// f_i · E · α / T_local as the per-expert weight w_i of linear_score_loss.
inline void balance_weights(const index_t* counts, index_t num_experts, double count_tokens, index_t k, index_t local_tokens,
                            const AuxLossOptions& o, std::vector<double>& w) {
  w.resize(static_cast<std::size_t>(num_experts));
  const double choices = o.normalization == AuxLossNormalization::per_choice ? count_tokens * static_cast<double>(k) : count_tokens;
  const double factor = o.coefficient * static_cast<double>(num_experts) / (choices * static_cast<double>(local_tokens));
  for (index_t e = 0; e < num_experts; ++e) w[static_cast<std::size_t>(e)] = factor * static_cast<double>(counts[e]);
}

template <class T, class Choices>
T batch_balance_loss(const char* where, const ConstMatrixRef<T>& logits, const Choices& choices, index_t k, MatrixRef<T> grad,
                     const AuxLossOptions& o) {
  const index_t Tn = logits.rows(), E = logits.cols();
  if (Tn == 0) return T(0);
  check_finite_logits(where, logits, 0, Tn);
  std::vector<index_t> counts(static_cast<std::size_t>(E), 0);
  count_choices(choices, 0, Tn, counts.data());
  std::vector<double> w, row;
  balance_weights(counts.data(), E, static_cast<double>(Tn), k, Tn, o, w);
  return static_cast<T>(linear_score_loss(where, logits, 0, Tn, w.data(), o.score, grad, row));
}

inline void check_sequences(const char* where, const SequenceBounds& s, index_t num_tokens) {
  // An empty batch may come without sequences, as RouteContext::with_groups({0}) and no groups allow.
  if (num_tokens == 0 && s.num_sequences == 0 && (s.begin == nullptr || s.begin[0] == 0)) return;
  if (s.num_sequences < 1) throw_invalid(where, ": num_sequences must be at least 1 (num_sequences = ", s.num_sequences, ")");
  if (s.begin == nullptr) throw_invalid(where, ": sequence_begin is null (num_sequences = ", s.num_sequences, ")");
  if (s.begin[0] != 0) throw_invalid(where, ": sequence_begin[0] must be 0 (sequence_begin[0] = ", s.begin[0], ")");
  for (index_t q = 0; q < s.num_sequences; ++q) {
    if (s.begin[q + 1] < s.begin[q]) {
      throw_invalid(where, ": sequence boundaries must not decrease (sequence_begin[", q, "] = ", s.begin[q], ", sequence_begin[",
                    q + 1, "] = ", s.begin[q + 1], ")");
    }
  }
  if (s.begin[s.num_sequences] != num_tokens) {
    throw_invalid(where, ": sequences must cover the batch (sequence_begin[num_sequences] = ", s.begin[s.num_sequences],
                  ", tokens = ", num_tokens, ")");
  }
}

template <class T, class Choices>
T sequence_balance_loss(const char* where, const ConstMatrixRef<T>& logits, const Choices& choices, index_t k,
                        const SequenceBounds& s, MatrixRef<T> grad, const AuxLossOptions& o) {
  const index_t E = logits.cols();
  index_t non_empty = 0;
  for (index_t q = 0; q < s.num_sequences; ++q) non_empty += s.begin[q + 1] > s.begin[q] ? 1 : 0;
  if (non_empty == 0) return T(0);
  check_finite_logits(where, logits, 0, logits.rows());
  std::vector<index_t> counts(static_cast<std::size_t>(E));
  std::vector<double> w, row;
  AuxLossOptions per_sequence = o;
  per_sequence.coefficient = o.coefficient / static_cast<double>(non_empty);
  double total = 0;
  for (index_t q = 0; q < s.num_sequences; ++q) {
    const index_t b = s.begin[q], e = s.begin[q + 1];
    if (b == e) continue;
    std::fill(counts.begin(), counts.end(), index_t(0));
    count_choices(choices, b, e, counts.data());
    balance_weights(counts.data(), E, static_cast<double>(e - b), k, e - b, per_sequence, w);
    total += linear_score_loss(where, logits, b, e, w.data(), o.score, grad, row);
  }
  return static_cast<T>(total);
}

template <class T>
T router_z_loss_impl(const ConstMatrixRef<T>& logits, MatrixRef<T> grad, double coefficient) {
  const char* where = "router_z_loss";
  const index_t Tn = logits.rows(), E = logits.cols();
  if (Tn == 0) return T(0);
  check_finite_logits(where, logits, 0, Tn);
  double total = 0;
  const double scale = 2.0 * coefficient / static_cast<double>(Tn);
  for (index_t t = 0; t < Tn; ++t) {
    double top = -std::numeric_limits<double>::infinity();
    for (index_t e = 0; e < E; ++e) {
      const double z = static_cast<double>(logits(t, e));
      if (!std::isfinite(z)) throw_numeric(where, ": logit is not finite (token = ", t, ", expert = ", e, ", logit = ", z, ")");
      top = std::max(top, z);
    }
    double sum = 0;
    for (index_t e = 0; e < E; ++e) sum += std::exp(static_cast<double>(logits(t, e)) - top);
    const double lse = top + std::log(sum);
    total += lse * lse;
    for (index_t e = 0; e < E; ++e) {
      grad(t, e) = static_cast<T>(scale * lse * std::exp(static_cast<double>(logits(t, e)) - top) / sum);
    }
  }
  return static_cast<T>(coefficient * total / static_cast<double>(Tn));
}

// Public entry points take any Eigen expression so T deduces; these bind them to row-major refs.
template <class L>
void check_logits_type() {
  static_assert(std::is_floating_point<typename L::Scalar>::value, "moe losses: logits must hold float or double");
}
template <class T, class G>
MatrixRef<T> writable_grad(const Eigen::MatrixBase<G>& grad) {
  static_assert(std::is_same<typename G::Scalar, T>::value, "moe losses: grad and logits scalar types differ");
  static_assert(G::IsRowMajor, "moe losses: grad must be row-major [T, E] (moe::Matrix<T>, moe::MatrixMap<T> or a row block)");
  // Eigen's documented idiom for output parameters that may be temporaries (a Map, a block).
  return MatrixRef<T>(const_cast<G&>(grad.derived()));  // NOLINT(cppcoreguidelines-pro-type-const-cast)
}
// Calls f(ConstMatrixRef<index_t>) on ids of any integer type; moe::index_t row-major ids bind
// without a copy, other ids are converted.
template <class I, class F>
decltype(auto) with_ids(const Eigen::MatrixBase<I>& ids, F&& f) {
  static_assert(std::is_integral<typename I::Scalar>::value, "moe losses: top_k_ids must hold integer expert ids");
  if constexpr (std::is_same<typename I::Scalar, index_t>::value) {
    return f(ConstMatrixRef<index_t>(ids.derived()));
  } else {
    const Matrix<index_t> converted = ids.template cast<index_t>();  // [T, k]
    return f(ConstMatrixRef<index_t>(converted));
  }
}

}  // namespace detail

// Switch/GShard auxiliary loss L = α · E · Σ_i f_i · P_i over the whole batch.
// logits [T, E]; top_k_ids [T, k] token-major chosen experts (k = top_k_ids.cols(), 1 <= k <= E);
// grad [T, E] receives ∂L/∂logits. T = 0 gives 0.
template <class L, class I, class G>
typename L::Scalar load_balancing_loss(const Eigen::MatrixBase<L>& logits, const Eigen::MatrixBase<I>& top_k_ids,
                                       const Eigen::MatrixBase<G>& grad, const AuxLossOptions& options = {}) {
  using T = typename L::Scalar;
  detail::check_logits_type<L>();
  const char* where = "load_balancing_loss";
  const ConstMatrixRef<T> z(logits.derived());
  MatrixRef<T> g = detail::writable_grad<T>(grad);
  detail::check_aux_options<T>(where, options);
  detail::check_loss_shapes<T>(where, z, g);
  return detail::with_ids(top_k_ids, [&](const ConstMatrixRef<index_t>& ids) {
    detail::check_top_k_ids(where, ids, z.rows(), z.cols());
    return detail::batch_balance_loss<T>(where, z, ids, ids.cols(), g, options);
  });
}

// The same, counting from the plan of a dropless router (a plan that lost no choice to capacity;
// otherwise moe::invalid_argument). k is the router's top-k (f_i = c_i/(T·k) under per_choice);
// every token must hold at most k experts.
template <class L, class G, class T>
T load_balancing_loss(const Eigen::MatrixBase<L>& logits, const Routing<T>& plan, index_t k, const Eigen::MatrixBase<G>& grad,
                      const AuxLossOptions& options = {}) {
  static_assert(std::is_same<typename L::Scalar, T>::value, "moe losses: logits and plan scalar types differ");
  const char* where = "load_balancing_loss";
  const ConstMatrixRef<T> z(logits.derived());
  MatrixRef<T> g = detail::writable_grad<T>(grad);
  detail::check_aux_options<T>(where, options);
  detail::check_loss_shapes<T>(where, z, g);
  detail::check_plan(where, plan, k, z.rows(), z.cols());
  return detail::batch_balance_loss<T>(where, z, plan, k, g, options);
}

// Sequence-level auxiliary loss (DeepSeek-V2/V3, Megatron seq_aux_loss, HF Switch with
// per_token): the batch loss of each non-empty sequence alone, averaged over them,
//   L = α · (1/S) · Σ_s E · Σ_i f_si · P_si.
// sequences: boundaries [S + 1] partitioning [0, T) (else moe::invalid_argument). Empty
// sequences are skipped and not counted in S; no non-empty sequence gives 0.
template <class L, class I, class G>
typename L::Scalar sequence_load_balancing_loss(const Eigen::MatrixBase<L>& logits, const Eigen::MatrixBase<I>& top_k_ids,
                                                const SequenceBounds& sequences, const Eigen::MatrixBase<G>& grad,
                                                const AuxLossOptions& options = {}) {
  using T = typename L::Scalar;
  detail::check_logits_type<L>();
  const char* where = "sequence_load_balancing_loss";
  const ConstMatrixRef<T> z(logits.derived());
  MatrixRef<T> g = detail::writable_grad<T>(grad);
  detail::check_aux_options<T>(where, options);
  detail::check_loss_shapes<T>(where, z, g);
  detail::check_sequences(where, sequences, z.rows());
  return detail::with_ids(top_k_ids, [&](const ConstMatrixRef<index_t>& ids) {
    detail::check_top_k_ids(where, ids, z.rows(), z.cols());
    return detail::sequence_balance_loss<T>(where, z, ids, ids.cols(), sequences, g, options);
  });
}

// The same, counting from the plan of a dropless router (see load_balancing_loss).
template <class L, class G, class T>
T sequence_load_balancing_loss(const Eigen::MatrixBase<L>& logits, const Routing<T>& plan, index_t k,
                               const SequenceBounds& sequences, const Eigen::MatrixBase<G>& grad,
                               const AuxLossOptions& options = {}) {
  static_assert(std::is_same<typename L::Scalar, T>::value, "moe losses: logits and plan scalar types differ");
  const char* where = "sequence_load_balancing_loss";
  const ConstMatrixRef<T> z(logits.derived());
  MatrixRef<T> g = detail::writable_grad<T>(grad);
  detail::check_aux_options<T>(where, options);
  detail::check_loss_shapes<T>(where, z, g);
  detail::check_sequences(where, sequences, z.rows());
  detail::check_plan(where, plan, k, z.rows(), z.cols());
  return detail::sequence_balance_loss<T>(where, z, plan, k, sequences, g, options);
}

// Sums the routing counts c_i and the token count over micro-batches (and, through add_counts,
// over ranks) for the global-batch loss. Add each micro-batch's choices before computing its loss.
class LoadAccumulator {
 public:
  LoadAccumulator(index_t num_experts, index_t k) : k_(k) {
    if (num_experts < 1) detail::throw_invalid("LoadAccumulator: num_experts must be at least 1 (num_experts = ", num_experts, ")");
    detail::check_k("LoadAccumulator", k, num_experts);
    counts_.assign(static_cast<std::size_t>(num_experts), 0);
  }

  index_t num_experts() const noexcept { return static_cast<index_t>(counts_.size()); }
  index_t k() const noexcept { return k_; }
  index_t tokens() const noexcept { return tokens_; }                // N, tokens added since reset
  index_t micro_batches() const noexcept { return micro_batches_; }  // add calls since reset
  const std::vector<index_t>& counts() const noexcept { return counts_; }  // [E] c_i summed

  // Adds one micro-batch's token-major top-k ids [T, k] (k = this accumulator's k).
  template <class I>
  void add(const Eigen::MatrixBase<I>& top_k_ids) {
    detail::with_ids(top_k_ids, [&](const ConstMatrixRef<index_t>& ids) {
      detail::check_dim("LoadAccumulator::add", "top_k_ids.cols()", ids.cols(), "k", k_);
      detail::check_top_k_ids("LoadAccumulator::add", ids, -1, num_experts());
      check_total("LoadAccumulator::add", ids.rows());
      detail::count_choices(ids, 0, ids.rows(), counts_.data());
      tokens_ += ids.rows();
    });
    ++micro_batches_;
  }
  // Adds the plan of a dropless router (no choice lost to capacity, at most k experts per token).
  template <class T>
  void add(const Routing<T>& plan) {
    detail::check_plan("LoadAccumulator::add", plan, k_, -1, num_experts());
    check_total("LoadAccumulator::add", plan.num_tokens);
    detail::count_choices(plan, 0, plan.num_tokens, counts_.data());
    tokens_ += plan.num_tokens;
    ++micro_batches_;
  }
  // Adds counts [E] over `tokens` tokens gathered elsewhere (e.g. all-reduced across ranks): each
  // in [0, tokens], and at most k choices per token in all, as add() would count them.
  void add_counts(const std::vector<index_t>& counts, index_t tokens) {
    const char* where = "LoadAccumulator::add_counts";
    detail::check_dim(where, "counts.size()", static_cast<index_t>(counts.size()), "num_experts", num_experts());
    if (tokens < 0) detail::throw_invalid(where, ": tokens must be >= 0 (tokens = ", tokens, ")");
    check_total(where, tokens);
    constexpr index_t kMax = std::numeric_limits<index_t>::max();
    const index_t choices = tokens > kMax / k_ ? kMax : tokens * k_;  // (no overflow)
    index_t total = 0;  // at most `choices`, checked before each addition
    for (std::size_t e = 0; e < counts.size(); ++e) {
      if (counts[e] < 0 || counts[e] > tokens) {
        detail::throw_invalid(where, ": counts[", e, "] must be in [0, tokens] (counts[", e, "] = ", counts[e], ", tokens = ", tokens, ")");
      }
      if (counts[e] > choices - total) {
        long double sum = 0;
        for (const index_t c : counts) sum += static_cast<long double>(c);
        detail::throw_invalid(where, ": counts must sum to at most tokens * k (sum = ", sum, ", tokens = ", tokens, ", k = ", k_, ")");
      }
      total += counts[e];
    }
    for (std::size_t e = 0; e < counts.size(); ++e) counts_[e] += counts[e];
    tokens_ += tokens;
    ++micro_batches_;
  }
  // Starts a new global batch.
  void reset() noexcept {
    std::fill(counts_.begin(), counts_.end(), index_t(0));
    tokens_ = 0;
    micro_batches_ = 0;
  }

 private:
  // The running token count must stay an index_t; each c_i is at most it, so it bounds them too.
  void check_total(const char* where, index_t tokens) const {
    if (tokens > std::numeric_limits<index_t>::max() - tokens_) {
      detail::throw_invalid(where, ": the accumulated token count would overflow (tokens so far = ", tokens_, ", tokens = ", tokens, ")");
    }
  }

  std::vector<index_t> counts_;  // [E]
  index_t k_ = 1;
  index_t tokens_ = 0;
  index_t micro_batches_ = 0;
};

// Global-batch loss L = α · E · Σ_i F_i · P_i: F_i from the accumulated counts (c_i/(N·k) or
// c_i/N), P_i over this micro-batch's logits [T, E]. T = 0 gives 0; T > 0 with an empty
// accumulator is an error (add this micro-batch first).
template <class L, class G>
typename L::Scalar global_load_balancing_loss(const Eigen::MatrixBase<L>& logits, const LoadAccumulator& load,
                                              const Eigen::MatrixBase<G>& grad, const AuxLossOptions& options = {}) {
  using T = typename L::Scalar;
  detail::check_logits_type<L>();
  const char* where = "global_load_balancing_loss";
  const ConstMatrixRef<T> z(logits.derived());
  MatrixRef<T> g = detail::writable_grad<T>(grad);
  detail::check_aux_options<T>(where, options);
  detail::check_loss_shapes<T>(where, z, g);
  detail::check_dim(where, "logits.cols()", z.cols(), "load.num_experts()", load.num_experts());
  const index_t Tn = z.rows();
  if (Tn == 0) return T(0);
  if (load.tokens() == 0) {
    detail::throw_invalid(where, ": the accumulator holds no tokens; add this micro-batch's choices first (load.tokens() = 0, tokens = ",
                          Tn, ")");
  }
  detail::check_finite_logits(where, z, 0, Tn);
  std::vector<double> w, row;
  detail::balance_weights(load.counts().data(), z.cols(), static_cast<double>(load.tokens()), load.k(), Tn, options, w);
  return static_cast<T>(detail::linear_score_loss(where, z, 0, Tn, w.data(), options.score, g, row));
}

// Router z-loss (ST-MoE): L = β · (1/T) · Σ_t (logsumexp_e logits_te)²; grad [T, E] receives
// 2β/T · lse_t · softmax(logits_t). T = 0 gives 0.
template <class L, class G>
typename L::Scalar router_z_loss(const Eigen::MatrixBase<L>& logits, const Eigen::MatrixBase<G>& grad, double coefficient = 1.0) {
  using T = typename L::Scalar;
  detail::check_logits_type<L>();
  const char* where = "router_z_loss";
  const ConstMatrixRef<T> z(logits.derived());
  MatrixRef<T> g = detail::writable_grad<T>(grad);
  detail::check_finite_in<T>(where, "coefficient", coefficient);
  detail::check_loss_shapes<T>(where, z, g);
  return detail::router_z_loss_impl<T>(z, g, coefficient);
}

MOE_NAMESPACE_END
