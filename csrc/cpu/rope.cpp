// Rotary position embedding (fp32 angles) on the CPU, forward and inverse; NeoX rotate-half or interleaved pairs.
// Per token: the D/2 cos/sin pairs once (inverse frequencies once per call), then every head rotated with them.
#include <math.h>

#include <vector>

#include "loops.h"

namespace olmo_fast {
namespace cpu {
namespace {

// One head: pair i (dims d = i * step and d + second, elements sd apart) turns by its angle. kNeoxUnit fixes
// the common case (rotate-half, contiguous head) at compile time so that the loop vectorises.
template <class T, bool kNeoxUnit>
OLMO_FAST_CPU_CLONES void rotate_head(const T* x, int64_t sd, int64_t step, int64_t second, T* out,
                                      const float* cos_t, const float* sin_t, int64_t half) {
  if constexpr (kNeoxUnit) {
    sd = 1;
    step = 1;
    second = half;
  }
  OLMO_FAST_IVDEP
  for (int64_t i = 0; i < half; ++i) {
    const int64_t d = i * step;
    const float x1 = to_float(x[d * sd]);
    const float x2 = to_float(x[(d + second) * sd]);
    out[d] = from_float<T>(x1 * cos_t[i] - x2 * sin_t[i]);
    out[d + second] = from_float<T>(x2 * cos_t[i] + x1 * sin_t[i]);
  }
}

template <class T>
OLMO_FAST_CPU_CLONES void rope_tokens(const olmo_fast_rope_args& a, int64_t token_begin,
                                      int64_t token_end) {
  const int64_t half = a.head_dim / 2;
  const int64_t* stride = a.x_strides;
  std::vector<float> table(3 * half);  // inverse frequencies, then cos and sin of the current token
  float* inv_freq = table.data();
  float* cos_t = inv_freq + half;
  float* sin_t = cos_t + half;
  for (int64_t i = 0; i < half; ++i) inv_freq[i] = rope_inv_freq(i, a.head_dim, a.theta);
  const float sign = a.inverse ? -1.0f : 1.0f;
  for (int64_t token = token_begin; token < token_end; ++token) {
    const int64_t b = token / a.seq;
    const int64_t t = token - b * a.seq;
    const int64_t pos = a.positions != nullptr ? a.positions[b * a.positions_batch_stride + t] : a.offset + t;
    for (int64_t i = 0; i < half; ++i) {
      const float angle = float(pos) * inv_freq[i];
      cos_t[i] = cosf(angle);
      sin_t[i] = sign * sinf(angle);
    }
    const T* x = static_cast<const T*>(a.x) + b * stride[0] + t * stride[1];
    T* out = static_cast<T*>(a.out) + token * a.heads * a.head_dim;
    for (int64_t head = 0; head < a.heads; ++head) {
      const T* xh = x + head * stride[2];
      T* oh = out + head * a.head_dim;
      if (!a.interleaved && stride[3] == 1) {
        rotate_head<T, true>(xh, 1, 1, half, oh, cos_t, sin_t, half);
      } else {
        rotate_head<T, false>(xh, stride[3], a.interleaved ? 2 : 1, a.interleaved ? 1 : half, oh, cos_t, sin_t, half);
      }
    }
  }
}

}  // namespace
}  // namespace cpu
}  // namespace olmo_fast

using namespace olmo_fast;

extern "C" void olmo_fast_rope_cpu(const olmo_fast_rope_args* args, int64_t token_begin, int64_t token_end) {
  cpu::dispatch_dtype(args->dtype, [&](auto tag) { cpu::rope_tokens<decltype(tag)>(*args, token_begin, token_end); });
}
