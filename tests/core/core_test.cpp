// Core pieces: Weight views and ownership, routing groups, the plan builder, error messages.
#include <catch2/catch.hpp>

#include "../support/reference.hpp"

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
  REQUIRE_THROWS_WITH(bounds({0}, 0), Catch::Contains("num_groups = 0"));
  REQUIRE_THROWS_AS(moe::RouteContext::with_groups({}), moe::invalid_argument);
}

TEST_CASE("build_routing groups choices by expert and keeps each token's rank order", "[core][routing]") {
  // token 0 -> {2, 0}, token 1 -> {}, token 2 -> {0}, token 3 -> {1, 2, 0}
  const std::vector<index_t> begin = {0, 2, 2, 3, 6};
  const std::vector<index_t> experts = {2, 0, 0, 1, 2, 0};
  const std::vector<double> weights = {0.6, 0.4, 1.0, 0.5, 0.3, 0.2};
  moe::Routing<double> plan;
  moe::build_routing(4, 3, begin.data(), experts.data(), weights.data(), plan);
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

TEST_CASE("Errors derive from the standard exceptions and are prefixed with moe::", "[core][errors]") {
  try {
    moe::detail::check_dim("Thing::call", "x.cols()", 7, "d", 8);
    FAIL("no exception");
  } catch (const std::invalid_argument& e) {
    REQUIRE(std::string(e.what()) == "moe::Thing::call: x.cols() must equal d (x.cols() = 7, d = 8)");
  }
  REQUIRE_THROWS_AS(moe::detail::throw_numeric("x"), std::domain_error);
}
