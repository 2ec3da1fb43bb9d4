#pragma once
// The MoE layer: route, dispatch, run each expert on its contiguous block, combine.
//
//   y[t] = Σ_{(e, w) in plan for t} w · expert_e(x[t])
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
#include "../routing/context.hpp"
#include "../routing/router_output.hpp"
#include "workspace.hpp"

MOE_NAMESPACE_BEGIN

template <class Router, class Expert>
class MoELayer {
 public:
  using Scalar = typename Router::Scalar;
  static_assert(std::is_same<Scalar, typename Expert::Scalar>::value, "moe::MoELayer: router and expert scalar types differ");
  static_assert(std::is_floating_point<Scalar>::value, "moe::MoELayer: the scalar type must be float or double");
  using T = Scalar;

  MoELayer(Router router, std::vector<Expert> experts) : router_(std::move(router)), experts_(std::move(experts)) {
    detail::check_dim("MoELayer", "experts.size()", static_cast<index_t>(experts_.size()), "router.num_experts()",
                      router_.num_experts());
    for (std::size_t e = 0; e < experts_.size(); ++e) {
      if (experts_[e].d_model() != router_.d_model()) {
        detail::throw_invalid("MoELayer: expert ", e, " d_model must equal router.d_model() (expert d_model = ",
                              experts_[e].d_model(), ", router d_model = ", router_.d_model(), ")");
      }
    }
  }

  index_t d_model() const noexcept { return router_.d_model(); }
  index_t num_experts() const noexcept { return router_.num_experts(); }
  const Router& router() const noexcept { return router_; }
  const std::vector<Expert>& experts() const noexcept { return experts_; }

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

    index_t scratch_needed = 0;
    for (index_t e = 0; e < num_experts(); ++e) {
      scratch_needed = std::max(scratch_needed, experts_[e].scratch_size(plan.tokens_of(e)));
    }
    T* scratch = ws.scratch.ensure(scratch_needed);
    for (index_t e = 0; e < num_experts(); ++e) {
      const index_t m = plan.tokens_of(e);
      if (m == 0) continue;  // experts without tokens cost nothing
      const index_t first = plan.expert_begin[e];
      experts_[e].forward(arch, dispatched + first * d, m, expert_out + first * d, scratch);
    }

    combine(arch, plan, expert_out, d, y.data(), y.outerStride());
  }

  // Convenience: returns a new [T, d] output.
  template <class Arch = simd::default_arch>
  Matrix<T> forward(const ConstMatrixRef<T>& x, Workspace<T>& ws, Arch arch = {}) const {
    Matrix<T> y(x.rows(), d_model());
    forward(x, y, ws, arch);
    return y;
  }

 private:
  Router router_;
  std::vector<Expert> experts_;
};

MOE_NAMESPACE_END
