// A DeepSeek-V3-style MoE block, scaled down: a sigmoid router over 64 routed experts in 8 groups
// (the best 4 groups kept, then the top 6 experts, their weights renormalized and scaled by 2.5),
// one always-on shared expert, and auxiliary-loss-free load balancing: moe::BiasBalancer learns the
// selection bias that V3's checkpoints ship as e_score_correction_bias.
//
// The router is skewed on purpose: experts 0–7 score higher on every token, so at first they take
// most of the load. Each step routes a new batch and nudges the bias against the load it saw; the
// printed imbalance (max load ÷ mean load, 1 = even) falls. The program checks its own results, so
// it doubles as a test: the balancing must spread the load, and one token's output must equal its
// experts' and the shared expert's outputs recomputed by hand.
// Build: link moe::moe (or moe::openmp), see examples/CMakeLists.txt.
#include <moe/moe.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <vector>

int main() {
  const moe::index_t d = 256, d_ff = 128, num_experts = 64, tokens = 256, steps = 60;
  const moe::index_t k = 6, n_group = 8, topk_group = 4, popular = 8;
  const double routed_scaling_factor = 2.5, update_rate = 0.01;  // V3 trains with 0.001 over far more steps

  // Deterministic uniform numbers in [-1, 1) from a 64-bit LCG (same values on every platform).
  std::uint64_t state = 7;
  auto uniform = [&state] {
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    return static_cast<float>(state >> 40) / 8388608.0f - 1.0f;  // 24 random bits
  };
  // An nn.Linear weight [out, in] with PyTorch's default init, U(-1/sqrt(in), 1/sqrt(in)).
  auto linear = [&uniform](moe::index_t out, moe::index_t in) {
    moe::Matrix<float> w(out, in);
    const float bound = 1.0f / std::sqrt(static_cast<float>(in));
    for (moe::index_t i = 0; i < w.size(); ++i) w.data()[i] = bound * uniform();
    return w;
  };

  // Router gate [E, d]; the popular experts' rows lean towards the inputs' mean (below).
  moe::Matrix<float> gate = linear(num_experts, d);
  gate.topRows(popular).array() += 0.02f;
  moe::TopKRouter<float> router(gate, moe::presets::deepseek_v3(k, n_group, topk_group, routed_scaling_factor));

  // Routed experts and the shared one (V3's shared expert is n_shared · d_ff wide); SwiGLU, owning
  // their weights here. To view a checkpoint's buffers instead, pass moe::ConstMatrixMap views.
  std::vector<moe::SwiGLU<float>> experts;
  for (moe::index_t e = 0; e < num_experts; ++e) experts.emplace_back(linear(d_ff, d), linear(d_ff, d), linear(d, d_ff));
  moe::MoELayer layer(router, experts);
  layer.set_shared_experts({moe::SwiGLU<float>(linear(2 * d_ff, d), linear(2 * d_ff, d), linear(d, 2 * d_ff))});

  moe::BiasBalancer<float> balancer(num_experts, update_rate);
  moe::Matrix<float> x(tokens, d), y(tokens, d);
  moe::Workspace<float> workspace;
  double first_imbalance = 0, last_imbalance = 0;
  std::printf("DeepSeek-V3-style block: d = %td, %td routed experts (d_ff = %td) in %td groups, top-%td of the best %td "
              "groups, 1 shared expert, %td tokens per step\n",
              d, num_experts, d_ff, n_group, k, topk_group, tokens);
  for (moe::index_t step = 0; step < steps; ++step) {
    for (moe::index_t i = 0; i < x.size(); ++i) x.data()[i] = uniform() + 0.3f;  // hidden states with a common direction
    layer.forward(x, y, workspace);
    const moe::Routing<float>& plan = workspace.routing.plan;
    const moe::RoutingStats stats = moe::routing_stats(plan);
    if (step == 0) first_imbalance = stats.imbalance;
    last_imbalance = stats.imbalance;
    if (step % 10 == 0 || step == steps - 1) {
      moe::index_t popular_load = 0;
      for (moe::index_t e = 0; e < popular; ++e) popular_load += plan.tokens_of(e);
      std::printf("step %2td: imbalance %5.2f, experts 0-%td take %4.1f%% of the assignments\n", step, stats.imbalance,
                  popular - 1, 100.0 * static_cast<double>(popular_load) / static_cast<double>(stats.assignments));
    }
    // Loss-free balancing: the bias moves against this step's load and enters selection only.
    balancer.update(plan);
    balancer.apply(layer);
  }
  std::printf("selection bias: expert 0 %+.2f, expert %td %+.2f\n", static_cast<double>(balancer.bias()[0]), num_experts - 1,
              static_cast<double>(balancer.bias()[num_experts - 1]));

  // Self-check 1: the balancer spread the load.
  if (!(last_imbalance < 0.5 * first_imbalance)) {
    std::printf("FAILED: imbalance %.2f -> %.2f\n", first_imbalance, last_imbalance);
    return 1;
  }
  // Self-check 2: token 0's output is Σ weight · expert(x0) over its chosen experts, plus the shared
  // expert's output, each expert run on that token alone.
  const moe::Routing<float>& plan = workspace.routing.plan;
  std::vector<float> out(static_cast<std::size_t>(d)), scratch(static_cast<std::size_t>(2 * d_ff));
  std::vector<double> expected(static_cast<std::size_t>(d), 0.0);
  auto add = [&](const moe::SwiGLU<float>& expert, double weight) {
    expert.forward(moe::simd::default_arch{}, x.data(), 1, out.data(), scratch.data());
    for (std::size_t i = 0; i < out.size(); ++i) expected[i] += weight * static_cast<double>(out[i]);
  };
  for (moe::index_t j = plan.token_begin[0]; j < plan.token_begin[1]; ++j) {
    const moe::index_t a = plan.assignment[j];
    add(layer.experts()[static_cast<std::size_t>(plan.expert_of_assignment(a))], static_cast<double>(plan.weight[a]));
  }
  add(layer.shared_experts()[0], 1.0);
  double worst = 0, scale = 0;
  for (moe::index_t i = 0; i < d; ++i) {
    worst = std::max(worst, std::fabs(static_cast<double>(y(0, i)) - expected[static_cast<std::size_t>(i)]));
    scale = std::max(scale, std::fabs(expected[static_cast<std::size_t>(i)]));
  }
  std::printf("token 0: %td experts, largest difference from the hand-made sum %.1e (of values up to %.2f)\n",
              plan.experts_of(0), worst, scale);
  return plan.experts_of(0) == k && worst <= 1e-5 * std::max(scale, 1.0) ? 0 : 1;
}
