// A warm forward performs no heap allocation: this executable replaces the global operator new
// with one that counts, so it cannot share a binary with the other tests.
#include <catch2/catch.hpp>

#include <atomic>
#include <cstdlib>
#include <new>

#include "../support/reference.hpp"

namespace {
std::atomic<long> g_allocations{0};
}

void* operator new(std::size_t size) {
  ++g_allocations;
  if (void* p = std::malloc(size == 0 ? 1 : size)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t size) { return operator new(size); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }

using moe_test::random_matrix;
using moe::index_t;

TEST_CASE("A warm MoELayer forward allocates nothing", "[layer][allocation]") {
  const index_t d = 24, ff = 40, E = 6;
  std::vector<moe::Matrix<float>> weights;
  std::vector<moe::SwiGLU<float>> experts;
  for (index_t e = 0; e < E; ++e) {
    experts.emplace_back(random_matrix<float>(ff, d, 1 + std::uint32_t(e)), random_matrix<float>(ff, d, 20 + std::uint32_t(e)),
                         random_matrix<float>(d, ff, 40 + std::uint32_t(e)));
  }
  moe::TopKOptions o;
  o.k = 2;
  o.normalize = true;
  moe::MoELayer layer(moe::TopKRouter<float>(random_matrix<float>(E, d, 99), o), experts);
  moe::Workspace<float> ws;
  // Large batch (GEMM path), then small (streaming path): warm both.
  const moe::Matrix<float> big = random_matrix<float>(300, d, 5), small = random_matrix<float>(3, d, 6);
  moe::Matrix<float> y_big(300, d), y_small(3, d);
  layer.forward(big, y_big, ws);
  layer.forward(small, y_small, ws);

  const long before = g_allocations.load();
  for (int rep = 0; rep < 3; ++rep) {
    layer.forward(big, y_big, ws);
    layer.forward(small, y_small, ws);
    layer.forward(big.topRows(0), y_big.topRows(0), ws);  // empty batch
  }
  const long after = g_allocations.load();
  REQUIRE(after - before == 0);
  // The counter does count: a fresh workspace allocates.
  moe::Workspace<float> cold;
  layer.forward(small, y_small, cold);
  REQUIRE(g_allocations.load() > after);
}

namespace {

std::vector<moe::SwiGLU<float>> make_experts(index_t n, index_t d, index_t ff) {
  std::vector<moe::SwiGLU<float>> experts;
  for (index_t e = 0; e < n; ++e) {
    experts.emplace_back(random_matrix<float>(ff, d, 1 + std::uint32_t(e)), random_matrix<float>(ff, d, 20 + std::uint32_t(e)),
                         random_matrix<float>(d, ff, 40 + std::uint32_t(e)));
  }
  return experts;
}

// Warms `forward` on a large and a small batch (each with its context), then counts the
// allocations of three more rounds, which must be none.
template <class Forward>
long warm_allocations(Forward forward) {
  forward(0);
  forward(1);
  const long before = g_allocations.load();
  for (int rep = 0; rep < 3; ++rep) {
    forward(0);
    forward(1);
  }
  return g_allocations.load() - before;
}

}  // namespace

TEST_CASE("Warm forwards allocate nothing with capacity, groups, shared experts and every router",
          "[layer][allocation]") {
  const index_t d = 24, ff = 40, E = 6;
  const moe::Matrix<float> big = random_matrix<float>(300, d, 5), small = random_matrix<float>(7, d, 6);
  moe::Matrix<float> y_big(300, d), y_small(7, d);
  const std::vector<index_t> big_groups = {0, 100, 250, 300}, small_groups = {0, 3, 7};
  std::vector<std::int64_t> ids(300);
  for (std::size_t t = 0; t < ids.size(); ++t) ids[t] = static_cast<std::int64_t>(t * 37 % 500);
  auto context = [&](int which) {
    moe::RouteContext ctx = moe::RouteContext::with_groups(which == 0 ? big_groups : small_groups);
    ctx.token_ids = ids.data();
    return ctx;
  };
  auto run = [&](const auto& layer, auto& ws) {
    return warm_allocations([&](int which) {
      if (which == 0) layer.forward(big, context(0), y_big, ws);
      else layer.forward(small, context(1), y_small, ws);
    });
  };

  SECTION("top-k with capacity (reroute), routing groups and a gated shared expert") {
    moe::TopKOptions o = moe::presets::qwen2_moe(2, true);
    o.capacity_factor = 1.0;
    o.overflow = moe::OverflowPolicy::reroute;
    moe::MoELayer layer(moe::TopKRouter<float>(random_matrix<float>(E, d, 99), o), make_experts(E, d, ff));
    layer.set_shared_experts(make_experts(1, d, ff), moe::Weight<float>::own(random_matrix<float>(1, d, 7)));
    moe::Workspace<float> ws;
    REQUIRE(run(layer, ws) == 0);
  }
  SECTION("Switch: top-1 capacity, dropped tokens passed through") {
    moe::MoELayer layer(moe::TopKRouter<float>(random_matrix<float>(E, d, 98), moe::presets::switch_transformers(0.5)),
                        make_experts(E, d, ff));
    layer.set_dropped_tokens(moe::DroppedTokens::pass_through);
    moe::Workspace<float> ws;
    REQUIRE(run(layer, ws) == 0);
  }
  SECTION("expert choice") {
    moe::ExpertChoiceOptions o;
    o.capacity_factor = 2.0;
    moe::MoELayer layer(moe::ExpertChoiceRouter<float>(random_matrix<float>(E, d, 97), o), make_experts(E, d, ff));
    moe::Workspace<float> ws;
    REQUIRE(run(layer, ws) == 0);
  }
  SECTION("hash routing") {
    moe::MoELayer layer(moe::HashRouter<float>(E, d, {2, 42}), make_experts(E, d, ff));
    moe::Workspace<float> ws;
    REQUIRE(run(layer, ws) == 0);
  }
  SECTION("Soft MoE") {
    moe::SoftOptions o;
    o.slots_per_expert = 2;
    o.normalized = true;
    const moe::SoftMoELayer<moe::SwiGLU<float>> layer(moe::SoftRouter<float>(random_matrix<float>(d, E * 2, 96), E, o),
                                                      make_experts(E, d, ff));
    moe::SoftWorkspace<float> ws;
    REQUIRE(run(layer, ws) == 0);
  }
}
