// libFuzzer target: build_routing (routing/routing.hpp) from random token-major choices, with
// expert ids that may be out of range, duplicate choices, empty tokens and experts, non-finite
// weights, and a plan reused across calls of different sizes.
//
// Checked: moe::invalid_argument exactly when an expert id is outside [0, E); otherwise the
// plan's structure, every choice present exactly once at its rank with its weight (bit for bit),
// `dropped`/`dropped_weight`/`rerouted` left untouched, and a reused plan equal to a fresh one.
#include <cstdint>
#include <vector>

#include <moe/routing/routing.hpp>

#include "fuzz_common.hpp"

namespace {

using namespace moe_fuzz;

template <class T>
struct Choices {
  index_t num_tokens = 0;
  index_t num_experts = 0;
  std::vector<index_t> begin;   // [T + 1]
  std::vector<index_t> expert;  // [C]
  std::vector<T> weight;        // [C]
  bool in_range = true;
  bool distinct = true;         // no token chose one expert twice
};

template <class T>
Choices<T> decode(FuzzedDataProvider& fdp) {
  Choices<T> c;
  c.num_experts = fdp.ConsumeIntegralInRange<int>(0, 15) == 0 ? fdp.ConsumeIntegralInRange<index_t>(0, 1)
                                                                : fdp.ConsumeIntegralInRange<index_t>(1, 32);
  c.num_tokens = fdp.ConsumeIntegralInRange<index_t>(0, 64);
  const index_t max_k = fdp.ConsumeIntegralInRange<index_t>(0, 8);
  const int id_mode = fdp.ConsumeIntegralInRange<int>(0, 3);  // 0: bytes, 1: seeded, 2: seeded distinct, 3: with bad ids
  Rng rng{fdp.ConsumeIntegral<std::uint64_t>()};
  c.begin.push_back(0);
  for (index_t t = 0; t < c.num_tokens; ++t) {
    const index_t k = max_k == 0 ? 0 : static_cast<index_t>(fdp.ConsumeIntegralInRange<index_t>(0, max_k));
    std::vector<char> used(sz(std::max<index_t>(c.num_experts, 1)), 0);
    for (index_t j = 0; j < k; ++j) {
      index_t e = 0;
      if (id_mode == 0) {
        e = fdp.ConsumeIntegralInRange<index_t>(0, std::max<index_t>(c.num_experts - 1, 0));
      } else if (id_mode == 3 && fdp.ConsumeIntegralInRange<int>(0, 15) == 0) {
        static const index_t bad[] = {-1, -2, 0, 1};
        const index_t which = fdp.ConsumeIntegralInRange<index_t>(0, 3);
        e = which < 2 ? bad[which] : c.num_experts + bad[which];  // -1, -2, E, E + 1
      } else {
        e = c.num_experts > 0 ? static_cast<index_t>(rng.next() % static_cast<std::uint64_t>(c.num_experts)) : 0;
        if (id_mode == 2 && c.num_experts > 0) {
          for (index_t step = 0; step < c.num_experts && used[sz(e)]; ++step) e = (e + 1) % c.num_experts;
          if (used[sz(e)]) break;  // every expert taken
        }
      }
      if (e < 0 || e >= c.num_experts) {
        c.in_range = false;
      } else {
        c.distinct = c.distinct && !used[sz(e)];
        used[sz(e)] = 1;
      }
      c.expert.push_back(e);
    }
    c.begin.push_back(static_cast<index_t>(c.expert.size()));
  }
  c.weight.resize(c.expert.size());
  bool moderate = true;
  fill(fdp, c.weight.data(), static_cast<index_t>(c.weight.size()), true, moderate);
  return c;
}

template <class T>
void check(const Choices<T>& c, const moe::Routing<T>& plan) {
  moe::Routing<T> without_router_lists = plan;  // the sentinel lists are not this plan's
  without_router_lists.dropped.clear();
  without_router_lists.dropped_weight.clear();
  without_router_lists.rerouted.clear();
  check_plan(without_router_lists, c.num_tokens, c.num_experts, c.distinct);
  MOE_FUZZ_CHECK(plan.num_assignments() == static_cast<index_t>(c.expert.size()));
  // Each choice is at its rank in the token CSR, in its expert's block, with its weight.
  std::vector<index_t> count(sz(c.num_experts), 0);
  for (const index_t e : c.expert) ++count[sz(e)];
  for (index_t e = 0; e < c.num_experts; ++e) MOE_FUZZ_CHECK(plan.tokens_of(e) == count[sz(e)]);
  for (index_t t = 0; t < c.num_tokens; ++t) {
    MOE_FUZZ_CHECK(plan.token_begin[sz(t)] == c.begin[sz(t)]);
    for (index_t q = c.begin[sz(t)]; q < c.begin[sz(t + 1)]; ++q) {
      const index_t a = plan.assignment[sz(q)];
      MOE_FUZZ_CHECK(plan.token[sz(a)] == t);
      MOE_FUZZ_CHECK(plan.expert_of_assignment(a) == c.expert[sz(q)]);
      MOE_FUZZ_CHECK(same_value(plan.weight[sz(a)], c.weight[sz(q)]));
    }
  }
}

template <class T>
void run(FuzzedDataProvider& fdp) {
  const Choices<T> first = decode<T>(fdp);
  const Choices<T> second = decode<T>(fdp);
  {
    char text[160];
    std::snprintf(text, sizeof text, "%s first T=%td E=%td C=%zu in_range=%d; second T=%td E=%td C=%zu in_range=%d",
                  sizeof(T) == 4 ? "float" : "double", first.num_tokens, first.num_experts, first.expert.size(),
                  int(first.in_range), second.num_tokens, second.num_experts, second.expert.size(), int(second.in_range));
    case_description() = text;
  }

  // The router owns these; build_routing must leave them alone.
  moe::Routing<T> plan;
  plan.dropped = {3, 1};
  plan.dropped_weight = {T(0.5), T(-2)};
  plan.rerouted = {7};
  const moe::Routing<T> sentinel = plan;

  moe::Routing<T> reused;
  for (const Choices<T>* c : {&first, &second}) {
    moe::Routing<T> fresh = sentinel;
    bool threw = false;
    try {
      moe::build_routing(c->num_tokens, c->num_experts, c->begin.data(), c->expert.data(), c->weight.data(), fresh);
    } catch (const moe::invalid_argument&) {
      threw = true;
    }
    MOE_FUZZ_CHECK(threw == !c->in_range);
    if (threw) continue;
    check(*c, fresh);
    MOE_FUZZ_CHECK(fresh.dropped == sentinel.dropped && same_values(fresh.dropped_weight, sentinel.dropped_weight) &&
                   fresh.rerouted == sentinel.rerouted);
    // A plan reused after another batch (bigger or smaller) ends up identical to a fresh one.
    reused.dropped = sentinel.dropped;
    reused.dropped_weight = sentinel.dropped_weight;
    reused.rerouted = sentinel.rerouted;
    moe::build_routing(c->num_tokens, c->num_experts, c->begin.data(), c->expert.data(), c->weight.data(), reused);
    MOE_FUZZ_CHECK(same_plan(reused, fresh));
  }
}

}  // namespace

MOE_FUZZ_FLOAT_AND_DOUBLE(run)
