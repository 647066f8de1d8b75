// Row normalisation on the CPU (OLMo's non-parametric LayerNorm; LayerNorm with weight/bias; RMSNorm), optionally
// fused with the residual add - before the norm (OLMo 1: add, then norm) or after it (OLMo 2's post-norm, add_after:
// the normalised row rounded to the storage dtype, then the residual added) - forward and backward.
// Forward per row: exact two-pass statistics in fp32 (mean, then the mean squared deviation) over a row that
// stays in cache, then one pass writing y. Backward per row: sum(g * xhat) and sum(g), then one pass writing dx
// and adding the dweight/dbias terms into the caller's accumulator row.
#include <math.h>

#include "loops.h"

namespace olmo_fast {
namespace cpu {
namespace {

template <class T>
OLMO_FAST_CPU_CLONES_256 void norm_fwd_rows(const olmo_fast_norm_fwd_args& a, int64_t row_begin, int64_t row_end) {
  const int64_t n = a.cols;
  const T* w = static_cast<const T*>(a.weight);
  const T* b = static_cast<const T*>(a.bias);
  for (int64_t row = row_begin; row < row_end; ++row) {
    const T* src = static_cast<const T*>(a.x) + row * a.x_stride;
    const T* add = a.add_after ? static_cast<const T*>(a.residual) + row * a.residual_stride : nullptr;
    if (a.residual != nullptr && add == nullptr) {
      const T* x = src;
      const T* r = static_cast<const T*>(a.residual) + row * a.residual_stride;
      T* h = static_cast<T*>(a.h) + row * n;
      OLMO_FAST_IVDEP
      for (int64_t i = 0; i < n; ++i) h[i] = from_float<T>(to_float(x[i]) + to_float(r[i]));
      src = h;
    }
    const float mean = lane_sum(n, [&](int64_t i) { return to_float(src[i]); }) / float(n);
    const float var = lane_sum(n, [&](int64_t i) {
                        const float d = to_float(src[i]) - mean;
                        return d * d;
                      }) / float(n);
    const float center = a.rms ? 0.0f : mean;
    const float rstd = 1.0f / sqrtf(a.rms ? var + mean * mean + a.eps : var + a.eps);  // RMS: mean(h^2)
    a.rstd[row] = rstd;
    if (a.mean != nullptr) a.mean[row] = center;
    T* y = static_cast<T*>(a.y) + row * n;
    const auto affine = [&](int64_t i) {
      const float v = (to_float(src[i]) - center) * rstd;
      return (w ? v * to_float(w[i]) : v) + (b ? to_float(b[i]) : 0.0f);
    };
    if (add != nullptr) {  // norm, then add: the normalised value rounded to T first, as PyTorch's cast does
      OLMO_FAST_IVDEP
      for (int64_t i = 0; i < n; ++i) y[i] = from_float<T>(to_float(add[i]) + to_float(from_float<T>(affine(i))));
    } else if (w == nullptr && b == nullptr) {
      OLMO_FAST_IVDEP
      for (int64_t i = 0; i < n; ++i) y[i] = from_float<T>((to_float(src[i]) - center) * rstd);
    } else {
      OLMO_FAST_IVDEP
      for (int64_t i = 0; i < n; ++i) y[i] = from_float<T>(affine(i));
    }
  }
}

// kFromInput: xhat recomputed from the saved input (LayerNorm with weight/bias, RMSNorm), not the saved output itself
// (OLMo's non-parametric LayerNorm; a compile-time choice: the subtract and multiply on every element of both passes
// were measured at 20% of the backward at 67x129 fp32).
template <class T, bool kFromInput>
OLMO_FAST_CPU_CLONES_256 void norm_bwd_rows(const olmo_fast_norm_bwd_args& a, int64_t row_begin, int64_t row_end,
                                            int64_t partial) {
  const int64_t n = a.cols;
  const float inv_n = 1.0f / float(n);  // a multiply, not a divide, between a row's two passes
  const T* w = static_cast<const T*>(a.weight);
  float* dw = a.dweight != nullptr ? a.dweight + partial * n : nullptr;
  float* db = a.dbias != nullptr ? a.dbias + partial * n : nullptr;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const T* dy = static_cast<const T*>(a.dy) + row * a.dy_stride;
    const T* s = static_cast<const T*>(a.saved) + row * a.saved_stride;
    const float rstd = a.rstd[row];
    const float shift = kFromInput && a.mean != nullptr ? a.mean[row] : 0.0f;  // RMSNorm: none
    const auto xhat = [&](int64_t i) { return kFromInput ? (to_float(s[i]) - shift) * rstd : to_float(s[i]); };
    const auto g = [&](int64_t i) { return w ? to_float(dy[i]) * to_float(w[i]) : to_float(dy[i]); };
    float sum_g_xhat, sum_g;
    lane_sums(n, [&](int64_t i) { return g(i) * xhat(i); }, g, sum_g_xhat, sum_g);
    // dx = rstd * (g - xhat * mean(g xhat) - mean(g)) = rstd * g - (xhat * xhat_coef + offset)
    const float xhat_coef = rstd * (sum_g_xhat * inv_n);
    const float offset = a.rms ? 0.0f : rstd * (sum_g * inv_n);
    T* dx = static_cast<T*>(a.dx) + row * n;
    const T* dh = a.dh != nullptr ? static_cast<const T*>(a.dh) + row * a.dh_stride : nullptr;
    if (dh != nullptr) {
      OLMO_FAST_IVDEP
      for (int64_t i = 0; i < n; ++i) {
        dx[i] = from_float<T>(rstd * g(i) - (xhat(i) * xhat_coef + offset) + to_float(dh[i]));
      }
    } else {
      OLMO_FAST_IVDEP
      for (int64_t i = 0; i < n; ++i) dx[i] = from_float<T>(rstd * g(i) - (xhat(i) * xhat_coef + offset));
    }
    if (dw != nullptr) {
      OLMO_FAST_IVDEP
      for (int64_t i = 0; i < n; ++i) dw[i] += to_float(dy[i]) * xhat(i);
    }
    if (db != nullptr) {
      OLMO_FAST_IVDEP
      for (int64_t i = 0; i < n; ++i) db[i] += to_float(dy[i]);
    }
  }
}

}  // namespace
}  // namespace cpu
}  // namespace olmo_fast

using namespace olmo_fast;

extern "C" void olmo_fast_norm_fwd_cpu(const olmo_fast_norm_fwd_args* args, int64_t row_begin, int64_t row_end) {
  cpu::dispatch_dtype(args->dtype, [&](auto tag) { cpu::norm_fwd_rows<decltype(tag)>(*args, row_begin, row_end); });
}

extern "C" void olmo_fast_norm_bwd_cpu(const olmo_fast_norm_bwd_args* args, int64_t row_begin, int64_t row_end,
                                       int64_t partial) {
  cpu::dispatch_dtype(args->dtype, [&](auto tag) {
    if (args->from_input) cpu::norm_bwd_rows<decltype(tag), true>(*args, row_begin, row_end, partial);
    else cpu::norm_bwd_rows<decltype(tag), false>(*args, row_begin, row_end, partial);
  });
}
