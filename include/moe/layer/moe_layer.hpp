#pragma once
// The MoE layer: route, dispatch, run each expert on its contiguous block, combine.
//
//   y[t] = Σ_{(e, w) in plan for t} w · expert_e(x[t])                       routed experts
//        + Σ_s g(x[t]) · shared_s(x[t])                                     shared experts
//        + (dropped weight of t) · x[t]      only with DroppedTokens::pass_through (Switch)
//
// Expert ids 0 .. experts.size()-1 are the FFN experts; ids after them are the zero-computation
// experts (zero, copy, constant), which take routing slots but no matrix products. The shared
// gate g is sigmoid(x · w_gateᵀ) with w_gate [1, d] (Qwen2-MoE), or 1 when not given (DeepSeekMoE).
//
// The layer holds its router and experts by value; both are cheap when they view the caller's
// weights. forward() is const and thread-safe given one Workspace per thread.
#include <algorithm>
#include <type_traits>
#include <utility>
#include <vector>

#include "../core/error.hpp"
#include "../core/types.hpp"
#include "../dispatch/combine.hpp"
#include "../dispatch/dispatch.hpp"
#include "../experts/zero_compute.hpp"
#include "../simd/matmul.hpp"
#include "../routing/context.hpp"
#include "../routing/router_output.hpp"
#include "workspace.hpp"

MOE_NAMESPACE_BEGIN

// What happens to the choices a token lost to capacity.
enum class DroppedTokens {
  zero,          // they contribute nothing; the caller's residual connection carries the token
  pass_through,  // they contribute (lost weight) · x: Hugging Face Switch Transformers, where a
                 // dropped top-1 token leaves the layer as router_prob · x
};

template <class Router, class Expert>
class MoELayer {
 public:
  using Scalar = typename Router::Scalar;
  static_assert(std::is_same<Scalar, typename Expert::Scalar>::value, "moe::MoELayer: router and expert scalar types differ");
  static_assert(std::is_floating_point<Scalar>::value, "moe::MoELayer: the scalar type must be float or double");
  using T = Scalar;

  // The router's experts are `experts` followed by `zero_compute`.
  MoELayer(Router router, std::vector<Expert> experts, std::vector<ZeroComputeExpert<T>> zero_compute = {})
      : router_(std::move(router)), experts_(std::move(experts)), zero_compute_(std::move(zero_compute)) {
    detail::check_dim("MoELayer", "experts.size() + zero_compute.size()",
                      static_cast<index_t>(experts_.size() + zero_compute_.size()), "router.num_experts()",
                      router_.num_experts());
    for (std::size_t e = 0; e < experts_.size(); ++e) check_width("expert ", e, experts_[e].d_model());
    for (std::size_t e = 0; e < zero_compute_.size(); ++e) check_width("zero_compute expert ", e, zero_compute_[e].d_model());
  }

  // Always-on experts added to every token, each scaled by sigmoid(x · gateᵀ) when `gate` [1, d]
  // is given (Qwen2-MoE shared_expert_gate; one gate for the sum of the shared experts).
  void set_shared_experts(std::vector<Expert> shared, Weight<T> gate = {}) {
    for (std::size_t s = 0; s < shared.size(); ++s) check_width("shared expert ", s, shared[s].d_model());
    if (gate.rows() != 0) {
      detail::check_dim("MoELayer::set_shared_experts", "gate.rows()", gate.rows(), "1", 1);
      detail::check_dim("MoELayer::set_shared_experts", "gate.cols()", gate.cols(), "d_model", d_model());
    }
    shared_ = std::move(shared);
    shared_gate_ = std::move(gate);
  }
  void set_dropped_tokens(DroppedTokens policy) noexcept { dropped_tokens_ = policy; }

  index_t d_model() const noexcept { return router_.d_model(); }
  index_t num_experts() const noexcept { return router_.num_experts(); }
  const Router& router() const noexcept { return router_; }
  const std::vector<Expert>& experts() const noexcept { return experts_; }
  const std::vector<ZeroComputeExpert<T>>& zero_compute_experts() const noexcept { return zero_compute_; }
  const std::vector<Expert>& shared_experts() const noexcept { return shared_; }

  // y [T, d] = layer(x [T, d]). y must already have T rows and d columns; y may alias x (x is
  // fully read before y is written). The routing of this batch stays in ws.routing.
  template <class Arch = simd::default_arch>
  void forward(const ConstMatrixRef<T>& x, MatrixRef<T> y, Workspace<T>& ws, Arch arch = {}) const {
    forward(x, RouteContext{}, y, ws, arch);
  }
  // As above, with routing groups, token ids or training flags for the router (RouteContext).
  template <class Arch = simd::default_arch>
  void forward(const ConstMatrixRef<T>& x, const RouteContext& ctx, MatrixRef<T> y, Workspace<T>& ws, Arch arch = {}) const {
    const index_t d = d_model();
    detail::check_dim("MoELayer::forward", "x.cols()", x.cols(), "d_model", d);
    detail::check_dim("MoELayer::forward", "y.rows()", y.rows(), "x.rows()", x.rows());
    detail::check_dim("MoELayer::forward", "y.cols()", y.cols(), "d_model", d);

    router_.route(x, ctx, ws.routing, arch);
    const Routing<T>& plan = ws.routing.plan;
    const index_t A = plan.num_assignments();

    T* dispatched = ws.dispatched.ensure(A * d);
    T* expert_out = ws.expert_out.ensure(A * d);
    dispatch(arch, plan, x.data(), x.outerStride(), d, dispatched);

    const auto num_ffn = static_cast<index_t>(experts_.size());
    index_t scratch_needed = 0;
    for (index_t e = 0; e < num_ffn; ++e) scratch_needed = std::max(scratch_needed, experts_[e].scratch_size(plan.tokens_of(e)));
    for (const Expert& s : shared_) scratch_needed = std::max(scratch_needed, s.scratch_size(x.rows()));
    T* scratch = ws.scratch.ensure(scratch_needed);
    for (index_t e = 0; e < num_experts(); ++e) {
      const index_t m = plan.tokens_of(e);
      if (m == 0) continue;  // experts without tokens cost nothing
      const index_t first = plan.expert_begin[e];
      if (e < num_ffn) {
        experts_[e].forward(arch, dispatched + first * d, m, expert_out + first * d, scratch);
      } else {
        zero_compute_[std::size_t(e - num_ffn)].forward(arch, dispatched + first * d, m, expert_out + first * d);
      }
    }

    // Shared experts and the pass-through run before combine overwrites y, which may alias x.
    T* extra = nullptr;  // [T, d] shared and pass-through contributions, or null when none
    if (!shared_.empty() || (dropped_tokens_ == DroppedTokens::pass_through && !plan.dropped.empty())) {
      extra = add_shared_and_dropped(arch, x, ws, scratch);
    }
    combine(arch, plan, expert_out, d, y.data(), y.outerStride());
    if (extra != nullptr) {
      for (index_t t = 0; t < x.rows(); ++t) {
        simd::axpy(arch, T(1), extra + t * d, y.data() + t * y.outerStride(), static_cast<std::size_t>(d));
      }
    }
  }

  // Convenience: returns a new [T, d] output.
  template <class Arch = simd::default_arch>
  Matrix<T> forward(const ConstMatrixRef<T>& x, Workspace<T>& ws, Arch arch = {}) const {
    Matrix<T> y(x.rows(), d_model());
    forward(x, y, ws, arch);
    return y;
  }

 private:
  void check_width(const char* what, std::size_t index, index_t width) const {
    if (width != router_.d_model()) {
      detail::throw_invalid("MoELayer: ", what, index, " d_model must equal router.d_model() (", what, "d_model = ", width,
                            ", router d_model = ", router_.d_model(), ")");
    }
  }

  // extra [T, d] = Σ_s g · shared_s(x) + (dropped weight) · x, in a fixed order per token.
  template <class Arch>
  T* add_shared_and_dropped(Arch arch, const ConstMatrixRef<T>& x, Workspace<T>& ws, T* scratch) const {
    const index_t T_ = x.rows(), d = d_model();
    T* extra = ws.extra.ensure(T_ * d);
    T* x_rows = ws.shared_in.ensure(T_ * d);     // contiguous copy of x
    T* shared_out = ws.shared_out.ensure(T_ * d);
    for (index_t t = 0; t < T_; ++t) simd::copy_row(arch, x.data() + t * x.outerStride(), x_rows + t * d, static_cast<std::size_t>(d));
    std::fill(extra, extra + T_ * d, T(0));
    if (!shared_.empty()) {
      T* gate = ws.shared_gate.ensure(T_);
      if (shared_gate_.rows() == 1) {
        simd::matmul_nt(arch, x_rows, static_cast<std::size_t>(T_), static_cast<std::size_t>(d), shared_gate_.data(), 1, gate, 1);
        simd::sigmoid(arch, gate, gate, static_cast<std::size_t>(T_));
      } else {
        std::fill(gate, gate + T_, T(1));
      }
      for (const Expert& s : shared_) {
        s.forward(arch, x_rows, T_, shared_out, scratch);
        for (index_t t = 0; t < T_; ++t) simd::axpy(arch, gate[t], shared_out + t * d, extra + t * d, static_cast<std::size_t>(d));
      }
    }
    if (dropped_tokens_ == DroppedTokens::pass_through) {
      const Routing<T>& plan = ws.routing.plan;
      for (std::size_t i = 0; i < plan.dropped.size(); ++i) {
        const index_t t = plan.dropped[i];
        simd::axpy(arch, plan.dropped_weight[i], x_rows + t * d, extra + t * d, static_cast<std::size_t>(d));
      }
    }
    return extra;
  }

  Router router_;
  std::vector<Expert> experts_;
  std::vector<ZeroComputeExpert<T>> zero_compute_;
  std::vector<Expert> shared_;
  Weight<T> shared_gate_;  // [1, d] or empty
  DroppedTokens dropped_tokens_ = DroppedTokens::zero;
};

MOE_NAMESPACE_END
