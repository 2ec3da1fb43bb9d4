#pragma once
// Router presets: TopKOptions that reproduce a reference implementation's routing, quirks
// included, so a ported checkpoint routes exactly as it did. Each names its reference.
#include "../core/types.hpp"
#include "top_k.hpp"

MOE_NAMESPACE_BEGIN
namespace presets {

// Mixtral (Hugging Face MixtralSparseMoeBlock): softmax over E, top-k (2), renormalized.
inline TopKOptions mixtral(index_t k = 2) {
  TopKOptions o;
  o.k = k;
  o.normalize = true;
  return o;
}

// Qwen2-MoE (Hugging Face Qwen2MoeSparseMoeBlock): softmax over E, top-k, renormalized only when
// `norm_topk_prob` (the Qwen1.5-MoE checkpoints ship with false). Its shared expert is gated by
// sigmoid(x · shared_expert_gateᵀ): give that gate to MoELayer::set_shared_experts.
inline TopKOptions qwen2_moe(index_t k, bool norm_topk_prob) {
  TopKOptions o;
  o.k = k;
  o.normalize = norm_topk_prob;
  return o;
}

// DeepSeek-V3 (deepseek-ai inference model.py Gate; Hugging Face DeepseekV3TopkRouter): sigmoid
// scores; selection on score + e_score_correction_bias (set it with set_selection_bias); E in
// n_group groups, group score = sum of its top-2 biased scores, the best topk_group groups kept
// and the others excluded (the reference masks them with -inf; Hugging Face's port masks with 0,
// which differs only when every kept biased score is negative — GroupMask::zero reproduces it);
// weights = unbiased scores of the chosen experts, renormalized (+1e-20), × routed_scaling_factor.
// V3 itself: k = 8, n_group = 8, topk_group = 4, routed_scaling_factor = 2.5, 256 experts.
inline TopKOptions deepseek_v3(index_t k = 8, index_t n_group = 8, index_t topk_group = 4,
                               double routed_scaling_factor = 2.5) {
  TopKOptions o;
  o.k = k;
  o.score = ScoreFunction::sigmoid;
  o.expert_groups = n_group;
  o.selected_groups = topk_group;
  o.group_score_top = 2;
  o.group_mask = GroupMask::exclude;
  o.normalize = true;
  o.scale = routed_scaling_factor;
  return o;
}

// Switch Transformers (Fedus et al. 2021; Hugging Face SwitchTransformersTop1Router): top-1 of the
// softmax, weight = the raw probability (no renormalization), capacity per sequence with earlier
// positions winning (route with one routing group per sequence). Dropped tokens leave the layer as
// probability · x: set MoELayer::set_dropped_tokens(DroppedTokens::pass_through). Capacity here
// is ceil(cf · tokens / E) as in the paper; Hugging Face takes a fixed `expert_capacity` instead,
// which is `fixed_capacity`. Training jitter: `jitter` (router_jitter_noise).
inline TopKOptions switch_transformers(double capacity_factor = 1.0) {
  TopKOptions o;
  o.k = 1;
  o.capacity_factor = capacity_factor;
  o.capacity_priority = CapacityPriority::position;
  o.overflow = OverflowPolicy::drop;
  return o;
}

// Megatron-Core (topk_softmax_with_capacity): with moe_router_pre_softmax the softmax runs over
// all E before top-k, otherwise over the k chosen logits; capacity ceil(cf · T · k / E) when
// capacity_factor > 0, dropping by probability (drop_policy "probs") or by position
// ("position"); no renormalization after dropping.
inline TopKOptions megatron(index_t k, bool pre_softmax, double capacity_factor = 0.0,
                            CapacityPriority drop_policy = CapacityPriority::score) {
  TopKOptions o;
  o.k = k;
  o.softmax_placement = pre_softmax ? SoftmaxPlacement::before_top_k : SoftmaxPlacement::after_top_k;
  o.capacity_factor = capacity_factor;
  o.capacity_priority = drop_policy;
  return o;
}

}  // namespace presets
MOE_NAMESPACE_END
