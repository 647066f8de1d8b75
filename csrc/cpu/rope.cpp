// Rotary position embedding (NeoX rotate-half, fp32 angles) on the CPU, forward and inverse.
// Per token: the D/2 cos/sin pairs once (inverse frequencies once per call), then every head rotated with them.
#include <math.h>

#include <vector>

#include "loops.h"

namespace olmo_fast {
namespace cpu {
namespace {

// One head: out = x * cos + rotate_half(x) * sin. kUnitStride lets the compiler vectorise the common layout.
template <class T, bool kUnitStride>
void rotate_head(const T* x, int64_t step, T* out, const float* cos_t, const float* sin_t, int64_t half) {
  const int64_t sd = kUnitStride ? 1 : step;
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = to_float(x[i * sd]);
    const float x2 = to_float(x[(half + i) * sd]);
    out[i] = from_float<T>(x1 * cos_t[i] - x2 * sin_t[i]);
    out[half + i] = from_float<T>(x2 * cos_t[i] + x1 * sin_t[i]);
  }
}

template <class T>
void rope_tokens(const olmo_fast_rope_args& a, int64_t token_begin, int64_t token_end) {
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
      if (stride[3] == 1) {
        rotate_head<T, true>(xh, 1, oh, cos_t, sin_t, half);
      } else {
        rotate_head<T, false>(xh, stride[3], oh, cos_t, sin_t, half);
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
