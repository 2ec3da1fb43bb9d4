#pragma once
// Soft MoE routing (Puigcerver et al. 2023, "From Sparse to Soft Mixture of Experts").
//
//   Φ [d, S]       slot parameters, S = E·s slots (s = slots_per_expert). Column e·s + j is slot j
//                  of expert e. This is the layout of the reference's parameter (vmoe SoftRouter
//                  `mu`, shape (d, E, s)) flattened row-major, so its buffer maps in unchanged.
//                  Note that it is the transpose of the PyTorch nn.Linear [out, in] convention the
//                  other weights follow: a port that stores slot embeddings as [E, s, d] must pass
//                  their transpose.
//   L = x · Φ                       [T, S] logits
//   D = softmax of L over tokens    [T, S] dispatch weights: each column sums to 1
//   C = softmax of L over slots     [T, S] combine weights: each row sums to 1
//   X̃ = Dᵀ · x                      [S, d] slot inputs; expert e processes slots e·s .. e·s+s-1
//   y = C · Ỹ                       [T, d] (Ỹ [S, d]: the expert outputs; dispatch/soft_dispatch.hpp)
//
// Normalized variant (`normalized`, as vmoe's SoftRouter): the logits are scale · x̂ · Φ̂ with
//   x̂[t] = x[t] · rsqrt(Σ_i x[t,i]² + 1e-6)       each token row normalized
//   Φ̂[:, j] = Φ[:, j] · rsqrt(Σ_i Φ[i,j]² + 1e-6)  each slot column normalized along d
// computed as L[t,j] = (x·Φ)[t,j] · rsqrt_x[t] · (scale · rsqrt_Φ[j]), algebraically the same,
// without normalized copies of x or Φ. The slot inputs mix the original x, not x̂. `scale`
// (vmoe's learned scalar, initialised to 1) multiplies the logits in both variants.
//
// Routing groups (RouteContext, README, "Guarantees"): with G groups each group is its own Soft MoE. The
// token softmax D runs over the group's tokens only and each group has its own S slots, so a
// group's slot inputs are mixtures of its own tokens and nothing else. The slot buffer is then
// [G·S, d], expert-major: slot j of expert e for group g is row (e·G + g)·s + j
// (SoftRouting::slot_row), so expert e's s·G rows are contiguous and the expert runs once on all
// of them. Without groups (G = 1) this is the plain [S, d] layout.
//
// Bits: the logits are sums in a fixed order (simd::matmul_nn), D is computed within each group
// and C within each token, all by kernels that treat an element the same way wherever it sits, so
// a group's routing does not change in any bit whatever the other groups hold.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "../core/error.hpp"
#include "../core/fingerprint.hpp"
#include "../core/threads.hpp"
#include "../core/types.hpp"
#include "../core/weight.hpp"
#include "../core/workspace.hpp"
#include "../simd/arch.hpp"
#include "../simd/matmul_nn.hpp"
#include "../simd/rows.hpp"
#include "../simd/softmax.hpp"
#include "context.hpp"

MOE_NAMESPACE_BEGIN

struct SoftOptions {
  index_t slots_per_expert = 1;  // s >= 1; Φ must have num_experts · s columns
  bool normalized = false;       // vmoe's SoftRouter normalization of x and Φ
  double scale = 1.0;            // multiplies the logits (vmoe's learned `scale`)
  bool check_finite = true;      // throw moe::numeric_error on a non-finite logit
};

// Slots per expert from a capacity factor, as vmoe's SoftRouter sizes its parameter when it is given
// no slot count: round(tokens_per_group · capacity_factor / num_experts), computed in double, with
// halves to even (Python's round). Φ's column count is fixed when the model is built, so
// tokens_per_group is the group size the model is built for (a ViT's patch count), not a batch's.
// Throws when the inputs are out of range or the result is below 1 (as vmoe does).
inline index_t soft_slots_per_expert(index_t tokens_per_group, index_t num_experts, double capacity_factor) {
  if (tokens_per_group < 1 || num_experts < 1 || !(capacity_factor > 0) || !std::isfinite(capacity_factor)) {
    detail::throw_invalid("soft_slots_per_expert: needs tokens_per_group >= 1, num_experts >= 1 and a finite "
                          "capacity_factor > 0 (tokens_per_group = ", tokens_per_group, ", num_experts = ", num_experts,
                          ", capacity_factor = ", capacity_factor, ")");
  }
  const double exact = static_cast<double>(tokens_per_group) * capacity_factor / static_cast<double>(num_experts);
  const double below = std::floor(exact);
  const double above = below + 1;
  const double fraction = exact - below;  // no rounding: the difference fits exact's bits
  const double slots = fraction > 0.5 ? above : fraction < 0.5 ? below : (std::fmod(below, 2.0) == 0 ? below : above);
  constexpr double kLimit = static_cast<double>(std::numeric_limits<index_t>::max());  // 2^63
  if (!(slots >= 1) || !(slots < kLimit)) {
    detail::throw_invalid("soft_slots_per_expert: round(tokens_per_group * capacity_factor / num_experts) must be in "
                          "[1, 2^63) (tokens_per_group = ", tokens_per_group, ", num_experts = ", num_experts,
                          ", capacity_factor = ", capacity_factor, ", rounded = ", slots, ")");
  }
  return static_cast<index_t>(slots);
}

// The dense routing of one batch: logits, dispatch weights D and combine weights C, all [T, S],
// and the group boundaries they were computed with. Reused across batches: once it has seen the
// largest batch (and the most groups) routing into it allocates nothing.
template <class T>
class SoftRouting {
 public:
  index_t num_tokens() const noexcept { return num_tokens_; }
  index_t num_experts() const noexcept { return num_experts_; }
  index_t slots_per_expert() const noexcept { return slots_per_expert_; }
  index_t num_slots() const noexcept { return num_experts_ * slots_per_expert_; }  // S = E·s
  index_t num_groups() const noexcept { return num_groups_; }
  // Group g is tokens [group_begin(g), group_end(g)).
  index_t group_begin(index_t g) const noexcept { return group_begin_[static_cast<std::size_t>(g)]; }
  index_t group_end(index_t g) const noexcept { return group_begin_[static_cast<std::size_t>(g + 1)]; }
  index_t group_size(index_t g) const noexcept { return group_end(g) - group_begin(g); }

  // The slot buffer has slot_rows() = G·S rows, expert-major: expert e owns the rows_per_expert()
  // = s·G rows starting at expert_first_row(e); within them group g's s slots are contiguous.
  index_t slot_rows() const noexcept { return num_groups_ * num_slots(); }
  index_t rows_per_expert() const noexcept { return num_groups_ * slots_per_expert_; }
  index_t expert_first_row(index_t expert) const noexcept { return expert * rows_per_expert(); }
  index_t slot_row(index_t expert, index_t group, index_t slot) const noexcept {
    return (expert * num_groups_ + group) * slots_per_expert_ + slot;
  }

  // [T, S] logits (after normalization and scale).
  ConstMatrixMap<T> logits() const noexcept { return ConstMatrixMap<T>(logits_.data(), num_tokens_, num_slots()); }
  // [T, S] D: softmax of the logits over the tokens of each group (each column sums to 1 per group).
  ConstMatrixMap<T> dispatch_weights() const noexcept { return ConstMatrixMap<T>(dispatch_.data(), num_tokens_, num_slots()); }
  // [T, S] C: softmax of the logits over the slots (each row sums to 1).
  ConstMatrixMap<T> combine_weights() const noexcept { return ConstMatrixMap<T>(combine_.data(), num_tokens_, num_slots()); }

  // How many routes have begun into this routing (see RouterOutput::route_count).
  std::uint64_t route_count() const noexcept { return route_count_; }
  // The fingerprint of the router that last routed into it (SoftRouter::config_fingerprint()).
  std::uint64_t router_config() const noexcept { return router_config_; }

  // The scale the last route multiplied the logits by (SoftRouter::set_scale may change it later).
  double scale() const noexcept { return scale_; }

  // For routers: sizes the buffers for `tokens` tokens in `groups`, stamped with the router's
  // config_fingerprint() and its scale.
  void reshape(index_t tokens, index_t experts, index_t slots_per_expert, const GroupBounds& groups,
               std::uint64_t router_config, double scale) {
    ++route_count_;
    router_config_ = router_config;
    scale_ = scale;
    num_tokens_ = tokens;
    num_experts_ = experts;
    slots_per_expert_ = slots_per_expert;
    num_groups_ = groups.count();
    resize_keep(group_begin_, num_groups_ + 1);
    for (index_t g = 0; g < num_groups_; ++g) group_begin_[static_cast<std::size_t>(g)] = groups.begin(g);
    group_begin_[static_cast<std::size_t>(num_groups_)] = groups.end(num_groups_ - 1);
    const index_t n = tokens * num_slots();
    logits_.ensure(n);
    dispatch_.ensure(n);
    combine_.ensure(n);
  }
  // For routers: the empty routing (no tokens, one group), keeping the memory. A route that
  // throws leaves this, never logits of one batch beside D and C of another.
  void clear() noexcept {
    num_tokens_ = 0;
    num_groups_ = 1;
    group_begin_.resize(2);  // (never below 2 elements: no allocation)
    group_begin_[0] = group_begin_[1] = 0;
  }
  MatrixMap<T> mutable_logits() noexcept { return MatrixMap<T>(logits_.data(), num_tokens_, num_slots()); }
  MatrixMap<T> mutable_dispatch_weights() noexcept { return MatrixMap<T>(dispatch_.data(), num_tokens_, num_slots()); }
  MatrixMap<T> mutable_combine_weights() noexcept { return MatrixMap<T>(combine_.data(), num_tokens_, num_slots()); }

  // Router scratch.
  Buffer<T> column_max;    // [S]
  Buffer<T> column_sum;    // [S]
  Buffer<T> column_scale;  // [S] normalized variant: scale · rsqrt(Σ Φ² + eps) per slot

 private:
  index_t num_tokens_ = 0;
  index_t num_experts_ = 0;
  index_t slots_per_expert_ = 1;
  index_t num_groups_ = 1;
  std::vector<index_t> group_begin_ = {0, 0};
  std::uint64_t route_count_ = 0;
  std::uint64_t router_config_ = 0;
  double scale_ = 1.0;
  Buffer<T> logits_;
  Buffer<T> dispatch_;
  Buffer<T> combine_;
};

namespace detail {

// Column-wise kernels on one row of n elements; each column is treated the same way whichever
// row it is in, so a column's result depends only on its own values and n.

// acc[j] = max(acc[j], row[j]).
template <class Arch, class T>
void soft_column_max(Arch, const T* row, T* acc, std::size_t n) noexcept {
  using B = simd::batch<T, Arch>;
  constexpr std::size_t L = B::size;
  std::size_t j = 0;
  for (; j + L <= n; j += L) xsimd::max(B::load_unaligned(acc + j), B::load_unaligned(row + j)).store_unaligned(acc + j);
  for (; j < n; ++j) acc[j] = row[j] > acc[j] ? row[j] : acc[j];
}

// out[j] = exp(row[j] - shift[j]); sum[j] += out[j].
template <class Arch, class T>
void soft_column_exp(Arch, const T* row, const T* shift, T* out, T* sum, std::size_t n) noexcept {
  using B = simd::batch<T, Arch>;
  constexpr std::size_t L = B::size;
  std::size_t j = 0;
  for (; j + L <= n; j += L) {
    const B e = simd::exp_batch(B::load_unaligned(row + j) - B::load_unaligned(shift + j));
    e.store_unaligned(out + j);
    (B::load_unaligned(sum + j) + e).store_unaligned(sum + j);
  }
  for (; j < n; ++j) {
    out[j] = std::exp(row[j] - shift[j]);
    sum[j] += out[j];
  }
}

// row[j] *= factor[j].
template <class Arch, class T>
void soft_column_mul(Arch, const T* factor, T* row, std::size_t n) noexcept {
  using B = simd::batch<T, Arch>;
  constexpr std::size_t L = B::size;
  std::size_t j = 0;
  for (; j + L <= n; j += L) (B::load_unaligned(row + j) * B::load_unaligned(factor + j)).store_unaligned(row + j);
  for (; j < n; ++j) row[j] *= factor[j];
}

// acc[j] += row[j]².
template <class Arch, class T>
void soft_column_sum_squares(Arch, const T* row, T* acc, std::size_t n) noexcept {
  using B = simd::batch<T, Arch>;
  constexpr std::size_t L = B::size;
  std::size_t j = 0;
  for (; j + L <= n; j += L) {
    const B v = B::load_unaligned(row + j);
    simd::fma(v, v, B::load_unaligned(acc + j)).store_unaligned(acc + j);
  }
  for (; j < n; ++j) acc[j] = simd::madd(row[j], row[j], acc[j]);
}

// Σ x[i]².
template <class Arch, class T>
T soft_sum_squares(Arch, const T* x, std::size_t n) noexcept {
  using B = simd::batch<T, Arch>;
  constexpr std::size_t L = B::size;
  B acc(T(0));
  std::size_t i = 0;
  for (; i + L <= n; i += L) {
    const B v = B::load_unaligned(x + i);
    acc = simd::fma(v, v, acc);
  }
  T sum = simd::reduce_add(acc);
  for (; i < n; ++i) sum = simd::madd(x[i], x[i], sum);
  return sum;
}

// The epsilon inside the rsqrt of the normalized variant (vmoe `normalize`).
inline constexpr double kSoftNormEpsilon = 1e-6;

// rsqrt(Σ_i v_i² + eps) for the n values v[i · stride], given `sum`, their sum of squares as the
// caller computed it. Where that sum overflowed (a norm above ~1.8e19 in float, ~1.3e154 in
// double) it is recomputed from the values divided by the largest |v_i|, as hypot does: the
// normalized logits are at most `scale` whatever the norm, and would otherwise collapse to 0.
// A non-finite value keeps the overflowed result (its logits are not finite: check_finite). The
// logits still form x·Φ before scaling it: norms whose product passes T's largest overflow there.
template <class T>
T soft_inverse_norm(T sum, const T* v, std::size_t n, std::size_t stride) noexcept {
  const auto eps = static_cast<T>(kSoftNormEpsilon);
  if (sum <= std::numeric_limits<T>::max()) return T(1) / std::sqrt(sum + eps);  // the usual case
  T largest(0);
  for (std::size_t i = 0; i < n; ++i) largest = std::max(largest, std::abs(v[i * stride]));
  if (!(largest <= std::numeric_limits<T>::max())) return T(1) / std::sqrt(sum + eps);
  T scaled(0);
  for (std::size_t i = 0; i < n; ++i) {
    const T u = v[i * stride] / largest;
    scaled += u * u;
  }
  return T(1) / largest / std::sqrt(scaled + eps / largest / largest);
}

}  // namespace detail

template <class T>
class SoftRouter {
 public:
  using Scalar = T;

  // Views the caller's Φ [d, num_experts · slots_per_expert] (no copy).
  SoftRouter(ConstMatrixMap<T> phi, index_t num_experts, SoftOptions options = {})
      : SoftRouter(Weight<T>::view(phi), num_experts, options) {}
  // Owns its Φ.
  SoftRouter(Matrix<T> phi, index_t num_experts, SoftOptions options = {})
      : SoftRouter(Weight<T>::own(std::move(phi)), num_experts, options) {}
  SoftRouter(Weight<T> phi, index_t num_experts, SoftOptions options)
      : phi_(std::move(phi)), num_experts_(num_experts), options_(options) {
    if (num_experts_ < 1) detail::throw_invalid("SoftRouter: num_experts must be at least 1 (num_experts = ", num_experts_, ")");
    if (options_.slots_per_expert < 1) {
      detail::throw_invalid("SoftRouter: slots_per_expert must be at least 1 (slots_per_expert = ", options_.slots_per_expert, ")");
    }
    // (Compared by division: num_experts * slots_per_expert may overflow.)
    if (phi_.cols() % options_.slots_per_expert != 0 || phi_.cols() / options_.slots_per_expert != num_experts_) {
      detail::throw_invalid("SoftRouter: phi.cols() must equal num_experts * slots_per_expert (phi.cols() = ", phi_.cols(),
                            ", num_experts = ", num_experts_, ", slots_per_expert = ", options_.slots_per_expert, ")");
    }
    detail::check_positive("SoftRouter", "phi.rows() (d_model)", phi_.rows());
    set_scale(options_.scale);
  }

  // Sets the logits' scale (vmoe's learned scalar; its gradient is SoftMoELayer's Gradients::scale).
  // A scale not finite in T throws and leaves the old one.
  void set_scale(double scale) {
    detail::check_finite_in<T>("SoftRouter", "scale", scale);
    options_.scale = scale;
  }

  index_t num_experts() const noexcept { return num_experts_; }
  index_t slots_per_expert() const noexcept { return options_.slots_per_expert; }
  index_t num_slots() const noexcept { return phi_.cols(); }
  index_t d_model() const noexcept { return phi_.rows(); }
  // The expert and slot counts, the width, normalization and check_finite (not Φ or the learned
  // scale): backward refuses a SoftRouting this fingerprint did not stamp.
  std::uint64_t config_fingerprint() const noexcept {
    return detail::Fingerprint()
        .add(4).add(num_experts_).add(d_model()).add(options_.slots_per_expert).add(options_.normalized).add(options_.check_finite)
        .value();
  }
  const SoftOptions& options() const noexcept { return options_; }
  ConstMatrixMap<T> phi() const noexcept { return phi_.map(); }  // [d, S]

  // Throws unless `routing` was routed with this router's scale: a set_scale between a route and
  // its backward would pair the old logits with the new scale's derivatives.
  void check_scale(const char* where, const SoftRouting<T>& routing) const {
    if (routing.scale() != options_.scale) {
      detail::throw_invalid(where, ": the router's scale changed after the route (routing's scale = ", routing.scale(),
                            ", router's scale = ", options_.scale, "); call set_scale after backward");
    }
  }

  // Routes x [T, d] into `out`. T = 0 gives an empty routing.
  template <class Arch = simd::default_arch>
  void route(const ConstMatrixRef<T>& x, SoftRouting<T>& out, Arch arch = {}) const {
    route(x, RouteContext{}, out, arch);
  }
  // As above, computing D within each routing group of `ctx`.
  template <class Arch = simd::default_arch>
  void route(const ConstMatrixRef<T>& x, const RouteContext& ctx, SoftRouting<T>& out, Arch arch = {}) const {
    detail::check_dim("SoftRouter::route", "x.cols()", x.cols(), "d_model", d_model());
    detail::check_rows("SoftRouter::route", "x", x, false);
    const index_t T_ = x.rows();
    const index_t S = num_slots();
    const auto n_slots = static_cast<std::size_t>(S);
    const GroupBounds groups(ctx, T_, "SoftRouter::route");
    out.reshape(T_, num_experts_, options_.slots_per_expert, groups, config_fingerprint(), options_.scale);
    if (T_ == 0) return;

    const index_t d = d_model();
    T* column_max = out.column_max.ensure(S);
    T* column_sum = out.column_sum.ensure(S);
    MatrixMap<T> logits = out.mutable_logits();
    MatrixMap<T> dispatch_w = out.mutable_dispatch_weights();
    MatrixMap<T> combine_w = out.mutable_combine_weights();

    // L[t] = Σ_i x[t, i] · Φ row i: each logit one chain of FMAs in i order (simd::matmul_nn),
    // whatever else is in the batch and whichever thread computes it.
    simd::matmul_nn_strided(arch, x.data(), static_cast<std::size_t>(x.outerStride()), static_cast<std::size_t>(T_),
                            static_cast<std::size_t>(d), phi().data(), n_slots, n_slots, logits.data(), n_slots, false);
    if (options_.normalized) {
      T* column_scale = out.column_scale.ensure(S);
      compute_column_scale(arch, column_scale);
      for (index_t t = 0; t < T_; ++t) {
        const T* x_row = x.data() + t * x.outerStride();
        const T sum = detail::soft_sum_squares(arch, x_row, static_cast<std::size_t>(d));
        T* row = &logits(t, 0);
        detail::soft_column_mul(arch, column_scale, row, n_slots);
        simd::scale(arch, detail::soft_inverse_norm(sum, x_row, static_cast<std::size_t>(d), 1), row, n_slots);
      }
    } else if (options_.scale != 1.0) {
      for (index_t t = 0; t < T_; ++t) simd::scale(arch, static_cast<T>(options_.scale), &logits(t, 0), n_slots);
    }
    if (options_.check_finite && !simd::all_finite(arch, logits.data(), static_cast<std::size_t>(T_) * n_slots))
      throw_first_non_finite(out);

    // D: softmax over each group's tokens, column by column (vectorized across columns).
    for (index_t g = 0; g < groups.count(); ++g) {
      const index_t first = groups.begin(g);
      const index_t last = groups.end(g);
      if (first == last) continue;
      for (index_t j = 0; j < S; ++j) column_max[j] = -std::numeric_limits<T>::infinity();
      for (index_t j = 0; j < S; ++j) column_sum[j] = T(0);
      for (index_t t = first; t < last; ++t) detail::soft_column_max(arch, &logits(t, 0), column_max, n_slots);
      for (index_t t = first; t < last; ++t) {
        detail::soft_column_exp(arch, &logits(t, 0), column_max, &dispatch_w(t, 0), column_sum, n_slots);
      }
      for (index_t j = 0; j < S; ++j) column_sum[j] = T(1) / column_sum[j];
      for (index_t t = first; t < last; ++t) detail::soft_column_mul(arch, column_sum, &dispatch_w(t, 0), n_slots);
    }
    // C: softmax over the slots of each token.
    for (index_t t = 0; t < T_; ++t) simd::softmax(arch, &logits(t, 0), &combine_w(t, 0), n_slots);
  }

  // Backward through the routing (for SoftMoELayer::backward). Given `routing`, the last route of
  // x, and grad_dispatch = ∂L/∂D, grad_combine = ∂L/∂C (both [T, S] row-major), adds ∂L/∂x to
  // dx [T, d] and ∂L/∂Φ to dphi [d, S], and returns ∂L/∂scale. With P = x·Φ [T, S]:
  //   dL = C ⊙ (dC − Σ_slots C ⊙ dC) + D ⊙ (dD − Σ_group tokens D ⊙ dD)     (the two softmaxes)
  //   plain:       L = scale · P:  dP = scale · dL,  ∂L/∂scale = Σ dL ⊙ P
  //   normalized:  L[t,j] = P[t,j] · r_t · c_j,  r_t = rsqrt(Σ_i x[t,i]² + eps),
  //                c_j = scale · q_j,  q_j = rsqrt(Σ_i Φ[i,j]² + eps):
  //                dP = dL ⊙ r cᵀ,  dr_t = Σ_j dL·P·c,  dc_j = Σ_t dL·P·r,  ∂L/∂scale = Σ_j dc_j q_j,
  //                ∂r_t/∂x[t,i] = −x[t,i] r_t³,  ∂q_j/∂Φ[i,j] = −Φ[i,j] q_j³
  //   dx += dP · Φᵀ,  dΦ += xᵀ · dP
  // Temporaries (three [T, S] matrices, Φᵀ, and room for dΦ's product to pack x where it would:
  // simd::tn_packs_x) go in `scratch` when given, grown as needed and reused, so that a warm call
  // allocates nothing; without one, backward allocates its own.
  template <class Arch = simd::default_arch>
  T backward(const ConstMatrixRef<T>& x, const SoftRouting<T>& routing, const T* grad_dispatch, const T* grad_combine,
             MatrixRef<T> dx, MatrixRef<T> dphi, Arch arch = {}, Buffer<T>* scratch = nullptr) const {
    const index_t T_ = x.rows(), d = d_model(), S = num_slots();
    const char* where = "SoftRouter::backward";
    detail::check_dim(where, "x.cols()", x.cols(), "d_model", d);
    detail::check_dim(where, "routing.num_tokens()", routing.num_tokens(), "x.rows()", T_);
    detail::check_dim(where, "routing.num_slots()", routing.num_slots(), "num_slots", S);
    detail::check_dim(where, "dx.rows()", dx.rows(), "x.rows()", T_);
    detail::check_dim(where, "dx.cols()", dx.cols(), "d_model", d);
    detail::check_dim(where, "dphi.rows()", dphi.rows(), "d_model", d);
    detail::check_dim(where, "dphi.cols()", dphi.cols(), "num_slots", S);
    detail::check_rows(where, "dphi", dphi, true);
    detail::check_disjoint(where, "dx", dx, "x", x);
    detail::check_router_config(where, "routing", routing.router_config(), config_fingerprint());
    check_scale(where, routing);
    if (T_ == 0) return T(0);
    const auto rows = static_cast<std::size_t>(T_), width = static_cast<std::size_t>(d), slots = static_cast<std::size_t>(S);
    const auto ldx = static_cast<std::size_t>(x.outerStride());
    const index_t packing_size =
        simd::tn_packs_x<Arch, T>(rows, width, slots, ldx) ? static_cast<index_t>(simd::tn_packing_size(rows, width)) : 0;
    Buffer<T> own;
    T* const temporaries =
        (scratch != nullptr ? *scratch : own).ensure(3 * T_ * S + S * d + 3 * S + 2 * T_ + packing_size);
    MatrixMap<T> dlogits(temporaries, T_, S);                 // [T, S] dL
    MatrixMap<T> product(temporaries + T_ * S, T_, S);        // [T, S] P = x·Φ, with route's bits
    MatrixMap<T> dproduct(temporaries + 2 * T_ * S, T_, S);   // [T, S] dP
    MatrixMap<T> phi_t(temporaries + 3 * T_ * S, S, d);       // [S, d] Φᵀ
    T* const column_dot = temporaries + 3 * T_ * S + S * d;   // [S]
    T* const q = column_dot + S;                              // [S] (normalized)
    T* const dc = q + S;                                      // [S] (normalized)
    T* const r = dc + S;                                      // [T] (normalized)
    T* const dr = r + T_;                                     // [T] (normalized)
    T* const x_packing = packing_size > 0 ? dr + T_ : nullptr;  // [T · d] (simd::tn_packs_x)
    const ConstMatrixMap<T> D = routing.dispatch_weights(), C = routing.combine_weights();  // [T, S]
    const ConstMatrixMap<T> dD(grad_dispatch, T_, S), dC(grad_combine, T_, S);              // [T, S]
    // Combine: softmax over the slots of each row.
    for (index_t t = 0; t < T_; ++t) {
      const T row_dot = C.row(t).dot(dC.row(t));
      for (index_t j = 0; j < S; ++j) dlogits(t, j) = C(t, j) * (dC(t, j) - row_dot);
    }
    // Dispatch: softmax over the tokens of each group, per column.
    for (index_t g = 0; g < routing.num_groups(); ++g) {
      const index_t first = routing.group_begin(g), last = first + routing.group_size(g);
      std::fill(column_dot, column_dot + S, T(0));
      for (index_t t = first; t < last; ++t)
        for (index_t j = 0; j < S; ++j) column_dot[j] += D(t, j) * dD(t, j);
      for (index_t t = first; t < last; ++t)
        for (index_t j = 0; j < S; ++j) dlogits(t, j) += D(t, j) * (dD(t, j) - column_dot[j]);
    }
    const ConstMatrixMap<T> phi_map = phi();  // [d, S]
    simd::matmul_nn_strided(arch, x.data(), ldx, rows, width, phi_map.data(), slots, slots, product.data(), slots, false);
    const auto scale = static_cast<T>(options_.scale);
    T dscale(0);
    if (!options_.normalized) {
      dscale = dlogits.cwiseProduct(product).sum();
      dproduct = scale * dlogits;
    } else {
      // r and q with route's bits (its sums of squares, in its order).
      for (index_t t = 0; t < T_; ++t) {
        const T* x_row = x.data() + t * x.outerStride();
        r[t] = detail::soft_inverse_norm(detail::soft_sum_squares(arch, x_row, width), x_row, width, 1);
      }
      compute_column_inverse_norms(arch, q);
      // With g = dL ⊙ P: dr = scale · g·q, dc = gᵀ·r.
      std::fill(dc, dc + S, T(0));
      for (index_t t = 0; t < T_; ++t) {
        T dr_t(0);
        for (index_t j = 0; j < S; ++j) {
          const T g = dlogits(t, j) * product(t, j);
          dr_t += g * q[j];
          dc[j] += g * r[t];
          dproduct(t, j) = r[t] * dlogits(t, j) * (scale * q[j]);
        }
        dr[t] = dr_t * scale;
      }
      for (index_t j = 0; j < S; ++j) dscale += dc[j] * q[j];
      // The r_t³ and q_j³ terms, as (dr·r)·r times the normalized rows (columns): r³ alone
      // underflows where the norms are large (r ~ 1e-20 in float) while these products do not.
      for (index_t t = 0; t < T_; ++t) dx.row(t) += (-dr[t] * r[t] * r[t]) * (r[t] * x.row(t));
      for (index_t j = 0; j < S; ++j) dc[j] = -(scale * dc[j]) * q[j] * q[j];  // now ∂L/∂Φ[:, j]'s factor
      for (index_t i = 0; i < d; ++i)
        for (index_t j = 0; j < S; ++j) dphi(i, j) += (phi_map(i, j) * q[j]) * dc[j];
    }
    // dx += dP · Φᵀ and dΦ += xᵀ · dP through simd's products: one chain of FMAs per element in a
    // fixed order, so no bit depends on the thread count.
    phi_t = phi_map.transpose();
    simd::matmul_nn_strided(arch, dproduct.data(), slots, rows, slots, phi_t.data(), width, width, dx.data(),
                            static_cast<std::size_t>(dx.outerStride()), true);
    simd::matmul_tn_strided(arch, x.data(), ldx, rows, width, dproduct.data(), slots, slots, dphi.data(),
                            static_cast<std::size_t>(dphi.outerStride()), true, x_packing);
    return dscale;
  }

 private:
  // q[j] = rsqrt(Σ_i Φ[i,j]² + eps), the sums taken row by row of Φ (contiguous).
  template <class Arch>
  void compute_column_inverse_norms(Arch arch, T* q) const {
    const index_t S = num_slots();
    const ConstMatrixMap<T> phi_map = phi();
    for (index_t j = 0; j < S; ++j) q[j] = T(0);
    for (index_t i = 0; i < d_model(); ++i) {
      detail::soft_column_sum_squares(arch, phi_map.data() + i * S, q, static_cast<std::size_t>(S));
    }
    for (index_t j = 0; j < S; ++j) {
      q[j] = detail::soft_inverse_norm(q[j], phi_map.data() + j, static_cast<std::size_t>(d_model()), static_cast<std::size_t>(S));
    }
  }

  // column_scale[j] = scale · q[j].
  template <class Arch>
  void compute_column_scale(Arch arch, T* column_scale) const {
    compute_column_inverse_norms(arch, column_scale);
    const auto scale = static_cast<T>(options_.scale);
    for (index_t j = 0; j < num_slots(); ++j) column_scale[j] *= scale;
  }

  // Throws on the first non-finite logit, leaving `out` empty (SoftRouting::clear); simd::all_finite
  // found one.
  static void throw_first_non_finite(SoftRouting<T>& out) {
    const ConstMatrixMap<T> logits = out.logits();
    for (index_t t = 0; t < logits.rows(); ++t) {
      for (index_t j = 0; j < logits.cols(); ++j) {
        const T v = logits(t, j);
        if (!std::isfinite(v)) {
          out.clear();
          detail::throw_numeric("SoftRouter::route: logit is not finite (token = ", t, ", slot = ", j, ", logit = ", v, ")");
        }
      }
    }
  }

  Weight<T> phi_;  // [d, E·s]
  index_t num_experts_ = 0;
  SoftOptions options_;
};

MOE_NAMESPACE_END
