#pragma once
// Huge pages for weight buffers (and the workspace's buffers: core/workspace.hpp).
//
// An MoE layer streams hundreds of megabytes of expert weights, and on 4 KiB pages every 4 KiB of
// a row panel needs its own TLB entry (a page walk). Linux gives anonymous memory 2 MiB pages where
// asked (transparent huge pages, `madvise` mode: Debian's default), so weights loaded into buffers
// from HugePageAllocator, or advised with advise_huge_pages before they are first written, need
// 512 times fewer. Measured on one thread (AVX-512, Zen 5): reading 512 MiB, 35 → 42 GB/s; a
// 9 MiB matrix on 16 tokens, out of one 150 MB buffer of 16 such, 816 → 466 µs; the whole layer
// of bench/shapes_bench.cpp (a buffer per matrix), 0–7% faster (MOE_BENCH_HUGE_PAGES=0 compares).
// Elsewhere both are harmless: the allocator still aligns, and the advice does nothing.
#include <cstddef>
#include <cstdint>
#include <new>

#include "config.hpp"

#if defined(__linux__)
#include <sys/mman.h>
#endif

MOE_NAMESPACE_BEGIN

inline constexpr std::size_t kHugePageBytes = std::size_t(2) << 20;

// Asks the kernel to back the whole 2 MiB pages inside [data, data + bytes) with huge pages.
// Takes effect for pages not yet touched (so call it before filling a new buffer; pages already
// written are merged later, if at all, by the kernel's background thread). Returns whether the
// advice was accepted: false off Linux, without transparent huge pages, or when the range holds
// no whole 2 MiB page. Never changes the contents.
inline bool advise_huge_pages(const void* data, std::size_t bytes) noexcept {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  const auto begin = reinterpret_cast<std::uintptr_t>(data);
  const std::uintptr_t first = (begin + kHugePageBytes - 1) & ~std::uintptr_t(kHugePageBytes - 1);
  const std::uintptr_t last = (begin + bytes) & ~std::uintptr_t(kHugePageBytes - 1);
  if (data == nullptr || first >= last) return false;
  return ::madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE) == 0;
#else
  (void)data;
  (void)bytes;
  return false;
#endif
}

// bytes rounded up to whole huge pages where they are at least one (and no more than
// SIZE_MAX - kHugePageBytes); smaller sizes as they are.
inline std::size_t whole_huge_pages(std::size_t bytes) noexcept {
  return bytes < kHugePageBytes ? bytes : (bytes + kHugePageBytes - 1) / kHugePageBytes * kHugePageBytes;
}

// A standard allocator for weight buffers: blocks of 2 MiB or more are 2 MiB aligned, rounded up
// to whole huge pages and advised (advise_huge_pages) before anything touches them; smaller blocks
// are 64-byte aligned, or alignof(T) where that is more. For example
// std::vector<float, moe::HugePageAllocator<float>>.
template <class T>
struct HugePageAllocator {
  using value_type = T;

  HugePageAllocator() noexcept = default;
  template <class U>
  HugePageAllocator(const HugePageAllocator<U>&) noexcept {}  // NOLINT: converting, as allocators must be

  T* allocate(std::size_t n) {
    if (n > (static_cast<std::size_t>(-1) - kHugePageBytes) / sizeof(T)) MOE_THROW(std::bad_array_new_length());
    const std::size_t bytes = n * sizeof(T);
    if (bytes < kHugePageBytes) return static_cast<T*>(::operator new(bytes, std::align_val_t(kSmallAlignment)));
    const std::size_t whole_pages = whole_huge_pages(bytes);
    void* p = ::operator new(whole_pages, std::align_val_t(kLargeAlignment));
    advise_huge_pages(p, whole_pages);
    return static_cast<T*>(p);
  }
  void deallocate(T* p, std::size_t n) noexcept {
    const std::size_t bytes = n * sizeof(T);
    if (bytes < kHugePageBytes) ::operator delete(p, std::align_val_t(kSmallAlignment));
    else ::operator delete(p, std::align_val_t(kLargeAlignment));
  }

  template <class U>
  bool operator==(const HugePageAllocator<U>&) const noexcept {
    return true;
  }
  template <class U>
  bool operator!=(const HugePageAllocator<U>&) const noexcept {
    return false;
  }

 private:
  static constexpr std::size_t kSmallAlignment = alignof(T) > 64 ? alignof(T) : 64;
  static constexpr std::size_t kLargeAlignment = alignof(T) > kHugePageBytes ? alignof(T) : kHugePageBytes;
};

MOE_NAMESPACE_END
