#pragma once
// ABI namespace and the overridable throw hook.
//
// Everything lives in an inline namespace, so two incompatible versions linked into one program
// fail to link instead of misbehaving: `moe::v0`, or `moe::v0_openmp` under MOE_USE_OPENMP, whose
// inline functions differ (max_threads, thread_index: core/threads.hpp). Parts of one program
// built with and without OpenMP then each keep their own, where the linker would otherwise pick
// one for both (and threads could share one thread's scratch).
#if defined(MOE_USE_OPENMP)
#if !defined(_OPENMP)
#error "MOE_USE_OPENMP needs OpenMP: compile with -fopenmp, or link the moe::openmp CMake target"
#endif
#define MOE_NAMESPACE_BEGIN \
  namespace moe {           \
  inline namespace v0_openmp {
#else
#define MOE_NAMESPACE_BEGIN \
  namespace moe {           \
  inline namespace v0 {
#endif
#define MOE_NAMESPACE_END \
  }                       \
  }

// MOE_THROW(exception) is how every check reports failure. Define it before including moe to
// route errors elsewhere (for example to std::abort in a no-exceptions build).
#ifndef MOE_THROW
#define MOE_THROW(exception) throw exception
#endif

// Around the includes of Eigen and xsimd. g++ 12 reports -W(maybe-)uninitialized inside its own
// AVX-512 intrinsics (the _mm512_undefined_*() pass-through operand of _mm512_max_ps,
// _mm512_extractf64x4_pd, ...: GCC bug 105593, fixed in g++ 13) wherever Eigen's or xsimd's
// AVX-512 code is inlined into a caller's. g++ consults diagnostic pragmas at every location of an
// inlining chain, so silencing the two warnings over these libraries' lines (and the intrinsic
// headers they pull in) is enough; moe's code and the user's keep both warnings.
#if defined(__GNUC__) && !defined(__clang__)
#define MOE_THIRD_PARTY_BEGIN                                   \
  _Pragma("GCC diagnostic push")                                \
  _Pragma("GCC diagnostic ignored \"-Wuninitialized\"")        \
  _Pragma("GCC diagnostic ignored \"-Wmaybe-uninitialized\"")
#define MOE_THIRD_PARTY_END _Pragma("GCC diagnostic pop")
#else
#define MOE_THIRD_PARTY_BEGIN
#define MOE_THIRD_PARTY_END
#endif

// Unrolls a loop over a register block's tokens or rows (a compile-time count) whole, so that
// its accumulators stay in registers. GCC does so unasked only from -O3: at -O2 (CMake's
// RelWithDebInfo) the layer ran 2–4× slower without this.
#if defined(__clang__)
#define MOE_UNROLL _Pragma("unroll")
#elif defined(__GNUC__) && __GNUC__ >= 8 && !defined(__NVCOMPILER) && !defined(__INTEL_COMPILER)
#define MOE_UNROLL _Pragma("GCC unroll 16")
#else
#define MOE_UNROLL
#endif

// Keeps a rarely taken path out of its caller's body (a hot loop's epilogue stays short).
#if defined(__GNUC__)
#define MOE_NOINLINE __attribute__((noinline))
#elif defined(_MSC_VER)
#define MOE_NOINLINE __declspec(noinline)
#else
#define MOE_NOINLINE
#endif

// Inlines a helper that takes a register block's accumulators by pointer: left out of line, the
// block's accumulator array has its address taken, and GCC then keeps it in memory in the hot loop.
#if defined(__GNUC__)
#define MOE_ALWAYS_INLINE __attribute__((always_inline)) inline
#elif defined(_MSC_VER)
#define MOE_ALWAYS_INLINE __forceinline
#else
#define MOE_ALWAYS_INLINE inline
#endif
