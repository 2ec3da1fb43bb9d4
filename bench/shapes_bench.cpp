// The MoE layer against the machine's limits, at three model shapes (issue 6), 1 and 2 threads:
//
//   S1  d = 1024, d_ff = 3584, E = 8,  top-2, SwiGLU    (Mixtral-style)
//   S2  d = 1024, d_ff = 512,  E = 64, top-6, SwiGLU    (fine-grained experts)
//   S3  d = 768,  d_ff = 3072, E = 32, top-1, ReLU FFN  (Switch-style)
//
// The binary measures the two numbers the roofline needs, with the same thread counts: the read
// bandwidth (a SIMD max over 512 MiB, the faster of two access patterns; see measure_read_gbs)
// and the sgemm rate (the faster of Eigen's GEMM and moe's own kernel at 1024 × 1024 × 4096), both
// before the benchmarks and again before every BM_Layer run, keeping the best. For a batch, bound =
// max(bytes of the weights of every expert that got a token ÷ bandwidth, FLOPs ÷ sgemm rate), and
// the summary's roofline is bound ÷ layer time. Weights and the bandwidth buffer sit on 2 MiB
// pages unless MOE_BENCH_HUGE_PAGES=0.
//
//   BM_Layer/S/T/threads     MoELayer::forward, warm workspace; at T ≤ 16 the weights it reads
//                            are flushed from the caches before each iteration (a real model's
//                            other layers evict them) and the threads woken (they have just run
//                            those layers; MOE_BENCH_SLEEPING_THREADS=1 lets them sleep)
//   BM_Naive/S/T/threads     the per-expert Eigen loop a user would write (checked to agree),
//                            each iteration timed beside the layer: the ratio of each pair
//   BM_Threads/S/T           the layer on 1 thread and on 2, each iteration timed in a pair
//                            (checked to give the same bits): the ratio of each pair
//   BM_Roof/S/T/threads      the layer, each iteration timed in a pair with a plain read of the
//                            weights it reads, both from cold caches, and then a short sgemm: the
//                            roofline against the yardsticks of that moment ("roof pairs")
//   BM_Overhead/S/T/threads  route + dispatch + combine alone (the layer minus the experts)
//   BM_Dispatch, BM_Combine /S/T   the gather and the weighted scatter on one thread, each timed
//                            in pairs with memcpy of the same bytes (the combine also with its
//                            scattered rows copied one memcpy each): GB/s and their ratios
//   BM_Expert/S/m/threads    one expert's forward on m tokens, its weights cold (each call takes
//                            the next of the shape's experts, whose weights together far exceed
//                            the L3): the summary's second table gives its roofline per m, which
//                            is where a layer row's shortfall comes from (a row's experts get the
//                            token counts printed beside the table)
//
// After the runs it prints a summary table of the ratios from the medians (or the single runs).
//   OMP_PROC_BIND=true shapes_bench --benchmark_repetitions=3 --benchmark_report_aggregates_only=true
// CI smoke run: shapes_bench --benchmark_min_time=0.01 --benchmark_filter='S2/(1|16)/'
#include <benchmark/benchmark.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>  // _mm_clflush
#endif
#if defined(__linux__)
#include <sys/prctl.h>  // PR_SET_THP_DISABLE
#endif

#include <moe/moe.hpp>

#include "bench_support.hpp"

#if defined(MOE_USE_OPENMP)
#include <omp.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <numeric>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

using moe::index_t;
using Mat = moe::Matrix<float>;
using ConstMap = moe::ConstMatrixMap<float>;
using Arch = moe::simd::default_arch;

constexpr index_t kMaxTokens = 2048;
const int kTokenCounts[] = {1, 16, 128, 512, 2048};

using moe_bench::kShapes;
using moe_bench::Shape;

void set_threads(int threads) {
#if defined(MOE_USE_OPENMP)
  omp_set_num_threads(threads);
#endif
  Eigen::setNbThreads(threads);
}
// Threads to compare (1 and, when OpenMP gives 2 or more, 2); fixed before anything sets them.
int g_max_threads = 1;

// Weights, and the buffer the read bandwidth is measured on, live on 2 MiB pages (as the README
// advises users to load theirs: moe::HugePageAllocator) unless MOE_BENCH_HUGE_PAGES=0, which turns
// transparent huge pages off for the whole process (the allocator's advice then does nothing) so
// that everything sits on 4 KiB pages. Both sides of every ratio use the same kind of page.
// Whether environment variable `name` is set to exactly `value`.
bool env_is(const char* name, const char* value) {
  const char* v = std::getenv(name);
  return v != nullptr && std::strcmp(v, value) == 0;
}
const bool g_huge_pages = !env_is("MOE_BENCH_HUGE_PAGES", "0");

// Called before anything is allocated.
void apply_page_choice() {
#if defined(__linux__) && defined(PR_SET_THP_DISABLE)
  if (!g_huge_pages && prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0) std::perror("prctl(PR_SET_THP_DISABLE)");
#endif
}

using Buffer = std::vector<float, moe::HugePageAllocator<float>>;

// --- the machine's limits, per thread count ---------------------------------------------------

struct Limits {
  double read_gbs = 0;   // GB/s, the best so far
  double sgemm_gfs = 0;  // GFLOP/s, the best so far
  const char* sgemm_source = "";
  double read_now = 0, sgemm_now = 0;  // the latest measurements
};
std::map<int, Limits> g_limits;

double best_seconds(int reps, const std::function<void()>& f) {
  double best = 1e30;
  for (int r = 0; r < reps; ++r) {
    best = std::min(best, moe_bench::wall_seconds(f));
  }
  return best;
}

// Largest of p[0, n), n a multiple of kStreams vectors, read as kStreams streams in lockstep.
template <std::size_t kStreams>
float stream_max(const float* p, std::size_t n) {
  using B = xsimd::batch<float, Arch>;
  const std::size_t len = n / kStreams;
  B acc[kStreams];
  for (B& a : acc) a = B(0.0f);
  for (std::size_t i = 0; i + B::size <= len; i += B::size)
    for (std::size_t s = 0; s < kStreams; ++s) acc[s] = xsimd::max(acc[s], B::load_unaligned(p + s * len + i));
  for (std::size_t s = 1; s < kStreams; ++s) acc[0] = xsimd::max(acc[0], acc[s]);
  return moe::simd::reduce_max(acc[0]);
}

// A piece of a buffer that one thread reads in one go.
struct Chunk {
  const float* p;
  std::size_t n;
};

// `buffers` cut into 1 MiB chunks, in order.
std::vector<Chunk> chunks_of(const std::vector<const Buffer*>& buffers) {
  constexpr std::size_t kChunk = std::size_t(1) << 20 >> 2;
  std::vector<Chunk> chunks;
  for (const Buffer* b : buffers)
    for (std::size_t i = 0; i < b->size(); i += kChunk) chunks.push_back({b->data() + i, std::min(kChunk, b->size() - i)});
  return chunks;
}

// The largest element of all `chunks`, each read by read_chunk(p, n), the chunks dealt to the
// current threads in turn (as the layer's threads take neighbouring weight panels).
template <class ReadChunk>
float max_over_chunks(const std::vector<Chunk>& chunks, ReadChunk read_chunk) {
  float total = 0;
#if defined(MOE_USE_OPENMP)
#pragma omp parallel for reduction(max : total) schedule(static, 1)
#endif
  for (std::ptrdiff_t c = 0; c < static_cast<std::ptrdiff_t>(chunks.size()); ++c) {
    const Chunk& chunk = chunks[static_cast<std::size_t>(c)];
    total = std::max(total, read_chunk(chunk.p, chunk.n));
  }
  return total;
}

// Read bandwidth with the current thread count: the faster of two ways to read a buffer far larger
// than the caches (512 MiB) in 1 MiB chunks dealt to the threads in turn — one stream per chunk,
// or eight streams 128 KiB apart. Threads reading neighbouring chunks, as the layer's threads read
// neighbouring weight panels, measured 65–72 GB/s on 2 threads where contiguous halves measured
// 46–51, and one stream beat eight on 1 thread (35–37 against 32 GB/s).
double measure_read_gbs(int reps) {
  static const Buffer buf(std::size_t(512) << 20 >> 2, 1.0f);
  static const std::vector<Chunk> chunks = chunks_of({&buf});
  float sink = 0;
  auto read_all = [&](auto read_chunk) {
    return best_seconds(reps, [&] { sink += max_over_chunks(chunks, read_chunk); });
  };
  const double s = std::min(read_all(stream_max<1>), read_all(stream_max<8>));
  benchmark::DoNotOptimize(sink);
  return static_cast<double>(buf.size() * sizeof(float)) / s * 1e-9;
}

// Seconds to read `chunks` (chunks_of the weights a batch reads) once with the current thread
// count, one stream each: the yardstick for exactly the bytes a batch reads. (One of
// measure_read_gbs's two patterns, the faster on one thread; it also tries eight streams a chunk.)
double read_seconds(const std::vector<Chunk>& chunks) {
  float sink = 0;
  const double s = moe_bench::wall_seconds([&] { sink += max_over_chunks(chunks, stream_max<1>); });
  benchmark::DoNotOptimize(sink);
  return s;
}

// sgemm rate with the current thread count: the faster of Eigen's GEMM and moe's own kernel, on a
// compute-bound size.
void measure_sgemm_gfs(int reps, Limits& l) {
  const index_t m = 1024, k = 1024, n = 4096;
  static const Mat a = Mat::Random(m, k), b = Mat::Random(k, n), bt = b.transpose();
  static Mat c(m, n);
  const double eigen = best_seconds(reps, [&] { c.noalias() = a * b; });
  benchmark::DoNotOptimize(c.data());
  const double ours = best_seconds(reps, [&] {
    moe::simd::matmul_nt(Arch{}, a.data(), static_cast<std::size_t>(m), static_cast<std::size_t>(k), bt.data(),
                         static_cast<std::size_t>(n), c.data(), static_cast<std::size_t>(n));
  });
  benchmark::DoNotOptimize(c.data());
  const double gfs = 2.0 * static_cast<double>(m * n * k) / std::min(eigen, ours) * 1e-9;
  if (gfs > l.sgemm_gfs) l.sgemm_gfs = gfs, l.sgemm_source = eigen <= ours ? "Eigen" : "moe";
  l.sgemm_now = gfs;
}

// GFLOP/s of one product of moe's kernel at 512 × 1024 × 2048 (2.1 GFLOP) with the current thread
// count: the compute yardstick of a pair (BM_Roof), a quarter of measure_sgemm_gfs's size, so that
// it adds 6–11 ms to a pair rather than 22–45. One sample, not the best of several: a slow one
// flatters a compute-bound row's pair a little.
double pair_sgemm_gfs() {
  const std::size_t m = 512, k = 1024, n = 2048;
  static const Mat a = Mat::Random(m, k), bt = Mat::Random(n, k);
  static Mat c = Mat::Zero(m, n);  // (touched here, so that no timed product takes its page faults)
  const double s = moe_bench::wall_seconds(
      [&] { moe::simd::matmul_nt(Arch{}, a.data(), m, k, bt.data(), n, c.data(), n); });
  benchmark::DoNotOptimize(c.data());
  return 2.0 * static_cast<double>(m * n * k) / s * 1e-9;
}

// The machine's bandwidth moves by tens of percent within minutes (other guests share it), and
// whole runs have caught its cores at 0.6–0.85 of their usual rate, so every BM_Layer run measures
// both limits again just before its own timing, and the yardsticks are the best seen in the whole
// run: the summary's rooflines all use those final values (a row that ran in a slow moment is held
// to the fast moments' limits). The measurements of this moment stay in read_now and sgemm_now,
// which the summary prints beside the row.
const Limits& refresh_limits(int threads) {
  Limits& l = g_limits[threads];
  l.read_now = measure_read_gbs(2);
  l.read_gbs = std::max(l.read_gbs, l.read_now);
  measure_sgemm_gfs(1, l);
  return l;
}

Limits measure_limits(int threads) {
  set_threads(threads);
  Limits l;
  l.read_gbs = l.read_now = measure_read_gbs(5);
  measure_sgemm_gfs(3, l);
  return l;
}

// Evicts buffers from every cache level (a real model's other layers leave none of this layer's
// weights in cache). clflush, not reading a junk buffer three times the L3 as before: the L3 kept
// weights that every iteration reused (S3 at T = 1 then read its one expert at 65 GB/s, above the
// memory's 50). Flushing all of S1's 352 MB takes ~4 ms, outside the timed region.
void evict(const std::vector<const Buffer*>& buffers) {
#if defined(__x86_64__) || defined(__i386__)
  for (const Buffer* b : buffers) {
    const auto begin = reinterpret_cast<std::uintptr_t>(b->data()), end = begin + b->size() * sizeof(float);
    for (std::uintptr_t line = begin & ~std::uintptr_t(63); line < end; line += 64) _mm_clflush(reinterpret_cast<const void*>(line));
  }
  _mm_mfence();
#else
  (void)buffers;  // elsewhere: read three L3s of junk
  static const std::vector<float> junk(std::size_t(96) << 20 >> 2, 1.0f);
  benchmark::DoNotOptimize(stream_max<8>(junk.data(), junk.size()));
#endif
}

// --- models ---------------------------------------------------------------------------------------

Buffer random_weights(std::size_t count, float bound, moe_bench::Lcg& rng) {
  Buffer w(count);
  rng.fill(w.data(), count, bound);
  return w;
}

// One shape's weights in plain PyTorch-layout buffers, the layer viewing them, and an input.
template <class Expert>
struct Model {
  using Layer = moe::MoELayer<moe::TopKRouter<float>, Expert>;
  Shape shape;
  Buffer gate;                                 // [E, d]
  std::vector<Buffer> mats;                    // E × matrices(): [d_ff, d] in (gate, up), [d, d_ff] down
  Mat x;                                       // [kMaxTokens, d]
  std::unique_ptr<Layer> layer;

  explicit Model(const Shape& s) : shape(s) {
    moe_bench::Lcg rng(2024);
    const float in_bound = 1.0f / std::sqrt(static_cast<float>(s.d)), out_bound = 1.0f / std::sqrt(static_cast<float>(s.ff));
    gate = random_weights(static_cast<std::size_t>(s.E * s.d), in_bound, rng);
    std::vector<Expert> experts;
    for (index_t e = 0; e < s.E; ++e) {
      for (index_t m = 0; m + 1 < s.matrices(); ++m) mats.push_back(random_weights(static_cast<std::size_t>(s.ff * s.d), in_bound, rng));
      mats.push_back(random_weights(static_cast<std::size_t>(s.d * s.ff), out_bound, rng));
      experts.push_back(make_expert(e));
    }
    x = Mat(kMaxTokens, s.d);
    const Buffer xs = random_weights(static_cast<std::size_t>(x.size()), 1.0f, rng);
    std::copy(xs.begin(), xs.end(), x.data());
    moe::TopKOptions options;
    options.k = s.k;
    options.score = moe::ScoreFunction::softmax;
    options.normalize = s.k > 1;
    layer = std::make_unique<Layer>(moe::TopKRouter<float>(ConstMap(gate.data(), s.E, s.d), options), std::move(experts));
  }
  std::vector<const Buffer*> weights() const {
    std::vector<const Buffer*> all{&gate};
    for (const auto& w : mats) all.push_back(&w);
    return all;
  }
  // The weights a forward under `plan` reads: the router's and those of every expert with a token.
  std::vector<const Buffer*> weights_read(const moe::Routing<float>& plan) const {
    std::vector<const Buffer*> read{&gate};
    for (index_t e = 0; e < shape.E; ++e) {
      if (plan.tokens_of(e) == 0) continue;
      for (index_t i = 0; i < shape.matrices(); ++i) read.push_back(&mats[static_cast<std::size_t>(e * shape.matrices() + i)]);
    }
    return read;
  }
  ConstMap in_proj(index_t e, index_t which) const {
    return ConstMap(mats[static_cast<std::size_t>(e * shape.matrices() + which)].data(), shape.ff, shape.d);
  }
  ConstMap out_proj(index_t e) const {
    return ConstMap(mats[static_cast<std::size_t>(e * shape.matrices() + shape.matrices() - 1)].data(), shape.d, shape.ff);
  }
  Expert make_expert(index_t e) const {
    if constexpr (std::is_same<Expert, moe::SwiGLU<float>>::value) {
      return Expert(in_proj(e, 0), in_proj(e, 1), out_proj(e));
    } else {
      return Expert(in_proj(e, 0), out_proj(e));
    }
  }

  // The loop a user would write with Eigen: logits, softmax, top-k (ties to the lower expert),
  // renormalize when k > 1, then per expert gather, matmuls with the activation, and scatter.
  void naive_forward(const moe::ConstMatrixRef<float>& xs, Mat& y) const {
    const index_t T = xs.rows(), E = shape.E;
    const Mat logits = xs * ConstMap(gate.data(), E, shape.d).transpose();  // [T, E]
    std::vector<std::vector<index_t>> tokens(static_cast<std::size_t>(E));
    std::vector<std::vector<float>> weights(static_cast<std::size_t>(E));
    std::vector<index_t> order(static_cast<std::size_t>(E));
    for (index_t t = 0; t < T; ++t) {
      Eigen::RowVectorXf p = (logits.row(t).array() - logits.row(t).maxCoeff()).exp();
      p /= p.sum();
      std::iota(order.begin(), order.end(), 0);
      std::partial_sort(order.begin(), order.begin() + shape.k, order.end(),
                        [&](index_t a, index_t b) { return p[a] > p[b] || (p[a] == p[b] && a < b); });
      float sum = 0;
      for (index_t i = 0; i < shape.k; ++i) sum += p[order[static_cast<std::size_t>(i)]];
      for (index_t i = 0; i < shape.k; ++i) {
        const index_t e = order[static_cast<std::size_t>(i)];
        tokens[static_cast<std::size_t>(e)].push_back(t);
        weights[static_cast<std::size_t>(e)].push_back(shape.k > 1 ? p[e] / sum : p[e]);
      }
    }
    y.setZero();
    for (index_t e = 0; e < E; ++e) {
      const auto& tk = tokens[static_cast<std::size_t>(e)];
      const auto n = static_cast<index_t>(tk.size());
      if (n == 0) continue;
      Mat xe(n, shape.d);
      for (index_t i = 0; i < n; ++i) xe.row(i) = xs.row(tk[static_cast<std::size_t>(i)]);
      Mat h = xe * in_proj(e, 0).transpose();  // [n, d_ff]
      if (shape.gated) {
        const Mat u = xe * in_proj(e, 1).transpose();
        h = (h.array() / (1.0f + (-h.array()).exp()) * u.array()).matrix();
      } else {
        h = h.cwiseMax(0.0f);
      }
      const Mat ye = h * out_proj(e).transpose();  // [n, d]
      for (index_t i = 0; i < n; ++i) y.row(tk[static_cast<std::size_t>(i)]) += weights[static_cast<std::size_t>(e)][static_cast<std::size_t>(i)] * ye.row(i);
    }
  }
};

using GatedModel = Model<moe::SwiGLU<float>>;
using PlainModel = Model<moe::FeedForward<float, moe::ReLU>>;

template <class M>
const M& model(const Shape& s) {
  static std::map<std::string, std::unique_ptr<M>> models;
  auto& slot = models[s.name];
  if (!slot) slot = std::make_unique<M>(s);
  return *slot;
}

// Bytes of the weights of every expert with a token, and the FLOPs, of one routed batch.
struct Work {
  double bytes = 0, flops = 0;
};
Work work_of(const Shape& s, const moe::Routing<float>& plan, index_t T) {
  Work w;
  for (index_t e = 0; e < s.E; ++e) {
    const index_t m = plan.tokens_of(e);
    if (m == 0) continue;
    w.bytes += s.expert_params() * sizeof(float);
    w.flops += 2.0 * s.expert_params() * static_cast<double>(m);
  }
  w.bytes += static_cast<double>(s.E * s.d) * sizeof(float);
  w.flops += 2.0 * static_cast<double>(s.E * s.d * T);
  return w;
}

// The counters the summary's rooflines divide by the yardsticks: weight bytes and FLOPs per second.
void report_work(benchmark::State& state, const Work& w) {
  state.counters["weight GB/s"] = benchmark::Counter(w.bytes * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["GFLOP/s"] = benchmark::Counter(w.flops * 1e-9, benchmark::Counter::kIsIterationInvariantRate);
}

// --- benchmarks -----------------------------------------------------------------------------------

// "S2/128": the shape and batch part of a benchmark's name, and the key of g_row_tokens.
std::string row_name(const Shape& s, index_t T) { return std::string(s.name) + "/" + std::to_string(T); }

// Tokens per expert in each BM_Layer row's batch (the active experts' counts, sorted), for the
// summary: which BM_Expert rows a layer row is made of.
std::map<std::string, std::vector<index_t>> g_row_tokens;

// The flush idles the OpenMP workers for milliseconds, and a libgomp worker idle that long sleeps
// on a futex: the next region's second thread then starts ~45 µs late (measured: 0.8 µs after 1 ms
// idle, 45 µs after 7 ms; S3 at T = 1 on 2 threads took 0.354 ms with them asleep, 0.28–0.30 with
// OMP_WAIT_POLICY=active). In a model the layer before this one has just run on the same threads,
// so the workers are woken here, untimed, by an empty region; MOE_BENCH_SLEEPING_THREADS=1 leaves
// them asleep (the README's tables before session 30).
const bool g_wake_threads = !env_is("MOE_BENCH_SLEEPING_THREADS", "1");
void wake_threads() {
#if defined(MOE_USE_OPENMP)
  if (!g_wake_threads || omp_get_max_threads() < 2) return;
#pragma omp parallel
  benchmark::DoNotOptimize(omp_get_thread_num());
#endif
}

// The middle value (for an even count, the upper of the two in the middle).
double median(std::vector<double> v) {
  std::nth_element(v.begin(), v.begin() + static_cast<std::ptrdiff_t>(v.size() / 2), v.end());
  return v[v.size() / 2];
}

// Whether a batch of T tokens (memory bound) starts each iteration with the weights flushed from
// the caches and the threads woken, untimed.
bool starts_cold(index_t T) { return T <= 16; }

// Flushes the model's weights once and returns those the batch reads, which are all that an
// iteration then needs to flush again: the rest stay out of the caches (and flushing S3's 604 MB
// took longer than its one-token forward ran, many times over).
template <class M>
std::vector<const Buffer*> flush_all(const M& m, const moe::Routing<float>& plan) {
  evict(m.weights());
  return m.weights_read(plan);
}

// A cold iteration's start, untimed: as a real model's other layers would leave it.
void start_cold(const std::vector<const Buffer*>& weights) {
  evict(weights);
  wake_threads();
}

// Seconds of one forward() from the start a BM_Layer iteration has (cold at T ≤ 16, untimed): for
// the benchmarks that time two forwards in a pair.
template <class Forward>
double seconds_from_start(index_t T, const std::vector<const Buffer*>& weights, Forward&& forward) {
  if (starts_cold(T)) start_cold(weights);
  return moe_bench::wall_seconds(forward);
}

// Runs a() and b(), each returning its seconds, in turn: a first when `a_first`, which then flips, so
// that neither side of a pair always runs second. Returns {a's seconds, b's seconds}.
template <class A, class B>
std::pair<double, double> in_turn(bool& a_first, A&& a, B&& b) {
  double ta = 0, tb = 0;
  if (a_first) {
    ta = a();
    tb = b();
  } else {
    tb = b();
    ta = a();
  }
  a_first = !a_first;
  return {ta, tb};
}

// The timed loop of BM_Layer: forward() writes y.
template <class Forward>
void run_iterations(benchmark::State& state, index_t T, const std::vector<const Buffer*>& weights, Forward forward) {
  const bool cold = starts_cold(T);
  for (auto _ : state) {
    if (cold) {
      state.PauseTiming();
      start_cold(weights);
      state.ResumeTiming();
    }
    forward();
    benchmark::ClobberMemory();
  }
}

// A layer row's setup: the shape's model, its first T tokens, an output and a workspace, after one
// forward on the current thread count (which sizes the workspace and routes the batch).
template <class M>
struct LayerRun {
  const M& m;
  const moe::ConstMatrixRef<float> x;
  Mat y;
  moe::Workspace<float> ws;
  LayerRun(const Shape& s, index_t T) : m(model<M>(s)), x(m.x.topRows(T)), y(T, s.d) { forward(y); }
  void forward(Mat& out) { m.layer->forward(x, out, ws); }
  const moe::Routing<float>& plan() const { return ws.routing.plan; }
};

template <class M>
void BM_Layer(benchmark::State& state, Shape s) {
  const index_t T = state.range(0);
  const int threads = static_cast<int>(state.range(1));
  set_threads(threads);
  LayerRun<M> run(s, T);
  const Limits now = refresh_limits(threads);
  run_iterations(state, T, flush_all(run.m, run.plan()), [&] { run.forward(run.y); });
  // The weights' bytes and the FLOPs per second; the summary divides them by the final yardsticks
  // (bound ÷ time = max(bytes ÷ bandwidth, FLOPs ÷ rate) ÷ time).
  const Work w = work_of(s, run.plan(), T);
  std::vector<index_t>& counts = g_row_tokens[row_name(s, T)];
  counts.clear();
  for (index_t e = 0; e < s.E; ++e)
    if (run.plan().tokens_of(e) > 0) counts.push_back(run.plan().tokens_of(e));
  std::sort(counts.begin(), counts.end());
  report_work(state, w);
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(T), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["read GB/s before"] = now.read_now;
  state.counters["sgemm GFLOP/s before"] = now.sgemm_now;
}

// The naive loop, each iteration timed beside the layer: the layer, then the naive loop, each from
// the same start as BM_Layer's iterations (cold at T ≤ 16). Time = the naive loop's; "vs naive"
// = the median over the iterations of naive time ÷ layer time, which the summary reads. Timed as
// separate benchmarks (minutes apart in a full run), S3 T = 1 on one thread ranged over 0.76–1.13
// from run to run; in pairs, 0.99–1.00.
template <class M>
void BM_Naive(benchmark::State& state, Shape s) {
  const index_t T = state.range(0);
  const int threads = static_cast<int>(state.range(1));
  set_threads(threads);
  LayerRun<M> run(s, T);
  const Mat& y_layer = run.y;
  Mat y(T, s.d);
  {  // both must compute the same layer (a near-tie may flip a choice: allow 1% of rows)
    run.m.naive_forward(run.x, y);
    const float scale = std::max(y_layer.cwiseAbs().maxCoeff(), 1e-30f);
    index_t differing = 0;
    for (index_t t = 0; t < T; ++t) differing += (y.row(t) - y_layer.row(t)).cwiseAbs().maxCoeff() > 1e-4f * scale;
    if (differing * 100 > T) {
      state.SkipWithError(("naive and layer outputs differ on " + std::to_string(differing) + " rows").c_str());
      return;
    }
  }
  const std::vector<const Buffer*> weights = flush_all(run.m, run.plan());
  std::vector<double> naive_s, vs_naive;
  for (auto _ : state) {
    const double t_layer = seconds_from_start(T, weights, [&] { run.forward(run.y); });
    const double t_naive = seconds_from_start(T, weights, [&] { run.m.naive_forward(run.x, y); });
    state.SetIterationTime(t_naive);
    naive_s.push_back(t_naive);
    vs_naive.push_back(t_naive / t_layer);
  }
  state.counters["tokens/s"] = static_cast<double>(T) / median(naive_s);
  state.counters["vs naive"] = median(vs_naive);
}

// 1 thread against 2, each iteration timing one forward on each from the same start as BM_Layer's
// (cold at T ≤ 16), the order alternating. Time = the 2-thread forward's; "2 thr x" = the median
// over the iterations of 1-thread time ÷ 2-thread time, which the summary reads (until session 47
// it divided two BM_Layer rows timed seconds apart, in different moments of the machine). Each
// pair's outputs must have the same bits, as the threads guarantee.
template <class M>
void BM_Threads(benchmark::State& state, Shape s) {
  const index_t T = state.range(0);
  set_threads(2);
  LayerRun<M> run(s, T);  // (on 2 threads: sizes the workspace for both counts)
  Mat& y2 = run.y;
  Mat y1(T, s.d);
  const std::vector<const Buffer*> weights = flush_all(run.m, run.plan());
  auto timed = [&](int threads, Mat& y) {
    set_threads(threads);
    return seconds_from_start(T, weights, [&] { run.forward(y); });
  };
  std::vector<double> speedup;
  bool one_first = true;
  for (auto _ : state) {
    const auto [t1, t2] = in_turn(one_first, [&] { return timed(1, y1); }, [&] { return timed(2, y2); });
    if (std::memcmp(y1.data(), y2.data(), static_cast<std::size_t>(y1.size()) * sizeof(float)) != 0) {
      state.SkipWithError("the 1- and 2-thread outputs differ");
      break;
    }
    state.SetIterationTime(t2);
    speedup.push_back(t1 / t2);
  }
  if (!speedup.empty()) state.counters["2 thr x"] = median(speedup);
}

// The roofline in pairs: each iteration times the layer and a plain read of the very weights it
// reads (read_seconds), both from cold caches with the threads woken, the order alternating, and
// then a short sgemm (pair_sgemm_gfs). The pair's bound is max(bytes ÷ that read's bandwidth,
// FLOPs ÷ that sgemm's rate) and "roof pairs" is the median of bound ÷ layer time (beside it the
// medians of the pairs' "read GB/s" and "sgemm GFLOP/s", the yardsticks it used). The summary's
// roofline holds every row to the best yardsticks of the whole run, so a row timed in the slow
// 2-thread mode (reads at 43–53 GB/s, against 75–84 in the fast one) is held to reads it could not
// reach in its moment; a pair sees one moment. (Cold at every T, unlike BM_Layer at T > 16, which
// finds up to the L3's 32 MiB of the last iteration's weights cached, out of 352–604 MB read.)
constexpr int kRoofPairs = 15;  // per repetition
template <class M>
void BM_Roof(benchmark::State& state, Shape s) {
  const index_t T = state.range(0);
  set_threads(static_cast<int>(state.range(1)));
  LayerRun<M> run(s, T);
  const std::vector<const Buffer*> weights = flush_all(run.m, run.plan());
  const std::vector<Chunk> weight_chunks = chunks_of(weights);
  const Work w = work_of(s, run.plan(), T);
  auto layer = [&] {
    start_cold(weights);
    return moe_bench::wall_seconds([&] { run.forward(run.y); });
  };
  auto read = [&] {
    start_cold(weights);
    return read_seconds(weight_chunks);
  };
  std::vector<double> roof, read_gbs, sgemm_gfs;
  bool layer_first = true;
  for (auto _ : state) {
    const auto [t_layer, t_read] = in_turn(layer_first, layer, read);
    const double gfs = pair_sgemm_gfs();
    state.SetIterationTime(t_layer);
    roof.push_back(std::max(t_read, w.flops * 1e-9 / gfs) / t_layer);
    read_gbs.push_back(w.bytes * 1e-9 / t_read);
    sgemm_gfs.push_back(gfs);
  }
  state.counters["roof pairs"] = median(roof);
  state.counters["read GB/s"] = median(read_gbs);
  state.counters["sgemm GFLOP/s"] = median(sgemm_gfs);
}

// The layer's own work besides the experts: route, dispatch, combine (expert outputs as left by
// a real forward).
template <class M>
void BM_Overhead(benchmark::State& state, Shape s) {
  const index_t T = state.range(0);
  set_threads(static_cast<int>(state.range(1)));
  LayerRun<M> run(s, T);
  const auto& x = run.x;
  moe::Workspace<float>& ws = run.ws;
  for (auto _ : state) {
    run.m.layer->router().route(x, moe::RouteContext{}, ws.routing, Arch{});
    const moe::Routing<float>& plan = ws.routing.plan;
    moe::dispatch(Arch{}, plan, x.data(), x.outerStride(), s.d, ws.dispatched.data());
    moe::combine(Arch{}, plan, ws.expert_out.data(), s.d, run.y.data(), run.y.outerStride());
    benchmark::DoNotOptimize(run.y.data());
    benchmark::ClobberMemory();
  }
}

// Dispatch and combine, each timed beside memcpy of the same bytes. Every iteration times a batch
// of the move, then a batch of memcpy (for the combine also of memcpy_rows: its source rows in its
// order, token by token, one memcpy each, to consecutive rows, which is the combine's access
// pattern without its arithmetic). Each batch follows one untimed call, so it finds its bytes
// where a repeated call would, and holds at least kBatchBytes of calls, which dwarfs the clock.
// The two halves of a pair run microseconds apart, so their ratio holds while the machine's speed
// moves. Timed as separate benchmarks, seconds apart, S3's ratios at T = 16 and 128 ranged over
// 0.47–1.18 from run to run. Time = one move; the counters are medians over the iterations: GB/s
// (bytes read + written) of the move and of memcpy, and, for the summary, "vs memcpy" and
// "vs rows" (the move's bandwidth over theirs).
enum class Move { dispatch, combine };
constexpr double kBatchBytes = 1 << 20;
constexpr int kMovePairs = 201;

template <class M>
void BM_Move(benchmark::State& state, Shape s, Move what) {
  const index_t T = state.range(0);
  set_threads(1);
  LayerRun<M> run(s, T);
  const auto& x = run.x;
  Mat& y = run.y;
  moe::Workspace<float>& ws = run.ws;
  const moe::Routing<float>& plan = ws.routing.plan;
  const auto A = static_cast<std::size_t>(plan.num_assignments()), d = static_cast<std::size_t>(s.d);
  Buffer dst(A * d);  // 64-byte aligned, as the moves' destinations are
  const double bytes = 2.0 * static_cast<double>(A * d * sizeof(float));
  const int reps = static_cast<int>(std::max(1.0, std::ceil(kBatchBytes / std::max(bytes, 1.0))));
  auto move = [&] {
    if (what == Move::dispatch) moe::dispatch(Arch{}, plan, x.data(), x.outerStride(), s.d, ws.dispatched.data());
    else moe::combine(Arch{}, plan, ws.expert_out.data(), s.d, y.data(), y.outerStride());
  };
  auto copy = [&] { std::memcpy(dst.data(), ws.expert_out.data(), A * d * sizeof(float)); };
  auto copy_rows = [&] {
    for (std::size_t j = 0; j < A; ++j) {
      const auto row = static_cast<std::size_t>(plan.assignment[j]);
      std::memcpy(dst.data() + j * d, ws.expert_out.data() + row * d, d * sizeof(float));
    }
  };
  // Seconds per call of f, over a batch that follows one untimed call.
  auto per_call = [reps](auto&& f) {
    f();
    benchmark::ClobberMemory();
    return moe_bench::wall_seconds([&] {
             for (int r = 0; r < reps; ++r) {
               f();
               benchmark::ClobberMemory();
             }
           }) / reps;
  };
  std::vector<double> move_s, copy_s, vs_copy, vs_rows;
  for (auto _ : state) {
    const double t = per_call(move), t_copy = per_call(copy);
    move_s.push_back(t);
    copy_s.push_back(t_copy);
    vs_copy.push_back(t_copy / t);
    if (what == Move::combine) vs_rows.push_back(per_call(copy_rows) / t);
    state.SetIterationTime(t);
  }
  state.counters["GB/s"] = bytes * 1e-9 / median(move_s);
  state.counters["memcpy GB/s"] = bytes * 1e-9 / median(copy_s);
  state.counters["vs memcpy"] = median(vs_copy);
  if (what == Move::combine) state.counters["vs rows"] = median(vs_rows);
}

// One expert on m tokens with cold weights: call i runs expert i mod E, so the weights a call
// reads were last touched E - 1 calls (about 300 MB of other weights or more) ago. The token rows are
// the model's first m inputs.
const int kExpertTokens[] = {1, 2, 3, 4, 6, 8, 12, 16, 32};
template <class M>
void BM_Expert(benchmark::State& state, Shape s) {
  const index_t m_tokens = state.range(0);
  const int threads = static_cast<int>(state.range(1));
  set_threads(threads);
  const M& m = model<M>(s);
  const auto& experts = m.layer->experts();
  Mat y(m_tokens, s.d);
  // 64-byte aligned, as the layer's workspace is (with a 16-byte aligned one, 4 tokens on S2's shape
  // took 1.3–1.7× as long: every vector load of the hidden rows spanned two cache lines).
  Buffer scratch(static_cast<std::size_t>(experts.front().scratch_size(m_tokens)));
  std::size_t e = 0;
  for (auto _ : state) {
    experts[e].forward(Arch{}, m.x.data(), m_tokens, y.data(), scratch.data());
    e = (e + 1) % experts.size();
    benchmark::ClobberMemory();
  }
  report_work(state, Work{s.expert_params() * sizeof(float), 2.0 * s.expert_params() * static_cast<double>(m_tokens)});
}

// --- summary --------------------------------------------------------------------------------------

// Keeps each benchmark's median (or single-run) real time in ms and counters, by name.
class Collector : public benchmark::ConsoleReporter {
 public:
  struct Entry {
    double ms = 0;
    std::map<std::string, double> counters;
  };
  std::map<std::string, Entry> entries;
  void ReportRuns(const std::vector<Run>& runs) override {
    ConsoleReporter::ReportRuns(runs);
    for (const Run& r : runs) {
      if (!moe_bench::summary_run(r)) continue;
      Entry e;
      e.ms = r.GetAdjustedRealTime() / benchmark::GetTimeUnitMultiplier(r.time_unit) * 1e3;
      for (const auto& c : r.counters) e.counters[c.first] = c.second.value;
      entries[r.run_name.function_name + "/" + r.run_name.args] = e;
    }
  }
  const Entry* find(const std::string& name) const {
    const auto it = entries.find(name);
    return it == entries.end() ? nullptr : &it->second;
  }
};

// The AnonHugePages line of /proc/self/smaps_rollup (Linux): whether the kernel granted the pages.
std::string anon_huge_pages() {
  std::FILE* f = std::fopen("/proc/self/smaps_rollup", "r");
  if (f == nullptr) return "unknown";
  char line[256];
  std::string found = "unknown";
  while (std::fgets(line, sizeof line, f) != nullptr) {
    if (std::strncmp(line, "AnonHugePages:", 14) != 0) continue;
    found = line + 14;
    found.erase(0, found.find_first_not_of(' '));
    found.erase(found.find_last_not_of(" \n") + 1);
  }
  std::fclose(f);
  return found;
}

// bound ÷ time = max(bytes ÷ bandwidth, FLOPs ÷ rate) ÷ time, from a row's report_work counters.
double roofline(const Collector::Entry& e, double read_gbs, double sgemm_gfs) {
  return std::max(e.counters.at("weight GB/s") / read_gbs, e.counters.at("GFLOP/s") / sgemm_gfs);
}
double roofline(const Collector::Entry& e, const Limits& lim) { return roofline(e, lim.read_gbs, lim.sgemm_gfs); }
// The same against the yardsticks measured just before the row: one sample each, so noisy (it can
// pass 1.0), but it tells a slow moment of the machine from a slow kernel.
double roofline_now(const Collector::Entry& e) {
  return roofline(e, e.counters.at("read GB/s before"), e.counters.at("sgemm GFLOP/s before"));
}

// The expert table: roofline of one cold expert per token count m (bound = max(its weights ÷
// bandwidth, its FLOPs ÷ sgemm rate), with the run's best yardsticks), then each layer row's
// tokens per active expert.
void print_expert_summary(const Collector& c) {
  auto expert = [&](const Shape& s, int m, int threads) {
    return c.find("BM_Expert/" + std::string(s.name) + "/" + std::to_string(m) + "/" + std::to_string(threads));
  };
  auto measured = [&](const Shape& s) {  // whether any of the shape's BM_Expert rows ran
    for (const int m : kExpertTokens)
      for (int threads = 1; threads <= 2; ++threads)
        if (expert(s, m, threads) != nullptr) return true;
    return false;
  };
  if (std::none_of(std::begin(kShapes), std::end(kShapes), measured)) return;
  std::printf("\nOne expert, cold weights: roofline (1 thread / 2 threads) by tokens m\n%-4s", "");
  for (const int m : kExpertTokens) std::printf(" %11d", m);
  std::printf("\n");
  for (const Shape& s : kShapes) {
    if (!measured(s)) continue;
    std::printf("%-4s", s.name);
    for (const int m : kExpertTokens) {
      std::string cell;
      for (int threads = 1; threads <= 2; ++threads) {
        const auto* e = expert(s, m, threads);
        const auto lim = g_limits.find(threads);
        char buf[16] = "-";
        if (e != nullptr && lim != g_limits.end()) std::snprintf(buf, sizeof buf, "%.2f", roofline(*e, lim->second));
        cell += (threads == 1 ? "" : "/") + std::string(buf);
      }
      std::printf(" %11s", cell.c_str());
    }
    std::printf("\n");
  }
  std::printf("Tokens per active expert in the layer rows (min / median / max, experts active)\n");
  for (const Shape& s : kShapes) {
    for (const int T : kTokenCounts) {
      const std::string row = row_name(s, T);
      const auto found = g_row_tokens.find(row);
      if (found == g_row_tokens.end() || found->second.empty()) continue;
      const std::vector<index_t>& n = found->second;
      std::printf("  %-8s %4td / %4td / %4td, %3zu\n", row.c_str(), static_cast<std::ptrdiff_t>(n.front()),
                  static_cast<std::ptrdiff_t>(n[n.size() / 2]), static_cast<std::ptrdiff_t>(n.back()), n.size());
    }
  }
}

std::string fixed2(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.2f", v);
  return buf;
}

void print_summary(const Collector& c) {
  std::printf("\nSummary (medians; roofline = bound / layer time; share = (route+dispatch+combine) / layer)\n");
  std::printf("  weights on %s pages (%s); anonymous huge pages in use now: %s\n", g_huge_pages ? "2 MiB" : "4 KiB",
              g_huge_pages ? "MOE_BENCH_HUGE_PAGES=0 for 4 KiB" : "MOE_BENCH_HUGE_PAGES=0", anon_huge_pages().c_str());
  std::printf("  T <= 16: weights flushed, threads %s before each iteration\n",
              g_wake_threads ? "woken (MOE_BENCH_SLEEPING_THREADS=1 to let them sleep)" : "left asleep (MOE_BENCH_SLEEPING_THREADS=1)");
  for (const auto& l : g_limits) {
    std::printf("  %d thread(s), best of the run: read %.1f GB/s, sgemm %.1f GFLOP/s (%s)\n", l.first, l.second.read_gbs,
                l.second.sgemm_gfs, l.second.sgemm_source);
  }
  std::printf("  read now, sgemm now: the read bandwidth (GB/s) and sgemm rate (GFLOP/s) measured just before the row's\n"
              "  own timing; roof now: the roofline against those (one sample each: noisy, can pass 1.0)\n");
  std::printf("  disp/cpy, comb/cpy: dispatch's and combine's bandwidth over memcpy's, timed in pairs on one thread;\n"
              "  comb/rows: over the memcpy of the combine's rows in its order\n");
  std::printf("  roof pairs: the roofline against a read of the same weights and a short sgemm, each timed in a pair\n"
              "  with the layer (BM_Roof; the median of the pairs)\n");
  std::printf("%-4s %6s %3s %10s %9s %9s %9s %9s %8s %9s %9s %9s %9s %9s %10s %10s\n", "", "T", "thr", "layer ms",
              "roofline", "roof now", "vs naive", "share %", "2thr x", "GFLOP/s", "disp/cpy", "comb/cpy", "comb/rows",
              "read now", "sgemm now", "roof pairs");
  for (const Shape& s : kShapes) {
    for (const int T : kTokenCounts) {
      for (int threads = 1; threads <= 2; ++threads) {
        const std::string row = row_name(s, T), suffix = row + "/" + std::to_string(threads);
        const auto* layer = c.find("BM_Layer/" + suffix);
        if (layer == nullptr) continue;
        const auto* naive = c.find("BM_Naive/" + suffix);
        const auto* over = c.find("BM_Overhead/" + suffix);
        const auto* paired = c.find("BM_Threads/" + row);
        const auto* roof = c.find("BM_Roof/" + suffix);
        const auto* disp = c.find("BM_Dispatch/" + row);
        const auto* comb = c.find("BM_Combine/" + row);
        auto ratio = [](const Collector::Entry* a, const Collector::Entry* b, double scale = 1.0) {
          return a == nullptr || b == nullptr ? std::string("-") : fixed2(scale * a->ms / b->ms);
        };
        // A move's bandwidth over memcpy's, as BM_Move measured it pair by pair (on one thread).
        auto vs = [threads](const Collector::Entry* move, const char* counter) {
          return threads != 1 || move == nullptr ? std::string("-") : fixed2(move->counters.at(counter));
        };
        std::printf("%-4s %6d %3d %10.3f %9.2f %9.2f %9s %9s %8s %9.1f %9s %9s %9s %9.1f %10.1f %10s\n", s.name, T, threads,
                    layer->ms, roofline(*layer, g_limits.at(threads)), roofline_now(*layer),
                    naive != nullptr ? fixed2(naive->counters.at("vs naive")).c_str() : "-",
                    ratio(over, layer, 100.0).c_str(),
                    threads == 2 && paired != nullptr ? fixed2(paired->counters.at("2 thr x")).c_str() : "-",
                    layer->counters.at("GFLOP/s"),
                    vs(disp, "vs memcpy").c_str(), vs(comb, "vs memcpy").c_str(), vs(comb, "vs rows").c_str(),
                    layer->counters.at("read GB/s before"), layer->counters.at("sgemm GFLOP/s before"),
                    roof != nullptr ? fixed2(roof->counters.at("roof pairs")).c_str() : "-");
      }
    }
  }
  print_expert_summary(c);
}

// The layer's rows: every token count on 1 and 2 threads.
void layer_rows(benchmark::internal::Benchmark* b) {
  for (const int T : kTokenCounts)
    for (int threads = 1; threads <= g_max_threads; ++threads) b->Args({T, threads});
  b->Unit(benchmark::kMillisecond);
}

template <class M>
void register_shape(const Shape& s) {
  const std::string n = s.name;
  auto args = [](benchmark::internal::Benchmark* b) { layer_rows(b->UseRealTime()); };
  auto pairs = [](benchmark::internal::Benchmark* b) { layer_rows(b->UseManualTime()); };
  benchmark::RegisterBenchmark(("BM_Layer/" + n).c_str(), BM_Layer<M>, s)->Apply(args);
  benchmark::RegisterBenchmark(("BM_Naive/" + n).c_str(), BM_Naive<M>, s)->Apply(pairs);
  benchmark::RegisterBenchmark(("BM_Overhead/" + n).c_str(), BM_Overhead<M>, s)->Apply(args);
  auto roof_pairs = [](benchmark::internal::Benchmark* b) { layer_rows(b->UseManualTime()->Iterations(kRoofPairs)); };
  benchmark::RegisterBenchmark(("BM_Roof/" + n).c_str(), BM_Roof<M>, s)->Apply(roof_pairs);
  auto token_counts = [](benchmark::internal::Benchmark* b) {
    for (const int T : kTokenCounts) b->Arg(T);
    b->Unit(benchmark::kMillisecond)->UseManualTime();
  };
  if (g_max_threads >= 2) {
    benchmark::RegisterBenchmark(("BM_Threads/" + n).c_str(), BM_Threads<M>, s)->Apply(token_counts);
  }
  auto moves = [](benchmark::internal::Benchmark* b) {
    for (const int T : kTokenCounts) b->Arg(T);
    b->Unit(benchmark::kMicrosecond)->UseManualTime()->Iterations(kMovePairs);
  };
  benchmark::RegisterBenchmark(("BM_Dispatch/" + n).c_str(), BM_Move<M>, s, Move::dispatch)->Apply(moves);
  benchmark::RegisterBenchmark(("BM_Combine/" + n).c_str(), BM_Move<M>, s, Move::combine)->Apply(moves);
  auto expert_args = [](benchmark::internal::Benchmark* b) {
    for (const int m : kExpertTokens)
      for (int threads = 1; threads <= g_max_threads; ++threads) b->Args({m, threads});
    b->Unit(benchmark::kMicrosecond)->UseRealTime();
  };
  benchmark::RegisterBenchmark(("BM_Expert/" + n).c_str(), BM_Expert<M>, s)->Apply(expert_args);
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  apply_page_choice();
  g_max_threads = std::min(2, moe::max_threads());
  register_shape<GatedModel>(kShapes[0]);
  register_shape<GatedModel>(kShapes[1]);
  register_shape<PlainModel>(kShapes[2]);
  for (int threads = 1; threads <= g_max_threads; ++threads) {
    g_limits[threads] = measure_limits(threads);
    benchmark::AddCustomContext("read GB/s, " + std::to_string(threads) + " thread(s)", std::to_string(g_limits[threads].read_gbs));
    benchmark::AddCustomContext("sgemm GFLOP/s, " + std::to_string(threads) + " thread(s)", std::to_string(g_limits[threads].sgemm_gfs));
  }
  Collector collector;
  benchmark::RunSpecifiedBenchmarks(&collector);
  print_summary(collector);
  benchmark::Shutdown();
  return 0;
}
