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
