// Training a small MoE on a task that rewards specialization, with five balancing strategies.
//
// Inputs come from E regions (clusters); the target in region c is a different linear map A_c · x.
// A router that sends each region to its own expert solves it; a collapsed router (everything to
// one expert) cannot. The router starts skewed toward expert 0, the usual failure mode, and each
// strategy either lets it collapse or pulls the load back:
//   none         plain top-1 routing, no balancing
//   aux          + Switch/Megatron auxiliary loss (α = 0.5)
//   z+aux        + router z-loss (β = 1e-3) as well
//   bias         loss-free balancing: selection bias updated from the load after each step
//   expert-choice each expert takes its top tokens, balanced by construction
// The optimizer (Adam) is written out below; the MoE layer provides forward_train and backward.
#include <moe/moe.hpp>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

using moe::index_t;
using Mat = moe::Matrix<double>;

constexpr index_t kD = 8, kFF = 12, kE = 4, kSamples = 2048, kBatch = 64, kEpochs = 20;

struct Data {
  Mat x, y;  // [N, d]
};

// Region c: x = center_c + noise (feature 0 is a constant 1, so the router has a bias term),
// y = A_c · x.
Data make_data(std::mt19937& rng) {
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<Mat> maps(kE);
  Mat centers(kE, kD);
  for (index_t c = 0; c < kE; ++c) {
    maps[std::size_t(c)] = Mat::NullaryExpr(kD, kD, [&](index_t, index_t) { return normal(rng) / std::sqrt(double(kD)); });
    for (index_t i = 0; i < kD; ++i) centers(c, i) = 2.0 * normal(rng);
  }
  Data data{Mat(kSamples, kD), Mat(kSamples, kD)};
  for (index_t n = 0; n < kSamples; ++n) {
    const index_t c = n % kE;
    for (index_t i = 0; i < kD; ++i) data.x(n, i) = centers(c, i) + 0.5 * normal(rng);
    data.x(n, 0) = 1.0;
    data.y.row(n) = data.x.row(n) * maps[std::size_t(c)].transpose();
  }
  return data;
}

// Adam over one tensor.
struct Adam {
  Mat m, v;
  void step(Mat& w, const Mat& g, int t, double lr = 1e-2) {
    if (m.size() == 0) m = Mat::Zero(w.rows(), w.cols()), v = Mat::Zero(w.rows(), w.cols());
    m = 0.9 * m + 0.1 * g;
    v = 0.999 * v + 0.001 * g.cwiseProduct(g);
    const double c1 = 1 - std::pow(0.9, t), c2 = 1 - std::pow(0.999, t);
    w.array() -= lr * (m.array() / c1) / ((v.array() / c2).sqrt() + 1e-8);
  }
};

enum class Strategy { none, aux, z_aux, bias, expert_choice };

struct Model {
  Mat router;                    // [E, d]
  std::vector<Mat> w_in, w_out;  // [ff, d], [d, ff] per expert
  std::vector<Adam> opt;
  moe::Vector<double> bias = moe::Vector<double>::Zero(kE);

  explicit Model(std::mt19937& rng) {
    std::uniform_real_distribution<double> u(-1.0, 1.0);
    auto init = [&](index_t r, index_t c) { return Mat(Mat::NullaryExpr(r, c, [&](index_t, index_t) { return u(rng) / std::sqrt(double(c)); })); };
    router = init(kE, kD);
    router(0, 0) = 2.0;  // skewed start: every token prefers expert 0
    for (index_t e = 0; e < kE; ++e) w_in.push_back(init(kFF, kD)), w_out.push_back(init(kD, kFF));
    opt.resize(1 + 2 * kE);
  }
  std::vector<moe::FeedForward<double, moe::ReLU>> experts() const {
    std::vector<moe::FeedForward<double, moe::ReLU>> out;
    for (index_t e = 0; e < kE; ++e) {
      out.emplace_back(moe::ConstMatrixMap<double>(w_in[std::size_t(e)].data(), kFF, kD),
                       moe::ConstMatrixMap<double>(w_out[std::size_t(e)].data(), kD, kFF));
    }
    return out;
  }
  template <class Grads>
  void apply(const Grads& g, int t) {
    opt[0].step(router, g.router, t);
    for (index_t e = 0; e < kE; ++e) {
      opt[std::size_t(1 + 2 * e)].step(w_in[std::size_t(e)], g.experts[std::size_t(e)].w_in, t);
      opt[std::size_t(2 + 2 * e)].step(w_out[std::size_t(e)], g.experts[std::size_t(e)].w_out, t);
    }
  }
};

moe::TopKRouter<double> top1_router(const Model& m) {
  moe::TopKRouter<double> r(moe::ConstMatrixMap<double>(m.router.data(), kE, kD), moe::presets::switch_transformers(0.0));
  r.set_selection_bias(m.bias);
  return r;
}
moe::ExpertChoiceRouter<double> choice_router(const Model& m) {
  moe::ExpertChoiceOptions o;
  o.capacity_factor = 1.0;  // one expert per token on average
  return moe::ExpertChoiceRouter<double>(moe::ConstMatrixMap<double>(m.router.data(), kE, kD), o);
}

// One epoch of minibatch training; returns the mean training loss.
template <class MakeRouter>
double train_epoch(Model& model, const Data& data, Strategy s, MakeRouter make_router, int& step) {
  moe::BiasBalancer<double> balancer(kE, 1e-2);
  balancer.set_bias(model.bias);
  moe::TrainingWorkspace<double> ws;
  double total = 0;
  for (index_t b = 0; b < kSamples; b += kBatch) {
    const Mat x = data.x.middleRows(b, kBatch), target = data.y.middleRows(b, kBatch);
    moe::MoELayer layer(make_router(model), model.experts());
    Mat y(kBatch, kD), dx(kBatch, kD);
    layer.forward_train(x, moe::RouteContext{}, y, ws);
    const Mat diff = y - target;
    total += 0.5 * diff.squaredNorm() / double(kBatch);
    const Mat dy = diff / double(kBatch);

    Mat dlogits = Mat::Zero(kBatch, kE), g(kBatch, kE);
    const moe::ConstMatrixMap<double> logits = ws.routing.logits();
    if (s == Strategy::aux || s == Strategy::z_aux) {
      moe::load_balancing_loss(logits, ws.routing.plan, 1, g, moe::AuxLossOptions::megatron(0.5));
      dlogits += g;
    }
    if (s == Strategy::z_aux) {
      moe::router_z_loss(logits, g, 1e-3);
      dlogits += g;
    }
    auto grads = layer.make_gradients();
    layer.backward(x, dy, dx, grads, ws, dlogits);
    model.apply(grads, ++step);
    if (s == Strategy::bias) {
      balancer.update(ws.routing.plan);
      model.bias = balancer.bias();
    }
  }
  return total / double(kSamples / kBatch);
}

// Load per expert over the whole data set, with the trained router.
template <class MakeRouter>
std::vector<index_t> load(const Model& model, const Data& data, MakeRouter make_router) {
  moe::Workspace<double> ws;
  moe::MoELayer layer(make_router(model), model.experts());
  (void)layer.forward(data.x, ws);
  return moe::routing_stats(ws.routing.plan).load;
}

template <class MakeRouter>
double run(const char* name, Strategy s, MakeRouter make_router) {
  std::mt19937 rng(42);
  const Data data = make_data(rng);
  Model model(rng);
  int step = 0;
  std::printf("\n%s\n  epoch  loss      load per expert\n", name);
  double imbalance = 0;
  for (int epoch = 1; epoch <= kEpochs; ++epoch) {
    const double loss = train_epoch(model, data, s, make_router, step);
    const std::vector<index_t> l = load(model, data, make_router);
    index_t max_load = 0, total = 0;
    for (index_t v : l) max_load = std::max(max_load, v), total += v;
    imbalance = double(max_load) / (double(total) / kE);
    if (epoch == 1 || epoch % 3 == 0 || epoch == kEpochs) {
      std::printf("  %5d  %8.4f ", epoch, loss);
      for (index_t v : l) std::printf(" %5td", v);
      std::printf("   max/mean %.2f\n", imbalance);
    }
  }
  return imbalance;
}

int main() {
  const auto start = std::chrono::steady_clock::now();
  const double none = run("none (top-1, no balancing)", Strategy::none, top1_router);
  const double aux = run("aux (Switch auxiliary loss, alpha = 0.5)", Strategy::aux, top1_router);
  const double z_aux = run("z+aux (router z-loss 1e-3 + auxiliary loss)", Strategy::z_aux, top1_router);
  const double bias = run("bias (loss-free balancing, u = 0.01)", Strategy::bias, top1_router);
  const double choice = run("expert-choice (capacity factor 1)", Strategy::expert_choice, choice_router);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("\nfinal load imbalance (max/mean): none %.2f | aux %.2f | z+aux %.2f | bias %.2f | expert-choice %.2f  (%.1f s)\n",
              none, aux, z_aux, bias, choice, seconds);
  // The example doubles as a check: every balancing strategy ends better balanced than none.
  return (aux < none && z_aux < none && bias < none && choice < none) ? 0 : 1;
}
