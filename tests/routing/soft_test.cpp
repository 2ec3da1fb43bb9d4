// Soft MoE: SoftRouter, soft dispatch/combine and SoftMoELayer against a plain double reference.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <type_traits>
#include <vector>

#include <catch2/catch.hpp>
#include <moe/moe.hpp>

// (A namespace of its own: this file may share a translation unit with other test files.)
namespace soft_test {

namespace {

using moe::index_t;
template <class T>
using Mat = moe::Matrix<T>;
using MatD = moe::Matrix<double>;

template <class T>
double tolerance() {
  return std::is_same<T, float>::value ? 1e-5 : 1e-12;
}

template <class T>
Mat<T> random_matrix(std::mt19937& rng, index_t rows, index_t cols, double scale = 1.0) {
  std::uniform_real_distribution<double> u(-scale, scale);
  Mat<T> m(rows, cols);
  for (index_t i = 0; i < rows; ++i) {
    for (index_t j = 0; j < cols; ++j) m(i, j) = static_cast<T>(u(rng));
  }
  return m;
}

template <class Derived>
MatD to_double(const Eigen::MatrixBase<Derived>& m) {
  MatD out(m.rows(), m.cols());
  for (index_t i = 0; i < m.rows(); ++i) {
    for (index_t j = 0; j < m.cols(); ++j) out(i, j) = static_cast<double>(m(i, j));
  }
  return out;
}

// max |got - want| / max(max |want|, tiny): the error relative to the size of the result.
template <class Derived>
double relative_error(const Eigen::MatrixBase<Derived>& got, const MatD& want) {
  REQUIRE(got.rows() == want.rows());
  REQUIRE(got.cols() == want.cols());
  double diff = 0.0;
  double size = std::numeric_limits<double>::min();
  for (index_t i = 0; i < want.rows(); ++i) {
    for (index_t j = 0; j < want.cols(); ++j) {
      diff = std::max(diff, std::abs(static_cast<double>(got(i, j)) - want(i, j)));
      size = std::max(size, std::abs(want(i, j)));
    }
  }
  return diff / size;
}

// max |got - want| / max |magnitude|: the error relative to the size of the terms that were summed
// (the same computation on absolute values), which cancellation in the result cannot shrink.
template <class Derived>
double scaled_error(const Eigen::MatrixBase<Derived>& got, const MatD& want, const MatD& magnitude) {
  REQUIRE(got.rows() == want.rows());
  REQUIRE(got.cols() == want.cols());
  double diff = 0.0;
  for (index_t i = 0; i < want.rows(); ++i) {
    for (index_t j = 0; j < want.cols(); ++j) diff = std::max(diff, std::abs(static_cast<double>(got(i, j)) - want(i, j)));
  }
  return diff / std::max(magnitude.cwiseAbs().maxCoeff(), std::numeric_limits<double>::min());
}

// Group boundaries {0, ..., T} with `groups` groups, empty groups allowed.
std::vector<index_t> random_bounds(std::mt19937& rng, index_t tokens, index_t groups) {
  std::uniform_int_distribution<index_t> cut(0, tokens);
  std::vector<index_t> b{0};
  for (index_t g = 1; g < groups; ++g) b.push_back(cut(rng));
  b.push_back(tokens);
  std::sort(b.begin(), b.end());
  return b;
}

// ---- the plain double reference ----------------------------------------------------------------

struct SoftReference {
  MatD logits;    // [T, S]
  MatD dispatch;  // [T, S]
  MatD combine;   // [T, S]
};

SoftReference reference_route(const MatD& x, const MatD& phi, bool normalized, double scale,
                              const std::vector<index_t>& bounds) {
  const index_t T = x.rows();
  const index_t d = x.cols();
  const index_t S = phi.cols();
  SoftReference r{MatD(T, S), MatD(T, S), MatD(T, S)};
  MatD xn = x;
  MatD pn = phi;
  if (normalized) {
    for (index_t t = 0; t < T; ++t) {
      double sq = 0.0;
      for (index_t i = 0; i < d; ++i) sq += x(t, i) * x(t, i);
      for (index_t i = 0; i < d; ++i) xn(t, i) = x(t, i) / std::sqrt(sq + 1e-6);
    }
    for (index_t j = 0; j < S; ++j) {
      double sq = 0.0;
      for (index_t i = 0; i < d; ++i) sq += phi(i, j) * phi(i, j);
      for (index_t i = 0; i < d; ++i) pn(i, j) = phi(i, j) / std::sqrt(sq + 1e-6);
    }
  }
  for (index_t t = 0; t < T; ++t) {
    for (index_t j = 0; j < S; ++j) {
      double acc = 0.0;
      for (index_t i = 0; i < d; ++i) acc += xn(t, i) * pn(i, j);
      r.logits(t, j) = scale * acc;
    }
  }
  for (std::size_t g = 0; g + 1 < bounds.size(); ++g) {
    for (index_t j = 0; j < S; ++j) {
      double m = -std::numeric_limits<double>::infinity();
      for (index_t t = bounds[g]; t < bounds[g + 1]; ++t) m = std::max(m, r.logits(t, j));
      double sum = 0.0;
      for (index_t t = bounds[g]; t < bounds[g + 1]; ++t) sum += std::exp(r.logits(t, j) - m);
      for (index_t t = bounds[g]; t < bounds[g + 1]; ++t) r.dispatch(t, j) = std::exp(r.logits(t, j) - m) / sum;
    }
  }
  for (index_t t = 0; t < T; ++t) {
    double m = -std::numeric_limits<double>::infinity();
    for (index_t j = 0; j < S; ++j) m = std::max(m, r.logits(t, j));
    double sum = 0.0;
    for (index_t j = 0; j < S; ++j) sum += std::exp(r.logits(t, j) - m);
    for (index_t j = 0; j < S; ++j) r.combine(t, j) = std::exp(r.logits(t, j) - m) / sum;
  }
  return r;
}

// One row through an expert, in double.
// With `magnitude`, the same sums over absolute values (x must then be non-negative), the
// activation replaced by a bound on it: the scale of the rounding error of the real computation.
template <class T>
std::vector<double> reference_expert(const moe::SwiGLU<T>& e, const std::vector<double>& x, bool magnitude = false) {
  MatD wg = to_double(e.w_gate()), wu = to_double(e.w_up()), wd = to_double(e.w_down());
  if (magnitude) {
    wg = wg.cwiseAbs();
    wu = wu.cwiseAbs();
    wd = wd.cwiseAbs();
  }
  std::vector<double> h(static_cast<std::size_t>(e.d_ff())), y(static_cast<std::size_t>(e.d_model()));
  for (index_t f = 0; f < e.d_ff(); ++f) {
    double g = 0.0, u = 0.0;
    for (index_t i = 0; i < e.d_model(); ++i) {
      g += wg(f, i) * x[static_cast<std::size_t>(i)];
      u += wu(f, i) * x[static_cast<std::size_t>(i)];
    }
    h[static_cast<std::size_t>(f)] = magnitude ? g * u : g / (1.0 + std::exp(-g)) * u;  // |silu(g)| <= |g|
  }
  for (index_t i = 0; i < e.d_model(); ++i) {
    double acc = 0.0;
    for (index_t f = 0; f < e.d_ff(); ++f) acc += wd(i, f) * h[static_cast<std::size_t>(f)];
    y[static_cast<std::size_t>(i)] = acc;
  }
  return y;
}

template <class T>
std::vector<double> reference_expert(const moe::FeedForward<T, moe::ReLU>& e, const std::vector<double>& x,
                                     bool magnitude = false) {
  MatD wi = to_double(e.w_in()), wo = to_double(e.w_out());
  if (magnitude) {
    wi = wi.cwiseAbs();
    wo = wo.cwiseAbs();
  }
  std::vector<double> h(static_cast<std::size_t>(e.d_ff())), y(static_cast<std::size_t>(e.d_model()));
  for (index_t f = 0; f < e.d_ff(); ++f) {
    double a = 0.0;
    for (index_t i = 0; i < e.d_model(); ++i) a += wi(f, i) * x[static_cast<std::size_t>(i)];
    h[static_cast<std::size_t>(f)] = a > 0.0 ? a : 0.0;
  }
  for (index_t i = 0; i < e.d_model(); ++i) {
    double acc = 0.0;
    for (index_t f = 0; f < e.d_ff(); ++f) acc += wo(i, f) * h[static_cast<std::size_t>(f)];
    y[static_cast<std::size_t>(i)] = acc;
  }
  return y;
}

// y [T, d]: per group, slot inputs = Σ_t D[t, j] x[t]; slot j belongs to expert j / s; y[t] =
// Σ_j C[t, j] expert(slot input j). With `magnitude`, the same over absolute values.
template <class Expert>
MatD reference_layer(const MatD& x_in, const MatD& phi, index_t s, bool normalized, double scale,
                     const std::vector<index_t>& bounds, const std::vector<Expert>& experts, bool magnitude = false) {
  const SoftReference r = reference_route(x_in, phi, normalized, scale, bounds);
  const MatD x = magnitude ? MatD(x_in.cwiseAbs()) : x_in;
  const index_t d = x.cols();
  const index_t S = phi.cols();
  MatD y = MatD::Zero(x.rows(), d);
  for (std::size_t g = 0; g + 1 < bounds.size(); ++g) {
    for (index_t j = 0; j < S; ++j) {
      std::vector<double> slot_in(static_cast<std::size_t>(d), 0.0);
      for (index_t t = bounds[g]; t < bounds[g + 1]; ++t) {
        for (index_t i = 0; i < d; ++i) slot_in[static_cast<std::size_t>(i)] += r.dispatch(t, j) * x(t, i);
      }
      const std::vector<double> slot_out = reference_expert(experts[static_cast<std::size_t>(j / s)], slot_in, magnitude);
      for (index_t t = bounds[g]; t < bounds[g + 1]; ++t) {
        for (index_t i = 0; i < d; ++i) y(t, i) += r.combine(t, j) * slot_out[static_cast<std::size_t>(i)];
      }
    }
  }
  return y;
}

template <class T>
std::vector<moe::SwiGLU<T>> make_swiglu(std::mt19937& rng, index_t E, index_t d, index_t ff) {
  std::vector<moe::SwiGLU<T>> experts;
  const double a = 1.0 / std::sqrt(static_cast<double>(d));
  const double b = 1.0 / std::sqrt(static_cast<double>(ff));
  for (index_t e = 0; e < E; ++e) {
    experts.emplace_back(random_matrix<T>(rng, ff, d, a), random_matrix<T>(rng, ff, d, a), random_matrix<T>(rng, d, ff, b));
  }
  return experts;
}

template <class T>
std::vector<moe::FeedForward<T, moe::ReLU>> make_feed_forward(std::mt19937& rng, index_t E, index_t d, index_t ff) {
  std::vector<moe::FeedForward<T, moe::ReLU>> experts;
  for (index_t e = 0; e < E; ++e) {
    experts.emplace_back(random_matrix<T>(rng, ff, d, 1.0 / std::sqrt(static_cast<double>(d))),
                         random_matrix<T>(rng, d, ff, 1.0 / std::sqrt(static_cast<double>(ff))));
  }
  return experts;
}

moe::SoftOptions soft_options(index_t slots, bool normalized, double scale = 1.0) {
  moe::SoftOptions o;
  o.slots_per_expert = slots;
  o.normalized = normalized;
  o.scale = scale;
  return o;
}

moe::RouteContext context_for(const std::vector<index_t>& bounds, bool grouped) {
  return grouped ? moe::RouteContext::with_groups(bounds) : moe::RouteContext{};
}

template <class A, class B>
bool same_bits(const A& a, const B& b) {
  if (a.rows() != b.rows() || a.cols() != b.cols()) return false;
  for (index_t i = 0; i < a.rows(); ++i) {
    for (index_t j = 0; j < a.cols(); ++j) {
      const auto x = a(i, j);
      const auto y = b(i, j);
      if (std::memcmp(&x, &y, sizeof(x)) != 0) return false;
    }
  }
  return true;
}

}  // namespace

// ---- router ------------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("SoftRouter matches the double reference, with and without groups", "[soft][routing]", float, double) {
  using T = TestType;
  const bool normalized = GENERATE(false, true);
  const bool grouped = GENERATE(false, true);
  const index_t d = GENERATE(1, 7, 16, 19);
  const index_t E = GENERATE(1, 3, 4);
  const index_t s = GENERATE(1, 2, 3);
  const index_t T_ = GENERATE(0, 1, 2, 9, 33);
  std::mt19937 rng(static_cast<unsigned>(1000 * d + 100 * E + 10 * s + T_ + (normalized ? 7 : 0)));
  const index_t S = E * s;
  const double scale = normalized ? 2.5 : 1.0;
  const Mat<T> x = random_matrix<T>(rng, T_, d);
  const Mat<T> phi = random_matrix<T>(rng, d, S, 1.0 / std::sqrt(static_cast<double>(d)));
  const std::vector<index_t> bounds = grouped ? random_bounds(rng, T_, 4) : std::vector<index_t>{0, T_};
  CAPTURE(normalized, grouped, d, E, s, T_, bounds);

  const moe::SoftRouter<T> router(phi, E, soft_options(s, normalized, scale));
  REQUIRE(router.num_slots() == S);
  REQUIRE(router.d_model() == d);
  moe::SoftRouting<T> out;
  router.route(x, context_for(bounds, grouped), out);
  REQUIRE(out.num_tokens() == T_);
  REQUIRE(out.num_slots() == S);
  REQUIRE(out.num_groups() == static_cast<index_t>(bounds.size()) - 1);

  const SoftReference ref = reference_route(to_double(x), to_double(phi), normalized, scale, bounds);
  if (T_ > 0) {
    CHECK(relative_error(out.logits(), ref.logits) <= tolerance<T>());
    CHECK(relative_error(out.dispatch_weights(), ref.dispatch) <= tolerance<T>());
    CHECK(relative_error(out.combine_weights(), ref.combine) <= tolerance<T>());
  }

  // Invariants: D columns sum to 1 within each non-empty group, C rows sum to 1.
  for (std::size_t g = 0; g + 1 < bounds.size(); ++g) {
    if (bounds[g] == bounds[g + 1]) continue;
    for (index_t j = 0; j < S; ++j) {
      double sum = 0.0;
      for (index_t t = bounds[g]; t < bounds[g + 1]; ++t) sum += static_cast<double>(out.dispatch_weights()(t, j));
      CHECK(std::abs(sum - 1.0) <= 10 * tolerance<T>());
    }
  }
  for (index_t t = 0; t < T_; ++t) {
    double sum = 0.0;
    for (index_t j = 0; j < S; ++j) sum += static_cast<double>(out.combine_weights()(t, j));
    CHECK(std::abs(sum - 1.0) <= 10 * tolerance<T>());
  }
}

// Over enough slots that dΦ = xᵀ · dP packs x into the router's scratch (simd::tn_packs_x: three
// column panels or more, 129 slots on AVX-512 in float), backward still adds the reference's dΦ and
// dx (plain logits, two groups): dP = scale · dL with dL through both softmaxes, in double.
TEMPLATE_TEST_CASE("SoftRouter::backward over many slots, x packed for dΦ, matches the double reference",
                   "[soft][routing][backward]", float, double) {
  using T = TestType;
  using Arch = moe::simd::default_arch;
  constexpr auto panel = static_cast<index_t>(moe::simd::nn_panel_columns<Arch, T>());
  // 200 tokens: deeper than one depth chunk; d = 32: more rows of dΦ than bands take (kNNBandTokens).
  const index_t T_ = 200, d = 32, S = 3 * panel + 1;
  const double scale = 1.5;
  REQUIRE(moe::simd::tn_packs_x<Arch, T>(std::size_t(T_), std::size_t(d), std::size_t(S), std::size_t(d)));
  std::mt19937 rng(57);
  const Mat<T> x = random_matrix<T>(rng, T_, d);
  const Mat<T> phi = random_matrix<T>(rng, d, S, 1.0 / std::sqrt(static_cast<double>(d)));
  const Mat<T> dD = random_matrix<T>(rng, T_, S), dC = random_matrix<T>(rng, T_, S);
  const Mat<T> dx0 = random_matrix<T>(rng, T_, d), dphi0 = random_matrix<T>(rng, d, S);
  const std::vector<index_t> bounds{0, 90, T_};

  const moe::SoftRouter<T> router(phi, S, soft_options(1, false, scale));
  moe::SoftRouting<T> routing;
  router.route(x, moe::RouteContext::with_groups(bounds), routing);
  Mat<T> dx = dx0, dphi = dphi0;
  moe::Buffer<T> scratch;
  router.backward(x, routing, dD.data(), dC.data(), dx, dphi, Arch{}, &scratch);

  const SoftReference ref = reference_route(to_double(x), to_double(phi), false, scale, bounds);
  MatD dP(T_, S);
  for (index_t t = 0; t < T_; ++t) {
    double row_dot = 0.0;
    for (index_t j = 0; j < S; ++j) row_dot += ref.combine(t, j) * double(dC(t, j));
    for (index_t j = 0; j < S; ++j) dP(t, j) = ref.combine(t, j) * (double(dC(t, j)) - row_dot);
  }
  for (std::size_t g = 0; g + 1 < bounds.size(); ++g)
    for (index_t j = 0; j < S; ++j) {
      double column_dot = 0.0;
      for (index_t t = bounds[g]; t < bounds[g + 1]; ++t) column_dot += ref.dispatch(t, j) * double(dD(t, j));
      for (index_t t = bounds[g]; t < bounds[g + 1]; ++t)
        dP(t, j) += ref.dispatch(t, j) * (double(dD(t, j)) - column_dot);
    }
  dP *= scale;
  MatD want_dphi(d, S), want_dx(T_, d);
  for (index_t i = 0; i < d; ++i)
    for (index_t j = 0; j < S; ++j) {
      double sum = 0.0;
      for (index_t t = 0; t < T_; ++t) sum += double(x(t, i)) * dP(t, j);
      want_dphi(i, j) = sum;
    }
  for (index_t t = 0; t < T_; ++t)
    for (index_t i = 0; i < d; ++i) {
      double sum = 0.0;
      for (index_t j = 0; j < S; ++j) sum += dP(t, j) * double(phi(i, j));
      want_dx(t, i) = sum;
    }
  const MatD added_dphi = to_double(dphi) - to_double(dphi0), added_dx = to_double(dx) - to_double(dx0);
  CHECK(relative_error(added_dphi, want_dphi) <= 20 * tolerance<T>());
  CHECK(relative_error(added_dx, want_dx) <= 20 * tolerance<T>());
}

TEST_CASE("SoftRouter slot layout is expert-major and groups get their own slots", "[soft][routing]") {
  std::mt19937 rng(7);
  const index_t d = 5, E = 3, s = 2;
  const Mat<float> phi = random_matrix<float>(rng, d, E * s);
  const Mat<float> x = random_matrix<float>(rng, 6, d);
  const moe::SoftRouter<float> router(phi, E, soft_options(s, false));
  moe::SoftRouting<float> out;
  const std::vector<index_t> bounds{0, 2, 2, 6};
  router.route(x, moe::RouteContext::with_groups(bounds), out);
  REQUIRE(out.num_groups() == 3);
  REQUIRE(out.group_size(1) == 0);
  REQUIRE(out.slot_rows() == 3 * E * s);
  REQUIRE(out.rows_per_expert() == 3 * s);
  // Every (expert, group, slot) has its own row, and expert e's rows are [e·s·G, (e+1)·s·G).
  std::vector<int> seen(static_cast<std::size_t>(out.slot_rows()), 0);
  for (index_t e = 0; e < E; ++e) {
    for (index_t g = 0; g < 3; ++g) {
      for (index_t j = 0; j < s; ++j) {
        const index_t row = out.slot_row(e, g, j);
        CHECK(row >= out.expert_first_row(e));
        CHECK(row < out.expert_first_row(e) + out.rows_per_expert());
        ++seen[static_cast<std::size_t>(row)];
      }
    }
  }
  CHECK(std::all_of(seen.begin(), seen.end(), [](int c) { return c == 1; }));
}

TEST_CASE("soft dispatch and combine compute Dᵀ·x and C·Ỹ per group", "[soft][dispatch]") {
  std::mt19937 rng(11);
  const index_t d = 9, E = 2, s = 3, S = E * s;
  const Mat<double> phi = random_matrix<double>(rng, d, S);
  const Mat<double> x = random_matrix<double>(rng, 10, d);
  const std::vector<index_t> bounds{0, 4, 4, 10};
  const moe::SoftRouter<double> router(phi, E, soft_options(s, false));
  moe::SoftRouting<double> routing;
  router.route(x, moe::RouteContext::with_groups(bounds), routing);
  const index_t G = routing.num_groups();

  moe::Buffer<double> scratch;
  std::vector<double> slots(static_cast<std::size_t>(G * S * d), -1.0);
  moe::dispatch(moe::simd::default_arch{}, routing, x.data(), d, d, slots.data(), scratch);
  for (index_t g = 0; g < G; ++g) {
    for (index_t e = 0; e < E; ++e) {
      for (index_t j = 0; j < s; ++j) {
        for (index_t i = 0; i < d; ++i) {
          double want = 0.0;
          for (index_t t = bounds[static_cast<std::size_t>(g)]; t < bounds[static_cast<std::size_t>(g) + 1]; ++t) {
            want += routing.dispatch_weights()(t, e * s + j) * x(t, i);
          }
          CHECK(slots[static_cast<std::size_t>(routing.slot_row(e, g, j) * d + i)] == Approx(want).epsilon(1e-12).margin(1e-14));
        }
      }
    }
  }

  // Combine arbitrary slot outputs; y rows get C_g · (their group's slot outputs), written with a stride.
  const Mat<double> slot_out = random_matrix<double>(rng, G * S, d);
  const index_t ldy = d + 3;
  std::vector<double> y(static_cast<std::size_t>(10 * ldy), 7.0);
  moe::combine(moe::simd::default_arch{}, routing, slot_out.data(), d, y.data(), ldy, scratch);
  for (index_t g = 0; g < G; ++g) {
    for (index_t t = bounds[static_cast<std::size_t>(g)]; t < bounds[static_cast<std::size_t>(g) + 1]; ++t) {
      for (index_t i = 0; i < d; ++i) {
        double want = 0.0;
        for (index_t e = 0; e < E; ++e) {
          for (index_t j = 0; j < s; ++j) want += routing.combine_weights()(t, e * s + j) * slot_out(routing.slot_row(e, g, j), i);
        }
        CHECK(y[static_cast<std::size_t>(t * ldy + i)] == Approx(want).epsilon(1e-12).margin(1e-14));
      }
      for (index_t i = d; i < ldy; ++i) CHECK(y[static_cast<std::size_t>(t * ldy + i)] == 7.0);  // padding untouched
    }
  }
  // The empty group's slots are zero.
  for (index_t e = 0; e < E; ++e) {
    for (index_t j = 0; j < s; ++j) {
      for (index_t i = 0; i < d; ++i) CHECK(slots[static_cast<std::size_t>(routing.slot_row(e, 1, j) * d + i)] == 0.0);
    }
  }
}

// ---- layer -------------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("SoftMoELayer matches the double reference", "[soft][layer]", float, double) {
  using T = TestType;
  const bool normalized = GENERATE(false, true);
  const bool grouped = GENERATE(false, true);
  const index_t d = GENERATE(1, 8, 13);
  const index_t E = GENERATE(1, 2, 5);
  const index_t s = GENERATE(1, 3);
  const index_t T_ = GENERATE(0, 1, 6, 40);
  const index_t ff = 11;
  std::mt19937 rng(static_cast<unsigned>(97 * d + 31 * E + 7 * s + T_ + (grouped ? 3 : 0)));
  const index_t S = E * s;
  const Mat<T> x = random_matrix<T>(rng, T_, d);
  const Mat<T> phi = random_matrix<T>(rng, d, S, 1.0 / std::sqrt(static_cast<double>(d)));
  // Up to 7 groups, so an expert's s·G rows cross the streaming/GEMM switch (16 rows) at s = 3.
  const std::vector<index_t> bounds = grouped ? random_bounds(rng, T_, 7) : std::vector<index_t>{0, T_};
  const double scale = normalized ? 1.5 : 1.0;
  CAPTURE(normalized, grouped, d, E, s, T_, bounds);
  const moe::RouteContext ctx = context_for(bounds, grouped);

  SECTION("SwiGLU experts") {
    const moe::SoftMoELayer<moe::SwiGLU<T>> layer(moe::SoftRouter<T>(phi, E, soft_options(s, normalized, scale)),
                                                  make_swiglu<T>(rng, E, d, ff));
    moe::SoftWorkspace<T> ws;
    Mat<T> y(T_, d);
    layer.forward(x, ctx, y, ws);
    const MatD want = reference_layer(to_double(x), to_double(phi), s, normalized, scale, bounds, layer.experts());
    const MatD mag = reference_layer(to_double(x), to_double(phi), s, normalized, scale, bounds, layer.experts(), true);
    if (T_ > 0) CHECK(scaled_error(y, want, mag) <= tolerance<T>());
  }
  SECTION("FeedForward (ReLU) experts") {
    const moe::SoftMoELayer<moe::FeedForward<T, moe::ReLU>> layer(
        moe::SoftRouter<T>(phi, E, soft_options(s, normalized, scale)), make_feed_forward<T>(rng, E, d, ff));
    moe::SoftWorkspace<T> ws;
    Mat<T> y(T_, d);
    layer.forward(x, ctx, y, ws);
    const MatD want = reference_layer(to_double(x), to_double(phi), s, normalized, scale, bounds, layer.experts());
    const MatD mag = reference_layer(to_double(x), to_double(phi), s, normalized, scale, bounds, layer.experts(), true);
    if (T_ > 0) CHECK(scaled_error(y, want, mag) <= tolerance<T>());
  }
}

TEMPLATE_TEST_CASE("SoftMoELayer: a group's output is bit-identical whatever the other groups hold", "[soft][layer][isolation]",
                   float, double) {
  using T = TestType;
  const bool normalized = GENERATE(false, true);
  const index_t s = GENERATE(1, 3);
  // d = 13: Eigen's blocked GEMM in the logits, dispatch and combine products; d = 5: its
  // coefficient-wise product, whose vectorization peels by the destination address.
  const index_t d = GENERATE(13, 5);
  const index_t E = 3, ff = 24;
  const index_t target_size = d == 5 ? 3 : 9;
  std::mt19937 rng(static_cast<unsigned>(5 + s + d + (normalized ? 100 : 0)));
  const moe::SoftMoELayer<moe::SwiGLU<T>> layer(
      moe::SoftRouter<T>(random_matrix<T>(rng, d, E * s, 0.3), E, soft_options(s, normalized, 2.0)),
      make_swiglu<T>(rng, E, d, ff));
  const Mat<T> target = random_matrix<T>(rng, target_size, d);

  // The target alone: one group.
  moe::SoftWorkspace<T> alone_ws;
  Mat<T> y_alone(target_size, d);
  layer.forward(target, moe::RouteContext::with_groups({0, target_size}), y_alone, alone_ws);
  const moe::SoftRouting<T>& alone = alone_ws.routing;

  // The target among other groups of random content and size (empty ones included), at a random
  // index among 1 to 8 groups: where it sits in the batch, how its rows align and how many rows
  // each expert runs on (s·G, across the 4-token register blocks) all change.
  for (int trial = 0; trial < 16; ++trial) {
    std::uniform_int_distribution<index_t> group_count(1, 8);
    std::uniform_int_distribution<index_t> size(0, 9);
    const index_t G = group_count(rng);
    const index_t where = std::uniform_int_distribution<index_t>(0, G - 1)(rng);
    std::vector<index_t> bounds{0};
    for (index_t g = 0; g < G; ++g) bounds.push_back(bounds.back() + (g == where ? target_size : size(rng)));
    const index_t first = bounds[static_cast<std::size_t>(where)];
    Mat<T> x = random_matrix<T>(rng, bounds.back(), d);
    x.middleRows(first, target_size) = target;
    CAPTURE(trial, bounds, where);

    moe::SoftWorkspace<T> ws;
    Mat<T> y(x.rows(), d);
    layer.forward(x, moe::RouteContext::with_groups(bounds), y, ws);
    const auto rows = [&](const moe::ConstMatrixMap<T>& m) { return Mat<T>(m.middleRows(first, target_size)); };
    CHECK(same_bits(y.middleRows(first, target_size), y_alone));
    CHECK(same_bits(rows(ws.routing.logits()), alone.logits()));
    CHECK(same_bits(rows(ws.routing.dispatch_weights()), alone.dispatch_weights()));
    CHECK(same_bits(rows(ws.routing.combine_weights()), alone.combine_weights()));
  }

  const std::vector<index_t> alone_bounds{0, target_size};
  const MatD phi = to_double(layer.router().phi());
  const MatD want = reference_layer(to_double(target), phi, s, normalized, 2.0, alone_bounds, layer.experts());
  const MatD mag = reference_layer(to_double(target), phi, s, normalized, 2.0, alone_bounds, layer.experts(), true);
  CHECK(scaled_error(y_alone, want, mag) <= tolerance<T>());
}

TEMPLATE_TEST_CASE("SoftMoELayer edge shapes: T = 0, T = 1, E = 1, aliasing, reuse", "[soft][layer]", float, double) {
  using T = TestType;
  std::mt19937 rng(3);
  const index_t d = 6, ff = 5;

  SECTION("T = 0 with and without groups") {
    const moe::SoftMoELayer<moe::SwiGLU<T>> layer(moe::SoftRouter<T>(random_matrix<T>(rng, d, 4), 2, soft_options(2, false)),
                                                  make_swiglu<T>(rng, 2, d, ff));
    moe::SoftWorkspace<T> ws;
    Mat<T> x(0, d), y(0, d);
    layer.forward(x, y, ws);
    CHECK(ws.routing.num_tokens() == 0);
    layer.forward(x, moe::RouteContext::with_groups({0, 0, 0}), y, ws);
    CHECK(ws.routing.num_groups() == 2);
    CHECK(layer.forward(x, ws).rows() == 0);
  }
  SECTION("T = 1: D is all ones, so every slot input is the token itself") {
    const index_t E = 3, s = 2;
    const moe::SoftMoELayer<moe::SwiGLU<T>> layer(moe::SoftRouter<T>(random_matrix<T>(rng, d, E * s), E, soft_options(s, true)),
                                                  make_swiglu<T>(rng, E, d, ff));
    moe::SoftWorkspace<T> ws;
    const Mat<T> x = random_matrix<T>(rng, 1, d);
    const Mat<T> y = layer.forward(x, ws);
    for (index_t j = 0; j < E * s; ++j) CHECK(ws.routing.dispatch_weights()(0, j) == T(1));
    // y = Σ_j C[j] · expert_{j/s}(x).
    std::vector<double> want(static_cast<std::size_t>(d), 0.0);
    std::vector<double> xd(static_cast<std::size_t>(d));
    for (index_t i = 0; i < d; ++i) xd[static_cast<std::size_t>(i)] = static_cast<double>(x(0, i));
    for (index_t j = 0; j < E * s; ++j) {
      const std::vector<double> out = reference_expert(layer.experts()[static_cast<std::size_t>(j / s)], xd);
      for (index_t i = 0; i < d; ++i) {
        want[static_cast<std::size_t>(i)] += static_cast<double>(ws.routing.combine_weights()(0, j)) * out[static_cast<std::size_t>(i)];
      }
    }
    MatD want_m(1, d);
    for (index_t i = 0; i < d; ++i) want_m(0, i) = want[static_cast<std::size_t>(i)];
    const MatD mag = reference_layer(to_double(x), to_double(layer.router().phi()), s, true, 1.0, {0, 1}, layer.experts(), true);
    CHECK(scaled_error(y, want_m, mag) <= tolerance<T>());
  }
  SECTION("E = 1, s = 1: C is all ones, y[t] = expert(Σ_u D[u] x[u]) for every token") {
    const moe::SoftMoELayer<moe::FeedForward<T, moe::ReLU>> layer(
        moe::SoftRouter<T>(random_matrix<T>(rng, d, 1), 1, soft_options(1, false)), make_feed_forward<T>(rng, 1, d, ff));
    moe::SoftWorkspace<T> ws;
    const Mat<T> x = random_matrix<T>(rng, 5, d);
    const Mat<T> y = layer.forward(x, ws);
    for (index_t t = 0; t < 5; ++t) CHECK(ws.routing.combine_weights()(t, 0) == T(1));
    for (index_t t = 1; t < 5; ++t) CHECK(same_bits(y.row(t), y.row(0)));
  }
  SECTION("x and y with row strides give the bits of contiguous ones") {
    const index_t E = 3, s = 2;
    const bool normalized = GENERATE(false, true);
    const moe::SoftMoELayer<moe::SwiGLU<T>> layer(
        moe::SoftRouter<T>(random_matrix<T>(rng, d, E * s), E, soft_options(s, normalized)), make_swiglu<T>(rng, E, d, ff));
    moe::SoftWorkspace<T> ws;
    const Mat<T> wide_x = random_matrix<T>(rng, 11, d + 5);
    const Mat<T> x = wide_x.leftCols(d);
    const std::vector<index_t> bounds{0, 4, 11};
    const moe::RouteContext ctx = moe::RouteContext::with_groups(bounds);
    Mat<T> y(11, d), wide_y = Mat<T>::Constant(11, d + 3, T(7));
    layer.forward(x, ctx, y, ws);
    layer.forward(wide_x.leftCols(d), ctx, wide_y.leftCols(d), ws);
    CHECK(same_bits(wide_y.leftCols(d), y));
    CHECK((wide_y.rightCols(3).array() == T(7)).all());
  }
  SECTION("y may alias x, and a warm workspace keeps its buffers") {
    const index_t E = 2, s = 2;
    const moe::SoftMoELayer<moe::SwiGLU<T>> layer(moe::SoftRouter<T>(random_matrix<T>(rng, d, E * s), E, soft_options(s, false)),
                                                  make_swiglu<T>(rng, E, d, ff));
    moe::SoftWorkspace<T> ws;
    const Mat<T> x = random_matrix<T>(rng, 12, d);
    const std::vector<index_t> bounds{0, 5, 12};
    const moe::RouteContext ctx = moe::RouteContext::with_groups(bounds);
    Mat<T> y(12, d);
    layer.forward(x, ctx, y, ws);
    const T* logits = ws.routing.logits().data();
    const std::size_t slots_capacity = ws.slots.capacity();
    const std::size_t mix_capacity = ws.mix.capacity();
    Mat<T> inout = x;
    layer.forward(inout, ctx, inout, ws);
    CHECK(same_bits(inout, y));
    CHECK(ws.routing.logits().data() == logits);
    CHECK(ws.slots.capacity() == slots_capacity);
    CHECK(ws.mix.capacity() == mix_capacity);
  }
}

// ---- errors ------------------------------------------------------------------------------------

// Reference in integers: capacity_factor = p / q exactly, so tokens · cf / E = (tokens · p) / (q · E),
// rounded half to even by its quotient and remainder.
TEST_CASE("soft_slots_per_expert rounds tokens * cf / E half to even, as vmoe sizes its slots", "[soft][routing]") {
  struct Factor {
    double value;
    index_t p, q;
  };
  for (const Factor cf : {Factor{0.25, 1, 4}, Factor{0.5, 1, 2}, Factor{1.0, 1, 1}, Factor{1.25, 5, 4}, Factor{2.0, 2, 1}}) {
    for (const index_t experts : {1, 2, 3, 4, 8, 16, 32, 64, 128}) {
      for (index_t tokens = 1; tokens <= 300; ++tokens) {
        const index_t num = tokens * cf.p, den = cf.q * experts;
        index_t expected = num / den;
        const index_t twice_rem = 2 * (num % den);
        if (twice_rem > den || (twice_rem == den && expected % 2 == 1)) ++expected;
        CAPTURE(cf.value, experts, tokens, expected);
        if (expected >= 1) {
          CHECK(moe::soft_slots_per_expert(tokens, experts, cf.value) == expected);
        } else {
          CHECK_THROWS_WITH(moe::soft_slots_per_expert(tokens, experts, cf.value), Catch::Contains("rounded = 0"));
        }
      }
    }
  }
  // Halves go to even: 6 / 4 = 1.5 -> 2, 10 / 4 = 2.5 -> 2, 14 / 4 = 3.5 -> 4.
  CHECK(moe::soft_slots_per_expert(6, 4, 1.0) == 2);
  CHECK(moe::soft_slots_per_expert(10, 4, 1.0) == 2);
  CHECK(moe::soft_slots_per_expert(14, 4, 1.0) == 4);
  REQUIRE_THROWS_AS(moe::soft_slots_per_expert(0, 4, 1.0), moe::invalid_argument);
  REQUIRE_THROWS_WITH(moe::soft_slots_per_expert(16, 0, 1.0), Catch::Contains("num_experts = 0"));
  REQUIRE_THROWS_WITH(moe::soft_slots_per_expert(16, 4, -1.0), Catch::Contains("capacity_factor = -1"));
  REQUIRE_THROWS_AS(moe::soft_slots_per_expert(16, 4, std::numeric_limits<double>::quiet_NaN()), moe::invalid_argument);
  REQUIRE_THROWS_WITH(moe::soft_slots_per_expert(16, 4, 1e300), Catch::Contains("2^63"));
}

TEST_CASE("SoftMoELayer::set_scale gives the bits of a layer built with that scale; a non-finite one changes nothing",
          "[soft][layer]") {
  std::mt19937 rng(23);
  const index_t d = 6, ff = 5, E = 3, s = 2;
  const Mat<double> phi = random_matrix<double>(rng, d, E * s);
  const std::vector<moe::SwiGLU<double>> experts = make_swiglu<double>(rng, E, d, ff);
  const Mat<double> x = random_matrix<double>(rng, 9, d);
  const bool normalized = GENERATE(false, true);
  moe::SoftMoELayer<moe::SwiGLU<double>> layer(moe::SoftRouter<double>(phi, E, soft_options(s, normalized, 0.5)), experts);
  const moe::SoftMoELayer<moe::SwiGLU<double>> built(moe::SoftRouter<double>(phi, E, soft_options(s, normalized, 1.75)), experts);
  moe::SoftWorkspace<double> ws;
  const Mat<double> before = layer.forward(x, ws);
  layer.set_scale(1.75);
  CHECK(layer.router().options().scale == 1.75);
  const Mat<double> after = layer.forward(x, ws);
  CHECK(after == built.forward(x, ws));
  CHECK(after != before);
  REQUIRE_THROWS_AS(layer.set_scale(std::numeric_limits<double>::quiet_NaN()), moe::invalid_argument);
  REQUIRE_THROWS_WITH(layer.set_scale(-std::numeric_limits<double>::infinity()), Catch::Contains("scale = -inf"));
  CHECK(layer.router().options().scale == 1.75);
  CHECK(layer.forward(x, ws) == after);
}

TEST_CASE("SoftRouter and SoftMoELayer errors name the parameter and the values", "[soft][errors]") {
  std::mt19937 rng(19);
  const index_t d = 4;
  const Mat<float> phi = random_matrix<float>(rng, d, 6);

  SECTION("slots_per_expert = 0") {
    REQUIRE_THROWS_AS(moe::SoftRouter<float>(phi, 3, soft_options(0, false)), moe::invalid_argument);
    REQUIRE_THROWS_WITH(moe::SoftRouter<float>(phi, 3, soft_options(0, false)), Catch::Contains("slots_per_expert = 0"));
  }
  SECTION("num_experts = 0") {
    REQUIRE_THROWS_WITH(moe::SoftRouter<float>(phi, 0, soft_options(1, false)), Catch::Contains("num_experts = 0"));
  }
  SECTION("phi shape mismatch") {
    REQUIRE_THROWS_AS(moe::SoftRouter<float>(phi, 4, soft_options(2, false)), moe::invalid_argument);
    REQUIRE_THROWS_WITH(moe::SoftRouter<float>(phi, 4, soft_options(2, false)),
                        Catch::Contains("phi.cols() = 6") && Catch::Contains("num_experts = 4") &&
                            Catch::Contains("slots_per_expert = 2"));
  }
  SECTION("scale not finite") {
    REQUIRE_THROWS_WITH(moe::SoftRouter<float>(phi, 3, soft_options(2, true, std::numeric_limits<double>::infinity())),
                        Catch::Contains("scale = inf"));
    // Finite as a double but not as a float: every route would have thrown on infinite logits.
    REQUIRE_THROWS_WITH(moe::SoftRouter<float>(phi, 3, soft_options(2, true, 1e39)),
                        Catch::Contains("scale must be finite in the scalar type (scale = 1e+39"));
    REQUIRE_NOTHROW(moe::SoftRouter<double>(random_matrix<double>(rng, d, 6), 3, soft_options(2, true, 1e39)));
  }
  SECTION("num_experts * slots_per_expert beyond index_t") {
    // (Compared by division: the product overflowed, undefined behaviour, before the check threw.)
    REQUIRE_THROWS_WITH(moe::SoftRouter<float>(phi, index_t(1) << 62, soft_options(4, false)),
                        Catch::Contains("phi.cols() = 6") && Catch::Contains("num_experts = 4611686018427387904"));
  }
  const moe::SoftRouter<float> router(phi, 3, soft_options(2, false));
  moe::SoftRouting<float> out;
  SECTION("x width") {
    const Mat<float> x = random_matrix<float>(rng, 3, d + 1);
    REQUIRE_THROWS_AS(router.route(x, out), moe::invalid_argument);
    REQUIRE_THROWS_WITH(router.route(x, out), Catch::Contains("x.cols() = 5") && Catch::Contains("d_model = 4"));
  }
  SECTION("groups that do not cover the batch") {
    const Mat<float> x = random_matrix<float>(rng, 3, d);
    REQUIRE_THROWS_WITH(router.route(x, moe::RouteContext::with_groups({0, 2}), out),
                        Catch::Contains("SoftRouter::route") && Catch::Contains("tokens = 3"));
  }
  SECTION("non-finite logits") {
    const bool normalized = GENERATE(false, true);
    const moe::SoftRouter<float> r(phi, 3, soft_options(2, normalized));
    Mat<float> x = random_matrix<float>(rng, 5, d);
    x(3, 1) = std::numeric_limits<float>::quiet_NaN();
    REQUIRE_THROWS_AS(r.route(x, out), moe::numeric_error);
    REQUIRE_THROWS_WITH(r.route(x, out), Catch::Contains("token = 3"));
    // In a later group the reported token is still the batch index.
    REQUIRE_THROWS_WITH(r.route(x, moe::RouteContext::with_groups({0, 2, 5}), out), Catch::Contains("token = 3"));
    x(3, 1) = std::numeric_limits<float>::infinity();
    REQUIRE_THROWS_AS(r.route(x, out), moe::numeric_error);
    Mat<float> bad_phi = phi;
    bad_phi(2, 4) = std::numeric_limits<float>::infinity();
    const moe::SoftRouter<float> bad(bad_phi, 3, soft_options(2, normalized));
    REQUIRE_THROWS_AS(bad.route(random_matrix<float>(rng, 2, d), out), moe::numeric_error);
    REQUIRE_THROWS_WITH(bad.route(random_matrix<float>(rng, 2, d), out), Catch::Contains("slot = 4"));
    // check_finite = false routes without a check.
    moe::SoftOptions unchecked = soft_options(2, normalized);
    unchecked.check_finite = false;
    const moe::SoftRouter<float> quiet(bad_phi, 3, unchecked);
    REQUIRE_NOTHROW(quiet.route(random_matrix<float>(rng, 2, d), out));
  }
  SECTION("layer shapes") {
    REQUIRE_THROWS_WITH(moe::SoftMoELayer<moe::SwiGLU<float>>(router, make_swiglu<float>(rng, 2, d, 3)),
                        Catch::Contains("experts.size() = 2") && Catch::Contains("router.num_experts() = 3"));
    std::vector<moe::SwiGLU<float>> wrong = make_swiglu<float>(rng, 3, d, 3);
    wrong[1] = make_swiglu<float>(rng, 1, d + 2, 3)[0];
    REQUIRE_THROWS_WITH(moe::SoftMoELayer<moe::SwiGLU<float>>(router, wrong),
                        Catch::Contains("expert 1") && Catch::Contains("expert d_model = 6") && Catch::Contains("router d_model = 4"));
    const moe::SoftMoELayer<moe::SwiGLU<float>> layer(router, make_swiglu<float>(rng, 3, d, 3));
    moe::SoftWorkspace<float> ws;
    const Mat<float> x = random_matrix<float>(rng, 3, d);
    Mat<float> y_rows(2, d), y_cols(3, d + 1);
    REQUIRE_THROWS_WITH(layer.forward(x, y_rows, ws), Catch::Contains("y.rows() = 2") && Catch::Contains("x.rows() = 3"));
    REQUIRE_THROWS_WITH(layer.forward(x, y_cols, ws), Catch::Contains("y.cols() = 5") && Catch::Contains("d_model = 4"));
    const Mat<float> x_wide = random_matrix<float>(rng, 3, d + 2);
    Mat<float> y_wide(3, d + 2);
    REQUIRE_THROWS_WITH(layer.forward(x_wide, y_wide, ws), Catch::Contains("x.cols() = 6"));
  }
}

}  // namespace soft_test
