#pragma once
// What MoELayer and SoftMoELayer need of an expert type, checked at compile time: a type that
// lacks a member fails with a message naming it rather than deep inside the layer. FeedForward
// and GatedFeedForward are the models; README, "Your own expert type", gives the contract.
//
//   using Scalar = T;                      float or double, the router's scalar type
//   struct Gradient { for_each(f) };       calls f on each weight gradient (an Eigen matrix), const and not
//   index_t d_model() const;               input and output width d
//   index_t d_ff() const;                  hidden width: the thread schedule weighs an expert's work as
//                                          d_ff × (tokens + 8)
//   index_t scratch_size(index_t m) const; scratch elements forward needs for m tokens
//   index_t saved_size(index_t m) const;   elements forward_saving keeps for backward
//   Gradient zero_gradient() const;        zero gradients of the right shapes
//   template <class Arch> void forward(Arch, const T* x, index_t m, T* y, T* scratch) const;
//   template <class Arch> void forward_saving(Arch, const T* x, index_t m, T* y, T* saved, T* scratch) const;
//   template <class Arch> void backward(const T* x, index_t m, const T* dy, const T* saved, T* dx,
//                                       Gradient& grad, Arch) const;     adds to grad
// and optionally backward's workspace form, which the layers then call instead, with scratch from
// their workspace (no allocation) and `accumulate` false on backward(), true on backward_accumulate():
//   index_t backward_scratch_size(index_t m) const;
//   template <class Arch> void backward(const T* x, index_t m, const T* dy, const T* saved, T* dx,
//                                       Gradient& grad, Arch, T* scratch, bool accumulate) const;
//                                       writes grad over (every element, m > 0) unless accumulate
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../core/error.hpp"
#include "../core/types.hpp"
#include "../simd/arch.hpp"

MOE_NAMESPACE_BEGIN
namespace detail {

// The detection idiom: Op<E> is well formed.
template <class, template <class> class Op, class E>
struct detected : std::false_type {};
template <template <class> class Op, class E>
struct detected<std::void_t<Op<E>>, Op, E> : std::true_type {};
template <template <class> class Op, class E>
inline constexpr bool detected_v = detected<void, Op, E>::value;

// A visitor for Gradient::for_each that accepts any matrix.
struct AnyMatrix {
  template <class M>
  void operator()(M&&) const noexcept {}
};

template <class E> using expert_scalar = typename E::Scalar;
template <class E> using expert_gradient = typename E::Gradient;
template <class E> using out_ptr = expert_scalar<E>*;     // (declval stand-ins for the arguments)
template <class E> using in_ptr = const expert_scalar<E>*;
template <class R> using returns_index = std::enable_if_t<std::is_convertible<R, index_t>::value>;

template <class E>
using gradient_for_each = decltype(std::declval<expert_gradient<E>&>().for_each(AnyMatrix{}),
                                   std::declval<const expert_gradient<E>&>().for_each(AnyMatrix{}));
template <class E> using d_model_of = returns_index<decltype(std::declval<const E&>().d_model())>;
template <class E> using d_ff_of = returns_index<decltype(std::declval<const E&>().d_ff())>;
template <class E> using scratch_size_of = returns_index<decltype(std::declval<const E&>().scratch_size(index_t{}))>;
template <class E> using saved_size_of = returns_index<decltype(std::declval<const E&>().saved_size(index_t{}))>;
template <class E>
using zero_gradient_of =
    std::enable_if_t<std::is_convertible<decltype(std::declval<const E&>().zero_gradient()), expert_gradient<E>>::value>;
template <class E>
using forward_of = decltype(std::declval<const E&>().forward(simd::default_arch{}, std::declval<in_ptr<E>>(), index_t{},
                                                             std::declval<out_ptr<E>>(), std::declval<out_ptr<E>>()));
template <class E>
using forward_saving_of =
    decltype(std::declval<const E&>().forward_saving(simd::default_arch{}, std::declval<in_ptr<E>>(), index_t{},
                                                     std::declval<out_ptr<E>>(), std::declval<out_ptr<E>>(),
                                                     std::declval<out_ptr<E>>()));
template <class E>
using backward_of = decltype(std::declval<const E&>().backward(
    std::declval<in_ptr<E>>(), index_t{}, std::declval<in_ptr<E>>(), std::declval<in_ptr<E>>(), std::declval<out_ptr<E>>(),
    std::declval<expert_gradient<E>&>(), simd::default_arch{}));

// backward's workspace form (optional): scratch of backward_scratch_size(m) elements, and the
// gradients written over unless `accumulate`.
template <class E>
using backward_with_scratch_of =
    decltype(returns_index<decltype(std::declval<const E&>().backward_scratch_size(index_t{}))>(),
             std::declval<const E&>().backward(std::declval<in_ptr<E>>(), index_t{}, std::declval<in_ptr<E>>(),
                                               std::declval<in_ptr<E>>(), std::declval<out_ptr<E>>(),
                                               std::declval<expert_gradient<E>&>(), simd::default_arch{},
                                               std::declval<out_ptr<E>>(), bool{}));

template <class E> using floating_scalar = std::enable_if_t<std::is_floating_point<expert_scalar<E>>::value>;

// static_assert(check_expert<E>()) in a layer: a message per missing member (a member's check is
// skipped when what its signature names, Scalar or Gradient, is itself missing).
template <class E>
constexpr bool check_expert() {
  constexpr bool scalar = detected_v<expert_scalar, E>, gradient = detected_v<expert_gradient, E>;
  static_assert(scalar, "moe: an expert type needs `using Scalar = T;` (float or double)");
  static_assert(!scalar || detected_v<floating_scalar, E>, "moe: an expert's Scalar must be float or double");
  static_assert(gradient, "moe: an expert type needs a nested `struct Gradient`");
  static_assert(!gradient || detected_v<gradient_for_each, E>,
                "moe: Expert::Gradient needs `template <class F> void for_each(F f)`, const and non-const, calling f on "
                "each gradient matrix (an Eigen matrix)");
  static_assert(detected_v<d_model_of, E>, "moe: an expert type needs `index_t d_model() const`");
  static_assert(detected_v<d_ff_of, E>, "moe: an expert type needs `index_t d_ff() const` (its work per token)");
  static_assert(detected_v<scratch_size_of, E>, "moe: an expert type needs `index_t scratch_size(index_t m) const`");
  static_assert(detected_v<saved_size_of, E>, "moe: an expert type needs `index_t saved_size(index_t m) const`");
  static_assert(!gradient || detected_v<zero_gradient_of, E>, "moe: an expert type needs `Gradient zero_gradient() const`");
  static_assert(!scalar || detected_v<forward_of, E>,
                "moe: an expert type needs `template <class Arch> void forward(Arch, const T* x, index_t m, T* y, T* "
                "scratch) const`");
  static_assert(!scalar || detected_v<forward_saving_of, E>,
                "moe: an expert type needs `template <class Arch> void forward_saving(Arch, const T* x, index_t m, T* y, "
                "T* saved, T* scratch) const`");
  static_assert(!scalar || !gradient || detected_v<backward_of, E>,
                "moe: an expert type needs `template <class Arch> void backward(const T* x, index_t m, const T* dy, "
                "const T* saved, T* dx, Gradient& grad, Arch) const`");
  return true;
}

// Scratch elements expert_backward needs: backward_scratch_size(m) for the workspace form, else 0.
template <class E>
index_t backward_scratch_size(const E& expert, index_t m) {
  if constexpr (detected_v<backward_with_scratch_of, E>) return expert.backward_scratch_size(m);
  else return 0;
}

// One expert's backward for the layers: the workspace form where E has one, else the plain form
// on gradients zeroed here first (unless `accumulate`). scratch holds backward_scratch_size(m).
// With no tokens (a shared expert on an empty batch) the gradients are zeroed here: the workspace
// form promises to write them over only for m > 0.
template <class E, class Arch, class T>
void expert_backward(const E& expert, const T* x, index_t m, const T* dy, const T* saved, T* dx,
                     typename E::Gradient& grad, Arch arch, T* scratch, bool accumulate) {
  if (m == 0 && !accumulate) {
    grad.for_each([](auto& w) { w.setZero(); });
  } else if constexpr (detected_v<backward_with_scratch_of, E>) {
    expert.backward(x, m, dy, saved, dx, grad, arch, scratch, accumulate);
  } else {
    if (!accumulate) grad.for_each([](auto& w) { w.setZero(); });
    expert.backward(x, m, dy, saved, dx, grad, arch);
  }
}

// The (rows, cols) of each matrix of a gradient, in order: what the layers check a caller's
// gradients against, taken once from each expert's zero gradient.
template <class G>
std::vector<index_t> gradient_shapes(const G& g) {
  std::vector<index_t> out;
  g.for_each([&out](const auto& m) { out.push_back(m.rows()), out.push_back(m.cols()); });
  return out;
}

// Whether g's matrices have the shapes gradient_shapes listed (without allocating: backward
// checks every expert's gradient on every call).
template <class G>
bool has_gradient_shapes(const G& g, const std::vector<index_t>& shapes) noexcept {
  std::size_t i = 0;
  bool same = true;
  g.for_each([&](const auto& m) {
    same = same && i + 2 <= shapes.size() && shapes[i] == m.rows() && shapes[i + 1] == m.cols();
    i += 2;
  });
  return same && i == shapes.size();
}

// "[rows x cols, ...]" for error messages.
inline std::string shapes_text(const std::vector<index_t>& shapes) {
  std::string out = "[";
  for (std::size_t i = 0; i + 1 < shapes.size(); i += 2) {
    out += (i == 0 ? "" : ", ") + std::to_string(shapes[i]) + "x" + std::to_string(shapes[i + 1]);
  }
  return out + "]";
}

// Throws unless `g`, the caller's gradient of `what`[index], has the shapes `want`.
template <class G>
void check_gradient_shapes(const char* where, const char* what, std::size_t index, const G& g,
                           const std::vector<index_t>& want) {
  if (has_gradient_shapes(g, want)) return;
  throw_invalid(where, ": ", what, "[", index, "] has the wrong shape (", what, "[", index, "] = ",
                shapes_text(gradient_shapes(g)), ", expert weights = ", shapes_text(want), "); use make_gradients()");
}

}  // namespace detail

// Whether E can be a MoELayer's or SoftMoELayer's expert type (for your own static_assert).
template <class E>
inline constexpr bool is_expert_v =
    detail::detected_v<detail::expert_scalar, E> && detail::detected_v<detail::floating_scalar, E> &&
    detail::detected_v<detail::expert_gradient, E> &&
    detail::detected_v<detail::gradient_for_each, E> && detail::detected_v<detail::d_model_of, E> &&
    detail::detected_v<detail::d_ff_of, E> && detail::detected_v<detail::scratch_size_of, E> &&
    detail::detected_v<detail::saved_size_of, E> && detail::detected_v<detail::zero_gradient_of, E> &&
    detail::detected_v<detail::forward_of, E> && detail::detected_v<detail::forward_saving_of, E> &&
    detail::detected_v<detail::backward_of, E>;

MOE_NAMESPACE_END
