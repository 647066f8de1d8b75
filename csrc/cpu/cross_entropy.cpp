// The cross-entropy chunk of the fused linear cross-entropy on the CPU (olmo_fast/ops/cross_entropy.py runs the
// matmuls around it): per row of logits z with label y,
//   loss = lse + z_loss * lse^2 - z[y], lse = logsumexp(z)   (0 for ignore_index; lse is written too),
//   and with compute_grad   z <- softmax(z) * (1 + 2 z_loss lse) - onehot(y)   (z_loss = 0: exactly the plain CE).
// Per row, fp32 math: a max pass, a sum-of-exp pass (exp_f32 vectorises), then the gradient pass writing the row
// in place. A row of a large vocabulary (50K fp32: 200 KB) stays in L2 across the passes. Bytes: the logits read
// once from memory and written once (read only, without the gradient), plus the labels and fp32 losses and lse.
#include <math.h>

#include "loops.h"

namespace olmo_fast {
namespace cpu {
namespace {

template <class T>
OLMO_FAST_CPU_CLONES void cross_entropy_rows(const olmo_fast_cross_entropy_chunk_args& a, int64_t row_begin,
                                             int64_t row_end) {
  const int64_t n = a.vocab;
  for (int64_t row = row_begin; row < row_end; ++row) {
    T* z = static_cast<T*>(a.logits) + row * a.logits_stride;
    const int64_t label = a.labels[row];
    if (label == a.ignore_index) {
      a.loss[row] = 0.0f;
      a.lse[row] = 0.0f;
      if (a.compute_grad) {
        OLMO_FAST_IVDEP
        for (int64_t i = 0; i < n; ++i) z[i] = from_float<T>(0.0f);
      }
      continue;
    }
    const bool valid = label >= 0 && label < n;
    const float top = lane_max(n, [&](int64_t i) { return to_float(z[i]); });
    const float lse = top + logf(lane_sum(n, [&](int64_t i) { return exp_f32(to_float(z[i]) - top); }));
    const float z_label = valid ? to_float(z[label]) : 0.0f;
    a.loss[row] = valid ? lse - z_label + a.z_loss * lse * lse : NAN;
    a.lse[row] = lse;
    if (!a.compute_grad) continue;
    const float p_scale = 1.0f + 2.0f * a.z_loss * lse;  // d(lse + z_loss lse^2)/dz = softmax(z) (1 + 2 z_loss lse)
    OLMO_FAST_IVDEP
    for (int64_t i = 0; i < n; ++i) z[i] = from_float<T>(exp_f32(to_float(z[i]) - lse) * p_scale);
    if (valid) z[label] = from_float<T>(exp_f32(z_label - lse) * p_scale - 1.0f);
  }
}

}  // namespace
}  // namespace cpu
}  // namespace olmo_fast

using namespace olmo_fast;

extern "C" void olmo_fast_cross_entropy_chunk_cpu(const olmo_fast_cross_entropy_chunk_args* args, int64_t row_begin,
                                                  int64_t row_end) {
  cpu::dispatch_dtype(args->dtype,
                      [&](auto tag) { cpu::cross_entropy_rows<decltype(tag)>(*args, row_begin, row_end); });
}
