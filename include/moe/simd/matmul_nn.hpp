#pragma once
// y [m, n] = x [m, k] · w [k, n] (or y += x · w), all row-major: backward's products against a
// weight in the nn.Linear layout, such as dx = dh · W with W [out, in] = [k, n].
//
// Every element is one chain of multiply-adds (fused where the target has FMA) over i = 0 .. k-1,
// starting from 0 (or from the y it adds to), whatever m is and whichever block or thread computes
// it. So a token's row of dx depends neither on the other tokens of its batch nor on the thread
// count (batch isolation, README, "Guarantees"). Eigen's GEMM does not promise this: with AVX-512
// its rounding of a row changed with the row's place in the block, and dx changed under a
// permutation of the batch.
//
// matmul_tn, y (+)= xᵀ · w, is the same with x read transposed: the weight gradients, summed over
// the tokens.
//
// Blocking: columns in panels of nn_panel_vectors() vectors (threads take whole panels); the depth
// in chunks of kNNDepthChunk rows of w (or kNNDeepChunk, below), so a panel's chunk stays in cache
// while every token block meets it. Between chunks the running sums wait in y: the chain goes on
// with the same bits. A shallow w (one chunk, at most kNNShallowBytes) stays in cache whole, and
// then y is the stream: threads take row blocks, each running over every panel. So do they when w
// is one panel wide (Soft MoE's logits x · Φ with few slots), which would otherwise leave one
// thread all the work. Few rows of y (kNNBandTokens) against a deep w take it in bands of a few
// rows, several panels wide, so that w is read along its rows.
//
// Packing, where threads take single panels: a full panel read by more than one token block copies
// each depth chunk of w into one block on the stack (packed_panel; rows of w are far apart, a page
// or more, so a chunk read in place touched 128 pages for every token block, more than the TLB
// holds). Where y's panel outgrows the cache, the chunks are deeper (kNNDeepChunk). matmul_tn, whose
// x is read down its columns, also packs x's token blocks into scratch when its caller passes some,
// chunk by chunk, where that pays (tn_packs_x: three panels or more, or x's rows pages apart), and
// where that packed x is large, takes the depth one chunk at a time outside the panels
// (kTNGroupBytes). A weight gradient written over in one pass over the depth may go past the caches
// (YStore, streams_y). None of this changes an operand or the order of the sums.
#include <algorithm>
#include <cstddef>
#include <cstdint>

#include "../core/config.hpp"
#include "../core/threads.hpp"
#include "arch.hpp"

MOE_NAMESPACE_BEGIN
namespace simd {

inline constexpr std::size_t kNNTokenBlock = 6;    // token rows per register block
inline constexpr std::size_t kNNDepthChunk = 128;  // rows of w per depth chunk
inline constexpr std::size_t kNNShallowBytes = 262144;  // a shallow w: row blocks outside, panels inside
inline constexpr std::size_t kNNPrefetchTokens = 32;    // rows of y from which a packed panel fetches ahead
// A packed panel's depth chunk: kNNDepthChunk rows (32 KiB on AVX-512, within L1) while the
// panel's part of y stays in cache (up to kNNCachedPanelBytes), else kNNDeepChunk rows, so that
// the sums wait in y, which is read and written again, 4 times less often. (backward_bench, S1's
// products, one thread, medians of 3, two runs: where y's panel was larger, 128-row chunks ran at
// 0.77–1.00 of 512-row chunks' rate; where it was 32–64 KiB, 512-row chunks at 0.89–0.94 of
// 128-row chunks'.)
inline constexpr std::size_t kNNDeepChunk = 512;
inline constexpr std::size_t kNNCachedPanelBytes = 65536;
static_assert(kNNDeepChunk % kNNDepthChunk == 0, "a narrow panel's in-place chunks lie within packed x's chunks");
// matmul_tn with x packed and larger than kTNGroupBytes takes the depth in slabs of one chunk,
// outermost (GotoBLAS's order): every panel meets one slab of packed x before the next, so the
// slab, m · chunk elements, is read from cache by all the panels, however deep x is. Where a slab
// has more rows than kTNGroupBytes holds (rounded down to whole token blocks), y's rows go in
// groups of that many, each over every panel; w's panel chunks are copied once per group. (A weight
// gradient, m = 3,584, n = 1,024, one thread: over 8,192 tokens 0.80 of the time of session 55's
// order, y's rows in groups holding 8 MiB of all of packed x, which beyond 8,192 tokens could not
// hold even its least group of 256 rows within that; over 2,048 tokens 0.93–0.97.)
inline constexpr std::size_t kTNGroupBytes = std::size_t(8) << 20;

// Up to kNNBandTokens rows of y, where threads would take panels, the product goes in bands
// instead: threads take groups of whole panels, kNNBandBytes of each row of w, and in each the depth
// goes kNNBandRows rows at a time, every token block and panel meeting a band before the next. Few
// token rows do little arithmetic per element of w, so reading w is the cost; a panel alone down
// the depth read one to four lines of every row of w, rows a page or more apart, which the hardware
// prefetchers hardly follow. In bands, w is read 2 KiB (32 lines) of a row at a time. dx = d_gate ·
// W [3,584, 1,024] and dh = dy · W [1,024, 3,584] on cold weights, one thread, AMD EPYC (Zen 3,
// AVX2), against a read of the same weights in the same iterations (medians of 41, two runs): 1–6
// tokens 0.33–0.62 of the panels' time, 8–16 0.50–0.80, 24 0.84–0.96, and from 32 on slower. Bands
// of 8 rows were as fast at 1–2 tokens and slower from 4, of 32 rows slower up to 16 tokens (1.2–1.7×
// at 1–6); fetching the next band in software was no faster. (session 58)
inline constexpr std::size_t kNNBandRows = 16;
inline constexpr std::size_t kNNBandBytes = 2048;
inline constexpr std::size_t kNNBandTokens = 24;

// Vectors of columns per register block: 6 × 4 accumulators + 4 loads + 1 broadcast fit AVX-512's
// 32 vector registers; 6 × 2 + 2 + 1 fit the 16 of AVX2 and SSE. (6 rows and depth chunks of 128
// — a panel's chunk is 32 KiB in float, within L1 — made backward_bench's train steps 1.24–1.46×
// faster than 4 rows and chunks of 256 at T ≥ 128.)
template <class Arch>
constexpr std::size_t nn_panel_vectors() noexcept {
  return vector_registers<Arch>() >= 32 ? 4 : 2;
}

// Columns of y per panel: nn_panel_vectors() vectors of T.
template <class Arch, class T>
constexpr std::size_t nn_panel_columns() noexcept {
  return nn_panel_vectors<Arch>() * batch<T, Arch>::size;
}

// y[j, 0 : NV·L) for j < MB over `depth` rows of w from its pointer: the sums start from 0 when
// `from_zero`, else from y. x rows ldx apart, w rows ldw apart, y rows ldy apart (pointers at the
// block's first row and column). With `stream`, y's rows start on 64-byte lines and go past the
// caches (store_line, where a vector is one line).
template <std::size_t MB, std::size_t NV, bool XT, class Arch, class T>
void nn_block(Arch, const T* x, std::size_t ldx, const T* w, std::size_t ldw, std::size_t depth, T* y, std::size_t ldy,
              bool from_zero, bool stream) noexcept {
  using B = batch<T, Arch>;
  constexpr std::size_t L = B::size;
  B acc[MB][NV];
  MOE_UNROLL for (std::size_t j = 0; j < MB; ++j)
    MOE_UNROLL for (std::size_t v = 0; v < NV; ++v) acc[j][v] = from_zero ? B(T(0)) : B::load_unaligned(y + j * ldy + v * L);
  for (std::size_t i = 0; i < depth; ++i) {
    B wv[NV];
    MOE_UNROLL for (std::size_t v = 0; v < NV; ++v) wv[v] = B::load_unaligned(w + i * ldw + v * L);
    MOE_UNROLL for (std::size_t j = 0; j < MB; ++j) {
      const B xv(x[XT ? i * ldx + j : j * ldx + i]);
      MOE_UNROLL for (std::size_t v = 0; v < NV; ++v) acc[j][v] = simd::fma(xv, wv[v], acc[j][v]);
    }
  }
  if (stream) {
    MOE_UNROLL for (std::size_t j = 0; j < MB; ++j)
      MOE_UNROLL for (std::size_t v = 0; v < NV; ++v) store_line(acc[j][v], y + j * ldy + v * L);
    return;
  }
  MOE_UNROLL for (std::size_t j = 0; j < MB; ++j)
    MOE_UNROLL for (std::size_t v = 0; v < NV; ++v) acc[j][v].store_unaligned(y + j * ldy + v * L);
}

// The last rem < L columns of the MB token rows, one vector wide: lanes past rem read on into w's
// next rows and are dropped, and rows where such a load would pass w's end (row `full_rows` on)
// are copied into a padded vector first. Each kept lane is the same chain of FMAs as a full
// vector's, so a column's bits do not depend on where it falls. (Taken as single columns, one
// scalar chain after another, Soft MoE's logits over 8 slots took 13x as long: routing_bench,
// T = 4096, 17.3 → 1.34 ms.)
template <std::size_t MB, bool XT, class Arch, class T>
void nn_tail(Arch, const T* x, std::size_t ldx, const T* w, std::size_t ldw, std::size_t depth, std::size_t full_rows,
             T* y, std::size_t ldy, bool from_zero, std::size_t rem) noexcept {
  using B = batch<T, Arch>;
  constexpr std::size_t L = B::size;
  alignas(64) T lanes[L] = {};
  B acc[MB];
  MOE_UNROLL for (std::size_t j = 0; j < MB; ++j) {
    if (!from_zero) std::copy(y + j * ldy, y + j * ldy + rem, lanes);
    acc[j] = B::load_aligned(lanes);
  }
  auto step = [&](std::size_t i, const B& wv) {
    MOE_UNROLL for (std::size_t j = 0; j < MB; ++j) acc[j] = simd::fma(B(x[XT ? i * ldx + j : j * ldx + i]), wv, acc[j]);
  };
  std::size_t i = 0;
  for (const std::size_t end = std::min(depth, full_rows); i < end; ++i) step(i, B::load_unaligned(w + i * ldw));
  for (; i < depth; ++i) {
    std::copy(w + i * ldw, w + i * ldw + rem, lanes);
    step(i, B::load_aligned(lanes));
  }
  MOE_UNROLL for (std::size_t j = 0; j < MB; ++j) {
    acc[j].store_aligned(lanes);
    std::copy(lanes, lanes + rem, y + j * ldy);
  }
}

// The columns [c0, c0 + width) of the MB token rows, width < NV·L: the last panel's, so they end
// at w's last column (w has k rows from its pointer). Whole vectors, then the rest (nn_tail).
template <std::size_t MB, bool XT, class Arch, class T>
void nn_narrow(Arch arch, const T* x, std::size_t ldx, const T* w, std::size_t ldw, std::size_t depth, std::size_t k,
               T* y, std::size_t ldy, bool from_zero, bool stream, std::size_t width) noexcept {
  constexpr std::size_t L = batch<T, Arch>::size;
  std::size_t c = 0;
  for (; c + L <= width; c += L) nn_block<MB, 1, XT>(arch, x, ldx, w + c, ldw, depth, y + c, ldy, from_zero, stream);
  if (c == width) return;
  const std::size_t rem = width - c;
  // A full load at row i ends (k - 1 - i) · ldw + rem - L elements short of w's last element, so
  // it stays within w on every row but the last ceil((L - rem) / ldw).
  const std::size_t spill_rows = ldw == 0 ? k : (L - rem + ldw - 1) / ldw;
  const std::size_t full_rows = k > spill_rows ? k - spill_rows : 0;
  nn_tail<MB, XT>(arch, x, ldx, w + c, ldw, depth, full_rows, y + c, ldy, from_zero, rem);
}

template <std::size_t MB, bool XT, class Arch, class T>
void nn_rows(Arch arch, const T* x, std::size_t ldx, const T* w, std::size_t ldw, std::size_t depth, std::size_t k,
             T* y, std::size_t ldy, bool from_zero, bool stream, std::size_t width) noexcept {
  constexpr std::size_t NV = nn_panel_vectors<Arch>();
  if (width == NV * batch<T, Arch>::size) nn_block<MB, NV, XT>(arch, x, ldx, w, ldw, depth, y, ldy, from_zero, stream);
  else nn_narrow<MB, XT>(arch, x, ldx, w, ldw, depth, k, y, ldy, from_zero, stream, width);
}

// Scratch elements matmul_tn takes to pack x [k, m]: its token blocks, kNNTokenBlock columns each,
// chunk by chunk of its rows.
constexpr std::size_t tn_packing_size(std::size_t k, std::size_t m) noexcept { return k * m; }

// Whether matmul_nn_any takes row blocks outside and every panel inside (a shallow w, or one panel),
// rather than giving the threads column panels.
template <class Arch, class T>
bool nn_rows_outside(std::size_t k, std::size_t n) noexcept {
  constexpr std::size_t panel = nn_panel_columns<Arch, T>();
  return (k <= kNNDepthChunk && k * n * sizeof(T) <= kNNShallowBytes) || n <= panel;
}

// Whether matmul_nn_any takes y's m rows in bands (kNNBandTokens, above): few rows where threads
// would otherwise take panels.
template <class Arch, class T>
bool nn_bands(std::size_t m, std::size_t k, std::size_t n) noexcept {
  return m <= kNNBandTokens && !nn_rows_outside<Arch, T>(k, n);
}

// Whether matmul_tn, given scratch, packs x [k, m] (rows ldx apart) for y [m, n]: where threads take
// single column panels (not bands), and either kTNMinPackedPanels panels or more read the copy, or
// x's rows are a whole number of pages apart (read in place, a token block's lines then fall in the
// same few L1 sets). Elsewhere the copy costs more than it saves. Soft MoE's dΦ = xᵀ · dP
// (m = d, n = slots), two threads, 256–4,096 tokens: over 128 slots (2 panels) with d = 768,
// 1.06–1.34× the time packed; with d = 1,024 (512 and 2,048 tokens), 0.75–0.89; over 192 slots
// (3 panels), d = 768, 0.90–1.01 (one thread 0.61–0.95). (session 57)
inline constexpr std::size_t kTNMinPackedPanels = 3;
template <class Arch, class T>
bool tn_packs_x(std::size_t k, std::size_t m, std::size_t n, std::size_t ldx) noexcept {
  constexpr std::size_t panel = nn_panel_columns<Arch, T>();
  if (k == 0 || m == 0 || nn_rows_outside<Arch, T>(k, n) || nn_bands<Arch, T>(m, k, n)) return false;
  return (n + panel - 1) / panel >= kTNMinPackedPanels || ldx * sizeof(T) % kPageBytes == 0;
}

// Where pack_token_blocks puts row i0 of the token block at column j (mb columns wide), for chunks
// of `chunk` rows: chunk by chunk, and within a chunk block after block, row after row, so that
// the token blocks meeting one depth chunk read one stream. (With each block's rows whole, one
// block after another, a chunk's blocks were 12 KiB pieces 48 KiB apart at 2,048 tokens, for the
// hardware prefetchers to pick up afresh each time; this layout alone took 0.88–0.95 of the time
// of such a weight gradient on one thread.)
constexpr std::size_t packed_token_offset(std::size_t k, std::size_t m, std::size_t chunk, std::size_t i0,
                                          std::size_t j, std::size_t mb) noexcept {
  const std::size_t first = i0 / chunk * chunk;  // the chunk's first row
  return first * m + j * std::min(chunk, k - first) + (i0 - first) * mb;
}

// x [k, m] (rows ldx apart) into `packed`, as packed_token_offset says. Threads take tiles of 16
// rows, read whole, and write each block's 16 rows at once: a few whole cache lines. (Row by row,
// every block's piece a copy of runtime length, which g++ made a memmove call, the packing took
// 10–16% of a weight gradient over 512–2,048 tokens, one thread; now 5–9%.)
template <class T>
void pack_token_blocks(const T* x, std::size_t ldx, std::size_t k, std::size_t m, std::size_t chunk, T* packed,
                       bool parallel) noexcept {
  constexpr std::size_t kRowTile = 16;
  static_assert(kNNDepthChunk % kRowTile == 0, "a tile of rows lies within one chunk");
  const auto tiles = static_cast<std::ptrdiff_t>((k + kRowTile - 1) / kRowTile);
  parallel_for(tiles, parallel && tiles > 1, [&](std::ptrdiff_t t) {
    const std::size_t i0 = static_cast<std::size_t>(t) * kRowTile, i1 = std::min(k, i0 + kRowTile);
    for (std::size_t j = 0; j < m; j += kNNTokenBlock) {
      const std::size_t mb = std::min(kNNTokenBlock, m - j);
      T* to = packed + packed_token_offset(k, m, chunk, i0, j, mb);
      if (mb == kNNTokenBlock)
        for (std::size_t i = i0; i < i1; ++i, to += kNNTokenBlock) std::copy_n(x + i * ldx + j, kNNTokenBlock, to);
      else
        for (std::size_t i = i0; i < i1; ++i, to += mb) std::copy_n(x + i * ldx + j, mb, to);
    }
  });
}

// The full panel at column c0 of w (rows ldw apart) over its rows [d0, d1), for the rows [j0, j1)
// of y: each chunk of Depth rows of the panel copied to the stack (Depth · Panel elements: 128 KiB
// for 512 rows on AVX-512), then block(j, c0, i0, i1, chunk, Panel) for each token block.
// Meanwhile, from kNNPrefetchTokens rows of y, the token blocks fetch the next chunk's rows within
// [d0, d1) (none in a slab of one chunk) a few lines each, so that its copy finds them in cache: in
// L2, not L1, where the current chunk is (1.04–1.08× the rate of fetching them into L1 at 64–128
// tokens, the same from 256). Out of line, so that only the callers that copy take the stack.
template <std::size_t Depth, std::size_t Panel, class T, class Block>
MOE_NOINLINE void packed_panel(const T* w, std::size_t ldw, std::size_t d0, std::size_t d1, std::size_t j0,
                               std::size_t j1, std::size_t c0, Block& block) noexcept {
  constexpr std::size_t row_lines = (Panel * sizeof(T) + 63) / 64;  // cache lines of a panel's row
  const std::size_t blocks = (j1 - j0 + kNNTokenBlock - 1) / kNNTokenBlock;
  const std::size_t lines_per_block = j1 - j0 >= kNNPrefetchTokens ? (Depth * row_lines + blocks - 1) / blocks : 0;
  alignas(64) T chunk[Depth * Panel];
  for (std::size_t i0 = d0; i0 < d1; i0 += Depth) {
    const std::size_t i1 = std::min(d1, i0 + Depth);
    for (std::size_t i = i0; i < i1; ++i) std::copy_n(w + i * ldw + c0, Panel, chunk + (i - i0) * Panel);
    const std::size_t next_lines = (std::min(d1, i1 + Depth) - i1) * row_lines;
    std::size_t line = 0;
    for (std::size_t j = j0; j < j1; j += kNNTokenBlock) {
      for (const std::size_t end = std::min(next_lines, line + lines_per_block); line < end; ++line)
        prefetch<2>(w + (i1 + line / row_lines) * ldw + c0 + line % row_lines * (64 / sizeof(T)));
      block(j, c0, i0, i1, static_cast<const T*>(chunk), Panel);
    }
  }
}

// Whether the product writes y [m, n] (rows ldy apart) with store_line where a block's depth chunk
// is the whole depth: y written over (not added to), large, in whole aligned lines. The product does
// not read such a y again, and at kNNStreamBytes or more no cache keeps it for long. Where row
// blocks go outside (nn_rows_outside), only up to kNNStreamRowsDepth rows deep (deeper, their
// arithmetic hides the plain stores' traffic, and the stores past the caches cost a little); in
// bands (nn_bands), only within one band. A weight gradient [3,584, 1,024] into cold memory, one
// thread, against plain stores (medians of 129 calls, two runs): 4–8 tokens 0.61–0.77 of the time;
// in row blocks 16–64 tokens 0.99–1.06; in panels 96–128 tokens 0.70–0.82 (where a panel's token
// block also stops fetching its next rows of y) and 512 tokens 0.93–0.96. (session 57)
inline constexpr std::size_t kNNStreamBytes = std::size_t(1) << 20;
inline constexpr std::size_t kNNStreamRowsDepth = 8;
// How matmul_tn stores y: as usual, or past the caches where streams_y, for a y that nothing reads
// soon (a weight gradient, read by the optimizer after the whole backward).
enum class YStore { cached, past_caches };
template <class Arch, class T>
bool streams_y(std::size_t k, std::size_t m, std::size_t n, const T* y, std::size_t ldy, bool accumulate) noexcept {
  return streams_lines<Arch, T>() && !accumulate && m * n * sizeof(T) >= kNNStreamBytes &&
         (k <= kNNStreamRowsDepth || !nn_rows_outside<Arch, T>(k, n)) &&
         (k <= kNNBandRows || !nn_bands<Arch, T>(m, k, n)) &&
         reinterpret_cast<std::uintptr_t>(y) % 64 == 0 && ldy * sizeof(T) % 64 == 0;
}

// y [m, n] (+)= a [m, k] · w [k, n], where a = x (x [m, k], rows ldx apart) or, with XT, a = xᵀ
// (x [k, m], rows ldx apart); w rows ldw apart, y rows ldy apart. With `accumulate` the sums start
// from y, else from 0. `x_packing` (XT only; may be null) holds tn_packing_size(k, m) elements,
// which may not overlap x, w or y.
template <bool XT, class Arch, class T>
void matmul_nn_any(Arch arch, const T* x, std::size_t ldx, std::size_t m, std::size_t k, const T* w, std::size_t ldw,
                   std::size_t n, T* y, std::size_t ldy, bool accumulate, T* x_packing, YStore y_store) noexcept {
  if (m == 0 || n == 0) return;
  if (k == 0) {
    if (!accumulate)
      for (std::size_t j = 0; j < m; ++j) std::fill(y + j * ldy, y + j * ldy + n, T(0));
    return;
  }
  constexpr std::size_t panel = nn_panel_columns<Arch, T>();
  // Packed panels' depth chunks: deeper where y's part of a panel outgrows the cache. Chosen once
  // for the whole of y, since it fixes packed x's layout too (a row group whose part of y fits the
  // cache still takes the deep chunks: speed, not bits).
  const std::size_t chunk = m * panel * sizeof(T) > kNNCachedPanelBytes ? kNNDeepChunk : kNNDepthChunk;
  const T* x_packed = nullptr;  // x's token blocks (pack_token_blocks), once packed
  // (k within a chunk: otherwise no block covers the whole depth)
  const bool stream_y = y_store == YStore::past_caches && k <= chunk && streams_y<Arch, T>(k, m, n, y, ldy, accumulate);
  // The token rows [j, j + kNNTokenBlock) of the panel at column c0 over depth [i0, i1), with w's
  // row i0 + r at wc + r · ldwc (in place, or a packed chunk). The kernels see the depth from i0
  // (and w's rows left from there, which only a narrow panel's tail reads, never a packed one).
  auto block = [&](std::size_t j, std::size_t c0, std::size_t i0, std::size_t i1, const T* wc, std::size_t ldwc) {
    const std::size_t width = std::min(panel, n - c0), mb = std::min(kNNTokenBlock, m - j);
    const bool from_zero = i0 == 0 && !accumulate, stream = stream_y && i0 == 0 && i1 == k;
    const bool packed = XT && x_packed != nullptr;  // (matmul_nn never packs x)
    const std::size_t ldxb = packed ? mb : ldx;
    const T* xb = packed ? x_packed + packed_token_offset(k, m, chunk, i0, j, mb)
                  : XT   ? x + i0 * ldx + j
                         : x + j * ldx + i0;
    T* yb = y + j * ldy + c0;
    const std::size_t depth = i1 - i0, rows_left = k - i0;
    // With x packed (one stream), the next token block's rows of y are fetched meanwhile: its sums go
    // on from y, or are stored there, in rows a page or more apart, which the hardware prefetchers do
    // not follow. (backward_bench, a weight gradient over 1,024–2,048 tokens, one thread: 0.98 of the
    // time. The dx product, x in place, took 0.97–1.03× as long with it.)
    if (packed && !stream && j + kNNTokenBlock < m) {
      const std::size_t next_rows = std::min(kNNTokenBlock, m - j - kNNTokenBlock);
      for (std::size_t r = 0; r < next_rows; ++r)
        for (std::size_t e = 0; e < width; e += 64 / sizeof(T))
          prefetch_for_write(yb + (kNNTokenBlock + r) * ldy + e);
    }
    switch (mb) {
      case 6: nn_rows<6, XT>(arch, xb, ldxb, wc, ldwc, depth, rows_left, yb, ldy, from_zero, stream, width); break;
      case 5: nn_rows<5, XT>(arch, xb, ldxb, wc, ldwc, depth, rows_left, yb, ldy, from_zero, stream, width); break;
      case 4: nn_rows<4, XT>(arch, xb, ldxb, wc, ldwc, depth, rows_left, yb, ldy, from_zero, stream, width); break;
      case 3: nn_rows<3, XT>(arch, xb, ldxb, wc, ldwc, depth, rows_left, yb, ldy, from_zero, stream, width); break;
      case 2: nn_rows<2, XT>(arch, xb, ldxb, wc, ldwc, depth, rows_left, yb, ldy, from_zero, stream, width); break;
      default: nn_rows<1, XT>(arch, xb, ldxb, wc, ldwc, depth, rows_left, yb, ldy, from_zero, stream, width); break;
    }
  };
  // The same over kNNDepthChunk rows from i0, reading w in place.
  auto block_in_place = [&](std::size_t j, std::size_t c0, std::size_t i0) {
    block(j, c0, i0, std::min(k, i0 + kNNDepthChunk), w + i0 * ldw + c0, ldw);
  };
  static_assert(kNNTokenBlock == 6, "one case per token block size");
  const bool parallel = worth_threads<T>(m, n, k);
  const auto panels = static_cast<std::ptrdiff_t>((n + panel - 1) / panel);
  if (nn_rows_outside<Arch, T>(k, n)) {
    // Row blocks outside: a shallow w (a weight's gradient from a few tokens) stays in cache whole
    // and y is the stream, each row written in address order; a one-panel w gives the threads
    // row blocks to share, where it has a single panel.
    const auto row_blocks = static_cast<std::ptrdiff_t>((m + kNNTokenBlock - 1) / kNNTokenBlock);
    for_each_ahead(row_blocks, parallel, [&](std::ptrdiff_t r, std::ptrdiff_t) {
      const std::size_t j = static_cast<std::size_t>(r) * kNNTokenBlock;
      for (std::size_t c0 = 0; c0 < n; c0 += panel)
        for (std::size_t i0 = 0; i0 < k; i0 += kNNDepthChunk) block_in_place(j, c0, i0);
      if (stream_y) store_fence();
    });
    return;
  }
  if (nn_bands<Arch, T>(m, k, n)) {
    // Bands (above), in groups of at most panels / threads (rounded up), so that every thread has one
    // even where w is narrow.
    static_assert(kNNBandBytes >= panel * sizeof(T), "a group holds a panel");
    const auto threads = static_cast<std::size_t>(open_region(parallel) ? std::max(1, max_threads()) : 1);
    const std::size_t group_panels =
        std::min(kNNBandBytes / (panel * sizeof(T)), (static_cast<std::size_t>(panels) + threads - 1) / threads);
    const std::size_t group = group_panels * panel;
    const auto groups = static_cast<std::ptrdiff_t>((n + group - 1) / group);
    for_each_ahead(groups, parallel, [&](std::ptrdiff_t g, std::ptrdiff_t) {
      const std::size_t c_begin = static_cast<std::size_t>(g) * group, c_end = std::min(n, c_begin + group);
      for (std::size_t i0 = 0; i0 < k; i0 += kNNBandRows) {
        const std::size_t i1 = std::min(k, i0 + kNNBandRows);
        for (std::size_t j = 0; j < m; j += kNNTokenBlock)
          for (std::size_t c0 = c_begin; c0 < c_end; c0 += panel) block(j, c0, i0, i1, w + i0 * ldw + c0, ldw);
      }
      if (stream_y) store_fence();  // (in bands, only where one band is the whole depth)
    });
    return;
  }
  if (XT && x_packing != nullptr && tn_packs_x<Arch, T>(k, m, n, ldx)) {
    pack_token_blocks(x, ldx, k, m, chunk, x_packing, parallel);
    x_packed = x_packing;
  }
  // Depth slabs and row groups (kTNGroupBytes): one of each where x is not packed or is small.
  std::size_t slab = k, group_rows = m;
  if (x_packed != nullptr && m * k * sizeof(T) > kTNGroupBytes) {
    slab = chunk;
    static_assert(kTNGroupBytes / (kNNDeepChunk * sizeof(T)) >= kNNTokenBlock, "a group holds a token block");
    group_rows = kTNGroupBytes / (chunk * sizeof(T)) / kNNTokenBlock * kNNTokenBlock;
  }
  for (std::size_t d0 = 0; d0 < k; d0 += slab) {
    const std::size_t d1 = std::min(k, d0 + slab);
    for (std::size_t r0 = 0; r0 < m; r0 += group_rows) {
      const std::size_t r1 = std::min(m, r0 + group_rows);
      for_each_ahead(panels, parallel, [&](std::ptrdiff_t p, std::ptrdiff_t) {
        const std::size_t c0 = static_cast<std::size_t>(p) * panel;
        // In place: the last panel, narrower, and any panel that one token block reads only once.
        if (n - c0 < panel || r1 - r0 <= kNNTokenBlock) {
          for (std::size_t i0 = d0; i0 < d1; i0 += kNNDepthChunk)
            for (std::size_t j = r0; j < r1; j += kNNTokenBlock) block_in_place(j, c0, i0);
          if (stream_y) store_fence();
          return;
        }
        if (chunk == kNNDeepChunk)
          packed_panel<kNNDeepChunk, panel>(w, ldw, d0, d1, r0, r1, c0, block);
        else
          packed_panel<kNNDepthChunk, panel>(w, ldw, d0, d1, r0, r1, c0, block);
        if (stream_y) store_fence();
      });
    }
  }
}

// y [m, n] (+)= x [m, k] · w [k, n]; x, w and y rows ldx, ldw and ldy apart. With `accumulate`
// the sums start from y, else from 0.
template <class Arch, class T>
void matmul_nn_strided(Arch arch, const T* x, std::size_t ldx, std::size_t m, std::size_t k, const T* w, std::size_t ldw,
                       std::size_t n, T* y, std::size_t ldy, bool accumulate) noexcept {
  matmul_nn_any<false>(arch, x, ldx, m, k, w, ldw, n, y, ldy, accumulate, static_cast<T*>(nullptr), YStore::cached);
}

// y [m, n] (+)= x [m, k] · w [k, n] with contiguous rows.
template <class Arch, class T>
void matmul_nn(Arch arch, const T* x, std::size_t m, std::size_t k, const T* w, std::size_t n, T* y,
               bool accumulate) noexcept {
  matmul_nn_strided(arch, x, k, m, k, w, n, n, y, n, accumulate);
}

// y [m, n] (+)= xᵀ · w for x [k, m] and w [k, n]; x, w and y rows ldx, ldw and ldy apart.
// `x_packing`, if not null, holds tn_packing_size(k, m) elements, which may not overlap x, w or y:
// where tn_packs_x, x is packed there (the same bits, faster; what it holds on return is
// unspecified). With YStore::past_caches, y goes past the caches where streams_y (the same bits).
template <class Arch, class T>
void matmul_tn_strided(Arch arch, const T* x, std::size_t ldx, std::size_t k, std::size_t m, const T* w, std::size_t ldw,
                       std::size_t n, T* y, std::size_t ldy, bool accumulate, T* x_packing = nullptr,
                       YStore y_store = YStore::cached) noexcept {
  matmul_nn_any<true>(arch, x, ldx, m, k, w, ldw, n, y, ldy, accumulate, x_packing, y_store);
}

// y [m, n] (+)= xᵀ · w for x [k, m] and w [k, n], contiguous rows: a weight's gradient, such as
// ∂L/∂W_down [d, d_ff] = dyᵀ [d, tokens] · hidden [tokens, d_ff], where the sum runs over tokens.
// Each element is one chain over the k rows in order, so the bits do not depend on the threads.
template <class Arch, class T>
void matmul_tn(Arch arch, const T* x, std::size_t k, std::size_t m, const T* w, std::size_t n, T* y,
               bool accumulate, T* x_packing = nullptr, YStore y_store = YStore::cached) noexcept {
  matmul_tn_strided(arch, x, m, k, m, w, n, n, y, n, accumulate, x_packing, y_store);
}

}  // namespace simd
MOE_NAMESPACE_END
