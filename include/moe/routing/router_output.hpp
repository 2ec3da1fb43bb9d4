#pragma once
// What a sparse router produces for a batch: the logits and scores that losses and backward need,
// and the Routing plan the hot path executes. Reused across batches: once it has seen the largest
// batch, routing into it allocates nothing.
#include <cstdint>

#include "../core/error.hpp"
#include "../core/fingerprint.hpp"
#include "../core/types.hpp"
#include "../core/workspace.hpp"
#include "routing.hpp"

MOE_NAMESPACE_BEGIN

template <class T>
class RouterOutput {
 public:
  Routing<T> plan;

  index_t num_tokens() const noexcept { return num_tokens_; }
  index_t num_experts() const noexcept { return num_experts_; }
  // [T, E] router logits x · Wᵀ (without any selection bias).
  ConstMatrixMap<T> logits() const noexcept { return ConstMatrixMap<T>(logits_.data(), num_tokens_, num_experts_); }
  // [T, E] scores: softmax over experts or sigmoid of the logits, as the router is configured.
  ConstMatrixMap<T> scores() const noexcept { return ConstMatrixMap<T>(scores_.data(), num_tokens_, num_experts_); }

  // [T, k] the experts each token chose before capacity, best first (one row per token), from the
  // last route of a TopKRouter with a fixed k. These are the ids the load-balancing losses count
  // (balance/losses.hpp: c_i is taken before capacity drops): once capacity has dropped or
  // rerouted choices the plan no longer holds them, this view still does. A view of router
  // scratch, valid until the next route into this output. With a selection bias or group-limited
  // selection these are the biased, group-limited choices; Megatron-Core and DeepSeek-V3's
  // sequence-wise loss count a plain top-k of the unbiased scores instead. Throws
  // moe::invalid_argument when the last route recorded none: dynamic top-p (a varying number of
  // choices per token), ExpertChoiceRouter and HashRouter (never dropped: count their plan), or
  // no route yet.
  using ConstIndexMap = Eigen::Map<const Matrix<index_t>, 0, Eigen::OuterStride<>>;
  ConstIndexMap top_k_ids() const {
    if (top_k_ < 1) {
      detail::throw_invalid("RouterOutput::top_k_ids: the last route recorded no fixed top-k choices (k = ", top_k_,
                            "); only TopKRouter without top_p records them, and a route that threw records none");
    }
    return ConstIndexMap(candidate_expert.data(), num_tokens_, top_k_, Eigen::OuterStride<>(top_k_stride_));
  }
  // For TopKRouter: the first k of every `stride` entries of candidate_expert are a token's choices.
  void set_top_k_ids(index_t k, index_t stride) noexcept {
    top_k_ = k;
    top_k_stride_ = stride;
  }

  // How many routes have begun into this output: a layer's backward tells the routing its
  // forward_train left from a later one of the same shape by it.
  std::uint64_t route_count() const noexcept { return route_count_; }

  // The fingerprint of the router that last routed into this output (its config_fingerprint()).
  std::uint64_t router_config() const noexcept { return router_config_; }

  // For routers: sizes the [T, E] buffers, stamped with the router's config_fingerprint().
  // The plan becomes the empty plan (Routing::clear) until the router builds this batch's.
  void reshape(index_t tokens, index_t experts, std::uint64_t router_config) {
    ++route_count_;
    router_config_ = router_config;
    plan.clear(experts);
    num_tokens_ = tokens;
    num_experts_ = experts;
    top_k_ = 0;
    top_k_stride_ = 1;
    logits_.ensure(tokens * experts);
    scores_.ensure(tokens * experts);
  }
  MatrixMap<T> mutable_logits() noexcept { return MatrixMap<T>(logits_.data(), num_tokens_, num_experts_); }
  MatrixMap<T> mutable_scores() noexcept { return MatrixMap<T>(scores_.data(), num_tokens_, num_experts_); }

  // Router scratch: token-major choices before the plan is built, and per-row selection buffers.
  Buffer<index_t> choice_begin;        // [T + 1]
  Buffer<index_t> choice_expert;       // [T · k]
  Buffer<T> choice_weight;             // [T · k]
  Buffer<index_t> candidate_expert;    // [T, R] ranked candidates per token
  Buffer<T> candidate_raw;             // [T, R] their raw weights
  Buffer<index_t> candidate_chosen;    // [T] leading candidates chosen
  Buffer<index_t> candidate_ranked;    // [T] candidates eligible for rerouting
  Buffer<std::uint8_t> candidate_kept; // [T, R] survived capacity
  Buffer<index_t> candidate_order;     // [T · R] priority order scratch
  Buffer<index_t> expert_load;         // [E]
  // Per-row selection scratch, one set for each thread's run of tokens (TopKRouter), each on
  // cache lines of its own.
  Buffer<T> group_scores;              // [expert groups]
  Buffer<index_t> group_rank;          // [expert groups]
  Buffer<T> input_scratch;             // [T, d] jittered router input
  Buffer<T> input_noise;               // [T, d] its jitter factors
  bool input_jittered = false;         // the last route used input_scratch
  Buffer<T> row_values;                // [E] selection values of one row (per run, as above)
  Buffer<T> row_scratch;               // [E]
  Buffer<index_t> row_indices;         // [E]

 private:
  index_t num_tokens_ = 0;
  index_t num_experts_ = 0;
  index_t top_k_ = 0;         // choices per token recorded by the last route, 0 when none
  index_t top_k_stride_ = 1;  // their row stride in candidate_expert
  std::uint64_t route_count_ = 0;
  std::uint64_t router_config_ = 0;
  Buffer<T> logits_;
  Buffer<T> scores_;
};

MOE_NAMESPACE_END
