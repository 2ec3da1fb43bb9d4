#pragma once
// The only header that includes xsimd. It names the default architecture and hides the
// differences between xsimd versions (Debian 12 ships 8.1: `hadd`, no `reduce_max`).
//
// Every kernel takes the architecture as its first argument (a tag such as xsimd::fma3<xsimd::avx2>{}),
// so two translation units built with different -m flags never share one inline kernel body.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <type_traits>
#include <utility>

#include "../core/config.hpp"

MOE_THIRD_PARTY_BEGIN
#include <xsimd/xsimd.hpp>
MOE_THIRD_PARTY_END

#if XSIMD_VERSION_MAJOR != 8 || XSIMD_VERSION_MINOR < 1
#error "moe needs xsimd 8.x (8.1 or later within 8): it uses xsimd 8's API, and xsimd 9 removed xsimd::hadd"
#endif

MOE_NAMESPACE_BEGIN

#if XSIMD_WITH_AVX512F
namespace detail {  // (moe::detail, not a simd::detail that would hide it from the kernels)
// _mm512_shuffle_f32x4 and _mm512_shuffle_ps in their masked forms with every lane selected: the
// plain forms pass GCC 12's _mm512_undefined_ps, which -O3 -Wuninitialized reports.
template <int Imm>
inline __m512 shuffle_quarters(__m512 a, __m512 b) noexcept {
  return _mm512_mask_shuffle_f32x4(a, static_cast<__mmask16>(0xFFFF), a, b, Imm);
}
template <int Imm>
inline __m512 shuffle_within_quarters(__m512 a, __m512 b) noexcept {
  return _mm512_mask_shuffle_ps(a, static_cast<__mmask16>(0xFFFF), a, b, Imm);
}
}  // namespace detail
#endif

namespace simd {

// The best architecture this translation unit was compiled for (-march / -m flags).
using default_arch = xsimd::default_arch;

template <class T, class Arch>
using batch = xsimd::batch<T, Arch>;

template <class T, class Arch>
constexpr std::size_t lanes() noexcept {
  return batch<T, Arch>::size;
}

// Vector registers of an architecture: 32 with AVX-512, 16 with AVX2 and SSE. Register blocks
// are sized by it.
template <class Arch>
constexpr std::size_t vector_registers() noexcept {
  return std::is_base_of<xsimd::avx512f, Arch>::value ? 32 : 16;
}

inline constexpr std::size_t kPageBytes = 4096;  // where the hardware prefetcher stops

// A read prefetch into every cache level (Locality 3), or not into L1 (2: for lines read later, not
// by the loop that fetches them); with ForWrite, of a line that will be read and then written
// (PREFETCHW where the target has it).
template <int Locality = 3, bool ForWrite = false>
inline void prefetch(const void* p) noexcept {
#if defined(__GNUC__)
  __builtin_prefetch(p, ForWrite ? 1 : 0, Locality);
#else
  (void)p;
#endif
}

// A prefetch of a line that will be read and then written.
inline void prefetch_for_write(const void* p) noexcept { prefetch<3, true>(p); }

// Whether store_line writes a whole cache line past the caches: where a vector is one 64-byte line
// (AVX-512). A line written whole and not read soon is then sent to memory without first being read
// from it, as a plain store's line is (on the Intel Xeon, 256 MiB written: 9.4 GB/s with plain
// stores, 21.7 with these). Not with AVX2, a line in two stores: on an AMD EPYC (Zen 3), one thread
// wrote 256 MiB at 21.2–22.0 GB/s with them against 15.4–16.2 with plain stores, yet a training
// step's backward with the experts' weight gradients so streamed took 1.07–1.35× as long
// (backward_bench, S1, T = 16–512, 2 threads, two rounds; session 58).
template <class Arch, class T>
constexpr bool streams_lines() noexcept {
#if XSIMD_WITH_AVX512F
  return std::is_base_of<xsimd::avx512f, Arch>::value && (std::is_same<T, float>::value || std::is_same<T, double>::value);
#else
  return false;
#endif
}

// Stores v at p, 64-byte aligned: a non-temporal store where streams_lines, else a plain one. Other
// threads may read such lines only after the writer's store_fence.
template <class Arch, class T>
inline void store_line(const batch<T, Arch>& v, T* p) noexcept {
#if XSIMD_WITH_AVX512F
  if constexpr (streams_lines<Arch, T>() && std::is_same<T, float>::value) {
    _mm512_stream_ps(p, v);
    return;
  } else if constexpr (streams_lines<Arch, T>()) {
    _mm512_stream_pd(p, v);
    return;
  }
#endif
  v.store_aligned(p);
}

// Orders this thread's non-temporal stores (store_line) before its later stores, such as an OpenMP
// barrier's.
inline void store_fence() noexcept {
#if XSIMD_WITH_SSE2
  _mm_sfence();
#endif
}

// Whether Arch multiplies and adds with one rounding. For other architectures xsimd::fma is
// x * y + z, which the compiler may fuse where the target has FMA (GCC's default
// -ffp-contract=fast) in one kernel and not in another.
template <class Arch>
constexpr bool has_fma() noexcept {
  return std::is_base_of<xsimd::avx512f, Arch>::value || std::is_base_of<xsimd::fma3<xsimd::avx2>, Arch>::value ||
         std::is_base_of<xsimd::fma3<xsimd::avx>, Arch>::value || std::is_base_of<xsimd::fma3<xsimd::sse4_2>, Arch>::value ||
         std::is_base_of<xsimd::fma4, Arch>::value;
}

// Whether this translation unit targets x86 FMA instructions (-mfma, -march=haswell or later).
constexpr bool target_has_fma() noexcept {
  return XSIMD_WITH_FMA3_SSE || XSIMD_WITH_FMA3_AVX || XSIMD_WITH_FMA3_AVX2 || XSIMD_WITH_FMA4 || XSIMD_WITH_AVX512F;
}

// x · y + z, fused where Arch has FMA (else rounded after the multiply and after the add, as
// madd below). The kernels' multiply-adds all go through here, so that a token's outputs do not
// depend on which kernel its batch size picks: with a tag without FMA in a translation unit whose
// target has it, the compiler would fuse some of them and not others.
template <class T, class Arch>
batch<T, Arch> fma(const batch<T, Arch>& x, const batch<T, Arch>& y, const batch<T, Arch>& z) noexcept {
  static_assert(has_fma<Arch>() || !target_has_fma(),
                "moe: this translation unit targets FMA, so pass an architecture tag with FMA (simd::default_arch, "
                "xsimd::fma3<xsimd::avx2>, xsimd::avx512f...): with a tag without it, results would depend on the batch size");
#if XSIMD_WITH_AVX512F
  // xsimd 8.1 has no AVX-512 fma: its generic x * y + z is fused only where the compiler contracts
  // it (g++'s gnu++17, not -std=c++17), so call the instruction.
  if constexpr (std::is_base_of<xsimd::avx512f, Arch>::value && std::is_same<T, float>::value) {
    return batch<T, Arch>(_mm512_fmadd_ps(x, y, z));
  } else if constexpr (std::is_base_of<xsimd::avx512f, Arch>::value && std::is_same<T, double>::value) {
    return batch<T, Arch>(_mm512_fmadd_pd(x, y, z));
  } else {
    return xsimd::fma(x, y, z);
  }
#else
  return xsimd::fma(x, y, z);
#endif
}

// x · y + z for one scalar, rounded as simd::fma rounds a lane: once where the target has FMA,
// else twice, after the multiply and after the add (xsimd's SSE and AVX lanes). The kernels' scalar
// tails use it, so that an element rounds alike in a lane and in a tail. (std::fma rounds once on
// every target, where it has no FMA instruction by a library call.)
template <class T>
MOE_ALWAYS_INLINE T madd(T x, T y, T z) noexcept {
#if defined(__ARM_FEATURE_FMA)
  constexpr bool fused = true;  // (xsimd's NEON fma is fused there; has_fma() names x86 tags only)
#else
  constexpr bool fused = target_has_fma();
#endif
  if constexpr (fused) {
    return std::fma(x, y, z);
  } else {
    return x * y + z;
  }
}

template <class T, class Arch>
T reduce_add(const batch<T, Arch>& b) noexcept {
  return xsimd::hadd(b);
}

// out[i] = reduce_add(acc[i]) for i < N, bit for bit: a register block's dots. With 16-lane float
// batches (AVX-512) and 8 or more accumulators, the sums are taken sixteen at a time, transposed as
// they are added: each step adds the same pairs of lanes as xsimd's hadd (lane l + lane l + 8, then
// + l + 4, then the pairs (0, 1) and (2, 3), then those two sums), so every sum rounds as before,
// in 47 instructions per 16 sums where hadd takes 7 (two of them vhaddps) for each. One S2 expert
// (both products, old and new headers in one binary, 7–32 tokens): 0.91–1.00 of the time with its
// weights in cache, 0.93–1.03 cold (bench/README.md, "Session 33"). Fewer than 8 accumulators (a
// panel's leftover rows) keep hadd: padded to 16, the streamed 3-token blocks ran slower in a trial.
template <std::size_t N, class T, class Arch>
MOE_ALWAYS_INLINE void reduce_add_each(const batch<T, Arch>* acc, T* out) noexcept {
#if XSIMD_WITH_AVX512F
  if constexpr (N >= 8 && std::is_base_of<xsimd::avx512f, Arch>::value && std::is_same<T, float>::value) {
    for (std::size_t g = 0; g < N; g += 16) {
      // Slot i takes accumulator g + 4 (i % 4) + i / 4 (or zeros past N): the steps below leave
      // slot q + 4m's sum in lane 4q + m, so each sum lands in its own accumulator's lane.
      __m512 v[16];
      MOE_UNROLL for (std::size_t i = 0; i < 16; ++i) {
        const std::size_t slot = g + 4 * (i % 4) + i / 4;
        v[i] = slot < N ? static_cast<__m512>(acc[slot]) : _mm512_setzero_ps();
      }
      // Lane l + lane l + 8: two accumulators' 8 partial sums per vector.
      MOE_UNROLL for (std::size_t i = 0; i < 8; ++i) {
        const __m512 a = v[2 * i], b = v[2 * i + 1];
        v[i] = _mm512_add_ps(detail::shuffle_quarters<0xEE>(a, b), detail::shuffle_quarters<0x44>(a, b));
      }
      // + lane l + 4: four accumulators' 4 partial sums, one per 128-bit quarter.
      MOE_UNROLL for (std::size_t i = 0; i < 4; ++i) {
        const __m512 a = v[2 * i], b = v[2 * i + 1];
        v[i] = _mm512_add_ps(detail::shuffle_quarters<0x88>(a, b), detail::shuffle_quarters<0xDD>(a, b));
      }
      // Lanes (0 + 1) and (2 + 3) of each quarter, twice: the pairs, then the pairs' sums.
      MOE_UNROLL for (std::size_t i = 0; i < 2; ++i) {
        const __m512 a = v[2 * i], b = v[2 * i + 1];
        v[i] = _mm512_add_ps(detail::shuffle_within_quarters<0x88>(a, b), detail::shuffle_within_quarters<0xDD>(a, b));
      }
      const __m512 a = v[0], b = v[1];
      const __m512 sums = _mm512_add_ps(detail::shuffle_within_quarters<0x88>(a, b), detail::shuffle_within_quarters<0xDD>(a, b));
      if (g + 16 <= N) _mm512_storeu_ps(out + g, sums);
      else _mm512_mask_storeu_ps(out + g, static_cast<__mmask16>((1u << (N - g)) - 1), sums);
    }
    return;
  }
#endif
  MOE_UNROLL for (std::size_t i = 0; i < N; ++i) out[i] = reduce_add(acc[i]);
}

template <class T, class Arch>
T reduce_max(const batch<T, Arch>& b) noexcept {
  alignas(64) T tmp[batch<T, Arch>::size];
  b.store_aligned(tmp);
  T m = tmp[0];
  for (std::size_t i = 1; i < batch<T, Arch>::size; ++i) m = tmp[i] > m ? tmp[i] : m;
  return m;
}

}  // namespace simd

namespace detail {
// What body wrote to a non-const array's lanes goes back to it.
template <class T>
void copy_written(const T*, std::size_t, const T*) noexcept {}
template <class T>
void copy_written(const T* lanes, std::size_t count, T* row) noexcept {
  std::copy(lanes, lanes + count, row);
}

// simd::for_each_batch, the arrays numbered A...
template <class B, class Body, class... P, std::size_t... A>
void for_each_batch(std::index_sequence<A...>, std::size_t n, Body& body, P*... rows) noexcept {
  using T = typename B::value_type;
  constexpr std::size_t L = B::size;
  const std::size_t full = n - n % L, count = n - full;
  T lanes[sizeof...(P)][L];  // the tail, padded with zeros
  if (count != 0) (std::fill(std::copy(rows + full, rows + n, lanes[A]), lanes[A] + L, T(0)), ...);
  // One call of body for every batch, the tail's included, so that one compiled copy of its
  // arithmetic serves all: with the tail in a second call, g++ -std=gnu++17 (which fuses a·b + c)
  // fused GELU's derivative differently there, and the tail's bits differed.
  for (std::size_t i = 0; i < n; i += L) body((i == full ? lanes[A] : rows + i)...);
  if (count != 0) (copy_written(lanes[A], count, rows + full), ...);
}
}  // namespace detail

namespace simd {

// body(p...) for each batch of a row of n elements, p... the arrays at the batch: body loads and
// stores whole batches there. The last n mod L elements go through it too, on stack copies of each
// array's tail padded with zeros, and what body stores to the non-const arrays is copied back (so
// an output's old tail is read, then written over). Each element's result then depends only on its
// own inputs, wherever it sits in the row: a scalar tail (std::exp, std::erfc...) differs from
// xsimd's batch functions in the last bits for 4–70% of inputs in [-6, 6], so a row's last n mod L
// elements got a slightly different function.
template <class B, class Body, class... P>
void for_each_batch(std::size_t n, Body body, P*... rows) noexcept {
  detail::for_each_batch<B>(std::index_sequence_for<P...>{}, n, body, rows...);
}

// e^x for a batch: xsimd::exp without its undefined behaviour. xsimd 8.1's double exp converts
// round(x / ln 2) to int64 with a scalar cast on targets without a native conversion (AVX2), which
// is undefined for NaN, ±inf and |x| beyond ~6e18 even though those lanes' results are discarded
// afterwards. The argument is clamped to where e^x is already 0 or +inf, so no result changes,
// and NaN lanes skip the conversion and come back as NaN.
// xsimd's exp also returns 0 for denormal results (float from about x = -88, where std::exp gives
// denormals down to -103), and float +inf from x = 88.38 though e^x overflows only above 88.72.
// Lanes outside [normal_floor, normal_ceiling] take (e^(x/2))², whose factor is normal and whose
// square rounds once (into the denormals, or to +inf past the largest float).
// Declared inline: without the hint, g++ 12 -O3 kept it out of line in the loops of tanh GELU
// and GELU's derivative (1.15 times the time of their old forms).
template <class T, class Arch>
inline batch<T, Arch> exp_batch(const batch<T, Arch>& x) noexcept {
  using B = batch<T, Arch>;
  const T lowest = sizeof(T) == sizeof(float) ? T(-104) : T(-746);      // e^lowest rounds to 0
  const T highest = sizeof(T) == sizeof(float) ? T(89) : T(710);        // e^highest overflows to +inf
  const T normal_floor = sizeof(T) == sizeof(float) ? T(-87) : T(-708);  // xsimd's e^x exact within
  const T normal_ceiling = sizeof(T) == sizeof(float) ? T(88) : T(709);   //   [floor, ceiling]
  const auto is_nan = xsimd::isnan(x);
  const B clamped = xsimd::select(is_nan, B(T(0)), xsimd::min(xsimd::max(x, B(lowest)), B(highest)));
  B e = xsimd::exp(clamped);
  const auto edge = (clamped < B(normal_floor)) || (clamped > B(normal_ceiling));
  if (xsimd::any(edge)) {  // rare: keeps the common path at one exp
    const B half = xsimd::exp(clamped * B(T(0.5)));
    e = xsimd::select(edge, half * half, e);
  }
  return xsimd::select(is_nan, x, e);
}

}  // namespace simd
MOE_NAMESPACE_END
