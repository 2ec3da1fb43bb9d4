#pragma once
// Per-caller reusable memory for MoELayer::forward. Each buffer grows to the largest size seen
// (the batch's rows, and the scratch for the busiest expert's tokens) and is then reused, so a
// warm forward performs no heap allocation; a batch whose busiest expert takes more tokens than
// any before grows the scratch once. One workspace per thread: a layer is const and may be
// shared, a workspace may not. One thread's workspace may serve several layers in turn.
//
// (It lives in layer/ rather than core/ because it holds a RouterOutput, and core/ sits above
// routing/ in the dependency order.)
#include "../core/types.hpp"
#include "../core/workspace.hpp"
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

MOE_NAMESPACE_END
