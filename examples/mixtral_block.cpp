// A Mixtral-style MoE block (d = 1024, d_ff = 3584, 8 experts, top-2) on a batch of 256 tokens.
//
// The weights sit in std::vector buffers in PyTorch layout, as a checkpoint loader would leave
// them, and moe maps them without copying. Their allocator puts them on 2 MiB pages (Linux's
// transparent huge pages: fewer TLB misses while the weights stream from memory); any buffer
// works, and moe::advise_huge_pages does the same for memory allocated elsewhere:
//   router gate.weight                 [E, d]
//   expert e: w1 (gate_proj)           [d_ff, d]
//             w3 (up_proj)             [d_ff, d]
//             w2 (down_proj)           [d, d_ff]
// It times a few warm forwards, then checks four tokens against the same math in double loops.
// Build: link moe::openmp (or moe::moe for one thread), see examples/CMakeLists.txt.
#include <moe/moe.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <vector>

int main() {
  const moe::index_t d = 1024, d_ff = 3584, num_experts = 8, tokens = 256;

  // Deterministic uniform numbers in [-1, 1) from a 64-bit LCG (same values on every platform).
  std::uint64_t state = 42;
  auto uniform = [&state] {
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    return static_cast<float>(state >> 40) / 8388608.0f - 1.0f;  // 24 random bits
  };
  // An nn.Linear weight [out, in] with PyTorch's default init, U(-1/sqrt(in), 1/sqrt(in)).
  using Buffer = std::vector<float, moe::HugePageAllocator<float>>;
  auto linear = [&uniform](moe::index_t out, moe::index_t in) {
    Buffer w(static_cast<std::size_t>(out * in));
    const float bound = 1.0f / std::sqrt(static_cast<float>(in));
    for (float& v : w) v = bound * uniform();
    return w;
  };

  Buffer gate = linear(num_experts, d);
  std::vector<Buffer> w1, w3, w2;
  for (moe::index_t e = 0; e < num_experts; ++e) {
    w1.push_back(linear(d_ff, d));
    w3.push_back(linear(d_ff, d));
    w2.push_back(linear(d, d_ff));
  }

  // Router: softmax over the 8 experts, top-2, the two weights renormalized to sum to 1.
  moe::TopKOptions options;
  options.k = 2;
  options.score = moe::ScoreFunction::softmax;
  options.normalize = true;
  moe::TopKRouter<float> router(moe::ConstMatrixMap<float>(gate.data(), num_experts, d), options);

  // Experts: SwiGLU views on w1, w3, w2 (no copy; the vectors must outlive the layer).
  std::vector<moe::SwiGLU<float>> experts;
  for (moe::index_t e = 0; e < num_experts; ++e) {
    const auto i = static_cast<std::size_t>(e);
    experts.emplace_back(moe::ConstMatrixMap<float>(w1[i].data(), d_ff, d), moe::ConstMatrixMap<float>(w3[i].data(), d_ff, d),
                         moe::ConstMatrixMap<float>(w2[i].data(), d, d_ff));
  }
  moe::MoELayer layer(router, experts);

  // Hidden states [tokens, d] and the output [tokens, d].
  moe::Matrix<float> x(tokens, d), y(tokens, d);
  for (moe::index_t t = 0; t < tokens; ++t)
    for (moe::index_t i = 0; i < d; ++i) x(t, i) = uniform();

  // Size the workspace for the largest batch up front, as an engine that must not allocate once
  // started would: no forward of up to `tokens` tokens allocates after this, however it routes.
  // Time a few runs.
  moe::Workspace<float> workspace;
  layer.reserve(workspace, tokens);
  std::vector<double> seconds;
  for (int run = 0; run < 5; ++run) {
    const auto start = std::chrono::steady_clock::now();
    layer.forward(x, y, workspace);
    seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(seconds.begin(), seconds.end());
  const double median = seconds[seconds.size() / 2];

  std::printf("Mixtral-style block: d = %td, d_ff = %td, %td experts, top-2, %td tokens, %d thread(s)\n", d, d_ff,
              num_experts, tokens, moe::max_threads());
  const moe::Routing<float>& plan = workspace.routing.plan;
  std::printf("tokens per expert:");
  for (moe::index_t e = 0; e < num_experts; ++e) std::printf(" %td", plan.tokens_of(e));
  std::printf("  (%td assignments)\n", plan.num_assignments());
  std::printf("forward: %.1f us/token (median of %zu warm runs, %.2f ms per batch)\n", 1e6 * median / static_cast<double>(tokens),
              seconds.size(), 1e3 * median);
  std::printf("y[0, 0:4] = %+.6f %+.6f %+.6f %+.6f\n", static_cast<double>(y(0, 0)), static_cast<double>(y(0, 1)),
              static_cast<double>(y(0, 2)), static_cast<double>(y(0, 3)));

  // What the layer computes, written out in double for a few tokens: the router's logits, its two
  // largest (softmax then renormalizing the top two is a softmax over those two logits), and
  // y = Σ weight · w2 · (silu(w1 · x) ⊙ (w3 · x)) over the two experts.
  double worst = 0, largest = 0;
  for (const moe::index_t t : {moe::index_t(0), tokens / 3, 2 * tokens / 3, tokens - 1}) {
    std::vector<double> logit(static_cast<std::size_t>(num_experts), 0.0), out(static_cast<std::size_t>(d), 0.0),
        hidden(static_cast<std::size_t>(d_ff));
    for (moe::index_t e = 0; e < num_experts; ++e)
      for (moe::index_t i = 0; i < d; ++i) logit[std::size_t(e)] += double(gate[std::size_t(e * d + i)]) * double(x(t, i));
    std::size_t order[2] = {0, 1};  // the two largest logits, largest first
    if (logit[1] > logit[0]) order[0] = 1, order[1] = 0;
    for (std::size_t e = 2; e < logit.size(); ++e) {
      if (logit[e] > logit[order[0]]) order[1] = order[0], order[0] = e;
      else if (logit[e] > logit[order[1]]) order[1] = e;
    }
    const double first_weight = 1.0 / (1.0 + std::exp(logit[order[1]] - logit[order[0]]));
    for (int rank = 0; rank < 2; ++rank) {
      const std::size_t e = order[std::size_t(rank)];
      const double weight = rank == 0 ? first_weight : 1.0 - first_weight;
      for (moe::index_t j = 0; j < d_ff; ++j) {
        double g = 0, u = 0;
        for (moe::index_t i = 0; i < d; ++i) {
          g += double(w1[e][std::size_t(j * d + i)]) * double(x(t, i));
          u += double(w3[e][std::size_t(j * d + i)]) * double(x(t, i));
        }
        hidden[std::size_t(j)] = g / (1.0 + std::exp(-g)) * u;
      }
      for (moe::index_t i = 0; i < d; ++i) {
        double sum = 0;
        for (moe::index_t j = 0; j < d_ff; ++j) sum += double(w2[e][std::size_t(i * d_ff + j)]) * hidden[std::size_t(j)];
        out[std::size_t(i)] += weight * sum;
      }
    }
    for (moe::index_t i = 0; i < d; ++i) {
      worst = std::max(worst, std::abs(out[std::size_t(i)] - double(y(t, i))));
      largest = std::max(largest, std::abs(out[std::size_t(i)]));
    }
  }
  std::printf("check: 4 tokens against the same math in double loops: max |error| %.2e (largest |y| %.2e)\n", worst, largest);
  if (!(worst <= 1e-4 * largest)) {
    std::printf("MISMATCH\n");
    return 1;
  }
  return 0;
}
