// Helpers shared by the CPU loops: dtype dispatch, vectorisable fp32 sums and maxima, torch.clamp.
#pragma once

#include <math.h>

#include "olmo_fast/kernels.h"
#include "olmo_fast/numerics.h"

// The row loops are compiled three times on x86-64 (GCC/Clang, ELF): for AVX-512 (x86-64-v4), AVX2 + FMA
// (x86-64-v3) and the baseline; the best one the CPU runs is picked at load time (measured on AVX-512: SwiGLU
// 0.85 -> 0.42 ns per element from v3 to v4).
// The loops of the norms and the qkv prologues, whose calls at model shapes last microseconds, are compiled without
// the AVX-512 clone (OLMO_FAST_CPU_CLONES_256: 256-bit vectors at most). Measured on a Sapphire Rapids class Xeon
// VM, 1 thread, LayerNorm backward 67x129 fp32 in torch.autograd.grad: with 512-bit vectors in the loop, the code
// around each call (the autograd engine, the Python interpreter) ran slower - perf gave the same Python code 13%
// more samples - and the whole call was 3% behind eager PyTorch's; with 256-bit vectors it is 3% ahead (the VM
// shows no hardware counters; the likely cause is the clock drop that 512-bit instructions bring). The loops that
// run long (attention, SwiGLU, cross-entropy) keep the 512-bit clone, measured faster there.
// Elsewhere, once.
#if defined(__x86_64__) && defined(__ELF__) && (defined(__GNUC__) || defined(__clang__))
#define OLMO_FAST_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define OLMO_FAST_CPU_CLONES_256 __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define OLMO_FAST_CPU_CLONES
#define OLMO_FAST_CPU_CLONES_256
#endif

// Before a loop whose iterations are independent (no output overlaps an input): no runtime overlap test.
#if defined(__clang__)
#define OLMO_FAST_IVDEP _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define OLMO_FAST_IVDEP _Pragma("GCC ivdep")
#else
#define OLMO_FAST_IVDEP
#endif

// On helpers called from the cloned loops: inlined into each clone, so compiled for its instruction set (left to
// itself, GCC keeps lane_sum out of line, compiled once for the baseline).
#if defined(__GNUC__) || defined(__clang__)
#define OLMO_FAST_INLINE inline __attribute__((always_inline))
#else
#define OLMO_FAST_INLINE inline
#endif

namespace olmo_fast {
namespace cpu {

// torch.clamp(x, -c, c) on an fp32 value that c (the bound rounded to the storage dtype) compares exactly with;
// NaN fails both tests and stays NaN; c = +inf leaves x as it is.
struct Clamp {
  float c;
  float operator()(float x) const { return x < -c ? -c : (x > c ? c : x); }
};

// torch.clamp's gradient mask: passes where -c <= x <= c (inclusive), not at NaN.
OLMO_FAST_INLINE bool clamp_passes(float x, float c) { return x >= -c && x <= c; }

// f(T{}) with T the storage type of `dtype`.
template <class F>
void dispatch_dtype(olmo_fast_dtype dtype, F&& f) {
  switch (dtype) {
    case OLMO_FAST_F32: f(float{}); break;
    case OLMO_FAST_F16: f(fp16{}); break;
    case OLMO_FAST_BF16: f(bf16{}); break;
  }
}

constexpr int kLanes = 16;

// combine(acc[0], ..., acc[kLanes - 1]) by a pairwise fold (lane j with lane j + width, width = 8, 4, 2, 1), its
// first steps on 4-lane vectors (16 bytes: baseline SIMD on x86-64 and Arm). The same fold indexed through the
// array is a chain of 15 stack stores and reloads (measured: the LayerNorm backward at 67x129 fp32, 2.6 -> 1.8 us
// a call on AVX-512).
template <class Combine>
OLMO_FAST_INLINE float fold_lanes(const float (&acc)[kLanes], Combine combine) {
  static_assert(kLanes == 16, "the fold is written for 4 quarters");
  typedef float Quarter __attribute__((vector_size(4 * sizeof(float))));
  Quarter q[4];
  __builtin_memcpy(q, acc, sizeof q);
  const Quarter by_lane_mod_4 = combine(combine(q[0], q[2]), combine(q[1], q[3]));
  return combine(combine(by_lane_mod_4[0], by_lane_mod_4[2]), combine(by_lane_mod_4[1], by_lane_mod_4[3]));
}

OLMO_FAST_INLINE float fold_sum(const float (&acc)[kLanes]) {
  return fold_lanes(acc, [](auto a, auto b) { return a + b; });
}

// sum_{i < n} term(i) in fp32 over 16 independent lanes (which the compiler maps to SIMD registers: a plain
// float reduction would stay scalar without -ffast-math), then a pairwise fold; the n % 16 tail is scalar.
template <class F>
OLMO_FAST_INLINE float lane_sum(int64_t n, F term) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) acc[j] += term(i + j);
  }
  float tail = 0.0f;
  for (; i < n; ++i) tail += term(i);
  return fold_sum(acc) + tail;
}

// lane_sum of two terms in one pass over the row (their common loads once): sum_a, sum_b as lane_sum gives them.
template <class A, class B>
OLMO_FAST_INLINE void lane_sums(int64_t n, A term_a, B term_b, float& sum_a, float& sum_b) {
  float acc_a[kLanes] = {}, acc_b[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      acc_a[j] += term_a(i + j);
      acc_b[j] += term_b(i + j);
    }
  }
  float tail_a = 0.0f, tail_b = 0.0f;
  for (; i < n; ++i) {
    tail_a += term_a(i);
    tail_b += term_b(i);
  }
  sum_a = fold_sum(acc_a) + tail_a;
  sum_b = fold_sum(acc_b) + tail_b;
}

// max_{i < n} term(i) (-inf for n = 0), over 16 lanes as lane_sum; a NaN term may be dropped (callers that must
// see NaN get it from a later sum).
template <class F>
OLMO_FAST_INLINE float lane_max(int64_t n, F term) {
  float acc[kLanes];
  for (int j = 0; j < kLanes; ++j) acc[j] = -INFINITY;
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    // Kept a loop for the loop vectoriser (which turns the select into vmaxps): fully unrolled first, the
    // basic-block vectoriser leaves it as 16 scalar vmaxss (measured: GCC 12, every fp32 clone).
#pragma GCC unroll 1
    for (int j = 0; j < kLanes; ++j) {
      const float v = term(i + j);
      acc[j] = acc[j] > v ? acc[j] : v;
    }
  }
  for (; i < n; ++i) {
    const float v = term(i);
    acc[0] = acc[0] > v ? acc[0] : v;
  }
  return fold_lanes(acc, [](auto a, auto b) { return a > b ? a : b; });
}

}  // namespace cpu
}  // namespace olmo_fast
