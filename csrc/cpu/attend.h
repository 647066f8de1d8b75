// The online-softmax core shared by the CPU attention loops (attention.cpp's forward, decode_attention.cpp), and
// the key-block loading and scoring that attention's backward reuses.
// Keys go in blocks of kKeys, converted to fp32 once per block (clamped to +-clip as loaded; clip = +inf: none):
// K transposed ([D][kKeys]) so that a row's scores are D vectorised multiply-adds over the block, V by rows.
#pragma once

#include <math.h>
#include <string.h>

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

// 16 fp32 lanes (GCC/Clang vector extension: one AVX-512 register, two AVX2 or four SSE ones); loads and stores
// through memcpy (no alignment assumed).
typedef float f32x16 __attribute__((vector_size(64)));

OLMO_FAST_INLINE f32x16 load16(const float* p) {
  f32x16 v;
  memcpy(&v, p, sizeof v);
  return v;
}

OLMO_FAST_INLINE void store16(float* p, f32x16 v) { memcpy(p, &v, sizeof v); }

// s[n] = q . key n for a whole block (kKeys = 64 lanes: 4 vectors, with even and odd head dims in separate
// accumulators: 8 independent multiply-add chains). Lanes past the block's keys hold stale finite values that
// callers ignore.
OLMO_FAST_INLINE void block_scores(const float* q, const float* cols, int64_t D, float* s) {
  static_assert(kKeys == 64, "block_scores holds a key block in 4 x 16 lanes");
  f32x16 a[8] = {};
  int64_t d = 0;
  for (; d + 2 <= D; d += 2) {
    const float* k0 = cols + d * kKeys;
    const float* k1 = k0 + kKeys;
    for (int j = 0; j < 4; ++j) {
      a[j] += q[d] * load16(k0 + 16 * j);
      a[4 + j] += q[d + 1] * load16(k1 + 16 * j);
    }
  }
  if (d < D) {
    for (int j = 0; j < 4; ++j) a[j] += q[d] * load16(cols + d * kKeys + 16 * j);
  }
  for (int j = 0; j < 4; ++j) store16(s + 16 * j, a[j] + a[4 + j]);
}

// out[d] += sum_{i < count} w[i] * rows[i * stride + d] for d < D: the output held in registers across the sum
// (64 lanes at a time, even and odd i in separate accumulators), each row loaded once per 64 lanes.
OLMO_FAST_INLINE void add_weighted_rows(float* out, const float* w, int64_t count, const float* rows, int64_t stride,
                                        int64_t D) {
  int64_t d0 = 0;
  for (; d0 + 64 <= D; d0 += 64) {
    f32x16 a[8] = {};
    int64_t i = 0;
    for (; i + 2 <= count; i += 2) {
      const float* r0 = rows + i * stride + d0;
      const float* r1 = r0 + stride;
      for (int j = 0; j < 4; ++j) {
        a[j] += w[i] * load16(r0 + 16 * j);
        a[4 + j] += w[i + 1] * load16(r1 + 16 * j);
      }
    }
    if (i < count) {
      for (int j = 0; j < 4; ++j) a[j] += w[i] * load16(rows + i * stride + d0 + 16 * j);
    }
    for (int j = 0; j < 4; ++j) store16(out + d0 + 16 * j, load16(out + d0 + 16 * j) + a[j] + a[4 + j]);
  }
  for (; d0 + 16 <= D; d0 += 16) {
    f32x16 a0 = {}, a1 = {};
    int64_t i = 0;
    for (; i + 2 <= count; i += 2) {
      a0 += w[i] * load16(rows + i * stride + d0);
      a1 += w[i + 1] * load16(rows + (i + 1) * stride + d0);
    }
    if (i < count) a0 += w[i] * load16(rows + i * stride + d0);
    store16(out + d0, load16(out + d0) + a0 + a1);
  }
  for (; d0 < D; ++d0) {
    float acc = 0.0f;
    for (int64_t i = 0; i < count; ++i) acc += w[i] * rows[i * stride + d0];
    out[d0] += acc;
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
      add_weighted_rows(ar, s, seen, w.vb, D, D);
    }
  }
}

}  // namespace cpu
}  // namespace olmo_fast
