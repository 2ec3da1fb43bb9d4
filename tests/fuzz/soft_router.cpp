// libFuzzer target: SoftRouter (routing/soft.hpp) and SoftMoELayer (layer/soft_moe_layer.hpp)
// with random shapes, slots per expert, the normalized variant, scales (ordinary, extreme,
// invalid), routing groups (valid, empty, invalid) and values that include NaN, ±Inf, ±1e30 and
// denormals.
//
// Checked: moe::invalid_argument exactly when an argument is outside its documented range;
// moe::numeric_error only with check_finite on and values that are not moderate; logits against a
// double reference; D a softmax over each group's tokens and C a softmax over the slots (entries
// in [0, 1], sums 1); batch isolation of the routing (a group routed alone, bit for bit); for the
// layer: slot inputs = D_gᵀ x_g and y = C_g Ỹ_g against double references, y finite for moderate
// values, y bit-identical when other groups' contents change, and when y aliases x.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include <moe/experts/gated_feed_forward.hpp>
#include <moe/layer/soft_moe_layer.hpp>

#include "fuzz_common.hpp"

namespace {

using namespace moe_fuzz;

template <class T>
double tolerance_scale() {
  return sizeof(T) == sizeof(float) ? 1e-4 : 1e-11;
}

template <class T>
void check_routing(const moe::SoftRouter<T>& router, const moe::ConstMatrixRef<T>& x, const std::vector<index_t>& bounds,
                   const moe::SoftRouting<T>& r, bool check_finite) {
  const index_t T_ = x.rows(), d = x.cols(), S = router.num_slots(), E = router.num_experts(), s = router.slots_per_expert();
  const index_t G = static_cast<index_t>(bounds.size()) - 1;
  MOE_FUZZ_CHECK(r.num_tokens() == T_ && r.num_experts() == E && r.slots_per_expert() == s && r.num_slots() == S);
  MOE_FUZZ_CHECK(r.num_groups() == G);
  for (index_t g = 0; g < G; ++g) MOE_FUZZ_CHECK(r.group_begin(g) == bounds[sz(g)] && r.group_end(g) == bounds[sz(g + 1)]);
  MOE_FUZZ_CHECK(r.slot_rows() == G * S && r.rows_per_expert() == G * s);
  for (index_t e = 0; e < E; ++e)
    for (index_t g = 0; g < G; ++g)
      for (index_t j = 0; j < s; ++j) {
        const index_t row = r.slot_row(e, g, j);
        MOE_FUZZ_CHECK(row >= r.expert_first_row(e) && row < r.expert_first_row(e) + r.rows_per_expert());
      }
  const auto L = r.logits();
  const auto D = r.dispatch_weights();
  const auto C = r.combine_weights();
  const bool finite = all_finite(L);
  if (check_finite) MOE_FUZZ_CHECK(finite);
  if (!finite) return;
  const double tol = tolerance_scale<T>();

  // Logits against a double reference (where x and Φ are finite).
  const auto phi = router.phi();
  const bool inputs_finite = all_finite(x) && all_finite(phi);
  const moe::SoftOptions& o = router.options();
  std::vector<double> col_scale(sz(S), o.scale);
  if (o.normalized) {
    for (index_t j = 0; j < S; ++j) {
      double sum = 0;
      for (index_t i = 0; i < d; ++i) sum += static_cast<double>(phi(i, j)) * static_cast<double>(phi(i, j));
      col_scale[sz(j)] = o.scale / std::sqrt(sum + 1e-6);
    }
  }
  // The normalized variant squares x and Φ in T: where that overflows T, T's logits legitimately
  // differ from the double reference (a row scale of 0), so they are not compared.
  bool squares_fit = true;
  for (index_t t = 0; t < T_ && o.normalized; ++t) squares_fit = squares_fit && x.row(t).template cast<double>().squaredNorm() < 1e-3 * static_cast<double>(std::numeric_limits<T>::max());
  for (index_t j = 0; j < S && o.normalized; ++j) squares_fit = squares_fit && phi.col(j).template cast<double>().squaredNorm() < 1e-3 * static_cast<double>(std::numeric_limits<T>::max());
  for (index_t t = 0; t < T_ && inputs_finite && squares_fit; ++t) {
    double row_scale = 1;
    if (o.normalized) {
      double sum = 0;
      for (index_t i = 0; i < d; ++i) sum += static_cast<double>(x(t, i)) * static_cast<double>(x(t, i));
      row_scale = 1 / std::sqrt(sum + 1e-6);
    }
    for (index_t j = 0; j < S; ++j) {
      double dot = 0, magnitude = 0;
      for (index_t i = 0; i < d; ++i) {
        dot += static_cast<double>(x(t, i)) * static_cast<double>(phi(i, j));
        magnitude += std::fabs(static_cast<double>(x(t, i)) * static_cast<double>(phi(i, j)));
      }
      const double f = row_scale * col_scale[sz(j)];
      const double expected = dot * f;
      if (!std::isfinite(expected) || !std::isfinite(magnitude * std::fabs(f))) continue;
      // Rounding relative to the terms' magnitudes, plus the absolute error of denormal products.
      const double denormal_error = static_cast<double>(d) * static_cast<double>(std::numeric_limits<T>::denorm_min()) * std::fabs(f);
      if (!(std::fabs(static_cast<double>(L(t, j)) - expected) <=
            tol * (magnitude * std::fabs(f) + std::fabs(expected)) + denormal_error + 1e-30)) {
        std::fprintf(stderr, "logit (%td, %td) = %a, reference %a; x row:", t, j, static_cast<double>(L(t, j)), expected);
        for (index_t i = 0; i < d; ++i) std::fprintf(stderr, " %a", static_cast<double>(x(t, i)));
        std::fprintf(stderr, "; phi column:");
        for (index_t i = 0; i < d; ++i) std::fprintf(stderr, " %a", static_cast<double>(phi(i, j)));
        std::fprintf(stderr, "\n");
        fail(__FILE__, __LINE__, "logit differs from the double reference");
      }
    }
  }

  // D: softmax over each group's tokens; C: softmax over the slots; against the router's logits.
  for (index_t g = 0; g < G; ++g) {
    const index_t first = bounds[sz(g)], last = bounds[sz(g + 1)];
    if (first == last) continue;
    for (index_t j = 0; j < S; ++j) {
      double m = -kInf, sum = 0, d_sum = 0;
      for (index_t t = first; t < last; ++t) m = std::max(m, static_cast<double>(L(t, j)));
      for (index_t t = first; t < last; ++t) sum += std::exp(static_cast<double>(L(t, j)) - m);
      for (index_t t = first; t < last; ++t) {
        const double v = static_cast<double>(D(t, j));
        MOE_FUZZ_CHECK(v >= 0 && v <= 1);
        MOE_FUZZ_CHECK(std::fabs(v - std::exp(static_cast<double>(L(t, j)) - m) / sum) <= tol);
        d_sum += v;
      }
      MOE_FUZZ_CHECK(std::fabs(d_sum - 1) <= tol * 4);
    }
  }
  for (index_t t = 0; t < T_; ++t) {
    double m = -kInf, sum = 0, c_sum = 0;
    for (index_t j = 0; j < S; ++j) m = std::max(m, static_cast<double>(L(t, j)));
    for (index_t j = 0; j < S; ++j) sum += std::exp(static_cast<double>(L(t, j)) - m);
    for (index_t j = 0; j < S; ++j) {
      const double v = static_cast<double>(C(t, j));
      MOE_FUZZ_CHECK(v >= 0 && v <= 1);
      MOE_FUZZ_CHECK(std::fabs(v - std::exp(static_cast<double>(L(t, j)) - m) / sum) <= tol);
      c_sum += v;
    }
    MOE_FUZZ_CHECK(std::fabs(c_sum - 1) <= tol * 4);
  }
}

template <class T>
void run(FuzzedDataProvider& fdp) {
  const index_t E = fdp.ConsumeIntegralInRange<int>(0, 31) == 0 ? 0 : size_in(fdp, 1, 8);
  const index_t s = fdp.ConsumeIntegralInRange<int>(0, 31) == 0 ? 0 : size_in(fdp, 1, 4);
  const index_t d = fdp.ConsumeIntegralInRange<int>(0, 31) == 0 ? 0 : size_in(fdp, 1, 48);
  const index_t T_ = size_in(fdp, 0, 64);
  const index_t phi_cols = fdp.ConsumeIntegralInRange<int>(0, 31) == 0 ? E * s + 1 : E * s;
  moe::SoftOptions o;
  o.slots_per_expert = s;
  o.normalized = fdp.ConsumeBool();
  o.scale = pick(fdp, {1.0, 1.0, 1.0, 0.5, 2.0, -1.0, 0.0, 10.0, 1e-30, 1e30, kDenorm, kNaN, kInf});
  o.check_finite = fdp.ConsumeIntegralInRange<int>(0, 7) != 0;
  bool valid = E >= 1 && s >= 1 && phi_cols == E * s && d >= 1 && std::isfinite(o.scale);
  bool moderate = std::fabs(o.scale) <= kModerate;
  const bool special_phi = fdp.ConsumeIntegralInRange<int>(0, 3) == 0;
  const bool special_x = fdp.ConsumeIntegralInRange<int>(0, 3) == 0;
  const moe::Matrix<T> phi = matrix<T>(fdp, d, phi_cols, special_phi, moderate);  // [d, S]
  const index_t pad = fdp.ConsumeBool() ? fdp.ConsumeIntegralInRange<index_t>(1, 3) : 0;
  const moe::Matrix<T> x_storage = matrix<T>(fdp, T_, d + pad, special_x, moderate);
  const bool wrong_width = pad > 0 && fdp.ConsumeIntegralInRange<int>(0, 31) == 0;
  const moe::ConstMatrixRef<T> x = x_storage.leftCols(wrong_width ? d + 1 : d);
  const Groups g = groups(fdp, T_);
  {
    char text[200];
    std::snprintf(text, sizeof text, "%s E=%td s=%td d=%td T=%td normalized=%d scale=%g check_finite=%d groups=%zu moderate=%d",
                  sizeof(T) == 4 ? "float" : "double", E, s, d, T_, int(o.normalized), o.scale, int(o.check_finite),
                  g.boundaries.size(), int(moderate));
    case_description() = text;
  }


  std::unique_ptr<moe::SoftRouter<T>> router;
  try {
    router = fdp.ConsumeBool() ? std::make_unique<moe::SoftRouter<T>>(moe::ConstMatrixMap<T>(phi.data(), d, phi_cols), E, o)
                               : std::make_unique<moe::SoftRouter<T>>(phi, E, o);
  } catch (const moe::invalid_argument&) {
    MOE_FUZZ_CHECK(!valid);
    return;
  }
  MOE_FUZZ_CHECK(valid);
  const bool route_valid = !wrong_width && !g.invalid;
  const std::vector<std::int64_t> no_ids;
  moe::SoftRouting<T> r;
  moe::RouteContext ctx;
  try {
    ctx = context(g, no_ids);
    router->route(x, ctx, r);
  } catch (const moe::invalid_argument&) {
    MOE_FUZZ_CHECK(!route_valid);
    return;
  } catch (const moe::numeric_error&) {
    MOE_FUZZ_CHECK(route_valid && o.check_finite && !moderate);
    return;
  }
  MOE_FUZZ_CHECK(route_valid);
  const std::vector<index_t> bounds = g.bounds(T_);
  if (moderate) MOE_FUZZ_CHECK(all_finite(r.logits()));
  check_routing(*router, x, bounds, r, o.check_finite);

  // Batch isolation of the routing: a group routed on its own, bit for bit.
  if (bounds.size() > 2) {
    const auto gi = fdp.ConsumeIntegralInRange<std::size_t>(0, bounds.size() - 2);
    const index_t begin = bounds[gi], n = bounds[gi + 1] - begin;
    moe::SoftRouting<T> alone;
    router->route(x.middleRows(begin, n), alone);
    MOE_FUZZ_CHECK(same_bits(alone.logits(), r.logits().middleRows(begin, n)));
    MOE_FUZZ_CHECK(same_bits(alone.dispatch_weights(), r.dispatch_weights().middleRows(begin, n)));
    MOE_FUZZ_CHECK(same_bits(alone.combine_weights(), r.combine_weights().middleRows(begin, n)));
  }

  // --- the layer: SwiGLU experts on the slots ----------------------------------------------------
  if (!fdp.ConsumeBool()) return;
  const index_t ff = size_in(fdp, 1, 16);
  const bool special_experts = fdp.ConsumeIntegralInRange<int>(0, 7) == 0;
  std::vector<moe::SwiGLU<T>> experts;
  for (index_t e = 0; e < E; ++e) {
    moe::Matrix<T> w_gate = matrix<T>(fdp, ff, d, special_experts, moderate);
    moe::Matrix<T> w_up = matrix<T>(fdp, ff, d, special_experts, moderate);
    moe::Matrix<T> w_down = matrix<T>(fdp, d, ff, special_experts, moderate);
    experts.emplace_back(std::move(w_gate), std::move(w_up), std::move(w_down));
  }
  const moe::SoftMoELayer<moe::SwiGLU<T>> layer(*router, experts);
  moe::SoftWorkspace<T> ws;
  moe::Matrix<T> y(T_, d);
  try {
    layer.forward(x, ctx, y, ws);
  } catch (const moe::numeric_error&) {
    MOE_FUZZ_CHECK(o.check_finite && !moderate);
    return;
  }
  if (moderate) MOE_FUZZ_CHECK(all_finite(y));
  const moe::SoftRouting<T>& lr = ws.routing;
  MOE_FUZZ_CHECK(same_bits(lr.combine_weights(), r.combine_weights()) && same_bits(lr.dispatch_weights(), r.dispatch_weights()));
  if (T_ == 0 || !all_finite(x) || !all_finite(lr.dispatch_weights()) || !all_finite(lr.combine_weights())) return;

  // Slot inputs = D_gᵀ x_g, and y = C_g · Ỹ_g, per group, against double sums.
  const index_t G = static_cast<index_t>(bounds.size()) - 1;
  const T* slots = ws.slots.data();
  const T* slot_out = ws.slot_out.data();
  const double tol = tolerance_scale<T>();
  const double overflow = 1e-3 * static_cast<double>(std::numeric_limits<T>::max());
  for (index_t gi = 0; gi < G; ++gi) {
    const index_t first = bounds[sz(gi)], last = bounds[sz(gi + 1)];
    for (index_t e = 0; e < E; ++e) {
      for (index_t j = 0; j < s; ++j) {
        const index_t row = lr.slot_row(e, gi, j), col = e * s + j;
        for (index_t i = 0; i < d; ++i) {
          double sum = 0, magnitude = 0;
          for (index_t t = first; t < last; ++t) {
            sum += static_cast<double>(lr.dispatch_weights()(t, col)) * static_cast<double>(x(t, i));
            magnitude += std::fabs(static_cast<double>(lr.dispatch_weights()(t, col)) * static_cast<double>(x(t, i)));
          }
          if (!(magnitude < overflow)) continue;  // may legitimately round to inf in T
          if (!(std::fabs(static_cast<double>(slots[row * d + i]) - sum) <= tol * magnitude + 1e-30)) {
            std::fprintf(stderr, "slot row %td (expert %td, group %td, slot %td) [%td] = %a, reference %a (magnitude %a)\n", row, e,
                         gi, j, i, static_cast<double>(slots[row * d + i]), sum, magnitude);
            fail(__FILE__, __LINE__, "slot input differs from D_g^T x_g");
          }
        }
      }
    }
    for (index_t t = first; t < last; ++t) {
      for (index_t i = 0; i < d; ++i) {
        double sum = 0, magnitude = 0;
        for (index_t e = 0; e < E; ++e)
          for (index_t j = 0; j < s; ++j) {
            const double term = static_cast<double>(lr.combine_weights()(t, e * s + j)) *
                                static_cast<double>(slot_out[lr.slot_row(e, gi, j) * d + i]);
            sum += term;
            magnitude += std::fabs(term);
          }
        if (magnitude < overflow) MOE_FUZZ_CHECK(std::fabs(static_cast<double>(y(t, i)) - sum) <= tol * magnitude + 1e-30);
      }
    }
  }

  // y may alias x.
  moe::Matrix<T> inout = x;
  moe::SoftWorkspace<T> ws2;
  layer.forward(inout, ctx, inout, ws2);
  MOE_FUZZ_CHECK(same_bits(inout, y));

  // Batch isolation of the layer: other groups' contents change, group gi's output does not.
  if (G > 1) {
    const auto gi = fdp.ConsumeIntegralInRange<index_t>(0, G - 1);
    moe::Matrix<T> x2 = x;
    for (index_t t = 0; t < T_; ++t)
      if (t < bounds[sz(gi)] || t >= bounds[sz(gi + 1)]) x2.row(t) *= T(-0.5);
    moe::Matrix<T> y2(T_, d);
    layer.forward(x2, ctx, y2, ws);  // reuses ws
    const index_t n = bounds[sz(gi + 1)] - bounds[sz(gi)];
    MOE_FUZZ_CHECK(same_bits(y2.middleRows(bounds[sz(gi)], n), y.middleRows(bounds[sz(gi)], n)));
  }
}

}  // namespace

MOE_FUZZ_FLOAT_AND_DOUBLE(run)
