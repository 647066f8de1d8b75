// What the GPU attention kernels (attention_fwd.cu, attention_bwd.cu) share: the mask of
// olmo_fast_attention_fwd_args (kernels.h), the staging of operand tiles into shared memory and their way back
// (store_rows).
//
// Mask: query i (of q_len) sees key j (of kv_len) unless causal and j > i + kv_len - q_len (bottom-right aligned),
// or, with a sliding window, j <= i + kv_len - q_len - window. Block skipping uses the spans of whole row ranges.
//
// stage_rows copies `rows` rows of head_dim values (rows `row_stride` elements apart, the last dim contiguous) into
// a shared-memory tile [tile_rows][ld] of the storage type, clamped to [-clip, clip] when has_clip (NaN stays NaN),
// zero in rows past `rows` and columns past head_dim: a tile's padding adds nothing to a product. The block's
// threads stride the tile's elements together (consecutive threads: consecutive columns, so global loads coalesce);
// the caller syncs. Where the tile and source rows are 16-byte aligned and ld, the row stride and head_dim are
// multiples of 16 bytes, it moves 16-byte vectors. Bytes: rows x head_dim elements read from global memory,
// tile_rows x ld written to shared.
#pragma once

#include "common.cuh"
#include "mma.cuh"

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

// stage_rows' loop over vectors of N elements (N = 1: element by element); a vector lies wholly inside or outside
// the rows' head_dim values (head_dim % N == 0 when N > 1).
template <class T, int N>
OF_DEVICE void stage_rows_by(T* tile, int ld, int tile_rows, const T* src, int64_t row_stride, int64_t rows,
                             int64_t head_dim, bool has_clip, float clip) {
  const int per_row = ld / N;
  for (int e = threadIdx.x; e < tile_rows * per_row; e += blockDim.x) {
    const int r = e / per_row, d = e % per_row * N;
    Vec<T, N> x;
    if (r < rows && d < head_dim) {
      x = load_vec<T, N>(src + r * row_stride + d);
      if (has_clip) {
#pragma unroll
        for (int i = 0; i < N; ++i) x.v[i] = clamp_storage(x.v[i], clip);
      }
    } else {
#pragma unroll
      for (int i = 0; i < N; ++i) x.v[i] = from_float<T>(0.0f);
    }
    store_vec<T, N>(tile + r * ld + d, x);
  }
}

// 16-byte loads and stores where the tile, the rows and head_dim allow them (the same tile either way).
template <class T>
OF_DEVICE void stage_rows(T* tile, int ld, int tile_rows, const T* src, int64_t row_stride, int64_t rows,
                          int64_t head_dim, bool has_clip, float clip) {
  constexpr int N = int(16 / sizeof(T));
  const bool aligned = ((reinterpret_cast<uintptr_t>(tile) | reinterpret_cast<uintptr_t>(src)) & 15u) == 0;
  if (aligned && ld % N == 0 && row_stride % N == 0 && head_dim % N == 0) {
    stage_rows_by<T, N>(tile, ld, tile_rows, src, row_stride, rows, head_dim, has_clip, clip);
  } else {
    stage_rows_by<T, 1>(tile, ld, tile_rows, src, row_stride, rows, head_dim, has_clip, clip);
  }
}

// The way back: rows [0, rows) of a shared tile [.][ld] (their first head_dim values) to global rows
// `row_stride` elements apart, consecutive threads on consecutive columns, 16-byte vectors where the rows, ld,
// row_stride and head_dim allow them. The caller syncs before (the tile complete).
template <class T, int N>
OF_DEVICE void store_rows_by(T* dst, int64_t row_stride, const T* tile, int ld, int64_t rows, int64_t head_dim) {
  const int64_t per_row = head_dim / N;
  for (int64_t e = threadIdx.x; e < rows * per_row; e += blockDim.x) {
    const int64_t r = e / per_row, d = (e - r * per_row) * N;
    store_vec<T, N>(dst + r * row_stride + d, load_vec<T, N>(tile + r * ld + d));
  }
}

template <class T>
OF_DEVICE void store_rows(T* dst, int64_t row_stride, const T* tile, int ld, int64_t rows, int64_t head_dim) {
  constexpr int N = int(16 / sizeof(T));
  const bool aligned = ((reinterpret_cast<uintptr_t>(tile) | reinterpret_cast<uintptr_t>(dst)) & 15u) == 0;
  if (aligned && ld % N == 0 && row_stride % N == 0 && head_dim % N == 0) {
    store_rows_by<T, N>(dst, row_stride, tile, ld, rows, head_dim);
  } else {
    store_rows_by<T, 1>(dst, row_stride, tile, ld, rows, head_dim);
  }
}

// ---- warp products over staged tiles ----

// c[n] += A B_n^T: A = 16 rows of `a` (row stride lda) by the head dim, B_n = rows 16 n .. 16 n + 15 of `b` (row
// stride ldb); k-steps past `dim_tiles` (zero padding) are skipped.
template <int kTilesN, int kTilesK, class T>
OF_DEVICE void mma_rows_by_rows(Acc (&c)[kTilesN], const T* a, int lda, const T* b, int ldb, int dim_tiles) {
#pragma unroll
  for (int kt = 0; kt < kTilesK; ++kt) {
    if (kt < dim_tiles) {  // a guard, not a break: the loop stays unrollable
      OperandA<T> fa;
      load_a(fa, a + kt * kMmaTile, lda, 1);
#pragma unroll
      for (int nt = 0; nt < kTilesN; ++nt) {
        OperandB<T> fb;
        load_b(fb, b + nt * kMmaTile * ldb + kt * kMmaTile, 1, ldb);  // B(k = dim, n = row) = b[row][dim]
        mma(c[nt], fa, fb);
      }
    }
  }
}

// c[n] += W B[:, 16 n .. 16 n + 15]: W = 16 rows of `w` (row stride ldw) by kTilesK * 16 columns, B = `b` (row
// stride ldb) by the head dim; column tiles past `dim_tiles` are skipped (their accumulators stay 0).
template <int kTilesN, int kTilesK, class T>
OF_DEVICE void mma_weights_by_rows(Acc (&c)[kTilesN], const T* w, int ldw, const T* b, int ldb, int dim_tiles) {
#pragma unroll
  for (int kt = 0; kt < kTilesK; ++kt) {
    OperandA<T> fa;
    load_a(fa, w + kt * kMmaTile, ldw, 1);
#pragma unroll
    for (int nt = 0; nt < kTilesN; ++nt) {
      if (nt < dim_tiles) {
        OperandB<T> fb;
        load_b(fb, b + kt * kMmaTile * ldb + nt * kMmaTile, ldb, 1);  // B(k = row, n = dim) = b[row][dim]
        mma(c[nt], fa, fb);
      }
    }
  }
}

}  // namespace olmo_fast
