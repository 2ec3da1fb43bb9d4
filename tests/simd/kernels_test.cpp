// The SIMD kernels (include/moe/simd/) and the activations (experts/activations.hpp) against
// scalar references in double written here, for float and double.
//
// Every kernel runs at lengths around the lane count L, n ∈ {0, 1, L-1, L, L+1, 3L+2}, so the
// vector body, the scalar tail and both together are exercised, and with pointers 0 and 1
// element into an aligned allocation (1 misaligns every vector load and store). Inputs are
// allocated to their exact size, so the asan preset reports a read past the end; outputs are
// followed (and, at offset 1, preceded) by guard elements, so a write outside [0, n) is seen in
// every build.
//
// Tolerances are rounding-error bounds of the kernel's algorithm, proportional to eps·|expected|
// (eps = std::numeric_limits<T>::epsilon()); each is stated where it is used. Where a formula
// subtracts nearly equal numbers the bound is eps times the size of the operands instead of the
// result, and where the reference underflows the floor is the smallest normal number.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <type_traits>
#include <utility>
#include <vector>

#include <catch2/catch.hpp>
#include <moe/moe.hpp>

#include "../support/reference.hpp"

// (A namespace of its own: this file may share a translation unit with other test files.)
namespace kernels_test {

namespace {

using Arch = moe::simd::default_arch;
using moe::index_t;

template <class T>
constexpr std::size_t kLanes = moe::simd::lanes<T, Arch>();

// Lengths around the lane count: 0, 1, L - 1, L, L + 1, 3L + 2.
template <class T>
std::vector<std::size_t> lengths_around_lanes() {
  constexpr std::size_t L = kLanes<T>;
  return {0, 1, L - 1, L, L + 1, 3 * L + 2};
}

template <class T>
double eps() {
  return static_cast<double>(std::numeric_limits<T>::epsilon());
}

// Smallest normal T: the absolute floor of a bound where the reference underflows.
template <class T>
double tiny() {
  return static_cast<double>(std::numeric_limits<T>::min());
}

template <class T>
double dbl(T v) {
  return static_cast<double>(v);
}

constexpr double kInf = std::numeric_limits<double>::infinity();

// One step of the kernels' chains of multiply-adds: x · y + z rounded once where the target has
// FMA, and twice where it has none (an SSE2 build: xsimd's lanes multiply, then add).
template <class T>
T chain_step(T x, T y, T z) {
  if constexpr (moe::simd::target_has_fma()) {
    return std::fma(x, y, z);
  } else {
    const T product = x * y;
    return product + z;
  }
}

// `n` elements starting `offset` elements into an aligned allocation, followed by `guard`
// elements. Everything outside [0, n) holds sentinel() until someone writes there.
template <class T>
class Guarded {
 public:
  Guarded(std::size_t n, std::size_t offset, std::size_t guard)
      : n_(n), offset_(offset), storage_(offset + n + guard, sentinel()) {}

  static T sentinel() { return T(-1234.5); }

  T* data() noexcept { return storage_.data() + offset_; }
  const T* data() const noexcept { return storage_.data() + offset_; }
  T& operator[](std::size_t i) noexcept { return data()[i]; }
  const T& operator[](std::size_t i) const noexcept { return data()[i]; }
  std::size_t size() const noexcept { return n_; }

  // True when nothing outside [0, n) was written.
  bool guards_intact() const {
    for (std::size_t i = 0; i < storage_.size(); ++i) {
      const bool inside = i >= offset_ && i < offset_ + n_;
      if (!inside && !(storage_[i] == sentinel())) return false;
    }
    return true;
  }

 private:
  std::size_t n_;
  std::size_t offset_;
  std::vector<T, Eigen::aligned_allocator<T>> storage_;
};

// Guard elements after an output: more than a vector, so a whole stray store lands in them.
template <class T>
constexpr std::size_t kGuard = 2 * kLanes<T> + 1;

// An input of n elements (no guard after it: asan sees over-reads).
template <class T>
Guarded<T> input(std::size_t n, std::size_t offset) {
  return Guarded<T>(n, offset, 0);
}
// An output of n elements with guards.
template <class T>
Guarded<T> output(std::size_t n, std::size_t offset) {
  return Guarded<T>(n, offset, kGuard<T>);
}

template <class T>
void fill_uniform(T* x, std::size_t n, double lo, double hi, std::mt19937& rng) {
  std::uniform_real_distribution<double> dist(lo, hi);
  for (std::size_t i = 0; i < n; ++i) x[i] = static_cast<T>(dist(rng));
}

std::mt19937 make_rng(std::size_t a, std::size_t b = 0, std::size_t c = 0) {
  return std::mt19937(static_cast<std::uint32_t>(1 + 1000003 * a + 1009 * b + c));
}

// ---- scalar references in double ----------------------------------------------------------------

double max_reference(const double* x, std::size_t n) {
  double m = -kInf;
  for (std::size_t i = 0; i < n; ++i) m = std::max(m, x[i]);
  return m;
}

template <class T>
std::vector<double> to_doubles(const T* x, std::size_t n) {
  std::vector<double> out(n);
  for (std::size_t i = 0; i < n; ++i) out[i] = dbl(x[i]);
  return out;
}

// Softmax in double, with the rounding bound of the kernel's algorithm (max, e_i = exp(x_i - m),
// sum, one reciprocal, one multiply) for T:
//   e_i carries a relative error of at most (4 + |x_i - m|)·eps: exp is within 2 ulp, and the
//   rounding of x_i - m (eps/2 relative) is amplified by |x_i - m| through exp;
//   the sum adds n·eps relative to the exact sum, plus the e_i errors weighted by e_i / sum;
//   the reciprocal and the multiply add 2·eps.
// So |p_i - ref_i| <= (e_rel_i + sum_rel + 2·eps)·ref_i.
struct SoftmaxReference {
  std::vector<double> p;      // softmax(x)
  std::vector<double> bound;  // |kernel p_i - p_i| <= bound_i
  double sum = 0;             // sum of exp(x_i - m)
  double sum_rel = 0;         // relative error bound of the kernel's sum
};

template <class T>
SoftmaxReference softmax_reference(const std::vector<double>& x) {
  const std::size_t n = x.size();
  SoftmaxReference r;
  r.p.resize(n);
  r.bound.resize(n);
  const double m = max_reference(x.data(), n);
  std::vector<double> e_rel(n);
  double weighted_rel = 0;
  for (std::size_t i = 0; i < n; ++i) {
    r.p[i] = std::exp(x[i] - m);
    r.sum += r.p[i];
    e_rel[i] = (4 + std::abs(x[i] - m)) * eps<T>();
    weighted_rel += e_rel[i] * r.p[i];
  }
  r.sum_rel = static_cast<double>(n) * eps<T>() + weighted_rel / r.sum;
  for (std::size_t i = 0; i < n; ++i) {
    r.p[i] /= r.sum;
    r.bound[i] = (e_rel[i] + r.sum_rel + 2 * eps<T>()) * r.p[i];
  }
  return r;
}

// Indices of the k largest values, larger first and on equal values the lower index first: a
// stable sort by descending value. NaN ranks after every number (documented in top_k.hpp).
std::vector<index_t> top_k_reference(const std::vector<double>& x, std::size_t k) {
  std::vector<index_t> idx(x.size());
  std::iota(idx.begin(), idx.end(), index_t(0));
  std::stable_sort(idx.begin(), idx.end(), [&x](index_t a, index_t b) {
    const double va = x[static_cast<std::size_t>(a)];
    const double vb = x[static_cast<std::size_t>(b)];
    if (std::isnan(va)) return false;
    if (std::isnan(vb)) return true;
    return va > vb;
  });
  idx.resize(k);
  return idx;
}

// σ(z) in double, accurate on both sides (1 / (1 + e^-z) flushes to 0 below z ≈ -709).
double logistic_reference(double z) { return z < 0 ? std::exp(z) / (1 + std::exp(z)) : 1 / (1 + std::exp(-z)); }

// 2u for tanh GELU: σ(2u) = 0.5·(1 + tanh(u)).
double tanh_gelu_2u(double x) { return 2 * std::sqrt(2.0 / 3.14159265358979323846) * (x + 0.044715 * x * x * x); }

// 1 + |z|·(1 − σ(z)): σ(z) moves by |z|·(1 − σ(z)) times z's relative error (0 where σ(z) = 1,
// though z may be infinite).
double logistic_condition(double z) {
  const double one_minus_s = logistic_reference(-z);
  return 1 + (one_minus_s == 0 ? 0.0 : std::abs(z) * one_minus_s);
}

// Activations in double, in forms free of cancellation (algebraically equal to the definitions:
// GELU = 0.5·x·(1 + erf(x/√2)) = 0.5·x·erfc(-x/√2); tanh GELU = 0.5·x·(1 + tanh(u)) = x·σ(2u)),
// so the reference is accurate to double rounding.
double reference(moe::ReLU, double x) { return x > 0 ? x : 0.0; }
double reference(moe::GELU, double x) { return 0.5 * x * std::erfc(-x / std::sqrt(2.0)); }
double reference(moe::GELUTanh, double x) { return x * logistic_reference(tanh_gelu_2u(x)); }
double reference(moe::SiLU, double x) { return x / (1.0 + std::exp(-x)); }

// The error of xsimd 8.1's erfc(t) for double batches, relative to erfc(t) and in eps, beyond what
// the rounding of t explains. Up to 21 eps below |t| = 2.2 (measured against erfcl in steps of
// 1e-4; 40 here); from 2.2 on it evaluates every |t| with a fit made for [2.2, 6] (erfc3; its erfc4
// for t ≥ 6 is unused), off by 1.8e4 eps of erfc(|t|) at |t| = 2.2 and by 1.7e5, 3.3e6 and 2.8e7
// at 10, 15 and 26.5: 4e3·|t|³ covers that 2.3 times. For t < 0, erfc(t) = 2 − erfc(|t|) takes
// the same absolute error. Float batches and std::erfc are within 40 eps everywhere, which the
// conditioning terms cover (x² ≥ 2t²).
template <class T>
double batch_erfc_error(double t) {
  const double a = std::abs(t);
  const double share = t > 0 ? 1 : std::erfc(a) / std::erfc(t);  // 0 where erfc(a) underflows
  if (!std::is_same<T, double>::value || share == 0) return 0;
  return (a < 2.2 ? 40 : 4e3 * a * a * a) * share;
}

// eps·rel·|ref| plus the smallest normal number (the floor where the reference underflows); a
// reference of 0 gives the floor alone, though rel may be infinite where x² overflows.
template <class T>
double relative_bound(double rel, double ref) {
  return ref == 0 ? tiny<T>() : eps<T>() * rel * std::abs(ref) + tiny<T>();
}

// |Act::apply(x) - reference| for x in T, relative to the reference (plus the smallest normal
// number, where the reference underflows), with the conditioning of each formula on its rounded
// argument:
//  - ReLU is exact;
//  - SiLU = x / (1 + exp(-x)), exp's argument exact: 8·eps·|ref| (exp 2 ulp, add, divide);
//  - GELU = 0.5·x·erfc(t), t = -x/√2 rounded: for x < 0, erfc(t) moves by 2t² = x² times t's
//    relative error, so 4·eps·(1 + x²)·|ref| (x ≥ 0: erfc(t) is near 2, insensitive), plus
//    batch_erfc_error for xsimd's double erfc;
//  - tanh GELU = x·σ(2u), 2u rounded: 4·eps·logistic_condition(2u)·|ref|.
// Measured, scalar and batch, over [-40, 15] in steps of 1e-3 and activation_arguments: at most
// 0.50 of the bound for GELU (float batch, x = 0.094; double batch 0.42 at x = -3.11) and 0.42 for
// tanh GELU (double batch, x = -0.149). The old forms, 0.5·x·(1 + erf) and 0.5·x·(1 + tanh) with
// 1 + f cancelling for x < 0 (float GELU(-5) 4% off, tanh GELU(-5) 30%, 0 from -5.54 and -5.16
// on in float), exceeded it up to 6.6e4 and 1.1e5 times in float, 5.4e9 and 2.9e13 in double.
template <class T>
double activation_bound(moe::ReLU, double, double) {
  return 0;
}
template <class T>
double activation_bound(moe::SiLU, double, double ref) {
  return 8 * eps<T>() * std::abs(ref) + tiny<T>();
}
template <class T>
double activation_bound(moe::GELU, double x, double ref) {
  const double t = -x / std::sqrt(2.0);
  return relative_bound<T>(4 * (1 + (x < 0 ? x * x : 0.0)) + batch_erfc_error<T>(t), ref);
}
template <class T>
double activation_bound(moe::GELUTanh, double x, double ref) {
  return relative_bound<T>(4 * logistic_condition(tanh_gelu_2u(x)), ref);
}

// act'(x) in double, from the derivatives of the formulas above (check_derivative compares them
// with central differences of reference()), in the same cancellation-free forms. Beyond |x| = 1e5
// every derivative is 0 below and 1 above, written out because tanh GELU's formula would multiply
// σ(1 − σ) = 0 by an infinite x².
double derivative_reference(moe::ReLU, double x) { return x > 0 ? 1.0 : 0.0; }
double derivative_reference(moe::GELU, double x) {
  return 0.5 * std::erfc(-x / std::sqrt(2.0)) + x * std::exp(-0.5 * x * x) / std::sqrt(2 * 3.14159265358979323846);
}
double derivative_reference(moe::GELUTanh, double x) {
  if (std::abs(x) > 1e5) return x > 0 ? 1.0 : 0.0;
  const double z = tanh_gelu_2u(x), s = logistic_reference(z), one_minus_s = logistic_reference(-z);
  return s + 2 * x * s * one_minus_s * std::sqrt(2.0 / 3.14159265358979323846) * (1 + 3 * 0.044715 * x * x);
}
double derivative_reference(moe::SiLU, double x) {
  const double s = 1 / (1 + std::exp(-x));
  return s + x * s * (1 - s);
}

// |ActivationDerivative<Act>::apply(x) - derivative_reference|, relative to the size of the
// derivative's terms (their sum cancels where the derivative crosses 0), with the conditioning of
// activation_bound:
//  - ReLU is exact;
//  - GELU = Φ(x) + x·φ(x): 4·eps·(1 + x²)·(Φ(x) + |x|·φ(x)) for x < 0 (Φ's erfc as in GELU, and
//    exp(-x²/2) moves by x²/2 times x²'s relative error), plus batch_erfc_error on Φ(x);
//  - tanh GELU = σ(2u) + 2x·σ(1 − σ)·u': 4·eps·logistic_condition(2u)·(σ + 2|x|·σ(1 − σ)·u');
//  - SiLU = σ(x)·(1 + x·(1 − σ(x))): 1 − σ cancels for x > 0 (an absolute eps, times x), so
//    4·eps·(1 + |x|)·σ(x)·(1 + |x|·(1 − σ(x))).
// Measured as for activation_bound: at most 0.51 of the bound for GELU (float batch, x = 0.094;
// double batch 0.42 at x = -3.11), 0.39 for tanh GELU (double batch, x = 1.65) and 0.32 for SiLU
// (float, x = 0.041). The old GELU and tanh GELU derivatives exceeded it 2.0e3 and 1.1e5 times
// (float), 5.3e9 and 2.8e13 times (double).
template <class T>
double derivative_bound(moe::ReLU, double) {
  return 0;
}
template <class T>
double derivative_bound(moe::GELU, double x) {
  const double t = -x / std::sqrt(2.0);
  const double cdf = 0.5 * std::erfc(t), pdf = std::exp(-0.5 * x * x) / std::sqrt(2 * 3.14159265358979323846);
  const double terms = cdf + std::abs(x) * pdf;
  if (terms == 0) return tiny<T>();
  return eps<T>() * (4 * (1 + (x < 0 ? x * x : 0.0)) * terms + batch_erfc_error<T>(t) * cdf) + tiny<T>();
}
template <class T>
double derivative_bound(moe::GELUTanh, double x) {
  const double z = tanh_gelu_2u(x), s = logistic_reference(z), one_minus_s = logistic_reference(-z);
  const double du = std::sqrt(2.0 / 3.14159265358979323846) * (1 + 3 * 0.044715 * x * x);
  const double slope = s * one_minus_s;
  const double terms = s + (slope == 0 ? 0.0 : 2 * std::abs(x) * slope * du);  // (du may be infinite)
  return relative_bound<T>(4 * logistic_condition(z), terms);
}
template <class T>
double derivative_bound(moe::SiLU, double x) {
  const double s = 1 / (1 + std::exp(-x));
  return relative_bound<T>(4 * (1 + std::abs(x)), s * (1 + std::abs(x) * (1 - s)));
}

// Largest |act'(x)| over all x (ReLU 1, SiLU 1.0998, GELU 1.1289, tanh GELU 1.1289), rounded up:
// how far an error in an activation's argument can move its value.
constexpr double kActivationLipschitz = 1.2;

}  // namespace

// ---- softmax.hpp ---------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("simd::max_value finds the largest element at every position", "[simd][softmax]", float, double) {
  using T = TestType;
  const std::size_t n = GENERATE(from_range(lengths_around_lanes<T>()));
  const std::size_t offset = GENERATE(as<std::size_t>{}, 0, 1);
  CAPTURE(n, offset);
  auto rng = make_rng(n, offset);

  // All negative: a kernel that starts from 0 instead of -inf fails.
  Guarded<T> x = input<T>(n, offset);
  fill_uniform(x.data(), n, -100.0, -1.0, rng);
  const std::vector<double> xd = to_doubles(x.data(), n);
  CHECK(dbl(moe::simd::max_value(Arch{}, x.data(), n)) == max_reference(xd.data(), n));

  // The maximum in each lane, in the tail, first and last.
  for (std::size_t p = 0; p < n; ++p) {
    CAPTURE(p);
    const T saved = x[p];
    x[p] = T(7.5);
    CHECK(moe::simd::max_value(Arch{}, x.data(), n) == T(7.5));
    x[p] = saved;
  }

  // All -inf (and n == 0) gives -inf.
  std::fill(x.data(), x.data() + n, -std::numeric_limits<T>::infinity());
  CHECK(dbl(moe::simd::max_value(Arch{}, x.data(), n)) == -kInf);
}

TEMPLATE_TEST_CASE("simd::exp_shifted matches exp(x - shift) and its sum", "[simd][softmax]", float, double) {
  using T = TestType;
  const std::size_t n = GENERATE(from_range(lengths_around_lanes<T>()));
  const std::size_t offset = GENERATE(as<std::size_t>{}, 0, 1);
  const T shift = GENERATE(T(0), T(1.25), T(-3.5));
  CAPTURE(n, offset, shift);
  auto rng = make_rng(n, offset, 2);

  Guarded<T> x = input<T>(n, offset);
  fill_uniform(x.data(), n, -4.0, 4.0, rng);
  Guarded<T> out = output<T>(n, offset);
  const T sum = moe::simd::exp_shifted(Arch{}, x.data(), shift, out.data(), n);

  // Each element: exp within 2 ulp plus the rounding of x - shift amplified by |x - shift|,
  // (4 + |x_i - shift|)·eps·ref_i. The sum: those errors plus n·eps for the additions.
  double ref_sum = 0;
  double sum_bound = 0;
  for (std::size_t i = 0; i < n; ++i) {
    CAPTURE(i);
    const double d = dbl(x[i]) - dbl(shift);
    const double ref = std::exp(d);
    const double bound = (4 + std::abs(d)) * eps<T>() * ref;
    CHECK(std::abs(dbl(out[i]) - ref) <= bound);
    ref_sum += ref;
    sum_bound += bound;
  }
  sum_bound += static_cast<double>(n) * eps<T>() * ref_sum;
  CHECK(std::abs(dbl(sum) - ref_sum) <= sum_bound);
  CHECK(out.guards_intact());

  // In place (out == x) gives the same bits.
  Guarded<T> y = output<T>(n, offset);
  std::copy(x.data(), x.data() + n, y.data());
  const T sum_in_place = moe::simd::exp_shifted(Arch{}, y.data(), shift, y.data(), n);
  CHECK(sum_in_place == sum);
  for (std::size_t i = 0; i < n; ++i) CHECK(y[i] == out[i]);
  CHECK(y.guards_intact());
}

TEMPLATE_TEST_CASE("simd::scale multiplies every element once", "[simd][softmax]", float, double) {
  using T = TestType;
  const std::size_t n = GENERATE(from_range(lengths_around_lanes<T>()));
  const std::size_t offset = GENERATE(as<std::size_t>{}, 0, 1);
  CAPTURE(n, offset);
  auto rng = make_rng(n, offset, 3);

  Guarded<T> x = output<T>(n, offset);
  fill_uniform(x.data(), n, -10.0, 10.0, rng);
  const std::vector<double> before = to_doubles(x.data(), n);
  const T factor = T(0.3710937);
  moe::simd::scale(Arch{}, factor, x.data(), n);
  // One rounded multiply: within eps/2·|ref|; eps·|ref| is asked.
  for (std::size_t i = 0; i < n; ++i) {
    CAPTURE(i);
    const double ref = before[i] * dbl(factor);
    CHECK(std::abs(dbl(x[i]) - ref) <= eps<T>() * std::abs(ref));
  }
  CHECK(x.guards_intact());
}

TEMPLATE_TEST_CASE("simd::all_finite finds one inf or NaN at any position", "[simd][softmax]", float, double) {
  using T = TestType;
  const std::size_t n = GENERATE(from_range(lengths_around_lanes<T>()));
  const std::size_t offset = GENERATE(as<std::size_t>{}, 0, 1);
  CAPTURE(n, offset);
  auto rng = make_rng(n, offset, 4);
  Guarded<T> x = input<T>(n, offset);  // no guard after it: asan sees a read past n
  fill_uniform(x.data(), n, -1e30, 1e30, rng);
  CHECK(moe::simd::all_finite(Arch{}, x.data(), n));
  const T max = std::numeric_limits<T>::max();
  for (std::size_t i = 0; i < n; ++i) {
    CAPTURE(i);
    const T kept = x[i];
    for (const T bad : {std::numeric_limits<T>::infinity(), -std::numeric_limits<T>::infinity(),
                        std::numeric_limits<T>::quiet_NaN()}) {
      x[i] = bad;
      CHECK_FALSE(moe::simd::all_finite(Arch{}, x.data(), n));
    }
    x[i] = i % 2 == 0 ? max : -max;  // the largest finite values are finite
    CHECK(moe::simd::all_finite(Arch{}, x.data(), n));
    x[i] = kept;
  }
}

TEMPLATE_TEST_CASE("simd::softmax matches a double reference and sums to 1", "[simd][softmax]", float, double) {
  using T = TestType;
  const std::size_t n = GENERATE(from_range(lengths_around_lanes<T>()));
  const std::size_t offset = GENERATE(as<std::size_t>{}, 0, 1);
  // Moderate logits, and logits of magnitude 1e4 (exp of them overflows; the max shift must
  // keep the result finite).
  const double magnitude = GENERATE(0.0, 1e4);
  CAPTURE(n, offset, magnitude);
  auto rng = make_rng(n, offset, magnitude > 0 ? 5 : 4);

  Guarded<T> x = input<T>(n, offset);
  fill_uniform(x.data(), n, -4.0, 4.0, rng);
  std::bernoulli_distribution sign(0.5);
  for (std::size_t i = 0; i < n; ++i) x[i] = static_cast<T>(dbl(x[i]) + (sign(rng) ? magnitude : -magnitude));
  const SoftmaxReference ref = softmax_reference<T>(to_doubles(x.data(), n));

  Guarded<T> out = output<T>(n, offset);
  moe::simd::softmax(Arch{}, x.data(), out.data(), n);
  double total = 0;
  double total_bound = 0;
  for (std::size_t i = 0; i < n; ++i) {
    CAPTURE(i, x[i]);
    CHECK(std::isfinite(out[i]));
    CHECK(std::abs(dbl(out[i]) - ref.p[i]) <= ref.bound[i]);
    total += dbl(out[i]);
    total_bound += ref.bound[i];
  }
  if (n > 0) CHECK(std::abs(total - 1.0) <= total_bound);
  CHECK(out.guards_intact());

  // In place (out == x) gives the same bits.
  Guarded<T> y = output<T>(n, offset);
  std::copy(x.data(), x.data() + n, y.data());
  moe::simd::softmax(Arch{}, y.data(), y.data(), n);
  for (std::size_t i = 0; i < n; ++i) CHECK(y[i] == out[i]);
  CHECK(y.guards_intact());
}

TEMPLATE_TEST_CASE("simd::softmax of equal logits is uniform", "[simd][softmax]", float, double) {
  using T = TestType;
  const std::size_t n = GENERATE(from_range(lengths_around_lanes<T>()));
  const T value = GENERATE(T(0), T(-1e4), T(1e4));
  if (n == 0) return;
  CAPTURE(n, value);
  std::vector<T> x(n, value);
  std::vector<T> out(n);
  moe::simd::softmax(Arch{}, x.data(), out.data(), n);
  // exp(0) = 1 exactly, so the only roundings are the sum (exact for small integers), the
  // reciprocal and the multiply: 2·eps relative.
  const double ref = 1.0 / static_cast<double>(n);
  for (std::size_t i = 0; i < n; ++i) CHECK(std::abs(dbl(out[i]) - ref) <= 2 * eps<T>() * ref);
}

// Equal inputs must give bit-equal outputs wherever they sit, the row's tail included: a router's
// tie between experts is broken by index only if their scores are equal. Rows of random values
// below the maximum (x[0] = 0), each value copied to the last element, which lies in the tail.
TEMPLATE_TEST_CASE("simd::exp_shifted, softmax and sigmoid give equal inputs equal outputs at every position",
                   "[simd][softmax]", float, double) {
  using T = TestType;
  const std::size_t n = GENERATE(kLanes<TestType> + 1, 2 * kLanes<TestType> + 3, 3 * kLanes<TestType> - 1);
  CAPTURE(n);
  std::mt19937 rng(11);
  std::uniform_real_distribution<double> value(-30.0, -1e-3);
  std::vector<T> x(n), out(n);
  for (int row = 0; row < 500; ++row) {
    x[0] = T(0);
    for (std::size_t i = 1; i + 1 < n; ++i) x[i] = static_cast<T>(value(rng));
    const std::size_t twin = 1 + static_cast<std::size_t>(row) % (n - 2);  // in the SIMD body or the tail
    x[n - 1] = x[twin];
    CAPTURE(row, twin, x[twin]);
    moe::simd::exp_shifted(Arch{}, x.data(), T(-0.5), out.data(), n);
    REQUIRE(out[n - 1] == out[twin]);
    moe::simd::softmax(Arch{}, x.data(), out.data(), n);
    REQUIRE(out[n - 1] == out[twin]);
    moe::simd::sigmoid(Arch{}, x.data(), out.data(), n);
    REQUIRE(out[n - 1] == out[twin]);
  }
}

TEMPLATE_TEST_CASE("simd::log_sum_exp matches a double reference", "[simd][softmax]", float, double) {
  using T = TestType;
  const std::size_t n = GENERATE(from_range(lengths_around_lanes<T>()));
  const std::size_t offset = GENERATE(as<std::size_t>{}, 0, 1);
  const double magnitude = GENERATE(0.0, 1e4);
  CAPTURE(n, offset, magnitude);
  auto rng = make_rng(n, offset, magnitude > 0 ? 7 : 6);

  Guarded<T> x = input<T>(n, offset);
  fill_uniform(x.data(), n, -4.0, 4.0, rng);
  std::bernoulli_distribution sign(0.5);
  for (std::size_t i = 0; i < n; ++i) x[i] = static_cast<T>(dbl(x[i]) + (sign(rng) ? magnitude : -magnitude));
  Guarded<T> scratch = output<T>(n, offset);
  const T got = moe::simd::log_sum_exp(Arch{}, x.data(), scratch.data(), n);
  CHECK(scratch.guards_intact());
  if (n == 0) {
    CHECK(dbl(got) == -kInf);
    return;
  }
  // lse = m + log(S). The kernel's S has relative error sum_rel (see softmax_reference), which
  // moves log(S) by at most sum_rel; log and the final addition round once each:
  // |got - ref| <= sum_rel + eps·(|log S| + |ref|) + eps.
  const std::vector<double> xd = to_doubles(x.data(), n);
  const SoftmaxReference sm = softmax_reference<T>(xd);
  const double log_s = std::log(sm.sum);
  const double ref = max_reference(xd.data(), n) + log_s;
  CHECK(std::isfinite(got));
  CHECK(std::abs(dbl(got) - ref) <= sm.sum_rel + eps<T>() * (std::abs(log_s) + std::abs(ref) + 1));
}

TEMPLATE_TEST_CASE("simd::exp_batch matches std::exp over the whole range, denormal results included", "[simd][softmax]",
                   float, double) {
  using T = TestType;
  using B = moe::simd::batch<T, Arch>;
  constexpr std::size_t L = B::size;
  auto rng = make_rng(L, 0, 10);
  // Where e^x overflows, is normal, is denormal and rounds to 0, and past both ends.
  const double low = sizeof(T) == sizeof(float) ? -110.0 : -760.0, high = sizeof(T) == sizeof(float) ? 95.0 : 715.0;
  const double spacing = static_cast<double>(std::numeric_limits<T>::denorm_min());
  std::vector<T> x(64 * L);
  fill_uniform(x.data(), x.size(), low, high, rng);
  const T special[] = {T(0), -T(0), std::numeric_limits<T>::infinity(), -std::numeric_limits<T>::infinity(),
                       std::numeric_limits<T>::quiet_NaN(), T(1)};
  std::copy(std::begin(special), std::end(special), x.begin());
  for (std::size_t i = 0; i + L <= x.size(); i += L) {
    alignas(64) T out[L];
    moe::simd::exp_batch(B::load_unaligned(x.data() + i)).store_aligned(out);
    for (std::size_t j = 0; j < L; ++j) {
      CAPTURE(x[i + j]);
      const T ref = std::exp(x[i + j]);
      if (std::isnan(ref) || std::isinf(ref)) {
        CHECK((std::isnan(out[j]) == std::isnan(ref) && (std::isnan(ref) || out[j] == ref)));
      } else {
        // 2 ulp (xsimd's bound), plus two roundings to the denormal spacing (the square's factor).
        CHECK(std::abs(dbl(out[j]) - dbl(ref)) <= 4 * eps<T>() * dbl(ref) + 2 * spacing);
      }
    }
  }
}

TEMPLATE_TEST_CASE("simd::sigmoid matches a double reference", "[simd][softmax]", float, double) {
  using T = TestType;
  const std::size_t n = GENERATE(from_range(lengths_around_lanes<T>()));
  const std::size_t offset = GENERATE(as<std::size_t>{}, 0, 1);
  CAPTURE(n, offset);
  auto rng = make_rng(n, offset, 8);

  Guarded<T> x = input<T>(n, offset);
  fill_uniform(x.data(), n, -10.0, 10.0, rng);
  Guarded<T> out = output<T>(n, offset);
  moe::simd::sigmoid(Arch{}, x.data(), out.data(), n);
  // 1 / (1 + exp(-x)): exp within 2 ulp (its argument is exact), then an add and a divide;
  // d log(sigmoid) / d log(e) <= 1, so 8·eps·ref bounds it, plus the smallest normal.
  for (std::size_t i = 0; i < n; ++i) {
    CAPTURE(i, x[i]);
    const double ref = 1.0 / (1.0 + std::exp(-dbl(x[i])));
    CHECK(std::abs(dbl(out[i]) - ref) <= 8 * eps<T>() * ref + tiny<T>());
  }
  CHECK(out.guards_intact());

  // In place gives the same bits.
  Guarded<T> y = output<T>(n, offset);
  std::copy(x.data(), x.data() + n, y.data());
  moe::simd::sigmoid(Arch{}, y.data(), y.data(), n);
  for (std::size_t i = 0; i < n; ++i) CHECK(y[i] == out[i]);
  CHECK(y.guards_intact());
}

TEMPLATE_TEST_CASE("simd::sigmoid keeps its relative precision where the result is denormal", "[simd][softmax]", float,
                   double) {
  using T = TestType;
  const std::size_t n = GENERATE(from_range(lengths_around_lanes<T>()));
  CAPTURE(n);
  auto rng = make_rng(n, 0, 9);
  // From where exp(-x) overflows T (1 / (1 + exp(-x)) would flush to 0) down to where the result
  // rounds to 0: float [-103, -80], double [-744, -700].
  const double lowest = sizeof(T) == sizeof(float) ? -103.0 : -744.0;
  Guarded<T> x = input<T>(n, 0);
  fill_uniform(x.data(), n, lowest, lowest + (sizeof(T) == sizeof(float) ? 23.0 : 44.0), rng);
  Guarded<T> out = output<T>(n, 0);
  moe::simd::sigmoid(Arch{}, x.data(), out.data(), n);
  // exp(x) within 2 ulp, then a divide and a multiply; a denormal result is also rounded to the
  // denormal spacing (twice: exp's result and the product).
  const double spacing = static_cast<double>(std::numeric_limits<T>::denorm_min());
  for (std::size_t i = 0; i < n; ++i) {
    CAPTURE(i, x[i]);
    const double ref = std::exp(dbl(x[i])) / (1.0 + std::exp(dbl(x[i])));  // (1 / (1 + e^-x) overflows in double)
    CHECK(std::abs(dbl(out[i]) - ref) <= 8 * eps<T>() * ref + 2 * spacing);
  }
  CHECK(out.guards_intact());
}

TEMPLATE_TEST_CASE("simd::sigmoid saturates to 0 and 1 without NaN", "[simd][softmax]", float, double) {
  using T = TestType;
  const std::size_t n = GENERATE(from_range(lengths_around_lanes<T>()));
  const std::size_t offset = GENERATE(as<std::size_t>{}, 0, 1);
  CAPTURE(n, offset);
  // Arguments where exp(-x) overflows T (float above 88.7, double above 709.8) or underflows.
  const T pattern[] = {T(1e4), T(-1e4), T(100), T(-1000), T(750), T(-750), T(40), T(-40), T(0)};
  Guarded<T> x = input<T>(n, offset);
  for (std::size_t i = 0; i < n; ++i) x[i] = pattern[i % (sizeof(pattern) / sizeof(pattern[0]))];
  Guarded<T> out = output<T>(n, offset);
  moe::simd::sigmoid(Arch{}, x.data(), out.data(), n);
  for (std::size_t i = 0; i < n; ++i) {
    CAPTURE(i, x[i]);
    CHECK_FALSE(std::isnan(out[i]));
    CHECK(out[i] >= T(0));
    CHECK(out[i] <= T(1));
    const double ref = 1.0 / (1.0 + std::exp(-dbl(x[i])));
    CHECK(std::abs(dbl(out[i]) - ref) <= 8 * eps<T>() * ref + tiny<T>());
  }
  CHECK(out.guards_intact());
}

// ---- top_k.hpp -----------------------------------------------------------------------------------

namespace {

// Runs top_k for every k in [0, n] on x and compares with the stable-sort reference; also checks
// that x is not modified and nothing is written to out past k.
template <class T>
void check_top_k_all_k(const Guarded<T>& x) {
  const std::size_t n = x.size();
  const std::vector<double> xd = to_doubles(x.data(), n);
  for (std::size_t k = 0; k <= n; ++k) {
    CAPTURE(k);
    std::vector<T> values(n);
    std::vector<index_t> indices(n);
    std::vector<index_t> out(n + 1, index_t(-7));
    moe::simd::top_k(Arch{}, x.data(), n, k, out.data(), values.data(), indices.data());
    const std::vector<index_t> ref = top_k_reference(xd, k);
    for (std::size_t j = 0; j < k; ++j) {
      CAPTURE(j);
      CHECK(out[j] == ref[j]);
    }
    for (std::size_t j = k; j <= n; ++j) CHECK(out[j] == index_t(-7));
    // top_k_set: the same k indices, ascending.
    std::vector<index_t> set(n + 1, index_t(-7));
    moe::simd::top_k_set(Arch{}, x.data(), n, k, set.data(), values.data(), indices.data());
    std::vector<index_t> ref_set = ref;
    std::sort(ref_set.begin(), ref_set.end());
    for (std::size_t j = 0; j < k; ++j) CHECK(set[j] == ref_set[j]);
    for (std::size_t j = k; j <= n; ++j) CHECK(set[j] == index_t(-7));
    // sum_of_top: the chosen values added in rank order, to the bit (a NaN among them: NaN).
    T ref_sum(0);
    for (std::size_t j = 0; j < k; ++j) ref_sum += x[static_cast<std::size_t>(ref[j])];
    const T sum = moe::simd::sum_of_top(Arch{}, x.data(), n, k);
    CHECK(((sum == ref_sum && std::signbit(sum) == std::signbit(ref_sum)) || (std::isnan(sum) && std::isnan(ref_sum))));
    for (std::size_t i = 0; i < n; ++i) CHECK((dbl(x[i]) == xd[i] || (std::isnan(x[i]) && std::isnan(xd[i]))));
  }
}

// Lengths for top_k: around the lane count, and long enough that k > kTopKPassLimit (the
// partial-sort path) is reached for both types.
template <class T>
std::vector<std::size_t> top_k_lengths() {
  std::vector<std::size_t> n = lengths_around_lanes<T>();
  n.push_back(moe::simd::kTopKPassLimit + 1);
  n.push_back(40);
  return n;
}

}  // namespace

TEMPLATE_TEST_CASE("simd::top_k, top_k_set and sum_of_top match a stable sort by descending value", "[simd][top_k]",
                   float, double) {
  using T = TestType;
  // Both selection paths are reached: k <= kTopKPassLimit (vectorized passes) and above it
  // (partial sort), since k runs over [0, n] with n up to 40.
  REQUIRE(moe::simd::kTopKPassLimit < 40);
  const std::size_t n = GENERATE(from_range(top_k_lengths<T>()));
  const std::size_t offset = GENERATE(as<std::size_t>{}, 0, 1);
  CAPTURE(n, offset);
  auto rng = make_rng(n, offset, 9);
  constexpr T inf = std::numeric_limits<T>::infinity();
  Guarded<T> x = input<T>(n, offset);

  SECTION("distinct values") {
    fill_uniform(x.data(), n, -5.0, 5.0, rng);
    check_top_k_all_k(x);
  }
  SECTION("many ties (values from {-2, ..., 2}) go to the lower index") {
    std::uniform_int_distribution<int> small(-2, 2);
    for (std::size_t i = 0; i < n; ++i) x[i] = static_cast<T>(small(rng));
    check_top_k_all_k(x);
  }
  SECTION("all values equal: indices 0, 1, ..., k-1") {
    std::fill(x.data(), x.data() + n, T(0.25));
    check_top_k_all_k(x);
  }
  SECTION("-inf values, also tied among themselves") {
    std::uniform_int_distribution<int> pick(0, 3);
    for (std::size_t i = 0; i < n; ++i) {
      const int p = pick(rng);
      x[i] = p == 0 ? -inf : p == 1 ? inf : static_cast<T>(p);
    }
    check_top_k_all_k(x);
  }
  SECTION("NaN values rank last, among themselves by index") {
    std::uniform_int_distribution<int> pick(0, 4);
    for (std::size_t i = 0; i < n; ++i) {
      const int p = pick(rng);
      x[i] = p == 0 ? std::numeric_limits<T>::quiet_NaN() : p == 1 ? -inf : static_cast<T>(p);
    }
    check_top_k_all_k(x);
  }
  SECTION("all -inf") {
    std::fill(x.data(), x.data() + n, -inf);
    check_top_k_all_k(x);
  }
  SECTION("signed zeros, equal to each other, beside -1 and 1") {
    std::uniform_int_distribution<int> pick(0, 3);
    for (std::size_t i = 0; i < n; ++i) {
      const int p = pick(rng);
      x[i] = p == 0 ? T(-0.0) : p == 1 ? T(0.0) : p == 2 ? T(-1) : T(1);
    }
    check_top_k_all_k(x);
  }
  SECTION("largest value last (in the scalar tail)") {
    fill_uniform(x.data(), n, -5.0, 5.0, rng);
    if (n > 0) x[n - 1] = T(100);
    check_top_k_all_k(x);
  }
}

TEMPLATE_TEST_CASE("simd::top_k_set takes both of its paths above the passes", "[simd][top_k]", float, double) {
  using T = TestType;
  // n = 600: k = 9 and 18 rank through top_k's partial sort (k · kTopKPartitionShare < n); k = 19,
  // 100 and 599 partition. Ties from a small value set, a NaN and -inf among them.
  REQUIRE(18 * moe::simd::kTopKPartitionShare < 600);
  REQUIRE(19 * moe::simd::kTopKPartitionShare >= 600);
  const std::size_t n = GENERATE(as<std::size_t>{}, 600);  // (a runtime value: g++ -O3 misread a constant n's loops)
  auto rng = make_rng(n, 0, 11);
  std::uniform_int_distribution<int> small(-20, 20);
  std::vector<T> x(n);
  for (auto& v : x) v = static_cast<T>(small(rng)) / T(4);
  x.at(7) = std::numeric_limits<T>::quiet_NaN();  // (at(): g++ 12 -O3 -Wnull-dereference saw an empty x)
  x.at(300) = -std::numeric_limits<T>::infinity();
  std::vector<T> values(n);
  std::vector<index_t> indices(n);
  for (const std::size_t k : {std::size_t(9), std::size_t(18), std::size_t(19), std::size_t(100), std::size_t(599)}) {
    CAPTURE(k);
    std::vector<index_t> set(k + 1, index_t(-7));
    moe::simd::top_k_set(Arch{}, x.data(), n, k, set.data(), values.data(), indices.data());
    std::vector<index_t> ref = top_k_reference(to_doubles(x.data(), n), k);
    std::sort(ref.begin(), ref.end());
    for (std::size_t j = 0; j < k; ++j) CHECK(set[j] == ref[j]);
    CHECK(set[k] == index_t(-7));
  }
}

// ---- rows.hpp ------------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("simd::copy_row copies exactly n elements", "[simd][rows]", float, double) {
  using T = TestType;
  const std::size_t n = GENERATE(from_range(lengths_around_lanes<T>()));
  const std::size_t src_offset = GENERATE(as<std::size_t>{}, 0, 1);
  const std::size_t dst_offset = GENERATE(as<std::size_t>{}, 0, 1);
  CAPTURE(n, src_offset, dst_offset);
  auto rng = make_rng(n, src_offset, 10 + dst_offset);
  Guarded<T> src = input<T>(n, src_offset);
  fill_uniform(src.data(), n, -1.0, 1.0, rng);
  Guarded<T> dst = output<T>(n, dst_offset);
  moe::simd::copy_row(Arch{}, src.data(), dst.data(), n);
  for (std::size_t i = 0; i < n; ++i) CHECK(dst[i] == src[i]);
  CHECK(dst.guards_intact());
}

TEMPLATE_TEST_CASE("simd::gather_rows copies the listed rows in order", "[simd][rows]", float, double) {
  using T = TestType;
  const std::size_t n = GENERATE(from_range(lengths_around_lanes<T>()));
  const std::size_t offset = GENERATE(as<std::size_t>{}, 0, 1);
  const std::size_t count = GENERATE(as<std::size_t>{}, 0, 1, 4, 6);
  CAPTURE(n, offset, count);
  auto rng = make_rng(n, offset, 20 + count);

  constexpr std::size_t kSrcRows = 5;
  const std::size_t src_stride = n + 3;  // padded rows
  const std::size_t dst_stride = n + 2;
  Guarded<T> src = input<T>(kSrcRows * src_stride, offset);
  fill_uniform(src.data(), kSrcRows * src_stride, -1.0, 1.0, rng);
  const index_t all_rows[] = {3, 0, 3, 4, 1, 2};  // a repeat, out of order
  // dst padding between rows must survive too: fill it with the sentinel and check it below.
  Guarded<T> dst = output<T>(count * dst_stride, offset);
  std::fill(dst.data(), dst.data() + count * dst_stride, Guarded<T>::sentinel());
  moe::simd::gather_rows(Arch{}, src.data(), src_stride, all_rows, count, dst.data(), dst_stride, n);
  for (std::size_t r = 0; r < count; ++r) {
    CAPTURE(r);
    const std::size_t s = static_cast<std::size_t>(all_rows[r]);
    for (std::size_t i = 0; i < n; ++i) CHECK(dst[r * dst_stride + i] == src[s * src_stride + i]);
    for (std::size_t i = n; i < dst_stride; ++i) CHECK(dst[r * dst_stride + i] == Guarded<T>::sentinel());
  }
  CHECK(dst.guards_intact());
}

TEMPLATE_TEST_CASE("simd::axpy adds w·x to y", "[simd][rows]", float, double) {
  using T = TestType;
  const std::size_t n = GENERATE(from_range(lengths_around_lanes<T>()));
  const std::size_t offset = GENERATE(as<std::size_t>{}, 0, 1);
  const T w = GENERATE(T(0), T(-0.625), T(3.1));
  CAPTURE(n, offset, w);
  auto rng = make_rng(n, offset, 30);
  Guarded<T> x = input<T>(n, offset);
  fill_uniform(x.data(), n, -2.0, 2.0, rng);
  Guarded<T> y = output<T>(n, offset);
  fill_uniform(y.data(), n, -2.0, 2.0, rng);
  const std::vector<double> y0 = to_doubles(y.data(), n);
  moe::simd::axpy(Arch{}, w, x.data(), y.data(), n);
  // A fused multiply-add rounds once; a multiply then an add rounds twice: either way within
  // eps·(|w·x| + |y|) (the bound scales with the terms, since w·x + y may cancel).
  for (std::size_t i = 0; i < n; ++i) {
    CAPTURE(i);
    const double wx = dbl(w) * dbl(x[i]);
    const double ref = y0[i] + wx;
    CHECK(std::abs(dbl(y[i]) - ref) <= eps<T>() * (std::abs(wx) + std::abs(y0[i])));
  }
  CHECK(y.guards_intact());
}

TEMPLATE_TEST_CASE("simd::weighted_row_sum sums weighted rows", "[simd][rows]", float, double) {
  using T = TestType;
  const std::size_t n = GENERATE(from_range(lengths_around_lanes<T>()));
  const std::size_t offset = GENERATE(as<std::size_t>{}, 0, 1);
  const std::size_t count = GENERATE(as<std::size_t>{}, 0, 1, 2, 5, 7);
  const bool with_init = GENERATE(false, true);
  CAPTURE(n, offset, count, with_init);
  auto rng = make_rng(n, offset, 40 + count + (with_init ? 10 : 0));

  constexpr std::size_t kSrcRows = 6;
  const std::size_t stride = n + 1;
  Guarded<T> src = input<T>(kSrcRows * stride, offset);
  fill_uniform(src.data(), kSrcRows * stride, -2.0, 2.0, rng);
  std::vector<T> row_weight(kSrcRows);  // indexed by source row
  fill_uniform(row_weight.data(), kSrcRows, -1.0, 1.0, rng);
  const index_t rows[] = {4, 1, 1, 5, 0, 2, 3};
  Guarded<T> init = input<T>(n, offset);
  fill_uniform(init.data(), n, -2.0, 2.0, rng);
  Guarded<T> out = output<T>(n, offset);
  moe::simd::weighted_row_sum(Arch{}, src.data(), stride, rows, row_weight.data(), count, out.data(), n,
                              with_init ? init.data() : nullptr);

  // count fused multiply-adds in sequence from init (or 0): each rounds the running sum once, so
  // the error is at most count·eps times the sum of |terms| and |init| (count == 0 must give init,
  // or zeros, exactly).
  for (std::size_t i = 0; i < n; ++i) {
    CAPTURE(i);
    double ref = with_init ? dbl(init[i]) : 0.0;
    double abs_terms = std::abs(ref);
    for (std::size_t j = 0; j < count; ++j) {
      const std::size_t r = static_cast<std::size_t>(rows[j]);
      const double term = dbl(row_weight[r]) * dbl(src[r * stride + i]);
      ref += term;
      abs_terms += std::abs(term);
    }
    CHECK(std::abs(dbl(out[i]) - ref) <= static_cast<double>(count) * eps<T>() * abs_terms);
    if (count == 0) CHECK(out[i] == (with_init ? init[i] : T(0)));
  }
  CHECK(out.guards_intact());
}

TEMPLATE_TEST_CASE("simd::weighted_row_sum sums in the given order", "[simd][rows]", float, double) {
  using T = TestType;
  const std::size_t n = GENERATE(from_range(lengths_around_lanes<T>()));
  const std::size_t offset = GENERATE(as<std::size_t>{}, 0, 1);
  CAPTURE(n, offset);
  // Rows big, 1, -big with weights 1 and big = 2^(digits+1): big + 1 rounds back to big, so
  // the result depends on the order: (big, 1, -big) gives 0, (big, -big, 1) gives 1. Products
  // with weight 1 are exact, so fused and unfused multiply-adds agree and the expected value is
  // the left-to-right sum in T.
  const T big = std::ldexp(T(1), std::numeric_limits<T>::digits + 1);
  const T values[] = {big, T(1), -big};
  const std::size_t stride = std::max<std::size_t>(n, 1);
  Guarded<T> src = input<T>(3 * stride, offset);
  for (std::size_t r = 0; r < 3; ++r) std::fill(src.data() + r * stride, src.data() + r * stride + n, values[r]);
  const T weight[] = {T(1), T(1), T(1)};

  const index_t orders[][3] = {{0, 1, 2}, {0, 2, 1}, {1, 0, 2}, {2, 1, 0}};
  std::vector<T> expected;
  for (const auto& order : orders) {
    T sum(0);
    for (const index_t r : order) sum = sum + values[r];
    expected.push_back(sum);
  }
  REQUIRE(expected[0] != expected[1]);  // the case can tell orders apart
  for (std::size_t o = 0; o < expected.size(); ++o) {
    CAPTURE(o);
    Guarded<T> out = output<T>(n, offset);
    moe::simd::weighted_row_sum(Arch{}, src.data(), stride, orders[o], weight, 3, out.data(), n);
    for (std::size_t i = 0; i < n; ++i) CHECK(out[i] == expected[o]);
    CHECK(out.guards_intact());
  }
  // init comes first: 1 + big rounds to big, and - big gives 0; added last it would give 1.
  std::vector<T> ones(n, T(1));
  const index_t big_minus_big[] = {0, 2};
  Guarded<T> out = output<T>(n, offset);
  moe::simd::weighted_row_sum(Arch{}, src.data(), stride, big_minus_big, weight, 2, out.data(), n, ones.data());
  for (std::size_t i = 0; i < n; ++i) CHECK(out[i] == T(0));
  CHECK(out.guards_intact());
}

// ---- matmul.hpp ----------------------------------------------------------------------------------

namespace {

// k around the lane count (vector body and k % L tail); n past a few register blocks of weight
// rows, so full blocks and leftover rows both occur.
template <class T>
std::vector<std::size_t> matmul_k_values() {
  constexpr std::size_t L = kLanes<T>;
  return {1, L - 1, L, L + 1, 3 * L + 2};
}
template <class T>
std::vector<std::size_t> matmul_n_values() {
  constexpr std::size_t L = kLanes<T>;
  return {1, 3, L + 1, 19};
}

// Double sums start(j, c) + Σ_{i < k} a(j, i) · b(i, c) for j < m, c < n, and the sums of
// |start| and |terms|, in that order.
struct DotReference {
  std::vector<double> dot;      // [m, n]
  std::vector<double> abs_sum;  // [m, n]
};

template <class Start, class A, class B>
DotReference products_reference(std::size_t m, std::size_t k, std::size_t n, Start start, A a, B b) {
  DotReference r{std::vector<double>(m * n), std::vector<double>(m * n)};
  for (std::size_t j = 0; j < m; ++j) {
    for (std::size_t c = 0; c < n; ++c) {
      double s = start(j, c);
      double abs_sum = std::abs(s);
      for (std::size_t i = 0; i < k; ++i) {
        const double t = a(j, i) * b(i, c);
        s += t;
        abs_sum += std::abs(t);
      }
      r.dot[j * n + c] = s;
      r.abs_sum[j * n + c] = abs_sum;
    }
  }
  return r;
}

// Dot products of row j of x [m, k] (rows ldx apart) with row c of w [n, k].
template <class T>
DotReference dot_reference(const T* x, std::size_t ldx, std::size_t m, std::size_t k, const T* w, std::size_t n) {
  return products_reference(
      m, k, n, [](std::size_t, std::size_t) { return 0.0; },
      [&](std::size_t j, std::size_t i) { return dbl(x[j * ldx + i]); },
      [&](std::size_t i, std::size_t c) { return dbl(w[c * k + i]); });
}

// A dot product of length k summed in any order with (fused) multiply-adds: every term passes
// through at most k + 2 roundings, so |got - ref| <= (k + 2)·eps·sum|terms|.
template <class T>
double dot_bound(std::size_t k, double abs_sum) {
  return static_cast<double>(k + 2) * eps<T>() * abs_sum;
}

// matmul_nt (ldx == k) or matmul_nt_strided on x [m, k] with rows ldx apart, w [n, k], against
// the double reference; y rows are padded (ldy = n + 3) and the padding must survive. Each
// token's row must also be bit-identical to the product of that token alone (m = 1): the
// kernel sums every element in one order whatever m is (batch isolation, README, "Guarantees").
// A: the architecture the products run on.
template <class T, class A = Arch>
void check_matmul(const Guarded<T>& x, std::size_t ldx, std::size_t m, std::size_t k, const Guarded<T>& w,
                  std::size_t n, std::size_t offset) {
  const std::size_t ldy = n + 3;
  auto product = [&](const T* xs, std::size_t rows, T* y) {
    if (ldx == k) {
      moe::simd::matmul_nt(A{}, xs, rows, k, w.data(), n, y, ldy);
    } else {
      moe::simd::matmul_nt_strided(A{}, xs, ldx, rows, k, w.data(), n, y, ldy);
    }
  };
  Guarded<T> y = output<T>(m * ldy, offset);  // [m, ldy]
  product(x.data(), m, y.data());

  const DotReference ref = dot_reference(x.data(), ldx, m, k, w.data(), n);
  for (std::size_t j = 0; j < m; ++j) {
    CAPTURE(j);
    for (std::size_t c = 0; c < n; ++c) {
      CAPTURE(c);
      const std::size_t e = j * n + c;
      CHECK(std::abs(dbl(y[j * ldy + c]) - ref.dot[e]) <= dot_bound<T>(k, ref.abs_sum[e]));
    }
    for (std::size_t c = n; c < ldy; ++c) CHECK(y[j * ldy + c] == Guarded<T>::sentinel());

    Guarded<T> alone = output<T>(ldy, offset);
    product(x.data() + j * ldx, 1, alone.data());
    for (std::size_t c = 0; c < n; ++c) CHECK(alone[c] == y[j * ldy + c]);
    CHECK(alone.guards_intact());
  }
  CHECK(y.guards_intact());
}

// Checks that h [m, ldh] holds act(gate) ⊙ up for the activation Act, within the propagated bound:
// with errors dg, du in the dots, |act(g~)·u~ - act(g)·u| <= |u|·(Lip·dg + act_err) +
// (|act(g)| + Lip·dg)·du + eps·|ref|. As for matmul_nt, each token's row must equal that
// token's product alone, bit for bit.
template <class Act, class T, class A = Arch>
void check_gated_matmul(const Guarded<T>& x, std::size_t m, std::size_t k, const Guarded<T>& w_gate,
                        const Guarded<T>& w_up, std::size_t n, std::size_t offset) {
  INFO("activation " << Act::name);
  const std::size_t ldh = n + 3;
  auto product = [&](const T* xs, std::size_t rows, T* h) {
    moe::simd::gated_matmul_nt<Act>(A{}, xs, rows, k, w_gate.data(), w_up.data(), n, h, ldh);
  };
  Guarded<T> h = output<T>(m * ldh, offset);
  product(x.data(), m, h.data());

  const DotReference g = dot_reference(x.data(), k, m, k, w_gate.data(), n);
  const DotReference u = dot_reference(x.data(), k, m, k, w_up.data(), n);
  for (std::size_t j = 0; j < m; ++j) {
    CAPTURE(j);
    for (std::size_t c = 0; c < n; ++c) {
      CAPTURE(c);
      const std::size_t e = j * n + c;
      const double act = reference(Act{}, g.dot[e]);
      const double ref = act * u.dot[e];
      const double dg = dot_bound<T>(k, g.abs_sum[e]);
      const double du = dot_bound<T>(k, u.abs_sum[e]);
      const double act_err = activation_bound<T>(Act{}, g.dot[e], act);
      const double bound = std::abs(u.dot[e]) * (kActivationLipschitz * dg + act_err) +
                           (std::abs(act) + kActivationLipschitz * dg) * du + eps<T>() * std::abs(ref) + tiny<T>();
      CHECK(std::abs(dbl(h[j * ldh + c]) - ref) <= bound);
    }
    for (std::size_t c = n; c < ldh; ++c) CHECK(h[j * ldh + c] == Guarded<T>::sentinel());

    Guarded<T> alone = output<T>(ldh, offset);
    product(x.data() + j * k, 1, alone.data());
    for (std::size_t c = 0; c < n; ++c) CHECK(alone[c] == h[j * ldh + c]);
    CHECK(alone.guards_intact());
  }
  CHECK(h.guards_intact());
}

// check_matmul, and check_gated_matmul<SiLU> when `gated`, on x [m, k] and weights [n, k] drawn
// from rng, their buffers `offset` elements off 64-byte boundaries; on architecture A.
template <class T, class A = Arch>
void check_random_products(std::size_t m, std::size_t k, std::size_t n, std::size_t offset, std::mt19937& rng,
                           bool gated) {
  Guarded<T> x = input<T>(m * k, offset);
  fill_uniform(x.data(), m * k, -1.0, 1.0, rng);
  Guarded<T> w = input<T>(n * k, offset);
  fill_uniform(w.data(), n * k, -1.0, 1.0, rng);
  check_matmul<T, A>(x, k, m, k, w, n, offset);
  if (!gated) return;
  Guarded<T> w_up = input<T>(n * k, offset);
  fill_uniform(w_up.data(), n * k, -1.0, 1.0, rng);
  check_gated_matmul<moe::SiLU, T, A>(x, m, k, w, w_up, n, offset);
}

}  // namespace

TEMPLATE_TEST_CASE("simd::matmul_nt computes x · wᵀ", "[simd][matmul]", float, double) {
  using T = TestType;
  // m covers every token block size (1–14) and the ways batches are cut into blocks: streamed up
  // to 6 tokens (eight-row blocks for one, four-row for more, the last rows one at a time), one
  // packed block of 7–14 where their x fits (these rows are short), near-equal blocks of at most 6
  // below 64 (15 → 5 + 5 + 5), blocks of 5 from 64 on (70).
  const std::size_t m = GENERATE(as<std::size_t>{}, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 70);
  const std::size_t k = GENERATE(from_range(matmul_k_values<T>()));
  const std::size_t n = GENERATE(from_range(matmul_n_values<T>()));
  const std::size_t offset = GENERATE(as<std::size_t>{}, 0, 1);
  CAPTURE(m, k, n, offset);
  auto rng = make_rng(100 * m + k, n, offset);

  Guarded<T> w = input<T>(n * k, offset);  // [n, k]
  fill_uniform(w.data(), n * k, -1.0, 1.0, rng);
  SECTION("contiguous token rows") {
    Guarded<T> x = input<T>(m * k, offset);  // [m, k]
    fill_uniform(x.data(), m * k, -1.0, 1.0, rng);
    check_matmul(x, k, m, k, w, n, offset);
  }
  SECTION("token rows with padding (matmul_nt_strided)") {
    const std::size_t ldx = k + 2;
    Guarded<T> x = input<T>(m * ldx, offset);  // [m, ldx]
    fill_uniform(x.data(), m * ldx, -1.0, 1.0, rng);
    check_matmul(x, ldx, m, k, w, n, offset);
  }
}

TEMPLATE_TEST_CASE("simd::matmul_nt and gated_matmul_nt on empty rows (k = 0) give zeros over many panels",
                   "[simd][matmul]", float, double) {
  using T = TestType;
  // Empty rows make panels of tens of thousands of rows; with 100,000 of them the products run over
  // several, and a panel's last block, which prefetches the next panel's first rows, must find none
  // to fetch rather than divide by the row length.
  const std::size_t m = GENERATE(as<std::size_t>{}, 1, 4, 8);
  const std::size_t n = 100000;
  CAPTURE(m);
  const std::vector<T> x(1), w(1), w_up(1);  // (non-null pointers; no element is read)
  std::vector<T> y(m * n, std::numeric_limits<T>::quiet_NaN());
  moe::simd::matmul_nt(Arch{}, x.data(), m, 0, w.data(), n, y.data(), n);
  CHECK(std::all_of(y.begin(), y.end(), [](T v) { return v == T(0); }));
  std::fill(y.begin(), y.end(), std::numeric_limits<T>::quiet_NaN());
  moe::simd::gated_matmul_nt<moe::SiLU>(Arch{}, x.data(), m, 0, w.data(), w_up.data(), n, y.data(), n);
  CHECK(std::all_of(y.begin(), y.end(), [](T v) { return v == T(0); }));
}

TEMPLATE_TEST_CASE("simd::matmul_nt with weight rows too long for more than a few per panel", "[simd][matmul]",
                   float, double) {
  using T = TestType;
  // Rows of 20003 elements (80 KB in float): the L2 panels hold only a few rows each, so n = 19
  // spans several panels, the last one partial. And rows just past the length dot_block chunks
  // (with a k % L tail), where two tokens still stream whole rows and three are chunked. There 9
  // and 14 tokens are one packed block, chunked more finely (kPackedChunkBytes); 15 are three blocks
  // of 5, whose later ones fetch the next panel. Rows of 711 elements are not chunked: in float 11
  // tokens fit one packed block (11 · 2844 bytes ≤ kPackedXBytes) and 12 do not (6 + 6). Rows of
  // 1027 floats (4108 bytes) are cut into packed chunks for 8–14 tokens (chunks_rows), the last
  // chunk shorter than a vector; 7 tokens take them whole (28756 bytes). Rows of a page are streamed
  // by 7 and 8 tokens, in 2-row blocks (8 · 4096 bytes = kPackedXBytes).
  const std::size_t m = GENERATE(as<std::size_t>{}, 1, 2, 3, 4, 5, 7, 8, 9, 11, 12, 14, 15);
  const std::size_t k = GENERATE(as<std::size_t>{}, 20003, moe::simd::kChunkAboveBytes / sizeof(T) + 2 * kLanes<T> + 3,
                                 711, 1027, moe::simd::kPageBytes / sizeof(T));
  const std::size_t n = 19;
  CAPTURE(m, k);
  auto rng = make_rng(m, k, 1);
  check_random_products<T>(m, k, n, 1, rng, true);
}

TEMPLATE_TEST_CASE("simd::matmul_nt over many panels of rows shorter than a page", "[simd][matmul]", float, double) {
  using T = TestType;
  // A batch that is one token block (7–14 tokens here) takes such rows a register block's rows apart
  // (simd::RowOrder), and so does a streamed one (1–6 tokens, stream_blocks), whose last block
  // prefetches the next panel: 2,001 rows of 200 elements are 9 or 10 panels (one thread or two), the
  // last of an odd number of rows, whose last rows have no partner. 15 tokens are three blocks and
  // keep the rows' order.
  const std::size_t m = GENERATE(as<std::size_t>{}, 1, 2, 4, 6, 7, 8, 10, 14, 15);
  const std::size_t k = 200, n = 2001;
  CAPTURE(m);
  auto rng = make_rng(m, k, n);
  check_random_products<T>(m, k, n, 0, rng, false);
}

TEMPLATE_TEST_CASE("simd::matmul_nt and gated_matmul_nt over many panels of rows a page long", "[simd][matmul]", float,
                   double) {
  using T = TestType;
  // 7–8 tokens stream rows of a page in 2-row blocks a stream apart, 2–6 in 4-row blocks, and 9 are
  // one packed block in address order; 1,001 rows are several panels, the last of an odd number of
  // rows (the stream blocks' one-row tail), and each panel's last block prefetches the next.
  const std::size_t m = GENERATE(as<std::size_t>{}, 6, 7, 8, 9);
  const std::size_t k = moe::simd::kPageBytes / sizeof(T), n = 1001;
  CAPTURE(m);
  if (moe::simd::vector_registers<Arch>() >= 32) CHECK(moe::simd::streams<Arch, T>(m, k) == (m <= 8));
  auto rng = make_rng(m, k, n);
  check_random_products<T>(m, k, n, 0, rng, true);
}

TEMPLATE_TEST_CASE("simd::matmul_nt and gated_matmul_nt on a batch whose x outgrows the L2", "[simd][matmul]", float,
                   double) {
  using T = TestType;
  // 400 tokens of 500 elements are more x than kXInL2Bytes: once a panel's later token blocks have
  // fetched the next panel, each fetches the next block's x rows (fetch_next_x), the last block none.
  // 200 rows are two or more panels, so some blocks fetch a panel first and some x only. (Rows of
  // kMinLaneDepth elements or more would take the lane-split product.)
  const std::size_t m = 400, k = 500, n = 200;
  CHECK(moe::simd::fetch_next_x(m, k, sizeof(T)));
  CHECK_FALSE(moe::simd::lane_split<Arch, T>(m, k, n));
  auto rng = make_rng(m, k, n);
  check_random_products<T>(m, k, n, 0, rng, true);
}

TEMPLATE_TEST_CASE("simd::matmul_nt and gated_matmul_nt on many tokens: the lane-split product", "[simd][matmul]", float,
                   double) {
  using T = TestType;
  // From kMinLaneTokens tokens on rows of kMinLaneDepth elements or more and 32 rows or more, float
  // products with AVX-512 are packed lane-major and summed as tiles of 12–14 tokens × 32 rows
  // (lane_product.hpp); each token's row must still be its product alone (one token: the dot kernel),
  // bit for bit. 96 tokens are tiles of 13 and 14, 113 of 12 and 13, 200 of 13 and 14; 521 and 1,031
  // elements leave a tail; 70 rows are two panels (one per thread on two), the second ending in a
  // partial block of 6 rows; 32 rows are one block. Double, and architectures without the product,
  // keep the dot kernel: the same checks hold.
  const std::size_t m = GENERATE(as<std::size_t>{}, 96, 113, 200);
  const std::size_t k = GENERATE(as<std::size_t>{}, 521, 1024, 1031);
  const std::size_t n = GENERATE(as<std::size_t>{}, 32, 70);
  const std::size_t offset = GENERATE(as<std::size_t>{}, 0, 1);
  CAPTURE(m, k, n, offset);
  CHECK(moe::simd::lane_split<Arch, T>(m, k, n) == moe::simd::has_lane_product<Arch, T>());
  CHECK_FALSE(moe::simd::lane_split<Arch, T>(moe::simd::kMinLaneTokens - 1, k, n));
  auto rng = make_rng(m, k, n + offset);
  check_random_products<T>(m, k, n, offset, rng, true);
  SECTION("token rows with padding (matmul_nt_strided)") {
    const std::size_t ldx = k + 2;
    Guarded<T> x = input<T>(m * ldx, offset);
    fill_uniform(x.data(), m * ldx, -1.0, 1.0, rng);
    Guarded<T> w = input<T>(n * k, offset);
    fill_uniform(w.data(), n * k, -1.0, 1.0, rng);
    check_matmul(x, ldx, m, k, w, n, offset);
  }
#if XSIMD_WITH_FMA3_AVX2
  // The AVX2 form (8 lanes, tiles of 5–6 tokens × 16 rows) in any build whose target has AVX2 and FMA,
  // whatever its default architecture: 96 tokens are tiles of 6, 113 of 5 and 6, 200 of 5 and 6; 32
  // rows are two blocks, and 70 end in a partial one.
  SECTION("on AVX2 with FMA") {
    using Avx2 = xsimd::fma3<xsimd::avx2>;
    CHECK(moe::simd::lane_split<Avx2, T>(m, k, n) == std::is_same<T, float>::value);
    check_random_products<T, Avx2>(m, k, n, offset, rng, true);
  }
#endif
}

TEST_CASE("simd::LaneBuffer keeps its block until it must grow, 2 MiB aligned from 2 MiB", "[simd][matmul]") {
  // The lane-split product's packing buffers: 64-byte aligned below a huge page, 2 MiB aligned (and
  // advised) and rounded up to whole huge pages from one on, as HugePageAllocator's blocks; a smaller
  // request keeps the block; a size whose byte count overflows gives null and keeps the block held.
  constexpr std::size_t kHugeFloats = moe::kHugePageBytes / sizeof(float);
  moe::simd::LaneBuffer buffer;
  float* held = nullptr;
  for (const std::size_t floats : {std::size_t(100), kHugeFloats - 1, kHugeFloats, 3 * kHugeFloats + 5}) {
    CAPTURE(floats);
    float* const block = buffer.reserve(floats);
    REQUIRE(block != nullptr);
    CHECK(moe_test::aligned_to(block, floats >= kHugeFloats ? moe::kHugePageBytes : 64));
    for (std::size_t i = 0; i < floats; ++i) block[i] = static_cast<float>(i % 1000);  // (ASan: all of it is ours)
    REQUIRE(buffer.reserve(floats / 2) == block);
    REQUIRE(buffer.reserve(floats) == block);
    CHECK(block[floats - 1] == static_cast<float>((floats - 1) % 1000));
    held = block;
  }
  REQUIRE(buffer.reserve(4 * kHugeFloats) == held);  // (3 · kHugeFloats + 5 took four whole pages)
  held[4 * kHugeFloats - 1] = 1.0f;
  CHECK(buffer.reserve(static_cast<std::size_t>(-1) / 2) == nullptr);
  CHECK(buffer.reserve(10) == held);
}

#if MOE_LANE_PRODUCT
// pack_lanes' layout, and lane_tile's sums against xsimd's hadd, on architecture A.
template <class A>
void check_lane_packing_and_order() {
  using B = moe::simd::batch<float, A>;
  constexpr std::size_t L = B::size, R = moe::simd::lane_tile_rows<A>(), MR = moe::simd::max_lane_tile_tokens<A>();
  // Element l + L·i of row q at p[(l·s + i)·g + q]; rows past `rows` zero; nothing written past L·s·g.
  const std::size_t s = 3, lda = s * L + 5;
  for (const std::size_t g : {MR - 1, R}) {
    for (const std::size_t rows : {g, g - 2}) {
      CAPTURE(g, rows);
      std::vector<float> a(g * lda);
      for (std::size_t q = 0; q < g; ++q)
        for (std::size_t e = 0; e < lda; ++e) a[q * lda + e] = static_cast<float>(1000 * q + e);
      std::vector<float> p(L * s * g + L, -1.0f);
      moe::simd::pack_lanes(A{}, a.data(), lda, rows, s, g, p.data());
      bool laid_out = true;
      for (std::size_t l = 0; l < L; ++l)
        for (std::size_t i = 0; i < s; ++i)
          for (std::size_t q = 0; q < g; ++q)
            laid_out = laid_out && p[(l * s + i) * g + q] == (q < rows ? a[q * lda + l + L * i] : 0.0f);
      CHECK(laid_out);
      CHECK(std::all_of(p.end() - L, p.end(), [](float v) { return v == -1.0f; }));
    }
  }
  // Depth 1 with every token element 1: lane l's chain for row r is w_r[l] alone, so the tile's sum for
  // row r is its L lane values added in lane_tile's order, which must be hadd's to the bit. Values of
  // magnitudes 2^-20 to 2^20 make the order show in the last bits.
  std::mt19937 rng(17);
  std::uniform_real_distribution<float> mantissa(-1.0f, 1.0f);
  std::uniform_int_distribution<int> exponent(-20, 20);
  std::vector<float, moe::HugePageAllocator<float>> xp(L * MR, 1.0f), wp(L * R);
  for (int round = 0; round < 200; ++round) {
    for (float& v : wp) v = std::ldexp(mantissa(rng), exponent(rng));
    B sums[2 * MR];
    moe::simd::lane_tile<MR>(A{}, xp.data(), wp.data(), 1, sums, [] {});
    bool as_hadd = true;
    for (std::size_t r = 0; r < R; ++r) {
      alignas(64) float lane_values[L];
      for (std::size_t l = 0; l < L; ++l) lane_values[l] = wp[l * R + r];
      const float expected = xsimd::hadd(B::load_aligned(lane_values));
      for (std::size_t j = 0; j < MR; ++j) {
        alignas(64) float got[L];
        sums[2 * j + r / L].store_aligned(got);
        as_hadd = as_hadd && got[r % L] == expected;
      }
    }
    CHECK(as_hadd);
  }
}

TEST_CASE("simd::pack_lanes lays out lanes, and lane_tile adds them in hadd's order", "[simd][matmul]") {
  if constexpr (moe::simd::has_lane_product<Arch, float>()) check_lane_packing_and_order<Arch>();
#if XSIMD_WITH_FMA3_AVX2
  check_lane_packing_and_order<xsimd::fma3<xsimd::avx2>>();
#endif
}
#endif

TEMPLATE_TEST_CASE("simd::matmul_nt and gated_matmul_nt give the same bits on token rows on and off 64-byte boundaries",
                   "[simd][matmul]", float, double) {
  using T = TestType;
  // Each x load of a token row off a 64-byte boundary spans two cache lines, which blocks of several
  // rows share; every element must still be summed in the one order wherever its row starts. The same
  // values sit at the start of a 64-byte aligned buffer and one element further on. 1–6 tokens stream
  // short rows, and 7–8 rows of a page (the shorter ones, with a tail, are a packed block, whose copy
  // realigns x).
  constexpr std::size_t per_line = 64 / sizeof(T);
  const std::size_t m = GENERATE(as<std::size_t>{}, 1, 2, 3, 4, 5, 6, 7, 8);
  // Rows a page long for the token counts that stream only such rows (packed_block: 7 and 8 here).
  const std::size_t ldx = moe::simd::packed_block(m) ? moe::simd::kPageBytes / sizeof(T) : 3 * per_line;
  const std::size_t n = 19, ldy = n;
  const std::size_t k = GENERATE_COPY(as<std::size_t>{}, ldx, ldx - 3);  // (the second with a tail)
  CAPTURE(m, k);
  auto rng = make_rng(m, k, 7);
  std::vector<T, moe::HugePageAllocator<T>> on_line((m + 1) * ldx), off_line((m + 1) * ldx);
  REQUIRE(moe_test::aligned_to(on_line.data(), 64));
  fill_uniform(on_line.data(), m * ldx, -1.0, 1.0, rng);
  std::copy(on_line.begin(), on_line.begin() + static_cast<std::ptrdiff_t>(m * ldx), off_line.begin() + 1);
  const T* x_on = on_line.data();
  const T* x_off = off_line.data() + 1;
  std::vector<T> w(n * k), w_up(n * k);
  fill_uniform(w.data(), n * k, -1.0, 1.0, rng);
  fill_uniform(w_up.data(), n * k, -1.0, 1.0, rng);

  std::vector<T> y_on(m * ldy), y_off(m * ldy, T(1));
  moe::simd::matmul_nt_strided(Arch{}, x_on, ldx, m, k, w.data(), n, y_on.data(), ldy);
  moe::simd::matmul_nt_strided(Arch{}, x_off, ldx, m, k, w.data(), n, y_off.data(), ldy);
  CHECK(y_on == y_off);
  const DotReference ref = dot_reference(x_on, ldx, m, k, w.data(), n);
  for (std::size_t e = 0; e < m * n; ++e) CHECK(std::abs(dbl(y_on[e]) - ref.dot[e]) <= dot_bound<T>(k, ref.abs_sum[e]));
  if (k == ldx) {  // gated_matmul_nt takes contiguous rows
    std::fill(y_on.begin(), y_on.end(), T(0));
    std::fill(y_off.begin(), y_off.end(), T(1));
    moe::simd::gated_matmul_nt<moe::SiLU>(Arch{}, x_on, m, k, w.data(), w_up.data(), n, y_on.data(), ldy);
    moe::simd::gated_matmul_nt<moe::SiLU>(Arch{}, x_off, m, k, w.data(), w_up.data(), n, y_off.data(), ldy);
    CHECK(y_on == y_off);
  }
}

TEMPLATE_TEST_CASE("simd::gated_matmul_nt computes act(x · w_gateᵀ) ⊙ (x · w_upᵀ)", "[simd][matmul]", float,
                   double) {
  using T = TestType;
  const std::size_t m = GENERATE(as<std::size_t>{}, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 14, 15, 70);
  const std::size_t k = GENERATE(from_range(matmul_k_values<T>()));
  const std::size_t n = GENERATE(from_range(matmul_n_values<T>()));
  const std::size_t offset = GENERATE(as<std::size_t>{}, 0, 1);
  CAPTURE(m, k, n, offset);
  auto rng = make_rng(100 * m + k, n, 2 + offset);

  // Arguments of the activation spread over [-3, 3] or so, where the activations bend.
  Guarded<T> x = input<T>(m * k, offset);
  fill_uniform(x.data(), m * k, -1.5, 1.5, rng);
  Guarded<T> w_gate = input<T>(n * k, offset);
  fill_uniform(w_gate.data(), n * k, -1.0, 1.0, rng);
  Guarded<T> w_up = input<T>(n * k, offset);
  fill_uniform(w_up.data(), n * k, -1.0, 1.0, rng);

  check_gated_matmul<moe::SiLU>(x, m, k, w_gate, w_up, n, offset);
  check_gated_matmul<moe::GELU>(x, m, k, w_gate, w_up, n, offset);
  check_gated_matmul<moe::GELUTanh>(x, m, k, w_gate, w_up, n, offset);
  check_gated_matmul<moe::ReLU>(x, m, k, w_gate, w_up, n, offset);
}

// ---- experts/activations.hpp ---------------------------------------------------------------------

namespace {

// Calls f(Act{}) for each of the library's activations; f takes the type from its argument.
template <class F>
void for_each_activation(F&& f) {
  f(moe::ReLU{});
  f(moe::GELU{});
  f(moe::GELUTanh{});
  f(moe::SiLU{});
}

// Arguments for the activation tests: a grid over [-10, 10], values near 0, the negative tail
// (where GELU and tanh GELU used to cancel to 0, xsimd's float and double erfc flush to 0 from
// -13.25 and -37.65, and σ(2u) is denormal from -10.0 in float and -21.15 in double), and the
// saturated ends ±1e4 (no NaN, no overflow).
template <class T>
std::vector<T> activation_arguments() {
  std::vector<T> x;
  for (int i = -400; i <= 400; ++i) x.push_back(static_cast<T>(0.025 * i));
  for (const double v : {1e-3, -1e-3, 1e-20, -1e-20, 15.0, -15.0, 30.0, -30.0, 1e4, -1e4}) x.push_back(static_cast<T>(v));
  for (const double v : {-10.1, -10.3, -12.0, -13.0, -13.3, -20.0, -21.2, -26.0, -37.5, -37.7, -38.0}) {
    x.push_back(static_cast<T>(v));
  }
  // Huge arguments, where x³ or x² overflows (GELU's and tanh GELU's inner terms) and xsimd's
  // double erfc returns NaN from about 1.4e62 unless its argument is clamped.
  const double largest = dbl(std::numeric_limits<T>::max());
  for (const double v : {1e7, 1e10, 1e19, 6e19, 1e30, 1e62, 1.4e62, 4e154, 1e200, 1e300, largest}) {
    if (v <= largest) x.push_back(static_cast<T>(v)), x.push_back(static_cast<T>(-v));
  }
  return x;
}

template <class Act, class T>
void check_activation_scalar_and_batch() {
  INFO("activation " << Act::name);
  using B = moe::simd::batch<T, Arch>;
  constexpr std::size_t L = kLanes<T>;
  std::vector<T> x = activation_arguments<T>();
  while (x.size() % L != 0) x.push_back(T(0.5));

  // Scalar form.
  for (const T v : x) {
    CAPTURE(v);
    const T got = Act::apply(v);
    const double ref = reference(Act{}, dbl(v));
    CHECK_FALSE(std::isnan(got));
    CHECK(std::abs(dbl(got) - ref) <= activation_bound<T>(Act{}, dbl(v), ref));
  }
  // Batch form, lane by lane.
  alignas(64) T lanes_out[L];
  for (std::size_t i = 0; i < x.size(); i += L) {
    Act::apply(B::load_unaligned(x.data() + i)).store_aligned(lanes_out);
    for (std::size_t l = 0; l < L; ++l) {
      const T v = x[i + l];
      CAPTURE(v);
      const double ref = reference(Act{}, dbl(v));
      CHECK_FALSE(std::isnan(lanes_out[l]));
      CHECK(std::abs(dbl(lanes_out[l]) - ref) <= activation_bound<T>(Act{}, dbl(v), ref));
    }
  }
}

template <class Act, class T>
void check_activate(std::size_t n, std::size_t offset) {
  INFO("activation " << Act::name);
  auto rng = make_rng(n, offset, 50);
  Guarded<T> x = output<T>(n, offset);
  fill_uniform(x.data(), n, -6.0, 6.0, rng);
  const std::vector<double> before = to_doubles(x.data(), n);
  moe::simd::activate<Act>(Arch{}, x.data(), n);
  for (std::size_t i = 0; i < n; ++i) {
    CAPTURE(i, before[i]);
    const double ref = reference(Act{}, before[i]);
    CHECK(std::abs(dbl(x[i]) - ref) <= activation_bound<T>(Act{}, before[i], ref));
  }
  CHECK(x.guards_intact());
}

template <class Act, class T>
void check_gated_activate(std::size_t n, std::size_t offset) {
  INFO("activation " << Act::name);
  auto rng = make_rng(n, offset, 60);
  Guarded<T> gate = output<T>(n, offset);
  fill_uniform(gate.data(), n, -6.0, 6.0, rng);
  Guarded<T> up = input<T>(n, 1 - offset);  // the other alignment
  fill_uniform(up.data(), n, -2.0, 2.0, rng);
  const std::vector<double> g = to_doubles(gate.data(), n);
  moe::simd::gated_activate<Act>(Arch{}, gate.data(), up.data(), n);
  // act(g) within activation_bound, times an exact u, then one rounded multiply.
  for (std::size_t i = 0; i < n; ++i) {
    CAPTURE(i, g[i], up[i]);
    const double act = reference(Act{}, g[i]);
    const double ref = act * dbl(up[i]);
    const double bound = std::abs(dbl(up[i])) * activation_bound<T>(Act{}, g[i], act) + eps<T>() * std::abs(ref);
    CHECK(std::abs(dbl(gate[i]) - ref) <= bound);
  }
  CHECK(gate.guards_intact());
}

}  // namespace

TEMPLATE_TEST_CASE("Activations: scalar and batch forms match the double formulas", "[simd][activations]", float,
                   double) {
  using T = TestType;
  for_each_activation([&](auto act) { check_activation_scalar_and_batch<decltype(act), T>(); });
}

// NaN and ±inf through an activation's scalar and batch forms: NaN stays NaN (ReLU's SIMD max
// used to turn it into 0 while the scalar tail kept it), and the two forms agree on ±inf, so a
// value's fate does not depend on its column.
template <class Act, class T>
void check_special_values() {
  INFO("activation " << Act::name);
  using B = moe::simd::batch<T, Arch>;
  constexpr std::size_t L = kLanes<T>;
  const T inf = std::numeric_limits<T>::infinity(), nan = std::numeric_limits<T>::quiet_NaN();
  for (const T v : {nan, inf, -inf}) {
    CAPTURE(v);
    alignas(64) T lanes_in[L], lanes_out[L];
    for (std::size_t l = 0; l < L; ++l) lanes_in[l] = l % 2 == 0 ? v : T(0.5);
    Act::apply(B::load_aligned(lanes_in)).store_aligned(lanes_out);
    const T scalar = Act::apply(v);
    if (std::isnan(v)) CHECK(std::isnan(scalar));
    for (std::size_t l = 0; l < L; l += 2) {
      CAPTURE(l);
      if (std::isnan(scalar)) CHECK(std::isnan(lanes_out[l]));
      else CHECK(lanes_out[l] == scalar);
    }
    alignas(64) T half_out[L];
    Act::apply(B(T(0.5))).store_aligned(half_out);
    for (std::size_t l = 1; l < L; l += 2) CHECK(lanes_out[l] == half_out[l]);  // neighbours untouched
  }
  CHECK(Act::apply(inf) == inf);  // x · (something that tends to 1) for every activation here
}

// simd::fma rounds once, as std::fma does, on every architecture with FMA (and twice without, as
// simd::madd does). xsimd 8.1's AVX-512 fma is a plain x * y + z, fused only where the compiler
// contracts it (g++ -std=gnu++17, which this suite uses; not -std=c++17, where 35 of these lanes
// rounded twice in float).
TEMPLATE_TEST_CASE("simd::fma rounds once where the target has FMA, lane for lane as std::fma", "[simd]", float,
                   double) {
  using T = TestType;
  using B = moe::simd::batch<T, Arch>;
  constexpr std::size_t L = kLanes<T>;
  auto rng = make_rng(L, 90);
  std::vector<T> x(64 * L), y(64 * L), z(64 * L);
  fill_uniform(x.data(), x.size(), -1.0, 1.0, rng);
  fill_uniform(y.data(), y.size(), -1.0, 1.0, rng);
  fill_uniform(z.data(), z.size(), -1.0, 1.0, rng);
  alignas(64) T out[L];
  for (std::size_t i = 0; i < x.size(); i += L) {
    moe::simd::fma(B::load_unaligned(x.data() + i), B::load_unaligned(y.data() + i), B::load_unaligned(z.data() + i))
        .store_aligned(out);
    for (std::size_t l = 0; l < L; ++l) {
      CHECK(out[l] == chain_step(x[i + l], y[i + l], z[i + l]));
      CHECK(moe::simd::madd(x[i + l], y[i + l], z[i + l]) == out[l]);  // the scalar tails' step
    }
  }
}

namespace {

// reduce_add_each<N> on accumulators of mixed magnitudes (each sum rounds several times, so a lane
// added in another order would show), with NaNs, infinities and signed zeros in some of them: each
// sum's bits equal reduce_add's, and nothing past out[N) is written. (A NaN sum need only be NaN:
// compilers treat addition as commutative, so which of two NaN payloads survives is not fixed.)
template <std::size_t N, class T>
void check_reduce_add_each(std::mt19937& rng) {
  using B = moe::simd::batch<T, Arch>;
  constexpr std::size_t L = kLanes<T>;
  std::vector<T> values(N * L);
  fill_uniform(values.data(), values.size(), -1.0, 1.0, rng);
  for (std::size_t i = 0; i < values.size(); ++i) {
    values[i] *= static_cast<T>(std::ldexp(1.0, static_cast<int>(i * 7 % 40) - 20));  // 2^-20 to 2^19
  }
  using Bits = std::conditional_t<sizeof(T) == 4, std::uint32_t, std::uint64_t>;
  auto nan_with = [](Bits payload) {
    Bits b = sizeof(T) == 4 ? Bits(0x7fc00000u) | payload : (Bits(0x7ff8) << 48) | payload;
    T v;
    std::memcpy(&v, &b, sizeof v);
    return v;
  };
  if (N > 1) values[L] = nan_with(5), values[2 * L - 1] = nan_with(9);  // two NaNs in one sum (L >= 2)
  const T inf = std::numeric_limits<T>::infinity();
  if (N > 2) values[2 * L] = inf, values[2 * L + 1] = -inf;
  if (N > 3) std::fill(values.begin() + 3 * L, values.begin() + 4 * L, T(-0.0));  // a sum of -0 is -0
  if (N > 4) std::fill(values.begin() + 4 * L, values.begin() + 5 * L, T(0.0)), values[4 * L + L / 2] = T(-0.0);  // +0
  std::vector<B> acc;
  for (std::size_t i = 0; i < N; ++i) acc.push_back(B::load_unaligned(values.data() + i * L));
  std::vector<T> out(N + 1, T(42));
  moe::simd::reduce_add_each<N>(acc.data(), out.data());
  for (std::size_t i = 0; i < N; ++i) {
    CAPTURE(N, i);
    const T want = moe::simd::reduce_add(acc[i]);
    if (std::isnan(want)) {
      CHECK(std::isnan(out[i]));
      continue;
    }
    Bits got_bits, want_bits;
    std::memcpy(&got_bits, &out[i], sizeof(T));
    std::memcpy(&want_bits, &want, sizeof(T));
    CHECK(got_bits == want_bits);
  }
  CHECK(out[N] == T(42));
}

template <class T, std::size_t... N>
void check_reduce_add_each_for(std::index_sequence<N...>) {
  auto rng = make_rng(sizeof(T), 91);
  (check_reduce_add_each<N + 1, T>(rng), ...);
}

}  // namespace

// The register blocks reduce their accumulators together (reduce_add_each): every block size from
// 1 to 40 accumulators (14 × 2 is the largest block), whole groups of 16 and partial ones.
TEMPLATE_TEST_CASE("simd::reduce_add_each gives reduce_add's bits for each accumulator", "[simd][matmul]", float, double) {
  check_reduce_add_each_for<TestType>(std::make_index_sequence<40>{});
}

TEST_CASE("simd::has_fma tells the architecture tags that multiply and add with one rounding", "[simd]") {
  // simd::fma refuses (static_assert) a tag without FMA in a translation unit that targets FMA.
  STATIC_REQUIRE(moe::simd::has_fma<xsimd::fma3<xsimd::avx2>>());
  STATIC_REQUIRE(moe::simd::has_fma<xsimd::fma3<xsimd::sse4_2>>());
  STATIC_REQUIRE(moe::simd::has_fma<xsimd::avx512bw>());
  STATIC_REQUIRE_FALSE(moe::simd::has_fma<xsimd::avx2>());
  STATIC_REQUIRE_FALSE(moe::simd::has_fma<xsimd::sse4_2>());
  STATIC_REQUIRE(moe::simd::has_fma<Arch>() == moe::simd::target_has_fma());
}

TEMPLATE_TEST_CASE("Activations: NaN stays NaN and ±inf give the same result in scalar and batch form",
                   "[simd][activations]", float, double) {
  using T = TestType;
  for_each_activation([&](auto act) { check_special_values<decltype(act), T>(); });
  CHECK(moe::ReLU::apply(-std::numeric_limits<T>::infinity()) == T(0));
  // A NaN column of a layer's hidden values stays NaN whichever lane it lands in.
  const std::size_t n = 2 * kLanes<T> + 3;
  std::vector<T> hidden(n, std::numeric_limits<T>::quiet_NaN());
  moe::simd::activate<moe::ReLU>(Arch{}, hidden.data(), n);
  for (std::size_t i = 0; i < n; ++i) CHECK(std::isnan(hidden[i]));
}

// The derivative backward uses, against a central difference of the double reference, and at
// huge |x|, where tanh GELU's derivative multiplied 1 − tanh² = 0 by an overflowed x² (NaN).
template <class Act>
void check_derivative() {
  INFO("activation " << Act::name);
  for (int i = -160; i <= 160; ++i) {
    const double x = 0.05 * i + 0.0123;  // off 0, where ReLU's derivative jumps
    CAPTURE(x);
    const double h = 1e-6;
    const double central = (reference(Act{}, x + h) - reference(Act{}, x - h)) / (2 * h);
    // Central difference: O(h²·|f'''|) ≈ 1e-12, plus rounding 2·eps·|f|/h ≈ 1e-9.
    CHECK(std::abs(moe::ActivationDerivative<Act>::apply(x) - central) <= 1e-8);
    CHECK(std::abs(derivative_reference(Act{}, x) - central) <= 1e-8);
  }
  for (const double v : {1e10, 6e19, 1e30, 4e154, 1e300}) {
    CAPTURE(v);
    CHECK(moe::ActivationDerivative<Act>::apply(v) == 1.0);  // each activation tends to x
    CHECK(moe::ActivationDerivative<Act>::apply(-v) == 0.0);  // and to 0 below
    if (v < 3e38) {
      CHECK(moe::ActivationDerivative<Act>::apply(static_cast<float>(v)) == 1.0f);
      CHECK(moe::ActivationDerivative<Act>::apply(static_cast<float>(-v)) == 0.0f);
    }
  }
}

TEST_CASE("Activation derivatives match central differences and stay finite at huge |x|", "[experts][activations]") {
  check_derivative<moe::ReLU>();
  check_derivative<moe::GELU>();
  check_derivative<moe::GELUTanh>();
  check_derivative<moe::SiLU>();
}

namespace {

// ActivationDerivative's scalar and batch forms against derivative_reference, over
// activation_arguments (huge ones included), and on NaN and ±inf, where the two forms must agree
// so that a value's fate does not depend on its column.
template <class Act, class T>
void check_derivative_scalar_and_batch() {
  INFO("activation " << Act::name);
  using B = moe::simd::batch<T, Arch>;
  using Derivative = moe::ActivationDerivative<Act>;
  constexpr std::size_t L = kLanes<T>;
  std::vector<T> x = activation_arguments<T>();
  while (x.size() % L != 0) x.push_back(T(0.5));
  alignas(64) T lanes_out[L];
  for (std::size_t i = 0; i < x.size(); i += L) {
    Derivative::apply(B::load_unaligned(x.data() + i)).store_aligned(lanes_out);
    for (std::size_t l = 0; l < L; ++l) {
      const T v = x[i + l];
      CAPTURE(v);
      const double ref = derivative_reference(Act{}, dbl(v));
      const T scalar = Derivative::apply(v);
      CHECK(std::abs(dbl(scalar) - ref) <= derivative_bound<T>(Act{}, dbl(v)));
      CHECK(std::abs(dbl(lanes_out[l]) - ref) <= derivative_bound<T>(Act{}, dbl(v)));
    }
  }
  const T inf = std::numeric_limits<T>::infinity(), nan = std::numeric_limits<T>::quiet_NaN();
  alignas(64) T half_out[L];
  Derivative::apply(B(T(0.5))).store_aligned(half_out);
  for (const T v : {nan, inf, -inf}) {
    CAPTURE(v);
    alignas(64) T lanes_in[L];
    for (std::size_t l = 0; l < L; ++l) lanes_in[l] = l % 2 == 0 ? v : T(0.5);
    Derivative::apply(B::load_aligned(lanes_in)).store_aligned(lanes_out);
    const T scalar = Derivative::apply(v);
    for (std::size_t l = 0; l < L; l += 2) {
      CAPTURE(l, scalar, lanes_out[l]);
      CHECK(std::isnan(lanes_out[l]) == std::isnan(scalar));
      if (!std::isnan(scalar)) CHECK(lanes_out[l] == scalar);
    }
    for (std::size_t l = 1; l < L; l += 2) CHECK(lanes_out[l] == half_out[l]);  // neighbours untouched
  }
}

// d ⊙ act'(pre) for one row, against the double formula: act' within derivative_bound, times an
// exact d, then one rounded multiply.
template <class Act, class T>
void check_activation_backward(std::size_t n, std::size_t offset) {
  INFO("activation " << Act::name);
  auto rng = make_rng(n, offset, 70);
  Guarded<T> pre = input<T>(n, offset);
  fill_uniform(pre.data(), n, -6.0, 6.0, rng);
  Guarded<T> d = output<T>(n, 1 - offset);  // the other alignment
  fill_uniform(d.data(), n, -2.0, 2.0, rng);
  const std::vector<double> before = to_doubles(d.data(), n);
  moe::simd::activation_backward<Act>(Arch{}, pre.data(), d.data(), n);
  for (std::size_t i = 0; i < n; ++i) {
    CAPTURE(i, pre[i], before[i]);
    const double ref = before[i] * derivative_reference(Act{}, dbl(pre[i]));
    const double bound = std::abs(before[i]) * derivative_bound<T>(Act{}, dbl(pre[i])) + eps<T>() * std::abs(ref) + tiny<T>();
    CHECK(std::abs(dbl(d[i]) - ref) <= bound);
  }
  CHECK(d.guards_intact());
}

// For hidden = act(gate) ⊙ up: d_gate = dh ⊙ up ⊙ act'(gate) (two rounded multiplies after act')
// and d_up = dh ⊙ act(gate) written over dh (act within activation_bound, one multiply).
template <class Act, class T>
void check_gated_activation_backward(std::size_t n, std::size_t offset) {
  INFO("activation " << Act::name);
  auto rng = make_rng(n, offset, 80);
  Guarded<T> gate = input<T>(n, offset), up = input<T>(n, 1 - offset);
  fill_uniform(gate.data(), n, -6.0, 6.0, rng);
  fill_uniform(up.data(), n, -2.0, 2.0, rng);
  Guarded<T> dh = output<T>(n, offset), d_gate = output<T>(n, 1 - offset);
  fill_uniform(dh.data(), n, -2.0, 2.0, rng);
  const std::vector<double> grad = to_doubles(dh.data(), n);
  moe::simd::gated_activation_backward<Act>(Arch{}, gate.data(), up.data(), dh.data(), d_gate.data(), n);
  for (std::size_t i = 0; i < n; ++i) {
    const double g = dbl(gate[i]), u = dbl(up[i]);
    CAPTURE(i, g, u, grad[i]);
    const double gate_ref = grad[i] * u * derivative_reference(Act{}, g);
    const double gate_bound =
        std::abs(grad[i] * u) * derivative_bound<T>(Act{}, g) + 2 * eps<T>() * std::abs(gate_ref) + tiny<T>();
    CHECK(std::abs(dbl(d_gate[i]) - gate_ref) <= gate_bound);
    const double act = reference(Act{}, g), up_ref = grad[i] * act;
    const double up_bound = std::abs(grad[i]) * activation_bound<T>(Act{}, g, act) + eps<T>() * std::abs(up_ref) + tiny<T>();
    CHECK(std::abs(dbl(dh[i]) - up_ref) <= up_bound);
  }
  CHECK(dh.guards_intact());
  CHECK(d_gate.guards_intact());
}

}  // namespace

TEMPLATE_TEST_CASE("Activation derivatives: scalar and batch forms match the double formulas and agree on NaN and ±inf",
                   "[simd][activations]", float, double) {
  using T = TestType;
  for_each_activation([&](auto act) { check_derivative_scalar_and_batch<decltype(act), T>(); });
}

TEMPLATE_TEST_CASE("simd::activation_backward and simd::gated_activation_backward match the double formulas",
                   "[simd][activations]", float, double) {
  using T = TestType;
  const std::size_t n = GENERATE(from_range(lengths_around_lanes<T>()));
  const std::size_t offset = GENERATE(as<std::size_t>{}, 0, 1);
  CAPTURE(n, offset);
  for_each_activation([&](auto act) {
    check_activation_backward<decltype(act), T>(n, offset);
    check_gated_activation_backward<decltype(act), T>(n, offset);
  });
}

TEMPLATE_TEST_CASE("simd::activate and simd::gated_activate match the double formulas", "[simd][activations]", float,
                   double) {
  using T = TestType;
  const std::size_t n = GENERATE(from_range(lengths_around_lanes<T>()));
  const std::size_t offset = GENERATE(as<std::size_t>{}, 0, 1);
  CAPTURE(n, offset);
  for_each_activation([&](auto act) {
    check_activate<decltype(act), T>(n, offset);
    check_gated_activate<decltype(act), T>(n, offset);
  });
}

namespace {

// Whether a and b hold the same bits.
template <class T>
bool same_bits(T a, T b) {
  return std::memcmp(&a, &b, sizeof(T)) == 0;
}

// The row kernels on a row of n = 3L + 5 whose last n mod L elements repeat the inputs of elements
// inside the full batches (at other lanes, src[j]): each must come out with the same bits. The tail
// used the scalar formulas (std::erfc, std::exp...), which differ from the batch ones in the last
// bits for 4–70% of inputs, so an element's result depended on its position in the row.
template <class Act, class T>
void check_tail_position(std::mt19937& rng) {
  INFO("activation " << Act::name);
  constexpr std::size_t L = kLanes<T>;
  const std::size_t n = 3 * L + 5, body = n - n % L;
  std::vector<std::size_t> src(n - body);
  for (std::size_t j = 0; j < src.size(); ++j) src[j] = (7 * j + 3) % body;
  // Rows of random values whose tails repeat elements of the body.
  auto row = [&](double lo, double hi) {
    std::vector<T> v(n);
    fill_uniform(v.data(), body, lo, hi, rng);
    for (std::size_t j = 0; j < src.size(); ++j) v[body + j] = v[src[j]];
    return v;
  };
  auto check_row = [&](const std::vector<T>& v, const char* what) {
    INFO(what);
    for (std::size_t j = 0; j < src.size(); ++j) {
      CAPTURE(j, src[j], v[body + j], v[src[j]]);
      CHECK(same_bits(v[body + j], v[src[j]]));
    }
  };
  for (int trial = 0; trial < 20; ++trial) {
    CAPTURE(trial);
    const std::vector<T> gate = row(-8.0, 8.0), up = row(-2.0, 2.0), d = row(-2.0, 2.0);

    std::vector<T> x = gate;
    moe::simd::activate<Act>(Arch{}, x.data(), n);
    check_row(x, "activate");

    std::vector<T> h = gate;
    moe::simd::gated_activate<Act>(Arch{}, h.data(), up.data(), n);
    check_row(h, "gated_activate");

    std::vector<T> dx = d;
    moe::simd::activation_backward<Act>(Arch{}, gate.data(), dx.data(), n);
    check_row(dx, "activation_backward");

    std::vector<T> dh = d, d_gate(n);
    moe::simd::gated_activation_backward<Act>(Arch{}, gate.data(), up.data(), dh.data(), d_gate.data(), n);
    check_row(dh, "gated_activation_backward, d_up");
    check_row(d_gate, "gated_activation_backward, d_gate");
  }
}

}  // namespace

TEMPLATE_TEST_CASE("Activation row kernels: an element's bits do not depend on its position in the row",
                   "[simd][activations]", float, double) {
  using T = TestType;
  auto rng = make_rng(kLanes<T>, 95);
  for_each_activation([&](auto act) { check_tail_position<decltype(act), T>(rng); });
}

// ---- matmul_nn.hpp -------------------------------------------------------------------------------

TEMPLATE_TEST_CASE("simd::matmul_nn computes x · w and x · w + y, each row as if alone", "[simd][matmul]", float,
                   double) {
  using T = TestType;
  constexpr std::size_t L = kLanes<T>;
  constexpr std::size_t panel = moe::simd::nn_panel_vectors<Arch>() * L;
  // m = 9 and 13: two and three row blocks, which the threads share when w is one panel wide; 40:
  // enough blocks that a packed chunk fetches the next one (kNNPrefetchTokens).
  const std::size_t m = GENERATE(as<std::size_t>{}, 0, 1, 2, 3, 4, 5, 9, 13, 40);
  // k = 300 spans three depth chunks of 128; n covers single columns, whole vectors, a partial
  // panel, two full panels (the last one packed) and one and a bit.
  const std::size_t k = GENERATE(as<std::size_t>{}, 0, 1, 3, 300);
  const std::size_t n = GENERATE_COPY(as<std::size_t>{}, 1, L - 1, L + 1, 2 * L + 3, panel, 2 * panel, panel + L + 1);
  const bool accumulate = GENERATE(false, true);
  const std::size_t offset = GENERATE(as<std::size_t>{}, 0, 1);
  CAPTURE(m, k, n, accumulate, offset);
  auto rng = make_rng(1000 * m + k, n, 2 * offset + accumulate);

  const std::size_t ldx = k + 2, ldw = n + 1, ldy = n + 3;
  Guarded<T> x = input<T>(m * ldx, offset);  // [m, ldx]
  fill_uniform(x.data(), m * ldx, -1.0, 1.0, rng);
  Guarded<T> w = input<T>(k * ldw, offset);  // [k, ldw]
  fill_uniform(w.data(), k * ldw, -1.0, 1.0, rng);
  std::vector<T> y0(m * ldy, Guarded<T>::sentinel());  // the starting y (its padding stays)
  if (accumulate)
    for (std::size_t j = 0; j < m; ++j) fill_uniform(y0.data() + j * ldy, n, -1.0, 1.0, rng);
  Guarded<T> y = output<T>(m * ldy, offset);
  std::copy(y0.begin(), y0.end(), y.data());
  moe::simd::matmul_nn_strided(Arch{}, x.data(), ldx, m, k, w.data(), ldw, n, y.data(), ldy, accumulate);

  const DotReference ref = products_reference(
      m, k, n, [&](std::size_t j, std::size_t c) { return accumulate ? dbl(y0[j * ldy + c]) : 0.0; },
      [&](std::size_t j, std::size_t i) { return dbl(x[j * ldx + i]); },
      [&](std::size_t i, std::size_t c) { return dbl(w[i * ldw + c]); });
  for (std::size_t j = 0; j < m; ++j) {
    CAPTURE(j);
    for (std::size_t c = 0; c < n; ++c) {
      CAPTURE(c);
      const std::size_t e = j * n + c;
      CHECK(std::abs(dbl(y[j * ldy + c]) - ref.dot[e]) <= dot_bound<T>(k, ref.abs_sum[e]));
      // The documented order, exactly: one chain of multiply-adds over i from y0 or 0, whichever lane,
      // vector or padded tail the column falls in.
      T chain = accumulate ? y0[j * ldy + c] : T(0);
      for (std::size_t i = 0; i < k; ++i) chain = chain_step(x[j * ldx + i], w[i * ldw + c], chain);
      CHECK(y[j * ldy + c] == chain);
    }
    for (std::size_t c = n; c < ldy; ++c) CHECK(y[j * ldy + c] == Guarded<T>::sentinel());

    Guarded<T> alone = output<T>(n, offset);
    std::copy(y0.begin() + static_cast<std::ptrdiff_t>(j * ldy), y0.begin() + static_cast<std::ptrdiff_t>(j * ldy + n),
              alone.data());
    moe::simd::matmul_nn_strided(Arch{}, x.data() + j * ldx, ldx, 1, k, w.data(), ldw, n, alone.data(), n, accumulate);
    for (std::size_t c = 0; c < n; ++c) CHECK(alone[c] == y[j * ldy + c]);
    CHECK(alone.guards_intact());
  }
  CHECK(y.guards_intact());
}

TEMPLATE_TEST_CASE("simd::matmul_tn(_strided) computes xᵀ · w and xᵀ · w + y with matmul_nn's bits", "[simd][matmul]", float,
                   double) {
  using T = TestType;
  constexpr std::size_t L = kLanes<T>;
  constexpr std::size_t panel = moe::simd::nn_panel_vectors<Arch>() * L;
  // m rows of y (x's columns): within one register block, several, and a ragged last block (100:
  // the last block of 4); k (x's and w's rows) as for matmul_nn, 300 spanning three depth chunks of
  // 128 and the deep (not shallow) path, and packed in tiles of 16 rows, the last one of 12; n from
  // three panels on packs x where m = 100 (simd::tn_packs_x; fewer rows go in bands).
  const std::size_t m = GENERATE(as<std::size_t>{}, 0, 1, 5, 7, 13, 100);
  const std::size_t k = GENERATE(as<std::size_t>{}, 0, 1, 3, 300);
  const std::size_t n = GENERATE_COPY(as<std::size_t>{}, 1, L + 1, panel, 2 * panel, panel + L + 1, 3 * panel + L + 1);
  const bool accumulate = GENERATE(false, true);
  CAPTURE(m, k, n, accumulate);
  auto rng = make_rng(1000 * m + k, n, 7 + accumulate);

  // x, w and y rows with padding (matmul_tn_strided); the contiguous matmul_tn must give the same bits.
  const std::size_t ldx = m + 2, ldw = n + 1, ldy = n + 3;
  Guarded<T> x = input<T>(k * ldx, 0);  // [k, ldx]
  fill_uniform(x.data(), k * ldx, -1.0, 1.0, rng);
  Guarded<T> w = input<T>(k * ldw, 0);  // [k, ldw]
  fill_uniform(w.data(), k * ldw, -1.0, 1.0, rng);
  std::vector<T> y0(m * n, T(0));
  if (accumulate) fill_uniform(y0.data(), m * n, -1.0, 1.0, rng);
  else std::fill(y0.begin(), y0.end(), Guarded<T>::sentinel());  // written over
  Guarded<T> y = output<T>(m * ldy, 0);
  for (std::size_t j = 0; j < m; ++j) {
    std::copy(y0.begin() + static_cast<std::ptrdiff_t>(j * n), y0.begin() + static_cast<std::ptrdiff_t>((j + 1) * n),
              y.data() + j * ldy);
    std::fill(y.data() + j * ldy + n, y.data() + (j + 1) * ldy, Guarded<T>::sentinel());
  }
  Guarded<T> y_packing = y;
  moe::simd::matmul_tn_strided(Arch{}, x.data(), ldx, k, m, w.data(), ldw, n, y.data(), ldy, accumulate);
  // With scratch to pack x in (which the shapes of three panels or more take: tn_packs_x): the same
  // bits, and nothing written outside the scratch.
  Guarded<T> packing = output<T>(moe::simd::tn_packing_size(k, m), 0);
  moe::simd::matmul_tn_strided(Arch{}, x.data(), ldx, k, m, w.data(), ldw, n, y_packing.data(), ldy, accumulate,
                               packing.data());
  CHECK(packing.guards_intact());
  CHECK(y_packing.guards_intact());

  std::vector<T> x_packed(k * m), w_packed(k * n), y_packed(y0);
  for (std::size_t i = 0; i < k; ++i) {
    std::copy(x.data() + i * ldx, x.data() + i * ldx + m, x_packed.begin() + static_cast<std::ptrdiff_t>(i * m));
    std::copy(w.data() + i * ldw, w.data() + i * ldw + n, w_packed.begin() + static_cast<std::ptrdiff_t>(i * n));
  }
  moe::simd::matmul_tn(Arch{}, x_packed.data(), k, m, w_packed.data(), n, y_packed.data(), accumulate);

  // The same sums through matmul_nn on x transposed: one chain per element in the same order.
  std::vector<T> xt(m * k);
  for (std::size_t i = 0; i < k; ++i)
    for (std::size_t j = 0; j < m; ++j) xt[j * k + i] = x[i * ldx + j];
  std::vector<T> y_nn(y0);
  moe::simd::matmul_nn(Arch{}, xt.data(), m, k, w_packed.data(), n, y_nn.data(), accumulate);

  const DotReference ref = products_reference(
      m, k, n, [&](std::size_t j, std::size_t c) { return accumulate ? dbl(y0[j * n + c]) : 0.0; },
      [&](std::size_t j, std::size_t i) { return dbl(x[i * ldx + j]); },
      [&](std::size_t i, std::size_t c) { return dbl(w[i * ldw + c]); });
  for (std::size_t j = 0; j < m; ++j) {
    CAPTURE(j);
    for (std::size_t c = 0; c < n; ++c) {
      CAPTURE(c);
      const std::size_t e = j * n + c;
      CHECK(std::abs(dbl(y[j * ldy + c]) - ref.dot[e]) <= dot_bound<T>(k, ref.abs_sum[e]));
      CHECK(y[j * ldy + c] == y_nn[e]);
      CHECK(y[j * ldy + c] == y_packed[e]);
      CHECK(y[j * ldy + c] == y_packing[j * ldy + c]);
    }
    for (std::size_t c = n; c < ldy; ++c) CHECK(y[j * ldy + c] == Guarded<T>::sentinel());
  }
  CHECK(y.guards_intact());
}

// matmul_nn and matmul_tn (x packed and in place) on architecture A, where y's panel (m · panel
// elements) is beyond kNNCachedPanelBytes, so packed panels take chunks of kNNDeepChunk rows. k
// spans two of them and a tail; n three packed panels, then a narrow one when `narrow`. Every element
// against its chain of multiply-adds.
template <class T, class A>
void check_deep_chunks(bool narrow, bool accumulate) {
  constexpr std::size_t panel = moe::simd::nn_panel_vectors<A>() * xsimd::batch<T, A>::size;
  const std::size_t m = moe::simd::kNNCachedPanelBytes / (panel * sizeof(T)) + 7;
  // Three panels or more, so that matmul_tn packs x (simd::tn_packs_x).
  const std::size_t k = 2 * moe::simd::kNNDeepChunk + 76, n = 3 * panel + (narrow ? 3 : 0);
  CAPTURE(m, k, n, accumulate);
  REQUIRE(moe::simd::tn_packs_x<A, T>(k, m, n, m));
  auto rng = make_rng(m, k, accumulate);
  std::vector<T> x(m * k), xt(k * m), w(k * n), y0(m * n, T(0));
  fill_uniform(x.data(), x.size(), -1.0, 1.0, rng);
  fill_uniform(w.data(), w.size(), -1.0, 1.0, rng);
  if (accumulate) fill_uniform(y0.data(), y0.size(), -1.0, 1.0, rng);
  for (std::size_t j = 0; j < m; ++j)
    for (std::size_t i = 0; i < k; ++i) xt[i * m + j] = x[j * k + i];
  std::vector<T> y_nn(y0), y_tn(y0), y_tn_in_place(y0), packing(moe::simd::tn_packing_size(k, m));
  moe::simd::matmul_nn(A{}, x.data(), m, k, w.data(), n, y_nn.data(), accumulate);
  moe::simd::matmul_tn(A{}, xt.data(), k, m, w.data(), n, y_tn.data(), accumulate, packing.data());
  moe::simd::matmul_tn(A{}, xt.data(), k, m, w.data(), n, y_tn_in_place.data(), accumulate);
  std::size_t differing = 0;
  for (std::size_t j = 0; j < m; ++j)
    for (std::size_t c = 0; c < n; ++c) {
      T chain = y0[j * n + c];
      for (std::size_t i = 0; i < k; ++i) chain = chain_step(x[j * k + i], w[i * n + c], chain);
      differing += !(y_nn[j * n + c] == chain) + !(y_tn[j * n + c] == chain) + !(y_tn_in_place[j * n + c] == chain);
    }
  CHECK(differing == 0);
}

TEMPLATE_TEST_CASE("simd::matmul_nn and matmul_tn keep each element's chain with deep chunks", "[simd][matmul]", float,
                   double) {
  const bool narrow = GENERATE(false, true), accumulate = GENERATE(false, true);
  SECTION("on this build's architecture") { check_deep_chunks<TestType, Arch>(narrow, accumulate); }
#if XSIMD_WITH_FMA3_AVX2
  SECTION("on AVX2 with FMA (16 registers: panels of two vectors)") {
    check_deep_chunks<TestType, xsimd::fma3<xsimd::avx2>>(narrow, accumulate);
  }
#endif
}

// matmul_nn and matmul_tn (with scratch offered) on architecture A with m token rows against a w
// deeper than a depth chunk (not shallow, so not row blocks outside): up to kNNBandTokens rows, the
// product goes in bands (kNNBandRows rows, the last one partial, in groups of panels), beyond in
// panels. `wide`: n spans three groups and ends in a narrow panel; else four panels, which two
// groups of two share. Every element against its chain of multiply-adds, and y's padding kept.
template <class T, class A>
void check_bands(std::size_t m, bool wide, bool accumulate) {
  constexpr std::size_t L = xsimd::batch<T, A>::size;
  constexpr std::size_t panel = moe::simd::nn_panel_vectors<A>() * L;
  const std::size_t k = 8 * moe::simd::kNNBandRows + 21;
  const std::size_t n = wide ? 2 * (moe::simd::kNNBandBytes / sizeof(T)) + panel + L + 3 : 4 * panel;
  CAPTURE(m, k, n, accumulate);
  REQUIRE(!moe::simd::nn_rows_outside<A, T>(k, n));
  REQUIRE(moe::simd::tn_packs_x<A, T>(k, m, n, m) == (m > moe::simd::kNNBandTokens));
  auto rng = make_rng(m, n, accumulate);
  const std::size_t ldy = n + 5;
  std::vector<T> x(m * k), xt(k * m), w(k * n), y0(m * ldy, Guarded<T>::sentinel());
  fill_uniform(x.data(), x.size(), -1.0, 1.0, rng);
  fill_uniform(w.data(), w.size(), -1.0, 1.0, rng);
  if (accumulate)
    for (std::size_t j = 0; j < m; ++j) fill_uniform(y0.data() + j * ldy, n, -1.0, 1.0, rng);
  for (std::size_t j = 0; j < m; ++j)
    for (std::size_t i = 0; i < k; ++i) xt[i * m + j] = x[j * k + i];
  std::vector<T> y_nn(y0), y_tn(y0), packing(moe::simd::tn_packing_size(k, m));
  moe::simd::matmul_nn_strided(A{}, x.data(), k, m, k, w.data(), n, n, y_nn.data(), ldy, accumulate);
  moe::simd::matmul_tn_strided(A{}, xt.data(), m, k, m, w.data(), n, n, y_tn.data(), ldy, accumulate, packing.data());
  std::size_t differing = 0, padding_changed = 0;
  for (std::size_t j = 0; j < m; ++j) {
    for (std::size_t c = 0; c < n; ++c) {
      T chain = accumulate ? y0[j * ldy + c] : T(0);
      for (std::size_t i = 0; i < k; ++i) chain = chain_step(x[j * k + i], w[i * n + c], chain);
      differing += !(y_nn[j * ldy + c] == chain) + !(y_tn[j * ldy + c] == chain);
    }
    const T sentinel = Guarded<T>::sentinel();
    for (std::size_t c = n; c < ldy; ++c)
      padding_changed += !(y_nn[j * ldy + c] == sentinel) + !(y_tn[j * ldy + c] == sentinel);
  }
  CHECK(differing == 0);
  CHECK(padding_changed == 0);
}

TEMPLATE_TEST_CASE("simd::matmul_nn and matmul_tn take few token rows in bands, keeping each element's chain",
                   "[simd][matmul]", float, double) {
  // One row, one full token block, one and a ragged one, the most in bands, and one more (panels).
  const std::size_t m =
      GENERATE(as<std::size_t>{}, 1, 6, 13, moe::simd::kNNBandTokens, moe::simd::kNNBandTokens + 1);
  const bool wide = GENERATE(false, true), accumulate = GENERATE(false, true);
  SECTION("on this build's architecture") { check_bands<TestType, Arch>(m, wide, accumulate); }
#if XSIMD_WITH_FMA3_AVX2
  SECTION("on AVX2 with FMA (16 registers: panels of two vectors)") {
    check_bands<TestType, xsimd::fma3<xsimd::avx2>>(m, wide, accumulate);
  }
#endif
}

// matmul_tn with packed x beyond kTNGroupBytes, which takes the depth in slabs of one chunk
// outside the panels, and y's rows in groups where a slab is larger still: the bits of the product
// without scratch (which does neither), every element in place and a sample against its chain, and
// nothing written outside the scratch. Shapes: k = 1,100 (slabs of one chunk, the last one
// partial) with m just past the threshold and 100 rows more, and with row groups whose last one has
// 5 rows (read in place) or 100; k = 8,300, whose few rows take 128-row chunks; every shape with a
// narrow last panel. (The chunk depends on the panel's width: on AVX-512, k = 1,100 takes 512-row
// chunks, three slabs, in every shape, and k = 8,300 does too at 100 rows more in float.)
TEMPLATE_TEST_CASE("simd::matmul_tn with a large packed x takes depth slabs outside, with the same bits",
                   "[simd][matmul]", float, double) {
  using T = TestType;
  constexpr std::size_t panel = moe::simd::nn_panel_vectors<Arch>() * kLanes<T>;
  constexpr std::size_t block = moe::simd::kNNTokenBlock;
  constexpr std::size_t group = moe::simd::kTNGroupBytes / (moe::simd::kNNDeepChunk * sizeof(T)) / block * block;
  const std::size_t k = GENERATE(as<std::size_t>{}, 1100, 8300);
  const std::size_t least = moe::simd::kTNGroupBytes / (k * sizeof(T)) + 1;
  const std::size_t m = k == 1100 ? GENERATE_COPY(as<std::size_t>{}, least, least + 100, group + 5, group + 100)
                                  : GENERATE_COPY(as<std::size_t>{}, least, least + 100);
  const std::size_t n = 2 * panel + 3;
  const bool accumulate = GENERATE(false, true);
  CAPTURE(k, m, accumulate);
  REQUIRE(m * k * sizeof(T) > moe::simd::kTNGroupBytes);
  REQUIRE(moe::simd::tn_packs_x<Arch, T>(k, m, n, m));
  auto rng = make_rng(m, k, 11 + accumulate);
  std::vector<T> x(k * m), w(k * n), y0(m * n, T(0));
  fill_uniform(x.data(), x.size(), -1.0, 1.0, rng);
  fill_uniform(w.data(), w.size(), -1.0, 1.0, rng);
  if (accumulate) fill_uniform(y0.data(), y0.size(), -1.0, 1.0, rng);
  std::vector<T> y_in_place(y0), y_slabs(y0);
  Guarded<T> packing = output<T>(moe::simd::tn_packing_size(k, m), 0);
  moe::simd::matmul_tn(Arch{}, x.data(), k, m, w.data(), n, y_in_place.data(), accumulate);
  moe::simd::matmul_tn(Arch{}, x.data(), k, m, w.data(), n, y_slabs.data(), accumulate, packing.data());
  CHECK(packing.guards_intact());
  std::size_t differing = 0, chains_differing = 0;
  for (std::size_t e = 0; e < m * n; ++e) differing += !(y_slabs[e] == y_in_place[e]);
  for (std::size_t e = 0; e < m * n; e += 37) {
    const std::size_t j = e / n, c = e % n;
    T chain = y0[e];
    for (std::size_t i = 0; i < k; ++i) chain = chain_step(x[i * m + j], w[i * n + c], chain);
    chains_differing += !(y_slabs[e] == chain);
  }
  CHECK(differing == 0);
  CHECK(chains_differing == 0);
}

// Where matmul_tn packs x given scratch: three panels or more, or fewer where x's rows are a whole
// number of 4 KiB pages apart; never where row blocks go outside (a shallow w, or one panel).
TEMPLATE_TEST_CASE("simd::tn_packs_x packs for three panels, or for rows a page apart", "[simd][matmul]", float,
                   double) {
  using T = TestType;
  constexpr std::size_t panel = moe::simd::nn_panel_columns<Arch, T>();
  const std::size_t k = 300, m = 40, page_row = moe::simd::kPageBytes / sizeof(T);
  CHECK(moe::simd::tn_packs_x<Arch, T>(k, m, 2 * panel + 1, m));
  CHECK_FALSE(moe::simd::tn_packs_x<Arch, T>(k, m, 2 * panel, m));
  CHECK(moe::simd::tn_packs_x<Arch, T>(k, m, 2 * panel, page_row));
  CHECK(moe::simd::tn_packs_x<Arch, T>(k, m, panel + 1, 2 * page_row));
  CHECK_FALSE(moe::simd::tn_packs_x<Arch, T>(k, m, panel + 1, page_row + 1));
  CHECK_FALSE(moe::simd::tn_packs_x<Arch, T>(k, m, panel, page_row));  // one panel
  CHECK_FALSE(moe::simd::tn_packs_x<Arch, T>(100, m, 3 * panel, m));   // shallow
  CHECK_FALSE(moe::simd::tn_packs_x<Arch, T>(0, m, 3 * panel, m));
  CHECK_FALSE(moe::simd::tn_packs_x<Arch, T>(k, moe::simd::kNNBandTokens, 3 * panel, m));  // bands
}

// matmul_tn with YStore::past_caches writing a large y over in one pass over the depth, on aligned
// rows: on AVX-512 it stores y's lines past the caches (simd::streams_y). The bits of the same
// product into rows off 64-byte lines (stored as usual), a sample of elements against their chains,
// and nothing written outside y's columns. Paths: a shallow product (row blocks outside, which
// stream only up to kNNStreamRowsDepth rows deep), panels over x read in place (k within one chunk),
// panels over packed x in one deep chunk, and bands (few rows of y, which stream only within one
// band); each with a narrow last panel and a tail. (Whether the stores did go past the caches is
// not visible here. A streamed store of the wrong value failed 12 assertions on AVX-512, session
// 57, and the bits' checks of every path that streamed, bands too, on AVX2 with these stores tried.)
TEMPLATE_TEST_CASE("simd::matmul_tn writes a large y over past the caches, with the same bits", "[simd][matmul]", float,
                   double) {
  using T = TestType;
  constexpr std::size_t L = kLanes<T>;
  constexpr std::size_t panel = moe::simd::nn_panel_columns<Arch, T>();
  const std::size_t path = GENERATE(as<std::size_t>{}, 0, 1, 2, 3);  // shallow, x in place, x packed, bands
  const std::size_t band_rows = moe::simd::kNNBandRows, band_tokens = moe::simd::kNNBandTokens;
  const std::size_t k = path == 0 ? moe::simd::kNNStreamRowsDepth : path == 1 ? 100 : path == 2 ? 300 : band_rows;
  // (x in place: a w larger than a shallow one, kNNShallowBytes, though k is within one chunk.)
  const std::size_t wide = (moe::simd::kNNShallowBytes / (k * sizeof(T)) / panel + 1) * panel;
  const std::size_t bands_wide = moe::simd::kNNStreamBytes / (band_tokens * sizeof(T));  // (and w not shallow)
  const std::size_t n = (path == 0 ? panel : path == 1 ? wide : path == 2 ? 3 * panel : bands_wide) + L + 3;
  const std::size_t m = path == 3 ? band_tokens : moe::simd::kNNStreamBytes / (n * sizeof(T)) + 7;
  const std::size_t ldy = (n * sizeof(T) + 63) / 64 * 64 / sizeof(T), ldy_plain = ldy + 1;
  CAPTURE(path, k, m, n);
  auto rng = make_rng(m, k, 23 + path);
  std::vector<T> x(k * m), w(k * n);
  fill_uniform(x.data(), x.size(), -1.0, 1.0, rng);
  fill_uniform(w.data(), w.size(), -1.0, 1.0, rng);
  Guarded<T> y = output<T>(m * ldy, 0), y_plain = output<T>(m * ldy_plain, 0);
  REQUIRE(moe::simd::streams_y<Arch, T>(k, m, n, y.data(), ldy, false) == moe::simd::streams_lines<Arch, T>());
  REQUIRE_FALSE(moe::simd::streams_y<Arch, T>(k, m, n, y_plain.data(), ldy_plain, false));
  if (path == 0 || path == 3) REQUIRE_FALSE(moe::simd::streams_y<Arch, T>(k + 1, m, n, y.data(), ldy, false));
  REQUIRE(moe::simd::nn_bands<Arch, T>(m, k, n) == (path == 3));
  REQUIRE(moe::simd::tn_packs_x<Arch, T>(k, m, n, m) == (path == 1 || path == 2));
  std::vector<T> packing(path == 2 ? moe::simd::tn_packing_size(k, m) : 0);
  T* const scratch = path == 2 ? packing.data() : nullptr;
  constexpr auto past_caches = moe::simd::YStore::past_caches;
  moe::simd::matmul_tn_strided(Arch{}, x.data(), m, k, m, w.data(), n, n, y.data(), ldy, false, scratch, past_caches);
  moe::simd::matmul_tn_strided(Arch{}, x.data(), m, k, m, w.data(), n, n, y_plain.data(), ldy_plain, false, scratch,
                               past_caches);
  CHECK(y.guards_intact());
  CHECK(y_plain.guards_intact());
  std::size_t differing = 0, chains_differing = 0, padding_written = 0;
  for (std::size_t j = 0; j < m; ++j) {
    for (std::size_t c = 0; c < n; ++c) differing += !(y[j * ldy + c] == y_plain[j * ldy_plain + c]);
    for (std::size_t c = n; c < ldy; ++c) padding_written += !(y[j * ldy + c] == Guarded<T>::sentinel());
  }
  for (std::size_t e = 0; e < m * n; e += 37) {
    const std::size_t j = e / n, c = e % n;
    T chain(0);
    for (std::size_t i = 0; i < k; ++i) chain = chain_step(x[i * m + j], w[i * n + c], chain);
    chains_differing += !(y[j * ldy + c] == chain);
  }
  CHECK(differing == 0);
  CHECK(chains_differing == 0);
  CHECK(padding_written == 0);
}

}  // namespace kernels_test
