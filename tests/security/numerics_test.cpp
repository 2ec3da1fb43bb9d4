// Numerics: logits up to ±1e4 route without overflow or NaN (softmax and sigmoid scores, top-k
// before and after the softmax, top-p, soft routing), checked against a double reference; and
// the float layer agrees with the double layer within a stated bound.
#include <catch2/catch.hpp>

#include <cmath>
#include <limits>
#include <vector>

#include "../support/reference.hpp"

// (A namespace of its own: this file may share a translation unit with other test files.)
namespace numerics_test {

using namespace moe_test;

namespace {

// Rows of extreme logits. With an identity gate W = I [E, E] the router's logits are x itself,
// exactly (every other product is 0).
moe::Matrix<float> extreme_logits(index_t E) {
  const std::vector<std::vector<float>> rows = {
      {1e4f, -1e4f, 0.0f, 9999.0f, -9999.0f, 1.0f, -1.0f, 5000.0f},
      {-1e4f, -1e4f, -1e4f, -1e4f, -1e4f, -1e4f, -1e4f, -1e4f},
      {1e4f, 1e4f, 1e4f, 1e4f, 1e4f, 1e4f, 1e4f, 1e4f},
      {-1e4f, -9999.5f, -9000.0f, -1e4f, -1e4f, -1e4f, -1e4f, -1e4f},
      {1e4f, -1e4f, 1e4f, -1e4f, 1e4f, -1e4f, 1e4f, -1e4f},
      {88.8f, -88.8f, 104.0f, -104.0f, 710.0f, -745.0f, 3.0f, 0.0f},
  };
  moe::Matrix<float> x(static_cast<index_t>(rows.size()), E);
  for (index_t t = 0; t < x.rows(); ++t)
    for (index_t e = 0; e < E; ++e) x(t, e) = rows[std::size_t(t)][std::size_t(e)];
  return x;
}

bool all_finite(const moe::ConstMatrixMap<float>& m) { return m.allFinite(); }

}  // namespace

TEST_CASE("Logits up to ±1e4 route without overflow or NaN", "[numerics]") {
  const index_t E = 8;
  const moe::Matrix<float> x = extreme_logits(E);
  const moe::Matrix<float> identity = moe::Matrix<float>::Identity(E, E);
  struct Variant {
    const char* name;
    moe::TopKOptions o;
  };
  moe::TopKOptions softmax2 = moe::presets::mixtral(2);
  moe::TopKOptions softmax_raw;
  softmax_raw.k = 3;
  moe::TopKOptions after;
  after.k = 3;
  after.softmax_placement = moe::SoftmaxPlacement::after_top_k;
  moe::TopKOptions sig = moe::presets::deepseek_v3(2, 2, 1, 2.5);
  moe::TopKOptions sigmoid_raw;
  sigmoid_raw.k = 2;
  sigmoid_raw.score = moe::ScoreFunction::sigmoid;
  moe::TopKOptions top_p;
  top_p.k = 4;
  top_p.top_p = 0.9;
  for (const Variant& v : {Variant{"softmax, normalized", softmax2}, Variant{"softmax, raw", softmax_raw},
                           Variant{"softmax after top-k", after}, Variant{"sigmoid, grouped, normalized", sig},
                           Variant{"sigmoid, raw", sigmoid_raw}, Variant{"top-p", top_p}}) {
    CAPTURE(v.name);
    const moe::TopKRouter<float> router(identity, v.o);
    moe::RouterOutput<float> out;
    router.route(x, out);
    REQUIRE(all_finite(out.scores()));
    for (index_t t = 0; t < x.rows(); ++t) {
      CAPTURE(t);
      std::vector<double> l(static_cast<std::size_t>(E));
      for (index_t e = 0; e < E; ++e) l[std::size_t(e)] = static_cast<double>(x(t, e));
      // Scores against the double reference.
      const std::vector<double> p = softmax(l);
      for (index_t e = 0; e < E; ++e) {
        const double ref = v.o.score == moe::ScoreFunction::softmax ? p[std::size_t(e)] : sigmoid(l[std::size_t(e)]);
        REQUIRE(std::fabs(static_cast<double>(out.scores()(t, e)) - ref) <= 1e-6);
      }
      // Weights finite and in range: each raw weight is in [0, 1], so each final weight is in
      // [0, scale] (normalized or not).
      REQUIRE(out.plan.experts_of(t) >= 1);
      double sum = 0;
      for (index_t j = out.plan.token_begin[std::size_t(t)]; j < out.plan.token_begin[std::size_t(t + 1)]; ++j) {
        const float w = out.plan.weight[std::size_t(out.plan.assignment[std::size_t(j)])];
        REQUIRE(std::isfinite(w));
        REQUIRE(w >= 0.0f);
        REQUIRE(static_cast<double>(w) <= v.o.scale * (1 + 1e-6));
        sum += static_cast<double>(w);
      }
      // Softmax weights renormalized over the choices sum to scale (sigmoid ones may all be 0:
      // σ(−1e4) = 0 in float, and the denominator's 1e-20 keeps them 0).
      if (v.o.score == moe::ScoreFunction::softmax && (v.o.normalize || v.o.softmax_placement == moe::SoftmaxPlacement::after_top_k)) {
        REQUIRE(std::fabs(sum - v.o.scale) <= 1e-5 * v.o.scale);
      }
    }
  }
}

TEST_CASE("Soft routing with logits up to ±1e4: dispatch and combine weights stay finite and normalized", "[numerics][soft]") {
  const index_t E = 4, s = 2;
  const moe::Matrix<float> x = extreme_logits(E * s);
  const moe::SoftRouter<float> router(moe::Matrix<float>::Identity(E * s, E * s), E, {s, false, 1.0});
  moe::SoftRouting<float> out;
  router.route(x, out);
  REQUIRE(out.dispatch_weights().allFinite());
  REQUIRE(out.combine_weights().allFinite());
  const moe::Matrix<float> D = out.dispatch_weights(), C = out.combine_weights();
  for (index_t j = 0; j < E * s; ++j) {
    // D: softmax over tokens of each slot's column, against the double reference.
    std::vector<double> col(static_cast<std::size_t>(x.rows()));
    for (index_t t = 0; t < x.rows(); ++t) col[std::size_t(t)] = static_cast<double>(x(t, j));
    const std::vector<double> ref = softmax(col);
    for (index_t t = 0; t < x.rows(); ++t) REQUIRE(std::fabs(static_cast<double>(D(t, j)) - ref[std::size_t(t)]) <= 1e-6);
  }
  for (index_t t = 0; t < x.rows(); ++t) {
    std::vector<double> row(static_cast<std::size_t>(E * s));
    for (index_t j = 0; j < E * s; ++j) row[std::size_t(j)] = static_cast<double>(x(t, j));
    const std::vector<double> ref = softmax(row);
    for (index_t j = 0; j < E * s; ++j) REQUIRE(std::fabs(static_cast<double>(C(t, j)) - ref[std::size_t(j)]) <= 1e-6);
  }
}

TEST_CASE("A layer routed by logits up to ±1e4 gives finite outputs", "[numerics][layer]") {
  const index_t E = 8;
  std::vector<moe::SwiGLU<float>> experts;
  for (index_t e = 0; e < E; ++e) {
    const auto seed = 300 + 3 * static_cast<std::uint32_t>(e);
    experts.emplace_back(random_matrix<float>(16, E, seed, 1e-3), random_matrix<float>(16, E, seed + 1, 1e-3),
                         random_matrix<float>(E, 16, seed + 2, 0.1));
  }
  const moe::MoELayer layer(moe::TopKRouter<float>(moe::Matrix<float>::Identity(E, E), moe::presets::deepseek_v3(2, 2, 1, 2.5)), experts);
  moe::Workspace<float> ws;
  REQUIRE(layer.forward(extreme_logits(E), ws).allFinite());
  const moe::MoELayer layer2(moe::TopKRouter<float>(moe::Matrix<float>::Identity(E, E), moe::presets::mixtral(2)), experts);
  REQUIRE(layer2.forward(extreme_logits(E), ws).allFinite());
}

// The float layer against the same layer in double (weights and inputs rounded to float first,
// so both see the same values): the routing is identical, and
//   max |y_float − y_double| <= 2e-6 · max |y_double|,  max |dx_float − dx_double| <= 3e-6 · max |dx_double|
// for the suite's shapes (d up to 96, d_ff up to 200, up to 150 tokens). Float's unit roundoff is
// 6e-8; the sums have at most a few hundred terms.
TEST_CASE("Float agrees with double within the stated bound", "[numerics][precision]") {
  struct Shape {
    index_t d, ff, E, T;
  };
  for (const Shape s : {Shape{16, 24, 4, 9}, Shape{37, 45, 4, 57}, Shape{96, 200, 6, 150}}) {
    CAPTURE(s.d, s.ff, s.E, s.T);
    const auto seed = static_cast<std::uint32_t>(s.d);
    std::vector<moe::SwiGLU<float>> ef;
    std::vector<moe::SwiGLU<double>> ed;
    for (index_t e = 0; e < s.E; ++e) {
      const auto k = seed + 3 * static_cast<std::uint32_t>(e);
      const moe::Matrix<float> g = random_matrix<float>(s.ff, s.d, k, 0.2), u = random_matrix<float>(s.ff, s.d, k + 1, 0.2),
                               dn = random_matrix<float>(s.d, s.ff, k + 2, 0.2);
      ef.emplace_back(g, u, dn);
      ed.emplace_back(moe::Matrix<double>(g.cast<double>()), moe::Matrix<double>(u.cast<double>()), moe::Matrix<double>(dn.cast<double>()));
    }
    const moe::Matrix<float> w = random_matrix<float>(s.E, s.d, seed + 99), x = random_matrix<float>(s.T, s.d, seed + 98),
                             dy = random_matrix<float>(s.T, s.d, seed + 97);
    const moe::TopKOptions o = moe::presets::mixtral(2);
    const moe::MoELayer lf(moe::TopKRouter<float>(w, o), ef);
    const moe::MoELayer ld(moe::TopKRouter<double>(moe::Matrix<double>(w.cast<double>()), o), ed);
    moe::TrainingWorkspace<float> wsf;
    moe::TrainingWorkspace<double> wsd;
    moe::Matrix<float> yf(s.T, s.d), dxf(s.T, s.d);
    moe::Matrix<double> yd(s.T, s.d), dxd(s.T, s.d);
    const moe::Matrix<double> xd = x.cast<double>(), dyd = dy.cast<double>();
    lf.forward_train(x, moe::RouteContext{}, yf, wsf);
    ld.forward_train(xd, moe::RouteContext{}, yd, wsd);
    REQUIRE(wsf.routing.plan.token == wsd.routing.plan.token);
    REQUIRE(wsf.routing.plan.expert_begin == wsd.routing.plan.expert_begin);
    const double y_err = (yf.cast<double>() - yd).cwiseAbs().maxCoeff(), y_scale = yd.cwiseAbs().maxCoeff();
    CAPTURE(y_err, y_scale);
    REQUIRE(y_scale > 0);
    REQUIRE(y_err <= 2e-6 * y_scale);
    auto gf = lf.make_gradients();
    auto gd = ld.make_gradients();
    lf.backward(x, dy, dxf, gf, wsf);
    ld.backward(xd, dyd, dxd, gd, wsd);
    const double dx_err = (dxf.cast<double>() - dxd).cwiseAbs().maxCoeff(), dx_scale = dxd.cwiseAbs().maxCoeff();
    CAPTURE(dx_err, dx_scale);
    REQUIRE(dx_err <= 3e-6 * dx_scale);
  }
}

TEST_CASE("Losses beyond float's range come out as +inf, with finite gradients", "[numerics][losses]") {
  // The losses sum in double and convert the result to T at the end: a double beyond float's
  // largest converts to inf (IEEE 754; clang's float-cast-overflow sanitizer, in the asan preset,
  // leaves float-to-float conversions alone for that reason and checks float-to-integer ones).
  const double float_max = static_cast<double>(std::numeric_limits<float>::max());
  moe::Matrix<float> z(2, 3);
  z << 1.0f, 2.0f, 3.0f, 3.0f, 2.0f, 1.0f;
  moe::Matrix<index_t> ids(2, 1);
  ids << 2, 0;
  moe::Matrix<float> grad(2, 3);
  // α = 3.3e38 is finite in float; the loss, α · E · Σ f_i · P_i ≈ 1.13 · α here, is not (in double below).
  const moe::AuxLossOptions big = moe::AuxLossOptions::megatron(3.3e38);
  moe::Matrix<double> grad_double(2, 3);
  const double in_double = moe::load_balancing_loss(moe::Matrix<double>(z.cast<double>()), ids, grad_double, big);
  REQUIRE(in_double > float_max);
  const float loss = moe::load_balancing_loss(z, ids, grad, big);
  CHECK(std::isinf(loss));
  CHECK(loss > 0);
  // Router z-loss: logits of 1e20 make (log Σ exp z)² ≈ 1e40; the gradient, 2·β/T · lse · softmax, stays finite.
  moe::Matrix<float> huge = moe::Matrix<float>::Constant(2, 3, 1e20f);
  const float z_loss = moe::router_z_loss(huge, grad, 1.0);
  CHECK(std::isinf(z_loss));
  CHECK(z_loss > 0);
  CHECK(grad.allFinite());
  const double lse = 1e20 + std::log(3.0);  // each row's log Σ exp (three equal logits)
  CHECK(std::abs(static_cast<double>(grad(0, 0)) - 2.0 * 1.0 / 2.0 * lse / 3.0) <= 1e-6 * lse);  // 2·β/T · lse · softmax
}

}  // namespace numerics_test
