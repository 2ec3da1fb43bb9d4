// The bad-input matrix: one test per documented error of the public API (soft routing's are in
// tests/routing/soft_test.cpp). Each asserts the moe:: exception type, that the message starts
// with "moe::" and names the parameter and its values, and that the output buffer the call was
// given holds the same bits after the throw.
#include <catch2/catch.hpp>

#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "../support/reference.hpp"

// (A namespace of its own: this file may share a translation unit with other test files.)
namespace bad_input_test {

using namespace moe_test;

namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// Adapts a string matcher (Catch::Contains(...) && ...) to the exception: what() starts with
// "moe::" and matches.
template <class StringMatcher>
class WhatMatches : public Catch::MatcherBase<std::exception> {
 public:
  explicit WhatMatches(StringMatcher m) : m_(std::move(m)) {}
  bool match(const std::exception& e) const override {
    const std::string what = e.what();
    return what.rfind("moe::", 0) == 0 && m_.match(what);
  }
  std::string describe() const override { return "has a message starting with \"moe::\" that " + m_.describe(); }

 private:
  StringMatcher m_;
};
template <class StringMatcher>
WhatMatches<StringMatcher> what(StringMatcher m) {
  return WhatMatches<StringMatcher>(std::move(m));
}
using Catch::Contains;

// Requires `expr` to throw `type` whose message matches, and `out` to hold the same bits after.
#define REQUIRE_REJECTS(expr, type, matcher, out)               \
  do {                                                          \
    const auto before_ = (out);                                 \
    REQUIRE_THROWS_MATCHES(expr, type, what(matcher));          \
    REQUIRE(same_bits(before_, (out)));                         \
  } while (false)
// For constructors and setters: no output buffer.
#define REQUIRE_REJECTS_ARG(expr, type, matcher) REQUIRE_THROWS_MATCHES(expr, type, what(matcher))

// Bitwise equality (NaN == NaN) of two dense matrices, vectors or plans.
template <class M>
bool same_bits(const M& a, const M& b) {
  if (a.rows() != b.rows() || a.cols() != b.cols()) return false;
  return std::memcmp(a.data(), b.data(), sizeof(*a.data()) * static_cast<std::size_t>(a.size())) == 0;
}
template <class T>
bool same_bits(const moe::Routing<T>& a, const moe::Routing<T>& b) {
  return a.num_tokens == b.num_tokens && a.num_experts == b.num_experts && a.expert_begin == b.expert_begin &&
         a.token == b.token && a.weight == b.weight && a.token_begin == b.token_begin && a.assignment == b.assignment &&
         a.dropped == b.dropped && a.rerouted == b.rerouted;
}

constexpr index_t kD = 8, kFF = 6, kE = 4, kT = 5;

moe::Matrix<float> gate() { return random_matrix<float>(kE, kD, 1); }
moe::Matrix<float> tokens(index_t rows = kT) { return random_matrix<float>(rows, kD, 2); }

std::vector<moe::SwiGLU<float>> experts(index_t n = kE, index_t d = kD) {
  std::vector<moe::SwiGLU<float>> out;
  for (index_t e = 0; e < n; ++e) {
    const auto s = 10 + 3 * static_cast<std::uint32_t>(e);
    out.emplace_back(random_matrix<float>(kFF, d, s, 0.3), random_matrix<float>(kFF, d, s + 1, 0.3), random_matrix<float>(d, kFF, s + 2, 0.3));
  }
  return out;
}

moe::TopKOptions top2() {
  moe::TopKOptions o;
  o.k = 2;
  return o;
}

// A plan routed by a warm router, so "unchanged" is checked against real content.
moe::RouterOutput<float> routed() {
  moe::RouterOutput<float> out;
  moe::TopKRouter<float>(gate(), top2()).route(tokens(), out);
  return out;
}

moe::Matrix<float> sentinel(index_t rows, index_t cols) { return moe::Matrix<float>::Constant(rows, cols, 7.25f); }

}  // namespace

// --- core ---------------------------------------------------------------------------------------

TEST_CASE("Weight::view: negative shape", "[errors][core]") {
  const float data[4] = {};
  REQUIRE_REJECTS_ARG(moe::Weight<float>::view(data, -1, 4), moe::invalid_argument, Contains("rows = -1") && Contains("cols = 4"));
}

TEST_CASE("Weight::view: null data for a non-empty weight", "[errors][core]") {
  REQUIRE_REJECTS_ARG(moe::Weight<float>::view(nullptr, 2, 3), moe::invalid_argument, Contains("data is null") && Contains("2x3"));
  REQUIRE_NOTHROW(moe::Weight<float>::view(nullptr, 0, 3));
  // A shape whose element count overflows (rows · cols wrapped to a small or negative number,
  // which let a null 2^32 x 2^32 weight through).
  const index_t huge = index_t(1) << 32;
  REQUIRE_REJECTS_ARG(moe::Weight<float>::view(nullptr, huge, huge), moe::invalid_argument,
                      Contains("4294967296x4294967296 elements exceed the address space"));
  const float data[4] = {};
  REQUIRE_REJECTS_ARG(moe::Weight<float>::view(data, huge, huge), moe::invalid_argument, Contains("exceed the address space"));
}

TEST_CASE("RouteContext::with_groups: no boundaries", "[errors][groups]") {
  REQUIRE_REJECTS_ARG(moe::RouteContext::with_groups({}), moe::invalid_argument, Contains("boundaries must hold at least one"));
}

// --- routing groups (the same GroupBounds check in every router; each router is named) --------

TEST_CASE("Routing groups: num_groups < 1", "[errors][groups]") {
  const moe::TopKRouter<float> router(gate(), top2());
  moe::RouterOutput<float> out = routed();
  const index_t b[1] = {0};
  moe::RouteContext ctx;
  ctx.group_begin = b;
  ctx.num_groups = 0;
  REQUIRE_REJECTS(router.route(tokens(), ctx, out), moe::invalid_argument,
                  Contains("TopKRouter::route") && Contains("num_groups = 0"), out.plan);
  // An empty batch takes 0 groups (above), but not fewer; the message does not ask for 1.
  ctx.num_groups = -1;
  REQUIRE_REJECTS(router.route(moe::Matrix<float>(0, kD), ctx, out), moe::invalid_argument,
                  Contains("TopKRouter::route: num_groups must not be negative (num_groups = -1, tokens = 0)"), out.plan);
}

TEST_CASE("Routing groups: num_groups without boundaries", "[errors][groups]") {
  // A null group_begin used to mean one group whatever num_groups said: capacity then decided
  // across the requests the caller meant to keep apart.
  moe::TopKOptions o = top2();
  o.capacity_factor = 1.0;
  const moe::MoELayer layer(moe::TopKRouter<float>(gate(), o), experts());
  moe::Workspace<float> ws;
  moe::Matrix<float> y = sentinel(kT, kD);
  moe::RouteContext ctx;
  ctx.num_groups = 4;
  REQUIRE_REJECTS(layer.forward(tokens(), ctx, y, ws), moe::invalid_argument,
                  Contains("TopKRouter::route: group_begin is null but num_groups = 4"), y);
}

TEST_CASE("Routing groups: first boundary not 0", "[errors][groups]") {
  const moe::ExpertChoiceRouter<float> router(gate(), {1.0, true});
  moe::RouterOutput<float> out = routed();
  REQUIRE_REJECTS(router.route(tokens(), moe::RouteContext::with_groups({1, kT}), out), moe::invalid_argument,
                  Contains("ExpertChoiceRouter::route") && Contains("group_begin[0] = 1"), out.plan);
}

TEST_CASE("Routing groups: decreasing boundaries", "[errors][groups]") {
  const moe::TopKRouter<float> router(gate(), top2());
  moe::RouterOutput<float> out = routed();
  REQUIRE_REJECTS(router.route(tokens(), moe::RouteContext::with_groups({0, 4, 2, kT}), out), moe::invalid_argument,
                  Contains("must not decrease") && Contains("group_begin[1] = 4") && Contains("group_begin[2] = 2"), out.plan);
}

TEST_CASE("Routing groups: boundaries that do not cover the batch", "[errors][groups]") {
  const moe::HashRouter<float> router(kE, kD, {1, 3});
  moe::RouterOutput<float> out = routed();
  const std::vector<std::int64_t> ids(kT, 7);
  const std::vector<index_t> bounds = {0, 2, 4};  // with_groups keeps a pointer: keep them alive
  moe::RouteContext ctx = moe::RouteContext::with_groups(bounds);
  ctx.token_ids = ids.data();
  REQUIRE_REJECTS(router.route(tokens(), ctx, out), moe::invalid_argument,
                  Contains("HashRouter::route") && Contains("group_begin[num_groups] = 4") && Contains("tokens = 5"), out.plan);
}

TEST_CASE("MoELayer::forward: invalid groups leave y untouched", "[errors][groups][layer]") {
  const moe::MoELayer layer(moe::TopKRouter<float>(gate(), top2()), experts());
  moe::Workspace<float> ws;
  moe::Matrix<float> y = sentinel(kT, kD);
  REQUIRE_REJECTS(layer.forward(tokens(), moe::RouteContext::with_groups({0, 3}), y, ws), moe::invalid_argument,
                  Contains("group_begin[num_groups] = 3") && Contains("tokens = 5"), y);
}

// --- TopKRouter ---------------------------------------------------------------------------------

TEST_CASE("TopKRouter: no experts", "[errors][top_k]") {
  REQUIRE_REJECTS_ARG(moe::TopKRouter<float>(moe::Matrix<float>(0, kD), {}), moe::invalid_argument, Contains("num_experts = 0"));
}

TEST_CASE("TopKRouter: k outside [1, num_experts]", "[errors][top_k]") {
  for (const index_t k : {index_t(0), index_t(-1), kE + 1}) {
    moe::TopKOptions o;
    o.k = k;
    CAPTURE(k);
    REQUIRE_REJECTS_ARG(moe::TopKRouter<float>(gate(), o), moe::invalid_argument,
                        Contains("k = " + std::to_string(k)) && Contains("num_experts = 4"));
  }
}

TEST_CASE("TopKRouter: scale not finite", "[errors][top_k]") {
  moe::TopKOptions o;
  o.scale = std::numeric_limits<double>::infinity();
  REQUIRE_REJECTS_ARG(moe::TopKRouter<float>(gate(), o), moe::invalid_argument, Contains("scale = inf"));
  // Finite in double is not enough: 1e39 overflows float, and the message names float's largest.
  o.scale = 1e39;
  REQUIRE_REJECTS_ARG(moe::TopKRouter<float>(gate(), o), moe::invalid_argument,
                      Contains("scale must be finite in the scalar type (scale = 1e+39, largest = 3.4028235e+38)"));
  o.scale = -1e39;
  REQUIRE_REJECTS_ARG(moe::TopKRouter<float>(gate(), o), moe::invalid_argument, Contains("scale = -1e+39"));
  o.scale = static_cast<double>(std::numeric_limits<float>::max());  // the largest itself is accepted
  REQUIRE_NOTHROW(moe::TopKRouter<float>(gate(), o));
}

// An enum option cast from an integer may hold a value it does not name; the code took any such
// value for one of the named ones. Each is refused, naming the values it may take.
template <class Enum>
Enum unnamed() {
  return static_cast<Enum>(7);
}

TEST_CASE("TopKRouter: enum options out of range", "[errors][top_k]") {
  auto refused = [](void (*set)(moe::TopKOptions&), const std::string& message) {
    moe::TopKOptions o = top2();
    set(o);
    REQUIRE_REJECTS_ARG(moe::TopKRouter<float>(gate(), o), moe::invalid_argument, Contains(message));
  };
  refused([](moe::TopKOptions& o) { o.score = unnamed<moe::ScoreFunction>(); },
          "TopKRouter: score must be softmax or sigmoid (score = 7)");
  refused([](moe::TopKOptions& o) { o.softmax_placement = unnamed<moe::SoftmaxPlacement>(); },
          "softmax_placement must be before_top_k or after_top_k (softmax_placement = 7)");
  refused([](moe::TopKOptions& o) { o.group_mask = unnamed<moe::GroupMask>(); },
          "group_mask must be exclude or zero (group_mask = 7)");
  refused([](moe::TopKOptions& o) { o.capacity_priority = static_cast<moe::CapacityPriority>(-1); },
          "capacity_priority must be position or score (capacity_priority = -1)");
  refused([](moe::TopKOptions& o) { o.overflow = unnamed<moe::OverflowPolicy>(); },
          "overflow must be drop or reroute (overflow = 7)");
}

TEST_CASE("MoELayer: dropped-token policy out of range", "[errors][layer]") {
  moe::MoELayer layer(moe::TopKRouter<float>(gate(), top2()), experts());
  layer.set_dropped_tokens(moe::DroppedTokens::pass_through);
  REQUIRE_REJECTS_ARG(layer.set_dropped_tokens(unnamed<moe::DroppedTokens>()), moe::invalid_argument,
                      Contains("MoELayer::set_dropped_tokens: policy must be zero or pass_through (policy = 7)"));
  REQUIRE(layer.dropped_tokens() == moe::DroppedTokens::pass_through);  // the old policy stays
}

TEST_CASE("reserve: max_tokens and max_groups out of range", "[errors][layer][reserve]") {
  const moe::MoELayer layer(moe::TopKRouter<float>(gate(), top2()), experts());
  moe::TrainingWorkspace<float> ws;
  REQUIRE_REJECTS_ARG(layer.reserve(ws, -1), moe::invalid_argument, Contains("MoELayer::reserve: max_tokens must be >= 0 (max_tokens = -1)"));
  REQUIRE_REJECTS_ARG(layer.reserve(ws, 8, 0), moe::invalid_argument, Contains("MoELayer::reserve: max_groups must be at least 1 (max_groups = 0)"));
  REQUIRE(ws.dispatched.capacity() == 0);  // nothing grown
  moe::SoftOptions o;
  o.slots_per_expert = 1;
  const moe::SoftMoELayer<moe::SwiGLU<float>> soft(moe::SoftRouter<float>(random_matrix<float>(kD, kE, 3), kE, o), experts());
  moe::SoftWorkspace<float> soft_ws;
  REQUIRE_REJECTS_ARG(soft.reserve(soft_ws, -2), moe::invalid_argument, Contains("SoftMoELayer::reserve: max_tokens must be >= 0 (max_tokens = -2)"));
  REQUIRE_REJECTS_ARG(soft.reserve(soft_ws, 8, -1), moe::invalid_argument, Contains("max_groups must be at least 1 (max_groups = -1)"));
  // An empty batch and more groups than tokens (so some empty) are valid batches to reserve for.
  REQUIRE_NOTHROW(layer.reserve(ws, 0, 3));
  REQUIRE_NOTHROW(layer.reserve(ws, 2, 5));
  REQUIRE_NOTHROW(soft.reserve(soft_ws, 0, 3));
  REQUIRE_NOTHROW(soft.reserve(soft_ws, 2, 5));
}

TEST_CASE("TopKRouter: after_top_k softmax with sigmoid scores", "[errors][top_k]") {
  moe::TopKOptions o;
  o.score = moe::ScoreFunction::sigmoid;
  o.softmax_placement = moe::SoftmaxPlacement::after_top_k;
  REQUIRE_REJECTS_ARG(moe::TopKRouter<float>(gate(), o), moe::invalid_argument,
                      Contains("softmax_placement = after_top_k") && Contains("score = sigmoid"));
}

TEST_CASE("TopKRouter: expert_groups that do not divide num_experts", "[errors][top_k]") {
  moe::TopKOptions o;
  o.expert_groups = 3;
  REQUIRE_REJECTS_ARG(moe::TopKRouter<float>(gate(), o), moe::invalid_argument, Contains("expert_groups = 3") && Contains("num_experts = 4"));
  o.expert_groups = 0;
  REQUIRE_REJECTS_ARG(moe::TopKRouter<float>(gate(), o), moe::invalid_argument, Contains("expert_groups = 0"));
}

TEST_CASE("TopKRouter: selected_groups outside [1, expert_groups]", "[errors][top_k]") {
  moe::TopKOptions o;
  o.expert_groups = 2;
  o.selected_groups = 3;
  REQUIRE_REJECTS_ARG(moe::TopKRouter<float>(gate(), o), moe::invalid_argument,
                      Contains("selected_groups = 3") && Contains("expert_groups = 2"));
}

TEST_CASE("TopKRouter: k larger than the experts of the selected groups", "[errors][top_k]") {
  moe::TopKOptions o;
  o.k = 3;
  o.expert_groups = 2;
  o.selected_groups = 1;
  REQUIRE_REJECTS_ARG(moe::TopKRouter<float>(gate(), o), moe::invalid_argument,
                      Contains("k = 3") && Contains("selected_groups = 1") && Contains("experts per group = 2"));
}

TEST_CASE("TopKRouter: group_score_top outside [1, experts per group]", "[errors][top_k]") {
  moe::TopKOptions o;
  o.expert_groups = 2;
  o.group_score_top = 3;
  REQUIRE_REJECTS_ARG(moe::TopKRouter<float>(gate(), o), moe::invalid_argument,
                      Contains("group_score_top = 3") && Contains("experts per group = 2"));
}

TEST_CASE("TopKRouter: top_p outside [0, 1]", "[errors][top_k]") {
  for (const double p : {-0.5, 1.5, std::numeric_limits<double>::quiet_NaN()}) {
    moe::TopKOptions o;
    o.k = 2;
    o.top_p = p;
    CAPTURE(p);
    REQUIRE_REJECTS_ARG(moe::TopKRouter<float>(gate(), o), moe::invalid_argument, Contains("top_p must be in [0, 1] (top_p = "));
  }
  // Just outside: the value prints in full (6 digits showed "top_p = 1", inside the range).
  moe::TopKOptions o;
  o.k = 2;
  o.top_p = 1.0000001;
  REQUIRE_REJECTS_ARG(moe::TopKRouter<float>(gate(), o), moe::invalid_argument, Contains("(top_p = 1.0000001)"));
}

TEST_CASE("TopKRouter: top_p without softmax-before-top-k scores", "[errors][top_k]") {
  moe::TopKOptions o;
  o.k = 2;
  o.top_p = 0.5;
  o.score = moe::ScoreFunction::sigmoid;
  REQUIRE_REJECTS_ARG(moe::TopKRouter<float>(gate(), o), moe::invalid_argument, Contains("top_p needs score = softmax") && Contains("top_p = 0.5"));
}

TEST_CASE("TopKRouter: capacity_factor negative or not finite", "[errors][top_k][capacity]") {
  for (const double cf : {-1.0, std::numeric_limits<double>::infinity(), std::numeric_limits<double>::quiet_NaN()}) {
    moe::TopKOptions o;
    o.capacity_factor = cf;
    CAPTURE(cf);
    REQUIRE_REJECTS_ARG(moe::TopKRouter<float>(gate(), o), moe::invalid_argument,
                        Contains("capacity_factor must be finite and >= 0") && Contains("capacity_factor = "));
  }
}

TEST_CASE("TopKRouter: fixed_capacity negative", "[errors][top_k][capacity]") {
  moe::TopKOptions o;
  o.fixed_capacity = -2;
  REQUIRE_REJECTS_ARG(moe::TopKRouter<float>(gate(), o), moe::invalid_argument, Contains("fixed_capacity = -2"));
}

TEST_CASE("TopKRouter: jitter outside [0, 1)", "[errors][top_k]") {
  for (const double j : {-0.1, 1.0}) {
    moe::TopKOptions o;
    o.jitter = j;
    CAPTURE(j);
    REQUIRE_REJECTS_ARG(moe::TopKRouter<float>(gate(), o), moe::invalid_argument, Contains("jitter must be in [0, 1) (jitter = "));
  }
}

TEST_CASE("TopKRouter::route: jitter in training without token ids", "[errors][top_k]") {
  moe::TopKOptions o = top2();
  o.jitter = 0.01;
  const moe::MoELayer layer(moe::TopKRouter<float>(gate(), o), experts());
  moe::Workspace<float> ws;
  moe::Matrix<float> y = sentinel(kT, kD);
  moe::RouteContext ctx;
  ctx.training = true;
  REQUIRE_REJECTS(layer.forward(tokens(), ctx, y, ws), moe::invalid_argument,
                  Contains("needs RouteContext::token_ids") && Contains("jitter = 0.01"), y);
}

TEST_CASE("TopKRouter::route: non-finite logits (inputs or weights)", "[errors][top_k][numeric]") {
  const moe::MoELayer layer(moe::TopKRouter<float>(gate(), top2()), experts());
  moe::Workspace<float> ws;
  moe::Matrix<float> y = sentinel(kT, kD);
  for (const float bad : {kNaN, kInf, -kInf}) {
    moe::Matrix<float> x = tokens();
    x(3, 2) = bad;
    CAPTURE(bad);
    REQUIRE_REJECTS(layer.forward(x, y, ws), moe::numeric_error, Contains("logit is not finite") && Contains("token = 3"), y);
  }
  moe::Matrix<float> w = gate();
  w(2, 5) = kNaN;
  const moe::TopKRouter<float> bad_weight(w, top2());
  moe::RouterOutput<float> out;
  REQUIRE_THROWS_MATCHES(bad_weight.route(tokens(), out), moe::numeric_error,
                         what(Contains("token = 0") && Contains("expert = 2") && Contains("nan")));
}

TEST_CASE("TopKRouter::route: x width", "[errors][top_k]") {
  const moe::TopKRouter<float> router(gate(), top2());
  moe::RouterOutput<float> out = routed();
  REQUIRE_REJECTS(router.route(random_matrix<float>(kT, kD + 1, 3), out), moe::invalid_argument,
                  Contains("x.cols() = 9") && Contains("d_model = 8"), out.plan);
}

TEST_CASE("TopKRouter::set_selection_bias: size and non-finite entries", "[errors][top_k]") {
  moe::TopKRouter<float> router(gate(), top2());
  const moe::Vector<float> kept = moe::Vector<float>::LinSpaced(kE, 0.0f, 0.3f);
  router.set_selection_bias(kept);
  REQUIRE_REJECTS_ARG(router.set_selection_bias(moe::Vector<float>::Zero(kE + 1)), moe::invalid_argument,
                      Contains("bias.size() = 5") && Contains("num_experts = 4"));
  moe::Vector<float> bad = kept;
  bad[1] = kInf;
  REQUIRE_REJECTS_ARG(router.set_selection_bias(bad), moe::invalid_argument, Contains("bias[1] is not finite") && Contains("inf"));
  REQUIRE(router.selection_bias() == kept);  // the old bias stays
}

TEST_CASE("TopKRouter::backward: shapes", "[errors][top_k][backward]") {
  const moe::TopKRouter<float> router(gate(), top2());
  const moe::Matrix<float> x = tokens();
  moe::RouterOutput<float> out;
  router.route(x, out);
  const std::vector<float> gw(static_cast<std::size_t>(out.plan.num_assignments()), 1.0f);
  moe::Matrix<float> dx = sentinel(kT, kD), dw = sentinel(kE, kD);
  REQUIRE_REJECTS(router.backward(tokens(kT + 1), out, gw.data(), nullptr, nullptr, dx, dw), moe::invalid_argument,
                  Contains("out.num_tokens() = 5") && Contains("x.rows() = 6"), dw);
  moe::Matrix<float> narrow = sentinel(kE, kD - 1);
  REQUIRE_REJECTS(router.backward(x, out, gw.data(), nullptr, nullptr, dx, narrow), moe::invalid_argument,
                  Contains("dweight.cols() = 7"), narrow);
  REQUIRE_REJECTS(router.backward(random_matrix<float>(kT, kD - 1, 4), out, gw.data(), nullptr, nullptr, dx, dw), moe::invalid_argument,
                  Contains("x.cols() = 7") && Contains("d_model = 8"), dw);
  moe::Matrix<float> short_dx = sentinel(kT - 1, kD);
  REQUIRE_REJECTS(router.backward(x, out, gw.data(), nullptr, nullptr, short_dx, dw), moe::invalid_argument,
                  Contains("dx.rows() = 4") && Contains("x.rows() = 5"), dw);
  moe::Matrix<float> narrow_dx = sentinel(kT, kD + 2);
  REQUIRE_REJECTS(router.backward(x, out, gw.data(), nullptr, nullptr, narrow_dx, dw), moe::invalid_argument,
                  Contains("dx.cols() = 10") && Contains("d_model = 8"), narrow_dx);
}

// --- ExpertChoiceRouter -------------------------------------------------------------------------

TEST_CASE("ExpertChoiceRouter: no experts", "[errors][expert_choice]") {
  REQUIRE_REJECTS_ARG(moe::ExpertChoiceRouter<float>(moe::Matrix<float>(0, kD), {1.0, true}), moe::invalid_argument,
                      Contains("num_experts = 0"));
}

TEST_CASE("ExpertChoiceRouter: capacity_factor not finite and > 0", "[errors][expert_choice]") {
  for (const double cf : {0.0, -2.0, std::numeric_limits<double>::infinity(), std::numeric_limits<double>::quiet_NaN()}) {
    CAPTURE(cf);
    REQUIRE_REJECTS_ARG(moe::ExpertChoiceRouter<float>(gate(), {cf, true}), moe::invalid_argument,
                        Contains("capacity_factor must be finite and > 0 (capacity_factor = "));
  }
}

TEST_CASE("ExpertChoiceRouter::route: x width and non-finite logits", "[errors][expert_choice][numeric]") {
  const moe::MoELayer layer(moe::ExpertChoiceRouter<float>(gate(), {2.0, true}), experts());
  moe::Workspace<float> ws;
  moe::Matrix<float> y = sentinel(kT, kD);
  moe::Matrix<float> x = tokens();
  x(4, 0) = -kInf;
  REQUIRE_REJECTS(layer.forward(x, y, ws), moe::numeric_error, Contains("ExpertChoiceRouter::route") && Contains("token = 4"), y);
  moe::RouterOutput<float> out = routed();
  REQUIRE_REJECTS(layer.router().route(random_matrix<float>(kT, 3, 3), out), moe::invalid_argument,
                  Contains("x.cols() = 3") && Contains("d_model = 8"), out.plan);
}

TEST_CASE("ExpertChoiceRouter::backward: shapes", "[errors][expert_choice][backward]") {
  const moe::ExpertChoiceRouter<float> router(gate(), {2.0, true});
  const moe::Matrix<float> x = tokens();
  moe::RouterOutput<float> out;
  router.route(x, out);
  const std::vector<float> gw(static_cast<std::size_t>(out.plan.num_assignments()), 1.0f);
  moe::Matrix<float> dx = sentinel(kT, kD), dw = sentinel(kE, kD);
  REQUIRE_REJECTS(router.backward(tokens(kT - 1), out, gw.data(), nullptr, nullptr, dx, dw), moe::invalid_argument,
                  Contains("out.num_tokens() = 5") && Contains("x.rows() = 4"), dw);
  moe::Matrix<float> short_dx = sentinel(kT - 2, kD);
  REQUIRE_REJECTS(router.backward(x, out, gw.data(), nullptr, nullptr, short_dx, dw), moe::invalid_argument,
                  Contains("dx.rows() = 3"), dw);
  moe::Matrix<float> tall_dw = sentinel(kE + 1, kD);
  REQUIRE_REJECTS(router.backward(x, out, gw.data(), nullptr, nullptr, dx, tall_dw), moe::invalid_argument,
                  Contains("dweight.rows() = 5") && Contains("num_experts = 4"), dx);
}

// --- HashRouter ---------------------------------------------------------------------------------

TEST_CASE("HashRouter: k outside [1, num_experts]", "[errors][hash]") {
  REQUIRE_REJECTS_ARG(moe::HashRouter<float>(kE, kD, {kE + 1, 0}), moe::invalid_argument, Contains("k = 5") && Contains("num_experts = 4"));
  REQUIRE_REJECTS_ARG(moe::HashRouter<float>(kE, kD, {0, 0}), moe::invalid_argument, Contains("k = 0"));
}

TEST_CASE("HashRouter: num_experts < 1 or d_model < 1", "[errors][hash]") {
  REQUIRE_REJECTS_ARG(moe::HashRouter<float>(0, kD, {1, 0}), moe::invalid_argument, Contains("HashRouter") && Contains("num_experts = 0"));
  REQUIRE_REJECTS_ARG(moe::HashRouter<float>(kE, -3, {1, 0}), moe::invalid_argument, Contains("d_model must be at least 1 (d_model = -3)"));
  REQUIRE_REJECTS_ARG(moe::HashRouter<float>(kE, 0, {1, 0}), moe::invalid_argument, Contains("d_model must be at least 1 (d_model = 0)"));
  REQUIRE_REJECTS_ARG(moe::HashRouter<float>::with_table(0, kD, {0}), moe::invalid_argument,
                      Contains("HashRouter::with_table") && Contains("num_experts = 0"));
}

TEST_CASE("HashRouter::with_table: empty table or entries out of range", "[errors][hash]") {
  REQUIRE_REJECTS_ARG(moe::HashRouter<float>::with_table(kE, kD, {}), moe::invalid_argument, Contains("table size = 0"));
  REQUIRE_REJECTS_ARG(moe::HashRouter<float>::with_table(kE, kD, {0, 3, 4}), moe::invalid_argument,
                      Contains("table[2]") && Contains("4") && Contains("num_experts = 4"));
  REQUIRE_REJECTS_ARG(moe::HashRouter<float>::with_table(kE, kD, {-1}), moe::invalid_argument, Contains("table[0]") && Contains("-1"));
}

TEST_CASE("HashRouter::balanced_table: num_experts < 1, bad frequencies", "[errors][hash]") {
  REQUIRE_REJECTS_ARG(moe::HashRouter<float>::balanced_table({1.0, 2.0}, 0), moe::invalid_argument, Contains("num_experts = 0"));
  REQUIRE_REJECTS_ARG(moe::HashRouter<float>::balanced_table({1.0, -2.0}, 2), moe::invalid_argument,
                      Contains("frequencies[1]") && Contains("-2"));
  REQUIRE_REJECTS_ARG(moe::HashRouter<float>::balanced_table({std::numeric_limits<double>::quiet_NaN()}, 2), moe::invalid_argument,
                      Contains("frequencies[0]") && Contains("nan"));
  REQUIRE_REJECTS_ARG(moe::HashRouter<float>::balanced({}, 2, kD), moe::invalid_argument,
                      Contains("HashRouter::balanced: frequencies must not be empty"));
}

TEST_CASE("HashRouter::route: token id outside the table", "[errors][hash]") {
  const moe::MoELayer layer(moe::HashRouter<float>::with_table(kE, kD, {0, 1, 2, 3, 0, 1}), experts());
  moe::Workspace<float> ws;
  moe::Matrix<float> y = sentinel(kT, kD);
  for (const std::int64_t bad : {std::int64_t(6), std::int64_t(-1), std::numeric_limits<std::int64_t>::max()}) {
    std::vector<std::int64_t> ids = {0, 1, 2, bad, 4};
    moe::RouteContext ctx;
    ctx.token_ids = ids.data();
    CAPTURE(bad);
    REQUIRE_REJECTS(layer.forward(tokens(), ctx, y, ws), moe::invalid_argument,
                    Contains("HashRouter::route: token_ids[3] is outside the table (token_ids[3] = " + std::to_string(bad)) &&
                        Contains("table size = 6"), y);
  }
}

TEST_CASE("HashRouter::route: no token ids", "[errors][hash]") {
  const moe::MoELayer layer(moe::HashRouter<float>(kE, kD, {2, 5}), experts());
  moe::Workspace<float> ws;
  moe::Matrix<float> y = sentinel(kT, kD);
  REQUIRE_REJECTS(layer.forward(tokens(), y, ws), moe::invalid_argument, Contains("token_ids must not be null") && Contains("tokens = 5"), y);
  moe::Matrix<float> empty(0, kD);
  REQUIRE_NOTHROW(layer.forward(moe::Matrix<float>(0, kD), empty, ws));  // documented: an empty batch needs no ids
}

TEST_CASE("HashRouter::route and backward: shapes", "[errors][hash][backward]") {
  const moe::HashRouter<float> router(kE, kD, {1, 5});
  const std::vector<std::int64_t> ids = {1, 2, 3, 4, 5};
  moe::RouteContext ctx;
  ctx.token_ids = ids.data();
  moe::RouterOutput<float> out = routed();
  REQUIRE_REJECTS(router.route(random_matrix<float>(kT, kD + 1, 3), ctx, out), moe::invalid_argument,
                  Contains("x.cols() = 9") && Contains("d_model = 8"), out.plan);
  router.route(tokens(), ctx, out);
  moe::Matrix<float> dx = sentinel(kT, kD), dw = sentinel(kE - 1, kD);
  REQUIRE_REJECTS(router.backward(tokens(), out, nullptr, nullptr, nullptr, dx, dw), moe::invalid_argument,
                  Contains("dweight.rows() = 3") && Contains("num_experts = 4"), dx);
}

TEST_CASE("Router backward after a route that threw, or with another router's output", "[errors][routing][backward]") {
  // A route that throws after sizing its output leaves the empty plan, never the earlier batch's
  // plan beside the new logits (which backward read past, expert choice's out of bounds); backward
  // refuses it.
  const moe::TopKRouter<float> top_k(gate(), top2());
  const moe::ExpertChoiceRouter<float> expert_choice(gate(), {2.0, true});
  const auto hash = moe::HashRouter<float>::with_table(kE, kD, {0, 1, 2, 3, 0, 1});
  const std::vector<std::int64_t> ids = {1, 2, 3, 4, 5}, bad_ids = {1, 2, 9, 4, 5};  // 9: outside the table
  moe::RouteContext ctx, bad_ctx;
  ctx.token_ids = ids.data();
  bad_ctx.token_ids = bad_ids.data();
  const moe::Matrix<float> x = tokens();
  moe::Matrix<float> non_finite = tokens();
  non_finite(4, 1) = kInf;
  auto check = [&](const auto& router, const moe::RouteContext& good, const moe::RouteContext& failing, const moe::Matrix<float>& failing_x) {
    moe::RouterOutput<float> out;
    router.route(x, good, out);
    REQUIRE(out.plan.num_assignments() > 0);
    const std::vector<float> gw(static_cast<std::size_t>(out.plan.num_assignments()), 1.0f);
    REQUIRE_THROWS(router.route(failing_x, failing, out));
    REQUIRE(out.plan.num_tokens == 0);
    REQUIRE(out.plan.num_experts == kE);
    REQUIRE(out.plan.num_assignments() == 0);
    REQUIRE(out.plan.expert_begin == std::vector<index_t>(kE + 1, 0));
    REQUIRE(out.plan.token_begin == std::vector<index_t>{0});
    moe::Matrix<float> dx = sentinel(kT, kD), dw = sentinel(kE, kD);
    REQUIRE_REJECTS(router.backward(x, out, gw.data(), nullptr, nullptr, dx, dw), moe::invalid_argument,
                    Contains("out.plan.num_tokens = 0") && Contains("x.rows() = 5"), dw);
    REQUIRE(same_bits(dx, sentinel(kT, kD)));
    // An output routed over more experts (same tokens).
    moe::TopKRouter<float>(random_matrix<float>(kE + 2, kD, 5), top2()).route(x, out);
    REQUIRE_REJECTS(router.backward(x, out, gw.data(), nullptr, nullptr, dx, dw), moe::invalid_argument,
                    Contains("out.num_experts() = 6") && Contains("num_experts = 4"), dw);
    // An output of the same shape from a router of another configuration: top-k with capacity
    // and reroute keeps E candidates per token where plain top-2 keeps 2 (its backward read the
    // candidate buffers with its own stride, past their end).
    moe::TopKOptions rerouting = top2();
    rerouting.capacity_factor = 100.0;
    rerouting.overflow = moe::OverflowPolicy::reroute;
    moe::TopKRouter<float>(gate(), rerouting).route(x, out);
    const std::vector<float> gw_other(static_cast<std::size_t>(out.plan.num_assignments()), 1.0f);
    REQUIRE_REJECTS(router.backward(x, out, gw_other.data(), nullptr, nullptr, dx, dw), moe::invalid_argument,
                    Contains("out was filled by a router of another kind or configuration") &&
                        Contains("out's router fingerprint = 0x"), dw);
    REQUIRE(same_bits(dx, sentinel(kT, kD)));
  };
  SECTION("top-k") { check(top_k, ctx, ctx, non_finite); }
  SECTION("expert choice") { check(expert_choice, ctx, ctx, non_finite); }
  SECTION("hash") { check(hash, ctx, bad_ctx, x); }
}

// --- build_routing ------------------------------------------------------------------------------

TEST_CASE("build_routing: expert id out of range", "[errors][routing]") {
  moe::RouterOutput<float> out = routed();
  const index_t begin[3] = {0, 1, 2};
  const index_t chosen[2] = {1, 4};
  const float weight[2] = {1.0f, 1.0f};
  REQUIRE_REJECTS(moe::build_routing(2, 4, begin, chosen, weight, out.plan), moe::invalid_argument,
                  Contains("expert = 4") && Contains("num_experts = 4") && Contains("choice = 1"), out.plan);
}

TEST_CASE("build_routing: choice_begin not starting at 0 or decreasing", "[errors][routing]") {
  // The fill wrote by choice_begin: {0, 3, 1, 2} wrote past the plan's arrays.
  moe::RouterOutput<float> out = routed();
  const index_t chosen[3] = {1, 2, 3};
  const float weight[3] = {1.0f, 1.0f, 1.0f};
  const index_t decreasing[4] = {0, 3, 1, 2};
  REQUIRE_REJECTS(moe::build_routing(3, 4, decreasing, chosen, weight, out.plan), moe::invalid_argument,
                  Contains("choice_begin must not decrease") && Contains("choice_begin[1] = 3, choice_begin[2] = 1"), out.plan);
  const index_t late_start[4] = {1, 2, 3, 3};
  REQUIRE_REJECTS(moe::build_routing(3, 4, late_start, chosen, weight, out.plan), moe::invalid_argument,
                  Contains("choice_begin[0] must be 0 (choice_begin[0] = 1)"), out.plan);
  REQUIRE_REJECTS(moe::build_routing(-1, 4, late_start, chosen, weight, out.plan), moe::invalid_argument,
                  Contains("num_tokens = -1"), out.plan);
}

// --- experts ------------------------------------------------------------------------------------

TEST_CASE("FeedForward: weight shapes that disagree", "[errors][experts]") {
  const moe::Matrix<float> w_in = random_matrix<float>(kFF, kD, 1);
  REQUIRE_REJECTS_ARG((moe::FeedForward<float, moe::ReLU>(w_in, random_matrix<float>(kD + 1, kFF, 2))), moe::invalid_argument,
                      Contains("w_out.rows() = 9") && Contains("w_in.cols() (d) = 8"));
  REQUIRE_REJECTS_ARG((moe::FeedForward<float, moe::ReLU>(w_in, random_matrix<float>(kD, kFF - 1, 2))), moe::invalid_argument,
                      Contains("w_out.cols() = 5") && Contains("w_in.rows() (d_ff) = 6"));
}

TEST_CASE("GatedFeedForward: weight shapes that disagree", "[errors][experts]") {
  const moe::Matrix<float> g = random_matrix<float>(kFF, kD, 1), u = random_matrix<float>(kFF, kD, 2), dn = random_matrix<float>(kD, kFF, 3);
  REQUIRE_REJECTS_ARG(moe::SwiGLU<float>(g, random_matrix<float>(kFF + 1, kD, 2), dn), moe::invalid_argument,
                      Contains("w_up.rows() = 7") && Contains("= 6"));
  REQUIRE_REJECTS_ARG(moe::SwiGLU<float>(g, random_matrix<float>(kFF, kD - 1, 2), dn), moe::invalid_argument,
                      Contains("w_up.cols() = 7") && Contains("= 8"));
  REQUIRE_REJECTS_ARG(moe::SwiGLU<float>(g, u, random_matrix<float>(kD + 2, kFF, 3)), moe::invalid_argument,
                      Contains("w_down.rows() = 10"));
  REQUIRE_REJECTS_ARG(moe::SwiGLU<float>(g, u, random_matrix<float>(kD, kFF + 3, 3)), moe::invalid_argument,
                      Contains("w_down.cols() = 9"));
}

TEST_CASE("ZeroComputeExpert: d_model < 1 and mix shapes", "[errors][experts]") {
  REQUIRE_REJECTS_ARG(moe::ZeroComputeExpert<float>::zero(0), moe::invalid_argument, Contains("d_model = 0"));
  REQUIRE_REJECTS_ARG(moe::ZeroComputeExpert<float>::copy(-2), moe::invalid_argument, Contains("d_model = -2"));
  REQUIRE_REJECTS_ARG(moe::ZeroComputeExpert<float>::constant(moe::Vector<float>()), moe::invalid_argument,
                      Contains("ZeroComputeExpert::constant: value must hold d_model >= 1 elements (value.size() = 0)"));
  const moe::Vector<float> value = moe::Vector<float>::Ones(kD);
  REQUIRE_REJECTS_ARG(moe::ZeroComputeExpert<float>::constant(value, random_matrix<float>(3, kD, 1)), moe::invalid_argument,
                      Contains("mix.rows() must be 2 (mix.rows() = 3)"));
  REQUIRE_REJECTS_ARG(moe::ZeroComputeExpert<float>::constant(value, random_matrix<float>(2, kD - 1, 1)), moe::invalid_argument,
                      Contains("mix.cols() = 7") && Contains("value.size() = 8"));
}

// --- MoELayer -----------------------------------------------------------------------------------

// A router of one's own that reports a zero width: the layer checks what the library's routers check themselves.
struct ZeroWidthRouter : moe::HashRouter<float> {
  using moe::HashRouter<float>::HashRouter;
  moe::index_t d_model() const noexcept { return 0; }
};

TEST_CASE("Zero widths: routers, experts and the layer refuse d_model or d_ff = 0", "[errors][layer][experts][routing]") {
  // A zero width is a model's shape gone wrong; every part says so at construction.
  REQUIRE_REJECTS_ARG(moe::TopKRouter<float>(moe::Matrix<float>(kE, 0), top2()), moe::invalid_argument,
                      Contains("TopKRouter: weight.cols() (d_model) must be at least 1 (weight.cols() (d_model) = 0)"));
  REQUIRE_REJECTS_ARG(moe::ExpertChoiceRouter<float>(moe::Matrix<float>(kE, 0), {1.0, true}), moe::invalid_argument,
                      Contains("ExpertChoiceRouter: weight.cols() (d_model) must be at least 1"));
  REQUIRE_REJECTS_ARG(moe::HashRouter<float>::with_table(kE, 0, {0, 1}), moe::invalid_argument,
                      Contains("HashRouter::with_table") && Contains("d_model = 0"));
  REQUIRE_REJECTS_ARG(moe::SoftRouter<float>(moe::Matrix<float>(0, kE), kE), moe::invalid_argument,
                      Contains("SoftRouter: phi.rows() (d_model) must be at least 1 (phi.rows() (d_model) = 0)"));
  REQUIRE_REJECTS_ARG((moe::FeedForward<float, moe::ReLU>(moe::Matrix<float>(kFF, 0), moe::Matrix<float>(0, kFF))),
                      moe::invalid_argument, Contains("FeedForward: w_in.cols() (d) must be at least 1 (w_in.cols() (d) = 0)"));
  REQUIRE_REJECTS_ARG((moe::FeedForward<float, moe::ReLU>(moe::Matrix<float>(0, kD), moe::Matrix<float>(kD, 0))),
                      moe::invalid_argument, Contains("FeedForward: w_in.rows() (d_ff) must be at least 1 (w_in.rows() (d_ff) = 0)"));
  REQUIRE_REJECTS_ARG(moe::SwiGLU<float>(moe::Matrix<float>(0, kD), moe::Matrix<float>(0, kD), moe::Matrix<float>(kD, 0)),
                      moe::invalid_argument, Contains("GatedFeedForward: w_gate.rows() (d_ff) must be at least 1"));
  REQUIRE_REJECTS_ARG(moe::SwiGLU<float>(moe::Matrix<float>(kFF, 0), moe::Matrix<float>(kFF, 0), moe::Matrix<float>(0, kFF)),
                      moe::invalid_argument, Contains("GatedFeedForward: w_gate.cols() (d) must be at least 1"));
  REQUIRE_REJECTS_ARG(moe::MoELayer(ZeroWidthRouter(kE, kD, {2, 0}), experts(kE)), moe::invalid_argument,
                      Contains("MoELayer: router.d_model() must be at least 1 (router.d_model() = 0)"));
}

TEST_CASE("MoELayer: expert count differs from the router's", "[errors][layer]") {
  const std::vector<moe::ZeroComputeExpert<float>> zc = {moe::ZeroComputeExpert<float>::copy(kD)};
  REQUIRE_REJECTS_ARG(moe::MoELayer(moe::TopKRouter<float>(gate(), top2()), experts(kE - 2), zc), moe::invalid_argument,
                      Contains("experts.size() + zero_compute.size() = 3") && Contains("router.num_experts() = 4"));
}

TEST_CASE("MoELayer: expert, zero-computation or shared expert of another width", "[errors][layer]") {
  std::vector<moe::SwiGLU<float>> mixed = experts(kE - 1);
  mixed.push_back(experts(1, kD + 1)[0]);
  REQUIRE_REJECTS_ARG(moe::MoELayer(moe::TopKRouter<float>(gate(), top2()), mixed), moe::invalid_argument,
                      Contains("expert 3") && Contains("d_model = 9") && Contains("router d_model = 8"));
  const std::vector<moe::ZeroComputeExpert<float>> zc = {moe::ZeroComputeExpert<float>::zero(kD - 2)};
  REQUIRE_REJECTS_ARG(moe::MoELayer(moe::TopKRouter<float>(gate(), top2()), experts(kE - 1), zc), moe::invalid_argument,
                      Contains("zero_compute expert 0") && Contains("d_model = 6"));
  moe::MoELayer layer(moe::TopKRouter<float>(gate(), top2()), experts());
  REQUIRE_REJECTS_ARG(layer.set_shared_experts(experts(1, kD + 3)), moe::invalid_argument, Contains("shared expert 0") && Contains("d_model = 11"));
  REQUIRE(layer.shared_experts().empty());
}

TEST_CASE("MoELayer::set_shared_experts: gate shape", "[errors][layer]") {
  moe::MoELayer layer(moe::TopKRouter<float>(gate(), top2()), experts());
  REQUIRE_REJECTS_ARG(layer.set_shared_experts(experts(1), moe::Weight<float>::own(random_matrix<float>(2, kD, 1))), moe::invalid_argument,
                      Contains("gate.rows() = 2"));
  REQUIRE_REJECTS_ARG(layer.set_shared_experts(experts(1), moe::Weight<float>::own(random_matrix<float>(1, kD - 1, 1))), moe::invalid_argument,
                      Contains("gate.cols() = 7") && Contains("d_model = 8"));
  REQUIRE(layer.shared_experts().empty());
}

TEST_CASE("MoELayer::forward: shapes", "[errors][layer]") {
  const moe::MoELayer layer(moe::TopKRouter<float>(gate(), top2()), experts());
  moe::Workspace<float> ws;
  moe::Matrix<float> y = sentinel(kT, kD);
  REQUIRE_REJECTS(layer.forward(random_matrix<float>(kT, kD - 1, 1), y, ws), moe::invalid_argument,
                  Contains("x.cols() = 7") && Contains("d_model = 8"), y);
  REQUIRE_REJECTS(layer.forward(tokens(kT + 1), y, ws), moe::invalid_argument, Contains("y.rows() = 5") && Contains("x.rows() = 6"), y);
  moe::Matrix<float> wide = sentinel(kT, kD + 1);
  REQUIRE_REJECTS(layer.forward(tokens(), wide, ws), moe::invalid_argument, Contains("y.cols() = 9") && Contains("d_model = 8"), wide);
  moe::TrainingWorkspace<float> tws;
  REQUIRE_REJECTS(layer.forward_train(tokens(kT - 1), moe::RouteContext{}, y, tws), moe::invalid_argument,
                  Contains("y.rows() = 5") && Contains("x.rows() = 4"), y);
  REQUIRE(tws.training_tokens == -1);  // a failed forward_train leaves nothing backward could use
}

namespace {
// A router of the user's own that breaks the contract: its plan covers `extra` tokens more than x
// has, over `planned` of the layer's experts (say, forgetting its zero-computation experts).
struct MisplannedRouter {
  using Scalar = float;
  index_t extra = 0, planned = kE;
  int damage = 0;  // after build_routing, 1..9: one array of the plan set wrong by hand (below)
  index_t num_experts() const { return kE; }
  index_t d_model() const { return kD; }
  template <class Arch>
  void route(const moe::ConstMatrixRef<float>& x, const moe::RouteContext&, moe::RouterOutput<float>& out, Arch) const {
    const index_t T = x.rows() + extra;
    out.reshape(T, kE, 42);
    std::vector<index_t> begin(static_cast<std::size_t>(T + 1)), expert(static_cast<std::size_t>(T));
    const std::vector<float> weight(static_cast<std::size_t>(T), 1.0f);
    for (index_t t = 0; t <= T; ++t) begin[std::size_t(t)] = t;
    for (index_t t = 0; t < T; ++t) expert[std::size_t(t)] = t % planned;
    moe::build_routing(T, planned, begin.data(), expert.data(), weight.data(), out.plan);
    moe::Routing<float>& p = out.plan;
    const index_t A = p.num_assignments();
    switch (damage) {
      case 1: p.token[2] = T; break;
      case 2: p.assignment[1] = A; break;
      case 3: p.expert_begin[2] = p.expert_begin[1] - 1; break;
      case 4: p.token_begin[T] = A + 1; break;
      case 5: p.token_begin.pop_back(); break;
      case 6: p.weight.pop_back(); break;
      case 7:
        p.dropped = {-1};
        p.dropped_weight = {0.5f};
        break;
      case 8: p.dropped = {0}; break;
      case 9: p.rerouted = {T}; break;
      default: break;
    }
  }
};
}  // namespace

TEST_CASE("MoELayer::forward: a router whose plan does not fit x or the experts", "[errors][layer]") {
  // The kernels index by the plan: dispatch read past x, and the experts' loop past expert_begin.
  moe::Workspace<float> ws;
  moe::Matrix<float> y = sentinel(kT, kD);
  for (const index_t extra : {index_t(3), index_t(-2)}) {
    const moe::MoELayer layer(MisplannedRouter{extra, kE}, experts());
    REQUIRE_REJECTS(layer.forward(tokens(), y, ws), moe::invalid_argument,
                    Contains("MoELayer::forward: the router's plan must cover x's tokens and the layer's experts (plan tokens = " +
                             std::to_string(kT + extra) + ", x.rows() = 5, plan experts = 4, layer experts = 4)"), y);
  }
  const moe::MoELayer fewer(MisplannedRouter{0, 2}, experts());
  REQUIRE_REJECTS(fewer.forward(tokens(), y, ws), moe::invalid_argument, Contains("plan experts = 2, layer experts = 4"), y);
  const moe::MoELayer fits(MisplannedRouter{0, kE}, experts());
  REQUIRE_NOTHROW(fits.forward(tokens(), y, ws));
  // A plan of the right counts whose arrays were filled wrong by hand: each index the kernels
  // follow is checked, so none reads or writes out of bounds.
  const std::vector<std::string> named = {
      "plan.token[2] must be in [0, num_tokens) (plan.token[2] = 5, num_tokens = 5)",
      "plan.assignment[1] must be in [0, assignments) (plan.assignment[1] = 5, assignments = 5)",
      "plan.expert_begin must run from 0 to the assignment count without decreasing (plan.expert_begin[2] = 1",
      "plan.token_begin must run from 0 to the assignment count without decreasing (plan.token_begin[5] = 6, assignments = 5)",
      "plan.token_begin.size() must be num_tokens + 1 (plan.token_begin.size() = 5, num_tokens + 1 = 6)",
      "plan.weight.size() must be plan.token.size() (plan.weight.size() = 4, plan.token.size() = 5)",
      "plan.dropped[0] must be in [0, num_tokens) (plan.dropped[0] = -1, num_tokens = 5)",
      "plan.dropped_weight.size() must be plan.dropped.size() (plan.dropped_weight.size() = 0, plan.dropped.size() = 1)",
      "plan.rerouted[0] must be in [0, num_tokens) (plan.rerouted[0] = 5, num_tokens = 5)"};
  for (int damage = 1; damage <= 9; ++damage) {
    CAPTURE(damage);
    const moe::MoELayer damaged(MisplannedRouter{0, kE, damage}, experts());
    REQUIRE_REJECTS(damaged.forward(tokens(), y, ws), moe::invalid_argument,
                    Contains("MoELayer::forward: the router's " + named[std::size_t(damage - 1)]), y);
  }
}

TEST_CASE("MoELayer::backward: without a forward_train, or after another batch's", "[errors][layer][backward]") {
  const moe::MoELayer layer(moe::TopKRouter<float>(gate(), top2()), experts());
  const moe::Matrix<float> x = tokens(), dy = random_matrix<float>(kT, kD, 9);
  auto grads = layer.make_gradients();
  grads.router.setConstant(3.0f);
  const auto router_before = grads.router;
  moe::Matrix<float> dx = sentinel(kT, kD);
  moe::TrainingWorkspace<float> ws;
  REQUIRE_REJECTS(layer.backward(x, dy, dx, grads, ws), moe::invalid_argument,
                  Contains("needs the workspace of a forward_train") && Contains("workspace tokens = -1") && Contains("x.rows() = 5"), dx);
  // A plain forward into a training workspace is not a forward_train.
  moe::Matrix<float> y(kT, kD);
  layer.forward(x, y, ws);
  REQUIRE_REJECTS(layer.backward(x, dy, dx, grads, ws), moe::invalid_argument, Contains("workspace tokens = -1"), dx);
  moe::Matrix<float> y_other(kT + 2, kD);
  layer.forward_train(tokens(kT + 2), moe::RouteContext{}, y_other, ws);
  REQUIRE_REJECTS(layer.backward(x, dy, dx, grads, ws), moe::invalid_argument, Contains("workspace tokens = 7") && Contains("x.rows() = 5"), dx);
  REQUIRE(grads.router == router_before);
}

TEST_CASE("MoELayer::backward: a workspace laid out for another layer, or routed into since", "[errors][layer][backward]") {
  // Each case would have had backward read the saved activations, the expert rows or the shared
  // experts' outputs past the workspace's buffers.
  moe::MoELayer layer(moe::TopKRouter<float>(gate(), top2()), experts());
  const moe::Matrix<float> x = tokens(), dy = random_matrix<float>(kT, kD, 9);
  moe::Matrix<float> y(kT, kD), dx = sentinel(kT, kD);
  moe::TrainingWorkspace<float> ws;
  auto grads = layer.make_gradients();
  const auto grads_before = grads.router;
  const auto fits_not = Contains("MoELayer::backward: the workspace's forward_train state does not fit this layer");

  // Experts of another d_ff (8 instead of 6): other saved sizes.
  std::vector<moe::SwiGLU<float>> wide;
  for (index_t e = 0; e < kE; ++e) {
    wide.emplace_back(random_matrix<float>(kFF + 2, kD, 1), random_matrix<float>(kFF + 2, kD, 2), random_matrix<float>(kD, kFF + 2, 3));
  }
  const moe::MoELayer wide_layer(moe::TopKRouter<float>(gate(), top2()), wide);
  wide_layer.forward_train(x, moe::RouteContext{}, y, ws);
  const std::string gated_saved = std::to_string(2 * kT * 2 * kFF), wide_saved = std::to_string(2 * kT * 2 * (kFF + 2));
  REQUIRE_REJECTS(layer.backward(x, dy, dx, grads, ws), moe::invalid_argument,
                  fits_not && Contains("workspace: tokens = 5, d_model = 8, experts = 4, slots per expert = 0, rows = 10, saved values = " +
                                       wide_saved) && Contains("this layer: tokens = 5, d_model = 8, experts = 4, slots per expert = 0, "
                                                               "rows = 10, saved values = " + gated_saved), dx);
  // More experts (6): the plan's per-expert sizes cannot be laid over this layer's experts.
  const moe::MoELayer more(moe::TopKRouter<float>(random_matrix<float>(kE + 2, kD, 5), top2()), experts(kE + 2));
  more.forward_train(x, moe::RouteContext{}, y, ws);
  REQUIRE_REJECTS(layer.backward(x, dy, dx, grads, ws), moe::invalid_argument,
                  fits_not && Contains("workspace: tokens = 5, d_model = 8, experts = 6") && Contains("this layer: tokens = 5, d_model = 8, "
                                                                                                    "experts = 4, slots per expert = 0, rows = 10, saved values = none"), dx);
  // This layer, given shared experts after its forward_train.
  layer.forward_train(x, moe::RouteContext{}, y, ws);
  layer.set_shared_experts(experts(1));
  auto shared_grads = layer.make_gradients();
  REQUIRE_REJECTS(layer.backward(x, dy, dx, shared_grads, ws), moe::invalid_argument,
                  fits_not && Contains("shared experts = 0, shared saved values = 0, dropped tokens pass through = 0, route = ") &&
                      Contains("shared experts = 1, shared saved values = " + std::to_string(kT * 2 * kFF) +
                               ", dropped tokens pass through = 0, route = ") &&
                      Contains("; they differ in shared experts (workspace 0, this layer 1), shared saved values (workspace 0, this layer " +
                               std::to_string(kT * 2 * kFF) + ") (workspace: "), dx);
  layer.forward_train(x, moe::RouteContext{}, y, ws);
  REQUIRE_NOTHROW(layer.backward(x, dy, dx, shared_grads, ws));
  // Dropped tokens passed through since the forward_train: backward would have added the
  // pass-through's gradients to a forward that had none.
  layer.forward_train(x, moe::RouteContext{}, y, ws);
  layer.set_dropped_tokens(moe::DroppedTokens::pass_through);
  dx = sentinel(kT, kD);
  REQUIRE_REJECTS(layer.backward(x, dy, dx, shared_grads, ws), moe::invalid_argument,
                  fits_not && Contains("they differ in dropped tokens pass through (workspace 0, this layer 1)"), dx);
  layer.set_dropped_tokens(moe::DroppedTokens::zero);
  REQUIRE_NOTHROW(layer.backward(x, dy, dx, shared_grads, ws));
  // The workspace's routing replaced after the forward_train.
  dx = sentinel(kT, kD);
  layer.router().route(tokens(kT + 1), ws.routing);
  REQUIRE_REJECTS(layer.backward(x, dy, dx, shared_grads, ws), moe::invalid_argument,
                  fits_not && Contains("workspace: tokens = 5") && Contains("this layer: tokens = 6"), dx);
  REQUIRE(grads.router == grads_before);

  // Routed into since by another batch of the same shape. Under expert choice every expert takes
  // the same number of tokens whatever the batch, so every size matches and only the route count
  // tells the routings apart (backward used to pair the new plan with the old saved values).
  moe::ExpertChoiceOptions one_each;
  one_each.capacity_factor = 1.0;
  const moe::MoELayer chosen(moe::ExpertChoiceRouter<float>(gate(), one_each), experts());
  chosen.forward_train(x, moe::RouteContext{}, y, ws);
  auto chosen_grads = chosen.make_gradients();
  REQUIRE_NOTHROW(chosen.backward(x, dy, dx, chosen_grads, ws));
  const std::string route = std::to_string(ws.routing.route_count());
  chosen.router().route(random_matrix<float>(kT, kD, 77), ws.routing);
  const std::string next = std::to_string(ws.routing.route_count());
  dx = sentinel(kT, kD);
  REQUIRE_REJECTS(chosen.backward(x, dy, dx, chosen_grads, ws), moe::invalid_argument,
                  fits_not && Contains("route = " + route + ", router") && Contains("route = " + next + ", router") &&
                      Contains("they differ in route (workspace " + route + ", this layer " + next + ") (workspace: "), dx);

  // A layer whose router has other options, with the same experts and plan sizes (capacity 100
  // drops nothing): the router's backward would have read the candidate buffers past their end.
  moe::TopKOptions rerouting = top2();
  rerouting.capacity_factor = 100.0;
  rerouting.overflow = moe::OverflowPolicy::reroute;
  const moe::MoELayer plain(moe::TopKRouter<float>(gate(), top2()), experts());
  const moe::MoELayer other_router(moe::TopKRouter<float>(gate(), rerouting), experts());
  plain.forward_train(x, moe::RouteContext{}, y, ws);
  auto other_grads = other_router.make_gradients();
  dx = sentinel(kT, kD);
  REQUIRE_REJECTS(other_router.backward(x, dy, dx, other_grads, ws), moe::invalid_argument,
                  fits_not && Contains("router fingerprint = " + moe::detail::fingerprint_text(plain.router().config_fingerprint()) + ";") &&
                      Contains("router fingerprint = " + moe::detail::fingerprint_text(other_router.router().config_fingerprint()) + ")") &&
                      Contains("router fingerprint (workspace 0x"), dx);
}

TEST_CASE("Backward: a dx that shares memory with x or dy", "[errors][layer][backward]") {
  // The layer's backward reads dy (pass-through tokens, the shared experts' gate) and x (the
  // router's weight gradient) after it has written dx, so in place it gave wrong gradients.
  moe::MoELayer layer(moe::TopKRouter<float>(gate(), top2()), experts());
  moe::Matrix<float> x = tokens(), y(kT, kD);
  moe::TrainingWorkspace<float> ws;
  layer.forward_train(x, moe::RouteContext{}, y, ws);
  auto grads = layer.make_gradients();
  moe::Matrix<float> dy = random_matrix<float>(kT, kD, 9);
  REQUIRE_REJECTS(layer.backward(x, dy, dy, grads, ws), moe::invalid_argument,
                  Contains("MoELayer::backward: dx must not share memory with dy, which is read after dx is written"), dy);
  REQUIRE_REJECTS(layer.backward_accumulate(x, dy, x, grads, ws), moe::invalid_argument,
                  Contains("MoELayer::backward_accumulate: dx must not share memory with x"), x);
  // Overlapping in part: dy rows 0..4 and dx rows 1..5 of one buffer.
  moe::Matrix<float> both = random_matrix<float>(kT + 1, kD, 10);
  REQUIRE_REJECTS(layer.backward(x, both.topRows(kT), both.bottomRows(kT), grads, ws), moe::invalid_argument,
                  Contains("dx must not share memory with dy"), both);
  // Adjacent but disjoint blocks of one buffer are fine.
  moe::Matrix<float> halves = random_matrix<float>(2 * kT, kD, 11);
  REQUIRE_NOTHROW(layer.backward(x, halves.topRows(kT), halves.bottomRows(kT), grads, ws));
  // So are x and dx side by side as the columns of one buffer, whose rows interleave (their
  // address spans overlap, which the check used to refuse), with dx's bits as in its own matrix.
  moe::Matrix<float> side_by_side(kT, 2 * kD);
  side_by_side.leftCols(kD) = x;
  moe::Matrix<float> dx_alone(kT, kD);
  layer.backward(x, dy, dx_alone, grads, ws);
  REQUIRE_NOTHROW(layer.backward(side_by_side.leftCols(kD), dy, side_by_side.rightCols(kD), grads, ws));
  REQUIRE(same_bits(moe::Matrix<float>(side_by_side.rightCols(kD)), dx_alone));
  REQUIRE(same_bits(moe::Matrix<float>(side_by_side.leftCols(kD)), x));
  // Columns that do overlap in a row are still refused.
  moe::Matrix<float> shifted(kT, kD + 1);
  shifted.leftCols(kD) = x;
  REQUIRE_REJECTS(layer.backward(shifted.leftCols(kD), dy, shifted.rightCols(kD), grads, ws), moe::invalid_argument,
                  Contains("dx must not share memory with x"), shifted);

  // A router's backward reads x after adding to dx.
  const moe::TopKRouter<float> router(gate(), top2());
  moe::RouterOutput<float> out;
  router.route(x, out);
  const std::vector<float> grad_weight(static_cast<std::size_t>(out.plan.num_assignments()), 1.0f);
  moe::Matrix<float> dweight(kE, kD);
  REQUIRE_REJECTS(router.backward(x, out, grad_weight.data(), nullptr, nullptr, x, dweight), moe::invalid_argument,
                  Contains("TopKRouter::backward: dx must not share memory with x"), x);
}

TEST_CASE("Row strides: negative ones, and outputs whose rows overlap", "[errors][layer][backward]") {
  // An Eigen::Map with a negative outer stride binds to moe's matrix refs without a copy, but moe's
  // kernels step from row to row with unsigned strides (undefined: UBSan reported a pointer
  // overflow), and the aliasing check walked rows in increasing address order: a dx over x's rows
  // in reverse passed it and the router gradient came out wrong.
  using StridedMap = Eigen::Map<moe::Matrix<float>, 0, Eigen::OuterStride<>>;
  using ConstStridedMap = Eigen::Map<const moe::Matrix<float>, 0, Eigen::OuterStride<>>;
  moe::MoELayer layer(moe::TopKRouter<float>(gate(), top2()), experts());
  const moe::Matrix<float> x = tokens(), dy = random_matrix<float>(kT, kD, 9);
  moe::Matrix<float> reversed_storage = x.colwise().reverse();  // x's rows, last first
  const ConstStridedMap x_reversed(reversed_storage.data() + (kT - 1) * kD, kT, kD, Eigen::OuterStride<>(-kD));
  REQUIRE(moe::Matrix<float>(x_reversed) == x);
  moe::Workspace<float> ws;
  moe::Matrix<float> y = sentinel(kT, kD);
  REQUIRE_REJECTS(layer.forward(x_reversed, y, ws), moe::invalid_argument,
                  Contains("MoELayer::forward: x's rows must lie at increasing addresses (x.outerStride() = -8)"), y);
  // An output whose rows overlap cannot hold the result; an input's may (here each row's second
  // half is the next row's first). (A stride of 0 means "contiguous" to Eigen, not "repeated".)
  constexpr index_t kHalf = kD / 2;
  moe::Matrix<float> overlapping = random_matrix<float>(1, (kT - 1) * kHalf + kD, 12);
  StridedMap y_overlapping(overlapping.data(), kT, kD, Eigen::OuterStride<>(kHalf));
  REQUIRE_REJECTS(layer.forward(x, y_overlapping, ws), moe::invalid_argument,
                  Contains("MoELayer::forward: y's rows must not overlap, and lie at increasing addresses (y.outerStride() = 4, "
                           "y.cols() = 8)"), overlapping);
  const ConstStridedMap x_overlapping(overlapping.data(), kT, kD, Eigen::OuterStride<>(kHalf));
  moe::Matrix<float> y_from_overlapping(kT, kD), y_from_copy(kT, kD);
  layer.forward(x_overlapping, y_from_overlapping, ws);
  layer.forward(moe::Matrix<float>(x_overlapping), y_from_copy, ws);
  REQUIRE(same_bits(y_from_overlapping, y_from_copy));

  // Backward: dx over x's rows in reverse (the review's case), and a dx or dweight that runs backwards.
  moe::TrainingWorkspace<float> train;
  moe::Matrix<float> x_forwards = x;
  layer.forward_train(x_forwards, moe::RouteContext{}, y, train);
  auto grads = layer.make_gradients();
  StridedMap dx_over_x(x_forwards.data() + (kT - 1) * kD, kT, kD, Eigen::OuterStride<>(-kD));
  REQUIRE_REJECTS(layer.backward(x_forwards, dy, dx_over_x, grads, train), moe::invalid_argument,
                  Contains("MoELayer::backward: dx's rows must not overlap, and lie at increasing addresses (dx.outerStride() = -8"),
                  x_forwards);
  const moe::TopKRouter<float> router(gate(), top2());
  moe::RouterOutput<float> out;
  router.route(x, out);
  const std::vector<float> grad_weight(static_cast<std::size_t>(out.plan.num_assignments()), 1.0f);
  moe::Matrix<float> dx = sentinel(kT, kD), dweight_storage = sentinel(kE, kD);
  StridedMap dweight_reversed(dweight_storage.data() + (kE - 1) * kD, kE, kD, Eigen::OuterStride<>(-kD));
  REQUIRE_REJECTS(router.backward(x, out, grad_weight.data(), nullptr, nullptr, dx, dweight_reversed), moe::invalid_argument,
                  Contains("TopKRouter::backward: dweight's rows must not overlap") && Contains("dweight.outerStride() = -8"),
                  dweight_storage);
  REQUIRE_REJECTS(router.route(x_reversed, out), moe::invalid_argument,
                  Contains("TopKRouter::route: x's rows must lie at increasing addresses"), out.plan);
}

TEST_CASE("MoELayer::backward: shapes of x, dy, dx and the gradients", "[errors][layer][backward]") {
  moe::MoELayer layer(moe::TopKRouter<float>(gate(), top2()), experts());
  layer.set_shared_experts(experts(1), moe::Weight<float>::own(random_matrix<float>(1, kD, 4)));
  const moe::Matrix<float> x = tokens(), dy = random_matrix<float>(kT, kD, 9);
  moe::TrainingWorkspace<float> ws;
  moe::Matrix<float> y(kT, kD);
  layer.forward_train(x, moe::RouteContext{}, y, ws);
  auto grads = layer.make_gradients();
  moe::Matrix<float> dx = sentinel(kT, kD);
  REQUIRE_REJECTS(layer.backward(random_matrix<float>(kT, kD + 1, 1), dy, dx, grads, ws), moe::invalid_argument,
                  Contains("x.cols() = 9") && Contains("d_model = 8"), dx);
  REQUIRE_REJECTS(layer.backward(x, random_matrix<float>(kT - 1, kD, 1), dx, grads, ws), moe::invalid_argument,
                  Contains("dy.rows() = 4") && Contains("x.rows() = 5"), dx);
  REQUIRE_REJECTS(layer.backward(x, random_matrix<float>(kT, kD - 1, 1), dx, grads, ws), moe::invalid_argument,
                  Contains("dy.cols() = 7"), dx);
  moe::Matrix<float> tall = sentinel(kT + 1, kD);
  REQUIRE_REJECTS(layer.backward(x, dy, tall, grads, ws), moe::invalid_argument, Contains("dx.rows() = 6"), tall);
  moe::Matrix<float> wide = sentinel(kT, kD + 1);
  REQUIRE_REJECTS(layer.backward(x, dy, wide, grads, ws), moe::invalid_argument, Contains("dx.cols() = 9"), wide);

  auto bad = layer.make_gradients();
  bad.router.resize(kE, kD + 1);
  REQUIRE_REJECTS(layer.backward(x, dy, dx, bad, ws), moe::invalid_argument, Contains("grads.router.cols() = 9"), dx);
  bad = layer.make_gradients();
  bad.experts.pop_back();
  REQUIRE_REJECTS(layer.backward(x, dy, dx, bad, ws), moe::invalid_argument, Contains("grads.experts.size() = 3") && Contains("experts = 4"), dx);
  bad = layer.make_gradients();
  bad.experts[1].w_down.resize(kD, kFF + 1);
  REQUIRE_REJECTS(layer.backward(x, dy, dx, bad, ws), moe::invalid_argument,
                  Contains("grads.experts[1] has the wrong shape") && Contains("grads.experts[1] = [6x8, 6x8, 8x7]") &&
                      Contains("expert weights = [6x8, 6x8, 8x6]"),
                  dx);
  bad = layer.make_gradients();
  bad.shared.clear();
  REQUIRE_REJECTS(layer.backward(x, dy, dx, bad, ws), moe::invalid_argument, Contains("grads.shared.size() = 0"), dx);
  bad = layer.make_gradients();
  bad.shared[0].w_gate.resize(1, 1);
  REQUIRE_REJECTS(layer.backward(x, dy, dx, bad, ws), moe::invalid_argument,
                  Contains("grads.shared[0] = [1x1, 6x8, 8x6]") && Contains("expert weights = [6x8, 6x8, 8x6]"), dx);
  bad = layer.make_gradients();
  bad.shared_gate.resize(0, 0);
  REQUIRE_REJECTS(layer.backward(x, dy, dx, bad, ws), moe::invalid_argument, Contains("grads.shared_gate.size() = 0") && Contains("= 8"), dx);
  REQUIRE_NOTHROW(layer.backward(x, dy, dx, grads, ws));
}

TEST_CASE("MoELayer::backward: extra_dlogits as a matrix", "[errors][layer][backward]") {
  moe::MoELayer layer(moe::TopKRouter<float>(gate(), top2()), experts());
  const moe::Matrix<float> x = tokens(), dy = random_matrix<float>(kT, kD, 9);
  const moe::Matrix<float> dlogits = random_matrix<float>(kT, kE, 10);
  moe::TrainingWorkspace<float> ws;
  moe::Matrix<float> y(kT, kD);
  layer.forward_train(x, moe::RouteContext{}, y, ws);

  // The matrix forms give the pointer forms' bits; a column-major matrix (whose .data() the
  // pointer form would misread) too, through the Ref's row-major copy.
  auto by_pointer = layer.make_gradients(), by_matrix = layer.make_gradients(), by_column_major = layer.make_gradients();
  moe::Matrix<float> dx_pointer(kT, kD), dx_matrix(kT, kD), dx_column_major(kT, kD);
  layer.backward(x, dy, dx_pointer, by_pointer, ws, dlogits.data());
  layer.backward(x, dy, dx_matrix, by_matrix, ws, dlogits);
  const Eigen::MatrixXf column_major = dlogits;
  layer.backward(x, dy, dx_column_major, by_column_major, ws, column_major);
  REQUIRE(same_bits(dx_matrix, dx_pointer));
  REQUIRE(same_bits(dx_column_major, dx_pointer));
  REQUIRE(same_bits(by_matrix.router, by_pointer.router));
  REQUIRE(same_bits(by_column_major.router, by_pointer.router));
  REQUIRE_FALSE(same_bits(by_pointer.router, [&] {
    auto without = layer.make_gradients();
    moe::Matrix<float> dx_without(kT, kD);
    layer.backward(x, dy, dx_without, without, ws);
    return without.router;
  }()));  // extra_dlogits reached the router's gradient
  layer.backward_accumulate(x, dy, dx_matrix, by_matrix, ws, dlogits);
  layer.backward_accumulate(x, dy, dx_pointer, by_pointer, ws, dlogits.data());
  REQUIRE(same_bits(by_matrix.router, by_pointer.router));

  // Wrong shapes, and rows that are not E apart, are refused before anything is written.
  moe::Matrix<float> dx = sentinel(kT, kD);
  const auto router_before = by_matrix.router;
  REQUIRE_REJECTS(layer.backward(x, dy, dx, by_matrix, ws, random_matrix<float>(kT, kE + 1, 1)), moe::invalid_argument,
                  Contains("moe::MoELayer::backward: extra_dlogits must be [x.rows(), experts] (extra_dlogits = [5, 5], x.rows() = 5, experts = 4)"),
                  dx);
  REQUIRE_REJECTS(layer.backward_accumulate(x, dy, dx, by_matrix, ws, random_matrix<float>(kT - 1, kE, 1)), moe::invalid_argument,
                  Contains("moe::MoELayer::backward_accumulate: extra_dlogits must be") && Contains("extra_dlogits = [4, 4]"), dx);
  const moe::Matrix<float> wider = random_matrix<float>(kT, kE + 3, 1);
  REQUIRE_REJECTS(layer.backward(x, dy, dx, by_matrix, ws, wider.leftCols(kE)), moe::invalid_argument,
                  Contains("extra_dlogits' rows must be contiguous (outer stride = 7, experts = 4)"), dx);
  REQUIRE(same_bits(by_matrix.router, router_before));

  // An empty batch takes a [0, E] matrix.
  const moe::Matrix<float> none(0, kD);
  moe::Matrix<float> y_none(0, kD), dx_none(0, kD);
  layer.forward_train(none, moe::RouteContext{}, y_none, ws);
  REQUIRE_NOTHROW(layer.backward(none, none, dx_none, by_matrix, ws, moe::Matrix<float>(0, kE)));
}

// --- balancing ----------------------------------------------------------------------------------

TEST_CASE("BiasBalancer: num_experts, update_rate, bias and load", "[errors][balance]") {
  REQUIRE_REJECTS_ARG(moe::BiasBalancer<float>(0, 0.001), moe::invalid_argument, Contains("num_experts = 0"));
  REQUIRE_REJECTS_ARG(moe::BiasBalancer<float>(kE, 0.0), moe::invalid_argument, Contains("update_rate = 0"));
  REQUIRE_REJECTS_ARG(moe::BiasBalancer<float>(kE, std::numeric_limits<double>::quiet_NaN()), moe::invalid_argument, Contains("update_rate = nan"));
  moe::BiasBalancer<float> b(kE, 0.5);
  b.update(std::vector<index_t>{4, 0, 0, 0});
  const moe::Vector<float> bias = b.bias();
  REQUIRE_REJECTS_ARG(b.set_bias(moe::Vector<float>::Zero(kE - 1)), moe::invalid_argument, Contains("bias.size() = 3") && Contains("num_experts = 4"));
  moe::Vector<float> nan_bias = moe::Vector<float>::Zero(kE);
  nan_bias[2] = kNaN;
  REQUIRE_REJECTS_ARG(b.set_bias(nan_bias), moe::invalid_argument, Contains("bias[2] is not finite"));
  REQUIRE_REJECTS_ARG(b.update(std::vector<index_t>{1, 2}), moe::invalid_argument, Contains("load.size() = 2"));
  REQUIRE_REJECTS_ARG(b.update(std::vector<index_t>{1, -2, 0, 0}), moe::invalid_argument, Contains("load[1] = -2"));
  const index_t most = std::numeric_limits<index_t>::max();
  REQUIRE_REJECTS_ARG(b.update(std::vector<index_t>{most, 1, 0, 0}), moe::invalid_argument,
                      Contains("the loads' sum overflows") && Contains("load[1] = 1"));
  REQUIRE(b.bias() == bias);  // no partial update
  // A rate that fits float but whose steps overflow the bias: refused before any entry moves.
  moe::BiasBalancer<float> huge(kE, 2e38);
  huge.update(std::vector<index_t>{4, 0, 0, 0});
  const moe::Vector<float> huge_bias = huge.bias();
  REQUIRE_THROWS_MATCHES(huge.update(std::vector<index_t>{4, 0, 0, 0}), moe::numeric_error,
                         what(Contains("BiasBalancer::update: bias[0] would overflow (bias[0] = -2e+38, update_rate = 2e+38)")));
  REQUIRE(huge.bias() == huge_bias);
  // An update rate that overflows float, or rounds to 0 in it, would move nothing or everything.
  REQUIRE_REJECTS_ARG(moe::BiasBalancer<float>(kE, 1e39), moe::invalid_argument, Contains("update_rate = 1e+39"));
  REQUIRE_REJECTS_ARG(moe::BiasBalancer<float>(kE, 1e-50), moe::invalid_argument, Contains("update_rate = 1e-50"));
  REQUIRE_NOTHROW(moe::BiasBalancer<double>(kE, 1e-50));
  moe::TopKRouter<float> other(random_matrix<float>(kE + 2, kD, 1), top2());
  REQUIRE_REJECTS_ARG(b.apply(other), moe::invalid_argument, Contains("router.num_experts() = 6") && Contains("num_experts = 4"));
  REQUIRE(other.selection_bias().size() == 0);
}

TEST_CASE("LoadAccumulator: shapes, k and counts", "[errors][balance]") {
  REQUIRE_REJECTS_ARG(moe::LoadAccumulator(0, 1), moe::invalid_argument, Contains("num_experts = 0"));
  REQUIRE_REJECTS_ARG(moe::LoadAccumulator(kE, 5), moe::invalid_argument, Contains("k = 5") && Contains("num_experts = 4"));
  moe::LoadAccumulator acc(kE, 2);
  moe::Matrix<index_t> ids(2, 3);
  ids << 0, 1, 2, 1, 2, 3;
  REQUIRE_REJECTS_ARG(acc.add(ids), moe::invalid_argument, Contains("top_k_ids.cols() = 3") && Contains("k = 2"));
  moe::Matrix<index_t> out_of_range(1, 2);
  out_of_range << 0, 4;
  REQUIRE_REJECTS_ARG(acc.add(out_of_range), moe::invalid_argument, Contains("top_k_ids(0, 1) = 4"));
  REQUIRE_REJECTS_ARG(acc.add_counts({1, 2, 3}, 4), moe::invalid_argument, Contains("counts.size() = 3"));
  REQUIRE_REJECTS_ARG(acc.add_counts({1, 2, 3, 4}, -1), moe::invalid_argument, Contains("tokens = -1"));
  REQUIRE_REJECTS_ARG(acc.add_counts({1, 5, 0, 0}, 4), moe::invalid_argument, Contains("counts[1] = 5") && Contains("tokens = 4"));
  // Each count fits 4 tokens, but 4 tokens make at most 4·2 = 8 top-2 choices, not 9.
  REQUIRE_REJECTS_ARG(acc.add_counts({4, 4, 1, 0}, 4), moe::invalid_argument,
                      Contains("sum to at most tokens * k") && Contains("sum = 9") && Contains("tokens = 4") && Contains("k = 2"));
  REQUIRE(acc.tokens() == 0);
  REQUIRE(acc.micro_batches() == 0);
  acc.add_counts({4, 3, 1, 0}, 4);  // 8 = 4·2: every token's two choices
  REQUIRE(acc.counts() == std::vector<index_t>{4, 3, 1, 0});
  acc.reset();
  REQUIRE(acc.micro_batches() == 0);
  // Two calls, each valid alone, whose running totals would pass index_t's largest (signed overflow
  // before the check): the second is refused and the totals stay.
  constexpr index_t kMax = std::numeric_limits<index_t>::max();
  acc.add_counts({kMax, 0, 0, 0}, kMax);
  REQUIRE_REJECTS_ARG(acc.add_counts({1, 0, 0, 0}, 1), moe::invalid_argument,
                      Contains("accumulated token count would overflow") && Contains("tokens = 1"));
  REQUIRE_REJECTS_ARG(acc.add(ids.leftCols(2)), moe::invalid_argument, Contains("LoadAccumulator::add: the accumulated token count"));
  CHECK(acc.tokens() == kMax);
  CHECK(acc.counts() == std::vector<index_t>{kMax, 0, 0, 0});
  CHECK(acc.micro_batches() == 1);
}

TEST_CASE("Losses: coefficient, shapes, ids and sequences leave grad untouched", "[errors][balance][losses]") {
  const moe::Matrix<float> z = random_matrix<float>(kT, kE, 5);
  moe::Matrix<index_t> ids(kT, 2);
  ids << 0, 1, 1, 2, 2, 3, 3, 0, 0, 2;
  moe::Matrix<float> g = sentinel(kT, kE);
  moe::AuxLossOptions o;
  o.coefficient = std::numeric_limits<double>::infinity();
  REQUIRE_REJECTS(moe::load_balancing_loss(z, ids, g, o), moe::invalid_argument, Contains("coefficient = inf"), g);
  moe::Matrix<float> narrow = sentinel(kT, kE - 1);
  REQUIRE_REJECTS(moe::load_balancing_loss(z, ids, narrow), moe::invalid_argument, Contains("grad.cols() = 3") && Contains("logits.cols() = 4"), narrow);
  moe::Matrix<index_t> twice = ids;
  twice(3, 1) = 3;
  REQUIRE_REJECTS(moe::load_balancing_loss(z, twice, g), moe::invalid_argument, Contains("twice") && Contains("token = 3") && Contains("expert = 3"), g);
  moe::Matrix<index_t> high = ids;
  high(2, 0) = kE;
  REQUIRE_REJECTS(moe::load_balancing_loss(z, high, g), moe::invalid_argument, Contains("top_k_ids(2, 0) = 4"), g);
  REQUIRE_REJECTS(moe::sequence_load_balancing_loss(z, ids, std::vector<index_t>{0, 3, 2, kT}, g), moe::invalid_argument,
                  Contains("sequence_begin[1] = 3") && Contains("sequence_begin[2] = 2"), g);
  REQUIRE_REJECTS(moe::sequence_load_balancing_loss(z, ids, std::vector<index_t>{0, 4}, g), moe::invalid_argument,
                  Contains("sequence_begin[num_sequences] = 4") && Contains("tokens = 5"), g);
  REQUIRE_REJECTS(moe::router_z_loss(z, g, std::numeric_limits<double>::quiet_NaN()), moe::invalid_argument, Contains("coefficient = nan"), g);
  // Finite in double but not in float: every loss would be infinite.
  o.coefficient = 1e39;
  REQUIRE_REJECTS(moe::load_balancing_loss(z, ids, g, o), moe::invalid_argument,
                  Contains("coefficient must be finite in the scalar type (coefficient = 1e+39, largest = 3.4028235e+38)"), g);
  REQUIRE_REJECTS(moe::router_z_loss(z, g, -1e39), moe::invalid_argument, Contains("coefficient = -1e+39"), g);
  o.coefficient = 1.0;
  o.score = unnamed<moe::ScoreFunction>();
  REQUIRE_REJECTS(moe::sequence_load_balancing_loss(z, ids, std::vector<index_t>{0, kT}, g, o), moe::invalid_argument,
                  Contains("sequence_load_balancing_loss: score must be softmax or sigmoid (score = 7)"), g);
  o.score = moe::ScoreFunction::softmax;
  o.normalization = unnamed<moe::AuxLossNormalization>();
  REQUIRE_REJECTS(moe::load_balancing_loss(z, ids, g, o), moe::invalid_argument,
                  Contains("load_balancing_loss: normalization must be per_choice or per_token (normalization = 7)"), g);
  moe::LoadAccumulator empty(kE, 2);
  REQUIRE_REJECTS(moe::global_load_balancing_loss(z, empty, g), moe::invalid_argument, Contains("load.tokens() = 0") && Contains("tokens = 5"), g);
}

TEST_CASE("Losses: a plan that lost choices to capacity", "[errors][balance][losses]") {
  moe::TopKOptions o = top2();
  o.fixed_capacity = 1;
  const moe::TopKRouter<float> router(gate(), o);
  moe::RouterOutput<float> out;
  router.route(tokens(), out);
  REQUIRE(!out.plan.dropped.empty());
  moe::Matrix<float> g = sentinel(kT, kE);
  REQUIRE_REJECTS(moe::load_balancing_loss(out.logits(), out.plan, 2, g), moe::invalid_argument,
                  Contains("lost choices to capacity") && Contains("dropped tokens = " + std::to_string(out.plan.dropped.size())), g);
}

TEST_CASE("Losses: a non-finite logit in a later row leaves grad untouched", "[errors][balance][losses][numeric]") {
  moe::Matrix<float> z = random_matrix<float>(kT, kE, 5);
  z(4, 1) = kInf;  // the rows before it are fine: nothing may be written for them either
  moe::Matrix<index_t> ids(kT, 1);
  ids << 0, 1, 2, 3, 0;
  moe::Matrix<float> g = sentinel(kT, kE);
  REQUIRE_REJECTS(moe::load_balancing_loss(z, ids, g), moe::numeric_error,
                  Contains("load_balancing_loss") && Contains("token = 4") && Contains("expert = 1") && Contains("logit = inf"), g);
  REQUIRE_REJECTS(moe::sequence_load_balancing_loss(z, ids, std::vector<index_t>{0, 2, kT}, g), moe::numeric_error,
                  Contains("token = 4"), g);
  moe::LoadAccumulator acc(kE, 1);
  acc.add(ids);
  REQUIRE_REJECTS(moe::global_load_balancing_loss(z, acc, g), moe::numeric_error, Contains("token = 4"), g);
  REQUIRE_REJECTS(moe::router_z_loss(z, g), moe::numeric_error, Contains("router_z_loss") && Contains("token = 4"), g);
}

}  // namespace bad_input_test
