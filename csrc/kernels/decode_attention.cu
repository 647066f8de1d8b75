// Decoding attention on the GPU (contract: kernels.h, olmo_fast_decode_attention_args): a few new queries over a
// KV cache, split-K over the cache (flash-decoding). Per sequence b and query row r = (query head of the group g,
// new token i) at position p = seqlen_b - q_len + i, with keys j in [first_r, limit_r) = [p - window + 1, p + 1)
// (no lower bound without a window) clipped to [0, seqlen_b):
//   s_j = scale q_r . k_j,   out_r = sum_j e^(s_j - m) v_j / sum_j e^(s_j - m),   m = max_j s_j   (0 without keys)
// in fp32, base 2 inside (q pre-scaled by scale * log2 e, exp2).
//
// Kernel 1, one block per (sequence, kv head, chunk of kRows query rows, split): the rows are the chunk's query
// heads of the kv head's group x new tokens, so K/V are read once for all of them (groups x q_len <= kRows: one
// chunk; beyond, each further chunk re-reads the split's keys, from L2 when its blocks run together). The split
// takes a contiguous 1/splits of the keys any of its rows sees (with a window, only the window's span). Its warps
// take keys in turn; a warp's lanes form groups of `lg` (a power of 2, lg <= warp size) that each own one key at a
// time, a lane owning NV vectors of VEC head-dim elements of it (16-byte vectors when aligned). A lane-group is an
// independent stream: q . k summed over the lane's elements then across the group (shfl_xor within the group),
// online softmax per row (running max m, sum l, the fp32 accumulator of the lane's elements rescaled when m grows).
// The streams merge by log-sum-exp: across a warp's groups by shuffles, across warps through shared memory. With
// one split the block writes out; otherwise its partial (unnormalised acc [D], m, l per row) goes to the float
// workspace and kernel 2 (one block per output row) merges the splits the same way and writes out.
// Warp-size agnostic (32 or 64): the lane groups, the streams and the shuffle masks derive from OF_WARP_SIZE; every
// loop around a shuffle is uniform over the warp, every loop around a barrier over the block.
// Split policy (launcher): enough blocks for ~kBlocksPerMultiprocessor on each of the device's multiprocessors
// (args.multiprocessors: 132 SMs on an H100 SXM, 108 on an A100, 110 CUs on an MI250X GCD), at least kMinSplitKeys
// keys per split of the longest possible span (the cache, or the window plus q_len - 1).
// DRAM bytes: K and V once per (sequence, kv head, chunk): e * B * Hkv * L * 2D (dominant; L = keys seen, at most
// window + q_len - 1 with a window), q and out once (e * B * q_len * H * D each), plus with splits > 1 the
// workspace written and read once: 4 * B * H * q_len * splits * (D + 2).
#include "common.cuh"

namespace olmo_fast {
namespace {

constexpr int kRows = 4;            // query rows per block (q and acc of 4 rows x <= 8 elements in registers)
constexpr int kUnroll = 2;          // keys per stream whose loads are in flight together
constexpr int kWarps = 4;           // warps (wavefronts) per split block
constexpr int kMaxThreads = 256;    // kWarps x 64
constexpr int64_t kMaxHeadDim = 256;
constexpr int64_t kMinSplitKeys = 256;
constexpr int64_t kBlocksPerMultiprocessor = 2;
constexpr float kLog2e = 1.4426950408889634f;

OF_HD int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
OF_HD int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

// The merge of `n` partials (unnormalised acc row of D floats, then m, l; `stride` floats apart) at element d:
// m = max m_k, l = sum l_k 2^(m_k - m), acc = sum acc_k[d] 2^(m_k - m) (all 0 when no partial saw a key).
struct Partial {
  float m, l, acc;
};

OF_DEVICE Partial merge_partials(const float* p, int64_t n, int64_t stride, int64_t D, int64_t d) {
  Partial out{-INFINITY, 0.0f, 0.0f};
  for (int64_t k = 0; k < n; ++k) out.m = fmaxf(out.m, p[k * stride + D]);
  if (out.m == -INFINITY) return out;
  for (int64_t k = 0; k < n; ++k) {
    const float w = exp2f(p[k * stride + D] - out.m);
    out.l += p[k * stride + D + 1] * w;
    out.acc += p[k * stride + d] * w;
  }
  return out;
}

template <class T>
OF_DEVICE T normalised(const Partial& x) {
  return from_float<T>(x.l > 0.0f ? x.acc / x.l : 0.0f);
}

// Output row of (sequence b, kv head kh, query row r = g * q_len + i): out[b, i, kh * group + g].
OF_DEVICE int64_t out_row(const olmo_fast_decode_attention_args& a, int64_t b, int64_t kh, int64_t r) {
  const int64_t group = a.heads / a.kv_heads, g = r / a.q_len, i = r - g * a.q_len;
  return (b * a.q_len + i) * a.heads + kh * group + g;
}

// ROWS: kRows, or 1 when a (sequence, kv head) has a single query row (MHA, one new token: a quarter of the
// registers).
template <class T, int ROWS, int VEC, int NV>
__global__ __launch_bounds__(kMaxThreads) void decode_split_kernel(olmo_fast_decode_attention_args a,
                                                                   int64_t splits) {
  constexpr int W = OF_WARP_SIZE, E = NV * VEC;  // E: head-dim elements a lane owns
  const int64_t D = a.head_dim, Tq = a.q_len, group = a.heads / a.kv_heads, rows = group * Tq;
  const int64_t chunks = (rows + ROWS - 1) / ROWS, units = a.batch * a.kv_heads * chunks * splits;
  const int vecs = int((D + VEC - 1) / VEC);
  int lg = 1;  // lanes per key
  while (lg < vecs && lg < W) lg *= 2;
  const int lane = int(threadIdx.x) % W, warp = int(threadIdx.x) / W, warps = int(blockDim.x) / W;
  const int li = lane % lg, slot = lane / lg, slots = W / lg;
  const int step = slots * kUnroll;  // keys of a warp step
  OF_DYNAMIC_SHARED(float, merged);  // [warps][ROWS][D + 2]: each warp's acc, m, l per row
  const int64_t row_floats = D + 2;
  for (int64_t unit = blockIdx.x; unit < units; unit += gridDim.x) {
    const int64_t s = unit % splits, c = unit / splits % chunks, pair = unit / (splits * chunks);
    const int64_t b = pair / a.kv_heads, kh = pair - b * a.kv_heads;
    const int64_t seqlen = min64(max64(a.seqlens[b], 0), a.slots);  // never past the cache
    const int n_rows = int(min64(ROWS, rows - c * ROWS));

    // The rows' queries (pre-scaled) and key ranges, and the union of the ranges [lo, hi).
    float q[ROWS][E];
    int64_t row_first[ROWS], row_limit[ROWS], lo = seqlen, hi = 0;
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      row_first[r] = row_limit[r] = 0;
#pragma unroll
      for (int e = 0; e < E; ++e) q[r][e] = 0.0f;
      if (r >= n_rows) continue;
      const int64_t row = c * ROWS + r, g = row / Tq, i = row - g * Tq, pos = seqlen - Tq + i;
      row_limit[r] = min64(max64(pos + 1, 0), seqlen);
      row_first[r] = a.window > 0 ? max64(pos - a.window + 1, 0) : 0;
      if (row_first[r] < row_limit[r]) {
        lo = min64(lo, row_first[r]);
        hi = max64(hi, row_limit[r]);
      }
      const T* qr = static_cast<const T*>(a.q) + b * a.q_strides[0] + i * a.q_strides[1] +
                    (kh * group + g) * a.q_strides[2];
#pragma unroll
      for (int n = 0; n < NV; ++n) {
        const int vi = li + lg * n;
        if (vi >= vecs) continue;
        const Vec<T, VEC> x = load_vec<T, VEC>(qr + int64_t(vi) * VEC);
#pragma unroll
        for (int e = 0; e < VEC; ++e) q[r][n * VEC + e] = a.scale * kLog2e * to_float(x.v[e]);
      }
    }
    // Keys from here on are counted from lo (int: the launcher bounds slots); this split's are [key_begin, key_end).
    const int span = hi > lo ? int(hi - lo) : 0, per = int((span + splits - 1) / splits);
    const int key_begin = int(min64(int64_t(s) * per, span)), key_end = key_begin + per < span ? key_begin + per : span;
    int first[ROWS], limit[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      first[r] = int(row_first[r] - lo);
      limit[r] = int(row_limit[r] - lo);
    }
    const T* k = static_cast<const T*>(a.k) + b * a.k_strides[0] + lo * a.k_strides[1] + kh * a.k_strides[2];
    const T* v = static_cast<const T*>(a.v) + b * a.v_strides[0] + lo * a.v_strides[1] + kh * a.v_strides[2];

    float m[ROWS], l[ROWS], acc[ROWS][E];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      m[r] = -INFINITY;
      l[r] = 0.0f;
#pragma unroll
      for (int e = 0; e < E; ++e) acc[r][e] = 0.0f;
    }
    for (int base = key_begin + warp * step; base < key_end; base += warps * step) {
      Vec<T, VEC> kx[kUnroll][NV], vx[kUnroll][NV];
      int key[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        key[u] = base + u * slots + slot;
#pragma unroll
        for (int n = 0; n < NV; ++n) {
          const int vi = li + lg * n;
          if (key[u] < key_end && vi < vecs) {
            kx[u][n] = load_vec<T, VEC>(k + key[u] * a.k_strides[1] + vi * VEC);
            vx[u][n] = load_vec<T, VEC>(v + key[u] * a.v_strides[1] + vi * VEC);
          } else {
#pragma unroll
            for (int e = 0; e < VEC; ++e) kx[u][n].v[e] = vx[u][n].v[e] = from_float<T>(0.0f);
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          if (r >= n_rows) continue;  // uniform over the block
          float score = 0.0f;
#pragma unroll
          for (int n = 0; n < NV; ++n) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) score += q[r][n * VEC + e] * to_float(kx[u][n].v[e]);
          }
          for (int mask = lg / 2; mask > 0; mask /= 2) score += shfl_xor(score, mask);
          if (key[u] >= key_end || key[u] < first[r] || key[u] >= limit[r]) continue;
          if (score > m[r]) {  // a new maximum: rescale what the stream holds
            const float alpha = exp2f(m[r] - score);
            l[r] *= alpha;
#pragma unroll
            for (int e = 0; e < E; ++e) acc[r][e] *= alpha;
            m[r] = score;
          }
          const float p = exp2f(score - m[r]);
          l[r] += p;
#pragma unroll
          for (int n = 0; n < NV; ++n) {
#pragma unroll
            for (int e = 0; e < VEC; ++e) acc[r][n * VEC + e] += p * to_float(vx[u][n].v[e]);
          }
        }
      }
    }

    // Merge the warp's streams (lane groups) by shuffles between lanes that own the same elements.
    for (int mask = lg; mask < W; mask *= 2) {
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        if (r >= n_rows) continue;
        const float m_other = shfl_xor(m[r], mask), l_other = shfl_xor(l[r], mask);
        const float top = fmaxf(m[r], m_other);
        const float mine = top == -INFINITY ? 0.0f : exp2f(m[r] - top);
        const float theirs = top == -INFINITY ? 0.0f : exp2f(m_other - top);
        l[r] = l[r] * mine + l_other * theirs;
#pragma unroll
        for (int e = 0; e < E; ++e) acc[r][e] = acc[r][e] * mine + shfl_xor(acc[r][e], mask) * theirs;
        m[r] = top;
      }
    }
    if (slot == 0) {
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        if (r >= n_rows) continue;
        float* dst = merged + (warp * ROWS + r) * row_floats;
#pragma unroll
        for (int n = 0; n < NV; ++n) {
          const int vi = li + lg * n;
          if (vi >= vecs) continue;
#pragma unroll
          for (int e = 0; e < VEC; ++e) dst[vi * VEC + e] = acc[r][n * VEC + e];
        }
        if (li == 0) {
          dst[D] = m[r];
          dst[D + 1] = l[r];
        }
      }
    }
    __syncthreads();

    // Merge the warps: out directly with one split, else this split's partial into the workspace.
    for (int64_t idx = threadIdx.x; idx < n_rows * D; idx += blockDim.x) {
      const int64_t r = idx / D, d = idx - r * D, row = c * ROWS + r;
      const Partial x = merge_partials(merged + r * row_floats, warps, ROWS * row_floats, D, d);
      if (splits == 1) {
        static_cast<T*>(a.out)[out_row(a, b, kh, row) * D + d] = normalised<T>(x);
        continue;
      }
      float* dst = a.workspace + (((b * a.kv_heads + kh) * rows + row) * splits + s) * row_floats;
      dst[d] = x.acc;
      if (d == 0) {
        dst[D] = x.m;
        dst[D + 1] = x.l;
      }
    }
    __syncthreads();  // `merged` is rewritten by the next unit
  }
}

// One block per output row (grid-striding): the row's `splits` partials merged, normalised, written.
template <class T>
__global__ __launch_bounds__(kMaxThreads) void decode_combine_kernel(olmo_fast_decode_attention_args a,
                                                                     int64_t splits) {
  const int64_t D = a.head_dim, group = a.heads / a.kv_heads, rows = group * a.q_len;
  const int64_t n = a.batch * rows * a.kv_heads;
  for (int64_t o = blockIdx.x; o < n; o += gridDim.x) {  // o = (b * kv_heads + kh) * rows + r
    const int64_t r = o % rows, pair = o / rows, b = pair / a.kv_heads, kh = pair - b * a.kv_heads;
    const float* partials = a.workspace + o * splits * (D + 2);
    T* out = static_cast<T*>(a.out) + out_row(a, b, kh, r) * D;
    for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
      out[d] = normalised<T>(merge_partials(partials, splits, D + 2, D, d));
    }
  }
}

// The launch plan: rows per (sequence, kv head), their chunks of kRows, and the number of splits of the cache.
struct Plan {
  int64_t rows, rows_per_block, chunks, splits;
};

Plan plan_of(const olmo_fast_decode_attention_args& a) {
  Plan p;
  p.rows = a.heads / a.kv_heads * a.q_len;
  p.rows_per_block = p.rows == 1 ? 1 : kRows;
  p.chunks = (p.rows + p.rows_per_block - 1) / p.rows_per_block;
  const int64_t span = a.window > 0 ? min64(a.slots, a.window + a.q_len - 1) : a.slots;  // keys a chunk may see
  const int64_t blocks = a.batch * a.kv_heads * p.chunks;
  const int64_t target = kBlocksPerMultiprocessor * a.multiprocessors;
  const int64_t wanted = (target + blocks - 1) / blocks;
  p.splits = max64(1, min64(wanted, span / kMinSplitKeys));
  return p;
}

bool empty(const olmo_fast_decode_attention_args& a) {
  return a.batch == 0 || a.q_len == 0 || a.heads == 0 || a.head_dim == 0;
}

bool valid(const olmo_fast_decode_attention_args& a) {
  return a.batch >= 0 && a.q_len >= 0 && a.heads >= 0 && a.kv_heads > 0 && a.heads % a.kv_heads == 0 &&
         a.multiprocessors > 0 && a.head_dim >= 0 && a.head_dim <= kMaxHeadDim && a.slots >= 0 &&
         a.slots <= INT32_MAX && a.window >= 0;
}

// Whether q, k and v split into aligned vectors of V elements along head_dim.
bool operands_vectorizable(const olmo_fast_decode_attention_args& a, int64_t V) {
  const void* ptrs[3] = {a.q, a.k, a.v};
  const int64_t* strides[3] = {a.q_strides, a.k_strides, a.v_strides};
  if (a.head_dim % V != 0) return false;
  for (int t = 0; t < 3; ++t) {
    if (!aligned16(ptrs[t])) return false;
    for (int d = 0; d < 3; ++d) {
      if (strides[t][d] % V != 0) return false;
    }
  }
  return true;
}

}  // namespace
}  // namespace olmo_fast

using namespace olmo_fast;

extern "C" int64_t olmo_fast_decode_attention_workspace_floats(const olmo_fast_decode_attention_args* args) {
  const olmo_fast_decode_attention_args& a = *args;
  if (empty(a) || !valid(a)) return 0;
  const Plan p = plan_of(a);
  return p.splits > 1 ? a.batch * a.kv_heads * p.rows * p.splits * (a.head_dim + 2) : 0;
}

extern "C" int olmo_fast_decode_attention_gpu(const olmo_fast_decode_attention_args* args, void* stream) {
  const olmo_fast_decode_attention_args a = *args;
  if (!valid(a)) return int(gpuErrorInvalidValue);
  if (empty(a)) return 0;
  const Plan p = plan_of(a);
  if (p.splits > 1 && a.workspace == nullptr) return int(gpuErrorInvalidValue);
  const gpuStream_t stream_ = static_cast<gpuStream_t>(stream);
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = int(16 / sizeof(T));
    // NV: the vectors a lane owns when a warp of 32 spreads the head dim over its lanes (D <= 256: 16-byte
    // vectors, 1 for 16-bit types and at most 2 for fp32; scalars, at most 8)
    const int64_t vecs = operands_vectorizable(a, V) ? a.head_dim / V : 0;
    const auto launch = [&](auto kernel) {
      const int threads = kWarps * OF_WARP_SIZE;
      // sized for warps of 32 (HIP's host pass assumes 64: a wave32 device runs twice the warps)
      const size_t shared = size_t(threads / 32) * size_t(p.rows_per_block) * size_t(a.head_dim + 2) * sizeof(float);
      OF_LAUNCH(grid_for(a.batch * a.kv_heads * p.chunks * p.splits, 1), threads, shared, stream_, kernel)(a,
                                                                                                       p.splits);
    };
    const auto launch_rows = [&](auto rows) {
      constexpr int R = decltype(rows)::value;
      if (vecs == 0) {
        launch(decode_split_kernel<T, R, 1, kMaxHeadDim / 32>);
      } else if constexpr (V == 4) {
        if (vecs > 32) {
          launch(decode_split_kernel<T, R, V, 2>);
        } else {
          launch(decode_split_kernel<T, R, V, 1>);
        }
      } else {
        launch(decode_split_kernel<T, R, V, 1>);
      }
    };
    if (p.rows_per_block == 1) {
      launch_rows(std::integral_constant<int, 1>{});
    } else {
      launch_rows(std::integral_constant<int, kRows>{});
    }
    const int err = last_error();
    if (err != 0 || p.splits == 1) return err;
    const int combine_threads = a.head_dim > 128 ? 256 : a.head_dim > 64 ? 128 : 64;
    OF_LAUNCH(grid_for(a.batch * a.kv_heads * p.rows, 1), combine_threads, 0, stream_, decode_combine_kernel<T>)(
        a, p.splits);
    return last_error();
  });
}
