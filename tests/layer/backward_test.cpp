// MoELayer::backward against central finite differences in double, for every router option,
// expert type, zero-computation expert, shared expert and the dropped-token pass-through.
#include <catch2/catch.hpp>

#include <functional>

#include "../support/accumulate.hpp"
#include "../support/reference.hpp"

// (A namespace of its own: this file may share a translation unit with other test files.)
namespace backward_test {

using namespace moe_test;

namespace {

constexpr index_t kD = 6, kFF = 5, kTokens = 9;

// Every learned tensor of a small layer, owned by the test so it can be perturbed.
struct Params {
  moe::Matrix<double> x, router, shared_gate, mix;
  moe::Vector<double> constant;
  std::vector<moe::Matrix<double>> w;  // 3 per expert (gate, up, down); FFN experts use (in, -, out)
};

struct Config {
  const char* name;
  moe::TopKOptions options;
  index_t ffn_experts = 4;
  bool zero_compute = false;  // adds copy + mixed constant experts
  bool shared = false;        // two shared experts with a sigmoid gate
  bool pass_through = false;
  bool jitter = false;
};

template <class Expert>
Expert make_expert(const Params& p, index_t e);
template <>
moe::SwiGLU<double> make_expert(const Params& p, index_t e) {
  return moe::SwiGLU<double>(moe::ConstMatrixMap<double>(p.w[std::size_t(3 * e)].data(), kFF, kD),
                             moe::ConstMatrixMap<double>(p.w[std::size_t(3 * e + 1)].data(), kFF, kD),
                             moe::ConstMatrixMap<double>(p.w[std::size_t(3 * e + 2)].data(), kD, kFF));
}
template <>
moe::FeedForward<double, moe::GELU> make_expert(const Params& p, index_t e) {
  return moe::FeedForward<double, moe::GELU>(moe::ConstMatrixMap<double>(p.w[std::size_t(3 * e)].data(), kFF, kD),
                                             moe::ConstMatrixMap<double>(p.w[std::size_t(3 * e + 2)].data(), kD, kFF));
}

template <class Expert>
struct Harness {
  Config cfg;
  Params p;
  moe::Matrix<double> probe;  // L = Σ y ⊙ probe
  std::vector<std::int64_t> ids;
  index_t E() const { return cfg.ffn_experts + (cfg.zero_compute ? 2 : 0); }

  explicit Harness(Config c) : cfg(c) {
    p.x = random_matrix<double>(kTokens, kD, 1);
    p.router = random_matrix<double>(E(), kD, 2, 1.5);
    for (index_t e = 0; e < cfg.ffn_experts + 2; ++e) {  // + 2 shared
      p.w.push_back(random_matrix<double>(kFF, kD, 10 + std::uint32_t(e), 0.6));
      p.w.push_back(random_matrix<double>(kFF, kD, 30 + std::uint32_t(e), 0.6));
      p.w.push_back(random_matrix<double>(kD, kFF, 50 + std::uint32_t(e), 0.6));
    }
    p.shared_gate = random_matrix<double>(1, kD, 3);
    p.mix = random_matrix<double>(2, kD, 4);
    p.constant = random_matrix<double>(kD, 1, 5).col(0);
    probe = random_matrix<double>(kTokens, kD, 6);
    for (index_t t = 0; t < kTokens; ++t) ids.push_back(100 + 7 * t);
  }

  moe::MoELayer<moe::TopKRouter<double>, Expert> layer() const {
    std::vector<Expert> experts;
    for (index_t e = 0; e < cfg.ffn_experts; ++e) experts.push_back(make_expert<Expert>(p, e));
    std::vector<moe::ZeroComputeExpert<double>> zc;
    if (cfg.zero_compute) zc = {moe::ZeroComputeExpert<double>::copy(kD), moe::ZeroComputeExpert<double>::constant(p.constant, p.mix)};
    moe::MoELayer<moe::TopKRouter<double>, Expert> l(
        moe::TopKRouter<double>(moe::ConstMatrixMap<double>(p.router.data(), E(), kD), cfg.options), experts, zc);
    if (cfg.shared) {
      l.set_shared_experts({make_expert<Expert>(p, cfg.ffn_experts), make_expert<Expert>(p, cfg.ffn_experts + 1)},
                           moe::Weight<double>::own(p.shared_gate));
    }
    if (cfg.pass_through) l.set_dropped_tokens(moe::DroppedTokens::pass_through);
    return l;
  }
  moe::RouteContext context() const {
    moe::RouteContext ctx;
    ctx.training = true;
    ctx.token_ids = ids.data();
    return ctx;
  }
  // Loss and a fingerprint of the discrete routing decisions.
  double loss(std::vector<index_t>* selection) const {
    const auto l = layer();
    moe::TrainingWorkspace<double> ws;
    moe::Matrix<double> y(kTokens, kD);
    l.forward_train(p.x, context(), y, ws);
    if (selection != nullptr) {
      const auto& plan = ws.routing.plan;
      *selection = plan.token;
      selection->insert(selection->end(), plan.expert_begin.begin(), plan.expert_begin.end());
      selection->insert(selection->end(), plan.dropped.begin(), plan.dropped.end());
    }
    return (y.array() * probe.array()).sum();
  }
};

// Compares an analytic gradient entry with a central difference of the loss in `value`, and
// counts the entries compared and those skipped, so that a test can require most were compared.
struct EntryCount {
  index_t compared = 0, skipped = 0;
};

template <class H>
void check_entry(H& h, double& value, double analytic, const std::vector<index_t>& selection, const char* what, index_t index,
                 EntryCount& count) {
  const double step = 1e-5, saved = value;
  std::vector<index_t> sel_plus, sel_minus;
  value = saved + step;
  const double plus = h.loss(&sel_plus);
  value = saved - step;
  const double minus = h.loss(&sel_minus);
  value = saved;
  if (sel_plus != selection || sel_minus != selection) {  // a routing decision flipped: not differentiable here
    ++count.skipped;
    return;
  }
  ++count.compared;
  const double numeric = (plus - minus) / (2 * step);
  CAPTURE(what, index, analytic, numeric);
  CHECK(std::fabs(analytic - numeric) <= 1e-6 * std::max(std::fabs(numeric), 1e-2));
}

template <class Expert>
void check_gradients(const Config& cfg) {
  CAPTURE(cfg.name);
  Harness<Expert> h(cfg);
  const auto l = h.layer();
  moe::TrainingWorkspace<double> ws;
  moe::Matrix<double> y(kTokens, kD), dx(kTokens, kD);
  l.forward_train(h.p.x, h.context(), y, ws);
  auto grads = l.make_gradients();
  l.backward(h.p.x, h.probe, dx, grads, ws);
  std::vector<index_t> selection;
  h.loss(&selection);
  EntryCount count;

  for (index_t i = 0; i < h.p.x.size(); ++i) check_entry(h, h.p.x.data()[i], dx.data()[i], selection, "x", i, count);
  for (index_t i = 0; i < h.p.router.size(); ++i) check_entry(h, h.p.router.data()[i], grads.router.data()[i], selection, "router", i, count);
  for (index_t e = 0; e < cfg.ffn_experts + (cfg.shared ? 2 : 0); ++e) {
    std::vector<const moe::Matrix<double>*> g;
    const auto& eg = e < cfg.ffn_experts ? grads.experts[std::size_t(e)] : grads.shared[std::size_t(e - cfg.ffn_experts)];
    eg.for_each([&](const moe::Matrix<double>& m) { g.push_back(&m); });
    const std::vector<int> slots = g.size() == 3 ? std::vector<int>{0, 1, 2} : std::vector<int>{0, 2};
    for (std::size_t q = 0; q < slots.size(); ++q) {
      moe::Matrix<double>& w = h.p.w[std::size_t(3 * e + slots[q])];
      for (index_t i = 0; i < w.size(); ++i) check_entry(h, w.data()[i], g[q]->data()[i], selection, "expert weight", 100 * e + i, count);
    }
  }
  if (cfg.shared)
    for (index_t i = 0; i < kD; ++i) check_entry(h, h.p.shared_gate.data()[i], grads.shared_gate.data()[i], selection, "shared gate", i, count);
  if (cfg.zero_compute) {
    const auto& zg = grads.zero_compute[1];
    for (index_t i = 0; i < kD; ++i) check_entry(h, h.p.constant.data()[i], zg.value[i], selection, "constant", i, count);
    for (index_t i = 0; i < 2 * kD; ++i) check_entry(h, h.p.mix.data()[i], zg.mix.data()[i], selection, "mix", i, count);
    REQUIRE(ws.routing.plan.tokens_of(cfg.ffn_experts) + ws.routing.plan.tokens_of(cfg.ffn_experts + 1) > 0);
  }
  // A step that flips a routing decision skips its entry; nearly every entry must be compared.
  CAPTURE(count.compared, count.skipped);
  REQUIRE(count.compared >= 9 * (count.compared + count.skipped) / 10);
}

moe::TopKOptions options(index_t k) {
  moe::TopKOptions o;
  o.k = k;
  return o;
}

}  // namespace

TEST_CASE("Layer gradients match finite differences for every top-k option", "[backward]") {
  std::vector<Config> configs;
  configs.push_back({"softmax top-2 renormalized", moe::presets::mixtral(2)});
  configs.push_back({"softmax top-2 raw", options(2)});
  auto megatron = moe::presets::megatron(2, false);
  configs.push_back({"softmax after top-k", megatron});
  configs.push_back({"sigmoid renormalized scaled (DeepSeek-V3)", moe::presets::deepseek_v3(2, 2, 1, 2.5)});
  auto capped = options(2);
  capped.capacity_factor = 0.6, capped.normalize = true, capped.renormalize_after_drop = true;
  configs.push_back({"capacity, renormalized after drop", capped});
  Config capped_pass{"capacity, renormalized after drop, pass-through", capped};
  capped_pass.pass_through = true;
  configs.push_back(capped_pass);
  auto reroute = capped;
  reroute.overflow = moe::OverflowPolicy::reroute, reroute.renormalize_after_drop = false;
  configs.push_back({"capacity with reroute", reroute});
  Config reroute_pass{"capacity with reroute, pass-through", reroute};  // only choices reroute did not move are lost
  reroute_pass.pass_through = true;
  configs.push_back(reroute_pass);
  Config switch_cfg{"switch pass-through", moe::presets::switch_transformers(0.5)};
  switch_cfg.pass_through = true;
  configs.push_back(switch_cfg);
  auto top_p = options(3);
  top_p.top_p = 0.6;
  configs.push_back({"dynamic top-p", top_p});
  Config jitter{"jitter", moe::presets::mixtral(2)};
  jitter.options.jitter = 0.2;
  configs.push_back(jitter);
  Config extras{"zero-compute and shared experts", moe::presets::qwen2_moe(2, true)};
  extras.zero_compute = true, extras.shared = true;
  configs.push_back(extras);
  for (const Config& c : configs) check_gradients<moe::SwiGLU<double>>(c);
}

TEST_CASE("Layer gradients match finite differences with GELU feed-forward experts", "[backward]") {
  Config c{"gelu ffn", moe::presets::mixtral(2)};
  c.shared = true;
  check_gradients<moe::FeedForward<double, moe::GELU>>(c);
}

TEST_CASE("backward rejects a missing forward and wrong shapes", "[backward][errors]") {
  Harness<moe::SwiGLU<double>> h(Config{"errors", moe::presets::mixtral(2)});
  const auto l = h.layer();
  moe::TrainingWorkspace<double> ws;
  moe::Matrix<double> y(kTokens, kD), dx(kTokens, kD);
  auto grads = l.make_gradients();
  REQUIRE_THROWS_WITH(l.backward(h.p.x, h.probe, dx, grads, ws), Catch::Contains("workspace tokens = -1") && Catch::Contains("x.rows() = 9"));
  l.forward_train(h.p.x, h.context(), y, ws);
  REQUIRE_THROWS_WITH(l.backward(h.p.x.topRows(4), h.probe.topRows(4), dx, grads, ws), Catch::Contains("workspace tokens = 9"));
  moe::Matrix<double> narrow(kTokens, kD - 1);
  REQUIRE_THROWS_WITH(l.backward(h.p.x, narrow, dx, grads, ws), Catch::Contains("dy.cols() = 5"));
  REQUIRE_THROWS_WITH(l.backward(h.p.x, h.probe, narrow, grads, ws), Catch::Contains("dx.cols() = 5"));
  auto bad = grads;
  bad.router.resize(3, kD);
  REQUIRE_THROWS_WITH(l.backward(h.p.x, h.probe, dx, bad, ws), Catch::Contains("grads.router.rows() = 3"));
  bad = grads;
  bad.experts[2].w_up.resize(1, 1);
  REQUIRE_THROWS_WITH(l.backward(h.p.x, h.probe, dx, bad, ws), Catch::Contains("grads.experts[2]"));
  // The training forward gives the inference forward's bits.
  moe::Workspace<double> plain;
  REQUIRE(l.forward(h.p.x, plain) == y);
  // A plain forward on the training workspace (same token count) invalidates what backward
  // would otherwise pair with the other batch's saved activations.
  REQUIRE_NOTHROW(l.backward(h.p.x, h.probe, dx, grads, ws));
  const moe::Matrix<double> other = -h.p.x;
  l.forward(other, h.context(), y, ws);
  REQUIRE_THROWS_WITH(l.backward(other, h.probe, dx, grads, ws), Catch::Contains("workspace tokens = -1"));
}

namespace {

// Every gradient entry of a layer (or of one expert), in a fixed order.
template <class G>
std::vector<double> entries(const G& g) {
  std::vector<double> v;
  g.for_each([&](const auto& m) { v.insert(v.end(), m.data(), m.data() + m.size()); });
  return v;
}
template <class Grads>
std::vector<double> all_entries(const Grads& g) {
  std::vector<double> v(g.router.data(), g.router.data() + g.router.size());
  auto add = [&](const std::vector<double>& part) { v.insert(v.end(), part.begin(), part.end()); };
  for (const auto& e : g.experts) add(entries(e));
  for (const auto& z : g.zero_compute) add(entries(z));
  for (const auto& s : g.shared) add(entries(s));
  v.insert(v.end(), g.shared_gate.data(), g.shared_gate.data() + g.shared_gate.size());
  return v;
}

}  // namespace

TEST_CASE("backward_accumulate adds each batch's gradients; from zero it gives backward's bits", "[backward]") {
  Config c{"accumulate", moe::presets::qwen2_moe(2, true)};
  c.zero_compute = true, c.shared = true;
  Harness<moe::SwiGLU<double>> h(c);
  const auto l = h.layer();
  moe::TrainingWorkspace<double> ws_a, ws_b;
  moe::Matrix<double> y(kTokens, kD), dx(kTokens, kD);
  l.forward_train(h.p.x, h.context(), y, ws_a);
  auto acc = l.make_gradients();  // zeros
  const auto over_a = backward_both_ways(l, h.p.x, h.probe, ws_a, acc);
  CHECK(all_entries(acc) == all_entries(over_a));

  // A second batch of two tokens leaves some FFN experts without a token.
  const moe::Matrix<double> x_b = -1.5 * h.p.x.topRows(2), dy_b = h.probe.bottomRows(2);
  moe::Matrix<double> y_b(2, kD);
  l.forward_train(x_b, h.context(), y_b, ws_b);
  const auto over_b = backward_both_ways(l, x_b, dy_b, ws_b, acc);
  require_sums(all_entries(acc), all_entries(over_a), all_entries(over_b));
  index_t idle = 0;
  for (index_t e = 0; e < c.ffn_experts; ++e) {
    if (ws_b.routing.plan.tokens_of(e) > 0) continue;
    ++idle;  // untouched: still batch A's gradient, bit for bit
    CHECK(entries(acc.experts[std::size_t(e)]) == entries(over_a.experts[std::size_t(e)]));
  }
  REQUIRE(idle > 0);

  // Its errors name it; a stale workspace changes nothing.
  const std::vector<double> before = all_entries(acc);
  l.forward(h.p.x, h.context(), y, ws_a);
  REQUIRE_THROWS_WITH(l.backward_accumulate(h.p.x, h.probe, dx, acc, ws_a),
                      Catch::Contains("MoELayer::backward_accumulate") && Catch::Contains("workspace tokens = -1"));
  CHECK(all_entries(acc) == before);
}

namespace {
// A FeedForward whose workspace form does nothing without tokens, as the contract allows (it
// writes the gradients over only for m > 0).
struct EarlyReturnExpert {
  using Scalar = float;
  using Inner = moe::FeedForward<float, moe::GELU>;
  using Gradient = Inner::Gradient;
  Inner f;
  index_t d_model() const { return f.d_model(); }
  index_t d_ff() const { return f.d_ff(); }
  index_t scratch_size(index_t m) const { return f.scratch_size(m); }
  index_t saved_size(index_t m) const { return f.saved_size(m); }
  index_t backward_scratch_size(index_t m) const { return f.backward_scratch_size(m); }
  Gradient zero_gradient() const { return f.zero_gradient(); }
  template <class A>
  void forward(A a, const float* x, index_t m, float* y, float* s) const { f.forward(a, x, m, y, s); }
  template <class A>
  void forward_saving(A a, const float* x, index_t m, float* y, float* saved, float* s) const {
    f.forward_saving(a, x, m, y, saved, s);
  }
  template <class A = moe::simd::default_arch>
  void backward(const float* x, index_t m, const float* dy, const float* saved, float* dx, Gradient& g, A a = {}) const {
    f.backward(x, m, dy, saved, dx, g, a);
  }
  template <class A>
  void backward(const float* x, index_t m, const float* dy, const float* saved, float* dx, Gradient& g, A a, float* s,
                bool accumulate) const {
    if (m > 0) f.backward(x, m, dy, saved, dx, g, a, s, accumulate);
  }
};
}  // namespace

TEST_CASE("backward on an empty batch zeroes every gradient, whatever the experts do without tokens", "[backward]") {
  const index_t d = 8, ff = 4, E = 2;
  const moe::Matrix<float> w_in = random_matrix<float>(ff, d, 1), w_out = random_matrix<float>(d, ff, 2);
  auto expert = [&] {
    return EarlyReturnExpert{{moe::ConstMatrixMap<float>(w_in.data(), ff, d), moe::ConstMatrixMap<float>(w_out.data(), d, ff)}};
  };
  moe::TopKOptions o;
  o.k = 1;
  moe::MoELayer<moe::TopKRouter<float>, EarlyReturnExpert> layer(moe::TopKRouter<float>(random_matrix<float>(E, d, 3), o),
                                                                 {expert(), expert()});
  layer.set_shared_experts({expert()});
  moe::TrainingWorkspace<float> ws;
  moe::Matrix<float> x(0, d), y(0, d), dx(0, d), dy(0, d);
  auto grads = layer.make_gradients();
  auto fill = [](auto& g) { g.for_each([](auto& w) { w.setConstant(5.0f); }); };
  fill(grads.experts[0]), fill(grads.experts[1]), fill(grads.shared[0]);  // the last step's values
  layer.forward_train(x, y, ws);
  layer.backward(x, dy, dx, grads, ws);
  auto zero = [](const auto& g) {
    bool all = true;
    g.for_each([&](const auto& w) { all = all && w.isZero(0); });
    return all;
  };
  CHECK(zero(grads.experts[0]));
  CHECK(zero(grads.experts[1]));
  CHECK(zero(grads.shared[0]));
}

namespace {
// A router type of one's own that follows TopKRouter's contract but whose backward has no scratch
// parameter (as moe's routers had before they took the workspace's): the layer still calls it.
struct RouterWithoutScratch {
  using Scalar = double;
  moe::TopKRouter<double> inner;
  index_t num_experts() const noexcept { return inner.num_experts(); }
  index_t d_model() const noexcept { return inner.d_model(); }
  std::uint64_t config_fingerprint() const noexcept { return inner.config_fingerprint(); }
  template <class Arch>
  void route(const moe::ConstMatrixRef<double>& x, const moe::RouteContext& ctx, moe::RouterOutput<double>& out, Arch arch) const {
    inner.route(x, ctx, out, arch);
  }
  template <class Arch>
  void backward(const moe::ConstMatrixRef<double>& x, const moe::RouterOutput<double>& out, const double* grad_weight,
                const double* grad_lost, const double* extra_dlogits, moe::MatrixRef<double> dx, moe::MatrixRef<double> dweight,
                Arch arch) const {
    inner.backward(x, out, grad_weight, grad_lost, extra_dlogits, dx, dweight, arch);
  }
};
}  // namespace

TEST_CASE("A router type whose backward takes no scratch trains as moe's own", "[backward]") {
  const index_t d = 7, ff = 5, E = 4, T = 9;
  const moe::Matrix<double> gate = random_matrix<double>(E, d, 3), x = random_matrix<double>(T, d, 4),
                            dy = random_matrix<double>(T, d, 5);
  std::vector<moe::SwiGLU<double>> experts;
  for (index_t e = 0; e < E; ++e) {
    const auto s = 10 + 3 * static_cast<std::uint32_t>(e);
    experts.emplace_back(random_matrix<double>(ff, d, s), random_matrix<double>(ff, d, s + 1), random_matrix<double>(d, ff, s + 2));
  }
  moe::TopKOptions o;
  o.k = 2;
  o.normalize = true;
  const moe::MoELayer ours(moe::TopKRouter<double>(gate, o), experts);
  const moe::MoELayer<RouterWithoutScratch, moe::SwiGLU<double>> theirs(RouterWithoutScratch{moe::TopKRouter<double>(gate, o)}, experts);
  moe::TrainingWorkspace<double> ws_ours, ws_theirs;
  moe::Matrix<double> y(T, d), dx_ours(T, d), dx_theirs(T, d);
  auto grads_ours = ours.make_gradients();
  auto grads_theirs = theirs.make_gradients();
  ours.forward_train(x, y, ws_ours);
  ours.backward(x, dy, dx_ours, grads_ours, ws_ours);
  theirs.forward_train(x, y, ws_theirs);
  theirs.backward(x, dy, dx_theirs, grads_theirs, ws_theirs);
  REQUIRE(grads_ours.router.norm() > 0);
  CHECK(dx_theirs == dx_ours);
  CHECK(grads_theirs.router == grads_ours.router);
  for (std::size_t e = 0; e < experts.size(); ++e) CHECK(grads_theirs.experts[e].w_down == grads_ours.experts[e].w_down);
}

}  // namespace backward_test
