#pragma once
// Plain, obviously-correct references for the tests: loops in double, no SIMD, no Eigen products.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <random>
#include <vector>

#include <moe/moe.hpp>

namespace moe_test {

using moe::index_t;
using Mat = std::vector<std::vector<double>>;  // [rows][cols]

// Deterministic uniform random matrix in [-scale, scale].
template <class T>
moe::Matrix<T> random_matrix(index_t rows, index_t cols, std::uint32_t seed, double scale = 1.0) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<double> u(-scale, scale);
  moe::Matrix<T> m(rows, cols);
  for (index_t r = 0; r < rows; ++r)
    for (index_t c = 0; c < cols; ++c) m(r, c) = static_cast<T>(u(rng));
  return m;
}

// Deterministic normal random matrix, N(0, scale²), drawn from the caller's generator.
template <class T>
moe::Matrix<T> normal_matrix(std::mt19937& rng, index_t rows, index_t cols, double scale = 1.0) {
  std::normal_distribution<double> normal(0.0, scale);
  moe::Matrix<T> m(rows, cols);
  for (index_t i = 0; i < m.size(); ++i) m.data()[i] = static_cast<T>(normal(rng));
  return m;
}

// An element of a std::vector by a signed index (moe::PlanArray takes index_t itself).
template <class V>
auto at(V& v, index_t i) -> decltype(v[0]) {
  return v[static_cast<std::size_t>(i)];
}

template <class M>
Mat to_double(const M& m) {
  Mat out(static_cast<std::size_t>(m.rows()), std::vector<double>(static_cast<std::size_t>(m.cols())));
  for (index_t r = 0; r < m.rows(); ++r)
    for (index_t c = 0; c < m.cols(); ++c) out[std::size_t(r)][std::size_t(c)] = static_cast<double>(m(r, c));
  return out;
}

// out[j] = Σ_i w[j][i] · x[i]  (nn.Linear without bias; w is [out, in])
inline std::vector<double> linear(const Mat& w, const std::vector<double>& x) {
  std::vector<double> out(w.size(), 0.0);
  for (std::size_t j = 0; j < w.size(); ++j)
    for (std::size_t i = 0; i < x.size(); ++i) out[j] += w[j][i] * x[i];
  return out;
}

inline std::vector<double> softmax(const std::vector<double>& v) {
  if (v.empty()) return {};
  const double m = *std::max_element(v.begin(), v.end());
  std::vector<double> out(v.size());
  double sum = 0;
  for (std::size_t i = 0; i < v.size(); ++i) sum += (out[i] = std::exp(v[i] - m));
  for (double& o : out) o /= sum;
  return out;
}

inline double sigmoid(double v) { return 1.0 / (1.0 + std::exp(-v)); }
inline double silu(double v) { return v * sigmoid(v); }
inline double relu(double v) { return v > 0 ? v : 0; }
inline double gelu(double v) { return 0.5 * v * (1.0 + std::erf(v / std::sqrt(2.0))); }

// Indices of the k largest values, larger first, ties to the lower index.
inline std::vector<index_t> top_k(const std::vector<double>& v, index_t k) {
  std::vector<index_t> idx(v.size());
  std::iota(idx.begin(), idx.end(), index_t(0));
  std::stable_sort(idx.begin(), idx.end(), [&](index_t a, index_t b) { return v[std::size_t(a)] > v[std::size_t(b)]; });
  idx.resize(std::size_t(k));
  return idx;
}

// SwiGLU expert: (silu(x·Wgᵀ) ⊙ (x·Wuᵀ)) · Wdᵀ
inline std::vector<double> swiglu(const Mat& wg, const Mat& wu, const Mat& wd, const std::vector<double>& x) {
  std::vector<double> g = linear(wg, x), u = linear(wu, x);
  for (std::size_t i = 0; i < g.size(); ++i) g[i] = silu(g[i]) * u[i];
  return linear(wd, g);
}

// The same for one row x [d] of a SwiGLU expert's input, read from the expert's own weights.
template <class T>
std::vector<double> swiglu_row(const moe::SwiGLU<T>& expert, const T* x) {
  const std::vector<double> row(x, x + expert.d_model());
  return swiglu(to_double(expert.w_gate()), to_double(expert.w_up()), to_double(expert.w_down()), row);
}

// Largest |a - b| relative to the largest |b| (norm-relative error, robust near zeros).
template <class A>
double max_relative_error(const A& actual, const Mat& expected) {
  double err = 0, scale = 0;
  for (std::size_t r = 0; r < expected.size(); ++r)
    for (std::size_t c = 0; c < expected[r].size(); ++c) {
      err = std::max(err, std::fabs(static_cast<double>(actual(index_t(r), index_t(c))) - expected[r][c]));
      scale = std::max(scale, std::fabs(expected[r][c]));
    }
  return scale > 0 ? err / scale : err;
}

// Whether p is a multiple of `alignment` (a buffer's block on its boundary).
inline bool aligned_to(const void* p, std::size_t alignment) {
  return reinterpret_cast<std::uintptr_t>(p) % alignment == 0;
}

}  // namespace moe_test
