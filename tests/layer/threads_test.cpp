// Built with moe::openmp: outputs and gradients are bit-identical on 1 and 2 threads and on
// repeated runs.
#include <catch2/catch.hpp>

#include <omp.h>

#include "../support/reference.hpp"

using namespace moe_test;

TEST_CASE("Forward and backward bits do not depend on the thread count", "[threads][determinism]") {
  REQUIRE(moe::max_threads() >= 1);
  const index_t d = 96, ff = 200, E = 6, Tn = 150;
  std::vector<moe::SwiGLU<float>> experts;
  for (index_t e = 0; e < E; ++e) {
    experts.emplace_back(random_matrix<float>(ff, d, 1 + std::uint32_t(e), 0.1), random_matrix<float>(ff, d, 20 + std::uint32_t(e), 0.1),
                         random_matrix<float>(d, ff, 40 + std::uint32_t(e), 0.1));
  }
  moe::MoELayer layer(moe::TopKRouter<float>(random_matrix<float>(E, d, 99), moe::presets::mixtral(2)), experts);
  layer.set_shared_experts({experts[0]}, moe::Weight<float>::own(random_matrix<float>(1, d, 7)));
  const moe::Matrix<float> x = random_matrix<float>(Tn, d, 5), dy = random_matrix<float>(Tn, d, 6);

  auto run = [&](int threads, moe::Matrix<float>& y, moe::Matrix<float>& dx, decltype(layer.make_gradients())& g) {
    omp_set_num_threads(threads);
    moe::TrainingWorkspace<float> ws;
    y.resize(Tn, d);
    dx.resize(Tn, d);
    layer.forward_train(x, moe::RouteContext{}, y, ws);
    g = layer.make_gradients();
    layer.backward(x, dy, dx, g, ws);
  };
  moe::Matrix<float> y1, dx1, y2, dx2, y3, dx3;
  auto g1 = layer.make_gradients(), g2 = g1, g3 = g1;
  run(1, y1, dx1, g1);
  run(2, y2, dx2, g2);
  run(2, y3, dx3, g3);
  REQUIRE(y1 == y2);
  REQUIRE(dx1 == dx2);
  REQUIRE(g1.router == g2.router);
  for (std::size_t e = 0; e < g1.experts.size(); ++e) {
    REQUIRE(g1.experts[e].w_gate == g2.experts[e].w_gate);
    REQUIRE(g1.experts[e].w_up == g2.experts[e].w_up);
    REQUIRE(g1.experts[e].w_down == g2.experts[e].w_down);
  }
  REQUIRE(g1.shared[0].w_down == g2.shared[0].w_down);
  REQUIRE(g1.shared_gate == g2.shared_gate);
  REQUIRE(y2 == y3);
  REQUIRE(dx2 == dx3);
  // A permuted batch (dropless top-k has no cross-token dependence): rows permute bit for bit.
  moe::Workspace<float> ws;
  const moe::Matrix<float> x_rev = x.colwise().reverse();
  const moe::Matrix<float> y_rev = layer.forward(x_rev, ws);
  REQUIRE(moe::Matrix<float>(y_rev.colwise().reverse()) == y1);
  omp_set_num_threads(2);
}

TEST_CASE("Soft MoE forward and backward bits do not depend on the thread count", "[threads][determinism][soft]") {
  const index_t d = 96, ff = 150, E = 4, slots = 2, Tn = 130;
  std::vector<moe::SwiGLU<float>> experts;
  for (index_t e = 0; e < E; ++e) {
    experts.emplace_back(random_matrix<float>(ff, d, 1 + std::uint32_t(e), 0.1), random_matrix<float>(ff, d, 20 + std::uint32_t(e), 0.1),
                         random_matrix<float>(d, ff, 40 + std::uint32_t(e), 0.1));
  }
  moe::SoftOptions options;
  options.slots_per_expert = slots;
  options.normalized = true;
  const moe::SoftMoELayer<moe::SwiGLU<float>> layer(moe::SoftRouter<float>(random_matrix<float>(d, E * slots, 99), E, options),
                                                    experts);
  const moe::Matrix<float> x = random_matrix<float>(Tn, d, 5), dy = random_matrix<float>(Tn, d, 6);
  const std::vector<index_t> groups = {0, 50, 130};  // two sequences
  auto run = [&](int threads, moe::Matrix<float>& y, moe::Matrix<float>& dx, decltype(layer.make_gradients())& g) {
    omp_set_num_threads(threads);
    moe::SoftTrainingWorkspace<float> ws;
    y.resize(Tn, d);
    dx.resize(Tn, d);
    layer.forward_train(x, moe::RouteContext::with_groups(groups), y, ws);
    g = layer.make_gradients();
    layer.backward(x, dy, dx, g, ws);
  };
  moe::Matrix<float> y1, dx1, y2, dx2;
  auto g1 = layer.make_gradients(), g2 = g1;
  run(1, y1, dx1, g1);
  run(2, y2, dx2, g2);
  REQUIRE(y1 == y2);
  REQUIRE(dx1 == dx2);
  REQUIRE(g1.phi == g2.phi);
  REQUIRE(g1.scale == g2.scale);
  for (std::size_t e = 0; e < g1.experts.size(); ++e) {
    REQUIRE(g1.experts[e].w_gate == g2.experts[e].w_gate);
    REQUIRE(g1.experts[e].w_up == g2.experts[e].w_up);
    REQUIRE(g1.experts[e].w_down == g2.experts[e].w_down);
  }
  omp_set_num_threads(2);
}
