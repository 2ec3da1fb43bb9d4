// Quick start: a top-2 SwiGLU MoE layer over weights that live in your own buffers.
// Build: link moe::moe (CMake) or add include/ plus Eigen and xsimd to the include path.
#include <moe/moe.hpp>

#include <cmath>
#include <cstdio>
#include <vector>

int main() {
  const moe::index_t d = 64, d_ff = 128, num_experts = 4, tokens = 5;

  // Your model's weights, PyTorch nn.Linear layout [out, in], row-major. Filled here with a
  // deterministic pattern; in a real model they come from your checkpoint loader.
  auto fill = [](std::vector<float>& w, float phase) {
    for (std::size_t i = 0; i < w.size(); ++i) w[i] = 0.05f * std::sin(0.37f * static_cast<float>(i) + phase);
  };
  std::vector<float> gate(num_experts * d);
  fill(gate, 0.1f);
  const auto matrix_size = static_cast<std::size_t>(d_ff * d);
  std::vector<std::vector<float>> w_gate, w_up, w_down;
  for (moe::index_t e = 0; e < num_experts; ++e) {
    const float phase = static_cast<float>(e);
    w_gate.emplace_back(matrix_size), w_up.emplace_back(matrix_size), w_down.emplace_back(matrix_size);
    fill(w_gate.back(), 1.0f + phase), fill(w_up.back(), 2.0f + phase), fill(w_down.back(), 3.0f + phase);
  }

  // Router: softmax over experts, top-2, weights renormalized (Mixtral). Views `gate`, no copy.
  moe::TopKOptions options;
  options.k = 2;
  options.normalize = true;
  moe::TopKRouter<float> router(moe::ConstMatrixMap<float>(gate.data(), num_experts, d), options);

  // Experts: SwiGLU views on w_gate [d_ff, d], w_up [d_ff, d], w_down [d, d_ff].
  std::vector<moe::SwiGLU<float>> experts;
  for (std::size_t e = 0; e < w_gate.size(); ++e) {
    experts.emplace_back(moe::ConstMatrixMap<float>(w_gate[e].data(), d_ff, d),
                         moe::ConstMatrixMap<float>(w_up[e].data(), d_ff, d),
                         moe::ConstMatrixMap<float>(w_down[e].data(), d, d_ff));
  }
  moe::MoELayer layer(router, experts);

  // Activations [tokens, d], row-major. The workspace is reused across calls: once its buffers
  // have grown to a batch's sizes (rows, and the busiest expert's tokens), forward() allocates nothing.
  moe::Matrix<float> x(tokens, d), y(tokens, d);
  for (moe::index_t t = 0; t < tokens; ++t)
    for (moe::index_t i = 0; i < d; ++i) x(t, i) = std::cos(0.1f * static_cast<float>(t * d + i));
  moe::Workspace<float> workspace;
  layer.forward(x, y, workspace);

  // Which experts each token went to, and with what weight.
  const moe::Routing<float>& plan = workspace.routing.plan;
  for (moe::index_t t = 0; t < tokens; ++t) {
    std::printf("token %td ->", t);
    for (moe::index_t j = plan.token_begin[t]; j < plan.token_begin[t + 1]; ++j) {
      const moe::index_t a = plan.assignment[j];
      std::printf("  expert %td (weight %.3f)", plan.expert_of_assignment(a), static_cast<double>(plan.weight[a]));
    }
    std::printf("   y[0] = %+.5f\n", static_cast<double>(y(t, 0)));
  }

  // Self-check, so this file doubles as a test: each token's two weights sum to 1.
  for (moe::index_t t = 0; t < tokens; ++t) {
    float sum = 0;
    for (moe::index_t j = plan.token_begin[t]; j < plan.token_begin[t + 1]; ++j) sum += plan.weight[plan.assignment[j]];
    if (plan.experts_of(t) != 2 || std::fabs(sum - 1.0f) > 1e-6f) return 1;
  }
  return 0;
}
