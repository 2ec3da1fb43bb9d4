#pragma once
// The Soft MoE layer (Puigcerver et al. 2023): route densely, mix tokens into slots, run each
// expert once on its slots, mix the slot outputs back into tokens.
//
//   D, C = SoftRouter(x)            [T, S] each, S = E·s
//   X̃ = Dᵀ · x                      [S, d] slot inputs (per routing group: [G·S, d])
//   Ỹ rows of expert e = expert_e(X̃ rows of expert e)
//   y = C · Ỹ                       [T, d]
//
// With routing groups each group is its own Soft MoE (routing/soft.hpp); expert e runs once on
// the s·G rows it holds for all groups. A group's output is then bit-identical whatever the other
// groups hold, however many there are and wherever the group sits: its routing, slot inputs and
// combine depend only on its own rows (routing/soft.hpp, dispatch/soft_dispatch.hpp), and the
// library's experts compute each row independently of the others (simd/matmul.hpp). An expert
// type of your own keeps this guarantee only if its rows are independent too (a packed GEMM's
// rounding changes with the row count, so it would tie a group's bits to the number of groups).
//
// The layer holds its router and experts by value; both are cheap when they view the caller's
// weights. forward() is const and thread-safe given one SoftWorkspace per thread.
#include <algorithm>
#include <type_traits>
#include <utility>
#include <vector>

#include "../core/error.hpp"
#include "../core/types.hpp"
#include "../core/workspace.hpp"
#include "../dispatch/soft_dispatch.hpp"
#include "../routing/context.hpp"
#include "../routing/soft.hpp"

MOE_NAMESPACE_BEGIN

// Per-caller reusable memory for SoftMoELayer::forward; no allocation once it has seen the
// largest batch (and the most groups).
template <class T>
struct SoftWorkspace {
  SoftRouting<T> routing;  // logits, D and C of the last forward
  Buffer<T> slots;         // [G·S, d] slot inputs, expert-major
  Buffer<T> slot_out;      // [G·S, d] expert outputs in the same order
  Buffer<T> mix;           // dispatch/combine product scratch
  Buffer<T> scratch;       // expert hidden activations
};

template <class Expert>
class SoftMoELayer {
 public:
  using Scalar = typename Expert::Scalar;
  static_assert(std::is_floating_point<Scalar>::value, "moe::SoftMoELayer: the scalar type must be float or double");
  using T = Scalar;

  SoftMoELayer(SoftRouter<T> router, std::vector<Expert> experts) : router_(std::move(router)), experts_(std::move(experts)) {
    detail::check_dim("SoftMoELayer", "experts.size()", static_cast<index_t>(experts_.size()), "router.num_experts()",
                      router_.num_experts());
    for (std::size_t e = 0; e < experts_.size(); ++e) {
      if (experts_[e].d_model() != router_.d_model()) {
        detail::throw_invalid("SoftMoELayer: expert ", e, " d_model must equal router.d_model() (expert d_model = ",
                              experts_[e].d_model(), ", router d_model = ", router_.d_model(), ")");
      }
    }
  }

  index_t d_model() const noexcept { return router_.d_model(); }
  index_t num_experts() const noexcept { return router_.num_experts(); }
  index_t slots_per_expert() const noexcept { return router_.slots_per_expert(); }
  const SoftRouter<T>& router() const noexcept { return router_; }
  const std::vector<Expert>& experts() const noexcept { return experts_; }

  // y [T, d] = layer(x [T, d]). y must already have T rows and d columns; y may alias x (x is
  // fully read before y is written). The routing of this batch stays in ws.routing. T = 0 is valid.
  template <class Arch = simd::default_arch>
  void forward(const ConstMatrixRef<T>& x, MatrixRef<T> y, SoftWorkspace<T>& ws, Arch arch = {}) const {
    forward(x, RouteContext{}, y, ws, arch);
  }
  // As above, with routing groups: each group is its own Soft MoE.
  template <class Arch = simd::default_arch>
  void forward(const ConstMatrixRef<T>& x, const RouteContext& ctx, MatrixRef<T> y, SoftWorkspace<T>& ws, Arch arch = {}) const {
    const index_t d = d_model();
    detail::check_dim("SoftMoELayer::forward", "x.cols()", x.cols(), "d_model", d);
    detail::check_dim("SoftMoELayer::forward", "y.rows()", y.rows(), "x.rows()", x.rows());
    detail::check_dim("SoftMoELayer::forward", "y.cols()", y.cols(), "d_model", d);

    router_.route(x, ctx, ws.routing, arch);
    if (x.rows() == 0) return;
    const SoftRouting<T>& routing = ws.routing;
    const index_t rows = routing.slot_rows();
    T* slots = ws.slots.ensure(rows * d);        // [G·S, d]
    T* slot_out = ws.slot_out.ensure(rows * d);  // [G·S, d]
    dispatch(arch, routing, x.data(), x.outerStride(), d, slots, ws.mix);

    const index_t m = routing.rows_per_expert();
    index_t scratch_needed = 0;
    for (const Expert& expert : experts_) scratch_needed = std::max(scratch_needed, expert.scratch_size(m));
    T* scratch = ws.scratch.ensure(scratch_needed);
    for (index_t e = 0; e < num_experts(); ++e) {
      const index_t first = routing.expert_first_row(e);
      experts_[static_cast<std::size_t>(e)].forward(arch, slots + first * d, m, slot_out + first * d, scratch);
    }

    combine(arch, routing, slot_out, d, y.data(), y.outerStride(), ws.mix);
  }

  // Convenience: returns a new [T, d] output.
  template <class Arch = simd::default_arch>
  Matrix<T> forward(const ConstMatrixRef<T>& x, SoftWorkspace<T>& ws, Arch arch = {}) const {
    Matrix<T> y(x.rows(), d_model());
    forward(x, y, ws, arch);
    return y;
  }

 private:
  SoftRouter<T> router_;
  std::vector<Expert> experts_;
};

MOE_NAMESPACE_END
