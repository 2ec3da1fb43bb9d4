// A warm forward performs no heap allocation, and a warm backward takes the experts' temporaries
// from its workspace: this executable replaces the global operator new with one that counts, so it
// cannot share a binary with the other tests.
// Eigen's own heap allocations (aligned_malloc) bypass operator new: Eigen reports each one
// through eigen_assert when EIGEN_RUNTIME_NO_MALLOC is defined and malloc is disallowed, so this
// executable counts those instead of asserting (any other failed Eigen assertion aborts).
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>

namespace {
std::atomic<long> g_allocations{0};
std::atomic<std::size_t> g_bytes{0};
std::atomic<long> g_eigen_allocations{0};
void eigen_assertion(bool ok, const char* what) {
  if (ok) return;
  if (std::strstr(what, "is_malloc_allowed") != nullptr) {
    ++g_eigen_allocations;
    return;
  }
  std::fprintf(stderr, "Eigen assertion failed: %s\n", what);
  std::abort();
}
}  // namespace
#define EIGEN_RUNTIME_NO_MALLOC
#define eigen_assert(x) eigen_assertion(static_cast<bool>(x), #x)

#include <catch2/catch.hpp>

#include "../support/reference.hpp"

void* operator new(std::size_t size) {
  ++g_allocations;
  g_bytes += size;
  if (void* p = std::malloc(size == 0 ? 1 : size)) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t size) { return operator new(size); }
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, std::size_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t) noexcept { std::free(p); }
// The aligned forms, which Buffer's allocator (the workspaces) uses.
void* operator new(std::size_t size, std::align_val_t align) {
  ++g_allocations;
  g_bytes += size;
  const auto a = static_cast<std::size_t>(align);
  if (void* p = std::aligned_alloc(a, (size + a - 1) / a * a + (size == 0 ? a : 0))) return p;
  throw std::bad_alloc();
}
void* operator new[](std::size_t size, std::align_val_t align) { return operator new(size, align); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::size_t, std::align_val_t) noexcept { std::free(p); }

using moe_test::random_matrix;
using moe::index_t;

namespace {
// Heap allocations so far, operator new's and Eigen's; Eigen's are counted only while a
// CountingEigen lives (Eigen allocates freely elsewhere, as in the set-up).
long allocations_now() { return g_allocations.load() + g_eigen_allocations.load(); }
struct CountingEigen {
  CountingEigen() { Eigen::internal::set_is_malloc_allowed(false); }
  ~CountingEigen() { Eigen::internal::set_is_malloc_allowed(true); }
  CountingEigen(const CountingEigen&) = delete;
  CountingEigen& operator=(const CountingEigen&) = delete;
};
}  // namespace

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

  long before = 0, after = 0;
  {
    const CountingEigen eigen;
    before = allocations_now();
    for (int rep = 0; rep < 3; ++rep) {
      layer.forward(big, y_big, ws);
      layer.forward(small, y_small, ws);
      layer.forward(big.topRows(0), y_big.topRows(0), ws);  // empty batch
    }
    after = allocations_now();
  }
  REQUIRE(after - before == 0);
  // The counters do count: a fresh workspace allocates, and so does an Eigen temporary.
  moe::Workspace<float> cold;
  layer.forward(small, y_small, cold);
  REQUIRE(allocations_now() > after);
  const long eigen_before = g_eigen_allocations.load();
  {
    const CountingEigen eigen;
    const moe::Matrix<float> temporary = big.transpose() * big;
    REQUIRE(temporary.rows() == d);
  }
  REQUIRE(g_eigen_allocations.load() > eigen_before);
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
  const CountingEigen eigen;
  const long before = allocations_now();
  for (int rep = 0; rep < 3; ++rep) {
    forward(0);
    forward(1);
  }
  return allocations_now() - before;
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

TEST_CASE("A warm backward takes the experts' temporaries from the workspace", "[layer][allocation]") {
  // What a warm backward still allocates: the routers' per-token vectors and a few Eigen
  // temporaries of the router and shared-gate gradients (Soft MoE's: its router's [T, S] ones and
  // a copy of Φᵀ), the same number however
  // many experts there are. The experts' rows and hidden-width temporaries ([A, d] twice, [m, d_ff]
  // per expert, through operator new when the workspace grows, through Eigen before) come from
  // the workspace: the operator new bytes stay below one [T, d] matrix and the Eigen allocations
  // do not grow with the expert count.
  const index_t d = 64, ff = 96, T = 300;
  const moe::Matrix<float> x = random_matrix<float>(T, d, 5), dy = random_matrix<float>(T, d, 6);
  moe::Matrix<float> y(T, d), dx(T, d);
  const auto limit = static_cast<std::size_t>(T * d) * sizeof(float);
  struct Count {
    std::size_t bytes;
    long eigen;
  };
  // One training step's allocations, once `layer` and `ws` are warm.
  auto warm_count = [&](const auto& layer, auto& ws) {
    auto grads = layer.make_gradients();
    auto step = [&] {
      layer.forward_train(x, y, ws);
      layer.backward(x, dy, dx, grads, ws);
      layer.backward_accumulate(x, dy, dx, grads, ws);
    };
    step();
    const std::size_t bytes = g_bytes.load();
    const long eigen = g_eigen_allocations.load();
    {
      const CountingEigen counting;
      step();
    }
    return Count{g_bytes.load() - bytes, g_eigen_allocations.load() - eigen};
  };
  auto top_k = [&](index_t E) {
    moe::TopKOptions o;
    o.k = 2;
    o.normalize = true;
    moe::MoELayer layer(moe::TopKRouter<float>(random_matrix<float>(E, d, 99), o), make_experts(E, d, ff));
    layer.set_shared_experts(make_experts(1, d, ff), moe::Weight<float>::own(random_matrix<float>(1, d, 7)));
    moe::TrainingWorkspace<float> ws;
    return warm_count(layer, ws);
  };
  auto soft = [&](index_t E) {
    moe::SoftOptions o;
    o.slots_per_expert = 2;
    const moe::SoftMoELayer<moe::SwiGLU<float>> layer(moe::SoftRouter<float>(random_matrix<float>(d, E * 2, 96), E, o),
                                                      make_experts(E, d, ff));
    moe::SoftTrainingWorkspace<float> ws;
    return warm_count(layer, ws);
  };
  SECTION("top-k with a gated shared expert") {
    const Count two = top_k(2), eight = top_k(8);
    CAPTURE(two.bytes, two.eigen, eight.bytes, eight.eigen, limit);
    REQUIRE(eight.bytes < limit);
    REQUIRE(eight.eigen == two.eigen);
  }
  SECTION("Soft MoE") {
    const Count two = soft(2), eight = soft(8);
    CAPTURE(two.bytes, two.eigen, eight.bytes, eight.eigen, limit);
    REQUIRE(eight.bytes < limit);
    REQUIRE(eight.eigen == two.eigen);
  }
}
