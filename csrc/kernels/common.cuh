// Plumbing shared by the GPU kernels: block-wide all-reduce (warp-size agnostic), 16-byte vector access with a
// scalar fallback, and the host-side dispatch from (dtype, alignment) to one template instance.
#pragma once

#include <type_traits>

#include "olmo_fast/kernels.h"
#include "olmo_fast/numerics.h"

namespace olmo_fast {

// All-reduce over the block with a combine `op` on a small POD `T` whose fields are floats: shuffles inside
// each warp/wavefront, then every thread folds the per-warp partials in the same order (deterministic, and
// the same result in every thread). blockDim.x must be a multiple of OF_WARP_SIZE.
template <class T, class Op>
__device__ T block_allreduce(T v, Op op) {
  constexpr int kFields = sizeof(T) / sizeof(float);
  static_assert(sizeof(T) == kFields * sizeof(float), "block_allreduce reduces structs of floats");
#pragma unroll
  for (int mask = OF_WARP_SIZE / 2; mask > 0; mask /= 2) {
    T other;
    float* src = reinterpret_cast<float*>(&v);
    float* dst = reinterpret_cast<float*>(&other);
#pragma unroll
    for (int f = 0; f < kFields; ++f) dst[f] = shfl_xor(src[f], mask);
    v = op(v, other);
  }
  __shared__ T partial[OF_MAX_THREADS / OF_WARP_SIZE];
  const int warps = blockDim.x / OF_WARP_SIZE;
  if (threadIdx.x % OF_WARP_SIZE == 0) partial[threadIdx.x / OF_WARP_SIZE] = v;
  __syncthreads();
  v = partial[0];
  for (int w = 1; w < warps; ++w) v = op(v, partial[w]);
  __syncthreads();  // the partials may be reused by a following reduction
  return v;
}

template <class T, int N>
OF_DEVICE Vec<T, N> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}

template <class T, int N>
OF_DEVICE void store_vec(T* p, const Vec<T, N>& v) {
  *reinterpret_cast<Vec<T, N>*>(p) = v;
}

// ---- host side ----

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// f(T{}) with T the storage type of `dtype`.
template <class F>
int dispatch_dtype(olmo_fast_dtype dtype, F&& f) {
  switch (dtype) {
    case OLMO_FAST_F32: return f(float{});
    case OLMO_FAST_F16: return f(fp16{});
    case OLMO_FAST_BF16: return f(bf16{});
  }
  return int(gpuErrorInvalidValue);
}

// f(std::integral_constant<int, V>{}) with V = elements per 16 bytes when `vectorizable`, else 1.
template <class T, class F>
int dispatch_vec(bool vectorizable, F&& f) {
  if (vectorizable) return f(std::integral_constant<int, int(16 / sizeof(T))>{});
  return f(std::integral_constant<int, 1>{});
}

// Whether rows of `cols` elements at `ptr` with row stride `stride` split into aligned 16-byte vectors.
template <class T>
bool rows_vectorizable(const void* ptr, int64_t stride, int64_t cols) {
  constexpr int64_t v = 16 / sizeof(T);
  return ptr == nullptr || (aligned16(ptr) && stride % v == 0 && cols % v == 0);
}

inline int next_pow2(int64_t n) {
  int p = 1;
  while (p < n && p < OF_MAX_THREADS) p *= 2;
  return p;
}

// At most this many blocks per launch: HIP's dispatch packet holds gridDim.x * blockDim.x (work-items) in 32 bits,
// so 2^21 blocks of up to 1024 threads; kernels grid-stride past the cap.
#define OF_MAX_BLOCKS (int64_t(1) << 21)

// Blocks for `units` independent work items of `per_block` each.
inline unsigned grid_for(int64_t units, int64_t per_block) {
  const int64_t blocks = (units + per_block - 1) / per_block;
  return unsigned(blocks < OF_MAX_BLOCKS ? blocks : OF_MAX_BLOCKS);
}

inline int last_error() { return int(gpuGetLastError()); }

}  // namespace olmo_fast
