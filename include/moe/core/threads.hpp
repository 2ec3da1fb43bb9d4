#pragma once
// Threads. Define MOE_USE_OPENMP (the moe::openmp CMake target does) to split moe's kernels over
// OpenMP threads; each output element is still computed by one thread in a fixed order, so the
// bits do not depend on the thread count.
#include <algorithm>
#include <atomic>
#include <cstddef>
#include <exception>
#include <utility>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "config.hpp"

MOE_NAMESPACE_BEGIN

// Threads a parallel kernel may use; scratch sizes scale with it.
inline int max_threads() noexcept {
#if defined(MOE_USE_OPENMP)
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// This thread's number in the innermost parallel region (0 outside one).
inline int thread_index() noexcept {
#if defined(MOE_USE_OPENMP)
  return omp_get_thread_num();
#else
  return 0;
#endif
}

// Whether a parallel region is already running: kernels called inside one stay on their thread.
inline bool in_parallel() noexcept {
#if defined(MOE_USE_OPENMP)
  return omp_in_parallel() != 0;
#else
  return false;
#endif
}

// Whether a kernel asked to run `parallel` opens a parallel region: only with more than one thread
// to give it and none running already. A region costs its setup even on one thread (1.2–1.3 µs
// measured for a one-thread `omp parallel for`, ~0.5 µs for `omp parallel if (false)`), as much
// as copying a hundred rows: dispatch's 128 rows of 3 KiB took 6.1 µs with it, 5.6 without.
inline bool open_region(bool parallel) noexcept { return parallel && max_threads() > 1 && !in_parallel(); }

// Whether a product of m tokens over `matrices` weights of n × k elements is worth a second
// thread: from 2^20 multiply-adds, or from 512 KiB of weights (read from memory, cold, in a model).
// Below both, a region's start and the second core's fetch of the tokens cost more than half the
// product saves. 1 → 2 threads, medians of 200 interleaved (bench/README, "Session 41"):
// - a router's x · Wᵀ (simd/matmul.hpp): 2^20 multiply-adds on 256 KiB took 0.72–0.78 as long,
//   cold or warm; 512 KiB at T = 1, 0.83–0.86 cold (1.00–1.06 warm); but 64 KiB at T = 16 took 1.21,
//   and 256 KiB at T = 1 0.93–0.96 cold and 1.45–1.53 warm (S2's router: 64 × 1024 floats);
// - the products of backward and Soft MoE (simd/matmul_nn.hpp): 32 KiB at 2^17 multiply-adds
//   took 1.12–1.40 as long cold, 1.58–1.99 warm, and 4 KiB at 2^16 2.14 warm; 1 MiB at 2^18,
//   0.61–0.74 cold.
inline constexpr std::size_t kThreadMultiplyAdds = std::size_t(1) << 20;
inline constexpr std::size_t kThreadWeightBytes = 512 * 1024;
template <class T>
bool worth_threads(std::size_t m, std::size_t n, std::size_t k, std::size_t matrices = 1) noexcept {
  return matrices * m * n * k >= kThreadMultiplyAdds || matrices * n * k * sizeof(T) >= kThreadWeightBytes;
}

// body(i) for i in [0, n): split over the OpenMP threads (static schedule) when open_region(parallel),
// else in a plain loop.
template <class Body>
void parallel_for(std::ptrdiff_t n, bool parallel, Body&& body) {
#if defined(MOE_USE_OPENMP)
  if (open_region(parallel)) {
#pragma omp parallel for schedule(static)
    for (std::ptrdiff_t i = 0; i < n; ++i) body(i);
    return;
  }
#else
  (void)parallel;
#endif
  for (std::ptrdiff_t i = 0; i < n; ++i) body(i);
}

// body(i) for i in [0, n), split over the OpenMP threads when open_region(parallel) into one
// contiguous range per thread, the ranges' costs as equal as whole items allow. cost_before(i) is
// the cost of items [0, i): non-decreasing, cost_before(0) = 0. Meant for items of uneven cost
// (the tokens of an expert-choice plan, which have 0 to E assignments each), which parallel_for's
// static schedule would share out by count. Else a plain loop.
template <class CostBefore, class Body>
void parallel_for_balanced(std::ptrdiff_t n, bool parallel, CostBefore&& cost_before, Body&& body) {
#if defined(MOE_USE_OPENMP)
  if (n > 1 && open_region(parallel)) {
    const std::ptrdiff_t total = cost_before(n);
#pragma omp parallel
    {
      const int parts = omp_get_num_threads(), part = omp_get_thread_num();
      // The first item whose cost_before reaches the share of threads [0, p): a binary search.
      auto boundary = [&](int p) {
        if (p == parts) return n;
        const std::ptrdiff_t target = total * p / parts;
        std::ptrdiff_t lo = 0, hi = n;
        while (lo < hi) {
          const std::ptrdiff_t mid = lo + (hi - lo) / 2;
          if (cost_before(mid) < target) {
            lo = mid + 1;
          } else {
            hi = mid;
          }
        }
        return lo;
      };
      const std::ptrdiff_t end = boundary(part + 1);
      for (std::ptrdiff_t i = boundary(part); i < end; ++i) body(i);
    }
    return;
  }
#else
  (void)parallel;
  (void)cost_before;
#endif
  for (std::ptrdiff_t i = 0; i < n; ++i) body(i);
}

// body(i, next) for i in [0, n), where `next` is the item this thread runs after i (n if none),
// so that body can fetch its data ahead. Split over the OpenMP threads when open_region(parallel):
// thread t starts on item t, and each thread claims its next item before it starts the current
// one (a dynamic schedule, one item ahead: a thread slowed by another process on its core does not
// hold up the rest); else a plain loop. (Had the first items been claimed too, the first thread to
// wake could take two of two items, the second finding none: a product of two panels then ran on
// one thread.)
template <class Body>
void for_each_ahead(std::ptrdiff_t n, bool parallel, Body&& body) {
#if defined(MOE_USE_OPENMP)
  if (n > 1 && open_region(parallel)) {
    std::atomic<std::ptrdiff_t> claimed{0};
#pragma omp parallel
    {
      const std::ptrdiff_t team = omp_get_num_threads();
      std::ptrdiff_t i = omp_get_thread_num();
      while (i < n) {
        const std::ptrdiff_t next = team + claimed.fetch_add(1, std::memory_order_relaxed);
        body(i, std::min(next, n));
        i = next;
      }
    }
    return;
  }
#else
  (void)parallel;
#endif
  for (std::ptrdiff_t i = 0; i < n; ++i) body(i, i + 1);
}

namespace detail {
// Runs f() with Eigen's products on one thread. An Eigen GEMM given more than one OpenMP thread
// re-blocks its depth for the thread count, so its rounding — and so a gradient's bits — would
// depend on the thread count. Eigen reads the count from omp_get_max_threads(), which this
// thread's omp_set_num_threads(1) lowers until f() returns or throws; moe's own kernels inside f()
// then stay on this thread too. (A one-thread parallel region did this before, but libgomp
// allocates and frees a one-thread team on every region: a malloc per backward, once warm.)
template <class F>
void with_serial_eigen(F&& f) {
#if defined(_OPENMP)
  if (omp_get_max_threads() > 1 && !omp_in_parallel()) {
    struct RestoreThreads {
      int threads;
      ~RestoreThreads() { omp_set_num_threads(threads); }
    } const restore{omp_get_max_threads()};
    omp_set_num_threads(1);
    std::forward<F>(f)();
    return;
  }
#endif
  std::forward<F>(f)();
}

// body(i) for i in [0, n) on up to max_threads() OpenMP threads, each taking the next i as it frees up
// (a dynamic schedule: list the largest items first). Eigen's products do not split inside the
// region (Eigen checks omp_get_num_threads()), so they keep their one-thread blocking, and their
// bits. Without OpenMP, with one thread or one item, or inside a parallel region already, a plain
// loop under with_serial_eigen. On the threads every item runs and the first exception thrown
// reaches the caller; the plain loop stops at it. (Eigen::setNbThreads(n > 1), if the program calls it, overrides the thread count that
// with_serial_eigen sets: Eigen's products outside the region would then split.)
template <class Body>
void for_each_with_serial_eigen(std::ptrdiff_t n, Body&& body) {
#if defined(MOE_USE_OPENMP)
  if (n > 1 && open_region(true)) {
    std::exception_ptr error;
#pragma omp parallel num_threads(static_cast<int>(std::min<std::ptrdiff_t>(max_threads(), n)))
    {
      omp_set_num_threads(1);
#pragma omp for schedule(dynamic, 1)
      for (std::ptrdiff_t i = 0; i < n; ++i) {
#if defined(__cpp_exceptions)
        try {
          body(i);
        } catch (...) {
#pragma omp critical(moe_for_each_with_serial_eigen)
          if (!error) error = std::current_exception();
        }
#else
        body(i);  // (built without exceptions: MOE_THROW does not return)
#endif
      }
    }
    if (error) std::rethrow_exception(error);
    return;
  }
#endif
  with_serial_eigen([&] {
    for (std::ptrdiff_t i = 0; i < n; ++i) body(i);
  });
}
}  // namespace detail

MOE_NAMESPACE_END
