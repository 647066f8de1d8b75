// The online-softmax core shared by the CPU attention loops (attention.cpp's forward, decode_attention.cpp), and
// the key-block loading and products that attention's backward reuses.
// Keys go in blocks of kKeys, converted to fp32 once per block (clamped to +-clip as loaded; clip = +inf: none):
// K transposed ([D][kKeys]) so that a row's scores are D vectorised multiply-adds over the block, V by rows; a
// caller gives attend_rows its blocks, converted per use (KeyBlock) or kept for the tasks that reuse them
// (KeyCache). Per-row softmax steps run over whole 16-lane vectors, the lanes a row does not see masked.
// Products keep their outputs in vector registers along the sum (block_scores, add_weighted_rows), a few rows at
// a time so that each loaded vector feeds several multiply-add chains.
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

// 16 fp32 lanes (GCC/Clang vector extension: one AVX-512 register, two AVX2 or four SSE ones), unaligned and
// allowed to alias floats. Memory is reached through references (`lanes`), never by passing a vector by value,
// whose ABI would depend on AVX-512 (GCC's -Wpsabi).
typedef float f32x16 __attribute__((vector_size(64), aligned(4), may_alias));

OLMO_FAST_INLINE f32x16& lanes(float* p) { return *reinterpret_cast<f32x16*>(p); }
OLMO_FAST_INLINE const f32x16& lanes(const float* p) { return *reinterpret_cast<const f32x16*>(p); }

// s[r][n] = q[r] . key n for R rows and a whole block (kKeys = 64 lanes: 4 vectors per row; each key vector
// loaded once for the R rows, 4 R independent multiply-add chains). Lanes past the block's keys hold stale finite
// values that callers ignore.
template <int R>
OLMO_FAST_INLINE void block_scores(const float* const* q, const float* cols, int64_t D, float* const* s) {
  static_assert(kKeys == 64, "block_scores holds a key block in 4 x 16 lanes");
  f32x16 a[R][4] = {};
  for (int64_t d = 0; d < D; ++d) {
    for (int j = 0; j < 4; ++j) {
      const f32x16 k = lanes(cols + d * kKeys + 16 * j);
      for (int r = 0; r < R; ++r) a[r][j] += q[r][d] * k;
    }
  }
  for (int r = 0; r < R; ++r) {
    for (int j = 0; j < 4; ++j) lanes(s[r] + 16 * j) = a[r][j];
  }
}

// out[r][d] += sum_{i < count} w[r][i] * rows[i * stride + d] for R outputs and d < D: the outputs held in
// registers across the sum (64 lanes at a time), each row loaded once for the R outputs.
template <int R>
OLMO_FAST_INLINE void add_weighted_rows(float* const* out, const float* const* w, int64_t count, const float* rows,
                                        int64_t stride, int64_t D) {
  int64_t d0 = 0;
  for (; d0 + 64 <= D; d0 += 64) {
    f32x16 a[R][4] = {};
    for (int64_t i = 0; i < count; ++i) {
      for (int j = 0; j < 4; ++j) {
        const f32x16 x = lanes(rows + i * stride + d0 + 16 * j);
        for (int r = 0; r < R; ++r) a[r][j] += w[r][i] * x;
      }
    }
    for (int r = 0; r < R; ++r) {
      for (int j = 0; j < 4; ++j) lanes(out[r] + d0 + 16 * j) += a[r][j];
    }
  }
  for (; d0 + 16 <= D; d0 += 16) {
    f32x16 a[R] = {};
    for (int64_t i = 0; i < count; ++i) {
      const f32x16 x = lanes(rows + i * stride + d0);
      for (int r = 0; r < R; ++r) a[r] += w[r][i] * x;
    }
    for (int r = 0; r < R; ++r) lanes(out[r] + d0) += a[r];
  }
  for (; d0 < D; ++d0) {
    for (int r = 0; r < R; ++r) {
      float acc = 0.0f;
      for (int64_t i = 0; i < count; ++i) acc += w[r][i] * rows[i * stride + d0];
      out[r][d0] += acc;
    }
  }
}

// Rows (or keys) that the products take at a time: 4 where the CPU has AVX-512, whose 32 vector registers hold
// the 16 accumulators of block_scores<4> / add_weighted_rows<4> (and its clone runs), else 2 (AVX2's 16 would
// spill).
inline int64_t row_group() {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const int64_t group = __builtin_cpu_supports("avx512f") ? 4 : 2;
  return group;
#else
  return 2;
#endif
}

// Workspace of `attend_rows` for up to `rows` rows of head dim D, and a K^T / V block for callers that load key
// blocks one at a time (`KeyBlock`) (zeroed: stale lanes stay finite).
struct AttendBuffers {
  AttendBuffers(int64_t rows, int64_t D) : data(2 * kKeys * D + 4 * kKeys + rows * (D + 2), 0.0f) {
    kt = data.data();
    vb = kt + kKeys * D;
    scores = vb + kKeys * D;
    acc = scores + 4 * kKeys;
    m = acc + rows * D;
    l = m + rows;
  }
  std::vector<float> data;
  float *kt, *vb, *scores, *acc, *m, *l;  // scores: four rows of kKeys
};

// A key block as attend_rows reads it: K^T ([D][kKeys], fp32, clamped) and V by rows ([nk][D]).
struct KeyBlockView {
  const float* kt;
  const float* vb;
};

// The blocks of keys [n0, n0 + nk) of k, v (rows k_stride / v_stride apart), each converted when asked for into
// the one block of `w` (a caller whose rows see each key block once).
template <class T>
struct KeyBlock {
  const T* k;
  int64_t k_stride;
  const T* v;
  int64_t v_stride;
  int64_t D;
  Clamp clamp;
  AttendBuffers& w;
  OLMO_FAST_INLINE KeyBlockView operator()(int64_t n0, int64_t nk) const {
    load_keys(k + n0 * k_stride, k_stride, nk, D, clamp, nullptr, w.kt);
    load_keys(v + n0 * v_stride, v_stride, nk, D, clamp, w.vb, nullptr);
    return {w.kt, w.vb};
  }
};

// Every key block of one (b, kv head), converted once on first use and kept: for a thread whose tasks visit the
// same keys again (the forward's query blocks and the query heads of a GQA group, consecutive tasks), so that the
// conversion (a transpose, clamped) is not repeated per query block. Memory: 2 x ceil(Tk / kKeys) x kKeys x D
// floats, reused across owners (stale lanes of a last, partial block stay finite: they hold older keys or 0).
struct KeyCache {
  std::vector<float> kt, vb;
  std::vector<char> ready;
  int64_t owner = -1, keys = 0;

  // Start caching the `n_keys` keys of `new_owner` (an id of (b, kv head)) unless they are the ones held.
  void own(int64_t new_owner, int64_t n_keys, int64_t D) {
    if (new_owner == owner) return;
    owner = new_owner;
    keys = n_keys;
    const int64_t blocks = (n_keys + kKeys - 1) / kKeys;
    if (int64_t(kt.size()) < blocks * kKeys * D) {
      kt.resize(blocks * kKeys * D, 0.0f);
      vb.resize(blocks * kKeys * D, 0.0f);
    }
    ready.assign(blocks, 0);
  }

  // The block of keys from n0 (a multiple of kKeys), converted whole (every key of it, whatever part of it the
  // caller's rows see: a later task may see more of it).
  template <class T>
  OLMO_FAST_INLINE KeyBlockView get(const T* k, int64_t k_stride, const T* v, int64_t v_stride, int64_t n0,
                                    int64_t D, Clamp clamp) {
    const int64_t block = n0 / kKeys, nk = std::min(kKeys, keys - n0);
    float* kb = kt.data() + block * kKeys * D;
    float* vr = vb.data() + block * kKeys * D;
    if (!ready[block]) {
      load_keys(k + n0 * k_stride, k_stride, nk, D, clamp, nullptr, kb);
      load_keys(v + n0 * v_stride, v_stride, nk, D, clamp, vr, nullptr);
      ready[block] = 1;
    }
    return {kb, vr};
  }
};

// Lanes [0, count) rounded up to whole 16-lane vectors (at most kKeys): the per-row loops run over these, the
// lanes a row does not see masked, so that they vectorise without scalar tails.
OLMO_FAST_INLINE int64_t whole_vectors(int64_t count) { return std::min<int64_t>(kKeys, (count + 15) / 16 * 16); }

// The online-softmax step of rows `r` (R of them; row r[x] sees lanes [skip[x], seen[x]) of the block, scores
// s[x]) over a block: s[x] becomes p = exp(s - m_new) there and 0 elsewhere up to `count` lanes; m, l, acc updated.
// skip[x] > 0 only under a sliding window (the keys before a row's window).
template <int R>
OLMO_FAST_INLINE void softmax_block(const int64_t* r, const int64_t* skip, const int64_t* seen, int64_t count,
                                    float* const* s, const float* vb, int64_t D, AttendBuffers& w) {
  float* acc[R];
  const int64_t lanes16 = whole_vectors(count);
  for (int x = 0; x < R; ++x) {
    float* sx = s[x];
    acc[x] = w.acc + r[x] * D;
    const int64_t n_skip = std::min(std::max<int64_t>(skip[x], 0), count), n_seen = std::max(seen[x], n_skip);
    if (n_seen > n_skip) {
      OLMO_FAST_IVDEP
      for (int64_t i = 0; i < lanes16; ++i) sx[i] = i >= n_skip && i < n_seen ? sx[i] : -INFINITY;
      const float m_old = w.m[r[x]];
      const float m_new = std::max(m_old, lane_max(lanes16, [&](int64_t i) { return sx[i]; }));
      const float alpha = exp_f32(m_old - m_new);  // 0 on the row's first block (m_old = -inf)
      OLMO_FAST_IVDEP
      for (int64_t i = 0; i < lanes16; ++i) sx[i] = exp_f32(sx[i] - m_new);  // exp_f32(-inf) = 0: masked lanes
      w.l[r[x]] = w.l[r[x]] * alpha + lane_sum(lanes16, [&](int64_t i) { return sx[i]; });
      w.m[r[x]] = m_new;
      float* ax = acc[x];
      OLMO_FAST_IVDEP
      for (int64_t d = 0; d < D; ++d) ax[d] *= alpha;
    } else {
      for (int64_t n = 0; n < count; ++n) sx[n] = 0.0f;
    }
  }
  add_weighted_rows<R>(acc, s, count, vb, D, D);
}

// block_scores<R> then softmax_block<R> for a group of 1 to 4 rows against the key block `kv`.
OLMO_FAST_INLINE void attend_group(int64_t width, const int64_t* r, const int64_t* skip, const int64_t* seen,
                                   int64_t count, const float* const* q, float* const* s, int64_t D, KeyBlockView kv,
                                   AttendBuffers& w) {
  switch (width) {
    case 4: block_scores<4>(q, kv.kt, D, s); softmax_block<4>(r, skip, seen, count, s, kv.vb, D, w); break;
    case 3: block_scores<3>(q, kv.kt, D, s); softmax_block<3>(r, skip, seen, count, s, kv.vb, D, w); break;
    case 2: block_scores<2>(q, kv.kt, D, s); softmax_block<2>(r, skip, seen, count, s, kv.vb, D, w); break;
    default: block_scores<1>(q, kv.kt, D, s); softmax_block<1>(r, skip, seen, count, s, kv.vb, D, w); break;
  }
}

// Rows r < n_rows of q (fp32 [n_rows][D], clamped and pre-scaled) against keys [first[r], limit[r]) (limit[r] <=
// n_keys; first[r] = 0 without a sliding window, and may be negative), whose blocks `blocks(n0, nk)` gives
// (KeyBlock, or a KeyCache's): running max w.m[r], sum w.l[r] and unnormalised output w.acc[r] (fp32). Key blocks
// start at the smallest first[r] rounded down to a multiple of `align` (1: the keys before every row's window are
// never read; kKeys: the blocks of a KeyCache). Rows go in groups of row_group() (each key vector loaded once for
// the group). A row without keys keeps l = 0.
template <class Blocks>
OLMO_FAST_INLINE void attend_rows(const float* q, int64_t n_rows, const int64_t* first, const int64_t* limit,
                                  int64_t n_keys, int64_t D, int64_t align, Blocks&& blocks, AttendBuffers& w) {
  int64_t start = n_keys;
  for (int64_t r = 0; r < n_rows; ++r) {
    w.m[r] = -INFINITY;
    w.l[r] = 0.0f;
    start = std::min(start, first[r]);
  }
  for (int64_t i = 0; i < n_rows * D; ++i) w.acc[i] = 0.0f;
  float* const s[4] = {w.scores, w.scores + kKeys, w.scores + 2 * kKeys, w.scores + 3 * kKeys};
  const int64_t group = row_group();
  for (int64_t n0 = std::max<int64_t>(start, 0) / align * align; n0 < n_keys; n0 += kKeys) {
    const int64_t nk = std::min(kKeys, n_keys - n0);
    const KeyBlockView kv = blocks(n0, nk);
    for (int64_t r = 0; r < n_rows; r += group) {  // the last group may be short
      const int64_t width = std::min(group, n_rows - r);
      int64_t rows[4], skip[4], seen[4], count = 0;
      bool any = false;
      const float* qs[4];
      for (int64_t x = 0; x < width; ++x) {
        rows[x] = r + x;
        skip[x] = first[r + x] - n0;
        seen[x] = std::min(nk, limit[r + x] - n0);
        count = std::max(count, seen[x]);
        any = any || skip[x] < seen[x];
        qs[x] = q + (r + x) * D;
      }
      if (count > 0 && any) attend_group(width, rows, skip, seen, count, qs, s, D, kv, w);
    }
  }
}

// The first key query position `pos` sees under a sliding window of `window` keys (0 = none): pos - window + 1
// (may be negative), or 0.
OLMO_FAST_INLINE int64_t window_first(int64_t pos, int64_t window) { return window > 0 ? pos - window + 1 : 0; }

}  // namespace cpu
}  // namespace olmo_fast
