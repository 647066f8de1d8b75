// Fused SwiGLU on OLMo's [x | gate] layout, forward and backward, on the GPU.
//
// Elementwise over rows: a block of (tx, ty) threads covers ty rows at a time, tx threads striding over a
// row's columns in 16-byte vectors (scalar when a row is unaligned or its width not a multiple of the vector).
// DRAM bytes (e = element size, N rows, H = hidden): forward reads 2NHe, writes NHe;
// backward reads 3NHe (dout, x, gate) and writes 2NHe (dx, dgate) in one pass, the sigmoid recomputed.
#include "common.cuh"

namespace olmo_fast {
namespace {

template <class T, int V>
__global__ OF_LAUNCH_BOUNDS void swiglu_fwd_kernel(olmo_fast_swiglu_fwd_args a) {
  const int64_t nvec = a.hidden / V;
  for (int64_t row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; row < a.rows;
       row += int64_t(gridDim.x) * blockDim.y) {
    const T* x = static_cast<const T*>(a.h) + row * a.h_stride;
    const T* gate = x + a.hidden;
    T* out = static_cast<T*>(a.out) + row * a.hidden;
    for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
      const Vec<T, V> xv = load_vec<T, V>(x + i * V);
      const Vec<T, V> gv = load_vec<T, V>(gate + i * V);
      Vec<T, V> ov;
#pragma unroll
      for (int j = 0; j < V; ++j) ov.v[j] = from_float<T>(swiglu(to_float(xv.v[j]), to_float(gv.v[j])));
      store_vec<T, V>(out + i * V, ov);
    }
  }
}

template <class T, int V>
__global__ OF_LAUNCH_BOUNDS void swiglu_bwd_kernel(olmo_fast_swiglu_bwd_args a) {
  const int64_t nvec = a.hidden / V;
  for (int64_t row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; row < a.rows;
       row += int64_t(gridDim.x) * blockDim.y) {
    const T* dout = static_cast<const T*>(a.dout) + row * a.dout_stride;
    const T* x = static_cast<const T*>(a.h) + row * a.h_stride;
    const T* gate = x + a.hidden;
    T* dx = static_cast<T*>(a.dh) + row * 2 * a.hidden;
    T* dgate = dx + a.hidden;
    for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
      const Vec<T, V> dv = load_vec<T, V>(dout + i * V);
      const Vec<T, V> xv = load_vec<T, V>(x + i * V);
      const Vec<T, V> gv = load_vec<T, V>(gate + i * V);
      Vec<T, V> dxv, dgv;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        float gx, gg;
        swiglu_grad(to_float(dv.v[j]), to_float(xv.v[j]), to_float(gv.v[j]), &gx, &gg);
        dxv.v[j] = from_float<T>(gx);
        dgv.v[j] = from_float<T>(gg);
      }
      store_vec<T, V>(dx + i * V, dxv);
      store_vec<T, V>(dgate + i * V, dgv);
    }
  }
}

// 256 threads: tx over a row's vectors (a power of two up to 256), ty = 256 / tx rows side by side.
dim3 row_block(int64_t vectors) {
  const int tx = next_pow2(vectors) < 256 ? next_pow2(vectors) : 256;
  return dim3(unsigned(tx), unsigned(256 / tx));
}

}  // namespace
}  // namespace olmo_fast

using namespace olmo_fast;

extern "C" int olmo_fast_swiglu_fwd_gpu(const olmo_fast_swiglu_fwd_args* args, void* stream) {
  const olmo_fast_swiglu_fwd_args a = *args;
  if (a.rows == 0 || a.hidden == 0) return 0;
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool vec = rows_vectorizable<T>(a.h, a.h_stride, a.hidden) && rows_vectorizable<T>(a.out, a.hidden, a.hidden);
    return dispatch_vec<T>(vec, [&](auto width) {
      constexpr int V = decltype(width)::value;
      const dim3 block = row_block(a.hidden / V);
      swiglu_fwd_kernel<T, V><<<grid_for(a.rows, block.y), block, 0, static_cast<gpuStream_t>(stream)>>>(a);
      return last_error();
    });
  });
}

extern "C" int olmo_fast_swiglu_bwd_gpu(const olmo_fast_swiglu_bwd_args* args, void* stream) {
  const olmo_fast_swiglu_bwd_args a = *args;
  if (a.rows == 0 || a.hidden == 0) return 0;
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool vec = rows_vectorizable<T>(a.dout, a.dout_stride, a.hidden) &&
                     rows_vectorizable<T>(a.h, a.h_stride, a.hidden) &&
                     rows_vectorizable<T>(a.dh, 2 * a.hidden, a.hidden);
    return dispatch_vec<T>(vec, [&](auto width) {
      constexpr int V = decltype(width)::value;
      const dim3 block = row_block(a.hidden / V);
      swiglu_bwd_kernel<T, V><<<grid_for(a.rows, block.y), block, 0, static_cast<gpuStream_t>(stream)>>>(a);
      return last_error();
    });
  });
}
