#pragma once
// The lane-split product: matmul.hpp's dot products for batches of many tokens, computed the way a
// packed GEMM computes them, with the same bits.
//
// dot_block sums element (j, r) of y = x · wᵀ as L lane chains — lane l over k = l, l + L, l + 2L, ...
// in order, each a run of fused multiply-adds from zero — then adds the L chains in xsimd's hadd
// tree and the k % L tail in order. Its register blocks (5 tokens × 4 rows from 64 tokens on) load
// a vector of each token and of each row per step: the x block stays in L1, but each weight row
// comes from the L2 panel once per token block, 12.8 bytes per FMA, and from 128 tokens on, where
// the product is compute bound, it ran at 0.80–0.96 of Eigen's GEMM (AVX-512). Here both operands
// are packed lane-major first (pack_lanes: lane l's elements of a row, l, l + L, ..., contiguous), so
// that lane l's chains for a tile of max_lane_tile_tokens tokens × 2L weight rows form one small GEMM
// of depth S = k / L, run in outer-product form (lane_chains): two vectors of L rows' lane-l elements
// times each token's element broadcast (AVX-512: 14 tokens × 32 rows, 28 FMAs per 128 bytes of
// weights and 56 of x, 6.6 bytes per FMA; AVX2: 6 tokens × 16 rows). Each chain still runs from zero
// over its k in order, and a tile's L results are added in hadd's tree (kLaneOrder16, kLaneOrder8),
// so every sum rounds as dot_block's; the k % L tail is added after, in order.
//
// For float with AVX-512 (the tree of hadd for 16 float lanes, as in reduce_add_each) or AVX2 with
// FMA (xsimd's AVX hadd for 8), from kMinLaneTokens tokens on rows of at least kMinLaneDepth
// elements, and with at least kMinLaneRows rows (lane_split). Measured on an Intel Xeon with AVX-512
// (session 52; AVX2 in session 53, compiled for it on that machine: bench/README.md).
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <new>
#include <type_traits>

#include "../core/config.hpp"
#include "../core/memory.hpp"
#include "arch.hpp"

MOE_NAMESPACE_BEGIN
namespace simd {

// One expert's forward with AVX-512, cold weights, against the dot kernel (compare_bench, medians of
// 5, one thread and two): 64 tokens 0.98–1.04 of the time, hence kMinLaneTokens; 96 tokens
// 0.86–1.00, 128 0.86–1.01 (S1 0.86), 512 0.78–0.97 (S1 0.78–0.82), rows of 1,024 elements or more.
// Taking rows of 512 (S2's down projection) and 768 (S3's up) too, at 96–512 tokens: S2 0.94–0.99
// and S3 0.92–0.97 of the time. AVX2 (-march=haswell on the same machine): 96–512 tokens 0.91–0.99
// (S3 on two threads at 512 tokens 1.02); from 64 tokens too, 0.93–1.02 at 64 and 1.06–1.13 at 32.
// Both from 32 weight rows (kMinLaneRows): with fewer, most of an AVX-512 tile would be padding,
// and AVX2's 16-row tiles were not measured on routers' 16–31 rows.
inline constexpr std::size_t kMinLaneTokens = 96;
inline constexpr std::size_t kMinLaneDepth = 512;
inline constexpr std::size_t kMinLaneRows = 32;
inline constexpr std::size_t kLanePanelRows = 64;  // rows a thread takes at a time

// Whether this translation unit compiles the lane-split product (for AVX-512 or AVX2 with FMA): an
// internal switch, not a setting.
#if XSIMD_WITH_AVX512F || XSIMD_WITH_FMA3_AVX2
#define MOE_LANE_PRODUCT 1
#else
#define MOE_LANE_PRODUCT 0
#endif

// Whether Arch and T have the lane-split product: float with AVX-512 (16 lanes) or AVX2 with FMA (8).
template <class Arch, class T>
constexpr bool has_lane_product() noexcept {
  if (!std::is_same<T, float>::value) return false;
#if XSIMD_WITH_AVX512F
  if (std::is_base_of<xsimd::avx512f, Arch>::value) return true;
#endif
#if XSIMD_WITH_FMA3_AVX2
  if (std::is_base_of<xsimd::fma3<xsimd::avx2>, Arch>::value) return true;
#endif
  return false;
}

// A register tile: up to max_lane_tile_tokens tokens × lane_tile_rows weight rows (two vectors), 2
// accumulators a token: 28 of AVX-512's 32 registers, 12 of AVX2's 16 (with two weight vectors and a
// broadcast token element, 15).
template <class Arch>
constexpr std::size_t max_lane_tile_tokens() noexcept {
  return vector_registers<Arch>() >= 32 ? 14 : 6;
}
template <class Arch>
constexpr std::size_t lane_tile_rows() noexcept {
  static_assert(kLanePanelRows % (2 * lanes<float, Arch>()) == 0 && kMinLaneRows >= 2 * lanes<float, Arch>(),
                "panels of whole tiles, and at least one tile of rows");
  return 2 * lanes<float, Arch>();
}

// Whether a product of m tokens with n weight rows of k elements takes the lane-split product.
template <class Arch, class T>
constexpr bool lane_split(std::size_t m, std::size_t k, std::size_t n) noexcept {
  return has_lane_product<Arch, T>() && m >= kMinLaneTokens && k >= kMinLaneDepth && n >= kMinLaneRows;
}

// A thread's buffer for packed operands: it grows as needed and is kept for the next call, so warm
// calls allocate nothing. reserve() gives null where an allocation failed (the caller then takes the
// dot kernel). Not moe::Buffer (core/workspace.hpp), whose growth throws, and zero-fills and copies
// what it held: the products are noexcept, and the contents are rewritten. Blocks of 2 MiB or more
// are on huge pages, as HugePageAllocator's (core/memory.hpp): packed x reaches tens of megabytes
// (S1's down projection on 2,048 tokens: 29 MB), read again for every block of weight rows. One
// expert, cold weights, 192 and 512 tokens, against 64-byte aligned 4 KiB pages (compare_bench,
// medians of 5, one thread and two): 0.976–0.993 of the time on S1, S2 and S3; the bits do not change.
class LaneBuffer {
 public:
  LaneBuffer() = default;
  LaneBuffer(const LaneBuffer&) = delete;
  LaneBuffer& operator=(const LaneBuffer&) = delete;
  ~LaneBuffer() { release(); }
  float* reserve(std::size_t floats) noexcept {
    if (floats <= capacity_) return data_;
    if (floats > (static_cast<std::size_t>(-1) - kHugePageBytes) / sizeof(float)) return nullptr;
    const std::size_t bytes = whole_huge_pages(floats * sizeof(float));
    const std::size_t alignment = bytes >= kHugePageBytes ? kHugePageBytes : 64;
    void* const block = ::operator new(bytes, std::align_val_t(alignment), std::nothrow);
    if (block == nullptr) return nullptr;  // (the block held stays, for smaller products)
    if (alignment == kHugePageBytes) advise_huge_pages(block, bytes);  // (before the first write)
    release();
    data_ = static_cast<float*>(block);
    capacity_ = bytes / sizeof(float);
    alignment_ = alignment;
    return data_;
  }

 private:
  void release() noexcept {
    if (data_ != nullptr) ::operator delete(data_, std::align_val_t(alignment_));
    data_ = nullptr;
    capacity_ = 0;
  }
  float* data_ = nullptr;
  std::size_t capacity_ = 0;
  std::size_t alignment_ = 64;
};

// This thread's buffer `Which`: 0 holds a product's packed x (read by every thread of its team),
// 1 a thread's packed weight rows.
template <int Which>
LaneBuffer& lane_buffer() noexcept {
  thread_local LaneBuffer buffer;
  return buffer;
}

#if MOE_LANE_PRODUCT
namespace detail {
#if XSIMD_WITH_AVX512F
// Interleaves of 32-bit (Ps) and 64-bit (Pd) elements, in their masked forms with every lane
// selected (as shuffle_quarters, arch.hpp: the plain forms trip GCC 12's -Wmaybe-uninitialized).
template <bool High>
inline __m512 unpack_ps(__m512 a, __m512 b) noexcept {
  const auto all = static_cast<__mmask16>(0xFFFF);
  return High ? _mm512_mask_unpackhi_ps(a, all, a, b) : _mm512_mask_unpacklo_ps(a, all, a, b);
}
template <bool High>
inline __m512 unpack_pd(__m512 a, __m512 b) noexcept {
  const auto all = static_cast<__mmask8>(0xFF);
  const __m512d x = _mm512_castps_pd(a), y = _mm512_castps_pd(b);
  return _mm512_castpd_ps(High ? _mm512_mask_unpackhi_pd(x, all, x, y) : _mm512_mask_unpacklo_pd(x, all, x, y));
}

// r[i] (row i of a 16 × 16 block) becomes column i. (The helpers here take the architecture tag, as
// every kernel does, so that translation units built for AVX2 and for AVX-512 never share one body.)
template <class Arch>
inline void transpose(Arch, __m512 r[16]) noexcept {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = unpack_ps<false>(r[i], r[i + 1]);
    t[i + 1] = unpack_ps<true>(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = unpack_pd<false>(t[i], t[i + 2]);
    r[i + 1] = unpack_pd<true>(t[i], t[i + 2]);
    r[i + 2] = unpack_pd<false>(t[i + 1], t[i + 3]);
    r[i + 3] = unpack_pd<true>(t[i + 1], t[i + 3]);
  }
  // r[4b + q] now holds, in its 128-bit quarter c, element 4c + q of rows 4b .. 4b + 3: the quarters
  // of r[i], r[i + 4], r[i + 8], r[i + 12] are transposed as a 4 × 4 block.
  for (int i = 0; i < 4; ++i) {
    const __m512 ab0 = moe::detail::shuffle_quarters<0x44>(r[i], r[i + 4]);
    const __m512 ab1 = moe::detail::shuffle_quarters<0xEE>(r[i], r[i + 4]);
    const __m512 cd0 = moe::detail::shuffle_quarters<0x44>(r[i + 8], r[i + 12]);
    const __m512 cd1 = moe::detail::shuffle_quarters<0xEE>(r[i + 8], r[i + 12]);
    t[i] = moe::detail::shuffle_quarters<0x88>(ab0, cd0);
    t[i + 4] = moe::detail::shuffle_quarters<0xDD>(ab0, cd0);
    t[i + 8] = moe::detail::shuffle_quarters<0x88>(ab1, cd1);
    t[i + 12] = moe::detail::shuffle_quarters<0xDD>(ab1, cd1);
  }
  for (int i = 0; i < 16; ++i) r[i] = t[i];
}
template <class Arch>
inline void store_first(Arch, float* p, __m512 v, std::size_t count) noexcept {
  _mm512_mask_storeu_ps(p, static_cast<__mmask16>((1u << count) - 1), v);
}
#endif
#if XSIMD_WITH_FMA3_AVX2
// r[i] (row i of an 8 × 8 block) becomes column i.
template <class Arch>
inline void transpose(Arch, __m256 r[8]) noexcept {
  __m256 t[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {  // elements 4c + q of rows i .. i + 3 in half c of r[i + q]
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
  }
  for (int q = 0; q < 4; ++q) {
    t[q] = _mm256_permute2f128_ps(r[q], r[q + 4], 0x20);
    t[q + 4] = _mm256_permute2f128_ps(r[q], r[q + 4], 0x31);
  }
  for (int i = 0; i < 8; ++i) r[i] = t[i];
}
template <class Arch>
inline void store_first(Arch, float* p, __m256 v, std::size_t count) noexcept {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  _mm256_maskstore_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(count)), lane), v);
}
#endif
}  // namespace detail

// Packs `rows` rows of a (rows ≤ g, `lda` apart) over their first s · L elements lane-major into
// p [L][s][g] (L = Arch's float lanes): element l + L i of row q at p[(l · s + i) · g + q]. Rows
// rows .. g - 1 are zero.
// (Inlined, so that the weights' g = 2L is a constant: called, it ran 1–4% slower at 96 tokens.)
template <class Arch>
MOE_ALWAYS_INLINE void pack_lanes(Arch arch, const float* a, std::size_t lda, std::size_t rows, std::size_t s,
                                  std::size_t g, float* p) noexcept {
  using B = batch<float, Arch>;
  constexpr std::size_t L = B::size;
  for (std::size_t q0 = 0; q0 < g; q0 += L) {
    const std::size_t count = std::min(L, g - q0);
    for (std::size_t i = 0; i < s; ++i) {
      typename B::register_type r[L];
      for (std::size_t q = 0; q < L; ++q)
        r[q] = q0 + q < rows ? B::load_unaligned(a + (q0 + q) * lda + i * L) : B(0.0f);
      detail::transpose(arch, r);
      if (count == L) {  // (weight rows always; token tiles, of at most 14 or 6 tokens, never)
        for (std::size_t l = 0; l < L; ++l) B(r[l]).store_unaligned(p + (l * s + i) * g + q0);
      } else {
        for (std::size_t l = 0; l < L; ++l) detail::store_first(arch, p + (l * s + i) * g + q0, r[l], count);
      }
    }
  }
}

// Lane l's chains of a tile over depth s: acc[2j + v] = Σ_i x_j[l + L i] · w_{Lv + r}[l + L i] for
// each lane r, from zero in order of i (xp: the tile's [s][MR] lane-l elements; wp: [s][2L]).
template <std::size_t MR, class Arch>
void lane_chains(Arch, const float* xp, const float* wp, std::size_t s, batch<float, Arch>* acc) noexcept {
  using B = batch<float, Arch>;
  constexpr std::size_t L = B::size;
  B c[MR][2];
  MOE_UNROLL for (std::size_t j = 0; j < MR; ++j) c[j][0] = c[j][1] = B(0.0f);
  for (std::size_t i = 0; i < s; ++i, xp += MR, wp += 2 * L) {
    const B w0 = B::load_aligned(wp), w1 = B::load_aligned(wp + L);
    MOE_UNROLL for (std::size_t j = 0; j < MR; ++j) {
      const B xb(xp[j]);
      c[j][0] = simd::fma(xb, w0, c[j][0]);
      c[j][1] = simd::fma(xb, w1, c[j][1]);
    }
  }
  MOE_UNROLL for (std::size_t j = 0; j < MR; ++j) acc[2 * j] = c[j][0], acc[2 * j + 1] = c[j][1];
}

// The order in which a tile takes its lanes so that adding each result to the partial sums of a
// binary counter (lane_tile) adds them in hadd's tree. 16 lanes: ((0 + 8) + (4 + 12)) + ((1 + 9) +
// (5 + 13)), then the same from lane 2, and the two added (reduce_add_each describes the tree). 8
// lanes (xsimd's AVX hadd: lane l + lane l + 4, then the pairs (0, 1) and (2, 3), then their sums):
// ((0 + 4) + (1 + 5)) + ((2 + 6) + (3 + 7)).
inline constexpr std::size_t kLaneOrder16[16] = {0, 8, 4, 12, 1, 9, 5, 13, 2, 10, 6, 14, 3, 11, 7, 15};
inline constexpr std::size_t kLaneOrder8[8] = {0, 4, 1, 5, 2, 6, 3, 7};

// The tile's sums over k's whole vectors: sums[2j + v] holds token j's dots with rows Lv .. Lv + L - 1
// (xp: the tile packed [L][s][MR]; wp: its 2L rows [L][s][2L]). fetch() runs before each lane's
// chains (the caller's prefetches, spread over the tiles).
template <std::size_t MR, class Arch, class Fetch>
void lane_tile(Arch arch, const float* xp, const float* wp, std::size_t s, batch<float, Arch>* sums,
               Fetch&& fetch) noexcept {
  using B = batch<float, Arch>;
  constexpr std::size_t L = B::size, N = 2 * MR;
  static_assert(L == 8 || L == 16, "a lane order for 8 or 16 lanes");
  const std::size_t* const order = L == 16 ? kLaneOrder16 : kLaneOrder8;
  B partial[4][N];
  for (std::size_t step = 0; step < L; ++step) {
    fetch();
    const std::size_t l = order[step];
    lane_chains<MR>(arch, xp + l * s * MR, wp + l * s * 2 * L, s, sums);
    std::size_t level = 0;
    for (std::size_t bits = step; (bits & 1) != 0; bits >>= 1, ++level)
      MOE_UNROLL for (std::size_t a = 0; a < N; ++a) sums[a] = partial[level][a] + sums[a];
    if (step + 1 < L) MOE_UNROLL for (std::size_t a = 0; a < N; ++a) partial[level][a] = sums[a];
  }
}
#endif  // MOE_LANE_PRODUCT

}  // namespace simd
MOE_NAMESPACE_END
