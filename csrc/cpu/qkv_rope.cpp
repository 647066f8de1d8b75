// The attention prologue on the CPU, forward and backward: clamp -> split Q | K | V -> RoPE (NeoX) in one pass over
// each token (a "row"), the token's cos/sin computed once for all its q and k heads (rotary.h, as the rope op).
// Forward: q, k heads clamped as loaded and rotated; v clamped (exact in the storage dtype).
// Backward: dq, dk rotated back (any strides), dv copied, into the token's dqkv row; with a clip, one more pass
// over that row (in cache) zeroes it where the forward's input lay outside [-clip, clip] or was NaN.
// Bytes per element (E = element size): forward reads E, writes E; backward reads 2E with clip (E without),
// writes E.
#include "rotary.h"

namespace olmo_fast {
namespace cpu {
namespace {

template <class T, class Pre>
OLMO_FAST_CPU_CLONES_256 void qkv_rope_fwd_tokens(const olmo_fast_qkv_rope_fwd_args& a, Pre pre, int64_t token_begin,
                                                  int64_t token_end) {
  const int64_t D = a.head_dim, half = D / 2;
  RopeAngles angles(D, a.theta, false);
  for (int64_t token = token_begin; token < token_end; ++token) {
    const int64_t b = token / a.seq;
    const int64_t t = token - b * a.seq;
    angles.set_position(token_position(a.positions, a.positions_batch_stride, a.offset, b, t));
    const T* src = static_cast<const T*>(a.qkv) + b * a.qkv_strides[0] + t * a.qkv_strides[1];
    T* q = static_cast<T*>(a.q) + token * a.q_heads * D;
    for (int64_t h = 0; h < a.q_heads; ++h) {
      rotate_head<T, true>(src + h * D, 1, 1, half, q + h * D, angles.cos(), angles.sin(), half, pre);
    }
    src += a.q_heads * D;
    T* k = static_cast<T*>(a.k) + token * a.kv_heads * D;
    for (int64_t h = 0; h < a.kv_heads; ++h) {
      rotate_head<T, true>(src + h * D, 1, 1, half, k + h * D, angles.cos(), angles.sin(), half, pre);
    }
    src += a.kv_heads * D;
    T* v = static_cast<T*>(a.v) + token * a.kv_heads * D;
    const int64_t n = a.kv_heads * D;
    OLMO_FAST_IVDEP
    for (int64_t i = 0; i < n; ++i) v[i] = from_float<T>(pre(to_float(src[i])));
  }
}

template <class T>
OLMO_FAST_CPU_CLONES_256 void qkv_rope_bwd_tokens(const olmo_fast_qkv_rope_bwd_args& a, int64_t token_begin,
                                                  int64_t token_end) {
  const int64_t D = a.head_dim, half = D / 2;
  const int64_t heads[3] = {a.q_heads, a.kv_heads, a.kv_heads};
  const int64_t width = (a.q_heads + 2 * a.kv_heads) * D;
  RopeAngles angles(D, a.theta, true);
  for (int64_t token = token_begin; token < token_end; ++token) {
    const int64_t b = token / a.seq;
    const int64_t t = token - b * a.seq;
    angles.set_position(token_position(a.positions, a.positions_batch_stride, a.offset, b, t));
    T* dst = static_cast<T*>(a.dqkv) + token * width;
    for (int part = 0; part < 3; ++part) {
      const int64_t* s = a.grad_strides[part];
      const T* g = static_cast<const T*>(a.grads[part]) + b * s[0] + t * s[1];
      for (int64_t h = 0; h < heads[part]; ++h, dst += D) {
        const T* gh = g + h * s[2];
        if (part < 2) {
          rotate_neox_head(gh, s[3], dst, angles.cos(), angles.sin(), half);
        } else if (s[3] == 1) {
          OLMO_FAST_IVDEP
          for (int64_t d = 0; d < D; ++d) dst[d] = gh[d];
        } else {
          for (int64_t d = 0; d < D; ++d) dst[d] = gh[d * s[3]];
        }
      }
    }
    if (a.has_clip) {
      dst -= width;
      const T* x = static_cast<const T*>(a.qkv) + b * a.qkv_strides[0] + t * a.qkv_strides[1];
      const float c = a.clip;
      OLMO_FAST_IVDEP
      for (int64_t i = 0; i < width; ++i) {
          dst[i] = clamp_passes(to_float(x[i]), c) ? dst[i] : from_float<T>(0.0f);
      }
    }
  }
}

}  // namespace
}  // namespace cpu
}  // namespace olmo_fast

using namespace olmo_fast;

extern "C" void olmo_fast_qkv_rope_fwd_cpu(const olmo_fast_qkv_rope_fwd_args* args, int64_t token_begin,
                                           int64_t token_end) {
  cpu::dispatch_dtype(args->dtype, [&](auto tag) {
    using T = decltype(tag);
    if (args->has_clip) {
      cpu::qkv_rope_fwd_tokens<T>(*args, cpu::Clamp{args->clip}, token_begin, token_end);
    } else {
      cpu::qkv_rope_fwd_tokens<T>(*args, cpu::Identity{}, token_begin, token_end);
    }
  });
}

extern "C" void olmo_fast_qkv_rope_bwd_cpu(const olmo_fast_qkv_rope_bwd_args* args, int64_t token_begin,
                                           int64_t token_end) {
  cpu::dispatch_dtype(args->dtype,
                      [&](auto tag) { cpu::qkv_rope_bwd_tokens<decltype(tag)>(*args, token_begin, token_end); });
}
