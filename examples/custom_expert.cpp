// Your own expert type in a MoELayer: a feed-forward expert with biases, as in fairseq's NLLB-MoE
// (y = relu(x · w1ᵀ + b1) · w2ᵀ + b2), which moe's FeedForward (no biases) does not cover.
// The members below are what MoELayer and SoftMoELayer need of an expert; a type that lacks one
// fails to compile with a message naming it (moe/experts/expert_concept.hpp, README "Your own
// expert type"). The program checks its own results, so it doubles as a test: the float forward
// against a plain double loop, and the double gradients against finite differences.
#include <moe/moe.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <vector>

template <class T>
class BiasedFeedForward {
 public:
  using Scalar = T;

  // Weight gradients, shaped like the weights; the layer zeroes them and checks their shapes
  // through for_each.
  struct Gradient {
    moe::Matrix<T> w1, b1, w2, b2;  // [d_ff, d], [1, d_ff], [d, d_ff], [1, d]
    template <class F>
    void for_each(F f) { f(w1); f(b1); f(w2); f(b2); }
    template <class F>
    void for_each(F f) const { f(w1); f(b1); f(w2); f(b2); }
  };

  // Views the caller's buffers (no copy): w1 [d_ff, d], b1 [d_ff], w2 [d, d_ff], b2 [d].
  BiasedFeedForward(const T* w1, const T* b1, const T* w2, const T* b2, moe::index_t d, moe::index_t d_ff)
      : w1_(w1), b1_(b1), w2_(w2), b2_(b2), d_(d), d_ff_(d_ff) {}

  moe::index_t d_model() const { return d_; }
  moe::index_t d_ff() const { return d_ff_; }
  moe::index_t scratch_size(moe::index_t m) const { return m * d_ff_; }
  moe::index_t saved_size(moe::index_t m) const { return m * d_ff_; }  // the pre-activations
  Gradient zero_gradient() const {
    using M = moe::Matrix<T>;
    return {M::Zero(d_ff_, d_), M::Zero(1, d_ff_), M::Zero(d_, d_ff_), M::Zero(1, d_)};
  }

  // y [m, d] = expert(x [m, d]), rows contiguous; the layer hands each thread its own scratch.
  // moe's row-independent kernel does the products, so each token's output row depends on that
  // token alone, whatever else shares the batch (the layer's batch isolation).
  template <class Arch>
  void forward(Arch arch, const T* x, moe::index_t m, T* y, T* scratch) const {
    linear(arch, x, m, d_, w1_, b1_, d_ff_, scratch);  // pre-activations
    relu(scratch, m);
    linear(arch, scratch, m, d_ff_, w2_, b2_, d_, y);
  }
  // forward() that also keeps what backward needs (saved_size(m) elements); the same output.
  template <class Arch>
  void forward_saving(Arch arch, const T* x, moe::index_t m, T* y, T* saved, T* scratch) const {
    linear(arch, x, m, d_, w1_, b1_, d_ff_, saved);
    std::copy(saved, saved + m * d_ff_, scratch);
    relu(scratch, m);
    linear(arch, scratch, m, d_ff_, w2_, b2_, d_, y);
  }

  // Given dy = ∂L/∂y [m, d]: writes dx [m, d] and adds the weight gradients to `grad` — the part of
  // an expert most worth a finite-difference check. Eigen does the weight gradients; dx goes
  // through moe's simd::matmul_nn, which sums each element in one order whatever m is, so a
  // token's row of dx does not depend on the other tokens (Eigen's GEMM blocks by m).
  template <class Arch = moe::simd::default_arch>
  void backward(const T* x, moe::index_t m, const T* dy, const T* saved, T* dx, Gradient& grad, Arch arch = {}) const {
    using Map = moe::ConstMatrixMap<T>;
    const Map X(x, m, d_), dY(dy, m, d_), pre(saved, m, d_ff_), W2(w2_, d_, d_ff_);
    const moe::Matrix<T> hidden = pre.cwiseMax(T(0));
    grad.w2.noalias() += dY.transpose() * hidden;
    grad.b2 += dY.colwise().sum();
    moe::Matrix<T> d_pre = dY * W2;  // [m, d_ff], then through the ReLU
    d_pre.array() *= (pre.array() > T(0)).template cast<T>();
    grad.w1.noalias() += d_pre.transpose() * X;
    grad.b1 += d_pre.colwise().sum();
    const auto rows = static_cast<std::size_t>(m);
    moe::simd::matmul_nn(arch, d_pre.data(), rows, static_cast<std::size_t>(d_ff_), w1_, static_cast<std::size_t>(d_), dx,
                         false);  // dx [m, d] = d_pre [m, d_ff] · w1 [d_ff, d]
  }

 private:
  // out [m, n] = in [m, k] · wᵀ + b, for w [n, k] and b [n].
  template <class Arch>
  static void linear(Arch arch, const T* in, moe::index_t m, moe::index_t k, const T* w, const T* b, moe::index_t n,
                     T* out) {
    const auto rows = static_cast<std::size_t>(m), cols = static_cast<std::size_t>(n);
    moe::simd::matmul_nt(arch, in, rows, static_cast<std::size_t>(k), w, cols, out, cols);
    for (std::size_t j = 0; j < rows; ++j)
      for (std::size_t i = 0; i < cols; ++i) out[j * cols + i] += b[i];
  }
  void relu(T* h, moe::index_t m) const {
    for (moe::index_t i = 0; i < m * d_ff_; ++i) h[i] = std::max(h[i], T(0));
  }

  const T* w1_;
  const T* b1_;
  const T* w2_;
  const T* b2_;
  moe::index_t d_, d_ff_;
};
static_assert(moe::is_expert_v<BiasedFeedForward<float>>, "BiasedFeedForward meets the expert contract");

// One model's buffers: router gate [E, d], and per expert w1, b1, w2, b2.
template <class T>
struct Model {
  moe::index_t d, d_ff, num_experts;
  std::vector<T> gate;
  std::vector<std::vector<T>> w1, b1, w2, b2;

  Model(moe::index_t d_, moe::index_t d_ff_, moe::index_t experts) : d(d_), d_ff(d_ff_), num_experts(experts) {
    auto fill = [](std::vector<T>& v, std::size_t n, double phase, double scale) {
      v.resize(n);
      for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<T>(scale * std::sin(0.71 * static_cast<double>(i) + phase));
    };
    fill(gate, std::size_t(num_experts * d), 0.3, 0.4);
    w1.resize(std::size_t(experts)), b1.resize(std::size_t(experts)), w2.resize(std::size_t(experts)), b2.resize(std::size_t(experts));
    for (std::size_t e = 0; e < std::size_t(experts); ++e) {
      const double p = static_cast<double>(e);
      fill(w1[e], std::size_t(d_ff * d), 1.0 + p, 0.3), fill(b1[e], std::size_t(d_ff), 2.0 + p, 0.2);
      fill(w2[e], std::size_t(d * d_ff), 3.0 + p, 0.3), fill(b2[e], std::size_t(d), 4.0 + p, 0.2);
    }
  }

  // A top-2 layer over views of these buffers: change a buffer and the layer sees the change.
  moe::MoELayer<moe::TopKRouter<T>, BiasedFeedForward<T>> layer() const {
    moe::TopKOptions options;
    options.k = 2;
    options.normalize = true;
    moe::TopKRouter<T> router(moe::ConstMatrixMap<T>(gate.data(), num_experts, d), options);
    std::vector<BiasedFeedForward<T>> experts;
    for (std::size_t e = 0; e < std::size_t(num_experts); ++e)
      experts.emplace_back(w1[e].data(), b1[e].data(), w2[e].data(), b2[e].data(), d, d_ff);
    return {router, experts};
  }
};

template <class T>
moe::Matrix<T> inputs(moe::index_t tokens, moe::index_t d) {
  moe::Matrix<T> x(tokens, d);
  for (moe::index_t t = 0; t < tokens; ++t)
    for (moe::index_t i = 0; i < d; ++i) x(t, i) = static_cast<T>(std::cos(0.37 * static_cast<double>(t * d + i)));
  return x;
}

// The float layer against a plain double loop over the plan the router made.
bool forward_matches_reference() {
  const Model<float> model(32, 48, 4);
  const auto layer = model.layer();
  const moe::Matrix<float> x = inputs<float>(7, model.d);
  moe::Matrix<float> y(x.rows(), model.d);
  moe::Workspace<float> ws;
  layer.forward(x, y, ws);
  const moe::Routing<float>& plan = ws.routing.plan;
  double worst = 0;
  for (moe::index_t t = 0; t < x.rows(); ++t) {
    std::vector<double> ref(std::size_t(model.d), 0.0), hidden(std::size_t(model.d_ff));
    for (moe::index_t j = plan.token_begin[t]; j < plan.token_begin[t + 1]; ++j) {
      const moe::index_t a = plan.assignment[j];
      const auto e = static_cast<std::size_t>(plan.expert_of_assignment(a));
      for (moe::index_t h = 0; h < model.d_ff; ++h) {
        double s = double(model.b1[e][std::size_t(h)]);
        for (moe::index_t i = 0; i < model.d; ++i) s += double(model.w1[e][std::size_t(h * model.d + i)]) * double(x(t, i));
        hidden[std::size_t(h)] = std::max(s, 0.0);
      }
      for (moe::index_t o = 0; o < model.d; ++o) {
        double s = double(model.b2[e][std::size_t(o)]);
        for (moe::index_t h = 0; h < model.d_ff; ++h)
          s += double(model.w2[e][std::size_t(o * model.d_ff + h)]) * hidden[std::size_t(h)];
        ref[std::size_t(o)] += double(plan.weight[a]) * s;
      }
    }
    for (moe::index_t o = 0; o < model.d; ++o) worst = std::max(worst, std::fabs(double(y(t, o)) - ref[std::size_t(o)]));
  }
  std::printf("forward, float: largest |layer - double reference| = %.2e\n", worst);
  return worst < 1e-4;
}

// The double layer's gradients (the experts' biases and weights, and dx) against central finite
// differences of L = Σ y ⊙ r (r fixed), each entry perturbed in the buffer the expert views.
bool gradients_match_finite_differences() {
  Model<double> model(8, 12, 3);
  moe::Matrix<double> x = inputs<double>(9, model.d);
  moe::Matrix<double> r(x.rows(), model.d);
  for (moe::index_t i = 0; i < r.size(); ++i) r.data()[i] = std::sin(1.3 * static_cast<double>(i));
  auto loss = [&] {
    moe::Matrix<double> y(x.rows(), model.d);
    moe::Workspace<double> ws;
    model.layer().forward(x, y, ws);
    return y.cwiseProduct(r).sum();
  };
  const auto layer = model.layer();
  moe::TrainingWorkspace<double> ws;
  moe::Matrix<double> y(x.rows(), model.d), dx(x.rows(), model.d);
  layer.forward_train(x, moe::RouteContext{}, y, ws);
  auto grads = layer.make_gradients();
  layer.backward(x, r, dx, grads, ws);

  double worst = 0;
  auto check = [&](double* buffer, std::size_t i, double analytic) {
    const double h = 1e-6, kept = buffer[i];
    buffer[i] = kept + h;
    const double up = loss();
    buffer[i] = kept - h;
    const double down = loss();
    buffer[i] = kept;
    worst = std::max(worst, std::fabs((up - down) / (2 * h) - analytic));
  };
  for (std::size_t e = 0; e < std::size_t(model.num_experts); ++e) {
    const auto& g = grads.experts[e];
    for (std::size_t i = 0; i < model.b1[e].size(); ++i) check(model.b1[e].data(), i, g.b1.data()[i]);
    for (std::size_t i = 0; i < model.b2[e].size(); ++i) check(model.b2[e].data(), i, g.b2.data()[i]);
    for (std::size_t i = 0; i < model.w1[e].size(); i += 7) check(model.w1[e].data(), i, g.w1.data()[i]);
    for (std::size_t i = 0; i < model.w2[e].size(); i += 7) check(model.w2[e].data(), i, g.w2.data()[i]);
  }
  for (std::size_t i = 0; i < std::size_t(x.size()); i += 5) check(x.data(), i, dx.data()[i]);
  std::printf("backward, double: largest |analytic - finite difference| = %.2e (biases, every 7th weight, every 5th of dx)\n",
              worst);
  return worst < 1e-6;
}

int main() {
  const bool forward_ok = forward_matches_reference();
  const bool backward_ok = gradients_match_finite_differences();
  std::printf("%s\n", forward_ok && backward_ok ? "ok" : "FAILED");
  return forward_ok && backward_ok ? 0 : 1;
}
