// The training attention's backward on tensor cores (contract: kernels.h, olmo_fast_attention_bwd_args):
// FlashAttention-2's math in three deterministic launches, no atomics.
//
// With c() the clamp to [-clip, clip] (applied as tiles are staged), S = scale c(Q) c(K)^T, P = exp(S - lse) (lse
// the forward's natural log-sum-exp of S; +inf for a row without keys gives P = 0), per (b, query head h):
//   1. preprocess:  delta_i = sum_d dO_id O_id                       (fp32, into the caller's float workspace)
//   2. dK/dV:       dP = dO c(V)^T,  dS = P (dP - delta),  dV = P^T dO,  dK = scale dS^T c(Q)
//      a block per (key block, b, kv head); each warp owns 16 keys and accumulates their dK, dV (fp32 registers)
//      over every query head of the kv head's group (GQA: K/V are never repeated) and every query block of the
//      band that sees the key block (AttentionMask::queries_begin/end): S^T = c(K) c(Q)^T, P^T, dP^T = c(V) dO^T,
//      dS^T = P^T (dP^T - delta); dV += P^T dO and dK += dS^T c(Q) take P^T and dS^T from a per-warp shared tile
//      rounded to the storage type (the tensor cores' operand type).
//   3. dQ:          a block per (query block, b, head); each warp owns 16 queries: over the key blocks the rows see
//      (AttentionMask::keys_begin/end): S = c(Q) c(K)^T, P, dP = dO c(V)^T, dS, dQ += dS c(K).
// Epilogues multiply dK, dQ by scale, zero the elements whose raw input lies outside [-clip, clip] or is NaN
// (torch.clamp's gradient), and store contiguous [B, T, heads, D] in the storage type.
// Products run on mma.cuh (mma.sync on sm_80+, MFMA on gfx90a, SIMT FMAs for fp32 inputs), fp32 accumulation;
// head_dim is padded to kD in {32, 64, 96, 128, 192, 256} (zero columns; k-steps past head_dim are skipped).
//
// Tiles (BwdTiling): a block of `warps` warps owns 16 * warps rows (keys in 2., queries in 3.) and streams tiles of
// `other` rows of the other side; the shapes are picked per (dtype, kD) so that shared memory stays <= 48 KiB:
// own tiles [2][own][kD + pad] (K and V, or Q and dO), other tiles [2][other][kD + pad], the per-warp P/dS tile
// [own][other + pad] and lse/delta of the other rows. Where even one warp's tiles do not fit (fp32 with
// kD >= 192), `stream` keeps one tile of each side and restages them in turn (2.: K, V and Q, dO, Q per step;
// 3.: Q, dO and K, V, K per step).
// Memory traffic (E bytes per element, G = heads / kv_heads): 1. reads 2 B H Tq D E; 2. reads K, V once and, per
// key block, the G heads' Q, dO of its query band (G Tq D E each, times kv_len / own for dense masks) and writes
// dK, dV; 3. reads Q, dO once and, per query block, K, V of its key span (Tk D E times q_len / own), writes dQ.
// Work: 2. 8 P FLOPs and 3. 6 P FLOPs, P = B H Tq Tk D (halved by a causal mask at Tq = Tk): S and dP are
// computed twice, once per launch, which is what keeps the two accumulations free of atomics.
#include "attention_tiles.cuh"
#include "mma.cuh"

namespace olmo_fast {
namespace {

constexpr size_t kMaxShared = 48 * 1024;

struct BwdShape {
  int warps, other;
  bool stream;
};

// The block shape of both launches for storage type T and padded head dim kD: the first of the candidates whose
// shared memory fits in kMaxShared (more warps first: they hide latency; then longer streamed tiles).
template <class T, int kD>
struct BwdTiling {
  static constexpr int kPad = 16 / int(sizeof(T));  // 16 bytes: rows start on different banks
  static constexpr int kLd = kD + kPad;

  static constexpr size_t bytes(BwdShape s) {
    const int tiles = s.stream ? 1 : 2;
    return size_t(tiles * (16 * s.warps + s.other) * kLd + 16 * s.warps * (s.other + kPad)) * sizeof(T) +
           size_t(2 * s.other) * sizeof(float);
  }
  static constexpr BwdShape pick() {
    const BwdShape candidates[] = {{4, 64, false}, {4, 32, false}, {4, 16, false}, {2, 32, false},
                                   {2, 16, false}, {1, 16, false}, {2, 16, true},  {1, 16, true}};
    for (const BwdShape& s : candidates) {
      if (bytes(s) <= kMaxShared) return s;
    }
    return candidates[7];
  }

  static constexpr BwdShape kShape = pick();
  static constexpr int kWarps = kShape.warps;
  static constexpr int kThreads = kWarps * OF_WARP_SIZE;  // the launch bounds: the register budget follows
  static constexpr int kOwn = 16 * kWarps;      // rows the warps own (16 each)
  static constexpr int kOther = kShape.other;   // rows of a streamed tile
  static constexpr bool kStream = kShape.stream;
  static constexpr int kLdp = kOther + kPad;    // the P / dS tile's row stride
  static constexpr size_t kBytes = bytes(kShape);
  static_assert(kBytes <= kMaxShared, "no backward tiling fits in 48 KiB of shared memory");
  static_assert(kD % kMmaTile == 0 && kOther % kMmaTile == 0, "tiles are whole 16 x 16 steps");
};

// The block's shared memory, carved from the launch's dynamic buffer.
template <class T, int kD>
struct BwdSmem {
  using Tiling = BwdTiling<T, kD>;
  T* own[2];    // K, V (dK/dV) or Q, dO (dQ): [own][kLd]; one buffer when streaming
  T* other[2];  // Q, dO (dK/dV) or K, V (dQ): [other][kLd]
  T* ps;        // P or dS of each warp's rows: [own][kLdp]
  float* lse;   // [other] (dK/dV only)
  float* delta;

  OF_DEVICE explicit BwdSmem(unsigned char* base) {
    constexpr int own_size = Tiling::kOwn * Tiling::kLd, other_size = Tiling::kOther * Tiling::kLd;
    T* p = reinterpret_cast<T*>(base);
    own[0] = p;
    own[1] = Tiling::kStream ? p : p + own_size;
    p += (Tiling::kStream ? 1 : 2) * own_size;
    other[0] = p;
    other[1] = Tiling::kStream ? p : p + other_size;
    p += (Tiling::kStream ? 1 : 2) * other_size;
    ps = p;
    lse = reinterpret_cast<float*>(ps + Tiling::kOwn * Tiling::kLdp);
    delta = lse + Tiling::kOther;
  }
};

// The warp's accumulators (16 rows by kTiles * 16 columns) into its rows of a shared tile, rounded to T.
template <int kTiles, class T>
OF_DEVICE void store_acc(T* tile, int ld, const Acc (&c)[kTiles]) {
#pragma unroll
  for (int nt = 0; nt < kTiles; ++nt) {
#pragma unroll
    for (int i = 0; i < kAccPerLane; ++i) {
      tile[acc_row(i) * ld + nt * kMmaTile + acc_col(i)] = from_float<T>(c[nt].v[i]);
    }
  }
}

// An epilogue: the warp's 16 rows (first row `row0`, `rows` valid in all) by head_dim columns of scale * c into
// dst (row stride dst_stride), zero where the raw input x (row stride x_stride) fails the clamp's gradient.
template <int kTiles, class T>
OF_DEVICE void store_grad(T* dst, int64_t dst_stride, const T* x, int64_t x_stride, int64_t row0, int64_t rows,
                          int64_t head_dim, const Acc (&c)[kTiles], float scale, bool has_clip, float clip) {
#pragma unroll
  for (int nt = 0; nt < kTiles; ++nt) {
#pragma unroll
    for (int i = 0; i < kAccPerLane; ++i) {
      const int64_t r = row0 + acc_row(i), d = nt * kMmaTile + acc_col(i);
      if (r >= rows || d >= head_dim) continue;
      bool passes = true;
      if (has_clip) {
        const float raw = to_float(x[r * x_stride + d]);
        passes = raw >= -clip && raw <= clip;  // false at NaN
      }
      dst[r * dst_stride + d] = from_float<T>(passes ? scale * c[nt].v[i] : 0.0f);
    }
  }
}

template <class T>
OF_DEVICE const T* head_rows(const void* base, const int64_t (&s)[3], int64_t b, int64_t t0, int64_t h) {
  return static_cast<const T*>(base) + b * s[0] + t0 * s[1] + h * s[2];
}

OF_DEVICE AttentionMask mask_of(const olmo_fast_attention_bwd_args& a) {
  return AttentionMask{a.q_len, a.kv_len, a.window, a.causal != 0};
}

// 1. delta[(b * heads + h) * q_len + i] = dO_i . O_i, a warp per row (lanes stride the head dim).
template <class T>
__global__ OF_LAUNCH_BOUNDS void attention_bwd_delta_kernel(const olmo_fast_attention_bwd_args a) {
  const int64_t rows = a.batch * a.heads * a.q_len;
  const int warps = blockDim.x / OF_WARP_SIZE, lane = threadIdx.x % OF_WARP_SIZE;
  for (int64_t row = int64_t(blockIdx.x) * warps + threadIdx.x / OF_WARP_SIZE; row < rows;
       row += int64_t(gridDim.x) * warps) {
    const int64_t bh = row / a.q_len, i = row - bh * a.q_len, b = bh / a.heads, h = bh - b * a.heads;
    const T* dout = head_rows<T>(a.dout, a.dout_strides, b, i, h);
    const T* out = head_rows<T>(a.out, a.out_strides, b, i, h);
    float sum = 0.0f;
    for (int64_t d = lane; d < a.head_dim; d += OF_WARP_SIZE) sum += to_float(dout[d]) * to_float(out[d]);
#pragma unroll
    for (int mask = OF_WARP_SIZE / 2; mask > 0; mask /= 2) sum += shfl_xor(sum, mask);
    if (lane == 0) a.workspace[row] = sum;
  }
}

// 2. dK, dV of key block blockIdx.x of (b, kv head) = blockIdx.y.
template <class T, int kD>
__global__ __launch_bounds__((BwdTiling<T, kD>::kThreads)) void attention_bwd_dkdv_kernel(
    const olmo_fast_attention_bwd_args a) {
  using Tiling = BwdTiling<T, kD>;
  constexpr int kOwn = Tiling::kOwn, kOther = Tiling::kOther, kLd = Tiling::kLd, kLdp = Tiling::kLdp;
  constexpr int kDimTiles = kD / kMmaTile, kOtherTiles = kOther / kMmaTile;
  OF_DYNAMIC_SHARED(unsigned char, smem_bytes);
  const BwdSmem<T, kD> sm(smem_bytes);
  const int warp = threadIdx.x / OF_WARP_SIZE;
  const int64_t b = blockIdx.y / a.kv_heads, kh = blockIdx.y - b * a.kv_heads, group = a.heads / a.kv_heads;
  const int64_t j0 = int64_t(blockIdx.x) * kOwn, keys = a.kv_len - j0 < kOwn ? a.kv_len - j0 : kOwn;
  const int dim_tiles = int((a.head_dim + kMmaTile - 1) / kMmaTile);
  const bool clip = a.has_clip != 0;
  const AttentionMask mask = mask_of(a);
  const int64_t q_lo = mask.queries_begin(j0), q_hi = mask.queries_end(j0 + keys);
  const T* k = head_rows<T>(a.k, a.k_strides, b, j0, kh);
  const T* v = head_rows<T>(a.v, a.v_strides, b, j0, kh);
  const auto stage_keys = [&](T* tile, const T* src, int64_t stride) {
    stage_rows(tile, kLd, kOwn, src, stride, keys, a.head_dim, clip, a.clip);
  };
  if (!Tiling::kStream) {
    stage_keys(sm.own[0], k, a.k_strides[1]);
    stage_keys(sm.own[1], v, a.v_strides[1]);
  }
  Acc dk[kDimTiles], dv[kDimTiles];
#pragma unroll
  for (int t = 0; t < kDimTiles; ++t) acc_fill(dk[t], 0.0f), acc_fill(dv[t], 0.0f);
  const T* own_k = sm.own[0] + warp * kMmaTile * kLd;
  const T* own_v = sm.own[1] + warp * kMmaTile * kLd;
  T* own_ps = sm.ps + warp * kMmaTile * kLdp;
  for (int64_t g = 0; g < group; ++g) {
    const int64_t h = kh * group + g;
    for (int64_t i0 = q_lo; i0 < q_hi; i0 += kOther) {
      const int64_t queries = a.q_len - i0 < kOther ? a.q_len - i0 : kOther;
      const T* q = head_rows<T>(a.q, a.q_strides, b, i0, h);
      const T* dout = head_rows<T>(a.dout, a.dout_strides, b, i0, h);
      __syncthreads();  // the previous step's readers are done
      stage_rows(sm.other[0], kLd, kOther, q, a.q_strides[1], queries, a.head_dim, clip, a.clip);
      if (!Tiling::kStream) {
        stage_rows(sm.other[1], kLd, kOther, dout, a.dout_strides[1], queries, a.head_dim, false, 0.0f);
      }
      if (Tiling::kStream) stage_keys(sm.own[0], k, a.k_strides[1]);
      for (int e = threadIdx.x; e < kOther; e += blockDim.x) {
        const int64_t row = (b * a.heads + h) * a.q_len + i0 + e;
        sm.lse[e] = e < queries ? a.lse[row] : INFINITY;
        sm.delta[e] = e < queries ? a.workspace[row] : 0.0f;
      }
      __syncthreads();
      Acc p[kOtherTiles], dp[kOtherTiles];
#pragma unroll
      for (int t = 0; t < kOtherTiles; ++t) acc_fill(p[t], 0.0f), acc_fill(dp[t], 0.0f);
      mma_rows_by_rows<kOtherTiles, kDimTiles>(p, own_k, kLd, sm.other[0], kLd, dim_tiles);  // S^T = K Q^T
#pragma unroll
      for (int t = 0; t < kOtherTiles; ++t) {
#pragma unroll
        for (int i = 0; i < kAccPerLane; ++i) {
          const int c = t * kMmaTile + acc_col(i);
          const int64_t key = j0 + warp * kMmaTile + acc_row(i), query = i0 + c;
          const bool seen = c < queries && key < a.kv_len && mask.sees(query, key);
          p[t].v[i] = seen ? exp_f32(a.scale * p[t].v[i] - sm.lse[c]) : 0.0f;
        }
      }
      if (Tiling::kStream) {
        __syncthreads();  // K and Q read
        stage_keys(sm.own[1], v, a.v_strides[1]);
        stage_rows(sm.other[1], kLd, kOther, dout, a.dout_strides[1], queries, a.head_dim, false, 0.0f);
        __syncthreads();
      }
      mma_rows_by_rows<kOtherTiles, kDimTiles>(dp, own_v, kLd, sm.other[1], kLd, dim_tiles);  // dP^T = V dO^T
      store_acc(own_ps, kLdp, p);
#pragma unroll
      for (int t = 0; t < kOtherTiles; ++t) {
#pragma unroll
        for (int i = 0; i < kAccPerLane; ++i) {
          dp[t].v[i] = p[t].v[i] * (dp[t].v[i] - sm.delta[t * kMmaTile + acc_col(i)]);
        }
      }
      __syncthreads();  // P^T stored
      mma_weights_by_rows<kDimTiles, kOtherTiles>(dv, own_ps, kLdp, sm.other[1], kLd, dim_tiles);  // dV += P^T dO
      __syncthreads();  // P^T (and, streaming, dO) read
      store_acc(own_ps, kLdp, dp);
      if (Tiling::kStream) stage_rows(sm.other[0], kLd, kOther, q, a.q_strides[1], queries, a.head_dim, clip, a.clip);
      __syncthreads();  // dS^T stored
      mma_weights_by_rows<kDimTiles, kOtherTiles>(dk, own_ps, kLdp, sm.other[0], kLd, dim_tiles);  // dK += dS^T Q
    }
  }
  const int64_t out_stride = a.kv_heads * a.head_dim, first = (b * a.kv_len + j0) * out_stride + kh * a.head_dim;
  const int64_t row0 = warp * kMmaTile;
  store_grad(static_cast<T*>(a.dk) + first, out_stride, k, a.k_strides[1], row0, keys, a.head_dim, dk, a.scale,
             clip, a.clip);
  store_grad(static_cast<T*>(a.dv) + first, out_stride, v, a.v_strides[1], row0, keys, a.head_dim, dv, 1.0f, clip,
             a.clip);
}

// 3. dQ of query block blockIdx.x of (b, head) = blockIdx.y.
template <class T, int kD>
__global__ __launch_bounds__((BwdTiling<T, kD>::kThreads)) void attention_bwd_dq_kernel(
    const olmo_fast_attention_bwd_args a) {
  using Tiling = BwdTiling<T, kD>;
  constexpr int kOwn = Tiling::kOwn, kOther = Tiling::kOther, kLd = Tiling::kLd, kLdp = Tiling::kLdp;
  constexpr int kDimTiles = kD / kMmaTile, kOtherTiles = kOther / kMmaTile;
  OF_DYNAMIC_SHARED(unsigned char, smem_bytes);
  const BwdSmem<T, kD> sm(smem_bytes);
  const int warp = threadIdx.x / OF_WARP_SIZE;
  const int64_t b = blockIdx.y / a.heads, h = blockIdx.y - b * a.heads, kh = h / (a.heads / a.kv_heads);
  const int64_t i0 = int64_t(blockIdx.x) * kOwn, queries = a.q_len - i0 < kOwn ? a.q_len - i0 : kOwn;
  const int dim_tiles = int((a.head_dim + kMmaTile - 1) / kMmaTile);
  const bool clip = a.has_clip != 0;
  const AttentionMask mask = mask_of(a);
  const int64_t k_lo = mask.keys_begin(i0), k_hi = mask.keys_end(i0 + queries);
  const T* q = head_rows<T>(a.q, a.q_strides, b, i0, h);
  const T* dout = head_rows<T>(a.dout, a.dout_strides, b, i0, h);
  const auto stage_queries = [&](T* tile, const T* src, int64_t stride, bool clamp) {
    stage_rows(tile, kLd, kOwn, src, stride, queries, a.head_dim, clamp, a.clip);
  };
  if (!Tiling::kStream) {
    stage_queries(sm.own[0], q, a.q_strides[1], clip);
    stage_queries(sm.own[1], dout, a.dout_strides[1], false);
  }
  float lse[kRowsPerLane], delta[kRowsPerLane];
#pragma unroll
  for (int s = 0; s < kRowsPerLane; ++s) {
    const int64_t r = warp * kMmaTile + acc_lane_row(s), row = (b * a.heads + h) * a.q_len + i0 + r;
    lse[s] = r < queries ? a.lse[row] : INFINITY;
    delta[s] = r < queries ? a.workspace[row] : 0.0f;
  }
  Acc dq[kDimTiles];
#pragma unroll
  for (int t = 0; t < kDimTiles; ++t) acc_fill(dq[t], 0.0f);
  const T* own_q = sm.own[0] + warp * kMmaTile * kLd;
  const T* own_do = sm.own[1] + warp * kMmaTile * kLd;
  T* own_ds = sm.ps + warp * kMmaTile * kLdp;
  const T* k = head_rows<T>(a.k, a.k_strides, b, 0, kh);
  const T* v = head_rows<T>(a.v, a.v_strides, b, 0, kh);
  for (int64_t j0 = k_lo; j0 < k_hi; j0 += kOther) {
    const int64_t keys = a.kv_len - j0 < kOther ? a.kv_len - j0 : kOther;
    const T* kb = k + j0 * a.k_strides[1];
    const auto stage_keys = [&](T* tile, const T* src, int64_t stride) {
      stage_rows(tile, kLd, kOther, src, stride, keys, a.head_dim, clip, a.clip);
    };
    __syncthreads();  // the previous step's readers are done
    stage_keys(sm.other[0], kb, a.k_strides[1]);
    if (!Tiling::kStream) stage_keys(sm.other[1], v + j0 * a.v_strides[1], a.v_strides[1]);
    if (Tiling::kStream) stage_queries(sm.own[0], q, a.q_strides[1], clip);
    __syncthreads();
    Acc p[kOtherTiles], dp[kOtherTiles];
#pragma unroll
    for (int t = 0; t < kOtherTiles; ++t) acc_fill(p[t], 0.0f), acc_fill(dp[t], 0.0f);
    mma_rows_by_rows<kOtherTiles, kDimTiles>(p, own_q, kLd, sm.other[0], kLd, dim_tiles);  // S = Q K^T
#pragma unroll
    for (int t = 0; t < kOtherTiles; ++t) {
#pragma unroll
      for (int i = 0; i < kAccPerLane; ++i) {
        const int c = t * kMmaTile + acc_col(i);
        const int64_t r = warp * kMmaTile + acc_row(i), key = j0 + c;
        const bool seen = c < keys && r < queries && mask.sees(i0 + r, key);
        p[t].v[i] = seen ? exp_f32(a.scale * p[t].v[i] - lse[acc_row_slot(i)]) : 0.0f;
      }
    }
    if (Tiling::kStream) {
      __syncthreads();  // K and Q read
      stage_keys(sm.other[1], v + j0 * a.v_strides[1], a.v_strides[1]);
      stage_queries(sm.own[1], dout, a.dout_strides[1], false);
      __syncthreads();
    }
    mma_rows_by_rows<kOtherTiles, kDimTiles>(dp, own_do, kLd, sm.other[1], kLd, dim_tiles);  // dP = dO V^T
#pragma unroll
    for (int t = 0; t < kOtherTiles; ++t) {
#pragma unroll
      for (int i = 0; i < kAccPerLane; ++i) dp[t].v[i] = p[t].v[i] * (dp[t].v[i] - delta[acc_row_slot(i)]);
    }
    store_acc(own_ds, kLdp, dp);
    if (Tiling::kStream) {
      __syncthreads();  // V read
      stage_keys(sm.other[0], kb, a.k_strides[1]);
    }
    __syncthreads();  // dS stored
    mma_weights_by_rows<kDimTiles, kOtherTiles>(dq, own_ds, kLdp, sm.other[0], kLd, dim_tiles);  // dQ += dS K
  }
  const int64_t out_stride = a.heads * a.head_dim, first = (b * a.q_len + i0) * out_stride + h * a.head_dim;
  store_grad(static_cast<T*>(a.dq) + first, out_stride, q, a.q_strides[1], warp * kMmaTile, queries, a.head_dim, dq,
             a.scale, clip, a.clip);
}

// f(std::integral_constant<int, kD>{}) for the padded head dim of `head_dim` (1 .. 256), else an error.
template <class F>
int dispatch_head_dim(int64_t head_dim, F&& f) {
  if (head_dim <= 32) return f(std::integral_constant<int, 32>{});
  if (head_dim <= 64) return f(std::integral_constant<int, 64>{});
  if (head_dim <= 96) return f(std::integral_constant<int, 96>{});
  if (head_dim <= 128) return f(std::integral_constant<int, 128>{});
  if (head_dim <= 192) return f(std::integral_constant<int, 192>{});
  if (head_dim <= 256) return f(std::integral_constant<int, 256>{});
  return int(gpuErrorInvalidValue);
}

constexpr int64_t kMaxGridY = 65535;

}  // namespace
}  // namespace olmo_fast

using namespace olmo_fast;

extern "C" int64_t olmo_fast_attention_bwd_workspace_floats(const olmo_fast_attention_bwd_args* args) {
  return args->batch * args->heads * args->q_len;
}

extern "C" int olmo_fast_attention_bwd_gpu(const olmo_fast_attention_bwd_args* args, void* stream) {
  const olmo_fast_attention_bwd_args a = *args;
  if (a.batch < 0 || a.q_len < 0 || a.kv_len < 0 || a.heads <= 0 || a.kv_heads <= 0 || a.heads % a.kv_heads != 0 ||
      a.head_dim < 0 || a.head_dim > 256 || a.batch * a.heads > kMaxGridY) {
    return int(gpuErrorInvalidValue);
  }
  if (a.batch == 0 || a.head_dim == 0 || (a.q_len == 0 && a.kv_len == 0)) return 0;
  if (a.q_len > 0 && a.workspace == nullptr) return int(gpuErrorInvalidValue);
  const gpuStream_t s = static_cast<gpuStream_t>(stream);
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    return dispatch_head_dim(a.head_dim, [&](auto dim) {
      using Tiling = BwdTiling<T, decltype(dim)::value>;
      constexpr int threads = Tiling::kThreads;
      if (a.q_len > 0) {
        constexpr int kDeltaWarps = 256 / OF_WARP_SIZE;
        OF_LAUNCH(grid_for(a.batch * a.heads * a.q_len, kDeltaWarps), kDeltaWarps * OF_WARP_SIZE, 0, s,
                  attention_bwd_delta_kernel<T>)(a);
        if (const int err = last_error()) return err;
      }
      if (a.kv_len > 0) {
        const dim3 grid(unsigned((a.kv_len + Tiling::kOwn - 1) / Tiling::kOwn), unsigned(a.batch * a.kv_heads));
        OF_LAUNCH(grid, threads, Tiling::kBytes, s, attention_bwd_dkdv_kernel<T, decltype(dim)::value>)(a);
        if (const int err = last_error()) return err;
      }
      if (a.q_len > 0) {
        const dim3 grid(unsigned((a.q_len + Tiling::kOwn - 1) / Tiling::kOwn), unsigned(a.batch * a.heads));
        OF_LAUNCH(grid, threads, Tiling::kBytes, s, attention_bwd_dq_kernel<T, decltype(dim)::value>)(a);
        if (const int err = last_error()) return err;
      }
      return 0;
    });
  });
}
