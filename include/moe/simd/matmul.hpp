#pragma once
// Matrix products in the PyTorch nn.Linear layout: y = x · wᵀ with x [m, k] (token rows) and
// w [n, k] (weight rows), so every output element is the dot product of two contiguous rows.
//
// Each element is summed in one fixed order — SIMD lanes across k in steps of the lane count,
// the lanes reduced, then the k % L tail added in order — whatever m is, whichever block the
// element falls in and whichever thread computes it. So a token's output bits never depend on
// which other tokens share its batch or its expert (batch isolation, README, "Guarantees"), nor on the
// thread count. A packed GEMM (Eigen's) does not promise this: its blocking, and so its rounding,
// changes with m.
//
// Blocking: weight rows are taken in panels that fit in L2 and every token is run against a
// panel before moving on, so the weights stream from memory once per call; within a panel, a
// register block of up to max_token_block() tokens × block_rows() rows shares each load (up to
// kMaxTokenBlock tokens where their x fits L1: packed blocks, see one_block). For a
// handful of tokens this is one pass over the weights (memory bound, as it must be); for many it
// is compute bound, and a panel's later token blocks (which compute from L2) fetch the next panel
// meanwhile (PanelPrefetch), so that memory and arithmetic overlap; the last register block of a
// panel's first pass fetches the next panel's first rows (next_panel_row). Up to kMaxStreamTokens tokens
// take a leaner loop of their own (stream_blocks), with block shapes chosen for streaming, whose blocks
// take rows a stream apart, so that each row stream reads on through memory. So does a batch that is
// one token block on rows shorter than a page (RowOrder). From kMinLaneTokens tokens on (float, with
// AVX-512 or AVX2 and FMA), the same sums, to the bit, come from the lane-split product
// (lane_product.hpp, lane_rows), a packed GEMM whose register tiles draw half the bytes from L2 per
// multiply-add (AVX-512).
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdlib>

#include "../core/config.hpp"
#include "../core/threads.hpp"
#include "../experts/activations.hpp"
#include "arch.hpp"
#include "lane_product.hpp"

MOE_NAMESPACE_BEGIN
namespace simd {

inline constexpr std::size_t kMaxTokenBlock = 14;         // token rows per register block, at most (packed)
inline constexpr std::size_t kPanelBytes = 192 * 1024;    // weight panel kept in L2
inline constexpr std::size_t kXInL2Bytes = 768 * 1024;   // x larger than this: fetch_next_x

// Token rows per register block read from the caller's x rows: at most 8 with 32 vector registers
// (AVX-512), 5 with 16 (AVX2, SSE). How a batch is cut into blocks: token_block() below.
template <class Arch>
constexpr std::size_t max_token_block() noexcept {
  return vector_registers<Arch>() >= 32 ? 8 : 5;
}

// Packed blocks: with 32 registers, a batch of kMinPackedBlock–kMaxTokenBlock tokens is one register
// block of 2 weight rows (14 × 2 accumulators, 2 weights, 1 x vector) when the x it meets at a time
// fits kPackedXBytes of the 48 KiB L1: then every weight row is read once, from memory, while the
// block computes, instead of once from memory and again from L2 by ceil(m / 6) blocks. Its x rows
// (one chunk of them, kPackedChunkBytes on long rows) are first copied into one buffer, a vector of
// each token in turn for each k step, so that the loop addresses them from one pointer: fourteen
// row pointers, as for the unpacked blocks, do not fit the general registers, and spilled ones cost
// more than the copy. Cold weights, one thread, 9–14 tokens, time against ceil(m / 6) blocks,
// medians of 9 interleaved: S2's down projection (2 KiB rows) 0.81–0.96, S3's up (3 KiB, 9–10
// tokens) 0.85–0.98, S3's down (12 KiB) 0.82–0.92, S1's down (14 KiB) 0.74–0.82, the gated products
// of S1 and S2 (4 KiB rows, in 2 KiB chunks: chunks_rows) 0.83–0.97. Unpacked, S3's down projection
// on 12 tokens ran 1.09–1.46× (the row pointers spilled), and packed whole 4 KiB rows of 12–14
// tokens 1.2–1.4× (x overflowing L1). Nor did 15–63 tokens gain from blocks of up to 14 (0.97–1.24).
// More in bench/README.md, "Session 16". Packed from 7 tokens on since session 31 (7–8 were an
// unpacked 8 × 2 block): one expert's FFN, weights cold, one thread or two, 0.90–0.97 of the
// unpacked time on S1 and S3, 0.91–1.06 on S2; with x rows off 64-byte boundaries, which the copy
// aligns, 0.59–0.92 (S2 on one thread 1.00–1.08).
inline constexpr std::size_t kMinPackedBlock = 7;
inline constexpr std::size_t kPackedXBytes = 32 * 1024;
inline constexpr std::size_t kPackedChunkBytes = 2048;
// Whether a register block of mb tokens is packed (with 16 registers one_block never forms one).
constexpr bool packed_block(std::size_t mb) noexcept { return mb >= kMinPackedBlock; }

// Weight rows per register block for mb tokens, in units of `unit` rows (a gate/up pair is 2):
// mb · rows accumulators plus rows + 1 loaded vectors must fit the vector registers, with at least
// 8 accumulators where possible to cover the FMA latency (4 cycles, 2 per cycle). With 16
// registers 5 × 2 measured fastest for many tokens (twice 4 × 2); with 32, 5 × 4 and 6 × 4 (the
// sgemm rate +11% over 5 × 2), 3 × 4 (3 × 6 left two rows of an 8-row panel to a slow one-row
// tail: 3 tokens on 14 KiB rows streamed 0.94 → 0.60 ms per 14.7 MB) and 7–8 × 2 for 7–8 tokens
// (packed). 1 × 8 for one token (memory bound).
template <class Arch>
constexpr std::size_t block_rows(std::size_t mb, std::size_t unit) noexcept {
  if (vector_registers<Arch>() >= 32) return mb >= 7 ? 2 : mb >= 3 ? 4 : 8;
  return mb >= 4 ? 2 : mb == 3 ? (unit == 1 ? 3 : 2) : mb == 2 ? 4 : 8;
}
inline constexpr std::size_t kMaxBlockRows = 8;

// Keeps a loaded vector in a register: without this, compilers fold the load into every FMA
// that uses it (as a memory operand), which turns an MB × NB block's MB + NB loads per step into
// MB · NB + NB and makes the kernel load bound.
template <class B>
inline void keep_in_register(B& v) noexcept {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
  auto reg = static_cast<typename B::register_type>(v);
#if defined(__AVX512F__)
  asm("" : "+v"(reg));  // any of the 32 registers ("x" allows only the first 16)
#else
  asm("" : "+x"(reg));
#endif
  v = B(reg);
#else
  (void)v;
#endif
}

// The weight panel this thread computes next, fetched while it runs the current panel's later
// token blocks: those read their panel from L2 and leave the memory idle, so spreading the next
// panel's loads over their k steps overlaps the two, and the next panel's first block (the one
// that would otherwise wait on memory) finds its rows in cache. Up to two regions (the gated
// product's gate rows and up rows); kLinesPerStep cache lines each k step, from the first step of
// the second token block until the panel is fetched (a fixed count keeps the loop's registers free:
// with a per-call count the compiler spilled). A 4-row block's step reads four lines of its panel,
// so each later block fetches a quarter of the next: below five token blocks (25 tokens) the next
// panel's first block reads the rest from memory. One line per step, not two: asked for faster than
// one core serves them while it computes (some 10–15 GB/s), the fetches stall the blocks and the
// lines do not stay (two later blocks of 6 × 4 over a 192 KiB panel, one thread: two lines per step
// slowed them 1.5× and left the next panel as cold as no fetch; one line slowed them 1.2× and
// fetched part of the half it asked for). One expert, cold weights, against two lines per step
// (compare_bench, two runs): S3 on 16 tokens 0.89–0.94, S1 and S2 on 16–32 tokens 0.91–1.00, rows
// without later blocks 0.98–1.03 (the noise). bench/README.md, "Session 44". Into L2 only
// (prefetch<2>): on an Intel Xeon, one expert at 16–96 tokens then took 0.96–0.99 of the time (three
// runs); two lines per step, or one line in two, were slower still (session 57). The AMD guests
// filled L1 alike whatever the hint (session 40).
struct PanelPrefetch {
  static constexpr std::size_t kLineBytes = 64;
  static constexpr std::size_t kLinesPerStep = 1;
  const char* at[2] = {nullptr, nullptr};
  const char* end[2] = {nullptr, nullptr};

  template <class T>
  void add(const T* begin, const T* stop) noexcept {
    const std::size_t r = at[0] == end[0] ? 0 : 1;
    at[r] = reinterpret_cast<const char*>(begin);
    end[r] = reinterpret_cast<const char*>(stop);
  }
  bool done() const noexcept { return at[0] == end[0] && at[1] == end[1]; }  // (or never given)
  // Moves on to `reached` in the first region, and to the second when the first is done.
  void advance(const char* reached) noexcept {
    at[0] = reached;
    if (reached < end[0]) return;
    at[0] = at[1], end[0] = end[1];
    at[1] = end[1] = nullptr;
  }
};

// Long rows are taken in chunks of kChunkBytes so that a token block's chunk of x stays in L1
// while it meets the panel's weight rows: between chunks a register block's lane accumulators
// are parked in memory and reloaded, which changes no bit (each lane still sums its k in order).
inline constexpr std::size_t kChunkBytes = 4096;
inline constexpr std::size_t kChunkAboveBytes = 8192;  // rows up to this long are not chunked
inline constexpr std::size_t kMaxChunkedRows = 32;     // weight rows per panel the parking space holds

// Whether a token block of mb tokens meets rows of row_bytes in chunks (kChunkBytes, or
// kPackedChunkBytes for a packed block): rows over kChunkAboveBytes, and rows of at least two
// packed chunks whose whole x would not fit kPackedXBytes (the gated products' 4 KiB rows: 9–14
// tokens 0.83–0.97 of the time of ceil(m / 6) blocks; 3 KiB rows cut into 2 + 1 KiB ran 1.09–1.29).
// Panels of such rows hold at most kMaxChunkedRows (panel_rows, gated_panel_pairs).
inline bool chunks_rows(std::size_t mb, std::size_t row_bytes) noexcept {
  if (mb <= 1) return false;
  return row_bytes > kChunkAboveBytes ||
         (packed_block(mb) && mb * row_bytes > kPackedXBytes && row_bytes >= 2 * kPackedChunkBytes);
}

// sum + the k % L tail elements [i, k) of a dot product, in order, so that every kernel (dot_block,
// stream_blocks) rounds an element the same way.
template <class T>
T add_tail(T sum, const T* x, const T* w, std::size_t i, std::size_t k) noexcept {
  for (; i < k; ++i) sum = madd(x[i], w[i], sum);
  return sum;
}

// Over k in [k0, k1) of rows of k elements: out[j * ldo + r] = dot(x row j, w row r) for
// j < MB, r < NB, rows given by pointers. Lane accumulators start at zero when k0 = 0, else from
// `carry` [MB · NB]; when k1 < k they are parked in `carry` instead of reduced into `out`.
// With FirstPass, `next` holds NB rows to prefetch meanwhile (the next block's weight rows): a
// weight row is often one 4 KiB page, where the hardware prefetcher stops, so with few tokens
// (memory bound) the next rows must be requested ahead (once per cache line); not for a one-token
// block: its eight row streams keep the hardware prefetcher busy enough (measured 20% faster
// without). The later token blocks of a panel find it in L2 and fetch the next panel instead
// (`ahead`). A packed block (packed_block(MB)) reads its x from `packed` (pack_tokens: k in
// [k0, k1)); the rows `x` then serve only the k % L tail.
template <bool FirstPass, std::size_t MB, std::size_t NB, class Arch, class T>
void dot_block(Arch, const T* const* x, const T* const* w, const T* const* next, std::size_t k0, std::size_t k1,
               std::size_t k, batch<T, Arch>* carry, T* out, std::size_t ldo, PanelPrefetch& ahead,
               const T* packed) noexcept {
  using B = batch<T, Arch>;
  constexpr std::size_t L = B::size;
  constexpr bool kPacked = packed_block(MB);
  const T* xp[MB];
  const T* wp[NB];
  const T* np[NB];
  MOE_UNROLL for (std::size_t j = 0; j < MB; ++j) xp[j] = x[j];
  MOE_UNROLL for (std::size_t r = 0; r < NB; ++r) wp[r] = w[r], np[r] = next[r];
  B acc[MB][NB];
  MOE_UNROLL for (std::size_t j = 0; j < MB; ++j)
    MOE_UNROLL for (std::size_t r = 0; r < NB; ++r) acc[j][r] = k0 == 0 ? B(T(0)) : carry[j * NB + r];
  const char* ahead_at = ahead.at[0];
  const char* const ahead_end = ahead.end[0];
  std::size_t i = k0;
  for (; i + L <= k1; i += L) {
    B wv[NB];
    constexpr std::size_t kLine = PanelPrefetch::kLineBytes / sizeof(T);
    if (FirstPass && MB > 1 && i % kLine == 0)
      MOE_UNROLL for (std::size_t r = 0; r < NB; ++r) prefetch(np[r] + i);
    if (!FirstPass)
      for (std::size_t q = 0; q < PanelPrefetch::kLinesPerStep && ahead_at < ahead_end; ++q)
        prefetch<2>(ahead_at), ahead_at += PanelPrefetch::kLineBytes;
    // With 2–4 tokens, weight vectors kept in registers too: else each weight load is folded into
    // every FMA that uses it, and the rows streamed from memory ~30% slower (4 tokens, 14.7 MB of
    // rows: 0.87 → 0.63 ms); with 5–8 tokens, keeping them spilled (5 × 4 from L2: 150 → 106
    // GFLOP/s). A packed block keeps its two (folded, each would be loaded MB times).
    MOE_UNROLL for (std::size_t r = 0; r < NB; ++r) {
      wv[r] = B::load_unaligned(wp[r] + i);
      if (MB > 1 && (MB <= 4 || kPacked)) keep_in_register(wv[r]);
    }
    MOE_UNROLL for (std::size_t j = 0; j < MB; ++j) {
      B xv = kPacked ? B::load_aligned(packed + j * L) : B::load_unaligned(xp[j] + i);
      if (NB > 1) keep_in_register(xv);
      MOE_UNROLL for (std::size_t r = 0; r < NB; ++r) acc[j][r] = simd::fma(xv, wv[r], acc[j][r]);
    }
    if (kPacked) packed += MB * L;
  }
  if (!FirstPass) ahead.advance(ahead_at);
  if (k1 < k) {
    MOE_UNROLL for (std::size_t j = 0; j < MB; ++j)
      MOE_UNROLL for (std::size_t r = 0; r < NB; ++r) carry[j * NB + r] = acc[j][r];
    return;
  }
  T sums[MB * NB];
  reduce_add_each<MB * NB>(&acc[0][0], sums);
  MOE_UNROLL for (std::size_t j = 0; j < MB; ++j) {
    MOE_UNROLL for (std::size_t r = 0; r < NB; ++r) out[j * ldo + r] = add_tail(sums[j * NB + r], xp[j], wp[r], i, k);
  }
}

// Copies x rows [MB] over k in [k0, k1) (whole vectors: k0 and the end are multiples of L, or the
// end is the last whole vector before the row's tail) into `packed` as [step][token][L].
template <std::size_t MB, class Arch, class T>
void pack_tokens(Arch, const T* const* x, std::size_t k0, std::size_t k1, T* packed) noexcept {
  using B = batch<T, Arch>;
  constexpr std::size_t L = B::size;
  for (std::size_t i = k0; i + L <= k1; i += L)
    MOE_UNROLL for (std::size_t j = 0; j < MB; ++j, packed += L) B::load_unaligned(x[j] + i).store_aligned(packed);
}

// Rows of k elements from `first` (none when rows = 0): what a streamed product reads after the
// current one, whose first register block its last block prefetches (stream_blocks).
template <class T>
struct StreamAhead {
  const T* first = nullptr;
  std::size_t rows = 0;
};

// Region i of `ahead` (the next panel's weight rows; in the gated product, 0 its gate rows and 1 its
// up rows) as whole rows of k elements (none for empty rows: nothing to fetch).
template <class T>
StreamAhead<T> rows_ahead(const PanelPrefetch& ahead, std::size_t i, std::size_t k) noexcept {
  const T* first = reinterpret_cast<const T*>(ahead.at[i]);
  if (first == nullptr || k == 0) return {};
  return {first, static_cast<std::size_t>(reinterpret_cast<const T*>(ahead.end[i]) - first) / k};
}

// Row i of unit q of the panel `ahead` holds (the gated product's regions: gate rows, then up rows),
// shifted back by k0 so that a block over [k0, k1) of its rows prefetches the row's first k1 - k0
// elements; `fallback` where there is no next panel or it is shorter. The last block of a panel's
// first pass takes these: else it fetches its own rows again, and the next panel's first block (a
// batch's only token block has no later ones to fetch it) starts with nothing in flight.
template <class T>
const T* next_panel_row(const PanelPrefetch& ahead, std::size_t i, std::size_t q, std::size_t k, std::size_t k0,
                        const T* fallback) noexcept {
  const StreamAhead<T> region = rows_ahead<T>(ahead, i, k);
  if (q + 1 > region.rows) return fallback;
  const T* row = region.first + q * k;
  return row - k0;  // (in the row before it: a next panel never starts at row 0)
}

// Runs MB token rows against `units` units of U weight rows (U = 1: single rows; U = 2: a gate
// row and its up row), block_rows(MB) / U units per register block and the rest one unit at a
// time. rows(u, ptrs) writes unit u's U row pointers; store(u, count, out) receives the dots of
// units u .. u + count as out[j · count · U + q · U + i].
template <std::size_t MB, std::size_t U, class Arch, class T, class Rows, class Store>
void sweep_units(Arch arch, const T* const* xr, std::size_t k, std::size_t units, bool first_pass, Rows rows,
                 Store store, PanelPrefetch& ahead) noexcept {
  using B = batch<T, Arch>;
  constexpr std::size_t NB = block_rows<Arch>(MB, U);
  static_assert(NB % U == 0, "a register block holds whole units");
  constexpr std::size_t per_block = NB / U;
  constexpr bool kPacked = packed_block(MB);
  constexpr std::size_t kChunk = (kPacked ? kPackedChunkBytes : kChunkBytes) / sizeof(T);
  static_assert(kChunk % B::size == 0, "chunks end on a vector boundary");
  static_assert(MB * kPackedChunkBytes <= kPackedXBytes, "a packed block's chunk of x fits its buffer");
  // (One token: its row fits L1 anyway, and whole rows keep the weight streams long.)
  const bool chunked = chunks_rows(MB, k * sizeof(T)) && units * U <= kMaxChunkedRows;
  const std::size_t chunk = chunked ? kChunk : k;
  B carry[MB * kMaxChunkedRows];  // parked accumulators: unit u's at MB · U · u
  // A packed block's x, one chunk at a time: one_block admits it only where unchunked rows fit.
  alignas(64) T packed_x[kPacked ? kPackedXBytes / sizeof(T) : 1];
  if (kPacked && MB * chunk * sizeof(T) > kPackedXBytes) std::abort();  // (unreachable: see one_block)
  // (null when unpacked: the blocks do not read it, and g++ -O1 -Wall would call it uninitialized)
  T* const packed = kPacked ? packed_x : nullptr;
  T out[MB * NB];
  const T* wr[NB];
  const T* wn[NB];
  const PanelPrefetch next_panel = ahead;  // (as it was before this sweep's tail units advanced it)
  std::size_t k0 = 0;
  do {
    const std::size_t k1 = std::min(k, k0 + chunk);
    if constexpr (kPacked) pack_tokens<MB>(arch, xr, k0, k1, packed);
    std::size_t u = 0;
    if (per_block <= units)
      for (std::size_t q = 0; q < per_block; ++q) rows(q, wr + q * U);
    for (; u + per_block <= units; u += per_block) {
      const bool more = u + 2 * per_block <= units;
      for (std::size_t q = 0; q < per_block; ++q) {
        if (more) {
          rows(u + per_block + q, wn + q * U);
        } else if (k1 < k) {  // the last block of a chunk: the next chunk of the first block's rows
          rows(q, wn + q * U);  // (shifted by at most what is left of the row, so no address passes its end)
          for (std::size_t i = 0; i < U; ++i) wn[q * U + i] += std::min(k1 - k0, k - k1);
        } else {  // the panel's last block: the next panel's first rows, where a first pass fetches them
          for (std::size_t i = 0; i < U; ++i)
            wn[q * U + i] = first_pass ? next_panel_row(next_panel, i, q, k, k0, wr[q * U + i]) : wr[q * U + i];
        }
      }
      // Only chunks park accumulators; whole rows never touch `carry` (and u may be past its end).
      B* const parked = carry + (chunked ? MB * U * u : 0);
      // A packed block is always a batch's only block, so its first: its later-pass variant is never compiled.
      if (kPacked || first_pass) {
        dot_block<true, MB, NB>(arch, xr, wr, wn, k0, k1, k, parked, out, NB, ahead, packed);
      } else if constexpr (!kPacked) {
        dot_block<false, MB, NB>(arch, xr, wr, wn, k0, k1, k, parked, out, NB, ahead, packed);
      }
      if (k1 == k) store(u, per_block, out);
      MOE_UNROLL for (std::size_t q = 0; q < NB; ++q) wr[q] = wn[q];
    }
    for (; u < units; ++u) {
      rows(u, wr);
      dot_block<false, MB, U>(arch, xr, wr, wr, k0, k1, k, carry + (chunked ? MB * U * u : 0), out, U, ahead,
                              packed);
      if (k1 == k) store(u, std::size_t(1), out);
    }
    k0 = k1;
  } while (k0 < k);
}

// Whether a batch of m tokens on rows of k elements is one token block, which reads each weight row
// once: up to max_token_block() tokens always, and with 32 registers up to kMaxTokenBlock packed
// ones where the x they meet at a time (a kPackedChunkBytes chunk of rows they chunk, else whole
// rows) fits kPackedXBytes.
template <class Arch, class T>
bool one_block(std::size_t m, std::size_t k) noexcept {
  if (m <= max_token_block<Arch>()) return true;
  if (vector_registers<Arch>() < 32 || m > kMaxTokenBlock) return false;
  const std::size_t row_bytes = k * sizeof(T);
  return m * (chunks_rows(m, row_bytes) ? kPackedChunkBytes : row_bytes) <= kPackedXBytes;
}

// The size of the token block starting at token j of m, on rows of k elements. With 32 registers:
// up to 8 tokens are one block (one pass over the weights, the best use of their stream from
// memory; packed from kMinPackedBlock), and up to 14 where one_block says so; other batches below
// 64 are cut into ceil(m / 6) blocks of near-equal size (16 → 6 + 5 + 5): every block after the
// first computes from L2, where 4–6 × 4 blocks run 25–30% faster than 8 × 2 (measured with a warm
// L2 panel: 150–165 against 115–130 GFLOP/s). Larger batches, and 16 registers, take 5 at a time
// (5 × 4 and 5 × 2 compute fastest from L2).
template <class Arch, class T>
std::size_t token_block(std::size_t j, std::size_t m, std::size_t k) noexcept {
  constexpr std::size_t most = max_token_block<Arch>();
  if (one_block<Arch, T>(m, k)) return m;
  if (most > 5 && m < 64) {
    const std::size_t blocks = (m + 5) / 6, size = m / blocks, of_size = blocks - m % blocks;
    return j < size * of_size ? size : size + 1;  // of_size blocks of `size` tokens, then blocks of size + 1
  }
  return std::min<std::size_t>(5, m - j);
}

// Whether the blocks of a panel that have finished fetching the next panel fetch the next token
// block's x rows instead (for_token_blocks): where x (m rows, ldx apart) is larger than
// kXInL2Bytes (three quarters of a 1 MiB L2; the rest holds a weight panel), much of it has left the
// L2 since the previous panel, and each token block's first register block would wait on its x rows
// from L3.
// One expert, cold weights, compare_bench on an Intel Xeon with AVX-512 and 2 MiB of L2 per core
// (session 51, two runs): 512 tokens 0.96–0.98 of the time on one thread, 0.98–0.99 on two; 128
// tokens 0.99–1.02. The product alone against Eigen's GEMM, 512–2048 tokens of 14 KiB rows: from
// 0.76–0.80 of its rate to 0.81–0.90. The bits do not change.
inline bool fetch_next_x(std::size_t m, std::size_t ldx, std::size_t bytes_per_element) noexcept {
  return m * ldx * bytes_per_element > kXInL2Bytes;
}

// For each token block of x (rows `ldx` apart; token_block()): calls sweep_units<mb, U> with the
// block's row pointers; store(j, mb, u, count, out) receives its dots with its first token j.
// The blocks after the first fetch `ahead` (the next panel), and then, where fetch_next_x, the
// next token block's x rows.
template <std::size_t U, class Arch, class T, class Rows, class Store>
void for_token_blocks(Arch arch, const T* x, std::size_t ldx, std::size_t m, std::size_t k, std::size_t units, Rows rows,
                      Store store, PanelPrefetch ahead) noexcept {
  const T* xr[kMaxTokenBlock];
  const bool fetch_x = fetch_next_x(m, ldx, sizeof(T));
  for (std::size_t j = 0, mb = 0; j < m; j += mb) {
    mb = token_block<Arch, T>(j, m, k);
    for (std::size_t q = 0; q < mb; ++q) xr[q] = x + (j + q) * ldx;
    if (fetch_x && j > 0 && ahead.done() && j + mb < m) {
      const std::size_t next_mb = token_block<Arch, T>(j + mb, m, k);
      ahead.add(x + (j + mb) * ldx, x + (j + mb + next_mb - 1) * ldx + k);
    }
    auto at = [&](auto&& per_unit) {
      return [&, j, mb](std::size_t u, std::size_t count, const T* out) { per_unit(j, mb, u, count, out); };
    };
    if constexpr (max_token_block<Arch>() > 5) {  // (not compiled where blocks stop at 5)
      switch (mb) {
        case 14: sweep_units<14, U>(arch, xr, k, units, j == 0, rows, at(store), ahead); continue;
        case 13: sweep_units<13, U>(arch, xr, k, units, j == 0, rows, at(store), ahead); continue;
        case 12: sweep_units<12, U>(arch, xr, k, units, j == 0, rows, at(store), ahead); continue;
        case 11: sweep_units<11, U>(arch, xr, k, units, j == 0, rows, at(store), ahead); continue;
        case 10: sweep_units<10, U>(arch, xr, k, units, j == 0, rows, at(store), ahead); continue;
        case 9: sweep_units<9, U>(arch, xr, k, units, j == 0, rows, at(store), ahead); continue;
        case 8: sweep_units<8, U>(arch, xr, k, units, j == 0, rows, at(store), ahead); continue;
        case 7: sweep_units<7, U>(arch, xr, k, units, j == 0, rows, at(store), ahead); continue;
        case 6: sweep_units<6, U>(arch, xr, k, units, j == 0, rows, at(store), ahead); continue;
        default: break;
      }
    }
    switch (mb) {
      case 5: sweep_units<5, U>(arch, xr, k, units, j == 0, rows, at(store), ahead); break;
      case 4: sweep_units<4, U>(arch, xr, k, units, j == 0, rows, at(store), ahead); break;
      case 3: sweep_units<3, U>(arch, xr, k, units, j == 0, rows, at(store), ahead); break;
      case 2: sweep_units<2, U>(arch, xr, k, units, j == 0, rows, at(store), ahead); break;
      default: sweep_units<1, U>(arch, xr, k, units, j == 0, rows, at(store), ahead); break;
    }
  }
}
static_assert(kMaxTokenBlock == 14, "for_token_blocks has one case per token block size");

// ---- streaming: a few tokens against rows they stream whole ----------------------------------------
//
// Up to kMaxStreamTokens tokens (on rows of at most kChunkAboveBytes, which dot_block would not
// chunk) read every weight row once, from memory, and are bound by how fast one core streams. They
// get a loop of their own (stream_blocks), with the row pointers advanced in registers from one
// block to the next. Through sweep_units and dot_block, whose bookkeeping serves the token blocks
// and chunks of larger batches, one token streamed 12–20% slower with inner loops that compiled
// alike (S1's 4 KiB rows 33.4 → 37.5 GB/s on one thread, S3's 3 KiB rows 35 → 42, as fast as
// Eigen's GEMV). 7–8 tokens stream only rows of a page or more (streams()).
inline constexpr std::size_t kMaxStreamTokens = 8;

// Weight rows per register block for a streamed batch of mb tokens: with 32 registers, one token
// takes 8 rows (eight row streams keep the hardware prefetcher busy; no software prefetch), 2–6
// tokens 4 rows, each stream prefetching its next row. Until session 46 the blocks took rows in
// address order, 3–4 tokens one row at a time and 5–6 two. Rows a stream apart (stream_blocks), one
// thread, cold weights, a plain read of the same bytes ÷ the product, before → after: 1 token
// 0.87–1.15 → 1.03–1.24, 2 tokens 0.80–0.91 → 0.98–1.14, 3–4 tokens 0.68–0.99 → 0.87–1.16, 5–6
// tokens 0.54–0.89 → 0.81–1.04; one expert's forward (compare_bench, two runs) took 0.85–0.97 of
// the time at 1 token, 0.81–0.94 at 2 and 0.77–0.98 at 4 (bench/README.md, "Session 46"). With x
// rows off 64-byte boundaries (each x load spans two cache lines) the 4 rows share each x load: 3–4
// tokens then ran faster than with the 8- and 4-row blocks that case took before. 7–8 tokens take 2
// rows (16 accumulators; 3 rows ran as fast or slower). With 16 registers, block_rows.
template <class Arch>
constexpr std::size_t stream_block_rows(std::size_t mb) noexcept {
  if (vector_registers<Arch>() >= 32) return mb <= 1 ? 8 : packed_block(mb) ? 2 : 4;
  return block_rows<Arch>(mb, 1);
}

// add_tail for out[j * ldo + q · stride] (x rows ldx apart, the block's rows stride · k apart). Out of line:
// rows are usually a multiple of the lane count, and the block's epilogue stays short.
template <std::size_t MB, std::size_t NB, class T>
MOE_NOINLINE void add_stream_tails(const T* x, std::size_t ldx, const T* rows, std::size_t stride, std::size_t i,
                                   std::size_t k, T* out, std::size_t ldo) noexcept {
  MOE_UNROLL for (std::size_t j = 0; j < MB; ++j)
    MOE_UNROLL for (std::size_t q = 0; q < NB; ++q) {
      T& o = out[j * ldo + q * stride];
      o = add_tail(o, x + j * ldx, rows + q * stride * k, i, k);
    }
}

// out[j * ldo + r] = dot(x row j, w row r) for j < MB and r < NB · s, with dot_block's rounding.
// Register block b takes rows b, b + s, ..., b + (NB - 1) s: each of its NB rows is the next of its own
// stream through memory, which reads on from one block to the next (in address order each stream
// stops where the next block's rows begin, and rows shorter than a page share pages between a block's
// streams), and with fewer than eight rows each stream prefetches its next row while the block runs;
// the last block prefetches the first block of `after` (taken with the same NB). (The loop over blocks
// lives here, with the block's body: GCC, told to inline a separate block function into it, dropped
// the prefetches.)
template <std::size_t MB, std::size_t NB, class Arch, class T>
void stream_blocks(Arch, const T* x, std::size_t ldx, const T* w, std::size_t k, std::size_t s, T* out,
                   std::size_t ldo, StreamAhead<T> after) noexcept {
  using B = batch<T, Arch>;
  constexpr std::size_t L = B::size;
  constexpr std::size_t kLine = PanelPrefetch::kLineBytes / sizeof(T);
  const std::size_t sk = s * k;
  const T* after_first = after.rows >= NB ? after.first : nullptr;
  const std::size_t after_sk = after.rows / NB * k;
  for (std::size_t b = 0; b < s; ++b) {
    const T* rows = w + b * k;  // stream q's row: rows + q · sk
    const T* next = rows + k;
    std::size_t next_sk = sk;
    if (b + 1 == s) {
      next = after_first != nullptr ? after_first : rows;
      next_sk = after_first != nullptr ? after_sk : sk;
    }
    B acc[MB][NB];
    MOE_UNROLL for (std::size_t j = 0; j < MB; ++j)
      MOE_UNROLL for (std::size_t q = 0; q < NB; ++q) acc[j][q] = B(T(0));
    std::size_t c = 0;
    for (; c + L <= k; c += L) {
      if (NB < kMaxBlockRows && c % kLine == 0)
        MOE_UNROLL for (std::size_t q = 0; q < NB; ++q) prefetch(next + q * next_sk + c);
      B wv[NB];
      MOE_UNROLL for (std::size_t q = 0; q < NB; ++q) {
        wv[q] = B::load_unaligned(rows + q * sk + c);
        if (MB > 1 && MB <= 4) keep_in_register(wv[q]);  // (see dot_block)
      }
      MOE_UNROLL for (std::size_t j = 0; j < MB; ++j) {
        B xv = B::load_unaligned(x + j * ldx + c);
        if (NB > 1) keep_in_register(xv);
        MOE_UNROLL for (std::size_t q = 0; q < NB; ++q) acc[j][q] = simd::fma(xv, wv[q], acc[j][q]);
      }
    }
    MOE_UNROLL for (std::size_t j = 0; j < MB; ++j)
      MOE_UNROLL for (std::size_t q = 0; q < NB; ++q) out[j * ldo + b + q * s] = reduce_add(acc[j][q]);
    if (c < k) add_stream_tails<MB, NB>(x, ldx, rows, s, c, k, out + b, ldo);
  }
}

// out [MB, n] (rows ldo apart) = x [MB, k] (rows ldx apart) · w [n, k]ᵀ, streamed in blocks of NB rows
// (stream_blocks); the last n % NB rows one at a time, in address order.
template <std::size_t MB, std::size_t NB, class Arch, class T>
void stream_rows(Arch arch, const T* x, std::size_t ldx, const T* w, std::size_t k, std::size_t n, T* out,
                 std::size_t ldo, StreamAhead<T> after) noexcept {
  const std::size_t whole = n - n % NB;
  stream_blocks<MB, NB>(arch, x, ldx, w, k, whole / NB, out, ldo, after);
  if (whole < n) stream_blocks<MB, 1>(arch, x, ldx, w + whole * k, k, n - whole, out + whole, ldo, after);
}

// Whether an m × k product streams (stream_product) rather than going through for_token_blocks:
// - one token on any rows (dot_block does not chunk them either);
// - two tokens on rows whose two x rows fit kStreamPairBytes (of the 48 KiB L1): their blocks
//   stream whole long rows faster than dot_block's 4 KiB chunks. One thread, µs per product, medians
//   of 5 interleaved, 8-row blocks in address order then: 12 KiB rows (S3's down projection) 342 →
//   315, 14 KiB (S1's) 492 → 443, 16 KiB 594 → 549. (3 tokens on 10 KiB rows, 2-row blocks: 352 →
//   377, so no; nor in 4-row blocks a stream apart, session 46: 3–6 tokens on 12–14 KiB rows took
//   0.97–1.16 of the chunked time.)
// - 2–6 tokens on rows it would not chunk;
// - 7–8 tokens (with 32 registers) on rows of a page or more, whole cache lines long, whose x rows
//   fit kPackedXBytes together: S1's and S2's gate and up rows (d = 1024 floats), which a packed
//   block takes in address order (RowOrder leaves rows of a page as they are). In 2-row blocks a
//   stream apart, one thread, cold weights, a plain read ÷ the product: 7 tokens 0.63–0.65 →
//   0.72–0.74, 8 tokens 0.57–0.59 → 0.68–0.69; S1's gated product took 0.85–0.92 of its time
//   (bench/README.md, "Session 47"). Shorter rows, which RowOrder already takes a stream apart, did
//   not gain: 3 KiB rows 0.66–0.75 either way, 2 KiB rows at 8 tokens 0.74–0.76 → 0.66–0.67. Rows
//   not whole cache lines long (x rows off 64-byte boundaries) stay packed, whose copy realigns x.
inline constexpr std::size_t kStreamPairBytes = 32 * 1024;
template <class Arch, class T>
bool streams(std::size_t m, std::size_t k) noexcept {
  const std::size_t row_bytes = k * sizeof(T);
  if (m == 1 || (m == 2 && 2 * row_bytes <= kStreamPairBytes)) return true;
  if (m > std::min(kMaxStreamTokens, max_token_block<Arch>())) return false;
  if (!packed_block(m)) return row_bytes <= kChunkAboveBytes;
  return row_bytes >= kPageBytes && row_bytes % PanelPrefetch::kLineBytes == 0 && m * row_bytes <= kPackedXBytes;
}

// stream_rows for the m tokens of a batch that streams(), in blocks of stream_block_rows(m) rows;
// `after` is what the caller streams next.
template <class Arch, class T>
void stream_product(Arch arch, const T* x, std::size_t ldx, std::size_t m, const T* w, std::size_t k, std::size_t n,
                    T* out, std::size_t ldo, StreamAhead<T> after) noexcept {
  static_assert(kMaxStreamTokens == 8, "stream_product has one case per token count");
  if constexpr (max_token_block<Arch>() > 5) {  // (not compiled where blocks stop at 5)
    switch (m) {
      case 8: return stream_rows<8, stream_block_rows<Arch>(8)>(arch, x, ldx, w, k, n, out, ldo, after);
      case 7: return stream_rows<7, stream_block_rows<Arch>(7)>(arch, x, ldx, w, k, n, out, ldo, after);
      case 6: return stream_rows<6, stream_block_rows<Arch>(6)>(arch, x, ldx, w, k, n, out, ldo, after);
      default: break;
    }
  }
  switch (m) {
    case 5: return stream_rows<5, stream_block_rows<Arch>(5)>(arch, x, ldx, w, k, n, out, ldo, after);
    case 4: return stream_rows<4, stream_block_rows<Arch>(4)>(arch, x, ldx, w, k, n, out, ldo, after);
    case 3: return stream_rows<3, stream_block_rows<Arch>(3)>(arch, x, ldx, w, k, n, out, ldo, after);
    case 2: return stream_rows<2, stream_block_rows<Arch>(2)>(arch, x, ldx, w, k, n, out, ldo, after);
    default: return stream_rows<1, stream_block_rows<Arch>(1)>(arch, x, ldx, w, k, n, out, ldo, after);
  }
}

// Weight rows per panel for n rows of k elements against m tokens (at least one register block).
// - A batch that is one token block (one_block) reads each panel once: the panel
//   need not stay in L2, and longer panels (up to kStreamPanelBytes, at least kMinPanels of them
//   for the threads to share) keep the row streams going across fewer panel starts. One thread,
//   alternating binaries: S1 at T = 16 13.2–13.5 → 12.3–12.9 ms, S3 at T = 128 22.9–23.3 →
//   21.9–22.1 ms. Chunked rows stay at kMaxChunkedRows (the parking space).
// - Otherwise the panel is met by every token block and stays within kPanelBytes of L2, but
//   with 64 tokens or more (compute bound) panels of long rows grow to kMaxChunkedRows rows within
//   kLongPanelBytes: each token block reads its rows of x once per panel, so few rows per panel
//   make x the larger stream. S1's down projection (128 tokens on 14 KiB rows, 8 → 32 rows per
//   panel): 137 → 146–170 GFLOP/s on one thread; the layer at T = 512 on 2 threads, 73.0 / 69.4 →
//   67.5 / 67.4 ms.
inline constexpr std::size_t kStreamPanelBytes = 768 * 1024;
inline constexpr std::size_t kMinPanels = 8;
inline constexpr std::size_t kLongPanelBytes = 512 * 1024;
template <class Arch, class T>
std::size_t panel_rows(std::size_t k, std::size_t m, std::size_t n) noexcept {
  const std::size_t row_bytes = std::max<std::size_t>(k, 1) * sizeof(T);
  std::size_t rows = kPanelBytes / row_bytes;
  if (one_block<Arch, T>(m, k)) {
    rows = std::max(rows, std::min(kStreamPanelBytes / row_bytes, n / kMinPanels));
    if (chunks_rows(m, row_bytes)) rows = std::min(rows, kMaxChunkedRows);
  } else if (m >= 64) {
    rows = std::max(rows, std::min(kMaxChunkedRows, kLongPanelBytes / row_bytes));
  }
  return std::max(kMaxBlockRows, rows - rows % kMaxBlockRows);
}

// Rows per panel once n rows in panels of at most `panel` rows are shared by `threads` threads: the
// panel count rounded up to a multiple of the thread count and the rows spread evenly over them (in
// multiples of `granule`), so that no thread gets a larger share. Few panels are where it matters:
// a router's 128 rows of 4 KiB at T = 16 were panels of 48, 48 and 32 rows, on which 2 threads took
// 1.03 of one thread's time, and its 16 rows of 16 KiB at T = 128 one panel, which left the second
// thread idle; as 4 panels of 32 and 2 of 8 rows, 0.66 and 0.60 (cold weights; bench/README,
// "Session 41"). The bits do not change: no row's sum depends on the panel it is in.
inline std::size_t even_panel_rows(std::size_t panel, std::size_t n, std::size_t granule, int threads) noexcept {
  if (threads < 2) return panel;
  const auto t = static_cast<std::size_t>(threads);
  const std::size_t panels = ((n + panel - 1) / panel + t - 1) / t * t;
  const std::size_t rows = (n + panels - 1) / panels;
  return std::min(panel, (rows + granule - 1) / granule * granule);
}

// Rows [begin, end) of panel p, of `panel` rows each, among n rows.
struct RowRange {
  std::size_t begin, end;
};
inline RowRange panel_range(std::ptrdiff_t p, std::size_t panel, std::size_t n) noexcept {
  const std::size_t begin = static_cast<std::size_t>(p) * panel;
  return {begin, std::min(n, begin + panel)};
}

// The order in which a panel's register blocks take its rows, for a batch that is one token block
// (its only pass over the weights, from memory). Rows shorter than a 4 KiB page, taken in address
// order (block i: rows nb·i .. nb·i + nb - 1), share pages between a block's row streams, and each
// stream stops where the next block's rows begin: the L2's prefetcher, which follows a stream within
// a page, barely ran them, and cold blocks of 2 KiB rows pulled 11–15 GB/s. So block i takes rows
// i, i + s, i + 2s, ... (s = units / nb): each of its nb streams reads on through memory from one
// block to the next; the rows past nb·s follow in order. Which block computes a row changes none of
// its bits (batch isolation relies on that already). Cold weights, one thread, 7–10 tokens (bench/
// README.md, "Session 43"): the product alone, S2's down projection (2 KiB rows) 0.62–0.95 of the
// time and S3's up projection (3 KiB) 0.69–0.95; one expert (compare_bench) at 8 tokens, S2 0.92–0.98
// and S3 0.92–0.93. Rows of a page or more keep their order (AddressOrder), and so do batches of
// several token blocks, whose later blocks read the panel from L2.
struct RowOrder {
  std::size_t nb, stride, whole;
  RowOrder(std::size_t units, std::size_t rows_per_block) noexcept
      : nb(rows_per_block), stride(units / rows_per_block), whole(units - units % rows_per_block) {}
  // The row unit u reads.
  std::size_t operator()(std::size_t u) const noexcept { return u < whole ? u / nb + (u % nb) * stride : u; }
  // How far apart the rows of the block starting at unit u lie.
  std::size_t step(std::size_t u) const noexcept { return u < whole ? stride : 1; }
};
// Address order, RowOrder's interface known at compile time: every other batch's loop compiles as
// it did before RowOrder (through RowOrder's run-time arithmetic those ran 1.005–1.035× as long).
struct AddressOrder {
  std::size_t operator()(std::size_t u) const noexcept { return u; }
  std::size_t step(std::size_t) const noexcept { return 1; }
};

// y [m, r0:r1) = x [m, k] · w[r0:r1)ᵀ for one panel of weight rows, fetching `ahead` meanwhile.
template <class Arch, class T>
void panel_product(Arch arch, const T* x, std::size_t ldx, std::size_t m, std::size_t k, const T* w, std::size_t r0,
                   std::size_t r1, T* y, std::size_t ldy, const PanelPrefetch& ahead) noexcept {
  if (streams<Arch, T>(m, k))
    return stream_product(arch, x, ldx, m, w + r0 * k, k, r1 - r0, y + r0, ldy, rows_ahead<T>(ahead, 0, k));
  auto in_order = [&](const auto& order) {
    for_token_blocks<1>(
        arch, x, ldx, m, k, r1 - r0, [&](std::size_t u, const T** ptrs) { ptrs[0] = w + (r0 + order(u)) * k; },
        [&](std::size_t j, std::size_t mb, std::size_t u, std::size_t count, const T* out) {
          const std::size_t first = r0 + order(u), step = order.step(u);
          for (std::size_t a = 0; a < mb; ++a)
            for (std::size_t b = 0; b < count; ++b) y[(j + a) * ldy + first + b * step] = out[a * count + b];
        },
        ahead);
  };
  if (k * sizeof(T) < kPageBytes && one_block<Arch, T>(m, k)) {
    in_order(RowOrder(r1 - r0, block_rows<Arch>(m, 1)));
  } else {
    in_order(AddressOrder{});
  }
}

// ---- the lane-split product (lane_product.hpp): many tokens -----------------------------------------

// The fewest tokens in a tile of lane_tile_tokens below, for kMinLaneTokens tokens or more. m tokens
// take t = ceil(m / M) tiles (M = max_lane_tile_tokens), so m > M · (t - 1), and each tile holds
// floor(m / t) tokens or one more: at least M - 1 where t ≥ M - 1, and at least M - 2 where 2t ≥ M - 1.
// t grows with m, so the fewest tiles, ceil(kMinLaneTokens / M), decide: AVX2 tiles (M = 6, t ≥ 16)
// hold 5 or 6 tokens, AVX-512 tiles (M = 14, t ≥ 7) 12 to 14.
template <class Arch>
constexpr std::size_t min_lane_tile_tokens() noexcept {
  constexpr std::size_t most = max_lane_tile_tokens<Arch>(), tiles = (kMinLaneTokens + most - 1) / most;
  static_assert(2 * tiles + 1 >= most, "tiles of at least M - 2 tokens (lane_rows compiles no fewer)");
  return tiles + 1 >= most ? most - 1 : most - 2;
}

// The token tile starting at token j of m: ceil(m / max_lane_tile_tokens) tiles of near-equal size.
template <class Arch>
std::size_t lane_tile_tokens(std::size_t j, std::size_t m) noexcept {
  constexpr std::size_t most = max_lane_tile_tokens<Arch>();
  const std::size_t tiles = (m + most - 1) / most, size = m / tiles, of_size = tiles - m % tiles;
  return j < size * of_size ? size : size + 1;
}

// x [m, k] (rows ldx apart) packed into this thread's buffer 0 where an m × k × n product takes the
// lane-split product (lane_split), tile by tile (pack_lanes): the tile starting at token j at
// j · L · (k / L), L the float lanes. Else, or where the buffer could not grow, null.
template <class Arch, class T>
const float* lane_packed_tokens(Arch, const T* x, std::size_t ldx, std::size_t m, std::size_t k,
                                std::size_t n) noexcept {
#if MOE_LANE_PRODUCT
  if constexpr (has_lane_product<Arch, T>()) {
    if (!lane_split<Arch, T>(m, k, n)) return nullptr;
    constexpr std::size_t L = lanes<float, Arch>();
    const std::size_t s = k / L;
    float* const packed = lane_buffer<0>().reserve(m * L * s);
    if (packed == nullptr) return nullptr;
    for (std::size_t j = 0, mb = 0; j < m; j += mb) {
      mb = lane_tile_tokens<Arch>(j, m);
      pack_lanes(Arch{}, x + j * ldx, ldx, mb, s, mb, packed + j * L * s);
    }
    return packed;
  }
#endif
  (void)x, (void)ldx, (void)m, (void)k, (void)n;
  return nullptr;
}

// The lane-split product of x (packed_x: lane_packed_tokens; x itself serves the k % L tails) with
// rows [r0, r1) of U weight matrices w[u] ([n, k]), R = lane_tile_rows rows at a time, whose rows this
// thread packs into its buffer 1. finish(j, mb, row, rows, out) receives a block's dots for tokens
// j .. j + mb and rows row .. row + rows: out[u][a · R + q], token j + a with row `row + q` of w[u].
// Meanwhile the block's successor is fetched into L2, spread over its tiles: the panel's next block,
// or after its last the next panel's first rows (`ahead`). False, having done nothing, where the
// buffer could not grow or Arch and T have no lane-split product.
template <std::size_t U, class Arch, class T, class Finish>
bool lane_rows(Arch arch, const float* packed_x, const T* x, std::size_t ldx, std::size_t m, std::size_t k,
               const T* const* w, std::size_t r0, std::size_t r1, const PanelPrefetch& ahead,
               Finish&& finish) noexcept {
#if MOE_LANE_PRODUCT
  if constexpr (has_lane_product<Arch, T>()) {
    using B = batch<float, Arch>;
    constexpr std::size_t L = B::size, R = lane_tile_rows<Arch>(), most = max_lane_tile_tokens<Arch>();
    constexpr std::size_t least = min_lane_tile_tokens<Arch>();
    const std::size_t s = k / L, block = R * L * s;
    float* const packed_w = lane_buffer<1>().reserve(U * block);
    if (packed_w == nullptr) return false;
    const std::size_t tiles = (m + most - 1) / most;
    alignas(64) float out[U][most * R];
    for (std::size_t row = r0; row < r1; row += R) {
      const std::size_t rows = std::min(R, r1 - row);
      for (std::size_t u = 0; u < U; ++u) pack_lanes(arch, w[u] + row * k, k, rows, s, R, packed_w + u * block);
      PanelPrefetch next;
      std::size_t bytes = 0;
      for (std::size_t u = 0; u < U; ++u) {
        const std::size_t after = row + rows;  // the next block's first row
        const StreamAhead<float> region =
            after < r1 ? StreamAhead<float>{w[u] + after * k, r1 - after} : rows_ahead<float>(ahead, u, k);
        const std::size_t count = std::min(R, region.rows);
        if (count == 0) continue;
        next.add(region.first, region.first + count * k);
        bytes += count * k * sizeof(float);
      }
      const std::size_t lines = bytes / PanelPrefetch::kLineBytes, calls = tiles * L * U;
      const std::size_t per_call = (lines + calls - 1) / calls;
      auto fetch = [&] {
        for (std::size_t q = 0; q < per_call && !next.done(); ++q) {
          prefetch<2>(next.at[0]);
          next.advance(next.at[0] + PanelPrefetch::kLineBytes);
        }
      };
      for (std::size_t j = 0, mb = 0; j < m; j += mb) {
        mb = lane_tile_tokens<Arch>(j, m);
        const float* const xp = packed_x + j * L * s;
        for (std::size_t u = 0; u < U; ++u) {
          B sums[2 * most];
          switch (most - mb) {
            case 0: lane_tile<most>(arch, xp, packed_w + u * block, s, sums, fetch); break;
            case 1: lane_tile<most - 1>(arch, xp, packed_w + u * block, s, sums, fetch); break;
            default: lane_tile<least>(arch, xp, packed_w + u * block, s, sums, fetch); break;  // (most - 2 or most - 1)
          }
          for (std::size_t a = 0; a < mb; ++a) {
            sums[2 * a].store_aligned(out[u] + a * R);
            sums[2 * a + 1].store_aligned(out[u] + a * R + L);
          }
          if (k % L != 0)
            for (std::size_t a = 0; a < mb; ++a)
              for (std::size_t q = 0; q < rows; ++q)
                out[u][a * R + q] = add_tail(out[u][a * R + q], x + (j + a) * ldx, w[u] + (row + q) * k, L * s, k);
        }
        finish(j, mb, row, rows, out);
      }
    }
    return true;
  }
#endif
  (void)arch, (void)packed_x, (void)x, (void)ldx, (void)m, (void)k, (void)w, (void)r0, (void)r1, (void)ahead;
  (void)finish;
  return false;
}

// Grows the lane-split product's buffers (lane_buffer) for products of up to m tokens on rows of up
// to k elements, on this thread and, outside a parallel region, on each OpenMP thread (any of them
// may run an expert's products): a layer's reserve calls it, so that its first batches allocate
// nothing. False where an allocation failed (those products then take the dot kernel).
template <class Arch, class T>
bool reserve_lane_buffers(std::size_t m, std::size_t k) noexcept {
  constexpr std::size_t R = lane_tile_rows<Arch>();
  if (!lane_split<Arch, T>(m, k, kMinLaneRows)) return true;
  std::atomic<bool> reserved{true};
  auto reserve_here = [&] {
    if (lane_buffer<0>().reserve(m * k) == nullptr || lane_buffer<1>().reserve(2 * R * k) == nullptr)
      reserved = false;
  };
  reserve_here();
  const int threads = in_parallel() ? 1 : max_threads();
  if (threads > 1) parallel_for(threads, true, [&](std::ptrdiff_t) { reserve_here(); });
  return reserved;
}

// y [m, n] = x [m, k] · w [n, k]ᵀ over weight panels of `panel` rows. With `parallel` the threads
// take the panels one at a time as they free up, each claiming its next panel before it starts the
// current one so that it can fetch it ahead (for_each_ahead).
template <class Arch, class T>
void panel_products(Arch arch, const T* x, std::size_t ldx, std::size_t m, std::size_t k, const T* w, std::size_t n,
                    T* y, std::size_t ldy, std::size_t panel, bool parallel) noexcept {
  const auto panels = static_cast<std::ptrdiff_t>((n + panel - 1) / panel);
  const float* const packed_x = lane_packed_tokens(arch, x, ldx, m, k, n);  // (for the whole team)
  for_each_ahead(panels, parallel, [&](std::ptrdiff_t p, std::ptrdiff_t next) {
    const RowRange rows = panel_range(p, panel, n);
    PanelPrefetch ahead;
    if (next < panels) {
      const RowRange next_rows = panel_range(next, panel, n);
      ahead.add(w + next_rows.begin * k, w + next_rows.end * k);
    }
    const T* const weights[1] = {w};
    auto store = [&](std::size_t j, std::size_t mb, std::size_t row, std::size_t count, const auto& out) {
      for (std::size_t a = 0; a < mb; ++a) {
        const float* const dots = out[0] + a * lane_tile_rows<Arch>();
        std::copy(dots, dots + count, y + (j + a) * ldy + row);
      }
    };
    if (packed_x != nullptr && lane_rows<1>(arch, packed_x, x, ldx, m, k, weights, rows.begin, rows.end, ahead, store))
      return;
    panel_product(arch, x, ldx, m, k, w, rows.begin, rows.end, y, ldy, ahead);
  });
}

// Tokens each thread takes, at least, where threads share a product's tokens rather than its
// panels: each reads the whole of w, which few tokens would not pay for. A router's 8 rows, 1 → 2
// threads, cold (bench/README, "Session 41"): 16 tokens each on 16 KiB rows 0.78–0.82 as long, 64
// on 4 KiB rows 0.74–0.77, 256 or more 0.50–0.58.
inline constexpr std::size_t kMinThreadTokens = 16;

// y [m, n] = x [m, k] · w [n, k]ᵀ; x rows `ldx` apart, y rows `ldy` apart. Threads
// (MOE_USE_OPENMP) share the weight panels (panel_products, even_panel_rows) where it is
// worth_threads. With fewer panels than threads (a router over 8 experts is one panel of 8 rows)
// they share the tokens instead, each running every panel over its own run of them; a token's row
// does not depend on the other tokens (batch isolation), so the bits do not change either way.
template <class Arch, class T>
void matmul_nt_strided(Arch arch, const T* x, std::size_t ldx, std::size_t m, std::size_t k, const T* w, std::size_t n,
                       T* y, std::size_t ldy) noexcept {
  if (m == 0 || n == 0) return;
  const bool parallel = open_region(worth_threads<T>(m, n, k));
  const int team = parallel ? max_threads() : 1;
  const auto threads = static_cast<std::size_t>(team);
  const std::size_t panel = lane_split<Arch, T>(m, k, n)
                                ? even_panel_rows(kLanePanelRows, n, lane_tile_rows<Arch>(), team)
                                : even_panel_rows(panel_rows<Arch, T>(k, m, n), n, kMaxBlockRows, team);
  if (parallel && (n + panel - 1) / panel < threads && m >= threads * kMinThreadTokens) {
    const std::size_t share = (m + threads - 1) / threads;
    parallel_for(static_cast<std::ptrdiff_t>(threads), true, [&](std::ptrdiff_t i) {
      const std::size_t j0 = std::min(m, static_cast<std::size_t>(i) * share), rows = std::min(m - j0, share);
      if (rows == 0) return;
      const std::size_t own_panel = panel_rows<Arch, T>(k, rows, n);
      panel_products(arch, x + j0 * ldx, ldx, rows, k, w, n, y + j0 * ldy, ldy, own_panel, false);
    });
    return;
  }
  panel_products(arch, x, ldx, m, k, w, n, y, ldy, panel, parallel);
}

// y [m, n] = x [m, k] · w [n, k]ᵀ with contiguous x rows.
template <class Arch, class T>
void matmul_nt(Arch arch, const T* x, std::size_t m, std::size_t k, const T* w, std::size_t n, T* y,
               std::size_t ldy) noexcept {
  matmul_nt_strided(arch, x, k, m, k, w, n, y, ldy);
}

// Gate/up row pairs per panel of the gated product: a multiple of kGatedChunk, so every panel
// starts on a vector boundary of the h row and only the last one has a partial vector for the
// epilogue (which gives each element the bits of gated_hidden_rows below wherever panels split a
// row: its tail goes through the batch form too), and at most kMaxPanelPairs (its stack buffers).
inline constexpr std::size_t kGatedChunk = 16;  // ≥ the lane count of every arch and type
inline constexpr std::size_t kMaxPanelPairs = 256;
template <class Arch, class T>
std::size_t gated_panel_pairs(std::size_t k, std::size_t m, std::size_t n) noexcept {
  const std::size_t pairs = std::min(kMaxPanelPairs, panel_rows<Arch, T>(k, m, 2 * n) / 2);
  return std::max(kGatedChunk, pairs - pairs % kGatedChunk);
}

// gate[0, n) = act(gate) ⊙ up for one activation (gated_activate<Activation>), passed to the gated
// product by pointer: its panel loop and register blocks are then compiled once per arch and type,
// not once per activation (the tests, or a model with SwiGLU and GeGLU experts, use several).
template <class Arch, class T>
using GatedEpilogue = void (*)(Arch, T*, const T*, std::size_t) noexcept;

// Gated projection: h [m, n] = act(x · w_gateᵀ) ⊙ (x · w_upᵀ), both weights [n, k]; h rows `ldh`
// apart. Gate row r and up row r sit in one register block; a token block's gate and up dots for
// a panel wait in two small buffers and get the activation vectorized (`activate`), so the [m, n]
// gate and up products are never stored.
template <class Arch, class T>
void gated_matmul_nt_with(Arch arch, const T* x, std::size_t m, std::size_t k, const T* w_gate, const T* w_up,
                          std::size_t n, T* h, std::size_t ldh, GatedEpilogue<Arch, T> activate) noexcept {
  if (m == 0 || n == 0) return;
  const bool parallel = open_region(worth_threads<T>(m, n, k, 2));
  const int threads = parallel ? max_threads() : 1;
  const bool lane = lane_split<Arch, T>(m, k, n);
  const std::size_t panel = lane ? even_panel_rows(kLanePanelRows, n, lane_tile_rows<Arch>(), threads)
                                 : even_panel_rows(gated_panel_pairs<Arch, T>(k, m, n), n, kGatedChunk, threads);
  const auto panels = static_cast<std::ptrdiff_t>((n + panel - 1) / panel);
  const float* const packed_x = lane_packed_tokens(arch, x, k, m, k, n);  // (for the whole team)
  for_each_ahead(panels, parallel, [&](std::ptrdiff_t p, std::ptrdiff_t next) {
    const RowRange rows = panel_range(p, panel, n);
    const std::size_t r0 = rows.begin, r1 = rows.end;
    PanelPrefetch ahead;
    if (next < panels) {
      const RowRange next_rows = panel_range(next, panel, n);
      ahead.add(w_gate + next_rows.begin * k, w_gate + next_rows.end * k);
      ahead.add(w_up + next_rows.begin * k, w_up + next_rows.end * k);
    }
    const T* const weights[2] = {w_gate, w_up};
    auto activate_rows = [&](std::size_t j, std::size_t mb, std::size_t row, std::size_t count, auto& out) {
      for (std::size_t a = 0; a < mb; ++a) {
        T* const gate = out[0] + a * lane_tile_rows<Arch>();
        activate(arch, gate, out[1] + a * lane_tile_rows<Arch>(), count);
        std::copy(gate, gate + count, h + (j + a) * ldh + row);
      }
    };
    if (packed_x != nullptr && lane_rows<2>(arch, packed_x, x, k, m, k, weights, r0, r1, ahead, activate_rows)) return;
    T gate[kMaxTokenBlock][kMaxPanelPairs];
    T up[kMaxTokenBlock][kMaxPanelPairs];
    auto finish = [&](std::size_t a, std::size_t token) {  // the dots of gate[a], up[a] are complete
      activate(arch, gate[a], up[a], r1 - r0);
      std::copy(gate[a], gate[a] + (r1 - r0), h + token * ldh + r0);
    };
    if (streams<Arch, T>(m, k)) {  // the gate rows, then the up rows
      stream_product(arch, x, k, m, w_gate + r0 * k, k, r1 - r0, gate[0], kMaxPanelPairs,
                     StreamAhead<T>{w_up + r0 * k, r1 - r0});
      stream_product(arch, x, k, m, w_up + r0 * k, k, r1 - r0, up[0], kMaxPanelPairs, rows_ahead<T>(ahead, 0, k));
      for (std::size_t a = 0; a < m; ++a) finish(a, a);
      return;
    }
    for_token_blocks<2>(
        arch, x, k, m, k, r1 - r0,
        [&](std::size_t u, const T** ptrs) {
          ptrs[0] = w_gate + (r0 + u) * k;
          ptrs[1] = w_up + (r0 + u) * k;
        },
        [&](std::size_t j, std::size_t mb, std::size_t u, std::size_t count, const T* out) {
          for (std::size_t a = 0; a < mb; ++a)
            for (std::size_t q = 0; q < count; ++q) {
              gate[a][u + q] = out[(a * count + q) * 2];
              up[a][u + q] = out[(a * count + q) * 2 + 1];
            }
          if (u + count < r1 - r0) return;  // the panel's last unit: the block's dots are complete
          for (std::size_t a = 0; a < mb; ++a) finish(a, j + a);
        },
        ahead);
  });
}

// h [m, n] = act(x · w_gateᵀ) ⊙ (x · w_upᵀ) with Activation's act (gated_matmul_nt_with).
template <class Activation, class Arch, class T>
void gated_matmul_nt(Arch arch, const T* x, std::size_t m, std::size_t k, const T* w_gate, const T* w_up, std::size_t n,
                     T* h, std::size_t ldh) noexcept {
  gated_matmul_nt_with(arch, x, m, k, w_gate, w_up, n, h, ldh, &gated_activate<Activation, Arch, T>);
}

// The same epilogue for whole rows (MoE training keeps the gate and up products): hidden [m, n] =
// act(gate) ⊙ up with gated_matmul_nt's rounding, element for element.
template <class Activation, class Arch, class T>
void gated_hidden_rows(Arch arch, const T* gate, const T* up, std::size_t m, std::size_t n, T* hidden) noexcept {
  std::copy(gate, gate + m * n, hidden);
  for (std::size_t j = 0; j < m; ++j) gated_activate<Activation>(arch, hidden + j * n, up + j * n, n);
}

}  // namespace simd
MOE_NAMESPACE_END
