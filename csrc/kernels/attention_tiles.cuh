// What the GPU attention kernels (attention_fwd.cu, attention_bwd.cu) share: the mask of
// olmo_fast_attention_fwd_args (kernels.h) and the staging of operand tiles into shared memory.
//
// Mask: query i (of q_len) sees key j (of kv_len) unless causal and j > i + kv_len - q_len (bottom-right aligned),
// or, with a sliding window, j <= i + kv_len - q_len - window. Block skipping uses the spans of whole row ranges.
//
// stage_rows copies `rows` rows of head_dim values (rows `row_stride` elements apart, the last dim contiguous) into
// a shared-memory tile [tile_rows][ld] of the storage type, clamped to [-clip, clip] when has_clip (NaN stays NaN),
// zero in rows past `rows` and columns past head_dim: a tile's padding adds nothing to a product. The block's
// threads stride the tile's elements together (consecutive threads: consecutive columns, so global loads coalesce);
// the caller syncs. Bytes: rows x head_dim elements read from global memory, tile_rows x ld written to shared.
#pragma once

#include "common.cuh"

namespace olmo_fast {

struct AttentionMask {
  int64_t q_len, kv_len, window;  // window 0: unlimited
  bool causal;

  // Keys [key_begin(i), key_end(i)) that query i sees (an empty range for a query that sees none).
  OF_HD int64_t key_end(int64_t i) const {
    if (!causal) return kv_len;
    const int64_t end = i + kv_len - q_len + 1;
    return end < 0 ? 0 : (end > kv_len ? kv_len : end);
  }
  OF_HD int64_t key_begin(int64_t i) const {
    const int64_t first = window > 0 ? i + kv_len - q_len - window + 1 : 0;
    return first < 0 ? 0 : first;
  }
  OF_HD bool sees(int64_t i, int64_t j) const { return j >= key_begin(i) && j < key_end(i); }

  // The keys that any of queries [i0, i1) sees: [key_begin(i0), key_end(i1 - 1)) (both bounds grow with i).
  OF_HD int64_t keys_begin(int64_t i0) const { return key_begin(i0); }
  OF_HD int64_t keys_end(int64_t i1) const { return i1 > 0 ? key_end(i1 - 1) : 0; }

  // The queries that see any of keys [j0, j1): [queries_begin(j0), queries_end(j1)).
  OF_HD int64_t queries_begin(int64_t j0) const {
    if (!causal) return 0;
    const int64_t first = j0 - (kv_len - q_len);
    return first < 0 ? 0 : (first > q_len ? q_len : first);
  }
  OF_HD int64_t queries_end(int64_t j1) const {
    if (window <= 0) return q_len;
    const int64_t end = j1 - 1 + window - (kv_len - q_len);  // the last query whose window reaches key j1 - 1, + 1
    return end < 0 ? 0 : (end > q_len ? q_len : end);
  }
};

template <class T>
OF_DEVICE T clamp_storage(T x, float clip) {
  const float v = to_float(x);
  return v < -clip ? from_float<T>(-clip) : (v > clip ? from_float<T>(clip) : x);
}

template <class T>
OF_DEVICE void stage_rows(T* tile, int ld, int tile_rows, const T* src, int64_t row_stride, int64_t rows,
                          int64_t head_dim, bool has_clip, float clip) {
  for (int e = threadIdx.x; e < tile_rows * ld; e += blockDim.x) {
    const int r = e / ld, d = e % ld;
    T x = from_float<T>(0.0f);
    if (r < rows && d < head_dim) {
      x = src[r * row_stride + d];
      if (has_clip) x = clamp_storage(x, clip);
    }
    tile[e] = x;
  }
}

}  // namespace olmo_fast
