#pragma once
// What MoELayer needs of a router type, checked at compile time: a type that lacks a member fails
// with a message naming it rather than deep inside the layer. TopKRouter, ExpertChoiceRouter and
// HashRouter are the models; README, "Your own router type", gives the contract.
//
//   using Scalar = T;                  float or double, the experts' scalar type
//   index_t num_experts() const;       E (FFN experts, then zero-computation ones)
//   index_t d_model() const;           input width d
//   template <class Arch> void route(const ConstMatrixRef<T>& x, const RouteContext& ctx,
//                                    RouterOutput<T>& out, Arch) const;
//       out.reshape(T, E, config_fingerprint()), then its logits and scores [T, E] and its plan
//       (build_routing), or leave the empty plan reshape made if it throws
// and, for forward_train and backward:
//   std::uint64_t config_fingerprint() const;   stamped on every routing; it must differ wherever
//                                               two configurations lay out their routings differently
//   template <class Arch> void backward(const ConstMatrixRef<T>& x, const RouterOutput<T>& out,
//       const T* grad_weight, const T* grad_lost, const T* extra_dlogits, MatrixRef<T> dx,
//       MatrixRef<T> dweight, Arch) const;
//       grad_weight [A]: ∂L/∂(routing weight) in the plan's assignment order; grad_lost [T] or null:
//       ∂L/∂(lost weight) of the tokens in plan.dropped (pass-through); extra_dlogits [T, E] or null.
//       Adds to dx [T, d] (which holds the experts' part) and to dweight [E, d] (the layer's
//       Gradients::router: zeroed by backward, not by backward_accumulate).
//       Optionally with a last `Buffer<T>* scratch` parameter, the training workspace's, for
//       temporaries without allocation.
// and, optionally, for MoELayer::reserve (without it, reserve assumes every token may go to every expert):
//   index_t max_assignments(index_t tokens, index_t groups) const;
//       the most assignments a batch of `tokens` tokens in at most `groups` routing groups can get
#include <cstdint>
#include <type_traits>
#include <utility>

#include "../core/types.hpp"
#include "../core/workspace.hpp"
#include "../experts/expert_concept.hpp"
#include "../simd/arch.hpp"
#include "context.hpp"
#include "router_output.hpp"

MOE_NAMESPACE_BEGIN
namespace detail {

template <class R> using router_scalar = typename R::Scalar;
template <class R> using num_experts_of = returns_index<decltype(std::declval<const R&>().num_experts())>;
template <class R> using router_d_model_of = returns_index<decltype(std::declval<const R&>().d_model())>;
template <class R>
using route_of = decltype(std::declval<const R&>().route(std::declval<const ConstMatrixRef<router_scalar<R>>&>(),
                                                          std::declval<const RouteContext&>(),
                                                          std::declval<RouterOutput<router_scalar<R>>&>(),
                                                          simd::default_arch{}));
template <class R>
using config_fingerprint_of =
    std::enable_if_t<std::is_convertible<decltype(std::declval<const R&>().config_fingerprint()), std::uint64_t>::value>;
// backward, plain and with the workspace's scratch.
template <class R, class... Scratch>
using router_backward_call = decltype(std::declval<const R&>().backward(
    std::declval<const ConstMatrixRef<router_scalar<R>>&>(), std::declval<const RouterOutput<router_scalar<R>>&>(),
    std::declval<const router_scalar<R>*>(), std::declval<const router_scalar<R>*>(), std::declval<const router_scalar<R>*>(),
    std::declval<MatrixRef<router_scalar<R>>>(), std::declval<MatrixRef<router_scalar<R>>>(), simd::default_arch{},
    std::declval<Scratch>()...));
template <class R> using router_backward_of = router_backward_call<R>;
template <class R> using router_backward_with_scratch_of = router_backward_call<R, Buffer<router_scalar<R>>*>;
template <class R>
using max_assignments_of = returns_index<decltype(std::declval<const R&>().max_assignments(index_t{}, index_t{}))>;

// static_assert(check_router<R>()) in a layer: a message per missing member the forward needs.
template <class R>
constexpr bool check_router() {
  constexpr bool scalar = detected_v<router_scalar, R>;
  static_assert(scalar, "moe: a router type needs `using Scalar = T;` (float or double)");
  static_assert(!scalar || detected_v<floating_scalar, R>, "moe: a router's Scalar must be float or double");
  static_assert(detected_v<num_experts_of, R>, "moe: a router type needs `index_t num_experts() const`");
  static_assert(detected_v<router_d_model_of, R>, "moe: a router type needs `index_t d_model() const`");
  static_assert(!scalar || detected_v<route_of, R>,
                "moe: a router type needs `template <class Arch> void route(const ConstMatrixRef<T>& x, const "
                "RouteContext& ctx, RouterOutput<T>& out, Arch) const`");
  return true;
}

// The same for what forward_train and backward add.
template <class R>
constexpr bool check_training_router() {
  static_assert(detected_v<config_fingerprint_of, R>,
                "moe: training with a router type needs `std::uint64_t config_fingerprint() const`");
  static_assert(!detected_v<router_scalar, R> || detected_v<router_backward_of, R> ||
                    detected_v<router_backward_with_scratch_of, R>,
                "moe: training with a router type needs `template <class Arch> void backward(const ConstMatrixRef<T>& "
                "x, const RouterOutput<T>& out, const T* grad_weight, const T* grad_lost, const T* extra_dlogits, "
                "MatrixRef<T> dx, MatrixRef<T> dweight, Arch[, Buffer<T>* scratch]) const`");
  return true;
}

}  // namespace detail

// Whether R can be a MoELayer's router type (for your own static_assert): for forward, and for
// forward_train and backward too.
template <class R>
inline constexpr bool is_router_v = detail::detected_v<detail::router_scalar, R> &&
                                    detail::detected_v<detail::floating_scalar, R> &&
                                    detail::detected_v<detail::num_experts_of, R> &&
                                    detail::detected_v<detail::router_d_model_of, R> && detail::detected_v<detail::route_of, R>;
template <class R>
inline constexpr bool is_training_router_v =
    is_router_v<R> && detail::detected_v<detail::config_fingerprint_of, R> &&
    (detail::detected_v<detail::router_backward_of, R> || detail::detected_v<detail::router_backward_with_scratch_of, R>);

MOE_NAMESPACE_END
