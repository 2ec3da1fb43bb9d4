// MoELayer forward against a per-token double reference; Mixtral semantics from the formula;
// shapes and errors.
#include <catch2/catch.hpp>

#include <limits>

#include "../support/reference.hpp"

// (A namespace of its own: this file may share a translation unit with other test files.)
namespace moe_layer_test {

using namespace moe_test;

namespace {

template <class T>
struct SwiGLUModel {
  index_t d, ff, E;
  moe::Matrix<T> gate;  // [E, d]
  std::vector<moe::Matrix<T>> w_gate, w_up, w_down;
  SwiGLUModel(index_t d_, index_t ff_, index_t E_, std::uint32_t seed) : d(d_), ff(ff_), E(E_) {
    gate = random_matrix<T>(E, d, seed, 1.0);
    for (index_t e = 0; e < E; ++e) {
      const auto s = seed + 10 * std::uint32_t(e + 1);
      w_gate.push_back(random_matrix<T>(ff, d, s + 1, 1.0 / std::sqrt(double(d))));
      w_up.push_back(random_matrix<T>(ff, d, s + 2, 1.0 / std::sqrt(double(d))));
      w_down.push_back(random_matrix<T>(d, ff, s + 3, 1.0 / std::sqrt(double(ff))));
    }
  }
  std::vector<moe::SwiGLU<T>> experts() const {  // views on the model's buffers
    std::vector<moe::SwiGLU<T>> out;
    for (index_t e = 0; e < E; ++e) {
      out.emplace_back(moe::ConstMatrixMap<T>(w_gate[std::size_t(e)].data(), ff, d),
                       moe::ConstMatrixMap<T>(w_up[std::size_t(e)].data(), ff, d),
                       moe::ConstMatrixMap<T>(w_down[std::size_t(e)].data(), d, ff));
    }
    return out;
  }
  // The layer's output for one token, in double: Mixtral-style routing with options o.
  std::vector<double> reference(const std::vector<double>& x, const moe::TopKOptions& o, bool* near_tie) const {
    const std::vector<double> logits = linear(to_double(gate), x);
    const std::vector<double> p = softmax(logits);
    const std::vector<index_t> chosen = top_k(p, E == o.k ? E : o.k + 1);
    *near_tie = o.k < E && p[std::size_t(chosen[std::size_t(o.k - 1)])] - p[std::size_t(chosen[std::size_t(o.k)])] < 1e-5;
    double sum = 0;
    for (index_t j = 0; j < o.k; ++j) sum += p[std::size_t(chosen[std::size_t(j)])];
    std::vector<double> y(std::size_t(d), 0.0);
    for (index_t j = 0; j < o.k; ++j) {
      const index_t e = chosen[std::size_t(j)];
      const double w = o.normalize ? p[std::size_t(e)] / sum : p[std::size_t(e)];
      const std::vector<double> ye = swiglu(to_double(w_gate[std::size_t(e)]), to_double(w_up[std::size_t(e)]),
                                            to_double(w_down[std::size_t(e)]), x);
      for (index_t i = 0; i < d; ++i) y[std::size_t(i)] += w * ye[std::size_t(i)];
    }
    return y;
  }
};

}  // namespace

TEMPLATE_TEST_CASE("MoELayer forward equals a per-token double reference", "[layer]", float, double) {
  struct Shape {
    index_t T, d, ff, E, k;
  };
  const Shape shape = GENERATE(Shape{0, 8, 16, 4, 2}, Shape{1, 8, 16, 4, 2}, Shape{5, 13, 7, 3, 3},  // k = E
                               Shape{9, 17, 11, 1, 1},                                                 // E = 1
                               Shape{40, 19, 24, 6, 2}, Shape{70, 33, 40, 5, 1}, Shape{64, 24, 20, 2, 2},
                               Shape{3, 1, 3, 4, 4});
  const bool normalize = GENERATE(true, false);
  CAPTURE(shape.T, shape.d, shape.ff, shape.E, shape.k, normalize);
  const SwiGLUModel<TestType> model(shape.d, shape.ff, shape.E, std::uint32_t(shape.T * 31 + shape.d));
  moe::TopKOptions o;
  o.k = shape.k;
  o.normalize = normalize;
  moe::MoELayer layer(moe::TopKRouter<TestType>(moe::ConstMatrixMap<TestType>(model.gate.data(), shape.E, shape.d), o),
                      model.experts());
  const moe::Matrix<TestType> x = random_matrix<TestType>(shape.T, shape.d, 99);
  moe::Workspace<TestType> ws;
  const moe::Matrix<TestType> y = layer.forward(x, ws);
  REQUIRE(y.rows() == shape.T);
  REQUIRE(y.cols() == shape.d);

  const double tol = std::is_same<TestType, float>::value ? 1e-5 : 1e-12;
  const Mat xd = to_double(x);
  index_t compared = 0;
  for (index_t t = 0; t < shape.T; ++t) {
    bool near_tie = false;
    const std::vector<double> ref = model.reference(xd[std::size_t(t)], o, &near_tie);
    if (near_tie && std::is_same<TestType, float>::value) continue;  // float may rightly pick the other expert
    double err = 0, scale = 0;
    for (index_t i = 0; i < shape.d; ++i) {
      err = std::max(err, std::fabs(double(y(t, i)) - ref[std::size_t(i)]));
      scale = std::max(scale, std::fabs(ref[std::size_t(i)]));
    }
    CAPTURE(t, err, scale);
    CHECK(err <= tol * scale);
    ++compared;
  }
  CHECK(compared >= shape.T - 1);  // at most one near-tie token in these cases
}

TEST_CASE("Mixtral semantics: softmax over E, top-2 by probability, renormalized, SwiGLU", "[layer][mixtral]") {
  // Gate = identity and x = chosen logits, so the router's logits are exactly the values below.
  const index_t E = 6, d = 6, ff = 5;
  const std::vector<double> logits = {0.25, 1.5, -0.75, 3.0, 1.5, 0.5};
  moe::Matrix<double> gate = moe::Matrix<double>::Identity(E, d);
  SwiGLUModel<double> model(d, ff, E, 5);
  model.gate = gate;
  moe::TopKOptions o;
  o.k = 2;
  o.normalize = true;
  moe::MoELayer layer(moe::TopKRouter<double>(gate, o), model.experts());
  moe::Matrix<double> x(2, d);
  for (index_t i = 0; i < d; ++i) x(0, i) = logits[std::size_t(i)];
  // Token 1 ties experts 1 and 4 for first place: the lower index (1) ranks first.
  x.row(1) << 0.0, 2.0, 0.0, 0.0, 2.0, 1.0;
  moe::Workspace<double> ws;
  const moe::Matrix<double> y = layer.forward(x, ws);
  const auto& plan = ws.routing.plan;

  // Token 0: the two largest logits are 3.0 (expert 3) and 1.5 (experts 1 and 4 tie: 1 wins).
  // Renormalized softmax over E restricted to the pair equals exp(l_i) / (exp(l_3) + exp(l_1)).
  const double w3 = std::exp(3.0) / (std::exp(3.0) + std::exp(1.5));
  const double w1 = std::exp(1.5) / (std::exp(3.0) + std::exp(1.5));
  REQUIRE(plan.expert_of_assignment(plan.assignment[0]) == 3);
  REQUIRE(plan.expert_of_assignment(plan.assignment[1]) == 1);
  REQUIRE(plan.weight[std::size_t(plan.assignment[0])] == Approx(w3).epsilon(1e-14));
  REQUIRE(plan.weight[std::size_t(plan.assignment[1])] == Approx(w1).epsilon(1e-14));
  // Token 1: experts 1 and 4 tie at the top; equal weights 1/2 each, expert 1 first.
  REQUIRE(plan.expert_of_assignment(plan.assignment[2]) == 1);
  REQUIRE(plan.expert_of_assignment(plan.assignment[3]) == 4);
  REQUIRE(plan.weight[std::size_t(plan.assignment[2])] == Approx(0.5).epsilon(1e-14));

  // The output is that mixture of the two SwiGLU experts.
  const Mat xd = to_double(x);
  auto expert = [&](index_t e, const std::vector<double>& v) {
    return swiglu(to_double(model.w_gate[std::size_t(e)]), to_double(model.w_up[std::size_t(e)]),
                  to_double(model.w_down[std::size_t(e)]), v);
  };
  const std::vector<double> y3 = expert(3, xd[0]), y1 = expert(1, xd[0]);
  const std::vector<double> z1 = expert(1, xd[1]), z4 = expert(4, xd[1]);
  for (index_t i = 0; i < d; ++i) {
    CHECK(y(0, i) == Approx(w3 * y3[std::size_t(i)] + w1 * y1[std::size_t(i)]).epsilon(1e-12).margin(1e-14));
    CHECK(y(1, i) == Approx(0.5 * z1[std::size_t(i)] + 0.5 * z4[std::size_t(i)]).epsilon(1e-12).margin(1e-14));
  }
}

TEST_CASE("MoELayer output may alias its input, and reuse of a workspace is stable", "[layer]") {
  const SwiGLUModel<float> model(16, 12, 4, 3);
  moe::TopKOptions o;
  o.k = 2;
  moe::MoELayer layer(moe::TopKRouter<float>(moe::ConstMatrixMap<float>(model.gate.data(), 4, 16), o), model.experts());
  const moe::Matrix<float> x = random_matrix<float>(21, 16, 8);
  moe::Workspace<float> ws;
  const moe::Matrix<float> y = layer.forward(x, ws);
  // A larger batch first, then the same batch again: identical bits.
  (void)layer.forward(random_matrix<float>(50, 16, 9), ws);
  REQUIRE(layer.forward(x, ws) == y);
  moe::Matrix<float> inplace = x;
  layer.forward(inplace, inplace, ws);
  REQUIRE(inplace == y);
}

TEST_CASE("MoELayer rejects mismatched shapes and leaves the output untouched", "[layer][errors]") {
  const SwiGLUModel<float> model(8, 6, 3, 4);
  moe::TopKOptions o;
  o.k = 2;
  const moe::TopKRouter<float> router(moe::ConstMatrixMap<float>(model.gate.data(), 3, 8), o);
  std::vector<moe::SwiGLU<float>> experts = model.experts();

  std::vector<moe::SwiGLU<float>> too_few(experts.begin(), experts.begin() + 2);
  REQUIRE_THROWS_AS(moe::MoELayer(router, too_few), moe::invalid_argument);
  REQUIRE_THROWS_WITH(moe::MoELayer(router, too_few),
                      Catch::Contains("experts.size() + zero_compute.size() = 2") && Catch::Contains("router.num_experts() = 3"));
  const SwiGLUModel<float> wider(9, 6, 1, 5);
  std::vector<moe::SwiGLU<float>> mixed = experts;
  mixed[1] = wider.experts()[0];
  REQUIRE_THROWS_WITH(moe::MoELayer(router, mixed), Catch::Contains("expert 1") && Catch::Contains("expert d_model = 9") &&
                                                        Catch::Contains("router d_model = 8"));

  moe::MoELayer layer(router, experts);
  moe::Workspace<float> ws;
  moe::Matrix<float> y = moe::Matrix<float>::Constant(4, 8, 7.0f);
  const moe::Matrix<float> y_before = y;
  REQUIRE_THROWS_WITH(layer.forward(random_matrix<float>(4, 7, 1), y, ws), Catch::Contains("x.cols() = 7") && Catch::Contains("d_model = 8"));
  REQUIRE_THROWS_WITH(layer.forward(random_matrix<float>(5, 8, 1), y, ws), Catch::Contains("y.rows() = 4") && Catch::Contains("x.rows() = 5"));
  moe::Matrix<float> y_narrow(4, 6);
  REQUIRE_THROWS_WITH(layer.forward(random_matrix<float>(4, 8, 1), y_narrow, ws), Catch::Contains("y.cols() = 6"));
  moe::Matrix<float> x_nan = random_matrix<float>(4, 8, 1);
  x_nan(2, 3) = std::numeric_limits<float>::infinity();
  REQUIRE_THROWS_AS(layer.forward(x_nan, y, ws), moe::numeric_error);
  REQUIRE(y == y_before);  // nothing written on error

  // An empty batch is valid and gives an empty output.
  moe::Matrix<float> empty_y(0, 8);
  layer.forward(moe::Matrix<float>(0, 8), empty_y, ws);
  REQUIRE(layer.forward(moe::Matrix<float>(0, 8), ws).rows() == 0);
}

TEST_CASE("Expert weight shapes that disagree are rejected", "[experts][errors]") {
  const moe::Matrix<float> a = random_matrix<float>(6, 8, 1), b = random_matrix<float>(6, 8, 2), c = random_matrix<float>(8, 6, 3);
  REQUIRE_NOTHROW(moe::SwiGLU<float>(a, b, c));
  REQUIRE_THROWS_WITH(moe::SwiGLU<float>(a, random_matrix<float>(5, 8, 2), c), Catch::Contains("w_up.rows() = 5") && Catch::Contains("= 6"));
  REQUIRE_THROWS_WITH(moe::SwiGLU<float>(a, b, random_matrix<float>(8, 7, 3)), Catch::Contains("w_down.cols() = 7"));
  REQUIRE_THROWS_WITH((moe::FeedForward<float, moe::ReLU>(a, random_matrix<float>(7, 6, 3))), Catch::Contains("w_out.rows() = 7") && Catch::Contains("= 8"));
}

TEST_CASE("A token's output bits do not depend on the rest of its batch (dropless top-k)", "[layer][isolation]") {
  // Expert blocks mix tokens of the whole batch, so this holds only because every kernel computes
  // each element in a fixed order whatever the block sizes (simd/matmul.hpp).
  const index_t d = 37, ff = 45, E = 4;
  SwiGLUModel<float> model(d, ff, E, 17);
  moe::TopKOptions o;
  o.k = 2;
  o.normalize = true;
  moe::MoELayer layer(moe::TopKRouter<float>(moe::ConstMatrixMap<float>(model.gate.data(), E, d), o), model.experts());
  const moe::Matrix<float> x = random_matrix<float>(57, d, 3);
  moe::Workspace<float> ws;
  const moe::Matrix<float> y = layer.forward(x, ws);
  for (index_t t = 0; t < x.rows(); t += 7) {
    const moe::Matrix<float> alone = layer.forward(x.row(t), ws);
    CAPTURE(t);
    REQUIRE(alone == y.row(t));
  }
  const moe::Matrix<float> y_tail = layer.forward(x.bottomRows(20), ws);
  REQUIRE(y_tail == y.bottomRows(20));
}

}  // namespace moe_layer_test
