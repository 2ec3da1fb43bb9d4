// SoftMoELayer::backward (and SoftRouter::backward) against central finite differences in double:
// plain and normalized soft routing, with and without a scale, with routing groups, FFN and gated
// experts; backward over NaN dx and gradients with row strides; the overflow path of the normalized
// norms; and the errors of a backward without its forward or with buffers of the wrong shape.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "../support/accumulate.hpp"
#include "../support/reference.hpp"

// (A namespace of its own: this file may share a translation unit with other test files.)
namespace soft_backward_test {

using namespace moe_test;

namespace {

constexpr index_t kD = 6, kFF = 5, kTokens = 9, kExperts = 3;

struct SoftConfig {
  const char* name;
  index_t slots = 2;
  bool normalized = false;
  double scale = 1.0;
  std::vector<index_t> groups;  // routing group boundaries, empty: one group
};

// Every learned tensor of a small Soft MoE layer, owned by the test so it can be perturbed.
struct SoftParams {
  moe::Matrix<double> x, phi;
  double scale = 1.0;
  std::vector<moe::Matrix<double>> w;  // 3 per expert (gate, up, down); FFN experts use (in, -, out)
};

template <class Expert>
Expert make_soft_expert(const SoftParams& p, index_t e);
template <>
moe::SwiGLU<double> make_soft_expert(const SoftParams& p, index_t e) {
  return moe::SwiGLU<double>(moe::ConstMatrixMap<double>(p.w[std::size_t(3 * e)].data(), kFF, kD),
                             moe::ConstMatrixMap<double>(p.w[std::size_t(3 * e + 1)].data(), kFF, kD),
                             moe::ConstMatrixMap<double>(p.w[std::size_t(3 * e + 2)].data(), kD, kFF));
}
template <>
moe::FeedForward<double, moe::GELU> make_soft_expert(const SoftParams& p, index_t e) {
  return moe::FeedForward<double, moe::GELU>(moe::ConstMatrixMap<double>(p.w[std::size_t(3 * e)].data(), kFF, kD),
                                             moe::ConstMatrixMap<double>(p.w[std::size_t(3 * e + 2)].data(), kD, kFF));
}

template <class Expert>
struct SoftHarness {
  SoftConfig cfg;
  SoftParams p;
  moe::Matrix<double> probe;  // L = Σ y ⊙ probe

  explicit SoftHarness(SoftConfig c) : cfg(std::move(c)) {
    p.x = random_matrix<double>(kTokens, kD, 101);
    p.phi = random_matrix<double>(kD, kExperts * cfg.slots, 102, 0.8);
    p.scale = cfg.scale;
    for (index_t e = 0; e < kExperts; ++e) {
      p.w.push_back(random_matrix<double>(kFF, kD, 110 + std::uint32_t(e), 0.6));
      p.w.push_back(random_matrix<double>(kFF, kD, 130 + std::uint32_t(e), 0.6));
      p.w.push_back(random_matrix<double>(kD, kFF, 150 + std::uint32_t(e), 0.6));
    }
    probe = random_matrix<double>(kTokens, kD, 103);
  }

  moe::SoftMoELayer<Expert> layer() const {
    moe::SoftOptions o;
    o.slots_per_expert = cfg.slots;
    o.normalized = cfg.normalized;
    o.scale = p.scale;
    std::vector<Expert> experts;
    for (index_t e = 0; e < kExperts; ++e) experts.push_back(make_soft_expert<Expert>(p, e));
    return moe::SoftMoELayer<Expert>(
        moe::SoftRouter<double>(moe::ConstMatrixMap<double>(p.phi.data(), kD, kExperts * cfg.slots), kExperts, o), experts);
  }
  moe::RouteContext context() const {
    return cfg.groups.empty() ? moe::RouteContext{} : moe::RouteContext::with_groups(cfg.groups);
  }
  double loss() const {
    moe::SoftTrainingWorkspace<double> ws;
    moe::Matrix<double> y(kTokens, kD);
    layer().forward_train(p.x, context(), y, ws);
    return (y.array() * probe.array()).sum();
  }
};

// Central difference of the loss in `value`; returns |analytic − numeric| / max(|numeric|, 1e-2).
template <class H>
double check_entry(H& h, double& value, double analytic, const char* what, index_t index) {
  const double step = 1e-5, saved = value;
  value = saved + step;
  const double plus = h.loss();
  value = saved - step;
  const double minus = h.loss();
  value = saved;
  const double numeric = (plus - minus) / (2 * step);
  const double error = std::fabs(analytic - numeric) / std::max(std::fabs(numeric), 1e-2);
  CAPTURE(what, index, analytic, numeric, error);
  CHECK(error < 1e-6);
  return error;
}

template <class Expert>
void check_soft_gradients(const SoftConfig& cfg) {
  CAPTURE(cfg.name);
  SoftHarness<Expert> h(cfg);
  const auto l = h.layer();
  moe::SoftTrainingWorkspace<double> ws;
  moe::Matrix<double> y(kTokens, kD), dx(kTokens, kD);
  l.forward_train(h.p.x, h.context(), y, ws);
  auto grads = l.make_gradients();
  l.backward(h.p.x, h.probe, dx, grads, ws);

  // The training forward gives the inference forward's bits.
  moe::SoftWorkspace<double> plain;
  moe::Matrix<double> y_plain(kTokens, kD);
  l.forward(h.p.x, h.context(), y_plain, plain);
  REQUIRE(y_plain == y);

  double worst = 0;
  index_t checked = 0;
  auto check = [&](double& value, double analytic, const char* what, index_t index) {
    worst = std::max(worst, check_entry(h, value, analytic, what, index));
    ++checked;
  };
  for (index_t i = 0; i < h.p.x.size(); ++i) check(h.p.x.data()[i], dx.data()[i], "x", i);
  for (index_t i = 0; i < h.p.phi.size(); ++i) check(h.p.phi.data()[i], grads.phi.data()[i], "phi", i);
  check(h.p.scale, grads.scale, "scale", 0);
  for (index_t e = 0; e < kExperts; ++e) {
    std::vector<const moe::Matrix<double>*> g;
    grads.experts[std::size_t(e)].for_each([&](const moe::Matrix<double>& m) { g.push_back(&m); });
    const std::vector<int> slots = g.size() == 3 ? std::vector<int>{0, 1, 2} : std::vector<int>{0, 2};
    REQUIRE(g.size() == slots.size());
    for (std::size_t q = 0; q < slots.size(); ++q) {
      moe::Matrix<double>& w = h.p.w[std::size_t(3 * e + slots[q])];
      for (index_t i = 0; i < w.size(); ++i) check(w.data()[i], g[q]->data()[i], "expert weight", 100 * e + i);
    }
  }
  // Every gradient was compared, and none is trivially zero.
  CAPTURE(worst, checked);
  CHECK(worst < 1e-6);
  CHECK(dx.cwiseAbs().maxCoeff() > 1e-3);
  CHECK(grads.phi.cwiseAbs().maxCoeff() > 1e-3);
  CHECK(std::fabs(grads.scale) > 1e-6);
}

std::vector<SoftConfig> soft_configs() {
  std::vector<SoftConfig> c;
  c.push_back({"plain, 2 slots", 2, false, 1.0, {}});
  c.push_back({"plain, scaled, 1 slot", 1, false, 0.7, {}});
  c.push_back({"normalized, scale 1.3, 2 slots", 2, true, 1.3, {}});
  c.push_back({"normalized, scale 2.5, 1 slot", 1, true, 2.5, {}});
  c.push_back({"plain with routing groups (one empty)", 2, false, 1.0, {0, 4, 4, 9}});
  c.push_back({"normalized with routing groups", 1, true, 1.7, {0, 3, 9}});
  return c;
}

}  // namespace

TEST_CASE("Soft MoE gradients match finite differences with gated experts", "[backward][soft]") {
  for (const SoftConfig& c : soft_configs()) check_soft_gradients<moe::SwiGLU<double>>(c);
}

TEST_CASE("Soft MoE gradients match finite differences with GELU feed-forward experts", "[backward][soft]") {
  for (const SoftConfig& c : soft_configs()) check_soft_gradients<moe::FeedForward<double, moe::GELU>>(c);
}

TEST_CASE("Soft MoE backward of an empty batch gives zero gradients", "[backward][soft]") {
  SoftHarness<moe::SwiGLU<double>> h(SoftConfig{"empty", 2, true, 1.0, {}});
  const auto l = h.layer();
  moe::SoftTrainingWorkspace<double> ws;
  const moe::Matrix<double> x(0, kD), dy(0, kD);
  moe::Matrix<double> y(0, kD), dx(0, kD);
  l.forward_train(x, y, ws);  // (the overload without a RouteContext)
  auto grads = l.make_gradients();
  grads.phi.setOnes();
  grads.scale = 3;
  l.backward(x, dy, dx, grads, ws);
  CHECK(grads.phi.isZero(0));
  CHECK(grads.scale == 0);
  for (const auto& g : grads.experts) g.for_each([](const moe::Matrix<double>& m) { CHECK(m.isZero(0)); });
}

TEST_CASE("Soft MoE backward rejects a missing forward and wrong shapes", "[backward][soft][errors]") {
  SoftHarness<moe::SwiGLU<double>> h(SoftConfig{"errors", 2, true, 1.0, {}});
  const auto l = h.layer();
  moe::SoftTrainingWorkspace<double> ws;
  moe::Matrix<double> y(kTokens, kD), dx = moe::Matrix<double>::Constant(kTokens, kD, 7.0);
  auto grads = l.make_gradients();
  REQUIRE_THROWS_AS(l.backward(h.p.x, h.probe, dx, grads, ws), moe::invalid_argument);
  REQUIRE_THROWS_WITH(l.backward(h.p.x, h.probe, dx, grads, ws),
                      Catch::Contains("SoftMoELayer::backward") && Catch::Contains("workspace tokens = -1") &&
                          Catch::Contains("x.rows() = 9"));
  l.forward_train(h.p.x, moe::RouteContext{}, y, ws);
  REQUIRE_THROWS_WITH(l.backward(h.p.x.topRows(4), h.probe.topRows(4), dx, grads, ws), Catch::Contains("workspace tokens = 9") &&
                                                                                      Catch::Contains("x.rows() = 4"));
  moe::Matrix<double> narrow(kTokens, kD - 1);
  REQUIRE_THROWS_WITH(l.backward(h.p.x, narrow, dx, grads, ws), Catch::Contains("dy.cols() = 5") && Catch::Contains("d_model = 6"));
  REQUIRE_THROWS_WITH(l.backward(h.p.x, h.probe, narrow, grads, ws), Catch::Contains("dx.cols() = 5"));
  moe::Matrix<double> short_rows(kTokens - 1, kD);
  REQUIRE_THROWS_WITH(l.backward(h.p.x, short_rows, dx, grads, ws), Catch::Contains("dy.rows() = 8") && Catch::Contains("x.rows() = 9"));

  auto bad = grads;
  bad.phi.resize(kD, 2);
  REQUIRE_THROWS_WITH(l.backward(h.p.x, h.probe, dx, bad, ws), Catch::Contains("grads.phi.cols() = 2") && Catch::Contains("num_slots = 6"));
  bad = grads;
  bad.phi.resize(kD + 1, kExperts * 2);
  REQUIRE_THROWS_WITH(l.backward(h.p.x, h.probe, dx, bad, ws), Catch::Contains("grads.phi.rows() = 7") && Catch::Contains("d_model = 6"));
  bad = grads;
  bad.experts.pop_back();
  REQUIRE_THROWS_WITH(l.backward(h.p.x, h.probe, dx, bad, ws), Catch::Contains("grads.experts.size() = 2") && Catch::Contains("experts = 3"));
  bad = grads;
  bad.experts[1].w_up.resize(1, 1);
  REQUIRE_THROWS_WITH(l.backward(h.p.x, h.probe, dx, bad, ws),
                      Catch::Contains("grads.experts[1]") && Catch::Contains("[5x6, 1x1, 6x5]") && Catch::Contains("[5x6, 5x6, 6x5]"));
  // A rejected call leaves its outputs untouched.
  CHECK((dx.array() == 7.0).all());
  // A plain forward on the training workspace (same token count) invalidates it for backward.
  REQUIRE_NOTHROW(l.backward(h.p.x, h.probe, dx, grads, ws));
  const moe::Matrix<double> other = -h.p.x;
  l.forward(other, y, ws);
  REQUIRE_THROWS_WITH(l.backward(other, h.probe, dx, grads, ws), Catch::Contains("workspace tokens = -1"));

  // The router's backward checks its own buffers.
  moe::Matrix<double> dphi(kD, 5), dx_router(kTokens, kD);
  const moe::Matrix<double> dD(kTokens, kExperts * 2), dC(kTokens, kExperts * 2);
  REQUIRE_THROWS_WITH(l.router().backward(h.p.x, ws.routing, dD.data(), dC.data(), dx_router, dphi),
                      Catch::Contains("SoftRouter::backward") && Catch::Contains("dphi.cols() = 5") && Catch::Contains("num_slots = 6"));
}

TEST_CASE("Soft MoE backward refuses a workspace laid out for another layer, and a routing whose route threw",
          "[backward][soft][errors]") {
  const SoftHarness<moe::SwiGLU<double>> two_slots(SoftConfig{"two slots", 2, true, 1.0, {}});
  const SoftHarness<moe::SwiGLU<double>> one_slot(SoftConfig{"one slot", 1, true, 1.0, {}});
  const SoftHarness<moe::FeedForward<double, moe::GELU>> ffn(SoftConfig{"FFN experts", 2, true, 1.0, {}});
  const auto layer = two_slots.layer();
  auto grads = layer.make_gradients();
  moe::Matrix<double> y(kTokens, kD), dx = moe::Matrix<double>::Constant(kTokens, kD, 7.0);
  moe::SoftTrainingWorkspace<double> ws;
  // Same tokens and width, other slot count: the slot buffers have other sizes.
  one_slot.layer().forward_train(one_slot.p.x, moe::RouteContext{}, y, ws);
  REQUIRE_THROWS_WITH(layer.backward(two_slots.p.x, two_slots.probe, dx, grads, ws),
                      Catch::Contains("SoftMoELayer::backward") && Catch::Contains("does not fit this layer") &&
                          Catch::Contains("workspace: tokens = 9, d_model = 6, experts = 3, slots per expert = 1, rows = 3") &&
                          Catch::Contains("this layer: tokens = 9, d_model = 6, experts = 3, slots per expert = 2") &&
                          Catch::Contains("they differ in slots per expert (workspace 1, this layer 2), saved values (workspace " +
                                          std::to_string(kExperts * 2 * kFF) + ", this layer none), router fingerprint (workspace "));
  // Same slots, other experts: FFN experts save d_ff values per slot row, gated ones 2·d_ff.
  ffn.layer().forward_train(ffn.p.x, moe::RouteContext{}, y, ws);
  REQUIRE_THROWS_WITH(layer.backward(two_slots.p.x, two_slots.probe, dx, grads, ws),
                      Catch::Contains("saved values = " + std::to_string(kExperts * 2 * kFF)) &&
                          Catch::Contains("saved values = " + std::to_string(kExperts * 2 * 2 * kFF)));
  CHECK((dx.array() == 7.0).all());
  layer.forward_train(two_slots.p.x, moe::RouteContext{}, y, ws);
  REQUIRE_NOTHROW(layer.backward(two_slots.p.x, two_slots.probe, dx, grads, ws));

  // A route that throws leaves an empty routing, which the router's backward refuses (before, it
  // kept D and C of the earlier batch beside the new logits and gave wrong gradients).
  moe::Matrix<double> bad = two_slots.p.x;
  bad(2, 1) = std::numeric_limits<double>::quiet_NaN();
  REQUIRE_THROWS_AS(layer.router().route(bad, ws.routing), moe::numeric_error);
  REQUIRE(ws.routing.num_tokens() == 0);
  moe::Matrix<double> dphi(kD, kExperts * 2), dx_router(kTokens, kD);
  const moe::Matrix<double> dD(kTokens, kExperts * 2), dC(kTokens, kExperts * 2);
  REQUIRE_THROWS_WITH(layer.router().backward(two_slots.p.x, ws.routing, dD.data(), dC.data(), dx_router, dphi),
                      Catch::Contains("routing.num_tokens() = 0") && Catch::Contains("x.rows() = 9"));
  // ... and the layer's backward refuses the workspace routed into since its forward_train.
  REQUIRE_THROWS_WITH(layer.backward(two_slots.p.x, two_slots.probe, dx, grads, ws),
                      Catch::Contains("does not fit this layer") && Catch::Contains("workspace: tokens = 9") &&
                          Catch::Contains("this layer: tokens = 0"));
  // Routed into since by another batch of the same shape: only the route count differs (backward
  // would pair the new D and C with the old batch's slot activations).
  layer.forward_train(two_slots.p.x, moe::RouteContext{}, y, ws);
  const std::string route = std::to_string(ws.routing.route_count());
  layer.router().route(moe::Matrix<double>(-two_slots.p.x), ws.routing);
  const std::string next = std::to_string(ws.routing.route_count());
  REQUIRE_THROWS_WITH(layer.backward(two_slots.p.x, two_slots.probe, dx, grads, ws),
                      Catch::Contains("does not fit this layer") && Catch::Contains("route = " + route + ", router") &&
                          Catch::Contains("route = " + next + ", router"));
}

TEST_CASE("Soft MoE backward refuses a dx that shares memory with x or dy", "[backward][soft][errors]") {
  const SoftHarness<moe::SwiGLU<double>> h(SoftConfig{"aliasing", 2, true, 1.0, {}});
  const auto layer = h.layer();
  auto grads = layer.make_gradients();
  moe::SoftTrainingWorkspace<double> ws;
  moe::Matrix<double> x = h.p.x, dy = h.probe, y(kTokens, kD);
  layer.forward_train(x, moe::RouteContext{}, y, ws);
  const moe::Matrix<double> x_before = x, dy_before = dy;
  REQUIRE_THROWS_WITH(layer.backward(x, dy, dy, grads, ws),
                      Catch::Contains("SoftMoELayer::backward: dx must not share memory with dy"));
  REQUIRE_THROWS_WITH(layer.backward(x, dy, x, grads, ws), Catch::Contains("SoftMoELayer::backward: dx must not share memory with x"));
  CHECK(x == x_before);
  CHECK(dy == dy_before);
  moe::Matrix<double> dphi(kD, kExperts * 2);
  const moe::Matrix<double> dD(kTokens, kExperts * 2), dC(kTokens, kExperts * 2);
  REQUIRE_THROWS_WITH(layer.router().backward(x, ws.routing, dD.data(), dC.data(), x, dphi),
                      Catch::Contains("SoftRouter::backward: dx must not share memory with x"));
  CHECK(x == x_before);
  moe::Matrix<double> dx(kTokens, kD);
  REQUIRE_NOTHROW(layer.backward(x, dy, dx, grads, ws));
}

TEST_CASE("Soft MoE backward refuses a routing made before set_scale", "[backward][soft][errors]") {
  // set_scale is an optimizer step, taken after backward. Between forward_train and backward it
  // paired the old logits with the new scale's derivatives: dx and dΦ were ~2% off, silently.
  const SoftHarness<moe::SwiGLU<double>> h(SoftConfig{"scale", 2, true, 1.5, {}});
  auto layer = h.layer();
  auto grads = layer.make_gradients();
  moe::SoftTrainingWorkspace<double> ws;
  const moe::Matrix<double> untouched = moe::Matrix<double>::Constant(kTokens, kD, 7.0);
  moe::Matrix<double> y(kTokens, kD), dx = untouched;
  layer.forward_train(h.p.x, moe::RouteContext{}, y, ws);
  REQUIRE(ws.routing.scale() == 1.5);
  layer.set_scale(2.0);
  REQUIRE_THROWS_WITH(layer.backward(h.p.x, h.probe, dx, grads, ws),
                      Catch::Contains("SoftMoELayer::backward: the router's scale changed after the route (routing's scale = 1.5, "
                                      "router's scale = 2); call set_scale after backward"));
  CHECK(dx == untouched);
  moe::Matrix<double> dphi = moe::Matrix<double>::Zero(kD, kExperts * 2), dx_router = moe::Matrix<double>::Zero(kTokens, kD);
  const moe::Matrix<double> dD = moe::Matrix<double>::Ones(kTokens, kExperts * 2), dC = dD;
  REQUIRE_THROWS_WITH(layer.router().backward(h.p.x, ws.routing, dD.data(), dC.data(), dx_router, dphi),
                      Catch::Contains("SoftRouter::backward: the router's scale changed after the route"));
  layer.set_scale(1.5);  // back to the routing's scale: the step goes through
  REQUIRE_NOTHROW(layer.backward(h.p.x, h.probe, dx, grads, ws));
}

// Normalized routing depends on x and Φ only through x̂ and Φ̂ (up to eps = 1e-6 in the norms,
// negligible from norms of 1e6 on): logits(c·x, Φ) = logits(x, c·Φ) = logits(x, Φ), so ∂/∂x at c·x is
// ∂/∂x at x divided by c, and likewise for Φ. With c large enough that Σx² (or a column's ΣΦ²)
// overflows the scalar (a norm above ~1.8e19 in float, ~1.3e154 in double) this held only up to
// the overflow: the logits collapsed to 0 and the gradients with them. (Scaled so far that x·Φ
// itself overflows, the logits are not finite and check_finite throws.)
TEMPLATE_TEST_CASE("Normalized Soft routing: logits and gradients of huge x rows or Φ columns follow from moderate ones",
                   "[backward][soft][numeric]", float, double) {
  using T = TestType;
  const T big = std::is_same<T, float>::value ? T(1e25) : T(1e200), moderate = T(1e6);
  const index_t S = kExperts * 2;
  const moe::Matrix<T> x = random_matrix<T>(kTokens, kD, 201), phi = random_matrix<T>(kD, S, 202);
  const moe::Matrix<T> dD = random_matrix<T>(kTokens, S, 203), dC = random_matrix<T>(kTokens, S, 204);
  REQUIRE(!std::isfinite((big * x).row(0).squaredNorm()));  // the case: the sum of squares overflows
  moe::SoftOptions o;
  o.slots_per_expert = 2;
  o.normalized = true;
  o.scale = 1.5;
  const double tol = std::is_same<T, float>::value ? 1e-5 : 1e-13;
  // The reference: x and Φ both scaled by 1e6.
  const moe::Matrix<T> x_ref = moderate * x;
  const moe::SoftRouter<T> router(moe::Matrix<T>(moderate * phi), kExperts, o);
  moe::SoftRouting<T> reference;
  router.route(x_ref, reference);
  moe::Matrix<T> dx = moe::Matrix<T>::Zero(kTokens, kD), dphi = moe::Matrix<T>::Zero(kD, S);
  const T dscale = router.backward(x_ref, reference, dD.data(), dC.data(), dx, dphi);
  const double dx_norm = dx.template cast<double>().norm(), dphi_norm = dphi.template cast<double>().norm();
  REQUIRE(dx_norm > 0);
  REQUIRE(dphi_norm > 0);
  for (const bool scale_x : {true, false}) {
    CAPTURE(scale_x);
    const T cx = scale_x ? big : moderate, cphi = scale_x ? moderate : big;
    const moe::Matrix<T> x_scaled = cx * x;
    const moe::SoftRouter<T> scaled_router(moe::Matrix<T>(cphi * phi), kExperts, o);
    moe::SoftRouting<T> scaled;
    scaled_router.route(x_scaled, scaled);
    for (index_t t = 0; t < kTokens; ++t) {
      for (index_t j = 0; j < S; ++j) {
        CAPTURE(t, j);
        REQUIRE(std::abs(double(scaled.logits()(t, j)) - double(reference.logits()(t, j))) <= tol * o.scale);
      }
    }
    moe::Matrix<T> dx_scaled = moe::Matrix<T>::Zero(kTokens, kD), dphi_scaled = moe::Matrix<T>::Zero(kD, S);
    const T dscale_scaled = scaled_router.backward(x_scaled, scaled, dD.data(), dC.data(), dx_scaled, dphi_scaled);
    REQUIRE(std::abs(double(dscale_scaled) - double(dscale)) <= tol * 10 * std::max(1.0, std::abs(double(dscale))));
    // The gradients at the scaled point times the scale ratio (in double: it may overflow T).
    const double rx = double(cx) / double(moderate), rphi = double(cphi) / double(moderate);
    REQUIRE((dx_scaled.template cast<double>() * rx - dx.template cast<double>()).norm() <= tol * 10 * dx_norm);
    REQUIRE((dphi_scaled.template cast<double>() * rphi - dphi.template cast<double>()).norm() <= tol * 10 * dphi_norm);
  }
  // Both scaled: x·Φ itself overflows before it is normalized, and check_finite says so (README).
  const moe::SoftRouter<T> both_big(moe::Matrix<T>(big * phi), kExperts, o);
  moe::SoftRouting<T> overflowed;
  REQUIRE_THROWS_AS(both_big.route(moe::Matrix<T>(big * x), overflowed), moe::numeric_error);
}

// The overflow path takes a Φ column's largest entry from that column (stride S), not from the d
// values that follow its first entry in memory. Here one column is huge with a first entry of 0 and
// its neighbours are moderate, so those d values are all moderate: a divisor taken from them would
// leave (entry / divisor)² overflowing and the column's logits collapsing to 0. Logits and
// gradients must follow from the same column scaled only to 1e6, as in the test above.
TEMPLATE_TEST_CASE("Normalized Soft routing: a huge Φ column is rescaled by its own largest entry, whatever lies beside it",
                   "[backward][soft][numeric]", float, double) {
  using T = TestType;
  const T big = std::is_same<T, float>::value ? T(1e25) : T(1e200), moderate = T(1e6);
  const index_t S = kExperts * 2, huge = 2;
  const moe::Matrix<T> x = random_matrix<T>(kTokens, kD, 211);
  const moe::Matrix<T> dD = random_matrix<T>(kTokens, S, 213), dC = random_matrix<T>(kTokens, S, 214);
  moe::Matrix<T> w = random_matrix<T>(kD, S, 212);
  w(0, huge) = T(0);
  moe::Matrix<T> phi_big = w, phi_ref = w;
  phi_big.col(huge) *= big;
  phi_ref.col(huge) *= moderate;
  REQUIRE(!std::isfinite(phi_big.col(huge).squaredNorm()));  // the case: the column's sum of squares overflows
  for (index_t i = 0; i < kD; ++i) REQUIRE(std::abs(phi_big.data()[huge + i]) <= T(1));  // and what follows its start is moderate
  moe::SoftOptions o;
  o.slots_per_expert = 2;
  o.normalized = true;
  o.scale = 1.5;
  const double tol = std::is_same<T, float>::value ? 1e-5 : 1e-13;
  const moe::SoftRouter<T> ref_router(phi_ref, kExperts, o), big_router(phi_big, kExperts, o);
  moe::SoftRouting<T> ref, scaled;
  ref_router.route(x, ref);
  big_router.route(x, scaled);
  REQUIRE(ref.logits().col(huge).cwiseAbs().maxCoeff() > T(0.1));  // the column's logits are far from 0
  for (index_t t = 0; t < kTokens; ++t) {
    for (index_t j = 0; j < S; ++j) {
      CAPTURE(t, j);
      CHECK(std::abs(double(scaled.logits()(t, j)) - double(ref.logits()(t, j))) <= tol * o.scale);
    }
  }
  moe::Matrix<T> dx_ref = moe::Matrix<T>::Zero(kTokens, kD), dphi_ref = moe::Matrix<T>::Zero(kD, S);
  moe::Matrix<T> dx_big = moe::Matrix<T>::Zero(kTokens, kD), dphi_big = moe::Matrix<T>::Zero(kD, S);
  const T dscale_ref = ref_router.backward(x, ref, dD.data(), dC.data(), dx_ref, dphi_ref);
  const T dscale_big = big_router.backward(x, scaled, dD.data(), dC.data(), dx_big, dphi_big);
  CHECK(std::abs(double(dscale_big) - double(dscale_ref)) <= tol * 10 * std::max(1.0, std::abs(double(dscale_ref))));
  const double dx_norm = dx_ref.template cast<double>().norm();
  REQUIRE(dx_norm > 0);
  CHECK((dx_big.template cast<double>() - dx_ref.template cast<double>()).norm() <= tol * 10 * dx_norm);
  // ∂/∂Φ of the huge column is that of the moderate one divided by big / moderate (in double: it may underflow T).
  moe::Matrix<double> dphi_big_d = dphi_big.template cast<double>();
  dphi_big_d.col(huge) *= double(big) / double(moderate);
  const double dphi_norm = dphi_ref.template cast<double>().norm();
  REQUIRE(dphi_norm > 0);
  CHECK((dphi_big_d - dphi_ref.template cast<double>()).norm() <= tol * 10 * dphi_norm);
}

// backward writes dx and the gradients whole: over NaN in every one of them, and with x, dy and dx
// rows further apart than d (the gaps hold other values, which must be neither read nor written),
// it gives the bits of contiguous buffers and fresh gradients.
TEST_CASE("Soft MoE backward over NaN dx and gradients, with row strides, gives the bits of contiguous buffers", "[backward][soft]") {
  SoftHarness<moe::SwiGLU<double>> h(SoftConfig{"strided", 2, true, 1.3, {0, 4, 9}});
  const auto l = h.layer();
  moe::SoftTrainingWorkspace<double> ws;
  moe::Matrix<double> y(kTokens, kD), dx(kTokens, kD);
  l.forward_train(h.p.x, h.context(), y, ws);
  auto grads = l.make_gradients();
  l.backward(h.p.x, h.probe, dx, grads, ws);

  const double nan = std::numeric_limits<double>::quiet_NaN();
  moe::Matrix<double> wide_x = moe::Matrix<double>::Constant(kTokens, kD + 3, 5.0);
  moe::Matrix<double> wide_dy = moe::Matrix<double>::Constant(kTokens, kD + 2, -4.0);
  moe::Matrix<double> wide_dx = moe::Matrix<double>::Constant(kTokens, kD + 1, nan);
  wide_x.leftCols(kD) = h.p.x;
  wide_dy.leftCols(kD) = h.probe;
  moe::SoftTrainingWorkspace<double> ws_strided;
  moe::Matrix<double> y_strided(kTokens, kD);
  l.forward_train(wide_x.leftCols(kD), h.context(), y_strided, ws_strided);
  REQUIRE(y_strided == y);
  auto stale = l.make_gradients();
  stale.phi.setConstant(nan);
  stale.scale = nan;
  for (auto& e : stale.experts) e.for_each([&](moe::Matrix<double>& m) { m.setConstant(nan); });
  l.backward(wide_x.leftCols(kD), wide_dy.leftCols(kD), wide_dx.leftCols(kD), stale, ws_strided);
  CHECK(moe::Matrix<double>(wide_dx.leftCols(kD)) == dx);
  CHECK(wide_dx.rightCols(1).array().isNaN().all());  // the gap untouched
  CHECK(stale.phi == grads.phi);
  CHECK(stale.scale == grads.scale);
  for (std::size_t e = 0; e < grads.experts.size(); ++e) {
    std::vector<moe::Matrix<double>> got, want;
    stale.experts[e].for_each([&](const moe::Matrix<double>& m) { got.push_back(m); });
    grads.experts[e].for_each([&](const moe::Matrix<double>& m) { want.push_back(m); });
    CHECK(got == want);
  }
}

TEST_CASE("Soft MoE backward_accumulate adds each batch's gradients; from zero it gives backward's bits", "[backward][soft]") {
  SoftHarness<moe::SwiGLU<double>> h(SoftConfig{"accumulate", 2, true, 1.3, {0, 4, 9}});
  const auto l = h.layer();
  auto flat = [](const auto& g) {
    std::vector<double> v(g.phi.data(), g.phi.data() + g.phi.size());
    v.push_back(g.scale);
    for (const auto& e : g.experts) e.for_each([&](const moe::Matrix<double>& m) { v.insert(v.end(), m.data(), m.data() + m.size()); });
    return v;
  };
  moe::SoftTrainingWorkspace<double> ws_a, ws_b;
  moe::Matrix<double> y(kTokens, kD), dx(kTokens, kD);
  l.forward_train(h.p.x, h.context(), y, ws_a);
  auto acc = l.make_gradients();  // zeros
  const auto over_a = backward_both_ways(l, h.p.x, h.probe, ws_a, acc);
  CHECK(flat(acc) == flat(over_a));

  const moe::Matrix<double> x_b = 0.7 * h.p.x.topRows(3), dy_b = h.probe.bottomRows(3);
  moe::Matrix<double> y_b(3, kD);
  l.forward_train(x_b, moe::RouteContext{}, y_b, ws_b);
  const auto over_b = backward_both_ways(l, x_b, dy_b, ws_b, acc);
  const std::vector<double> got = flat(acc);
  require_sums(got, flat(over_a), flat(over_b));

  // An empty batch adds nothing; errors name the function.
  const moe::Matrix<double> none(0, kD);
  moe::Matrix<double> y0(0, kD), dx0(0, kD);
  l.forward_train(none, moe::RouteContext{}, y0, ws_b);
  l.backward_accumulate(none, none, dx0, acc, ws_b);
  CHECK(flat(acc) == got);
  REQUIRE_THROWS_WITH(l.backward_accumulate(h.p.x, h.probe, dx, acc, ws_b),
                      Catch::Contains("SoftMoELayer::backward_accumulate") && Catch::Contains("workspace tokens = 0"));
}

}  // namespace soft_backward_test
