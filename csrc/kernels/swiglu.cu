// SwiGLU's activation silu(gate) * up on the GPU, forward and backward; OLMo's fused [up | gate] projection
// is the same kernel on the two halves of one row.
//
// Elementwise over rows: a block of (tx, ty) threads covers ty rows at a time, tx threads striding over a
// row's columns in 16-byte vectors (scalar when a row is unaligned or its width not a multiple of the vector).
// DRAM bytes (e = element size, N rows, H = hidden): forward reads 2NHe, writes NHe;
// backward reads 3NHe (dout, gate, up) and writes 2NHe (d_gate, d_up) in one pass, the sigmoid recomputed.
#include "common.cuh"

namespace olmo_fast {
namespace {

template <class T, int V>
__global__ OF_LAUNCH_BOUNDS void silu_mul_fwd_kernel(olmo_fast_silu_mul_fwd_args a) {
  const int64_t nvec = a.hidden / V;
  for (int64_t row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; row < a.rows;
       row += int64_t(gridDim.x) * blockDim.y) {
    const T* gate = static_cast<const T*>(a.gate) + row * a.gate_stride;
    const T* up = static_cast<const T*>(a.up) + row * a.up_stride;
    T* out = static_cast<T*>(a.out) + row * a.out_stride;
    for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
      const Vec<T, V> gv = load_vec<T, V>(gate + i * V);
      const Vec<T, V> uv = load_vec<T, V>(up + i * V);
      Vec<T, V> ov;
#pragma unroll
      for (int j = 0; j < V; ++j) ov.v[j] = from_float<T>(silu_mul(to_float(gv.v[j]), to_float(uv.v[j])));
      store_vec<T, V>(out + i * V, ov);
    }
  }
}

template <class T, int V>
__global__ OF_LAUNCH_BOUNDS void silu_mul_bwd_kernel(olmo_fast_silu_mul_bwd_args a) {
  const int64_t nvec = a.hidden / V;
  for (int64_t row = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; row < a.rows;
       row += int64_t(gridDim.x) * blockDim.y) {
    const T* dout = static_cast<const T*>(a.dout) + row * a.dout_stride;
    const T* gate = static_cast<const T*>(a.gate) + row * a.gate_stride;
    const T* up = static_cast<const T*>(a.up) + row * a.up_stride;
    T* d_gate = static_cast<T*>(a.d_gate) + row * a.d_gate_stride;
    T* d_up = static_cast<T*>(a.d_up) + row * a.d_up_stride;
    for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
      const Vec<T, V> dv = load_vec<T, V>(dout + i * V);
      const Vec<T, V> gv = load_vec<T, V>(gate + i * V);
      const Vec<T, V> uv = load_vec<T, V>(up + i * V);
      Vec<T, V> dgv, duv;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        float dg, du;
        silu_mul_grad(to_float(dv.v[j]), to_float(gv.v[j]), to_float(uv.v[j]), &dg, &du);
        dgv.v[j] = from_float<T>(dg);
        duv.v[j] = from_float<T>(du);
      }
      store_vec<T, V>(d_gate + i * V, dgv);
      store_vec<T, V>(d_up + i * V, duv);
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

extern "C" int olmo_fast_silu_mul_fwd_gpu(const olmo_fast_silu_mul_fwd_args* args, void* stream) {
  const olmo_fast_silu_mul_fwd_args a = *args;
  if (a.rows == 0 || a.hidden == 0) return 0;
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool vec = rows_vectorizable<T>(a.gate, a.gate_stride, a.hidden) &&
                     rows_vectorizable<T>(a.up, a.up_stride, a.hidden) &&
                     rows_vectorizable<T>(a.out, a.out_stride, a.hidden);
    return dispatch_vec<T>(vec, [&](auto width) {
      constexpr int V = decltype(width)::value;
      const dim3 block = row_block(a.hidden / V);
      OF_LAUNCH(grid_for(a.rows, block.y), block, 0, static_cast<gpuStream_t>(stream), silu_mul_fwd_kernel<T, V>)(a);
      return last_error();
    });
  });
}

extern "C" int olmo_fast_silu_mul_bwd_gpu(const olmo_fast_silu_mul_bwd_args* args, void* stream) {
  const olmo_fast_silu_mul_bwd_args a = *args;
  if (a.rows == 0 || a.hidden == 0) return 0;
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool vec = rows_vectorizable<T>(a.dout, a.dout_stride, a.hidden) &&
                     rows_vectorizable<T>(a.gate, a.gate_stride, a.hidden) &&
                     rows_vectorizable<T>(a.up, a.up_stride, a.hidden) &&
                     rows_vectorizable<T>(a.d_gate, a.d_gate_stride, a.hidden) &&
                     rows_vectorizable<T>(a.d_up, a.d_up_stride, a.hidden);
    return dispatch_vec<T>(vec, [&](auto width) {
      constexpr int V = decltype(width)::value;
      const dim3 block = row_block(a.hidden / V);
      OF_LAUNCH(grid_for(a.rows, block.y), block, 0, static_cast<gpuStream_t>(stream), silu_mul_bwd_kernel<T, V>)(a);
      return last_error();
    });
  });
}
