// Non-parametric LayerNorm on the GPU, forward (optionally fused with the residual add) and backward.
//
// One block per row (grid-striding). Forward: pass 1 streams the row (x, plus the residual whose sum
// h = x + residual is rounded to the storage dtype and written), reducing mean and M2 with Chan's merge of
// per-vector statistics (stable without a second read); pass 2 re-reads the row from L1/L2 (x, or the h this
// thread just wrote) and writes y. Backward: pass 1 reduces sum(dy) and sum(dy * y), pass 2 writes dx.
// DRAM bytes (e = element size, N x C): forward N*C*e*(2, or 4 with the residual) + 4N,
// backward N*C*e*(3, or 4 with dh) + 4N.
#include "common.cuh"

namespace olmo_fast {
namespace {

struct MeanM2 {
  float n, mean, m2;
};

struct MergeMeanM2 {
  OF_DEVICE MeanM2 operator()(MeanM2 a, MeanM2 b) const {
    const float n = a.n + b.n;
    if (n == 0.0f) return a;
    const float delta = b.mean - a.mean;
    const float b_share = b.n / n;
    return {n, a.mean + delta * b_share, a.m2 + b.m2 + delta * delta * a.n * b_share};
  }
};

struct Sums2 {
  float dy, dy_y;
};

struct AddSums2 {
  OF_DEVICE Sums2 operator()(Sums2 a, Sums2 b) const { return {a.dy + b.dy, a.dy_y + b.dy_y}; }
};

template <class T, int V, bool kResidual>
__global__ OF_LAUNCH_BOUNDS void layer_norm_fwd_kernel(olmo_fast_layer_norm_fwd_args a) {
  const int64_t nvec = a.cols / V;
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const T* x = static_cast<const T*>(a.x) + row * a.x_stride;
    T* h = kResidual ? static_cast<T*>(a.h) + row * a.cols : nullptr;
    MeanM2 acc{0.0f, 0.0f, 0.0f};
    for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
      Vec<T, V> xv = load_vec<T, V>(x + i * V);
      if constexpr (kResidual) {
        const Vec<T, V> rv = load_vec<T, V>(static_cast<const T*>(a.residual) + row * a.residual_stride + i * V);
#pragma unroll
        for (int j = 0; j < V; ++j) xv.v[j] = from_float<T>(to_float(xv.v[j]) + to_float(rv.v[j]));
        store_vec<T, V>(h + i * V, xv);
      }
      float f[V];
      float sum = 0.0f;
#pragma unroll
      for (int j = 0; j < V; ++j) sum += (f[j] = to_float(xv.v[j]));
      const float mean = sum / float(V);
      float m2 = 0.0f;
#pragma unroll
      for (int j = 0; j < V; ++j) m2 += (f[j] - mean) * (f[j] - mean);
      acc = MergeMeanM2()(acc, MeanM2{float(V), mean, m2});
    }
    acc = block_allreduce(acc, MergeMeanM2());
    const float rstd = rsqrtf(acc.m2 / float(a.cols) + a.eps);
    if (threadIdx.x == 0) a.rstd[row] = rstd;
    const T* src = kResidual ? h : x;
    T* y = static_cast<T*>(a.y) + row * a.cols;
    for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
      const Vec<T, V> v = load_vec<T, V>(src + i * V);
      Vec<T, V> out;
#pragma unroll
      for (int j = 0; j < V; ++j) out.v[j] = from_float<T>((to_float(v.v[j]) - acc.mean) * rstd);
      store_vec<T, V>(y + i * V, out);
    }
  }
}

template <class T, int V, bool kDh>
__global__ OF_LAUNCH_BOUNDS void layer_norm_bwd_kernel(olmo_fast_layer_norm_bwd_args a) {
  const int64_t nvec = a.cols / V;
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const T* dy = static_cast<const T*>(a.dy) + row * a.dy_stride;
    const T* y = static_cast<const T*>(a.y) + row * a.y_stride;
    Sums2 s{0.0f, 0.0f};
    for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
      const Vec<T, V> dv = load_vec<T, V>(dy + i * V);
      const Vec<T, V> yv = load_vec<T, V>(y + i * V);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const float g = to_float(dv.v[j]);
        s.dy += g;
        s.dy_y += g * to_float(yv.v[j]);
      }
    }
    s = block_allreduce(s, AddSums2());
    const float mean_dy = s.dy / float(a.cols);
    const float mean_dy_y = s.dy_y / float(a.cols);
    const float rstd = a.rstd[row];
    T* dx = static_cast<T*>(a.dx) + row * a.cols;
    for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
      const Vec<T, V> dv = load_vec<T, V>(dy + i * V);
      const Vec<T, V> yv = load_vec<T, V>(y + i * V);
      Vec<T, V> dhv;
      if constexpr (kDh) dhv = load_vec<T, V>(static_cast<const T*>(a.dh) + row * a.dh_stride + i * V);
      Vec<T, V> out;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        float g = rstd * (to_float(dv.v[j]) - mean_dy - to_float(yv.v[j]) * mean_dy_y);
        if constexpr (kDh) g += to_float(dhv.v[j]);
        out.v[j] = from_float<T>(g);
      }
      store_vec<T, V>(dx + i * V, out);
    }
  }
}

// Threads per row: about two vectors per thread, a multiple of the widest wavefront, at most 1024.
int row_threads(int64_t vectors) {
  const int t = next_pow2((vectors + 1) / 2);
  return t < 64 ? 64 : t;
}

}  // namespace
}  // namespace olmo_fast

using namespace olmo_fast;

extern "C" int olmo_fast_layer_norm_fwd_gpu(const olmo_fast_layer_norm_fwd_args* args, void* stream) {
  const olmo_fast_layer_norm_fwd_args a = *args;
  if (a.rows == 0) return 0;
  if ((a.residual == nullptr) != (a.h == nullptr) || a.cols <= 0) return int(gpuErrorInvalidValue);
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool vec = rows_vectorizable<T>(a.x, a.x_stride, a.cols) &&
                     rows_vectorizable<T>(a.residual, a.residual_stride, a.cols) &&
                     rows_vectorizable<T>(a.y, a.cols, a.cols) && rows_vectorizable<T>(a.h, a.cols, a.cols);
    return dispatch_vec<T>(vec, [&](auto width) {
      constexpr int V = decltype(width)::value;
      const unsigned grid = grid_for(a.rows, 1);
      const int threads = row_threads(a.cols / V);
      const gpuStream_t s = static_cast<gpuStream_t>(stream);
      if (a.residual != nullptr) {
        layer_norm_fwd_kernel<T, V, true><<<grid, threads, 0, s>>>(a);
      } else {
        layer_norm_fwd_kernel<T, V, false><<<grid, threads, 0, s>>>(a);
      }
      return last_error();
    });
  });
}

extern "C" int olmo_fast_layer_norm_bwd_gpu(const olmo_fast_layer_norm_bwd_args* args, void* stream) {
  const olmo_fast_layer_norm_bwd_args a = *args;
  if (a.rows == 0) return 0;
  if (a.cols <= 0) return int(gpuErrorInvalidValue);
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool vec = rows_vectorizable<T>(a.dy, a.dy_stride, a.cols) &&
                     rows_vectorizable<T>(a.y, a.y_stride, a.cols) &&
                     rows_vectorizable<T>(a.dh, a.dh_stride, a.cols) && rows_vectorizable<T>(a.dx, a.cols, a.cols);
    return dispatch_vec<T>(vec, [&](auto width) {
      constexpr int V = decltype(width)::value;
      const unsigned grid = grid_for(a.rows, 1);
      const int threads = row_threads(a.cols / V);
      const gpuStream_t s = static_cast<gpuStream_t>(stream);
      if (a.dh != nullptr) {
        layer_norm_bwd_kernel<T, V, true><<<grid, threads, 0, s>>>(a);
      } else {
        layer_norm_bwd_kernel<T, V, false><<<grid, threads, 0, s>>>(a);
      }
      return last_error();
    });
  });
}
