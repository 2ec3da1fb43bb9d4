#pragma once
// Growable, reusable buffers: they grow to the largest size requested and never shrink, so once
// a workspace has seen the largest batch, further use performs no heap allocation.
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "config.hpp"
#include "error.hpp"
#include "memory.hpp"
#include "threads.hpp"
#include "types.hpp"

MOE_NAMESPACE_BEGIN

template <class T>
class Buffer {
 public:
  // Returns storage for at least `n` elements. Contents are unspecified; pointers from earlier
  // calls are invalidated only when the buffer has to grow. A negative `n` throws (cast to a size it
  // would ask for exabytes).
  T* ensure(index_t n) {
    if (n < 0) detail::throw_invalid("Buffer::ensure: n must be >= 0 (n = ", n, ")");
    if (static_cast<std::size_t>(n) > data_.size()) data_.resize(static_cast<std::size_t>(n));
    return data_.data();
  }
  // The storage of the last ensure(); null before the first.
  T* data() noexcept { return data_.data(); }
  const T* data() const noexcept { return data_.data(); }
  std::size_t capacity() const noexcept { return data_.size(); }

 private:
  // 64-byte aligned, and from 2 MiB on on 2 MiB pages (HugePageAllocator): dispatch writes a
  // large batch's rows scattered over the buffer, one TLB miss per row on 4 KiB pages.
  std::vector<T, HugePageAllocator<T>> data_;
};

// `each` elements of `buffer` per thread, for a loop that gives jobs to the threads
// (detail::for_each_with_serial_eigen): one part per OpenMP thread, or a single part when called
// inside a parallel region already, where that loop runs on the calling thread.
template <class T>
class PerThreadScratch {
 public:
  PerThreadScratch(Buffer<T>& buffer, index_t each)
      : nested_(in_parallel()), each_(each), base_(buffer.ensure(each * (nested_ ? 1 : max_threads()))) {}
  // The calling thread's part.
  T* own() const noexcept { return base_ + each_ * (nested_ ? 0 : thread_index()); }

 private:
  bool nested_;
  index_t each_;
  T* base_;
};

// Resizes a std::vector without releasing memory; allocation happens only when it grows past
// its capacity. Used by the routing plan, whose arrays are reused across batches.
template <class V>
void resize_keep(V& v, index_t n) {
  v.resize(static_cast<std::size_t>(n));
}

// How a forward_train laid out what it saved for backward, and after which route. forward_train
// records it in the workspace; backward works out the layout its own layer would have left for
// the workspace's routing and refuses a workspace whose layout differs (one filled by another
// layer, by this one before set_shared_experts, or routed into since) rather than read past its
// buffers or pair one batch's routing with another's saved values.
struct TrainingLayout {
  index_t tokens = -1;
  index_t d_model = -1;
  index_t experts = -1;           // routed experts
  index_t slots_per_expert = -1;  // SoftMoELayer; 0 for MoELayer
  index_t rows = -1;              // expert input rows: assignments (MoELayer) or slot rows (SoftMoELayer)
  index_t saved = -1;             // values the routed experts saved
  index_t shared_experts = -1;    // MoELayer's shared experts; 0 for SoftMoELayer
  index_t shared_saved = -1;      // values the shared experts saved
  std::uint64_t route = 0;        // the routing's route_count()
  std::uint64_t router = 0;       // the layer's router's config_fingerprint()

  bool operator==(const TrainingLayout& o) const noexcept {
    return tokens == o.tokens && d_model == o.d_model && experts == o.experts && slots_per_expert == o.slots_per_expert &&
           rows == o.rows && saved == o.saved && shared_experts == o.shared_experts && shared_saved == o.shared_saved &&
           route == o.route && router == o.router;
  }
  bool operator!=(const TrainingLayout& o) const noexcept { return !(*this == o); }
};

namespace detail {

inline std::string describe(const TrainingLayout& l) {
  return concat("tokens = ", l.tokens, ", d_model = ", l.d_model, ", experts = ", l.experts, ", slots per expert = ",
                l.slots_per_expert, ", rows = ", l.rows, ", saved values = ", l.saved, ", shared experts = ", l.shared_experts,
                ", shared saved values = ", l.shared_saved, ", route = ", l.route, ", router fingerprint = ", l.router);
}

// The fields in which two layouts differ, "name (workspace a, this layer b)" each, so that a reader
// need not compare the two whole layouts.
inline std::string describe_difference(const TrainingLayout& saved, const TrainingLayout& layer) {
  std::string out;
  const auto field = [&out](const char* name, auto in_workspace, auto in_layer) {
    if (in_workspace != in_layer) out += concat(out.empty() ? "" : ", ", name, " (workspace ", in_workspace, ", this layer ", in_layer, ")");
  };
  field("tokens", saved.tokens, layer.tokens);
  field("d_model", saved.d_model, layer.d_model);
  field("experts", saved.experts, layer.experts);
  field("slots per expert", saved.slots_per_expert, layer.slots_per_expert);
  field("rows", saved.rows, layer.rows);
  field("saved values", saved.saved, layer.saved);
  field("shared experts", saved.shared_experts, layer.shared_experts);
  field("shared saved values", saved.shared_saved, layer.shared_saved);
  field("route", saved.route, layer.route);
  field("router fingerprint", saved.router, layer.router);
  return out;
}

inline void check_training_layout(const char* where, const TrainingLayout& saved, const TrainingLayout& layer) {
  if (saved != layer) {
    throw_invalid(where, ": the workspace's forward_train state does not fit this layer (it comes from another layer or from this "
                  "one before a change such as set_shared_experts, or was routed into since); they differ in ",
                  describe_difference(saved, layer), " (workspace: ", describe(saved), "; this layer: ", describe(layer), ")");
  }
}

}  // namespace detail

MOE_NAMESPACE_END
