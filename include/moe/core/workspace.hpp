#pragma once
// Growable, reusable buffers: they grow to the largest size requested and never shrink, so once
// a workspace has seen the largest batch, further use performs no heap allocation.
#include <cstddef>
#include <vector>

#include "config.hpp"
#include "memory.hpp"
#include "types.hpp"

MOE_NAMESPACE_BEGIN

template <class T>
class Buffer {
 public:
  // Returns storage for at least `n` elements. Contents are unspecified; pointers from earlier
  // calls are invalidated only when the buffer has to grow.
  T* ensure(index_t n) {
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

// Resizes a std::vector without releasing memory; allocation happens only when it grows past
// its capacity. Used by the routing plan, whose arrays are reused across batches.
template <class V>
void resize_keep(V& v, index_t n) {
  v.resize(static_cast<std::size_t>(n));
}

MOE_NAMESPACE_END
