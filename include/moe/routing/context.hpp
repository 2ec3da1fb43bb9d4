#pragma once
// What a router may need about a batch besides its activations.
//
// Routing groups (README, "Guarantees"): routers whose choices depend on other tokens (capacity,
// expert-choice, soft) make those choices within each group only, so a group's output is
// bit-identical whatever else shares the batch. Give one group per sequence or per request.
#include <cstdint>
#include <vector>

#include "../core/error.hpp"
#include "../core/types.hpp"

MOE_NAMESPACE_BEGIN

struct RouteContext {
  // Group boundaries [num_groups + 1]: group g is tokens [group_begin[g], group_begin[g+1]),
  // starting at 0 and ending at T. Null: the whole batch is one group.
  const index_t* group_begin = nullptr;
  index_t num_groups = 0;
  // Token ids [T] (vocabulary ids): the key of hash routing and of training jitter. Null where
  // the router does not need them.
  const std::int64_t* token_ids = nullptr;
  // Training-only behaviour (jitter) is on when true.
  bool training = false;
  // Distinguishes layers for per-layer random streams (training jitter). Hash routing does not
  // use it: give each layer's HashRouter its own seed.
  std::uint64_t layer_id = 0;

  // Views `boundaries` (no copy): it must outlive every use of the context. A braced temporary,
  // as in forward(x, RouteContext::with_groups({0, 4, 9}), y, ws), lives exactly long enough;
  // a context stored from one dangles.
  static RouteContext with_groups(const std::vector<index_t>& boundaries) {
    RouteContext c;
    c.group_begin = boundaries.data();
    c.num_groups = static_cast<index_t>(boundaries.size()) - 1;
    if (boundaries.empty()) detail::throw_invalid("RouteContext::with_groups: boundaries must hold at least one element (0)");
    return c;
  }
};

// The group boundaries of a batch of `num_tokens`, checked to partition [0, num_tokens).
// Without groups in the context this is the single group {0, num_tokens}.
class GroupBounds {
 public:
  GroupBounds(const RouteContext& ctx, index_t num_tokens, const char* where) {
    if (ctx.group_begin == nullptr && ctx.num_groups != 0) {
      detail::throw_invalid(where, ": group_begin is null but num_groups = ", ctx.num_groups,
                            " (RouteContext::with_groups sets both; leave both unset for one group)");
    }
    // No groups, or none over an empty batch (with_groups({0})): the single group {0, num_tokens}.
    if (ctx.group_begin == nullptr || (ctx.num_groups == 0 && num_tokens == 0 && ctx.group_begin[0] == 0)) {
      whole_[0] = 0;
      whole_[1] = num_tokens;
      begin_ = whole_;
      count_ = 1;
      return;
    }
    begin_ = ctx.group_begin;
    count_ = ctx.num_groups;
    // (With num_groups >= 0 the boundaries hold num_groups + 1 elements, so group_begin[0] exists.)
    if (count_ >= 0 && begin_[0] != 0) detail::throw_invalid(where, ": group_begin[0] must be 0 (group_begin[0] = ", begin_[0], ")");
    if (count_ < 1) {
      // (An empty batch reaches here only with num_groups < 0: 0 groups over it pass above.)
      detail::throw_invalid(where, num_tokens > 0 ? ": num_groups must be at least 1 for a non-empty batch" : ": num_groups must not be negative",
                            " (num_groups = ", count_, ", tokens = ", num_tokens, ")");
    }
    for (index_t g = 0; g < count_; ++g) {
      if (begin_[g + 1] < begin_[g]) {
        detail::throw_invalid(where, ": group boundaries must not decrease (group_begin[", g, "] = ", begin_[g],
                              ", group_begin[", g + 1, "] = ", begin_[g + 1], ")");
      }
    }
    if (begin_[count_] != num_tokens) {
      detail::throw_invalid(where, ": groups must cover the batch (group_begin[num_groups] = ", begin_[count_],
                            ", tokens = ", num_tokens, ")");
    }
  }
  index_t count() const noexcept { return count_; }
  index_t begin(index_t g) const noexcept { return begin_[g]; }
  index_t end(index_t g) const noexcept { return begin_[g + 1]; }
  index_t size(index_t g) const noexcept { return begin_[g + 1] - begin_[g]; }

 private:
  index_t whole_[2] = {0, 0};
  const index_t* begin_ = nullptr;
  index_t count_ = 0;
};

MOE_NAMESPACE_END
