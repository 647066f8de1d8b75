// Non-parametric LayerNorm on the CPU, forward (optionally fused with the residual add) and backward.
// Per row: exact two-pass statistics in fp32 (mean, then the mean squared deviation) over a row that stays in
// cache, then one pass writing y; the backward reduces sum(dy) and sum(dy * y), then writes dx.
#include <math.h>

#include "loops.h"

namespace olmo_fast {
namespace cpu {
namespace {

template <class T>
OLMO_FAST_CPU_CLONES void layer_norm_fwd_rows(const olmo_fast_layer_norm_fwd_args& a, int64_t row_begin,
                                              int64_t row_end) {
  const int64_t n = a.cols;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const T* src = static_cast<const T*>(a.x) + row * a.x_stride;
    if (a.residual != nullptr) {
      const T* x = src;
      const T* r = static_cast<const T*>(a.residual) + row * a.residual_stride;
      T* h = static_cast<T*>(a.h) + row * n;
      for (int64_t i = 0; i < n; ++i) h[i] = from_float<T>(to_float(x[i]) + to_float(r[i]));
      src = h;
    }
    const float mean = lane_sum(n, [&](int64_t i) { return to_float(src[i]); }) / float(n);
    const float var = lane_sum(n, [&](int64_t i) {
                        const float d = to_float(src[i]) - mean;
                        return d * d;
                      }) / float(n);
    const float rstd = 1.0f / sqrtf(var + a.eps);
    a.rstd[row] = rstd;
    T* y = static_cast<T*>(a.y) + row * n;
    for (int64_t i = 0; i < n; ++i) y[i] = from_float<T>((to_float(src[i]) - mean) * rstd);
  }
}

template <class T>
OLMO_FAST_CPU_CLONES void layer_norm_bwd_rows(const olmo_fast_layer_norm_bwd_args& a, int64_t row_begin,
                                              int64_t row_end) {
  const int64_t n = a.cols;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const T* dy = static_cast<const T*>(a.dy) + row * a.dy_stride;
    const T* y = static_cast<const T*>(a.y) + row * a.y_stride;
    const float mean_dy = lane_sum(n, [&](int64_t i) { return to_float(dy[i]); }) / float(n);
    const float mean_dy_y = lane_sum(n, [&](int64_t i) { return to_float(dy[i]) * to_float(y[i]); }) / float(n);
    const float rstd = a.rstd[row];
    T* dx = static_cast<T*>(a.dx) + row * n;
    if (a.dh != nullptr) {
      const T* dh = static_cast<const T*>(a.dh) + row * a.dh_stride;
      for (int64_t i = 0; i < n; ++i) {
        dx[i] = from_float<T>(rstd * (to_float(dy[i]) - mean_dy - to_float(y[i]) * mean_dy_y) + to_float(dh[i]));
      }
    } else {
      for (int64_t i = 0; i < n; ++i) {
        dx[i] = from_float<T>(rstd * (to_float(dy[i]) - mean_dy - to_float(y[i]) * mean_dy_y));
      }
    }
  }
}

}  // namespace
}  // namespace cpu
}  // namespace olmo_fast

using namespace olmo_fast;

extern "C" void olmo_fast_layer_norm_fwd_cpu(const olmo_fast_layer_norm_fwd_args* args, int64_t row_begin,
                                             int64_t row_end) {
  cpu::dispatch_dtype(args->dtype, [&](auto tag) { cpu::layer_norm_fwd_rows<decltype(tag)>(*args, row_begin, row_end); });
}

extern "C" void olmo_fast_layer_norm_bwd_cpu(const olmo_fast_layer_norm_bwd_args* args, int64_t row_begin,
                                             int64_t row_end) {
  cpu::dispatch_dtype(args->dtype, [&](auto tag) { cpu::layer_norm_bwd_rows<decltype(tag)>(*args, row_begin, row_end); });
}
