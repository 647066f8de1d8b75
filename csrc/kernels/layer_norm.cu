// Row normalisation on the GPU (OLMo's non-parametric LayerNorm; LayerNorm with weight/bias; RMSNorm),
// optionally fused with the residual add - before the norm (OLMo 1: h = x + residual, then the norm) or after it
// (OLMo 2's post-norm, add_after: y = residual + the normalised row rounded to the storage dtype) - forward and
// backward.
//
// Forward: one block per row (grid-striding). Pass 1 streams the row (x, plus the residual whose sum
// h = x + residual is rounded to the storage dtype and written), reducing mean and M2 with Chan's merge of
// per-vector statistics (stable without a second read); pass 2 re-reads the row from L1/L2 (x, or the h this
// thread just wrote) and writes y (after adding the residual, with add_after). Backward: pass 1 reduces sum(g * xhat) and sum(g), pass 2 writes dx; with
// a weight or bias, `partials` blocks stride over the rows, each adding dweight/dbias terms into its own fp32
// accumulator row (in L2), summed by the caller.
// DRAM bytes (e = element size, N x C): forward N*C*e*(2, or 4 with the residual) + 4N (+ weight, bias),
// backward N*C*e*(3, or 4 with dh) + 4N (8N with the mean); add_after: forward N*C*e*3 + 4N.
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
  float g_xhat, g;
};

struct AddSums2 {
  OF_DEVICE Sums2 operator()(Sums2 a, Sums2 b) const { return {a.g_xhat + b.g_xhat, a.g + b.g}; }
};

template <class T, int V>
OF_DEVICE void load_floats(const T* p, float (&out)[V]) {
  const Vec<T, V> v = load_vec<T, V>(p);
#pragma unroll
  for (int j = 0; j < V; ++j) out[j] = to_float(v.v[j]);
}

// kResidual: add the residual before the norm (writing h); kAddAfter: add it to the normalised row.
template <class T, int V, bool kResidual, bool kAddAfter>
__global__ OF_LAUNCH_BOUNDS void norm_fwd_kernel(olmo_fast_norm_fwd_args a) {
  static_assert(!(kResidual && kAddAfter), "the residual is added before or after the norm, not both");
  const int64_t nvec = a.cols / V;
  const T* weight = static_cast<const T*>(a.weight);
  const T* bias = static_cast<const T*>(a.bias);
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
    const float var = acc.m2 / float(a.cols);
    const float center = a.rms ? 0.0f : acc.mean;
    const float rstd = rsqrtf(a.rms ? var + acc.mean * acc.mean + a.eps : var + a.eps);  // RMS: mean(h^2)
    if (threadIdx.x == 0) {
      a.rstd[row] = rstd;
      if (a.mean != nullptr) a.mean[row] = center;
    }
    const T* src = kResidual ? h : x;
    T* y = static_cast<T*>(a.y) + row * a.cols;
    for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
      float v[V], w[V], b[V], r[V];
      load_floats<T, V>(src + i * V, v);
      if (weight != nullptr) load_floats<T, V>(weight + i * V, w);
      if (bias != nullptr) load_floats<T, V>(bias + i * V, b);
      if constexpr (kAddAfter) load_floats<T, V>(static_cast<const T*>(a.residual) + row * a.residual_stride + i * V, r);
      Vec<T, V> out;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        float o = (v[j] - center) * rstd;
        if (weight != nullptr) o *= w[j];
        if (bias != nullptr) o += b[j];
        if constexpr (kAddAfter) o = to_float(from_float<T>(o)) + r[j];  // the norm rounded first, as PyTorch's cast
        out.v[j] = from_float<T>(o);
      }
      store_vec<T, V>(y + i * V, out);
    }
  }
}

// g = dy (* weight) and xhat of one vector of a row.
template <class T, int V>
OF_DEVICE void bwd_terms(const olmo_fast_norm_bwd_args& a, const T* dy, const T* s, int64_t i, float shift,
                         float scale, float (&d)[V], float (&g)[V], float (&xhat)[V]) {
  load_floats<T, V>(dy + i * V, d);
  load_floats<T, V>(s + i * V, xhat);
  float w[V];
  if (a.weight != nullptr) load_floats<T, V>(static_cast<const T*>(a.weight) + i * V, w);
#pragma unroll
  for (int j = 0; j < V; ++j) {
    xhat[j] = (xhat[j] - shift) * scale;
    g[j] = a.weight != nullptr ? d[j] * w[j] : d[j];
  }
}

template <class T, int V, bool kDh>
__global__ OF_LAUNCH_BOUNDS void norm_bwd_kernel(olmo_fast_norm_bwd_args a) {
  const int64_t nvec = a.cols / V;
  float* dw = a.dweight != nullptr ? a.dweight + blockIdx.x * a.cols : nullptr;
  float* db = a.dbias != nullptr ? a.dbias + blockIdx.x * a.cols : nullptr;
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const T* dy = static_cast<const T*>(a.dy) + row * a.dy_stride;
    const T* s = static_cast<const T*>(a.saved) + row * a.saved_stride;
    const float rstd = a.rstd[row];
    const float scale = a.from_input ? rstd : 1.0f;  // xhat = y, or (h - mean) * rstd
    const float shift = a.from_input && a.mean != nullptr ? a.mean[row] : 0.0f;
    Sums2 sums{0.0f, 0.0f};
    for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
      float d[V], g[V], xhat[V];
      bwd_terms<T, V>(a, dy, s, i, shift, scale, d, g, xhat);
#pragma unroll
      for (int j = 0; j < V; ++j) {
        sums.g_xhat += g[j] * xhat[j];
        sums.g += g[j];
      }
    }
    sums = block_allreduce(sums, AddSums2());
    const float mean_g_xhat = sums.g_xhat / float(a.cols);
    const float mean_g = a.rms ? 0.0f : sums.g / float(a.cols);
    T* dx = static_cast<T*>(a.dx) + row * a.cols;
    for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
      float d[V], g[V], xhat[V], dh[V];
      bwd_terms<T, V>(a, dy, s, i, shift, scale, d, g, xhat);
      if constexpr (kDh) load_floats<T, V>(static_cast<const T*>(a.dh) + row * a.dh_stride + i * V, dh);
      Vec<T, V> out;
#pragma unroll
      for (int j = 0; j < V; ++j) {
        float v = rstd * (g[j] - xhat[j] * mean_g_xhat - mean_g);
        if constexpr (kDh) v += dh[j];
        out.v[j] = from_float<T>(v);
      }
      store_vec<T, V>(dx + i * V, out);
      for (int j = 0; j < V; ++j) {
        if (dw != nullptr) dw[i * V + j] += d[j] * xhat[j];
        if (db != nullptr) db[i * V + j] += d[j];
      }
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

extern "C" int olmo_fast_norm_fwd_gpu(const olmo_fast_norm_fwd_args* args, void* stream) {
  const olmo_fast_norm_fwd_args a = *args;
  if (a.rows == 0) return 0;
  const bool add_before = a.residual != nullptr && !a.add_after;
  if (add_before != (a.h != nullptr) || (a.add_after && a.residual == nullptr) || a.cols <= 0) {
    return int(gpuErrorInvalidValue);
  }
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool vec = rows_vectorizable<T>(a.x, a.x_stride, a.cols) &&
                     rows_vectorizable<T>(a.residual, a.residual_stride, a.cols) &&
                     rows_vectorizable<T>(a.weight, 0, a.cols) && rows_vectorizable<T>(a.bias, 0, a.cols) &&
                     rows_vectorizable<T>(a.y, a.cols, a.cols) && rows_vectorizable<T>(a.h, a.cols, a.cols);
    return dispatch_vec<T>(vec, [&](auto width) {
      constexpr int V = decltype(width)::value;
      const unsigned grid = grid_for(a.rows, 1);
      const int threads = row_threads(a.cols / V);
      const gpuStream_t s = static_cast<gpuStream_t>(stream);
      if (a.add_after) {
        OF_LAUNCH(grid, threads, 0, s, norm_fwd_kernel<T, V, false, true>)(a);
      } else if (add_before) {
        OF_LAUNCH(grid, threads, 0, s, norm_fwd_kernel<T, V, true, false>)(a);
      } else {
        OF_LAUNCH(grid, threads, 0, s, norm_fwd_kernel<T, V, false, false>)(a);
      }
      return last_error();
    });
  });
}

extern "C" int olmo_fast_norm_bwd_gpu(const olmo_fast_norm_bwd_args* args, void* stream) {
  const olmo_fast_norm_bwd_args a = *args;
  if (a.rows == 0) return 0;
  const bool accumulates = a.dweight != nullptr || a.dbias != nullptr;
  if (a.cols <= 0 || (accumulates && (a.partials <= 0 || a.partials > OF_MAX_BLOCKS))) {
    return int(gpuErrorInvalidValue);
  }
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    const bool vec = rows_vectorizable<T>(a.dy, a.dy_stride, a.cols) &&
                     rows_vectorizable<T>(a.saved, a.saved_stride, a.cols) &&
                     rows_vectorizable<T>(a.weight, 0, a.cols) && rows_vectorizable<T>(a.dh, a.dh_stride, a.cols) &&
                     rows_vectorizable<T>(a.dx, a.cols, a.cols);
    return dispatch_vec<T>(vec, [&](auto width) {
      constexpr int V = decltype(width)::value;
      const unsigned grid = accumulates ? unsigned(a.partials) : grid_for(a.rows, 1);
      const int threads = row_threads(a.cols / V);
      const gpuStream_t s = static_cast<gpuStream_t>(stream);
      if (a.dh != nullptr) {
        OF_LAUNCH(grid, threads, 0, s, norm_bwd_kernel<T, V, true>)(a);
      } else {
        OF_LAUNCH(grid, threads, 0, s, norm_bwd_kernel<T, V, false>)(a);
      }
      return last_error();
    });
  });
}
