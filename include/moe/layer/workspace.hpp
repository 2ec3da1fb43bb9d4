#pragma once
// Per-caller reusable memory for MoELayer::forward. Each buffer grows to the largest size seen
// (the batch's rows, and the scratch for the busiest expert's tokens) and is then reused, so a
// warm forward performs no heap allocation; a batch whose busiest expert takes more tokens than
// any before grows the scratch once; MoELayer::reserve sizes it up front for every batch up to a
// size instead. One workspace per thread: a layer is const and may be shared, a workspace may
// not. One thread's workspace may serve several layers in turn.
//
// (It lives in layer/ rather than core/ because it holds a RouterOutput, and core/ sits above
// routing/ in the dependency order.)
#include <cstdint>
#include <vector>

#include "../core/error.hpp"
#include "../core/types.hpp"
#include "../core/workspace.hpp"
#include "../routing/context.hpp"
#include "../routing/router_output.hpp"

MOE_NAMESPACE_BEGIN

template <class T>
struct Workspace {
  RouterOutput<T> routing;  // logits, scores and plan of the last forward
  Buffer<T> dispatched;     // [A, d] expert-grouped token rows
  Buffer<T> expert_out;     // [A, d] expert outputs in the same order
  Buffer<T> scratch;        // expert hidden activations
  Buffer<T> extra;          // [T, d] shared-expert and pass-through contributions
  Buffer<T> shared_in;      // [T, d] contiguous copy of the input for the shared experts
  Buffer<T> shared_out;     // [T, d] one shared expert's output
  Buffer<T> shared_gate;    // [T] sigmoid gate of the shared experts
  Buffer<index_t> expert_schedule;  // the experts' order and places (run_experts; then experts_backward)
  // Tokens of the forward_train whose state this holds; -1 when none. Every forward resets it, so
  // a plain forward on a TrainingWorkspace cannot leave backward a stale pairing.
  index_t training_tokens = -1;
};

// A Workspace that also keeps, from MoELayer::forward_train, what MoELayer::backward needs.
// Memory per token, for k routed experts of hidden size d_ff (gated) and S shared experts:
// k · (2·d_ff + 2·d) + 2·E values, plus S · (2·d_ff + d) with shared experts (on top of the
// Workspace's own shared-expert rows: README, "Training", has the whole count).
template <class T>
struct TrainingWorkspace : Workspace<T> {
  Buffer<T> saved;           // expert pre-activations, expert-grouped
  Buffer<T> shared_saved;    // [S] × shared-expert pre-activations for all tokens
  Buffer<T> shared_outputs;  // [S, T, d] shared-expert outputs (for the gate's gradient)
  TrainingLayout layout;     // how forward_train laid these out (backward checks it against its layer)
  Buffer<T> backward_rows;     // backward's gradients of the expert inputs and outputs and routing weights
  Buffer<T> backward_scratch;  // backward's expert scratch, one part per thread
  Buffer<T> router_scratch;    // the router's backward temporaries
};

namespace detail {

// The layers' reserve, first part: a zero batch of max_tokens tokens through `layer`, as one
// routing group (the largest group) and in max_groups groups (the most groups), with token ids and
// the training flag (a router's jitter buffers); with `train`, forward_train and backward on it.
// That sizes every buffer that depends on the batch's size and group count alone. It ends with an
// empty batch's forward, so `ws` holds no forward_train that a backward could pair with.
template <class Layer, class WS, class TrainWS, class Arch>
void run_zero_batches(const char* where, const Layer& layer, WS& ws, TrainWS* train, index_t max_tokens, index_t max_groups,
                      Arch arch) {
  if (max_tokens < 0) throw_invalid(where, ": max_tokens must be >= 0 (max_tokens = ", max_tokens, ")");
  if (max_groups < 1) throw_invalid(where, ": max_groups must be at least 1 (max_groups = ", max_groups, ")");
  using T = typename Layer::Scalar;
  const index_t d = layer.d_model();
  const Matrix<T> zeros = Matrix<T>::Zero(max_tokens, d);
  Matrix<T> y(max_tokens, d);
  const std::vector<std::int64_t> ids(static_cast<std::size_t>(max_tokens), 0);
  std::vector<index_t> bounds(static_cast<std::size_t>(max_groups) + 1);
  for (index_t g = 0; g <= max_groups; ++g) bounds[static_cast<std::size_t>(g)] = max_tokens * g / max_groups;
  auto for_each_context = [&](auto&& run) {
    for (const bool grouped : {false, true}) {
      if (grouped && max_groups == 1) break;
      RouteContext ctx = grouped ? RouteContext::with_groups(bounds) : RouteContext{};
      ctx.token_ids = ids.data();
      ctx.training = true;
      run(ctx);
    }
  };
  if (train != nullptr) {
    Matrix<T> dx(max_tokens, d);
    auto grads = layer.make_gradients();
    for_each_context([&](const RouteContext& ctx) {
      layer.forward_train(zeros, ctx, y, *train, arch);
      layer.backward(zeros, zeros, dx, grads, *train);
    });
  } else {
    for_each_context([&](const RouteContext& ctx) { layer.forward(zeros, ctx, y, ws, arch); });
  }
  layer.forward(zeros.topRows(0), y.topRows(0), ws, arch);
}

}  // namespace detail

MOE_NAMESPACE_END
