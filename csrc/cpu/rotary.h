// RoPE pieces shared by the CPU loops that rotate (rope.cpp, qkv_rope.cpp, qk_norm_rope.cpp): one code path for the
// angles and the rotation, so that the fused prologue and the separate rope op agree bitwise.
#pragma once

#include <math.h>

#include <vector>

#include "loops.h"

namespace olmo_fast {
namespace cpu {

// The D/2 inverse frequencies of a call, and the cos/sin of the current token's angles (sign -1: the inverse
// rotation, the backward), both times `factor` (yarn's attention factor; 1 otherwise).
class RopeAngles {
 public:
  RopeAngles(int64_t head_dim, float theta, bool inverse)
      : half_(head_dim / 2), sign_(inverse ? -1.0f : 1.0f), factor_(1.0f), table_(3 * half_) {
    for (int64_t i = 0; i < half_; ++i) table_[i] = rope_inv_freq(i, head_dim, theta);
  }
  RopeAngles(int64_t head_dim, const float* inv_freq, float factor, bool inverse)
      : half_(head_dim / 2), sign_(inverse ? -1.0f : 1.0f), factor_(factor), table_(3 * half_) {
    for (int64_t i = 0; i < half_; ++i) table_[i] = inv_freq[i];
  }
  void set_position(int64_t pos) {
    float* c = table_.data() + half_;
    float* s = c + half_;
    for (int64_t i = 0; i < half_; ++i) {
      const float angle = float(pos) * table_[i];
      c[i] = factor_ * cosf(angle);
      s[i] = factor_ * sign_ * sinf(angle);
    }
  }
  const float* cos() const { return table_.data() + half_; }
  const float* sin() const { return table_.data() + 2 * half_; }

 private:
  int64_t half_;
  float sign_, factor_;
  std::vector<float> table_;  // inverse frequencies, then cos and sin of the current token
};

// Token (b, t)'s position: positions[b * positions_batch_stride + t], or offset + t without a table.
inline int64_t token_position(const int64_t* positions, int64_t positions_batch_stride, int64_t offset, int64_t b,
                              int64_t t) {
  return positions != nullptr ? positions[b * positions_batch_stride + t] : offset + t;
}

// No transformation of the loaded values (rope); qkv_rope passes its clamp.
struct Identity {
  float operator()(float x) const { return x; }
};

// One head: pair i (dims d = i * step and d + second, elements sd apart) turns by its angle; `pre` acts on each
// loaded value first. kNeoxUnit fixes the common case (rotate-half, contiguous head) at compile time so that the
// loop vectorises. The output may have another type (fp32 rows of the QK-norm prologue).
template <class T, bool kNeoxUnit, class Pre = Identity, class TOut = T>
OLMO_FAST_INLINE void rotate_head(const T* x, int64_t sd, int64_t step, int64_t second, TOut* out, const float* cos_t,
                                  const float* sin_t, int64_t half, Pre pre = Pre{}) {
  if constexpr (kNeoxUnit) {
    sd = 1;
    step = 1;
    second = half;
  }
  OLMO_FAST_IVDEP
  for (int64_t i = 0; i < half; ++i) {
    const int64_t d = i * step;
    const float x1 = pre(to_float(x[d * sd]));
    const float x2 = pre(to_float(x[(d + second) * sd]));
    out[d] = from_float<TOut>(x1 * cos_t[i] - x2 * sin_t[i]);
    out[d + second] = from_float<TOut>(x2 * cos_t[i] + x1 * sin_t[i]);
  }
}

// A NeoX head (rotate-half) at x with element stride sd: the vectorised loop when contiguous.
template <class T, class Pre = Identity, class TOut = T>
OLMO_FAST_INLINE void rotate_neox_head(const T* x, int64_t sd, TOut* out, const float* cos_t, const float* sin_t,
                                       int64_t half, Pre pre = Pre{}) {
  if (sd == 1) {
    rotate_head<T, true, Pre, TOut>(x, 1, 1, half, out, cos_t, sin_t, half, pre);
  } else {
    rotate_head<T, false, Pre, TOut>(x, sd, 1, half, out, cos_t, sin_t, half, pre);
  }
}

}  // namespace cpu
}  // namespace olmo_fast
