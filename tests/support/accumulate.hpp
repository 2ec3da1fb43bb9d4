#pragma once
// Shared steps of the backward_accumulate tests (MoELayer and SoftMoELayer).
#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <vector>

#include <moe/moe.hpp>

namespace moe_test {

// On a batch whose forward_train `ws` holds: backward into fresh gradients, which it returns, and
// backward_accumulate onto `acc`; both must write the same dx.
template <class Layer, class Workspace>
typename Layer::Gradients backward_both_ways(const Layer& layer, const moe::Matrix<double>& x, const moe::Matrix<double>& dy,
                                             Workspace& ws, typename Layer::Gradients& acc) {
  moe::Matrix<double> dx(x.rows(), x.cols()), dx_acc(x.rows(), x.cols());
  auto fresh = layer.make_gradients();
  layer.backward(x, dy, dx, fresh, ws);
  layer.backward_accumulate(x, dy, dx_acc, acc, ws);
  CHECK(dx_acc == dx);
  return fresh;
}

// Every entry of `got` equals a + b up to rounding: within 1e-13 of the largest |a + b|.
inline void require_sums(const std::vector<double>& got, const std::vector<double>& a, const std::vector<double>& b) {
  REQUIRE(got.size() == a.size());
  REQUIRE(b.size() == a.size());
  double scale = 0;
  for (std::size_t i = 0; i < a.size(); ++i) scale = std::max(scale, std::abs(a[i] + b[i]));
  for (std::size_t i = 0; i < a.size(); ++i) REQUIRE(std::abs(got[i] - (a[i] + b[i])) <= 1e-13 * scale);
}

}  // namespace moe_test
