// Rotary position embedding (fp32 angles) on the CPU, forward and inverse; NeoX rotate-half or interleaved pairs.
// Per token: the D/2 cos/sin pairs once (inverse frequencies once per call), then every head rotated with them.
#include "rotary.h"

namespace olmo_fast {
namespace cpu {
namespace {

template <class T>
OLMO_FAST_CPU_CLONES void rope_tokens(const olmo_fast_rope_args& a, int64_t token_begin,
                                      int64_t token_end) {
  const int64_t half = a.head_dim / 2;
  const int64_t* stride = a.x_strides;
  RopeAngles angles(a.head_dim, a.theta, a.inverse != 0);
  for (int64_t token = token_begin; token < token_end; ++token) {
    const int64_t b = token / a.seq;
    const int64_t t = token - b * a.seq;
    angles.set_position(token_position(a.positions, a.positions_batch_stride, a.offset, b, t));
    const T* x = static_cast<const T*>(a.x) + b * stride[0] + t * stride[1];
    T* out = static_cast<T*>(a.out) + token * a.heads * a.head_dim;
    for (int64_t head = 0; head < a.heads; ++head) {
      const T* xh = x + head * stride[2];
      T* oh = out + head * a.head_dim;
      if (!a.interleaved) {
        rotate_neox_head(xh, stride[3], oh, angles.cos(), angles.sin(), half);
      } else {
        rotate_head<T, false>(xh, stride[3], 2, 1, oh, angles.cos(), angles.sin(), half);
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
