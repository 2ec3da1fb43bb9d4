#pragma once
// Growable, reusable buffers: they grow to the largest size requested and never shrink, so once
// a workspace has seen the largest batch, further use performs no heap allocation.
#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#include "config.hpp"
#include "error.hpp"
#include "fingerprint.hpp"
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

namespace detail {
// A layout's router fingerprint: compared as bits, shown in hex as router backward's messages show it.
struct FingerprintField {
  std::uint64_t bits;
  bool operator==(FingerprintField o) const noexcept { return bits == o.bits; }
  bool operator!=(FingerprintField o) const noexcept { return bits != o.bits; }
};
inline std::string shown(FingerprintField f) { return fingerprint_text(f.bits); }
}  // namespace detail

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
  index_t pass_through = -1;      // 1 when dropped tokens pass through (MoELayer), else 0
  std::uint64_t route = 0;        // the routing's route_count()
  std::uint64_t router = 0;       // the layer's router's config_fingerprint()

  // f(name, this layout's value, o's value) for every field in order: the one list that comparing
  // and describing layouts go through.
  template <class F>
  void for_each_field(const TrainingLayout& o, F&& f) const {
    f("tokens", tokens, o.tokens);
    f("d_model", d_model, o.d_model);
    f("experts", experts, o.experts);
    f("slots per expert", slots_per_expert, o.slots_per_expert);
    f("rows", rows, o.rows);
    f("saved values", saved, o.saved);
    f("shared experts", shared_experts, o.shared_experts);
    f("shared saved values", shared_saved, o.shared_saved);
    f("dropped tokens pass through", pass_through, o.pass_through);
    f("route", route, o.route);
    f("router fingerprint", detail::FingerprintField{router}, detail::FingerprintField{o.router});
  }

  bool operator==(const TrainingLayout& o) const noexcept {
    bool same = true;
    for_each_field(o, [&same](const char*, auto mine, auto theirs) { same = same && mine == theirs; });
    return same;
  }
  bool operator!=(const TrainingLayout& o) const noexcept { return !(*this == o); }
};

namespace detail {

// A layout field as text: "none" for the -1 of an unset field or of sizes that cannot be laid
// over this layer's experts.
template <class V>
std::string shown(V value) {
  if constexpr (std::is_signed<V>::value) {
    if (value < 0) return "none";
  }
  return concat(value);
}

inline std::string describe(const TrainingLayout& l) {
  std::string out;
  l.for_each_field(l, [&out](const char* name, auto value, auto) { out += concat(out.empty() ? "" : ", ", name, " = ", shown(value)); });
  return out;
}

// The fields in which two layouts differ, "name (workspace a, this layer b)" each, so that a reader
// need not compare the two whole layouts.
inline std::string describe_difference(const TrainingLayout& saved, const TrainingLayout& layer) {
  std::string out;
  saved.for_each_field(layer, [&out](const char* name, auto in_workspace, auto in_layer) {
    if (in_workspace != in_layer) {
      out += concat(out.empty() ? "" : ", ", name, " (workspace ", shown(in_workspace), ", this layer ", shown(in_layer), ")");
    }
  });
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
