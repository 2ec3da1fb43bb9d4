// FeedForward and GatedFeedForward against a per-token double reference written with loops;
// batch isolation (a token's output bits do not depend on the other tokens in the block);
// owning versus viewing weights; shape errors.
//
// Token counts cover the kernels' register blocks of 4 tokens (full and partial) and counts well
// past them (16, 17, 40); d and d_ff are not multiples of the lane count, so every dot product
// has a vector body and a scalar tail.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>
#include <moe/moe.hpp>

// (A namespace of its own: this file may share a translation unit with other test files.)
namespace experts_test {

namespace {

using Arch = moe::simd::default_arch;
using moe::index_t;

template <class T>
constexpr index_t kLanes = static_cast<index_t>(moe::simd::lanes<T, Arch>());

std::size_t sz(index_t i) { return static_cast<std::size_t>(i); }

// Token counts: none, a partial block, a full block of 4 and one more, and many.
std::vector<index_t> token_counts() { return {0, 1, 3, 4, 5, 16, 17, 40}; }

// (d, d_ff) pairs, none a multiple of the lane count L (except that 1 is tiny): 1 x 1, L+1 x 3L+2,
// 13 x 37, and 5 x 300 (more gate/up pairs than one panel of simd::gated_matmul_nt holds).
struct Shape {
  index_t d;
  index_t ff;
};
template <class T>
std::vector<Shape> shapes() {
  const index_t L = kLanes<T>;
  return {{1, 1}, {L + 1, 3 * L + 2}, {13, 37}, {5, 300}};
}

// Tolerance, relative to max(|ref_i|, rms of the token's reference output row). An output
// element is a dot product over d_ff hidden values, each itself a dot product over d inputs;
// where the terms cancel, |ref_i| is far smaller than the rounding error its terms carry
// (about eps·sum|terms|), so an element-relative bound would reject correct code. The row's RMS
// is the scale of the terms of each of its elements (the weights and inputs are i.i.d.), so
// the rounding error of every element is a small multiple of eps·rms. With float's eps
// = 1.2e-7 and sums of at most 37 terms, 1e-5 leaves room for the error to grow like k·eps in
// the worst case; double's 1e-12 likewise for eps = 2.2e-16.
template <class T>
double tolerance() {
  return std::is_same<T, float>::value ? 1e-5 : 1e-12;
}

template <class T>
moe::Matrix<T> random_matrix(index_t rows, index_t cols, double scale, std::mt19937& rng) {
  std::uniform_real_distribution<double> dist(-scale, scale);
  moe::Matrix<T> m(rows, cols);
  for (index_t r = 0; r < rows; ++r) {
    for (index_t c = 0; c < cols; ++c) m(r, c) = static_cast<T>(dist(rng));
  }
  return m;
}

template <class T>
std::vector<T> random_tokens(index_t m, index_t d, std::mt19937& rng) {
  std::uniform_real_distribution<double> dist(-1.5, 1.5);
  std::vector<T> x(sz(m * d));
  for (T& v : x) v = static_cast<T>(dist(rng));
  return x;
}

// The activations in double, as PyTorch defines them.
double activation(moe::ReLU, double x) { return x > 0 ? x : 0.0; }
double activation(moe::GELU, double x) { return 0.5 * x * (1.0 + std::erf(x / std::sqrt(2.0))); }
double activation(moe::GELUTanh, double x) {
  return 0.5 * x * (1.0 + std::tanh(std::sqrt(2.0 / 3.14159265358979323846) * (x + 0.044715 * x * x * x)));
}
double activation(moe::SiLU, double x) { return x / (1.0 + std::exp(-x)); }

// out[i] = sum_j w[i, j] · in[j], in double.
template <class T>
std::vector<double> linear(const moe::Matrix<T>& w, const std::vector<double>& in) {
  std::vector<double> out(sz(w.rows()), 0.0);
  for (index_t i = 0; i < w.rows(); ++i) {
    for (index_t j = 0; j < w.cols(); ++j) out[sz(i)] += static_cast<double>(w(i, j)) * in[sz(j)];
  }
  return out;
}

template <class T>
std::vector<double> token(const std::vector<T>& x, index_t t, index_t d) {
  std::vector<double> row(sz(d));
  for (index_t i = 0; i < d; ++i) row[sz(i)] = static_cast<double>(x[sz(t * d + i)]);
  return row;
}

// y = act(x · w_inᵀ) · w_outᵀ for one token, in double.
template <class Act, class T>
std::vector<double> feed_forward_reference(const moe::Matrix<T>& w_in, const moe::Matrix<T>& w_out,
                                           const std::vector<double>& x) {
  std::vector<double> h = linear(w_in, x);  // [d_ff]
  for (double& v : h) v = activation(Act{}, v);
  return linear(w_out, h);
}

// y = (act(x · w_gateᵀ) ⊙ (x · w_upᵀ)) · w_downᵀ for one token, in double.
template <class Act, class T>
std::vector<double> gated_reference(const moe::Matrix<T>& w_gate, const moe::Matrix<T>& w_up,
                                    const moe::Matrix<T>& w_down, const std::vector<double>& x) {
  std::vector<double> g = linear(w_gate, x);     // [d_ff]
  const std::vector<double> u = linear(w_up, x);  // [d_ff]
  for (std::size_t j = 0; j < g.size(); ++j) g[j] = activation(Act{}, g[j]) * u[j];
  return linear(w_down, g);
}

constexpr std::size_t kGuard = 16;

template <class T>
T sentinel() {
  return T(-4321.25);
}

// Runs expert.forward on m tokens and compares every token with reference(token). y and
// scratch are followed by guard elements that must survive: forward writes m·d outputs and
// uses at most scratch_size(m) scratch elements.
template <class Expert, class Reference>
void check_forward(const Expert& expert, index_t m, std::mt19937& rng, Reference reference) {
  using T = typename Expert::Scalar;
  const index_t d = expert.d_model();
  INFO("m = " << m << ", d = " << d << ", d_ff = " << expert.d_ff());
  const std::vector<T> x = random_tokens<T>(m, d, rng);  // [m, d], exact size
  std::vector<T> y(sz(m * d) + kGuard, sentinel<T>());  // [m, d] + guard
  std::vector<T> scratch(sz(expert.scratch_size(m)) + kGuard, sentinel<T>());
  expert.forward(Arch{}, x.data(), m, y.data(), scratch.data());

  for (index_t t = 0; t < m; ++t) {
    CAPTURE(t);
    const std::vector<double> ref = reference(token(x, t, d));
    double sum_sq = 0;
    for (const double v : ref) sum_sq += v * v;
    const double rms = std::sqrt(sum_sq / static_cast<double>(d));
    for (index_t i = 0; i < d; ++i) {
      CAPTURE(i);
      const double got = static_cast<double>(y[sz(t * d + i)]);
      const double want = ref[sz(i)];
      CHECK(std::abs(got - want) <= tolerance<T>() * std::max(std::abs(want), rms));
    }
  }
  for (std::size_t i = sz(m * d); i < y.size(); ++i) CHECK(y[i] == sentinel<T>());
  for (std::size_t i = sz(expert.scratch_size(m)); i < scratch.size(); ++i) CHECK(scratch[i] == sentinel<T>());

  // Batch isolation (README, "Guarantees"): each token alone gives the same bits as in the block.
  for (index_t t = 0; t < m; ++t) {
    CAPTURE(t);
    std::vector<T> alone(sz(d));
    std::vector<T> alone_scratch(sz(expert.scratch_size(1)));
    expert.forward(Arch{}, x.data() + t * d, 1, alone.data(), alone_scratch.data());
    for (index_t i = 0; i < d; ++i) CHECK(alone[sz(i)] == y[sz(t * d + i)]);
  }

  // Training's forward (which keeps the pre-activations for backward) gives the same bits.
  std::vector<T> y_train(sz(m * d));
  std::vector<T> saved(sz(expert.saved_size(m)));
  std::vector<T> train_scratch(sz(expert.scratch_size(m)));
  expert.forward_saving(Arch{}, x.data(), m, y_train.data(), saved.data(), train_scratch.data());
  for (index_t i = 0; i < m * d; ++i) CHECK(y_train[sz(i)] == y[sz(i)]);
}

template <class T, class Act>
void check_feed_forward(index_t m, Shape s, std::uint32_t seed) {
  INFO("activation " << Act::name);
  std::mt19937 rng(seed);
  // Pre-activations of order 1 (|x| <= 1.5, weights scaled by 1/sqrt(fan-in)).
  const moe::Matrix<T> w_in = random_matrix<T>(s.ff, s.d, 1.7 / std::sqrt(static_cast<double>(s.d)), rng);
  const moe::Matrix<T> w_out = random_matrix<T>(s.d, s.ff, 1.7 / std::sqrt(static_cast<double>(s.ff)), rng);
  const moe::FeedForward<T, Act> expert(moe::ConstMatrixMap<T>(w_in.data(), s.ff, s.d),
                                        moe::ConstMatrixMap<T>(w_out.data(), s.d, s.ff));
  CHECK(expert.d_model() == s.d);
  CHECK(expert.d_ff() == s.ff);
  check_forward(expert, m, rng,
                [&](const std::vector<double>& x) { return feed_forward_reference<Act>(w_in, w_out, x); });
}

template <class T, class Act>
void check_gated_feed_forward(index_t m, Shape s, std::uint32_t seed) {
  INFO("activation " << Act::name);
  std::mt19937 rng(seed);
  const double in_scale = 1.7 / std::sqrt(static_cast<double>(s.d));
  const moe::Matrix<T> w_gate = random_matrix<T>(s.ff, s.d, in_scale, rng);
  const moe::Matrix<T> w_up = random_matrix<T>(s.ff, s.d, in_scale, rng);
  const moe::Matrix<T> w_down = random_matrix<T>(s.d, s.ff, 1.7 / std::sqrt(static_cast<double>(s.ff)), rng);
  const moe::GatedFeedForward<T, Act> expert(moe::ConstMatrixMap<T>(w_gate.data(), s.ff, s.d),
                                             moe::ConstMatrixMap<T>(w_up.data(), s.ff, s.d),
                                             moe::ConstMatrixMap<T>(w_down.data(), s.d, s.ff));
  CHECK(expert.d_model() == s.d);
  CHECK(expert.d_ff() == s.ff);
  check_forward(expert, m, rng,
                [&](const std::vector<double>& x) { return gated_reference<Act>(w_gate, w_up, w_down, x); });
}

template <class T>
moe::ConstMatrixMap<T> view_of(const moe::Matrix<T>& w) {
  return moe::ConstMatrixMap<T>(w.data(), w.rows(), w.cols());
}

}  // namespace

TEMPLATE_TEST_CASE("FeedForward matches a per-token double reference", "[experts]", float, double) {
  using T = TestType;
  const index_t m = GENERATE(from_range(token_counts()));
  const Shape s = GENERATE(from_range(shapes<T>()));
  const auto seed = static_cast<std::uint32_t>(1000 * m + 10 * s.d + s.ff);
  check_feed_forward<T, moe::ReLU>(m, s, seed);
  check_feed_forward<T, moe::GELU>(m, s, seed + 1);
  check_feed_forward<T, moe::GELUTanh>(m, s, seed + 2);
  check_feed_forward<T, moe::SiLU>(m, s, seed + 3);
}

TEMPLATE_TEST_CASE("GatedFeedForward (SwiGLU, GeGLU) matches a per-token double reference", "[experts]", float,
                   double) {
  using T = TestType;
  static_assert(std::is_same<moe::SwiGLU<T>, moe::GatedFeedForward<T, moe::SiLU>>::value, "SwiGLU is SiLU-gated");
  static_assert(std::is_same<moe::GeGLU<T>, moe::GatedFeedForward<T, moe::GELU>>::value, "GeGLU is GELU-gated");
  const index_t m = GENERATE(from_range(token_counts()));
  const Shape s = GENERATE(from_range(shapes<T>()));
  const auto seed = static_cast<std::uint32_t>(2000 * m + 10 * s.d + s.ff);
  check_gated_feed_forward<T, moe::SiLU>(m, s, seed);
  check_gated_feed_forward<T, moe::GELU>(m, s, seed + 1);
}

TEMPLATE_TEST_CASE("FeedForward views the caller's weights or owns a copy", "[experts]", float, double) {
  using T = TestType;
  std::mt19937 rng(11);
  const index_t d = 2 * kLanes<T> + 3;
  const index_t ff = 3 * kLanes<T> + 1;
  const index_t m = GENERATE(3, 40);
  moe::Matrix<T> w_in = random_matrix<T>(ff, d, 0.5, rng);
  moe::Matrix<T> w_out = random_matrix<T>(d, ff, 0.3, rng);
  auto reference = [&](const moe::Matrix<T>& a, const moe::Matrix<T>& b) {
    return [a, b](const std::vector<double>& x) { return feed_forward_reference<moe::SiLU>(a, b, x); };
  };

  SECTION("a view has the caller's pointers and sees later changes to the weights") {
    const moe::FeedForward<T, moe::SiLU> view(view_of(w_in), view_of(w_out));
    CHECK(view.w_in().data() == w_in.data());
    CHECK(view.w_out().data() == w_out.data());
    const moe::FeedForward<T, moe::SiLU> copy = view;  // a copy of a view views the same memory
    CHECK(copy.w_in().data() == w_in.data());
    CHECK(copy.w_out().data() == w_out.data());
    w_in *= T(-2);
    check_forward(view, m, rng, reference(w_in, w_out));
    check_forward(copy, m, rng, reference(w_in, w_out));
  }
  SECTION("an owning expert copies lvalue weights and keeps them when the caller's change") {
    const moe::Matrix<T> w_in_before = w_in;
    const moe::FeedForward<T, moe::SiLU> owner(w_in, w_out);
    CHECK(owner.w_in().data() != w_in.data());
    CHECK(owner.w_out().data() != w_out.data());
    w_in.setZero();
    check_forward(owner, m, rng, reference(w_in_before, w_out));
  }
  SECTION("moving a Matrix in transfers its storage (no copy)") {
    moe::Matrix<T> a = w_in;
    moe::Matrix<T> b = w_out;
    const T* a_data = a.data();
    const T* b_data = b.data();
    const moe::FeedForward<T, moe::SiLU> owner(std::move(a), std::move(b));
    CHECK(owner.w_in().data() == a_data);
    CHECK(owner.w_out().data() == b_data);
    check_forward(owner, m, rng, reference(w_in, w_out));
  }
  SECTION("copies of an owning expert work after the original is destroyed") {
    auto original = std::make_unique<moe::FeedForward<T, moe::SiLU>>(moe::Matrix<T>(w_in), moe::Matrix<T>(w_out));
    const moe::FeedForward<T, moe::SiLU> copy = *original;
    CHECK(copy.w_in().data() != original->w_in().data());
    CHECK(copy.w_out().data() != original->w_out().data());
    moe::FeedForward<T, moe::SiLU> assigned(moe::Matrix<T>(random_matrix<T>(1, 1, 1.0, rng)),
                                            moe::Matrix<T>(random_matrix<T>(1, 1, 1.0, rng)));
    assigned = *original;
    CHECK(assigned.d_model() == d);
    CHECK(assigned.d_ff() == ff);
    moe::FeedForward<T, moe::SiLU> source = *original;
    const moe::FeedForward<T, moe::SiLU> moved = std::move(source);
    original.reset();
    check_forward(copy, m, rng, reference(w_in, w_out));
    check_forward(assigned, m, rng, reference(w_in, w_out));
    check_forward(moved, m, rng, reference(w_in, w_out));
  }
}

TEMPLATE_TEST_CASE("GatedFeedForward views the caller's weights or owns a copy", "[experts]", float, double) {
  using T = TestType;
  std::mt19937 rng(12);
  const index_t d = 2 * kLanes<T> + 3;
  const index_t ff = 3 * kLanes<T> + 1;
  const index_t m = GENERATE(3, 40);
  moe::Matrix<T> w_gate = random_matrix<T>(ff, d, 0.5, rng);
  moe::Matrix<T> w_up = random_matrix<T>(ff, d, 0.5, rng);
  moe::Matrix<T> w_down = random_matrix<T>(d, ff, 0.3, rng);
  auto reference = [](const moe::Matrix<T>& g, const moe::Matrix<T>& u, const moe::Matrix<T>& w) {
    return [g, u, w](const std::vector<double>& x) { return gated_reference<moe::SiLU>(g, u, w, x); };
  };

  SECTION("a view has the caller's pointers and sees later changes to the weights") {
    const moe::SwiGLU<T> view(view_of(w_gate), view_of(w_up), view_of(w_down));
    CHECK(view.w_gate().data() == w_gate.data());
    CHECK(view.w_up().data() == w_up.data());
    CHECK(view.w_down().data() == w_down.data());
    const moe::SwiGLU<T> copy = view;
    CHECK(copy.w_gate().data() == w_gate.data());
    w_up *= T(3);
    check_forward(view, m, rng, reference(w_gate, w_up, w_down));
    check_forward(copy, m, rng, reference(w_gate, w_up, w_down));
  }
  SECTION("copies of an owning expert work after the original is destroyed") {
    auto original = std::make_unique<moe::SwiGLU<T>>(moe::Matrix<T>(w_gate), moe::Matrix<T>(w_up),
                                                     moe::Matrix<T>(w_down));
    CHECK(original->w_gate().data() != w_gate.data());
    const moe::SwiGLU<T> copy = *original;
    CHECK(copy.w_gate().data() != original->w_gate().data());
    CHECK(copy.w_up().data() != original->w_up().data());
    CHECK(copy.w_down().data() != original->w_down().data());
    moe::SwiGLU<T> source = *original;
    const moe::SwiGLU<T> moved = std::move(source);
    original.reset();
    check_forward(copy, m, rng, reference(w_gate, w_up, w_down));
    check_forward(moved, m, rng, reference(w_gate, w_up, w_down));
  }
  SECTION("a vector of owning experts survives reallocation") {
    std::vector<moe::SwiGLU<T>> experts;
    for (int e = 0; e < 5; ++e) {
      experts.emplace_back(moe::Matrix<T>(w_gate), moe::Matrix<T>(w_up), moe::Matrix<T>(w_down));
    }
    for (const moe::SwiGLU<T>& expert : experts) check_forward(expert, m, rng, reference(w_gate, w_up, w_down));
  }
}

TEMPLATE_TEST_CASE("FeedForward rejects mismatched weight shapes, naming both values", "[experts][errors]", float,
                   double) {
  using T = TestType;
  using Expert = moe::FeedForward<T, moe::ReLU>;
  const moe::Matrix<T> w_in = moe::Matrix<T>::Zero(5, 4);  // [d_ff = 5, d = 4]
  const moe::Matrix<T> bad_rows = moe::Matrix<T>::Zero(3, 5);
  const moe::Matrix<T> bad_cols = moe::Matrix<T>::Zero(4, 6);

  SECTION("w_out.rows() != d, viewing and owning") {
    REQUIRE_THROWS_AS(Expert(view_of(w_in), view_of(bad_rows)), moe::invalid_argument);
    REQUIRE_THROWS_AS(Expert(w_in, bad_rows), moe::invalid_argument);
    for (int owning = 0; owning < 2; ++owning) {
      CAPTURE(owning);
      auto make = [&] { return owning ? Expert(w_in, bad_rows) : Expert(view_of(w_in), view_of(bad_rows)); };
      REQUIRE_THROWS_WITH(make(), Catch::Contains("FeedForward") && Catch::Contains("w_out.rows() = 3") &&
                                      Catch::Contains("w_in.cols() (d) = 4"));
    }
  }
  SECTION("w_out.cols() != d_ff, viewing and owning") {
    REQUIRE_THROWS_AS(Expert(view_of(w_in), view_of(bad_cols)), moe::invalid_argument);
    REQUIRE_THROWS_AS(Expert(w_in, bad_cols), moe::invalid_argument);
    for (int owning = 0; owning < 2; ++owning) {
      CAPTURE(owning);
      auto make = [&] { return owning ? Expert(w_in, bad_cols) : Expert(view_of(w_in), view_of(bad_cols)); };
      REQUIRE_THROWS_WITH(make(), Catch::Contains("FeedForward") && Catch::Contains("w_out.cols() = 6") &&
                                      Catch::Contains("w_in.rows() (d_ff) = 5"));
    }
  }
  SECTION("matching shapes construct") {
    const moe::Matrix<T> w_out = moe::Matrix<T>::Zero(4, 5);
    REQUIRE_NOTHROW(Expert(view_of(w_in), view_of(w_out)));
  }
}

TEMPLATE_TEST_CASE("GatedFeedForward rejects mismatched weight shapes, naming both values", "[experts][errors]",
                   float, double) {
  using T = TestType;
  using Expert = moe::GeGLU<T>;
  const index_t d = 4;
  const index_t ff = 5;
  const moe::Matrix<T> w_gate = moe::Matrix<T>::Zero(ff, d);
  const moe::Matrix<T> w_up = moe::Matrix<T>::Zero(ff, d);
  const moe::Matrix<T> w_down = moe::Matrix<T>::Zero(d, ff);

  struct Case {
    const char* what;
    moe::Matrix<T> up;
    moe::Matrix<T> down;
    std::string actual;    // "<name> = <value>"
    std::string expected;  // "<name> = <value>"
  };
  const Case cases[] = {
      {"w_up rows", moe::Matrix<T>::Zero(ff + 1, d), w_down, "w_up.rows() = 6", "w_gate.rows() (d_ff) = 5"},
      {"w_up cols", moe::Matrix<T>::Zero(ff, d + 2), w_down, "w_up.cols() = 6", "w_gate.cols() (d) = 4"},
      {"w_down rows", w_up, moe::Matrix<T>::Zero(d + 3, ff), "w_down.rows() = 7", "w_gate.cols() (d) = 4"},
      {"w_down cols", w_up, moe::Matrix<T>::Zero(d, ff - 2), "w_down.cols() = 3", "w_gate.rows() (d_ff) = 5"},
  };
  for (const Case& c : cases) {
    INFO(c.what);
    REQUIRE_THROWS_AS(Expert(view_of(w_gate), view_of(c.up), view_of(c.down)), moe::invalid_argument);
    REQUIRE_THROWS_AS(Expert(w_gate, c.up, c.down), moe::invalid_argument);
    REQUIRE_THROWS_WITH(Expert(view_of(w_gate), view_of(c.up), view_of(c.down)),
                        Catch::Contains("GatedFeedForward") && Catch::Contains(c.actual) && Catch::Contains(c.expected));
    REQUIRE_THROWS_WITH(Expert(w_gate, c.up, c.down),
                        Catch::Contains("GatedFeedForward") && Catch::Contains(c.actual) && Catch::Contains(c.expected));
  }
  REQUIRE_NOTHROW(Expert(view_of(w_gate), view_of(w_up), view_of(w_down)));
}

namespace {
// The expert contract (experts/expert_concept.hpp) met with declarations only, and types that
// each break one part of it (a derived class's member of the same name hides the base's).
struct MinimalExpert {
  using Scalar = float;
  struct Gradient {
    template <class F>
    void for_each(F f);
    template <class F>
    void for_each(F f) const;
  };
  index_t d_model() const;
  index_t d_ff() const;
  index_t scratch_size(index_t m) const;
  index_t saved_size(index_t m) const;
  Gradient zero_gradient() const;
  template <class Arch>
  void forward(Arch, const float* x, index_t m, float* y, float* scratch) const;
  template <class Arch>
  void forward_saving(Arch, const float* x, index_t m, float* y, float* saved, float* scratch) const;
  template <class Arch>
  void backward(const float* x, index_t m, const float* dy, const float* saved, float* dx, Gradient& grad, Arch) const;
};
struct NoBackward : MinimalExpert {
  void backward() const;
};
struct ForwardWithoutScratch : MinimalExpert {
  template <class Arch>
  void forward(Arch, const float* x, index_t m, float* y) const;
};
struct ForwardNotConst : MinimalExpert {
  template <class Arch>
  void forward(Arch, const float* x, index_t m, float* y, float* scratch);
};
struct GradientWithoutForEach : MinimalExpert {
  struct Gradient {};
  Gradient zero_gradient() const;
  template <class Arch>
  void backward(const float* x, index_t m, const float* dy, const float* saved, float* dx, Gradient& grad, Arch) const;
};
struct NoDff : MinimalExpert {
  void d_ff() const;  // returns nothing
};
struct DoubleForwardOnFloats : MinimalExpert {  // Scalar double, members on float
  using Scalar = double;
};
struct IntegerScalar : MinimalExpert {
  using Scalar = int;
};
}  // namespace

TEST_CASE("is_expert_v accepts moe's experts and rejects a type that breaks one part of the contract", "[experts]") {
  STATIC_REQUIRE(moe::is_expert_v<moe::FeedForward<float>>);
  STATIC_REQUIRE(moe::is_expert_v<moe::FeedForward<double, moe::GELU>>);
  STATIC_REQUIRE(moe::is_expert_v<moe::SwiGLU<float>>);
  STATIC_REQUIRE(moe::is_expert_v<moe::GeGLU<double>>);
  STATIC_REQUIRE(moe::is_expert_v<MinimalExpert>);
  STATIC_REQUIRE_FALSE(moe::is_expert_v<int>);
  STATIC_REQUIRE_FALSE(moe::is_expert_v<NoBackward>);
  STATIC_REQUIRE_FALSE(moe::is_expert_v<ForwardWithoutScratch>);
  STATIC_REQUIRE_FALSE(moe::is_expert_v<ForwardNotConst>);
  STATIC_REQUIRE_FALSE(moe::is_expert_v<GradientWithoutForEach>);
  STATIC_REQUIRE_FALSE(moe::is_expert_v<NoDff>);
  STATIC_REQUIRE_FALSE(moe::is_expert_v<DoubleForwardOnFloats>);
  STATIC_REQUIRE_FALSE(moe::is_expert_v<IntegerScalar>);
  // The zero-computation experts take the layer's third constructor argument, not the Expert slot.
  STATIC_REQUIRE_FALSE(moe::is_expert_v<moe::ZeroComputeExpert<float>>);
}

// ---- backward ---------------------------------------------------------------------------------

namespace {

// Checks an expert's backward, both forms: dx and every weight gradient against central
// differences of L = Σ dy ⊙ expert(x) (in double); the workspace form writing over garbage
// gradients against the plain form on zeroed ones, and adding to given ones (the same bits both
// ways); and the plain form adding to what `grad` held. `weights` are the matrices the expert views.
template <class T, class Expert>
void check_backward(const Expert& expert, std::vector<moe::Matrix<T>*> weights, index_t m, std::mt19937& rng) {
  CAPTURE(m);
  const index_t d = expert.d_model();
  moe::Matrix<T> x = random_matrix<T>(m, d, 1.0, rng);
  const moe::Matrix<T> dy = random_matrix<T>(m, d, 1.0, rng);
  auto loss = [&] {  // Σ dy ⊙ y, in double
    moe::Matrix<T> y(m, d);
    std::vector<T> scratch(sz(expert.scratch_size(m)));
    expert.forward(Arch{}, x.data(), m, y.data(), scratch.data());
    return (y.template cast<double>().array() * dy.template cast<double>().array()).sum();
  };
  std::vector<T> saved(sz(expert.saved_size(m))), scratch(sz(expert.scratch_size(m)));
  moe::Matrix<T> y(m, d);
  expert.forward_saving(Arch{}, x.data(), m, y.data(), saved.data(), scratch.data());

  // The plain form on zeroed gradients.
  typename Expert::Gradient plain = expert.zero_gradient();
  moe::Matrix<T> dx(m, d);
  expert.backward(x.data(), m, dy.data(), saved.data(), dx.data(), plain);

  // The workspace form over NaN gradients gives the same bits; from `plain`, twice them.
  typename Expert::Gradient over = expert.zero_gradient();
  over.for_each([](auto& g) { g.setConstant(std::numeric_limits<T>::quiet_NaN()); });
  // (Its scratch guarded: nothing written past backward_scratch_size(m).)
  std::vector<T> backward_scratch(sz(expert.backward_scratch_size(m)) + kGuard, sentinel<T>());
  moe::Matrix<T> dx2(m, d);
  expert.backward(x.data(), m, dy.data(), saved.data(), dx2.data(), over, Arch{}, backward_scratch.data(), false);
  CHECK(dx2 == dx);
  typename Expert::Gradient twice = plain, plain_twice = plain;
  expert.backward(x.data(), m, dy.data(), saved.data(), dx2.data(), twice, Arch{}, backward_scratch.data(), true);
  for (std::size_t i = sz(expert.backward_scratch_size(m)); i < backward_scratch.size(); ++i)
    CHECK(backward_scratch[i] == sentinel<T>());
  expert.backward(x.data(), m, dy.data(), saved.data(), dx2.data(), plain_twice);
  std::vector<const moe::Matrix<T>*> p, o, t, pt;
  plain.for_each([&](const auto& g) { p.push_back(&g); });
  over.for_each([&](const auto& g) { o.push_back(&g); });
  twice.for_each([&](const auto& g) { t.push_back(&g); });
  plain_twice.for_each([&](const auto& g) { pt.push_back(&g); });
  REQUIRE(p.size() == weights.size());
  for (std::size_t i = 0; i < p.size(); ++i) {
    CAPTURE(i);
    CHECK(*o[i] == *p[i]);
    CHECK(*t[i] == *pt[i]);
    if (m > 0) CHECK(*t[i] != *p[i]);  // (it did add)
  }
  if (!std::is_same<T, double>::value) return;

  // Central differences (double): a sample of each weight's entries and of x's.
  auto slope = [&](T& entry) {
    const double h = 1e-6;
    const T keep = entry;
    entry = keep + T(h);
    const double up = loss();
    entry = keep - T(h);
    const double down = loss();
    entry = keep;
    return (up - down) / (2 * h);
  };
  auto near = [](double got, double want) { return std::abs(got - want) <= 1e-6 * std::max(1.0, std::abs(want)); };
  std::uniform_int_distribution<int> pick(0, 1 << 20);
  for (std::size_t i = 0; i < weights.size(); ++i) {
    for (int sample = 0; sample < 8; ++sample) {
      const index_t at = pick(rng) % weights[i]->size();
      CAPTURE(i, at);
      CHECK(near(static_cast<double>(p[i]->data()[at]), slope(weights[i]->data()[at])));
    }
  }
  for (int sample = 0; m > 0 && sample < 8; ++sample) {
    const index_t at = pick(rng) % x.size();
    CAPTURE(at);
    CHECK(near(static_cast<double>(dx.data()[at]), slope(x.data()[at])));
  }
}

}  // namespace

TEMPLATE_TEST_CASE("Expert backward matches central differences; its workspace form writes over or adds",
                   "[experts][backward]", float, double) {
  using T = TestType;
  const index_t m = GENERATE(as<index_t>{}, 0, 1, 5, 13);
  const Shape s = GENERATE(from_range(shapes<T>()));
  CAPTURE(s.d, s.ff);
  std::mt19937 rng(static_cast<std::uint32_t>(3000 * m + 10 * s.d + s.ff));
  const double in_scale = 1.0 / std::sqrt(static_cast<double>(s.d)), out_scale = 1.0 / std::sqrt(static_cast<double>(s.ff));
  {
    moe::Matrix<T> w_in = random_matrix<T>(s.ff, s.d, in_scale, rng), w_out = random_matrix<T>(s.d, s.ff, out_scale, rng);
    INFO("FeedForward, GELU");
    check_backward<T>(moe::FeedForward<T, moe::GELU>(view_of(w_in), view_of(w_out)), {&w_in, &w_out}, m, rng);
  }
  {
    moe::Matrix<T> w_gate = random_matrix<T>(s.ff, s.d, in_scale, rng), w_up = random_matrix<T>(s.ff, s.d, in_scale, rng),
                   w_down = random_matrix<T>(s.d, s.ff, out_scale, rng);
    INFO("SwiGLU");
    check_backward<T>(moe::SwiGLU<T>(view_of(w_gate), view_of(w_up), view_of(w_down)), {&w_gate, &w_up, &w_down}, m, rng);
  }
}

// d = 160 > d_ff = 136, both over two AVX-512 panels, on 140 tokens (over one depth chunk): every
// weight gradient's product packs its left operand (simd::matmul_tn) into backward's scratch,
// dyᵀ's d · m elements the most. check_backward: the gradients against central differences, and
// nothing written past backward_scratch_size(m).
TEMPLATE_TEST_CASE("Expert backward packs its products' operands within backward_scratch_size", "[experts][backward]",
                   float, double) {
  using T = TestType;
  const index_t m = 140, d = 160, ff = 136;
  std::mt19937 rng(41);
  const double in_scale = 1.0 / std::sqrt(double(d)), out_scale = 1.0 / std::sqrt(double(ff));
  moe::Matrix<T> w_in = random_matrix<T>(ff, d, in_scale, rng), w_out = random_matrix<T>(d, ff, out_scale, rng);
  moe::Matrix<T> w_up = random_matrix<T>(ff, d, in_scale, rng);
  const moe::FeedForward<T, moe::GELU> ffn(view_of(w_in), view_of(w_out));
  const moe::SwiGLU<T> swiglu(view_of(w_in), view_of(w_up), view_of(w_out));
  {
    INFO("FeedForward, GELU");
    check_backward<T>(ffn, {&w_in, &w_out}, m, rng);
  }
  {
    INFO("SwiGLU");
    check_backward<T>(swiglu, {&w_in, &w_up, &w_out}, m, rng);
  }
}

// Every zero-computation kind: dx and the value / mix gradients against central differences of
// L = Σ dy ⊙ E(x) (in double), with d not a multiple of the lane count and m = 0; backward adds to
// the gradients it is given.
TEST_CASE("ZeroComputeExpert backward matches central differences for every kind", "[experts][zero_compute]") {
  using Expert = moe::ZeroComputeExpert<double>;
  const index_t d = GENERATE(index_t(3), kLanes<double> + 1), m = GENERATE(index_t(0), index_t(1), index_t(4));
  const int kind = GENERATE(0, 1, 2, 3);  // zero, copy, constant, MoE++'s mixed constant
  CAPTURE(d, m, kind);
  std::mt19937 rng(static_cast<std::uint32_t>(100 * d + 10 * m + kind));
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  auto random = [&](index_t rows, index_t cols) {
    return moe::Matrix<double>(moe::Matrix<double>::NullaryExpr(rows, cols, [&] { return u(rng); }));
  };
  const moe::Matrix<double> x = random(m, d), dy = random(m, d), mix = random(2, d);
  const moe::Vector<double> value = random(d, 1);
  auto make = [&](const moe::Vector<double>& v, const moe::Matrix<double>& mx) {
    switch (kind) {
      case 0: return Expert::zero(d);
      case 1: return Expert::copy(d);
      case 2: return Expert::constant(v);
      default: return Expert::constant(v, mx);
    }
  };
  auto loss = [&](const moe::Matrix<double>& xs, const moe::Vector<double>& v, const moe::Matrix<double>& mx) {
    moe::Matrix<double> y(m, d);
    make(v, mx).forward(Arch{}, xs.data(), m, y.data());
    return dy.cwiseProduct(y).sum();
  };
  const Expert expert = make(value, mix);
  Expert::Gradient grad = expert.zero_gradient();
  const moe::Vector<double> value_before = grad.value.size() > 0 ? moe::Vector<double>(random(d, 1)) : moe::Vector<double>();
  const moe::Matrix<double> mix_before = grad.mix.size() > 0 ? random(2, d) : moe::Matrix<double>();
  if (grad.value.size() > 0) grad.value = value_before;  // backward adds to what it is given
  if (grad.mix.size() > 0) grad.mix = mix_before;
  moe::Matrix<double> dx = moe::Matrix<double>::Constant(m, d, 7.0);  // written whole
  expert.backward(x.data(), m, dy.data(), dx.data(), grad);

  const double h = 1e-6, tol = 1e-7;
  for (index_t i = 0; i < x.size(); ++i) {
    moe::Matrix<double> up = x, down = x;
    up.data()[i] += h, down.data()[i] -= h;
    CHECK(std::abs(dx.data()[i] - (loss(up, value, mix) - loss(down, value, mix)) / (2 * h)) < tol);
  }
  REQUIRE(grad.value.size() == (kind >= 2 ? d : 0));
  for (index_t i = 0; i < grad.value.size(); ++i) {
    moe::Vector<double> up = value, down = value;
    up[i] += h, down[i] -= h;
    CHECK(std::abs(grad.value[i] - value_before[i] - (loss(x, up, mix) - loss(x, down, mix)) / (2 * h)) < tol);
  }
  REQUIRE(grad.mix.size() == (kind == 3 ? 2 * d : 0));
  for (index_t i = 0; i < grad.mix.size(); ++i) {
    moe::Matrix<double> up = mix, down = mix;
    up.data()[i] += h, down.data()[i] -= h;
    CHECK(std::abs(grad.mix.data()[i] - mix_before.data()[i] - (loss(x, value, up) - loss(x, value, down)) / (2 * h)) < tol);
  }
}

}  // namespace experts_test
