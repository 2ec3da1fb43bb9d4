// A Soft MoE block (Puigcerver et al. 2023) as a ViT would use it, scaled down: each image's patches
// are mixed into slots, every expert processes its slots, and the slot outputs are mixed back into
// the patches. Routing is vmoe's normalized variant (learned scale), one routing group per image, so
// an image's output does not depend on the other images in the batch.
//
// The program
//   1. runs a batch of three images and checks that image 1's output has the same bits as image 1
//      run alone;
//   2. checks image 2's output against the paper's formulas written out in double loops;
//   3. trains Φ, the scale and the experts for a few SGD steps towards a teacher block's outputs
//      with forward_train / backward, updating the weights in place, and checks that the loss falls.
// It checks its own results, so it doubles as a test.
// Build: link moe::moe (CMake) or add include/ plus Eigen and xsimd to the include path.
#include <moe/moe.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <vector>

using moe::index_t;

int main() {
  const index_t d = 48, d_ff = 96, num_experts = 4, patches = 16, images = 3;
  // vmoe's slot count for capacity factor 1: round(patches · 1 / experts) = 4 slots per expert.
  const index_t slots = moe::soft_slots_per_expert(patches, num_experts, /*capacity_factor=*/1.0);
  const index_t num_slots = num_experts * slots, tokens = images * patches;

  // Deterministic uniform numbers in [-1, 1) from a 64-bit LCG (same values on every platform).
  std::uint64_t state = 11;
  auto uniform = [&state] {
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    return static_cast<float>(state >> 40) / 8388608.0f - 1.0f;  // 24 random bits
  };
  auto random = [&uniform](index_t rows, index_t cols, float bound) {
    moe::Matrix<float> m(rows, cols);
    for (index_t i = 0; i < m.size(); ++i) m.data()[i] = bound * uniform();
    return m;
  };

  // The model's weights, in buffers the program owns: Φ [d, E · s] (column e · s + j is slot j of
  // expert e, vmoe's layout) and each expert's fc1 [d_ff, d] and fc2 [d, d_ff]. The layer views
  // them, so the SGD steps below update them in place.
  moe::Matrix<float> phi = random(d, num_slots, 1.0f / std::sqrt(float(d)));
  std::vector<moe::Matrix<float>> w_in, w_out;
  for (index_t e = 0; e < num_experts; ++e) {
    w_in.push_back(random(d_ff, d, 1.0f / std::sqrt(float(d))));
    w_out.push_back(random(d, d_ff, 1.0f / std::sqrt(float(d_ff))));
  }
  std::vector<moe::FeedForward<float, moe::GELU>> experts;
  for (index_t e = 0; e < num_experts; ++e) {
    experts.emplace_back(moe::ConstMatrixMap<float>(w_in[std::size_t(e)].data(), d_ff, d),
                         moe::ConstMatrixMap<float>(w_out[std::size_t(e)].data(), d, d_ff));
  }
  moe::SoftOptions options;
  options.slots_per_expert = slots;
  options.normalized = true;  // x and Φ normalized, logits times a learned scale (initially 1)
  moe::SoftMoELayer layer(moe::SoftRouter<float>(moe::ConstMatrixMap<float>(phi.data(), d, num_slots), num_experts, options),
                          experts);

  // Patch embeddings [images · patches, d], image-major; routing groups: one per image.
  const moe::Matrix<float> x = random(tokens, d, 1.0f);
  std::vector<index_t> image_begin;
  for (index_t i = 0; i <= images; ++i) image_begin.push_back(i * patches);
  moe::Matrix<float> y(tokens, d);
  moe::SoftWorkspace<float> workspace;
  layer.forward(x, moe::RouteContext::with_groups(image_begin), y, workspace);
  std::printf("Soft MoE block: d = %td, %td GELU experts (d_ff = %td) x %td slots, %td images x %td patches\n", d,
              num_experts, d_ff, slots, images, patches);

  // 1. Image 1 alone gives the same bits as image 1 in the batch.
  const moe::Matrix<float> x1 = x.middleRows(patches, patches);
  moe::Matrix<float> y1(patches, d);
  layer.forward(x1, y1, workspace);
  const bool isolated = y1 == y.middleRows(patches, patches);
  std::printf("image 1 alone and in the batch: %s\n", isolated ? "same bits" : "DIFFERENT");

  // 2. Image 2 from the formulas, in double: logits L = scale · x̂ · Φ̂ (rows of x and columns of Φ
  // normalized, + 1e-6 under the root), D = softmax of L over the image's patches (per slot),
  // C = softmax of L over the slots (per patch), slot inputs X̃ = Dᵀ · x, expert e on its slots,
  // y = C · Ỹ.
  const index_t first = 2 * patches;
  auto at = [](std::vector<double>& v, index_t i) -> double& { return v[static_cast<std::size_t>(i)]; };
  std::vector<double> logit(static_cast<std::size_t>(patches * num_slots)), phi_norm(static_cast<std::size_t>(num_slots));
  for (index_t j = 0; j < num_slots; ++j) {
    double sum = 1e-6;
    for (index_t i = 0; i < d; ++i) sum += double(phi(i, j)) * double(phi(i, j));
    at(phi_norm, j) = std::sqrt(sum);
  }
  for (index_t t = 0; t < patches; ++t) {
    double sum = 1e-6;
    for (index_t i = 0; i < d; ++i) sum += double(x(first + t, i)) * double(x(first + t, i));
    for (index_t j = 0; j < num_slots; ++j) {
      double dot = 0;
      for (index_t i = 0; i < d; ++i) dot += double(x(first + t, i)) * double(phi(i, j));
      at(logit, t * num_slots + j) = dot / (std::sqrt(sum) * at(phi_norm, j));
    }
  }
  std::vector<double> dispatch(logit.size()), combine(logit.size());
  for (index_t j = 0; j < num_slots; ++j) {  // over the patches, per slot
    double sum = 0;
    for (index_t t = 0; t < patches; ++t) sum += std::exp(at(logit, t * num_slots + j));
    for (index_t t = 0; t < patches; ++t) at(dispatch, t * num_slots + j) = std::exp(at(logit, t * num_slots + j)) / sum;
  }
  for (index_t t = 0; t < patches; ++t) {  // over the slots, per patch
    double sum = 0;
    for (index_t j = 0; j < num_slots; ++j) sum += std::exp(at(logit, t * num_slots + j));
    for (index_t j = 0; j < num_slots; ++j) at(combine, t * num_slots + j) = std::exp(at(logit, t * num_slots + j)) / sum;
  }
  std::vector<double> slot_out(static_cast<std::size_t>(num_slots * d)), slot_in(static_cast<std::size_t>(d)),
      hidden(static_cast<std::size_t>(d_ff));
  for (index_t j = 0; j < num_slots; ++j) {
    const std::size_t e = static_cast<std::size_t>(j / slots);
    for (index_t i = 0; i < d; ++i) {
      at(slot_in, i) = 0;
      for (index_t t = 0; t < patches; ++t) at(slot_in, i) += at(dispatch, t * num_slots + j) * double(x(first + t, i));
    }
    for (index_t h = 0; h < d_ff; ++h) {
      double pre = 0;
      for (index_t i = 0; i < d; ++i) pre += double(w_in[e](h, i)) * at(slot_in, i);
      at(hidden, h) = 0.5 * pre * (1.0 + std::erf(pre / std::sqrt(2.0)));  // GELU
    }
    for (index_t i = 0; i < d; ++i) {
      double sum = 0;
      for (index_t h = 0; h < d_ff; ++h) sum += double(w_out[e](i, h)) * at(hidden, h);
      at(slot_out, j * d + i) = sum;
    }
  }
  double worst = 0, largest = 0;
  for (index_t t = 0; t < patches; ++t) {
    for (index_t i = 0; i < d; ++i) {
      double sum = 0;
      for (index_t j = 0; j < num_slots; ++j) sum += at(combine, t * num_slots + j) * at(slot_out, j * d + i);
      worst = std::max(worst, std::abs(sum - double(y(first + t, i))));
      largest = std::max(largest, std::abs(sum));
    }
  }
  const bool matches = worst <= 1e-4 * largest;
  std::printf("image 2 against the formulas in double loops: max |error| %.2e (largest |y| %.2e)%s\n", worst, largest,
              matches ? "" : "  MISMATCH");

  // 3. Training: distill a teacher, a second Soft MoE block with its own random weights, with
  // plain SGD on L = ½ · mean over patches of |y − teacher(x)|². backward gives ∂L/∂Φ, ∂L/∂scale
  // and each expert's ∂L/∂fc1 and ∂L/∂fc2.
  std::vector<moe::FeedForward<float, moe::GELU>> teacher_experts;
  for (index_t e = 0; e < num_experts; ++e) {
    teacher_experts.emplace_back(random(d_ff, d, 1.0f / std::sqrt(float(d))),
                                 random(d, d_ff, 1.0f / std::sqrt(float(d_ff))));
  }
  const moe::SoftMoELayer teacher(moe::SoftRouter<float>(random(d, num_slots, 1.0f), num_experts, options),
                                  std::move(teacher_experts));
  moe::Matrix<float> target(tokens, d);
  teacher.forward(x, moe::RouteContext::with_groups(image_begin), target, workspace);
  moe::SoftTrainingWorkspace<float> training;
  auto grads = layer.make_gradients();
  moe::Matrix<float> dx(tokens, d);
  const float learning_rate = 2.0f;
  double first_loss = 0, loss = 0;
  std::printf("training: step  loss\n");
  for (int step = 0; step <= 40; ++step) {
    layer.forward_train(x, moe::RouteContext::with_groups(image_begin), y, training);
    const moe::Matrix<float> diff = y - target;
    loss = 0.5 * double(diff.squaredNorm()) / double(tokens);
    if (step == 0) first_loss = loss;
    if (step % 10 == 0) std::printf("          %4d  %.5f\n", step, loss);
    const moe::Matrix<float> dy = diff / float(tokens);
    layer.backward(x, dy, dx, grads, training);
    phi -= learning_rate * grads.phi;  // the layer views phi, w_in and w_out: updated in place
    for (index_t e = 0; e < num_experts; ++e) {
      w_in[std::size_t(e)] -= learning_rate * grads.experts[std::size_t(e)].w_in;
      w_out[std::size_t(e)] -= learning_rate * grads.experts[std::size_t(e)].w_out;
    }
    // The scale is a number in the router, set between steps.
    layer.set_scale(layer.router().options().scale - double(learning_rate * grads.scale));
  }
  const bool learned = loss < 0.1 * first_loss;
  std::printf("loss %.5f -> %.5f, scale %.3f%s\n", first_loss, loss, layer.router().options().scale,
              learned ? "" : "  NOT LEARNING");
  return isolated && matches && learned ? 0 : 1;
}
