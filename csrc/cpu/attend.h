// The online-softmax core shared by the CPU attention loops (attention.cpp's forward, decode_attention.cpp), and
// the key-block loading and scoring that attention's backward reuses.
// Keys go in blocks of kKeys, converted to fp32 once per block (clamped to +-clip as loaded; clip = +inf: none):
// K transposed ([D][kKeys]) so that a row's scores are D vectorised multiply-adds over the block, V by rows.
#pragma once

#include <math.h>

#include <algorithm>
#include <vector>

#include "loops.h"

namespace olmo_fast {
namespace cpu {

constexpr int64_t kKeys = 64;  // keys per block: a 64 x D fp32 block of K^T and one of V stay in L1/L2

// nk rows (n < nk <= kKeys) of a [T, D] operand whose rows lie `stride` apart, clamped, as fp32: by rows
// ([nk][D]) into `rows` and/or transposed ([D][kKeys]) into `cols` (either may be NULL).
template <class T>
OLMO_FAST_INLINE void load_keys(const T* src, int64_t stride, int64_t nk, int64_t D, Clamp clamp, float* rows,
                                float* cols) {
  for (int64_t n = 0; n < nk; ++n) {
    const T* x = src + n * stride;
    for (int64_t d = 0; d < D; ++d) {
      const float v = clamp(to_float(x[d]));
      if (rows != nullptr) rows[n * D + d] = v;
      if (cols != nullptr) cols[d * kKeys + n] = v;
    }
  }
}

// s[n] = q . key n for a whole block (kKeys lanes, a constant trip count that vectorises; lanes past the block's
// keys hold stale finite values that callers ignore).
OLMO_FAST_INLINE void block_scores(const float* q, const float* cols, int64_t D, float* s) {
  for (int64_t n = 0; n < kKeys; ++n) s[n] = 0.0f;
  for (int64_t d = 0; d < D; ++d) {
    const float qd = q[d];
    const float* kd = cols + d * kKeys;
    OLMO_FAST_IVDEP
    for (int64_t n = 0; n < kKeys; ++n) s[n] += qd * kd[n];
  }
}

// Workspace of `attend_rows` for up to `rows` rows of head dim D (zeroed: stale lanes stay finite).
struct AttendBuffers {
  AttendBuffers(int64_t rows, int64_t D) : data(2 * kKeys * D + kKeys + rows * (D + 2), 0.0f) {
    kt = data.data();
    vb = kt + kKeys * D;
    scores = vb + kKeys * D;
    acc = scores + kKeys;
    m = acc + rows * D;
    l = m + rows;
  }
  std::vector<float> data;
  float *kt, *vb, *scores, *acc, *m, *l;
};

// Rows r < n_rows of q (fp32 [n_rows][D], clamped and pre-scaled) against keys [0, limit[r]) of k, v (rows
// k_stride / v_stride apart; limit[r] <= n_keys): running max w.m[r], sum w.l[r] and unnormalised output
// w.acc[r] (fp32). A row without keys keeps l = 0.
template <class T>
OLMO_FAST_INLINE void attend_rows(const float* q, int64_t n_rows, const int64_t* limit, int64_t n_keys, const T* k,
                                  int64_t k_stride, const T* v, int64_t v_stride, int64_t D, Clamp clamp,
                                  AttendBuffers& w) {
  for (int64_t r = 0; r < n_rows; ++r) {
    w.m[r] = -INFINITY;
    w.l[r] = 0.0f;
  }
  for (int64_t i = 0; i < n_rows * D; ++i) w.acc[i] = 0.0f;
  float* s = w.scores;
  for (int64_t n0 = 0; n0 < n_keys; n0 += kKeys) {
    const int64_t nk = std::min(kKeys, n_keys - n0);
    load_keys(k + n0 * k_stride, k_stride, nk, D, clamp, nullptr, w.kt);
    load_keys(v + n0 * v_stride, v_stride, nk, D, clamp, w.vb, nullptr);
    for (int64_t r = 0; r < n_rows; ++r) {
      const int64_t seen = std::min(nk, limit[r] - n0);  // keys of this block the row sees
      if (seen <= 0) continue;
      block_scores(q + r * D, w.kt, D, s);
      const float m_old = w.m[r];
      const float m_new = std::max(m_old, lane_max(seen, [&](int64_t n) { return s[n]; }));
      const float alpha = exp_f32(m_old - m_new);  // 0 on the row's first block (m_old = -inf)
      OLMO_FAST_IVDEP
      for (int64_t n = 0; n < seen; ++n) s[n] = exp_f32(s[n] - m_new);
      w.l[r] = w.l[r] * alpha + lane_sum(seen, [&](int64_t n) { return s[n]; });
      w.m[r] = m_new;
      float* ar = w.acc + r * D;
      OLMO_FAST_IVDEP
      for (int64_t d = 0; d < D; ++d) ar[d] *= alpha;
      for (int64_t n = 0; n < seen; ++n) {
        const float p = s[n];
        const float* vr = w.vb + n * D;
        OLMO_FAST_IVDEP
        for (int64_t d = 0; d < D; ++d) ar[d] += p * vr[d];
      }
    }
  }
}

}  // namespace cpu
}  // namespace olmo_fast
