// OLMo 2's attention prologue on the CPU, forward and backward, one pass per token (a "row"): split Q | K | V,
// RMSNorm over all of q (q_heads * D values) and all of k, each times its fp32 weight, then RoPE (NeoX) with the
// call's inverse frequencies and attention factor (rotary.h); v copied.
//   forward:  xhat = x * rstd, rstd = 1/sqrt(mean(x^2) + eps);  y = xhat * w;  out = R(pos) y   (fp32 between)
//   backward: g = R(pos)^T dout;  dx = rstd * (g w - xhat * mean(g w xhat));  dw += g xhat  (per-token fp32 terms
//             added into one accumulator row per thread chunk, summed by the caller);  dv copied
// The normalised row lives in an fp32 scratch of the token's widest part, so x is read once per pass.
// Bytes per element (E = element size): forward reads E, writes E (+ 8 B of rstd per token); backward reads 2E
// (gradient and the forward's input), writes E, plus the fp32 weight-gradient rows.
#include <math.h>

#include <algorithm>
#include <vector>

#include "rotary.h"

namespace olmo_fast {
namespace cpu {
namespace {

// rstd of one part's n values.
template <class T>
OLMO_FAST_INLINE float part_rstd(const T* x, int64_t n, float eps) {
  const float sum_sq = lane_sum(n, [&](int64_t i) {
    const float v = to_float(x[i]);
    return v * v;
  });
  return 1.0f / sqrtf(sum_sq / float(n) + eps);
}

template <class T>
OLMO_FAST_CPU_CLONES_256 void qk_norm_rope_fwd_tokens(const olmo_fast_qk_norm_rope_fwd_args& a, int64_t token_begin,
                                                      int64_t token_end) {
  const int64_t D = a.head_dim, half = D / 2;
  const int64_t heads[2] = {a.q_heads, a.kv_heads};
  const float* weights[2] = {a.q_weight, a.k_weight};
  T* outs[2] = {static_cast<T*>(a.q), static_cast<T*>(a.k)};
  RopeAngles angles(D, a.inv_freq, a.attention_factor, false);
  std::vector<float> normed(std::max(a.q_heads, a.kv_heads) * D);
  for (int64_t token = token_begin; token < token_end; ++token) {
    const int64_t b = token / a.seq;
    const int64_t t = token - b * a.seq;
    angles.set_position(token_position(a.positions, a.positions_batch_stride, a.offset, b, t));
    const T* src = static_cast<const T*>(a.qkv) + b * a.qkv_strides[0] + t * a.qkv_strides[1];
    for (int part = 0; part < 2; ++part) {
      const int64_t n = heads[part] * D;
      const float rstd = part_rstd(src, n, a.eps);
      a.rstd[token * 2 + part] = rstd;
      const float* w = weights[part];
      OLMO_FAST_IVDEP
      for (int64_t i = 0; i < n; ++i) normed[i] = to_float(src[i]) * rstd * w[i];
      T* out = outs[part] + token * n;
      for (int64_t h = 0; h < heads[part]; ++h) {
        rotate_head<float, true, Identity, T>(normed.data() + h * D, 1, 1, half, out + h * D, angles.cos(),
                                              angles.sin(), half);
      }
      src += n;
    }
    T* v = static_cast<T*>(a.v) + token * a.kv_heads * D;
    const int64_t n = a.kv_heads * D;
    OLMO_FAST_IVDEP
    for (int64_t i = 0; i < n; ++i) v[i] = src[i];
  }
}

template <class T>
OLMO_FAST_CPU_CLONES_256 void qk_norm_rope_bwd_tokens(const olmo_fast_qk_norm_rope_bwd_args& a, int64_t token_begin,
                                                      int64_t token_end, int64_t partial) {
  const int64_t D = a.head_dim, half = D / 2;
  const int64_t heads[2] = {a.q_heads, a.kv_heads};
  const float* weights[2] = {a.q_weight, a.k_weight};
  float* dweights[2] = {a.dq_weight + partial * a.q_heads * D, a.dk_weight + partial * a.kv_heads * D};
  const int64_t width = (a.q_heads + 2 * a.kv_heads) * D;
  RopeAngles angles(D, a.inv_freq, a.attention_factor, true);
  std::vector<float> g(std::max(a.q_heads, a.kv_heads) * D);  // the gradient of the normed (unrotated) part
  for (int64_t token = token_begin; token < token_end; ++token) {
    const int64_t b = token / a.seq;
    const int64_t t = token - b * a.seq;
    angles.set_position(token_position(a.positions, a.positions_batch_stride, a.offset, b, t));
    const T* x = static_cast<const T*>(a.qkv) + b * a.qkv_strides[0] + t * a.qkv_strides[1];
    T* dst = static_cast<T*>(a.dqkv) + token * width;
    for (int part = 0; part < 2; ++part) {
      const int64_t n = heads[part] * D;
      const int64_t* s = a.grad_strides[part];
      const T* grad = static_cast<const T*>(a.grads[part]) + b * s[0] + t * s[1];
      for (int64_t h = 0; h < heads[part]; ++h) {
        rotate_neox_head<T, Identity, float>(grad + h * s[2], s[3], g.data() + h * D, angles.cos(), angles.sin(),
                                             half);
      }
      const float rstd = a.rstd[token * 2 + part];
      const float* w = weights[part];
      const float mean_gw_xhat =
          lane_sum(n, [&](int64_t i) { return g[i] * w[i] * to_float(x[i]) * rstd; }) / float(n);
      float* dw = dweights[part];
      OLMO_FAST_IVDEP
      for (int64_t i = 0; i < n; ++i) {
        const float xhat = to_float(x[i]) * rstd;
        dst[i] = from_float<T>(rstd * (g[i] * w[i] - xhat * mean_gw_xhat));
        dw[i] += g[i] * xhat;
      }
      x += n;
      dst += n;
    }
    const int64_t* s = a.grad_strides[2];
    const T* dv = static_cast<const T*>(a.grads[2]) + b * s[0] + t * s[1];
    for (int64_t h = 0; h < a.kv_heads; ++h, dst += D) {
      for (int64_t d = 0; d < D; ++d) dst[d] = dv[h * s[2] + d * s[3]];
    }
  }
}

}  // namespace
}  // namespace cpu
}  // namespace olmo_fast

using namespace olmo_fast;

extern "C" void olmo_fast_qk_norm_rope_fwd_cpu(const olmo_fast_qk_norm_rope_fwd_args* args, int64_t token_begin,
                                               int64_t token_end) {
  cpu::dispatch_dtype(args->dtype,
                      [&](auto tag) { cpu::qk_norm_rope_fwd_tokens<decltype(tag)>(*args, token_begin, token_end); });
}

extern "C" void olmo_fast_qk_norm_rope_bwd_cpu(const olmo_fast_qk_norm_rope_bwd_args* args, int64_t token_begin,
                                               int64_t token_end, int64_t partial) {
  cpu::dispatch_dtype(args->dtype, [&](auto tag) {
    cpu::qk_norm_rope_bwd_tokens<decltype(tag)>(*args, token_begin, token_end, partial);
  });
}
