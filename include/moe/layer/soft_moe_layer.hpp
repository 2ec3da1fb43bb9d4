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
// Training: forward_train keeps what backward needs in a SoftTrainingWorkspace; backward gives
// the gradients of the input, of Φ and the scale (SoftRouter::backward) and of every expert:
//   dC = dy · Ỹ_gᵀ, dỸ_g = C_gᵀ · dy_g             per group g (the combine)
//   dX̃ = expert backward of dỸ                     (each expert on its s·G rows)
//   dD = x_g · dX̃_gᵀ, dx_g = D_g · dX̃_g            per group (the dispatch)
// then through the two softmaxes and the logits into x, Φ and the scale.
//
// The layer holds its router and experts by value; both are cheap when they view the caller's
// weights (construction also builds each expert's zero gradient once, one at a time, to record
// the shapes backward checks). forward() is const and thread-safe given one SoftWorkspace per
// thread.
#include <algorithm>
#include <type_traits>
#include <utility>
#include <vector>

#include "../core/error.hpp"
#include "../core/threads.hpp"
#include "../core/types.hpp"
#include "../core/workspace.hpp"
#include "../dispatch/soft_dispatch.hpp"
#include "../experts/expert_concept.hpp"
#include "../routing/context.hpp"
#include "../routing/soft.hpp"
#include "../simd/matmul.hpp"
#include "../simd/matmul_nn.hpp"
#include "../simd/rows.hpp"
#include "workspace.hpp"

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
  // Tokens of the forward_train whose state this holds; -1 when none. Every forward resets it, so
  // a plain forward on a SoftTrainingWorkspace cannot leave backward a stale pairing.
  index_t training_tokens = -1;
};

// A SoftWorkspace that also keeps, from SoftMoELayer::forward_train, what SoftMoELayer::backward
// needs. Memory: 3·S values per token (logits, D, C) and, per slot row (G·S of them),
// 2·d + 2·d_ff values for gated experts (d + d_ff + d for plain FFN experts): slot inputs, slot
// outputs and the expert pre-activations.
template <class T>
struct SoftTrainingWorkspace : SoftWorkspace<T> {
  Buffer<T> saved;  // expert pre-activations, in the expert-major slot order
  TrainingLayout layout;  // how forward_train laid these out (backward checks it against its layer)
  Buffer<T> backward_rows;     // backward's slot gradients, ∂L/∂D and ∂L/∂C, and one group's slots
  Buffer<T> backward_scratch;  // backward's expert scratch, one part per thread
  Buffer<T> router_scratch;    // the router's backward temporaries
};

template <class Expert>
class SoftMoELayer {
  static_assert(detail::check_expert<Expert>());  // (one message per member an expert type lacks)

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
    // The gradient shapes backward() checks, taken once here (one expert's zero gradient at a
    // time), so that backward does not build a second set of gradients to compare against.
    for (const Expert& expert : experts_) gradient_shapes_.push_back(detail::gradient_shapes(expert.zero_gradient()));
  }

  index_t d_model() const noexcept { return router_.d_model(); }
  index_t num_experts() const noexcept { return router_.num_experts(); }
  index_t slots_per_expert() const noexcept { return router_.slots_per_expert(); }
  const SoftRouter<T>& router() const noexcept { return router_; }
  // A training step on the router's scale (Φ and the experts are views the optimizer updates in
  // place). After backward, as for those: backward reads the scale forward_train ran with.
  void set_scale(double scale) { router_.set_scale(scale); }
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
    run(x, ctx, y, ws, nullptr, arch);
  }

  // Convenience: returns a new [T, d] output.
  template <class Arch = simd::default_arch>
  Matrix<T> forward(const ConstMatrixRef<T>& x, SoftWorkspace<T>& ws, Arch arch = {}) const {
    Matrix<T> y(x.rows(), d_model());
    forward(x, y, ws, arch);
    return y;
  }

  // --- training -------------------------------------------------------------------------------
  using ExpertGradient = typename Expert::Gradient;
  struct Gradients {
    Matrix<T> phi;                         // [d, S] ∂L/∂Φ
    T scale = T(0);                        // ∂L/∂scale (SoftOptions::scale multiplies the logits)
    std::vector<ExpertGradient> experts;   // one per expert
  };
  // Zero gradients of the right shapes for this layer.
  Gradients make_gradients() const {
    Gradients g;
    g.phi = Matrix<T>::Zero(d_model(), router_.num_slots());
    for (const Expert& e : experts_) g.experts.push_back(e.zero_gradient());
    return g;
  }

  // forward() that keeps what backward() needs in `ws`; y has the same bits as forward().
  template <class Arch = simd::default_arch>
  void forward_train(const ConstMatrixRef<T>& x, MatrixRef<T> y, SoftTrainingWorkspace<T>& ws, Arch arch = {}) const {
    forward_train(x, RouteContext{}, y, ws, arch);
  }
  // As above, with a RouteContext (its routing groups: Soft MoE reads neither token ids nor jitter).
  template <class Arch = simd::default_arch>
  void forward_train(const ConstMatrixRef<T>& x, const RouteContext& ctx, MatrixRef<T> y, SoftTrainingWorkspace<T>& ws,
                     Arch arch = {}) const {
    run(x, ctx, y, ws, &ws, arch);  // resets ws.training_tokens: invalid until it completes
    ws.layout = training_layout(ws.routing);
    ws.training_tokens = x.rows();
  }

  // Grows `ws` so that a forward of up to `max_tokens` tokens in up to `max_groups` routing groups
  // allocates nothing (MoELayer::reserve; here every size follows from the tokens and groups). The
  // SoftTrainingWorkspace form covers forward_train, backward and backward_accumulate too. It costs
  // a forward (or training step) of a zero batch of max_tokens tokens; afterwards `ws` holds an
  // empty batch's routing and no forward_train.
  template <class Arch = simd::default_arch>
  void reserve(SoftWorkspace<T>& ws, index_t max_tokens, index_t max_groups = 1, Arch arch = {}) const {
    detail::run_zero_batches("SoftMoELayer::reserve", *this, ws, static_cast<SoftTrainingWorkspace<T>*>(nullptr), max_tokens,
                             max_groups, arch);
    reserve_products<Arch>(max_tokens, max_groups);
  }
  template <class Arch = simd::default_arch>
  void reserve(SoftTrainingWorkspace<T>& ws, index_t max_tokens, index_t max_groups = 1, Arch arch = {}) const {
    detail::run_zero_batches("SoftMoELayer::reserve", *this, ws, &ws, max_tokens, max_groups, arch);
    reserve_products<Arch>(max_tokens, max_groups);
  }

  // Gradients of L given dy = ∂L/∂y [T, d], for the x of the last forward_train on `ws`:
  // writes dx = ∂L/∂x [T, d] and overwrites `grads` (shaped by make_gradients()).
  template <class Arch = simd::default_arch>
  void backward(const ConstMatrixRef<T>& x, const ConstMatrixRef<T>& dy, MatrixRef<T> dx, Gradients& grads,
                SoftTrainingWorkspace<T>& ws, Arch arch = {}) const {
    check_backward("SoftMoELayer::backward", x, dy, dx, grads, ws);
    grads.phi.setZero();
    grads.scale = T(0);
    if (x.rows() == 0) {
      for (auto& e : grads.experts) e.for_each([](auto& m) { m.setZero(); });
      return;
    }
    backward_checked(x, dy, dx, grads, ws, arch, false);
  }

  // backward() that adds this batch's gradients to `grads` instead of overwriting them: gradient
  // accumulation over micro-batches (zero `grads` where a step starts, for example with backward()
  // on its first micro-batch). dx is still overwritten. From zeroed `grads` it gives backward()'s bits.
  template <class Arch = simd::default_arch>
  void backward_accumulate(const ConstMatrixRef<T>& x, const ConstMatrixRef<T>& dy, MatrixRef<T> dx, Gradients& grads,
                           SoftTrainingWorkspace<T>& ws, Arch arch = {}) const {
    check_backward("SoftMoELayer::backward_accumulate", x, dy, dx, grads, ws);
    if (x.rows() > 0) backward_checked(x, dy, dx, grads, ws, arch, true);
  }

 private:
  // The products' per-thread buffers (simd::reserve_lane_buffers): a group's tokens or an expert's
  // slot rows (one per slot and group) on rows of d or an expert's d_ff.
  template <class Arch>
  void reserve_products(index_t max_tokens, index_t max_groups) const {
    index_t depth = d_model();
    for (const Expert& e : experts_) depth = std::max(depth, e.d_ff());
    const index_t rows = std::max(max_tokens, slots_per_expert() * max_groups);
    simd::reserve_lane_buffers<Arch, T>(static_cast<std::size_t>(rows), static_cast<std::size_t>(depth));
  }

  void check_backward(const char* where, const ConstMatrixRef<T>& x, const ConstMatrixRef<T>& dy, const MatrixRef<T>& dx,
                      const Gradients& grads, const SoftTrainingWorkspace<T>& ws) const {
    detail::check_backward_inputs(where, ws.training_tokens, d_model(), x, dy, dx);
    detail::check_training_layout(where, ws.layout, training_layout(ws.routing));
    router_.check_scale(where, ws.routing);
    check_gradients(where, grads);
  }

  // The layout forward_train leaves in a SoftTrainingWorkspace for this layer and `routing`.
  TrainingLayout training_layout(const SoftRouting<T>& routing) const {
    TrainingLayout l;
    l.route = routing.route_count();
    l.router = router_.config_fingerprint();
    l.tokens = routing.num_tokens();
    l.d_model = d_model();
    l.experts = num_experts();
    l.slots_per_expert = router_.slots_per_expert();
    l.rows = routing.slot_rows();
    l.saved = 0;
    if (routing.num_experts() != num_experts() || routing.slots_per_expert() != l.slots_per_expert) l.saved = -1;
    else for (const Expert& expert : experts_) l.saved += expert.saved_size(routing.rows_per_expert());
    l.shared_experts = 0;
    l.shared_saved = 0;
    l.pass_through = 0;
    return l;
  }

  // `accumulate`: add to `grads` (backward_accumulate) rather than overwrite them (backward).
  template <class Arch>
  void backward_checked(const ConstMatrixRef<T>& x, const ConstMatrixRef<T>& dy, MatrixRef<T> dx, Gradients& grads,
                        SoftTrainingWorkspace<T>& ws, Arch arch, bool accumulate) const {
    const index_t T_ = x.rows(), d = d_model();
    const SoftRouting<T>& routing = ws.routing;
    const index_t S = routing.num_slots(), s = routing.slots_per_expert(), rows = routing.slot_rows();
    const index_t m = routing.rows_per_expert();
    const T* slots = ws.slots.data();        // [G·S, d] expert inputs, in the slot-buffer order
    const T* slot_out = ws.slot_out.data();  // [G·S, d] expert outputs
    const T* D = routing.dispatch_weights().data();  // [T, S]
    const T* C = routing.combine_weights().data();   // [T, S]
    // In the workspace: ∂L/∂Ỹ and ∂L/∂X̃ [G·S, d] in the slot-buffer order, ∂L/∂D and ∂L/∂C [T, S],
    // and one group's slot rows and their gradient [S, d] in slot order.
    T* const d_slot_out = ws.backward_rows.ensure(2 * rows * d + 2 * T_ * S + 2 * S * d);
    T* const d_slots = d_slot_out + rows * d;
    T* const dD = d_slots + rows * d;
    T* const dC = dD + T_ * S;
    T* const group_rows = dC + T_ * S;
    T* const group_grad = group_rows + S * d;
    const auto ud = static_cast<std::size_t>(d), uS = static_cast<std::size_t>(S);
    const auto ldx = static_cast<std::size_t>(x.outerStride()), ldy = static_cast<std::size_t>(dy.outerStride());
    // Group g's slot rows, in slot order, between `buffer` (slot-buffer order) and `group` ([S, d]).
    auto slot_row = [&](index_t g, index_t j) { return routing.slot_row(j / s, g, j % s); };
    auto gather = [&](index_t g, const T* buffer, T* group) {
      for (index_t j = 0; j < S; ++j) simd::copy_row(arch, buffer + slot_row(g, j) * d, group + j * d, ud);
    };
    auto scatter = [&](index_t g, const T* group, T* buffer) {
      for (index_t j = 0; j < S; ++j) simd::copy_row(arch, group + j * d, buffer + slot_row(g, j) * d, ud);
    };

    // Combine y_g = C_g · Ỹ_g: dC_g = dy_g · Ỹ_gᵀ and dỸ_g = C_gᵀ · dy_g (0 for an empty group).
    // Every product is simd's, one chain of FMAs per element in a fixed order, so no bit depends
    // on the thread count or on the other groups.
    for (index_t g = 0; g < routing.num_groups(); ++g) {
      const index_t first = routing.group_begin(g), n = routing.group_size(g);
      const auto un = static_cast<std::size_t>(n);
      gather(g, slot_out, group_rows);
      const T* dy_g = dy.data() + first * dy.outerStride();
      simd::matmul_nt_strided(arch, dy_g, ldy, un, ud, group_rows, uS, dC + first * S, uS);
      simd::matmul_tn_strided(arch, C + first * S, uS, un, uS, dy_g, ldy, ud, group_grad, ud, false);
      scatter(g, group_grad, d_slot_out);
    }
    // The experts, each on its s·G contiguous rows; whole experts to the threads (as in MoELayer),
    // each on its thread's part of the workspace's scratch.
    index_t scratch_needed = 0;
    for (const Expert& expert : experts_) scratch_needed = std::max(scratch_needed, detail::backward_scratch_size(expert, m));
    const PerThreadScratch<T> scratch(ws.backward_scratch, scratch_needed);
    detail::for_each_with_serial_eigen(num_experts(), [&](std::ptrdiff_t i) {
      const auto e = static_cast<std::size_t>(i);
      const index_t first = routing.expert_first_row(index_t(i));
      const T* saved = ws.saved.data();  // expert e's part: after those of the experts before it
      for (std::size_t before = 0; before < e; ++before) saved += experts_[before].saved_size(m);
      detail::expert_backward(experts_[e], slots + first * d, m, d_slot_out + first * d, saved, d_slots + first * d,
                              grads.experts[e], arch, scratch.own(), accumulate);
    });
    // Dispatch X̃_g = D_gᵀ · x_g: dD_g = x_g · dX̃_gᵀ and dx_g = D_g · dX̃_g (the groups cover every
    // token once, so dx is written whole).
    for (index_t g = 0; g < routing.num_groups(); ++g) {
      const index_t first = routing.group_begin(g), n = routing.group_size(g);
      if (n == 0) continue;
      const auto un = static_cast<std::size_t>(n);
      gather(g, d_slots, group_grad);
      simd::matmul_nt_strided(arch, x.data() + first * x.outerStride(), ldx, un, ud, group_grad, uS, dD + first * S, uS);
      simd::matmul_nn_strided(arch, D + first * S, uS, un, uS, group_grad, ud, ud, dx.data() + first * dx.outerStride(),
                              static_cast<std::size_t>(dx.outerStride()), false);
    }
    grads.scale += router_.backward(x, routing, dD, dC, dx, grads.phi, arch, &ws.router_scratch);
  }

  template <class Arch>
  void run(const ConstMatrixRef<T>& x, const RouteContext& ctx, MatrixRef<T> y, SoftWorkspace<T>& ws,
           SoftTrainingWorkspace<T>* train, Arch arch) const {
    const index_t d = d_model();
    detail::check_dim("SoftMoELayer::forward", "x.cols()", x.cols(), "d_model", d);
    detail::check_dim("SoftMoELayer::forward", "y.rows()", y.rows(), "x.rows()", x.rows());
    detail::check_dim("SoftMoELayer::forward", "y.cols()", y.cols(), "d_model", d);
    detail::check_rows("SoftMoELayer::forward", "x", x, false);
    detail::check_rows("SoftMoELayer::forward", "y", y, true);
    ws.training_tokens = -1;

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
    T* saved = nullptr;
    if (train != nullptr) {
      index_t saved_needed = 0;
      for (const Expert& expert : experts_) saved_needed += expert.saved_size(m);
      saved = train->saved.ensure(saved_needed);
    }
    for (index_t e = 0; e < num_experts(); ++e) {
      const index_t first = routing.expert_first_row(e);
      const Expert& expert = experts_[static_cast<std::size_t>(e)];
      if (train != nullptr) {
        expert.forward_saving(arch, slots + first * d, m, slot_out + first * d, saved, scratch);
        saved += expert.saved_size(m);
      } else {
        expert.forward(arch, slots + first * d, m, slot_out + first * d, scratch);
      }
    }

    combine(arch, routing, slot_out, d, y.data(), y.outerStride(), ws.mix);
  }

  void check_gradients(const char* where, const Gradients& g) const {
    detail::check_dim(where, "grads.phi.rows()", g.phi.rows(), "d_model", d_model());
    detail::check_dim(where, "grads.phi.cols()", g.phi.cols(), "num_slots", router_.num_slots());
    detail::check_dim(where, "grads.experts.size()", g.experts.size(), "experts", experts_.size());
    for (std::size_t e = 0; e < experts_.size(); ++e) detail::check_gradient_shapes(where, "grads.experts", e, g.experts[e], gradient_shapes_[e]);
  }

  SoftRouter<T> router_;
  std::vector<Expert> experts_;
  std::vector<std::vector<index_t>> gradient_shapes_;  // per expert, the (rows, cols) of each matrix of its gradient
};

MOE_NAMESPACE_END
