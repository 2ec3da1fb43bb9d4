// A warm forward, and a warm training step (forward_train and backward), perform no heap
// allocation: this executable replaces the global operator new with one that counts, so it cannot
// share a binary with the other tests. With glibc and no sanitizer it also replaces malloc, which
// counts what bypasses operator new: GCC's OpenMP runtime (CMake builds this file a second time
// with OpenMP, run on 2 threads) and Eigen's own allocations.
// Eigen's own heap allocations (aligned_malloc) bypass operator new: Eigen reports each one
// through eigen_assert when EIGEN_RUNTIME_NO_MALLOC is defined and malloc is disallowed, so this
// executable counts those instead of asserting (any other failed Eigen assertion aborts).
#include <atomic>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>

namespace {
std::atomic<long> g_allocations{0};
std::atomic<long> g_mallocs{0};
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

// The replacements below pair operator new with malloc and operator delete with free, as they
// must; g++ 12 at -O3, once it inlines both into a test, takes free for a mismatched deallocation.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif
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

// malloc's family, counted and passed on to glibc's own (which the library exports for this). Not
// with LLVM's OpenMP runtime (clang's -fopenmp): libomp calls malloc in its own parallel regions,
// hundreds of times per warm round here while moe's operator new count stays 0.
#if defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer) || __has_feature(memory_sanitizer)
#define MOE_TEST_SANITIZED 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define MOE_TEST_SANITIZED 1
#endif
#if defined(__GLIBC__) && !defined(MOE_TEST_SANITIZED) && !(defined(_OPENMP) && defined(__clang__))
constexpr bool kCountsMalloc = true;
extern "C" {
void* __libc_malloc(std::size_t);
void* __libc_calloc(std::size_t, std::size_t);
void* __libc_realloc(void*, std::size_t);
void* __libc_memalign(std::size_t, std::size_t);
void __libc_free(void*);
void* malloc(std::size_t size) noexcept {
  ++g_mallocs;
  return __libc_malloc(size);
}
void* calloc(std::size_t count, std::size_t size) noexcept {
  ++g_mallocs;
  return __libc_calloc(count, size);
}
void* realloc(void* p, std::size_t size) noexcept {
  ++g_mallocs;
  return __libc_realloc(p, size);
}
void* aligned_alloc(std::size_t align, std::size_t size) noexcept {
  ++g_mallocs;
  return __libc_memalign(align, size);
}
void* memalign(std::size_t align, std::size_t size) noexcept {  // what OpenMP's runtime uses for a team
  ++g_mallocs;
  return __libc_memalign(align, size);
}
int posix_memalign(void** p, std::size_t align, std::size_t size) noexcept {
  ++g_mallocs;
  *p = __libc_memalign(align, size);
  return *p != nullptr || size == 0 ? 0 : ENOMEM;
}
void free(void* p) noexcept { __libc_free(p); }
}
#else
constexpr bool kCountsMalloc = false;
#endif

using moe_test::random_matrix;
using moe::index_t;

namespace {
// Heap allocations so far, operator new's and Eigen's; Eigen's are counted only while a
// CountingEigen lives (Eigen allocates freely elsewhere, as in the set-up).
// (operator new and Eigen allocate through malloc: counted twice, which only the zero checks see.)
long allocations_now() { return g_allocations.load() + g_eigen_allocations.load() + g_mallocs.load(); }
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
  if (kCountsMalloc) {  // and malloc is counted
    const long mallocs_before = g_mallocs.load();
    void* volatile block = std::malloc(16);
    std::free(block);
    REQUIRE(g_mallocs.load() > mallocs_before);
  }
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

// The layers the tests below run, a SECTION each: check(layer, workspace, training workspace),
// with new workspaces of the layer's kind.
template <class Check>
void for_each_layer(index_t d, index_t ff, index_t E, Check&& check) {
  auto check_moe = [&](const auto& layer) {
    moe::Workspace<float> ws;
    moe::TrainingWorkspace<float> train;
    check(layer, ws, train);
  };
  auto check_soft = [&](const auto& layer) {
    moe::SoftWorkspace<float> ws;
    moe::SoftTrainingWorkspace<float> train;
    check(layer, ws, train);
  };
  SECTION("dropless top-2 with a gated shared expert") {
    moe::MoELayer layer(moe::TopKRouter<float>(random_matrix<float>(E, d, 99), moe::presets::mixtral(2)), make_experts(E, d, ff));
    layer.set_shared_experts(make_experts(1, d, ff), moe::Weight<float>::own(random_matrix<float>(1, d, 7)));
    check_moe(layer);
  }
  SECTION("top-k with capacity (reroute), training jitter, group-limited selection and two gated shared experts") {
    moe::TopKOptions o = moe::presets::qwen2_moe(2, true);
    o.capacity_factor = 1.0;
    o.overflow = moe::OverflowPolicy::reroute;
    o.jitter = 0.01;
    o.expert_groups = 3;
    o.selected_groups = 2;
    moe::MoELayer layer(moe::TopKRouter<float>(random_matrix<float>(E, d, 99), o), make_experts(E, d, ff));
    layer.set_shared_experts(make_experts(2, d, ff), moe::Weight<float>::own(random_matrix<float>(1, d, 7)));
    check_moe(layer);
  }
  SECTION("dynamic top-p") {
    moe::TopKOptions o;
    o.k = 4;
    o.top_p = 0.6;
    check_moe(moe::MoELayer(moe::TopKRouter<float>(random_matrix<float>(E, d, 95), o), make_experts(E, d, ff)));
  }
  SECTION("Switch: top-1 capacity, dropped tokens passed through, zero-computation experts") {
    moe::MoELayer layer(moe::TopKRouter<float>(random_matrix<float>(E + 2, d, 98), moe::presets::switch_transformers(0.5)),
                        make_experts(E, d, ff), {moe::ZeroComputeExpert<float>::zero(d), moe::ZeroComputeExpert<float>::copy(d)});
    layer.set_dropped_tokens(moe::DroppedTokens::pass_through);
    check_moe(layer);
  }
  SECTION("expert choice") {
    moe::ExpertChoiceOptions o;
    o.capacity_factor = 2.0;
    check_moe(moe::MoELayer(moe::ExpertChoiceRouter<float>(random_matrix<float>(E, d, 97), o), make_experts(E, d, ff)));
  }
  SECTION("hash routing") {
    check_moe(moe::MoELayer(moe::HashRouter<float>(E, d, {2, 42}), make_experts(E, d, ff)));
  }
  for (const bool normalized : {false, true}) {
    DYNAMIC_SECTION("Soft MoE, normalized = " << normalized) {
      moe::SoftOptions o;
      o.slots_per_expert = 2;
      o.normalized = normalized;
      check_soft(moe::SoftMoELayer<moe::SwiGLU<float>>(moe::SoftRouter<float>(random_matrix<float>(d, E * 2, 96), E, o),
                                                       make_experts(E, d, ff)));
    }
  }
}

}  // namespace

TEST_CASE("Warm forwards and training steps allocate nothing with every router", "[layer][allocation]") {
  // Each layer on a large and a small batch, with routing groups and token ids: forward alone, and
  // a training step (forward_train, backward, backward_accumulate, then the same on an empty
  // batch), each warmed once and then counted over three more rounds. In training the experts'
  // rows and scratch, the routers' temporaries and the shared gate's all come from the workspace.
  const index_t d = 24, ff = 40, E = 6;
  const moe::Matrix<float> big = random_matrix<float>(300, d, 5), small = random_matrix<float>(7, d, 6);
  const moe::Matrix<float> dy_big = random_matrix<float>(300, d, 8), dy_small = random_matrix<float>(7, d, 9);
  moe::Matrix<float> y_big(300, d), y_small(7, d), dx_big(300, d), dx_small(7, d);
  const std::vector<index_t> big_groups = {0, 100, 250, 300}, small_groups = {0, 3, 7}, no_groups = {0, 0};
  std::vector<std::int64_t> ids(300);
  for (std::size_t t = 0; t < ids.size(); ++t) ids[t] = static_cast<std::int64_t>(t * 37 % 500);
  auto context = [&](const std::vector<index_t>& groups, bool training) {  // (a view of `groups`)
    moe::RouteContext ctx = moe::RouteContext::with_groups(groups);
    ctx.token_ids = ids.data();
    ctx.training = training;
    return ctx;
  };
  const moe::RouteContext big_ctx = context(big_groups, false), small_ctx = context(small_groups, false);
  const moe::RouteContext big_train = context(big_groups, true), small_train = context(small_groups, true),
                          empty_train = context(no_groups, true);
  // The allocations of warm forwards, then of warm training steps, of `layer`.
  auto check = [&](const auto& layer, auto& ws, auto& train) {
    CHECK(warm_allocations([&](int which) {
            if (which == 0) layer.forward(big, big_ctx, y_big, ws);
            else layer.forward(small, small_ctx, y_small, ws);
          }) == 0);
    auto grads = layer.make_gradients();
    auto step = [&](const moe::ConstMatrixRef<float>& x, const moe::RouteContext& ctx, const moe::ConstMatrixRef<float>& dy,
                    moe::MatrixRef<float> y, moe::MatrixRef<float> dx) {
      layer.forward_train(x, ctx, y, train);
      layer.backward(x, dy, dx, grads, train);
      layer.backward_accumulate(x, dy, dx, grads, train);
    };
    CHECK(warm_allocations([&](int which) {
            if (which == 0) {
              step(big, big_train, dy_big, y_big, dx_big);
            } else {
              step(small, small_train, dy_small, y_small, dx_small);
              step(big.topRows(0), empty_train, dy_big.topRows(0), y_big.topRows(0), dx_big.topRows(0));  // empty batch
            }
          }) == 0);
  };
  for_each_layer(d, ff, E, check);
  SECTION("the counters count a cold training workspace") {
    moe::MoELayer layer(moe::TopKRouter<float>(random_matrix<float>(E, d, 99), moe::presets::mixtral(2)), make_experts(E, d, ff));
    auto grads = layer.make_gradients();
    moe::TrainingWorkspace<float> ws;
    const long before = allocations_now();
    layer.forward_train(small, small_train, y_small, ws);
    layer.backward(small, dy_small, dx_small, grads, ws);
    REQUIRE(allocations_now() > before);
  }
}

TEST_CASE("A reserved workspace allocates nothing on its first batches", "[layer][allocation]") {
  // reserve(ws, 300, 3), then with no warm-up: a batch of 300 equal rows with equal token ids (every
  // token routes alike, so one expert takes them all: the largest expert batch), 300 random rows in
  // 3 routing groups, 7 rows in 2 groups and an empty batch; the same as training steps on a
  // reserved training workspace. Nothing may allocate. With d = 1,024 the gate and up products of an
  // expert with 96 or more tokens take the lane-split product (AVX-512 or AVX2, in float), whose
  // per-thread packing buffers reserve grows too (simd::reserve_lane_buffers).
  const auto dims = GENERATE(values<std::pair<index_t, index_t>>({{24, 40}, {1024, 64}}));
  const index_t d = dims.first, ff = dims.second, E = 6, most = 300;
  CAPTURE(d, ff);
  if (d >= 1024) {
    using Arch = moe::simd::default_arch;
    CHECK(moe::simd::lane_split<Arch, float>(most, std::size_t(d), std::size_t(ff)) ==
          moe::simd::has_lane_product<Arch, float>());
  }
  const moe::Matrix<float> random = random_matrix<float>(most, d, 5), small = random_matrix<float>(7, d, 6);
  const moe::Matrix<float> alike = random.row(0).replicate(most, 1);
  const moe::Matrix<float> dy = random_matrix<float>(most, d, 8);
  moe::Matrix<float> y(most, d), dx(most, d);
  const std::vector<index_t> one_group = {0, most}, three_groups = {0, 100, 250, most}, two_groups = {0, 3, 7}, no_groups = {0, 0};
  std::vector<std::int64_t> ids(most), same_ids(most, 11);
  for (std::size_t t = 0; t < ids.size(); ++t) ids[t] = static_cast<std::int64_t>(t * 37 % 500);
  auto context = [](const std::vector<index_t>& groups, const std::vector<std::int64_t>& token_ids, bool training) {
    moe::RouteContext ctx = moe::RouteContext::with_groups(groups);
    ctx.token_ids = token_ids.data();
    ctx.training = training;
    return ctx;
  };
  // The batches, in turn: (x, its context).
  auto for_each_batch = [&](bool training, auto&& run) {
    run(moe::ConstMatrixRef<float>(alike), context(one_group, same_ids, training));
    run(moe::ConstMatrixRef<float>(random), context(three_groups, ids, training));
    run(moe::ConstMatrixRef<float>(small), context(two_groups, ids, training));
    run(moe::ConstMatrixRef<float>(random.topRows(0)), context(no_groups, ids, training));
  };
  auto check = [&](const auto& layer, auto& ws, auto& train) {
    layer.reserve(ws, most, 3);
    long before = 0;
    {
      const CountingEigen eigen;
      before = allocations_now();
      for_each_batch(false, [&](const moe::ConstMatrixRef<float>& x, const moe::RouteContext& ctx) {
        layer.forward(x, ctx, y.topRows(x.rows()), ws);
      });
      CHECK(allocations_now() - before == 0);
    }
    auto grads = layer.make_gradients();
    layer.reserve(train, most, 3);
    {
      const CountingEigen eigen;
      before = allocations_now();
      for_each_batch(true, [&](const moe::ConstMatrixRef<float>& x, const moe::RouteContext& ctx) {
        const index_t n = x.rows();
        layer.forward_train(x, ctx, y.topRows(n), train);
        layer.backward(x, dy.topRows(n), dx.topRows(n), grads, train);
        layer.backward_accumulate(x, dy.topRows(n), dx.topRows(n), grads, train);
      });
      CHECK(allocations_now() - before == 0);
    }
  };
  for_each_layer(d, ff, E, check);
}

// Runs an m-token product with 64 rows of k elements on each thread of a team after
// reserve_lane_buffers<A>(m, k): nothing may allocate, and every thread gets the same product.
template <class A>
void check_reserved_lane_product(std::size_t m, std::size_t k) {
  const std::size_t n = 64;
  const moe::Matrix<float> x = random_matrix<float>(index_t(m), index_t(k), 1), w = random_matrix<float>(index_t(n), index_t(k), 2);
  std::vector<moe::Matrix<float>> y(static_cast<std::size_t>(moe::max_threads()), moe::Matrix<float>(index_t(m), index_t(n)));
  auto on_each_thread = [&](auto&& body) {
#if defined(_OPENMP)
#pragma omp parallel
#endif
    body(static_cast<std::size_t>(moe::thread_index()));
  };
  on_each_thread([](std::size_t) {});  // (the OpenMP runtime's pool, before counting)
  CHECK(moe::simd::lane_split<A, float>(m, k, n) == moe::simd::has_lane_product<A, float>());
  CHECK(moe::simd::reserve_lane_buffers<A, float>(m, k));
  const long before = allocations_now();
  on_each_thread([&](std::size_t t) { moe::simd::matmul_nt(A{}, x.data(), m, k, w.data(), n, y[t].data(), n); });
  CHECK(allocations_now() - before == 0);
  for (const auto& product : y) CHECK(product == y.front());
}

TEST_CASE("simd::reserve_lane_buffers grows every thread's packing buffers", "[simd][allocation]") {
  // Products of many tokens (the lane-split product, AVX-512 or AVX2 in float) pack x and the weight
  // rows into buffers of their thread. After reserve_lane_buffers, each thread of a team, running a
  // product of that size on its own (as when threads take whole experts), allocates nothing. Each size
  // exceeds the products before it, whose batches may have grown the threads' buffers: first the AVX2
  // form, in any build whose target has AVX2 and FMA (its weight blocks are half AVX-512's), then the
  // default architecture's.
#if XSIMD_WITH_FMA3_AVX2
  check_reserved_lane_product<xsimd::fma3<xsimd::avx2>>(400, 1100);
#endif
  check_reserved_lane_product<moe::simd::default_arch>(400, 1200);
}
