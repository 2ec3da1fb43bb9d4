// Core pieces: Weight views and ownership, the huge-page allocator, routing groups, the plan
// builder, error messages.
#include <catch2/catch.hpp>

#include <cstdint>
#include <fstream>
#include <new>
#include <type_traits>
#include <vector>

#include "../support/reference.hpp"

// (A namespace of its own: this file may share a translation unit with other test files.)
namespace core_test {

using moe::index_t;

TEST_CASE("Weight views caller memory and owns copies on request", "[core]") {
  std::vector<float> buffer = {1, 2, 3, 4, 5, 6};
  const auto view = moe::Weight<float>::view(buffer.data(), 2, 3);
  REQUIRE(view.data() == buffer.data());  // zero copy
  REQUIRE_FALSE(view.owns());
  const moe::Weight<float> view_copy = view;
  REQUIRE(view_copy.data() == buffer.data());

  moe::Matrix<float> m(2, 3);
  m << 1, 2, 3, 4, 5, 6;
  auto owner = std::make_unique<moe::Weight<float>>(moe::Weight<float>::own(m));
  REQUIRE(owner->owns());
  const moe::Weight<float> owned_copy = *owner;
  REQUIRE(owned_copy.data() != owner->data());
  owner.reset();  // the copy keeps its own storage
  REQUIRE(owned_copy.map() == m);
  moe::Weight<float> moved = moe::Weight<float>(owned_copy);
  REQUIRE(moved.map() == m);
  REQUIRE_THROWS_AS(moe::Weight<float>::view(nullptr, 2, 2), moe::invalid_argument);
  REQUIRE_THROWS_WITH(moe::Weight<float>::view(buffer.data(), -1, 2), Catch::Contains("rows = -1"));
}

// Without MOE_USE_OPENMP moe lives in moe::v0; the OpenMP build's namespace is checked in
// tests/layer/threads_test.cpp.
TEST_CASE("A build of moe without OpenMP has the plain ABI namespace", "[core]") {
  STATIC_REQUIRE(std::is_same<moe::Buffer<float>, moe::v0::Buffer<float>>::value);
}

TEST_CASE("Buffer grows to the largest request, keeps its storage otherwise, and refuses a negative size", "[core]") {
  moe::Buffer<float> buffer;
  CHECK(buffer.capacity() == 0);
  CHECK(buffer.ensure(0) == buffer.data());
  float* first = buffer.ensure(100);
  REQUIRE(buffer.capacity() >= 100);
  for (int i = 0; i < 100; ++i) first[i] = static_cast<float>(i);
  // Smaller and equal requests hand back the same storage, contents kept.
  CHECK(buffer.ensure(10) == first);
  CHECK(buffer.ensure(100) == first);
  CHECK(first[99] == 99.0f);
  float* grown = buffer.ensure(5000);
  CHECK(buffer.capacity() >= 5000);
  CHECK_THROWS_WITH(buffer.ensure(-3), "moe::Buffer::ensure: n must be >= 0 (n = -3)");
  CHECK_THROWS_AS(buffer.ensure(-1), moe::invalid_argument);
  CHECK(buffer.data() == grown);  // a refused request changes nothing
  CHECK(buffer.capacity() >= 5000);
}

TEST_CASE("HugePageAllocator aligns large blocks to huge pages and keeps their contents", "[core][memory]") {
  constexpr std::size_t kHuge = moe::kHugePageBytes;
  // One element short of, exactly at, and past a huge page; a small block.
  for (const std::size_t count : {kHuge / sizeof(float) - 1, kHuge / sizeof(float), kHuge / sizeof(float) * 3 + 5,
                                  std::size_t(100)}) {
    std::vector<float, moe::HugePageAllocator<float>> v(count);
    const std::size_t bytes = count * sizeof(float);
    CHECK(moe_test::aligned_to(v.data(), bytes >= kHuge ? kHuge : 64));
    for (std::size_t i = 0; i < count; ++i) v[i] = static_cast<float>(i % 1000);
    std::vector<float, moe::HugePageAllocator<float>> copy = v;  // through a second allocation
    bool same = true;
    for (std::size_t i = 0; i < count; ++i) same = same && copy[i] == static_cast<float>(i % 1000);
    CHECK(same);
  }
  // Rebound copies compare equal (any instance frees any other's blocks).
  const moe::HugePageAllocator<double> for_doubles{moe::HugePageAllocator<float>{}};
  CHECK(for_doubles == moe::HugePageAllocator<float>{});
  CHECK_FALSE(for_doubles != moe::HugePageAllocator<float>{});
  // A size whose byte count overflows is refused before any arithmetic wraps.
  CHECK_THROWS_AS(moe::HugePageAllocator<float>{}.allocate(static_cast<std::size_t>(-1) / 2), std::bad_array_new_length);
  // A type aligned beyond 64 bytes gets its own alignment in small blocks.
  struct alignas(4096) Page {
    char bytes[4096];
  };
  moe::HugePageAllocator<Page> pages;
  for (const std::size_t count : {std::size_t(1), std::size_t(3), std::size_t(100)}) {
    Page* p = pages.allocate(count);
    CHECK(moe_test::aligned_to(p, alignof(Page)));
    pages.deallocate(p, count);
  }
}

TEST_CASE("advise_huge_pages advises only whole huge pages and never changes the data", "[core][memory]") {
  constexpr std::size_t kHuge = moe::kHugePageBytes;
  CHECK_FALSE(moe::advise_huge_pages(nullptr, 4 * kHuge));
  std::vector<char, moe::HugePageAllocator<char>> buffer(3 * kHuge);
  for (std::size_t i = 0; i < buffer.size(); ++i) buffer[i] = static_cast<char>(i * 7);
  // [begin + 1, begin + 2 MiB) holds no whole huge page; [begin + 1, end) holds one.
  CHECK_FALSE(moe::advise_huge_pages(buffer.data() + 1, kHuge - 1));
  CHECK_FALSE(moe::advise_huge_pages(buffer.data(), 0));
  const bool advised = moe::advise_huge_pages(buffer.data() + 1, buffer.size() - 1);
#if defined(__linux__)
  // Accepted wherever the kernel has transparent huge pages (whatever its policy), which it
  // announces in sysfs.
  const bool kernel_has_thp = std::ifstream("/sys/kernel/mm/transparent_hugepage/enabled").good();
  CHECK(advised == kernel_has_thp);
#else
  CHECK_FALSE(advised);
#endif
  bool same = true;
  for (std::size_t i = 0; i < buffer.size(); ++i) same = same && buffer[i] == static_cast<char>(i * 7);
  CHECK(same);
}

TEST_CASE("Routing groups must partition the batch", "[core][groups]") {
  const moe::RouteContext none;
  const moe::GroupBounds whole(none, 5, "test");
  REQUIRE(whole.count() == 1);
  REQUIRE(whole.begin(0) == 0);
  REQUIRE(whole.end(0) == 5);

  const std::vector<index_t> ok = {0, 2, 2, 5};
  const moe::GroupBounds three(moe::RouteContext::with_groups(ok), 5, "test");
  REQUIRE(three.count() == 3);
  REQUIRE(three.size(1) == 0);  // empty groups are valid

  auto bounds = [](std::vector<index_t> b, index_t T) { return moe::GroupBounds(moe::RouteContext::with_groups(b), T, "Where"); };
  REQUIRE_THROWS_WITH(bounds({1, 5}, 5), Catch::Contains("moe::Where") && Catch::Contains("group_begin[0] = 1"));
  REQUIRE_THROWS_WITH(bounds({0, 3, 2, 5}, 5), Catch::Contains("group_begin[1] = 3") && Catch::Contains("group_begin[2] = 2"));
  REQUIRE_THROWS_WITH(bounds({0, 4}, 5), Catch::Contains("group_begin[num_groups] = 4") && Catch::Contains("tokens = 5"));
  // No group over no tokens ({0}, what a loop over no sequences builds) is the one empty group;
  // over tokens it covers nothing.
  const std::vector<index_t> no_group = {0};
  const moe::GroupBounds empty(moe::RouteContext::with_groups(no_group), 0, "test");
  REQUIRE(empty.count() == 1);
  REQUIRE(empty.size(0) == 0);
  REQUIRE_THROWS_WITH(bounds({0}, 3), Catch::Contains("num_groups = 0") && Catch::Contains("tokens = 3"));
  // Boundaries that do not start at 0 are named as such, over an empty batch as over tokens.
  REQUIRE_THROWS_WITH(bounds({5}, 0), Catch::Contains("group_begin[0] = 5"));
  REQUIRE_THROWS_WITH(bounds({5}, 3), Catch::Contains("group_begin[0] = 5"));
  REQUIRE_THROWS_AS(moe::RouteContext::with_groups({}), moe::invalid_argument);
}

namespace {

// Four tokens' choices, best first: token 0 -> {2, 0}, token 1 -> {} (none), token 2 -> {0},
// token 3 -> {1, 2, 0}; and the plan build_routing makes of them.
struct ExampleChoices {
  std::vector<index_t> begin = {0, 2, 2, 3, 6};
  std::vector<index_t> experts = {2, 0, 0, 1, 2, 0};
  std::vector<double> weights = {0.6, 0.4, 1.0, 0.5, 0.3, 0.2};
  moe::Routing<double> plan;
  ExampleChoices() { moe::build_routing(4, 3, begin.data(), experts.data(), weights.data(), plan); }
};

}  // namespace

TEST_CASE("build_routing groups choices by expert and keeps each token's rank order", "[core][routing]") {
  ExampleChoices ex;
  const auto& begin = ex.begin;
  const auto& experts = ex.experts;
  const auto& weights = ex.weights;
  moe::Routing<double>& plan = ex.plan;
  REQUIRE(plan.expert_begin == std::vector<index_t>{0, 3, 4, 6});
  REQUIRE(plan.token == std::vector<index_t>{0, 2, 3, 3, 0, 3});
  REQUIRE(plan.weight == std::vector<double>{0.4, 1.0, 0.2, 0.5, 0.6, 0.3});
  REQUIRE(plan.token_begin == begin);
  for (std::size_t c = 0; c < experts.size(); ++c) {
    REQUIRE(plan.expert_of_assignment(plan.assignment[c]) == experts[c]);
    REQUIRE(plan.weight[std::size_t(plan.assignment[c])] == weights[c]);
  }
  const std::vector<index_t> bad = {0, 3};
  REQUIRE_THROWS_WITH(moe::build_routing(1, 3, begin.data(), bad.data() + 1, weights.data(), plan),
                      Catch::Contains("expert = 3") && Catch::Contains("num_experts = 3"));
}

TEST_CASE("dispatch copies each assignment's token row and combine sums them in rank order", "[core][routing]") {
  const ExampleChoices ex;  // token 1 has no row in the buffer, and zeros from combine
  const auto& begin = ex.begin;
  const auto& weights = ex.weights;
  const moe::Routing<double>& plan = ex.plan;
  for (const index_t d : {index_t(1), index_t(5), index_t(37)}) {
    const index_t ldx = d + 3, A = plan.num_assignments(), tokens = plan.num_tokens;
    std::vector<double> x(std::size_t(tokens * ldx));
    for (std::size_t i = 0; i < x.size(); ++i) x[i] = 0.25 * double(i) - 7.0;
    std::vector<double> buffer(std::size_t(A * d + 1), -1.0);  // one guard element after the rows
    moe::dispatch(moe::simd::default_arch{}, plan, x.data(), ldx, d, buffer.data());
    for (index_t a = 0; a < A; ++a)
      for (index_t i = 0; i < d; ++i) REQUIRE(buffer[std::size_t(a * d + i)] == x[std::size_t(plan.token[std::size_t(a)] * ldx + i)]);
    REQUIRE(buffer.back() == -1.0);

    const index_t ldy = d + 2;
    std::vector<double> y(std::size_t(tokens * ldy), -1.0);
    moe::combine(moe::simd::default_arch{}, plan, buffer.data(), d, y.data(), ldy);
    for (index_t t = 0; t < tokens; ++t) {
      for (index_t i = 0; i < d; ++i) {
        double want = 0;  // the token's choices in rank order: weights[c] times its own x row
        for (index_t c = begin[std::size_t(t)]; c < begin[std::size_t(t) + 1]; ++c) want += weights[std::size_t(c)] * x[std::size_t(t * ldx + i)];
        REQUIRE(y[std::size_t(t * ldy + i)] == Approx(want).epsilon(1e-15).margin(1e-15));
      }
      for (index_t i = d; i < ldy; ++i) REQUIRE(y[std::size_t(t * ldy + i)] == -1.0);  // the stride's gap untouched
    }

    // With init rows (d apart), each y row sums from its init row; token 1 gets init's row.
    std::vector<double> init(std::size_t(tokens * d));
    for (std::size_t i = 0; i < init.size(); ++i) init[i] = 3.0 - 0.5 * double(i);
    moe::combine(moe::simd::default_arch{}, plan, buffer.data(), d, y.data(), ldy, init.data());
    for (index_t t = 0; t < tokens; ++t) {
      for (index_t i = 0; i < d; ++i) {
        double want = init[std::size_t(t * d + i)];
        for (index_t c = begin[std::size_t(t)]; c < begin[std::size_t(t) + 1]; ++c) want += weights[std::size_t(c)] * x[std::size_t(t * ldx + i)];
        REQUIRE(y[std::size_t(t * ldy + i)] == Approx(want).epsilon(1e-15).margin(1e-15));
      }
      for (index_t i = d; i < ldy; ++i) REQUIRE(y[std::size_t(t * ldy + i)] == -1.0);
    }
  }
}

TEST_CASE("Errors derive from the standard exceptions and are prefixed with moe::", "[core][errors]") {
  try {
    moe::detail::check_dim("Thing::call", "x.cols()", 7, "d", 8);
    FAIL("no exception");
  } catch (const std::invalid_argument& e) {
    REQUIRE(std::string(e.what()) == "moe::Thing::call: x.cols() must equal d (x.cols() = 7, d = 8)");
  }
  REQUIRE_THROWS_AS(moe::detail::throw_numeric("x"), std::domain_error);
}

}  // namespace core_test
