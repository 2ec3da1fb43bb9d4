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
#include <cmath>
#include <vector>

#include "../core/error.hpp"
#include "../core/threads.hpp"
#include "../core/types.hpp"
#include "../dispatch/combine.hpp"
#include "../dispatch/dispatch.hpp"
#include "../experts/expert_concept.hpp"
#include "../experts/zero_compute.hpp"
#include "../simd/matmul.hpp"
#include "../simd/softmax.hpp"
#include "../routing/context.hpp"
#include "../routing/router_concept.hpp"
#include "../routing/router_output.hpp"
#include "workspace.hpp"

MOE_NAMESPACE_BEGIN

// What happens to the choices a token lost to capacity.
enum class DroppedTokens {
  zero,          // they contribute nothing; the caller's residual connection carries the token
  pass_through,  // they contribute (lost weight) · x: Hugging Face Switch Transformers, where a
                 // dropped top-1 token leaves the layer as router_prob · x. The lost weight is the
                 // lost choices' weight before the drop, also under renormalize_after_drop.
};

namespace detail {
template <>
struct EnumNames<DroppedTokens> {
  static constexpr const char* names[] = {"zero", "pass_through"};
};

// An expert's work for MoELayer's thread schedule, in units of one token's arithmetic per hidden
// unit: reading its weights costs about 8 tokens' arithmetic (2 FLOPs per weight per token against
// 4 bytes of DRAM traffic per weight), and one core hardly overlaps the read with the arithmetic
// (bench/README.md, sessions 47–48), so the two add. Until session 49 the cost was max(tokens, 8),
// as if they overlapped fully: every expert of up to 8 tokens then cost the same, though on S1 8
// tokens took 1.8–1.9× as long as one, and the longest-first order ran them in index order. The layer
// on 2 threads, new ÷ old timed in pairs (medians of 3–7, three runs): S1 T = 16 0.95–0.99, S3
// T = 16 0.97–0.99, the other rows 0.98–1.003.
inline index_t expert_cost(index_t d_ff, index_t tokens) noexcept { return d_ff * (tokens + 8); }

// Whether `threads` threads should take whole experts of these costs (sorted falling) rather than
// share every product: when there is an expert for every thread and a longest-first assignment
// comes within 1/32 of an even split. Whole experts need no barrier per product: 8 experts on 2
// threads ran 2–6% faster (S1 at T = 16–512), and so did as few as 1–3 equal experts per thread
// (2 threads, medians of 11–14 interleaved runs in the machine's fast 2-thread mode: S1 at T = 1,
// 2 experts, 1.25 → 1.20 ms; S2 at T = 1, 6 experts, 0.663 → 0.555 ms; in the slow mode 2–4%).
// Where the costs do not split evenly, shared products balance better. `load` has room for
// `threads` values.
inline bool share_out_experts(const index_t* cost, index_t count, index_t threads, index_t* load) noexcept {
  if (threads < 2 || count < threads) return false;
  index_t total = 0;
  std::fill(load, load + threads, index_t(0));
  for (index_t i = 0; i < count; ++i) {
    *std::min_element(load, load + threads) += cost[i];
    total += cost[i];
  }
  return 32 * *std::max_element(load, load + threads) * threads <= 33 * total;
}
}  // namespace detail

template <class Router, class Expert>
class MoELayer {
  static_assert(detail::check_expert<Expert>());  // (one message per member an expert type lacks)
  static_assert(detail::check_router<Router>());  // (the same for the router's forward members)

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
    detail::check_positive("MoELayer", "router.d_model()", router_.d_model());  // a router of your own is not checked
    for (std::size_t e = 0; e < experts_.size(); ++e) check_width("expert ", e, experts_[e].d_model());
    for (std::size_t e = 0; e < zero_compute_.size(); ++e) check_width("zero_compute expert ", e, zero_compute_[e].d_model());
    // The gradient shapes backward() checks, taken once here (one expert's zero gradient at a time).
    for (const Expert& e : experts_) expert_shapes_.push_back(detail::gradient_shapes(e.zero_gradient()));
    for (const auto& z : zero_compute_) zero_compute_shapes_.push_back(detail::gradient_shapes(z.zero_gradient()));
  }

  // Always-on experts added to every token, each scaled by sigmoid(x · gateᵀ) when `gate` [1, d]
  // is given (Qwen2-MoE shared_expert_gate; one gate for the sum of the shared experts).
  void set_shared_experts(std::vector<Expert> shared, Weight<T> gate = {}) {
    for (std::size_t s = 0; s < shared.size(); ++s) check_width("shared expert ", s, shared[s].d_model());
    if (gate.rows() != 0) {
      detail::check_value("MoELayer::set_shared_experts", "gate.rows()", gate.rows(), 1);
      detail::check_dim("MoELayer::set_shared_experts", "gate.cols()", gate.cols(), "d_model", d_model());
    }
    shared_ = std::move(shared);
    shared_gate_ = std::move(gate);
    shared_shapes_.clear();
    for (const Expert& e : shared_) shared_shapes_.push_back(detail::gradient_shapes(e.zero_gradient()));
  }
  void set_dropped_tokens(DroppedTokens policy) {
    detail::check_enum("MoELayer::set_dropped_tokens", "policy", policy);
    dropped_tokens_ = policy;
  }
  DroppedTokens dropped_tokens() const noexcept { return dropped_tokens_; }
  // The selection-only bias of the layer's own copy of its router (TopKRouter::set_selection_bias):
  // DeepSeek-V3's e_score_correction_bias, or what BiasBalancer learns (BiasBalancer::apply(layer)).
  template <class R = Router>
  auto set_selection_bias(const Vector<T>& bias) -> decltype(std::declval<R&>().set_selection_bias(bias)) {
    return router_.set_selection_bias(bias);
  }

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
    run(x, ctx, y, ws, nullptr, arch);
  }

  // Convenience: returns a new [T, d] output.
  template <class Arch = simd::default_arch>
  Matrix<T> forward(const ConstMatrixRef<T>& x, Workspace<T>& ws, Arch arch = {}) const {
    Matrix<T> y(x.rows(), d_model());
    forward(x, y, ws, arch);
    return y;
  }

  // --- training -------------------------------------------------------------------------------
  using ExpertGradient = typename Expert::Gradient;
  using ZeroComputeGradient = typename ZeroComputeExpert<T>::Gradient;
  struct Gradients {
    Matrix<T> router;                                // [E, d]
    std::vector<ExpertGradient> experts;             // one per FFN expert
    std::vector<ZeroComputeGradient> zero_compute;   // one per zero-computation expert
    std::vector<ExpertGradient> shared;              // one per shared expert
    Matrix<T> shared_gate;                           // [1, d], or empty without a gate
  };
  // Zero gradients of the right shapes for this layer.
  Gradients make_gradients() const {
    Gradients g;
    g.router = Matrix<T>::Zero(num_experts(), d_model());
    for (const Expert& e : experts_) g.experts.push_back(e.zero_gradient());
    for (const auto& z : zero_compute_) g.zero_compute.push_back(z.zero_gradient());
    for (const Expert& s : shared_) g.shared.push_back(s.zero_gradient());
    if (shared_gate_.rows() == 1) g.shared_gate = Matrix<T>::Zero(1, d_model());
    return g;
  }

  // forward() that keeps what backward() needs in `ws`; y has the same bits as forward().
  template <class Arch = simd::default_arch>
  void forward_train(const ConstMatrixRef<T>& x, MatrixRef<T> y, TrainingWorkspace<T>& ws, Arch arch = {}) const {
    forward_train(x, RouteContext{}, y, ws, arch);
  }
  // As above, with a RouteContext (routing groups, token ids, training jitter).
  template <class Arch = simd::default_arch>
  void forward_train(const ConstMatrixRef<T>& x, const RouteContext& ctx, MatrixRef<T> y, TrainingWorkspace<T>& ws,
                     Arch arch = {}) const {
    run(x, ctx, y, ws, &ws, arch);  // resets ws.training_tokens: invalid until it completes
    ws.layout = training_layout(ws.routing);
    ws.training_tokens = x.rows();
  }

  // Gradients of L given dy = ∂L/∂y [T, d], for the x of the last forward_train on `ws`:
  // writes dx = ∂L/∂x [T, d] and overwrites `grads` (shaped by make_gradients()).
  // extra_dlogits [T, E] (for example an auxiliary loss's gradient) joins the router's gradient.
  template <class Arch = simd::default_arch>
  void backward(const ConstMatrixRef<T>& x, const ConstMatrixRef<T>& dy, MatrixRef<T> dx, Gradients& grads,
                TrainingWorkspace<T>& ws, const T* extra_dlogits = nullptr, Arch arch = {}) const {
    check_backward("MoELayer::backward", x, dy, dx, grads, ws);
    zero_gradients(grads);
    backward_checked(x, dy, dx, grads, ws, extra_dlogits, arch, false);
  }

  // backward() that adds this batch's weight gradients to `grads` instead of overwriting them:
  // gradient accumulation over micro-batches (zero `grads` where a step starts, for example with
  // backward() on its first micro-batch). dx is still overwritten. Experts that received no token
  // are not touched, which at a few tokens skips most of backward()'s time: zeroing every expert's
  // gradients. From zeroed `grads` it gives backward()'s bits.
  template <class Arch = simd::default_arch>
  void backward_accumulate(const ConstMatrixRef<T>& x, const ConstMatrixRef<T>& dy, MatrixRef<T> dx, Gradients& grads,
                           TrainingWorkspace<T>& ws, const T* extra_dlogits = nullptr, Arch arch = {}) const {
    check_backward("MoELayer::backward_accumulate", x, dy, dx, grads, ws);
    backward_checked(x, dy, dx, grads, ws, extra_dlogits, arch, true);
  }

  // backward() and backward_accumulate() with extra_dlogits as a matrix, whose shape is checked:
  // [T, E] with rows E apart (any Eigen matrix of that shape; a column-major one is copied into a
  // row-major temporary by the conversion, which allocates).
  template <class Arch = simd::default_arch>
  void backward(const ConstMatrixRef<T>& x, const ConstMatrixRef<T>& dy, MatrixRef<T> dx, Gradients& grads,
                TrainingWorkspace<T>& ws, const ConstMatrixRef<T>& extra_dlogits, Arch arch = {}) const {
    backward(x, dy, dx, grads, ws, checked_dlogits("MoELayer::backward", x, extra_dlogits), arch);
  }
  template <class Arch = simd::default_arch>
  void backward_accumulate(const ConstMatrixRef<T>& x, const ConstMatrixRef<T>& dy, MatrixRef<T> dx, Gradients& grads,
                           TrainingWorkspace<T>& ws, const ConstMatrixRef<T>& extra_dlogits, Arch arch = {}) const {
    backward_accumulate(x, dy, dx, grads, ws, checked_dlogits("MoELayer::backward_accumulate", x, extra_dlogits), arch);
  }

  // --- memory up front ---------------------------------------------------------------------------
  // Grows `ws` so that a forward of up to `max_tokens` tokens in up to `max_groups` routing groups
  // allocates nothing, however it routes (every token on one expert included): for an engine that
  // must not allocate once started. The TrainingWorkspace form covers forward_train, backward and
  // backward_accumulate too. It costs a forward (or training step) of a zero batch of max_tokens
  // tokens, which sizes what depends on the batch's size, and sizes what depends on the routing by
  // the router's max_assignments (tokens · E for a router without one). The bounds hold for this
  // call's thread count and for experts whose saved values grow linearly with their tokens, as
  // moe's do. Afterwards `ws` holds an empty batch's routing and no forward_train.
  template <class Arch = simd::default_arch>
  void reserve(Workspace<T>& ws, index_t max_tokens, index_t max_groups = 1, Arch arch = {}) const {
    reserve_for(ws, nullptr, max_tokens, max_groups, arch);
  }
  template <class Arch = simd::default_arch>
  void reserve(TrainingWorkspace<T>& ws, index_t max_tokens, index_t max_groups = 1, Arch arch = {}) const {
    reserve_for(ws, &ws, max_tokens, max_groups, arch);
  }
  // Assignments a batch of `tokens` tokens in at most `groups` routing groups can get: the
  // router's max_assignments, or tokens · E without one.
  index_t max_assignments(index_t tokens, index_t groups = 1) const {
    if constexpr (detail::detected_v<detail::max_assignments_of, Router>) return router_.max_assignments(tokens, groups);
    else return tokens * num_experts();
  }

 private:
  template <class Arch>
  void reserve_for(Workspace<T>& ws, TrainingWorkspace<T>* train, index_t max_tokens, index_t max_groups, Arch arch) const {
    detail::run_zero_batches("MoELayer::reserve", *this, ws, train, max_tokens, max_groups, arch);
    // What depends on the routing, at its largest: A assignments, `busiest` tokens on one expert.
    const index_t Tn = max_tokens, d = d_model();
    const index_t A = max_assignments(Tn, max_groups), busiest = std::min(Tn, A);
    const index_t threads = in_parallel() ? 1 : max_threads();
    ws.routing.plan.reserve(Tn, num_experts(), A);
    ws.dispatched.ensure(A * d);
    ws.expert_out.ensure(A * d);
    index_t scratch = 0, shared_scratch = 0, saved = 0, backward_scratch = 0;
    for (const Expert& e : experts_) {
      scratch = std::max(scratch, e.scratch_size(busiest));
      saved = std::max(saved, e.saved_size(A));  // Σ_e saved_size(m_e) for Σ_e m_e = A, when linear in m
      backward_scratch = std::max(backward_scratch, detail::backward_scratch_size(e, busiest));
    }
    for (const Expert& s : shared_) {
      shared_scratch = std::max(shared_scratch, s.scratch_size(Tn));
      backward_scratch = std::max(backward_scratch, detail::backward_scratch_size(s, Tn));
    }
    ws.scratch.ensure(std::max(scratch * threads, shared_scratch));
    index_t depth = d;  // the longest rows a product meets: the router's and the experts' (d, d_ff)
    for (const Expert& e : experts_) depth = std::max(depth, e.d_ff());
    for (const Expert& s : shared_) depth = std::max(depth, s.d_ff());
    simd::reserve_lane_buffers<Arch, T>(static_cast<std::size_t>(Tn), static_cast<std::size_t>(depth));
    if (!shared_.empty() || dropped_tokens_ == DroppedTokens::pass_through) {
      ws.extra.ensure(Tn * d);
      ws.shared_out.ensure(Tn * d);
      ws.shared_in.ensure(Tn * d);  // (x with rows more than d apart is copied)
    }
    if (train != nullptr) {
      train->saved.ensure(saved);
      train->backward_rows.ensure(backward_rows_size(A, Tn));
      train->backward_scratch.ensure(backward_scratch * threads);
    }
  }

  // backward's rows in ws.backward_rows, for A assignments and T tokens: [A, d] gradients of the
  // expert outputs and inputs, then with shared experts their rows (SharedGrads: x's copy, gate ⊙ dy
  // and each one's dx, [T, d] each).
  index_t backward_matrix_rows(index_t A, index_t T_) const noexcept {
    const auto S = static_cast<index_t>(shared_.size());
    return 2 * A + (S > 0 ? (2 + S) * T_ : 0);
  }
  // The whole buffer: those rows, then [A] ∂L/∂(routing weight) and [2, T] for combine_backward.
  // backward and reserve both size it here.
  index_t backward_rows_size(index_t A, index_t T_) const noexcept {
    return backward_matrix_rows(A, T_) * d_model() + A + 2 * T_;
  }

  // FFN expert e (the router's experts [0, experts_.size())), by the plan's signed index.
  const Expert& ffn_expert(index_t e) const noexcept { return experts_[static_cast<std::size_t>(e)]; }

  // extra_dlogits' values for the pointer form, once its shape and row stride are checked.
  const T* checked_dlogits(const char* where, const ConstMatrixRef<T>& x, const ConstMatrixRef<T>& extra_dlogits) const {
    if (extra_dlogits.rows() != x.rows() || extra_dlogits.cols() != num_experts()) {
      detail::throw_invalid(where, ": extra_dlogits must be [x.rows(), experts] (extra_dlogits = [", extra_dlogits.rows(), ", ",
                            extra_dlogits.cols(), "], x.rows() = ", x.rows(), ", experts = ", num_experts(), ")");
    }
    if (extra_dlogits.rows() > 1 && extra_dlogits.outerStride() != extra_dlogits.cols()) {
      detail::throw_invalid(where, ": extra_dlogits' rows must be contiguous (outer stride = ", extra_dlogits.outerStride(),
                            ", experts = ", extra_dlogits.cols(), ")");
    }
    return extra_dlogits.data();
  }

  void check_backward(const char* where, const ConstMatrixRef<T>& x, const ConstMatrixRef<T>& dy, const MatrixRef<T>& dx,
                      const Gradients& grads, const TrainingWorkspace<T>& ws) const {
    detail::check_backward_inputs(where, ws.training_tokens, d_model(), x, dy, dx);
    detail::check_training_layout(where, ws.layout, training_layout(ws.routing));
    check_gradients(where, grads);
  }

  // The layout forward_train leaves in a TrainingWorkspace for this layer and `routing`.
  TrainingLayout training_layout(const RouterOutput<T>& routing) const {
    static_assert(detail::check_training_router<Router>());  // (forward_train and backward use it)
    const Routing<T>& plan = routing.plan;
    TrainingLayout l;
    l.route = routing.route_count();
    l.router = router_.config_fingerprint();
    l.tokens = plan.num_tokens;
    l.d_model = d_model();
    l.experts = num_experts();
    l.slots_per_expert = 0;
    l.rows = plan.num_assignments();
    l.shared_experts = static_cast<index_t>(shared_.size());
    l.pass_through = dropped_tokens_ == DroppedTokens::pass_through ? 1 : 0;
    l.saved = 0;
    l.shared_saved = 0;
    if (plan.num_experts != num_experts()) l.saved = -1;  // (a plan for other experts: no per-expert sizes to add)
    else for (index_t e = 0; e < static_cast<index_t>(experts_.size()); ++e) l.saved += ffn_expert(e).saved_size(plan.tokens_of(e));
    for (const Expert& s : shared_) l.shared_saved += s.saved_size(plan.num_tokens);
    return l;
  }

  // `accumulate`: add to `grads` (backward_accumulate) rather than overwrite them (backward).
  template <class Arch>
  void backward_checked(const ConstMatrixRef<T>& x, const ConstMatrixRef<T>& dy, MatrixRef<T> dx, Gradients& grads,
                        TrainingWorkspace<T>& ws, const T* extra_dlogits, Arch arch, bool accumulate) const {
    const index_t d = d_model();
    const Routing<T>& plan = ws.routing.plan;
    const index_t A = plan.num_assignments();
    const T* expert_out = ws.expert_out.data();
    // In the workspace, which a warm backward reuses (backward_rows_size).
    const index_t T_ = x.rows(), S = static_cast<index_t>(shared_.size());
    T* const grad_rows = ws.backward_rows.ensure(backward_rows_size(A, T_));
    MatrixMap<T> d_out(grad_rows, A, d), d_in(grad_rows + A * d, A, d);
    T* const grad_weight = grad_rows + backward_matrix_rows(A, T_) * d;
    T* const token_grads = grad_weight + A;
    // Row by row, the same code for every row whichever thread takes it: the bits do not depend on the threads.
    parallel_for(A, A * d > 65536, [&](index_t a) {
      const index_t t = plan.token[a];
      grad_weight[a] = dy.row(t).dot(ConstMatrixMap<T>(expert_out + a * d, 1, d).row(0));
      d_out.row(a) = plan.weight[a] * dy.row(t);
    });
    SharedGrads shared;
    if (S > 0) {
      const Eigen::Map<const Vector<T>> gate(ws.shared_gate.data(), T_);  // sigmoid(x · w_gateᵀ) or 1, from forward_train
      T* x_copy = grad_rows + 2 * A * d;
      shared.d_out = x_copy + T_ * d;
      shared.dx = shared.d_out + T_ * d;
      shared.x_rows = x.data();
      if (x.outerStride() != d) MatrixMap<T>(x_copy, T_, d) = x, shared.x_rows = x_copy;
      MatrixMap<T>(shared.d_out, T_, d).noalias() = gate.asDiagonal() * dy;
    }
    experts_backward(arch, ws, d_out.data(), d_in.data(), shared, grads, accumulate);
    // dx row t = Σ of its assignments' input gradients, in rank order: combine's work, so split as
    // combine splits it (a token has 0 to E assignments under expert choice).
    auto rows_before = [&](index_t t) { return plan.rows_moved_before(t); };
    parallel_for_balanced(x.rows(), A * d > 65536, rows_before, [&](index_t t) {
      dx.row(t).setZero();
      for (index_t j = plan.token_begin[t]; j < plan.token_begin[t + 1]; ++j) dx.row(t) += d_in.row(plan.assignment[j]);
    });
    // The rest with Eigen's products on one thread, so the gradients' bits do not depend on the thread count.
    detail::with_serial_eigen([&] { combine_backward(x, dy, dx, grads, ws, extra_dlogits, grad_weight, token_grads, shared, arch); });
  }

  // The shared experts' part of backward: their common inputs, and each one's dx, added to the
  // layer's dx in order once every expert is done.
  struct SharedGrads {
    const T* x_rows = nullptr;  // [T, d] x with rows d apart: x itself, or a copy in the workspace
    T* d_out = nullptr;         // [T, d] gate ⊙ dy: every shared expert's output gradient
    T* dx = nullptr;            // [S·T, d] shared expert s's input gradient in rows [s·T, (s + 1)·T)
  };

  // Every expert's backward: d_in [A, d] from d_out [A, d] and the saved activations, each shared
  // expert's dx into `shared`, and the routed and shared experts' weight gradients (unless
  // `accumulate`, written over by experts with the workspace form and zeroed first for the others
  // and for experts without tokens, whose zeroing at few tokens is much of the work; with
  // `accumulate`, experts without tokens are skipped). Each thread's scratch is its part of
  // ws.backward_scratch. With several
  // threads (MOE_USE_OPENMP) whole experts go to the threads, most work first, each thread taking
  // the next as it frees up; an expert's products then run on its one thread, as they do on one
  // thread, so the bits do not depend on the thread count (tests/layer/threads_test.cpp).
  // backward_bench on 2 threads: see README.
  template <class Arch>
  void experts_backward(Arch arch, TrainingWorkspace<T>& ws, const T* d_out, T* d_in, SharedGrads& shared,
                        Gradients& grads, bool accumulate) const {
    const Routing<T>& plan = ws.routing.plan;
    const index_t d = d_model(), T_ = plan.num_tokens, num_ffn = static_cast<index_t>(experts_.size());
    const auto num_shared = static_cast<index_t>(shared_.size());
    const T* dispatched = ws.dispatched.data();
    // Jobs: routed expert e as e (every FFN expert, the zero-computation ones with tokens), shared
    // expert s as -1 - s. Each one's saved activations as forward_train laid them out: routed
    // expert e's at ws.saved + saved_at[e], shared expert s's at ws.shared_saved + saved_at[F + s]
    // with F FFN experts. Both lists live in the forward's schedule buffer (free once the forward
    // is done), so that a warm backward allocates nothing.
    index_t* const saved_at = ws.expert_schedule.ensure(num_ffn + num_experts() + 2 * num_shared);
    index_t* const jobs = saved_at + num_ffn + num_shared;  // [at most E + S]
    index_t num_jobs = 0, offset = 0;
    for (index_t e = 0; e < num_experts(); ++e) {
      const index_t m = plan.tokens_of(e);
      if (e < num_ffn) saved_at[e] = offset, offset += ffn_expert(e).saved_size(m);
      if (m > 0 || (e < num_ffn && !accumulate)) jobs[num_jobs++] = e;
    }
    offset = 0;
    for (index_t s = 0; s < num_shared; ++s) {
      saved_at[num_ffn + s] = offset, offset += shared_[std::size_t(s)].saved_size(T_);
      jobs[num_jobs++] = -1 - s;
    }
    const T* const saved = ws.saved.data();
    const T* const shared_saved = ws.shared_saved.data();
    // Work ~ tokens × d_ff (the weight gradients' GEMMs); zero-computation experts last.
    auto work = [&](index_t job) {
      if (job < 0) return T_ * shared_[std::size_t(-1 - job)].d_ff();
      return job < num_ffn ? plan.tokens_of(job) * ffn_expert(job).d_ff() : index_t(0);
    };
    std::sort(jobs, jobs + num_jobs, [&](index_t a, index_t b) { return work(a) != work(b) ? work(a) > work(b) : a < b; });
    // Each thread's scratch, sized for the largest job.
    index_t scratch_needed = 0;
    for (index_t e = 0; e < num_ffn; ++e)
      scratch_needed = std::max(scratch_needed, detail::backward_scratch_size(ffn_expert(e), plan.tokens_of(e)));
    for (const Expert& expert : shared_) scratch_needed = std::max(scratch_needed, detail::backward_scratch_size(expert, T_));
    const PerThreadScratch<T> scratch(ws.backward_scratch, scratch_needed);
    detail::for_each_with_serial_eigen(static_cast<std::ptrdiff_t>(num_jobs), [&](std::ptrdiff_t i) {
      const index_t e = jobs[i];
      T* own_scratch = scratch.own();
      if (e < 0) {
        const index_t s = -1 - e;
        detail::expert_backward(shared_[std::size_t(s)], shared.x_rows, T_, shared.d_out, shared_saved + saved_at[num_ffn + s],
                                shared.dx + s * T_ * d, grads.shared[std::size_t(s)], arch, own_scratch, accumulate);
        return;
      }
      const index_t m = plan.tokens_of(e), first = plan.expert_begin[e];
      if (e < num_ffn) {  // (m == 0 only when !accumulate: zeroed)
        detail::expert_backward(ffn_expert(e), dispatched + first * d, m, d_out + first * d, saved + saved_at[e],
                                d_in + first * d, grads.experts[std::size_t(e)], arch, own_scratch, accumulate);
      } else {
        zero_compute_[std::size_t(e - num_ffn)].backward(dispatched + first * d, m, d_out + first * d, d_in + first * d,
                                                         grads.zero_compute[std::size_t(e - num_ffn)]);
      }
    });
  }

  // backward's last part: adds to dx (the experts' input gradients) the dropped tokens', the
  // router's and the shared experts' parts. token_grads: [2, T] scratch.
  template <class Arch>
  void combine_backward(const ConstMatrixRef<T>& x, const ConstMatrixRef<T>& dy, MatrixRef<T>& dx, Gradients& grads,
                        TrainingWorkspace<T>& ws, const T* extra_dlogits, const T* grad_weight, T* token_grads,
                        const SharedGrads& shared, Arch arch) const {
    const index_t T_ = x.rows();
    const Routing<T>& plan = ws.routing.plan;
    T* grad_lost = nullptr;  // [T] ∂L/∂(lost weight), pass-through only
    if (dropped_tokens_ == DroppedTokens::pass_through) {
      grad_lost = token_grads;
      std::fill(grad_lost, grad_lost + T_, T(0));
      for (std::size_t i = 0; i < plan.dropped.size(); ++i) {
        const index_t t = plan.dropped[i];
        grad_lost[t] = dy.row(t).dot(x.row(t));
        dx.row(t) += plan.dropped_weight[i] * dy.row(t);
      }
    }
    if constexpr (detail::detected_v<detail::router_backward_with_scratch_of, Router>) {  // as moe's routers
      router_.backward(x, ws.routing, grad_weight, grad_lost, extra_dlogits, dx, grads.router, arch, &ws.router_scratch);
    } else {  // a router type of your own without the scratch parameter
      router_.backward(x, ws.routing, grad_weight, grad_lost, extra_dlogits, dx, grads.router, arch);
    }
    if (!shared_.empty()) add_shared_backward(arch, dy, dx, grads, ws, shared, token_grads + T_);
  }

  template <class Arch>
  void run(const ConstMatrixRef<T>& x, const RouteContext& ctx, MatrixRef<T> y, Workspace<T>& ws, TrainingWorkspace<T>* train,
           Arch arch) const {
    const index_t d = d_model();
    detail::check_dim("MoELayer::forward", "x.cols()", x.cols(), "d_model", d);
    detail::check_dim("MoELayer::forward", "y.rows()", y.rows(), "x.rows()", x.rows());
    detail::check_dim("MoELayer::forward", "y.cols()", y.cols(), "d_model", d);
    detail::check_rows("MoELayer::forward", "x", x, false);
    detail::check_rows("MoELayer::forward", "y", y, true);
    ws.training_tokens = -1;

    router_.route(x, ctx, ws.routing, arch);
    const Routing<T>& plan = ws.routing.plan;
    // The kernels below index by the plan: a router of the user's own that planned for another
    // batch or other experts (say, without the zero-computation ones) is stopped here.
    detail::check_plan_bounds("MoELayer::forward", plan, x.rows(), num_experts());
    const index_t A = plan.num_assignments();

    T* dispatched = ws.dispatched.ensure(A * d);
    T* expert_out = ws.expert_out.ensure(A * d);
    dispatch(arch, plan, x.data(), x.outerStride(), d, dispatched);

    run_experts(arch, plan, dispatched, expert_out, ws, train);
    const auto num_ffn = static_cast<index_t>(experts_.size());
    for (index_t e = num_ffn; e < num_experts(); ++e) {
      const index_t m = plan.tokens_of(e), first = plan.expert_begin[e];
      if (m > 0) zero_compute_[std::size_t(e - num_ffn)].forward(arch, dispatched + first * d, m, expert_out + first * d);
    }

    // Shared experts and the pass-through run before combine overwrites y, which may alias x.
    T* extra = nullptr;  // [T, d] shared and pass-through contributions, or null when none
    if (!shared_.empty() || (dropped_tokens_ == DroppedTokens::pass_through && !plan.dropped.empty())) {
      index_t scratch_needed = 0;
      for (const Expert& s : shared_) scratch_needed = std::max(scratch_needed, s.scratch_size(x.rows()));
      extra = add_shared_and_dropped(arch, x, ws, ws.scratch.ensure(scratch_needed), train);
    }
    combine(arch, plan, expert_out, d, y.data(), y.outerStride(), extra);  // y = extra + routed, written once
  }


  // expert_out rows = expert(dispatched rows) for every FFN expert that got tokens; with `train`,
  // also what backward needs, expert after expert in train->saved.
  //
  // Threads: when there are many experts whose work can be shared out evenly
  // (detail::share_out_experts), whole experts go to the threads, largest first, each thread taking
  // the next as it frees up: a thread streams its own experts' weights and no product waits at a
  // barrier (measured 3–10% faster at 32 and 64 experts). Otherwise (few experts, or one far
  // busier than the rest) experts run in turn and each product splits its weight rows over the
  // threads. Every element is computed by the same code in the same order either way, so the
  // output bits do not depend on the choice or the thread count.
  template <class Arch>
  void run_experts(Arch arch, const Routing<T>& plan, const T* dispatched, T* expert_out, Workspace<T>& ws,
                   TrainingWorkspace<T>* train) const {
    const index_t d = d_model(), num_ffn = static_cast<index_t>(experts_.size());
    const index_t threads = in_parallel() ? 1 : max_threads();  // inside the caller's parallel region: this thread
    // Per expert its place in train->saved; the active experts by falling cost, and their costs.
    index_t* saved_at = ws.expert_schedule.ensure(3 * num_ffn + threads);
    index_t* order = saved_at + num_ffn;
    index_t* costs = order + num_ffn;
    index_t* loads = costs + num_ffn;  // [threads]
    index_t active = 0, saved_needed = 0, scratch_needed = 0;
    auto cost = [&](index_t e) { return detail::expert_cost(ffn_expert(e).d_ff(), plan.tokens_of(e)); };
    for (index_t e = 0; e < num_ffn; ++e) {
      const index_t m = plan.tokens_of(e);
      saved_at[e] = saved_needed;
      if (train != nullptr) saved_needed += ffn_expert(e).saved_size(m);
      if (m == 0) continue;
      order[active++] = e;
      scratch_needed = std::max(scratch_needed, ffn_expert(e).scratch_size(m));
    }
    std::sort(order, order + active, [&](index_t a, index_t b) { return cost(a) != cost(b) ? cost(a) > cost(b) : a < b; });
    for (index_t i = 0; i < active; ++i) costs[i] = cost(order[i]);
    const bool by_expert = detail::share_out_experts(costs, active, threads, loads);

    T* saved = train != nullptr ? train->saved.ensure(saved_needed) : nullptr;
    T* scratch = ws.scratch.ensure(scratch_needed * (by_expert ? threads : 1));
    auto run_one = [&](index_t e, T* own_scratch) {
      const index_t m = plan.tokens_of(e), first = plan.expert_begin[e];
      if (train != nullptr) {
        ffn_expert(e).forward_saving(arch, dispatched + first * d, m, expert_out + first * d, saved + saved_at[e], own_scratch);
      } else {
        ffn_expert(e).forward(arch, dispatched + first * d, m, expert_out + first * d, own_scratch);
      }
    };
    if (!by_expert) {
      for (index_t i = 0; i < active; ++i) run_one(order[i], scratch);
      return;
    }
    // Backward's schedule (most work first, each thread taking the next expert as it frees up),
    // which also brings an expert's exception out of the parallel region to the caller.
    detail::for_each_with_serial_eigen(active, [&](std::ptrdiff_t i) {
      run_one(order[i], scratch + scratch_needed * thread_index());
    });
  }

  void check_width(const char* what, std::size_t index, index_t width) const {
    if (width != router_.d_model()) {
      detail::throw_invalid("MoELayer: ", what, index, " d_model must equal router.d_model() (", what, "d_model = ", width,
                            ", router d_model = ", router_.d_model(), ")");
    }
  }

  // extra [T, d] = Σ_s g · shared_s(x) + (dropped weight) · x, in a fixed order per token.
  template <class Arch>
  T* add_shared_and_dropped(Arch arch, const ConstMatrixRef<T>& x, Workspace<T>& ws, T* scratch, TrainingWorkspace<T>* train) const {
    const index_t T_ = x.rows(), d = d_model();
    T* extra = ws.extra.ensure(T_ * d);
    T* shared_out = ws.shared_out.ensure(T_ * d);
    const T* x_rows = x.data();  // x with rows d apart: x itself, or a copy
    if (x.outerStride() != d) {
      T* copy = ws.shared_in.ensure(T_ * d);
      for (index_t t = 0; t < T_; ++t) simd::copy_row(arch, x.data() + t * x.outerStride(), copy + t * d, static_cast<std::size_t>(d));
      x_rows = copy;
    }
    if (shared_.empty()) {
      std::fill(extra, extra + T_ * d, T(0));
    } else {
      T* gate = ws.shared_gate.ensure(T_);
      if (shared_gate_.rows() == 1) {
        simd::matmul_nt(arch, x_rows, static_cast<std::size_t>(T_), static_cast<std::size_t>(d), shared_gate_.data(), 1, gate, 1);
        // simd::sigmoid rounds a row's tail as its body, so a gate does not depend on the token's
        // place in the batch.
        simd::sigmoid(arch, gate, gate, static_cast<std::size_t>(T_));
      } else {
        std::fill(gate, gate + T_, T(1));
      }
      T* saved = nullptr;
      if (train != nullptr) {
        index_t saved_needed = 0;
        for (const Expert& s : shared_) saved_needed += s.saved_size(T_);
        saved = train->shared_saved.ensure(saved_needed);
        shared_out = train->shared_outputs.ensure(static_cast<index_t>(shared_.size()) * T_ * d);
      }
      for (std::size_t i = 0; i < shared_.size(); ++i) {
        const Expert& s = shared_[i];
        if (train != nullptr) {
          s.forward_saving(arch, x_rows, T_, shared_out, saved, scratch);
          saved += s.saved_size(T_);
        } else {
          s.forward(arch, x_rows, T_, shared_out, scratch);
        }
        // extra row t (+)= gate[t] · output row t; the first expert's pass writes it from zero.
        // The rows are independent: threads take runs of tokens.
        parallel_for(T_, T_ * d > 65536, [&](index_t t) {
          T* row = extra + t * d;
          simd::weighted_row_sum(arch, shared_out, static_cast<std::size_t>(d), &t, gate, 1, row, static_cast<std::size_t>(d),
                                 i == 0 ? nullptr : row);
        });
        if (train != nullptr) shared_out += T_ * d;  // keep each shared expert's output
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

  // Shared experts: y += g ⊙ S(x), g = sigmoid(x · w_gateᵀ) or 1. Adds each shared expert's dx
  // (experts_backward computed them) to dx in order, and the gate's gradients. d_gate: [T] scratch.
  template <class Arch>
  void add_shared_backward(Arch arch, const ConstMatrixRef<T>& dy, MatrixRef<T>& dx, Gradients& grads,
                           const TrainingWorkspace<T>& ws, const SharedGrads& shared, T* d_gate) const {
    const index_t T_ = dy.rows(), d = d_model();
    const auto width = static_cast<std::size_t>(d);
    const bool gated = shared_gate_.rows() == 1;
    const T* gate = ws.shared_gate.data();  // [T]
    Eigen::Map<Vector<T>> d_gate_map(d_gate, T_);
    d_gate_map.setZero();
    for (std::size_t s = 0; s < shared_.size(); ++s) {
      const auto row = static_cast<index_t>(s) * T_;
      const ConstMatrixMap<T> out(ws.shared_outputs.data() + row * d, T_, d);
      dx += ConstMatrixMap<T>(shared.dx + row * d, T_, d);
      if (gated) d_gate_map += dy.cwiseProduct(out).rowwise().sum();
    }
    if (!gated) return;
    // z = x · w_gateᵀ: ∂L/∂z = ∂L/∂g · g (1 − g); ∂L/∂w_gate += Σ_t ∂L/∂z_t x_t, dx_t += ∂L/∂z_t w_gate.
    for (index_t t = 0; t < T_; ++t) {
      const T dz = d_gate[t] * gate[t] * (T(1) - gate[t]);
      simd::axpy(arch, dz, shared.x_rows + t * d, grads.shared_gate.data(), width);
      simd::axpy(arch, dz, shared_gate_.data(), dx.data() + t * dx.outerStride(), width);
    }
  }

  void check_gradients(const char* where, const Gradients& g) const {
    detail::check_dim(where, "grads.router.rows()", g.router.rows(), "num_experts", num_experts());
    detail::check_dim(where, "grads.router.cols()", g.router.cols(), "d_model", d_model());
    detail::check_dim(where, "grads.experts.size()", g.experts.size(), "experts", experts_.size());
    detail::check_dim(where, "grads.zero_compute.size()", g.zero_compute.size(), "zero_compute experts", zero_compute_.size());
    detail::check_dim(where, "grads.shared.size()", g.shared.size(), "shared experts", shared_.size());
    detail::check_dim(where, "grads.shared_gate.size()", g.shared_gate.size(), "shared gate size", shared_gate_.rows() * shared_gate_.cols());
    for (std::size_t e = 0; e < experts_.size(); ++e) detail::check_gradient_shapes(where, "grads.experts", e, g.experts[e], expert_shapes_[e]);
    for (std::size_t s = 0; s < shared_.size(); ++s) detail::check_gradient_shapes(where, "grads.shared", s, g.shared[s], shared_shapes_[s]);
    for (std::size_t z = 0; z < zero_compute_.size(); ++z)
      detail::check_gradient_shapes(where, "grads.zero_compute", z, g.zero_compute[z], zero_compute_shapes_[z]);
  }
  // (The routed FFN and shared experts' gradients, most of the memory, are zeroed by
  // experts_backward, on its threads.)
  static void zero_gradients(Gradients& g) {
    g.router.setZero();
    g.shared_gate.setZero();
    for (auto& e : g.zero_compute) e.for_each([](auto& m) { m.setZero(); });
  }

  Router router_;
  std::vector<Expert> experts_;
  std::vector<ZeroComputeExpert<T>> zero_compute_;
  std::vector<Expert> shared_;
  Weight<T> shared_gate_;  // [1, d] or empty
  // Per expert, the (rows, cols) of each matrix of its gradient, for backward()'s shape check.
  std::vector<std::vector<index_t>> expert_shapes_, zero_compute_shapes_, shared_shapes_;
  DroppedTokens dropped_tokens_ = DroppedTokens::zero;
};

MOE_NAMESPACE_END
