// Clipped-QKV flash attention for training on the CPU, forward and backward (contract: kernels.h).
//
// Forward: a task per block of 64 queries of one (b, h): its rows, clamped and pre-scaled to fp32, run attend.h's
// online softmax over key blocks of 64, then out = acc / l and lse = m + log(l). Key blocks are converted to fp32
// (clamped as loaded, K transposed) once per thread and kv head (attend.h's KeyCache: a thread's tasks are
// consecutive, so all the query blocks and GQA heads of a kv head reuse them; converting per task cost ~20% of
// the forward at T = 512, D = 64). Work 4 P FLOPs, P = B H Tq Tk D (halved by a causal mask at Tq = Tk).
// A sliding window (query at position i sees keys i - window < j <= i) skips work: a task's key blocks start at
// its first row's window, and the backward visits, per key block, only the band of queries that see it.
//
// Backward (FlashAttention-2's math, one pass): a task per (b, kv head) owns dK, dV of that head and dQ of its
// group of query heads, so no two tasks write the same gradient. Per key block: K (by rows and transposed) and
// V^T in fp32; for each query row r of the group that sees the block, with q_r clamped and scaled and
// delta_r = dO_r . O_r:
//   p = exp(q_r K^T - lse_r),  dp = dO_r V^T,  ds = p (dp - delta_r)
//   dQ_r += ds K,  and over a chunk of 64 rows (P, dS kept transposed):  dV += P^T dO,  dK += dS^T Q
// (fp32; every product accumulates in registers along its sum: attend.h's block_scores / add_weighted_rows);
// then dK, dV of the block are written, and dQ (times scale) once all blocks are done; each through the clamp's
// gradient mask of its raw input. Rows go in chunks of 64 queries of one head, from the first query that sees
// the key block (the diagonal) to the last (the window's far end). Work 10 P FLOPs (scores recomputed once).
// Memory per task: fp32 copies of the group's q, dO and the dQ accumulator (3 x group x Tq x D floats) and the
// key block.
#include <memory>

#include "attend.h"

namespace olmo_fast {
namespace cpu {
namespace {

constexpr int64_t kQueries = OLMO_FAST_ATTENTION_CPU_QUERIES;

// Keys [0, key_limit) that query i sees.
OLMO_FAST_INLINE int64_t key_limit(int64_t i, int64_t q_len, int64_t kv_len, bool causal) {
  return causal ? std::min(std::max<int64_t>(i + kv_len - q_len + 1, 0), kv_len) : kv_len;
}

template <class T>
OLMO_FAST_CPU_CLONES void attention_fwd_rows(const olmo_fast_attention_fwd_args& a, int64_t row_begin,
                                             int64_t row_end) {
  const int64_t D = a.head_dim, Tq = a.q_len, group = a.heads / a.kv_heads;
  const int64_t blocks = (Tq + kQueries - 1) / kQueries;
  const Clamp clamp{a.has_clip ? a.clip : INFINITY};
  AttendBuffers w(kQueries, D);
  KeyCache keys;  // this thread's tasks run in order: the query blocks and heads of one kv head in a row
  std::vector<float> q(kQueries * D);
  int64_t first[kQueries], limit[kQueries];
  for (int64_t row = row_begin; row < row_end; ++row) {
    const int64_t bh = row / blocks, b = bh / a.heads, h = bh - b * a.heads;
    const int64_t i0 = (row - bh * blocks) * kQueries, n_rows = std::min(kQueries, Tq - i0);
    int64_t n_keys = 0;
    for (int64_t r = 0; r < n_rows; ++r) {
      const T* qr = static_cast<const T*>(a.q) + b * a.q_strides[0] + (i0 + r) * a.q_strides[1] + h * a.q_strides[2];
      for (int64_t d = 0; d < D; ++d) q[r * D + d] = a.scale * clamp(to_float(qr[d]));
      limit[r] = key_limit(i0 + r, Tq, a.kv_len, a.causal != 0);
      first[r] = window_first(i0 + r + a.kv_len - Tq, a.window);
      n_keys = std::max(n_keys, limit[r]);
    }
    const int64_t kh = h / group;
    const T* k = static_cast<const T*>(a.k) + b * a.k_strides[0] + kh * a.k_strides[2];
    const T* v = static_cast<const T*>(a.v) + b * a.v_strides[0] + kh * a.v_strides[2];
    keys.own(b * a.kv_heads + kh, a.kv_len, D);
    const auto blocks = [&](int64_t n0, int64_t) {  // whole blocks, each converted once (KeyCache)
      return keys.get(k, a.k_strides[1], v, a.v_strides[1], n0, D, clamp);
    };
    attend_rows(q.data(), n_rows, first, limit, n_keys, D, kKeys, blocks, w);
    for (int64_t r = 0; r < n_rows; ++r) {
      const int64_t i = i0 + r;
      T* o = static_cast<T*>(a.out) + ((b * Tq + i) * a.heads + h) * D;
      const bool empty = w.l[r] == 0.0f;
      const float inv = empty ? 0.0f : 1.0f / w.l[r];
      for (int64_t d = 0; d < D; ++d) o[d] = from_float<T>(w.acc[r * D + d] * inv);
      a.lse[bh * Tq + i] = empty ? INFINITY : w.m[r] + logf(w.l[r]);
    }
  }
}

// dst[d] = scale * src[d] where the raw input x[d] passes the clamp's gradient (always without a clip), else 0.
template <class T>
OLMO_FAST_INLINE void write_grad(const float* src, float scale, const T* x, bool has_clip, float clip, int64_t D,
                                 T* dst) {
  if (has_clip) {
    OLMO_FAST_IVDEP
    for (int64_t d = 0; d < D; ++d) dst[d] = from_float<T>(clamp_passes(to_float(x[d]), clip) ? scale * src[d] : 0.0f);
  } else {
    OLMO_FAST_IVDEP
    for (int64_t d = 0; d < D; ++d) dst[d] = from_float<T>(scale * src[d]);
  }
}

// The per-row part of the backward for R rows `r` of a key block (row r[x] sees lanes [skip[x], seen[x]) of it:
// skip[x] > 0 only under a sliding window; count = the largest seen): p = exp(q K^T - lse), ds = p (dO V^T -
// delta) into p[x], ds[x] (0 on the other lanes up to count), and dQ += ds K. Scores of the R rows share each
// loaded K^T / V^T vector (block_scores<R>), dQ each K row.
template <int R>
OLMO_FAST_INLINE void block_row_grads(const int64_t* r, const int64_t* skip, const int64_t* seen, int64_t count,
                                      const float* qs,
                                      const float* dout, const float* lse, const float* delta, const float* kt,
                                      const float* vt, const float* kb, int64_t D, float* const* p,
                                      float* const* ds, float* dq) {
  const float* qr[R];
  const float* dor[R];
  float* dqr[R];
  for (int x = 0; x < R; ++x) {
    qr[x] = qs + r[x] * D;
    dor[x] = dout + r[x] * D;
    dqr[x] = dq + r[x] * D;
  }
  block_scores<R>(qr, kt, D, p);
  block_scores<R>(dor, vt, D, ds);  // dp
  const int64_t lanes16 = whole_vectors(count);
  for (int x = 0; x < R; ++x) {
    float* px = p[x];
    float* dsx = ds[x];
    const float lse_r = lse[r[x]], delta_r = delta[r[x]];
    const int64_t n_skip = std::min(skip[x], count), n_seen = std::max(seen[x], n_skip);
    OLMO_FAST_IVDEP
    for (int64_t n = 0; n < lanes16; ++n) {  // whole vectors, the lanes the row does not see set to 0
      const bool in = n >= n_skip && n < n_seen;
      const float pn = exp_f32(px[n] - lse_r);
      px[n] = in ? pn : 0.0f;
      dsx[n] = in ? pn * (dsx[n] - delta_r) : 0.0f;
    }
  }
  add_weighted_rows<R>(dqr, ds, count, kb, D, D);
}

// block_row_grads<R> for a group of 1 to 4 rows.
OLMO_FAST_INLINE void group_row_grads(int64_t width, const int64_t* r, const int64_t* skip, const int64_t* seen,
                                      int64_t count, const float* qs, const float* dout, const float* lse,
                                      const float* delta, const float* kt, const float* vt, const float* kb,
                                      int64_t D, float* const* p, float* const* ds, float* dq) {
  switch (width) {
    case 4: block_row_grads<4>(r, skip, seen, count, qs, dout, lse, delta, kt, vt, kb, D, p, ds, dq); break;
    case 3: block_row_grads<3>(r, skip, seen, count, qs, dout, lse, delta, kt, vt, kb, D, p, ds, dq); break;
    case 2: block_row_grads<2>(r, skip, seen, count, qs, dout, lse, delta, kt, vt, kb, D, p, ds, dq); break;
    default: block_row_grads<1>(r, skip, seen, count, qs, dout, lse, delta, kt, vt, kb, D, p, ds, dq); break;
  }
}

// out[x] += sum_i w[x][i] rows[i] for a group of 1 to 4 outputs (add_weighted_rows<R>).
OLMO_FAST_INLINE void group_weighted_rows(int64_t width, float* const* out, const float* const* w, int64_t count,
                                          const float* rows, int64_t D) {
  switch (width) {
    case 4: add_weighted_rows<4>(out, w, count, rows, D, D); break;
    case 3: add_weighted_rows<3>(out, w, count, rows, D, D); break;
    case 2: add_weighted_rows<2>(out, w, count, rows, D, D); break;
    default: add_weighted_rows<1>(out, w, count, rows, D, D); break;
  }
}

template <class T>
OLMO_FAST_CPU_CLONES void attention_bwd_pairs(const olmo_fast_attention_bwd_args& a, int64_t pair_begin,
                                              int64_t pair_end) {
  const int64_t D = a.head_dim, Tq = a.q_len, Tk = a.kv_len, group = a.heads / a.kv_heads, rows = group * Tq;
  const bool has_clip = a.has_clip != 0;
  const Clamp clamp{has_clip ? a.clip : INFINITY};
  const int64_t group_size = row_group();
  // Not zeroed (every part is written before it is read; only the transposed key blocks, whose lanes past a
  // partial block's keys feed discarded products, and the P / dS rows start at 0, to stay finite): zeroing it all
  // cost ~2 us a call.
  std::unique_ptr<float[]> buffers(new float[3 * rows * D + 2 * rows + 5 * kKeys * D + 8 * kKeys +
                                             2 * kKeys * kQueries]);
  float* qs = buffers.get();  // [rows][D]: row r = g * Tq + i, query i of head kh * group + g
  float* dout = qs + rows * D;
  float* dq = dout + rows * D;
  float* lse = dq + rows * D;
  float* delta = lse + rows;
  float* kb = delta + rows;    // K block by rows
  float* kt = kb + kKeys * D;  // K block transposed
  float* vt = kt + kKeys * D;  // V block transposed
  float* dk = vt + kKeys * D;
  float* dv = dk + kKeys * D;
  float* const p[4] = {dv + kKeys * D, dv + kKeys * D + kKeys, dv + kKeys * D + 2 * kKeys,
                       dv + kKeys * D + 3 * kKeys};  // a group's rows of P and of dS
  float* const ds[4] = {p[3] + kKeys, p[3] + 2 * kKeys, p[3] + 3 * kKeys, p[3] + 4 * kKeys};
  float* pt = ds[3] + kKeys;           // [kKeys][kQueries]: P of a chunk of rows, transposed
  float* dst = pt + kKeys * kQueries;  // dS likewise
  std::fill(kt, kt + kKeys * D, 0.0f);
  std::fill(vt, vt + kKeys * D, 0.0f);
  std::fill(p[0], p[0] + 8 * kKeys, 0.0f);
  for (int64_t pair = pair_begin; pair < pair_end; ++pair) {
    const int64_t b = pair / a.kv_heads, kh = pair - b * a.kv_heads;
    const auto row_ptr = [&](const void* base, const int64_t* s, int64_t r) {  // (b, i, h) of row r
      const int64_t g = r / Tq, i = r - g * Tq;
      return static_cast<const T*>(base) + b * s[0] + i * s[1] + (kh * group + g) * s[2];
    };
    for (int64_t r = 0; r < rows; ++r) {
      const T* qr = row_ptr(a.q, a.q_strides, r);
      const T* dor = row_ptr(a.dout, a.dout_strides, r);
      const T* orow = row_ptr(a.out, a.out_strides, r);
      for (int64_t d = 0; d < D; ++d) {
        qs[r * D + d] = a.scale * clamp(to_float(qr[d]));
        dout[r * D + d] = to_float(dor[d]);
        dq[r * D + d] = 0.0f;
      }
      delta[r] = lane_sum(D, [&](int64_t d) { return dout[r * D + d] * to_float(orow[d]); });
      const int64_t g = r / Tq, i = r - g * Tq;
      lse[r] = a.lse[(b * a.heads + kh * group + g) * Tq + i];
    }
    const T* k = static_cast<const T*>(a.k) + b * a.k_strides[0] + kh * a.k_strides[2];
    const T* v = static_cast<const T*>(a.v) + b * a.v_strides[0] + kh * a.v_strides[2];
    for (int64_t n0 = 0; n0 < Tk; n0 += kKeys) {
      const int64_t nk = std::min(kKeys, Tk - n0);
      load_keys(k + n0 * a.k_strides[1], a.k_strides[1], nk, D, clamp, kb, kt);
      load_keys(v + n0 * a.v_strides[1], a.v_strides[1], nk, D, clamp, nullptr, vt);
      for (int64_t i = 0; i < nk * D; ++i) dk[i] = dv[i] = 0.0f;
      // Queries [i_lo, i_hi) of each head see part of the block: from the diagonal to the window's far end.
      const int64_t i_lo = a.causal != 0 ? std::min(std::max<int64_t>(n0 - (Tk - Tq), 0), Tq) : 0;
      const int64_t i_hi = a.window > 0 ? std::max(std::min(n0 + nk - 1 + a.window - (Tk - Tq), Tq), i_lo) : Tq;
      for (int64_t g = 0; g < group; ++g) {
        for (int64_t i0 = i_lo; i0 < i_hi; i0 += kQueries) {  // a chunk of rows: P and dS kept, transposed
          const int64_t nr = std::min(kQueries, i_hi - i0), r0 = g * Tq + i0;  // row r = g * Tq + i
          bool any = false;
          for (int64_t c = 0; c < nr; c += group_size) {  // rows in groups (the last one may be short)
            const int64_t width = std::min(group_size, nr - c);
            int64_t r[4], skip[4], seen[4], count = 0;
            for (int64_t x = 0; x < width; ++x) {
              const int64_t i = i0 + c + x;
              const int64_t end = std::max<int64_t>(std::min(nk, key_limit(i, Tq, Tk, a.causal != 0) - n0), 0);
              r[x] = r0 + c + x;
              skip[x] = std::min(std::max<int64_t>(window_first(i + Tk - Tq, a.window) - n0, 0), end);
              seen[x] = skip[x] < end ? end : 0;  // row x sees lanes [skip, seen) of the block
              count = std::max(count, seen[x]);
            }
            if (count > 0) {
              any = true;
              group_row_grads(width, r, skip, seen, count, qs, dout, lse, delta, kt, vt, kb, D, p, ds, dq);
            }
            for (int64_t x = 0; x < width; ++x) {
              for (int64_t n = 0; n < nk; ++n) {
                pt[n * kQueries + c + x] = n < seen[x] ? p[x][n] : 0.0f;
                dst[n * kQueries + c + x] = n < seen[x] ? ds[x][n] : 0.0f;
              }
            }
          }
          if (!any) continue;
          for (int64_t n = 0; n < nk; n += group_size) {  // keys in groups: each row of dO / Q loaded once for all
            const int64_t width = std::min(group_size, nk - n);
            float* dvs[4];
            float* dks[4];
            const float* ps[4];
            const float* dss[4];
            for (int64_t x = 0; x < width; ++x) {
              dvs[x] = dv + (n + x) * D;
              dks[x] = dk + (n + x) * D;
              ps[x] = pt + (n + x) * kQueries;
              dss[x] = dst + (n + x) * kQueries;
            }
            group_weighted_rows(width, dvs, ps, nr, dout + r0 * D, D);
            group_weighted_rows(width, dks, dss, nr, qs + r0 * D, D);
          }
        }
      }
      for (int64_t n = 0; n < nk; ++n) {
        const int64_t j = n0 + n;
        const int64_t at = ((b * Tk + j) * a.kv_heads + kh) * D;
        write_grad(dk + n * D, 1.0f, k + j * a.k_strides[1], has_clip, a.clip, D, static_cast<T*>(a.dk) + at);
        write_grad(dv + n * D, 1.0f, v + j * a.v_strides[1], has_clip, a.clip, D, static_cast<T*>(a.dv) + at);
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t g = r / Tq, i = r - g * Tq;
      T* out = static_cast<T*>(a.dq) + ((b * Tq + i) * a.heads + kh * group + g) * D;
      write_grad(dq + r * D, a.scale, row_ptr(a.q, a.q_strides, r), has_clip, a.clip, D, out);
    }
  }
}

}  // namespace
}  // namespace cpu
}  // namespace olmo_fast

using namespace olmo_fast;

extern "C" void olmo_fast_attention_fwd_cpu(const olmo_fast_attention_fwd_args* args, int64_t row_begin,
                                            int64_t row_end) {
  cpu::dispatch_dtype(args->dtype,
                      [&](auto tag) { cpu::attention_fwd_rows<decltype(tag)>(*args, row_begin, row_end); });
}

extern "C" void olmo_fast_attention_bwd_cpu(const olmo_fast_attention_bwd_args* args, int64_t pair_begin,
                                            int64_t pair_end) {
  cpu::dispatch_dtype(args->dtype,
                      [&](auto tag) { cpu::attention_bwd_pairs<decltype(tag)>(*args, pair_begin, pair_end); });
}
