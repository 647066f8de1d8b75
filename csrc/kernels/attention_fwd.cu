// Training attention forward on the tensor cores (contract: kernels.h, olmo_fast_attention_fwd_args), in
// FlashAttention-2's scheme, through the warp-level interface of mma.cuh (mma.sync on sm_80+, MFMA on gfx90a, SIMT
// FMAs for fp32) and the mask / tile staging of attention_tiles.cuh.
//
// A block owns BM = 16 W queries of one (b, h) (W warps, warp w the 16 rows [16 w, 16 w + 16)); the grid strides
// over (query block, b * heads), the last query blocks first (under a causal mask they see the most keys), the
// query heads of a GQA group side by side (they read the same K and V, from L2). Per block:
//   Q (clamped) -> shared tile [BM][ld]; then for each key block [n0, n0 + BN) that a row of the block sees
//   (blocks no row sees are skipped; a warp whose 16 rows see none of the block skips its products):
//     K, V (clamped, rows past kv_len zero) -> shared tiles [BN][ld]
//     S = Q K^T                        (mma: A(r, k = dim) = Q[r][dim], B(k = dim, n = key) = K[key][dim])
//     x = S * scale * log2(e), -inf where the mask hides the key (edge blocks only)
//     m' = max(m, rowmax x), alpha = 2^(m - m'), P = 2^(x - m'), l = alpha l + rowsum P, O = alpha O
//     P -> the warp's shared tile [16][BN] in the storage type (fp32 for fp32)
//     O += P V                         (mma: A(r, k = key) = P[r][key], B(k = key, n = dim) = V[key][dim])
//   out = O / l (0 for a row that sees no key, l = 0), lse = ln 2 (m + log2 l) (+inf for such a row); O goes
//   through the Q tile (each warp's own rows) so the block writes out's rows coalesced (store_rows).
// Tiles move between global and shared memory in 16-byte vectors where pointers, strides and D allow.
// Softmax statistics and accumulators are fp32; m, l per accumulator row slot, l summed per lane over its own
// columns and reduced over the row's lanes once, at the end. The kernel is instantiated for D <= 64, 128, 256
// (D_max; its O accumulators, D_max / 16 tiles per warp, are registers): shared rows hold D_max + 16 bytes of
// elements (the padding spreads a fragment's rows over the banks), zero past D, and the products loop over the
// ceil(D / 16) dim tiles actually present (odd head dims such as 40, 80, 96 included).
// Tiles: the first of (W, BN) = (4, 64), (4, 32), (4, 16), (2, 16), (1, 16), with K and V in one buffer (V
// staged after S) when two do not fit, whose shared memory fits 48 KiB (no opt-in on any target): bf16/fp16
// W = 4 and BN = 64 (D <= 64), 32 (D <= 128), 16 with one K/V buffer (D <= 256); fp32 BN = 32 (D <= 64), 16 with
// one buffer (D <= 128), and W = 1 for D <= 256.
// Work: 4 B H Tq Tk D FLOPs on the tensor cores (about half under a causal mask with Tq = Tk). DRAM bytes (E the
// element size): Q read and out written once (B Tq H D E each), lse 4 B H Tq; K and V read once per query block
// and query head, 2 B H ceil(Tq / BM) Tk D E, mostly from L2 (the heads of a group and neighbouring blocks share
// them).
#include <type_traits>

#include "attention_tiles.cuh"
#include "mma.cuh"

namespace olmo_fast {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kSharedLimit = 48 * 1024;

struct RowMax {
  OF_DEVICE float operator()(float a, float b) const { return fmaxf(a, b); }
};

struct RowSum {
  OF_DEVICE float operator()(float a, float b) const { return a + b; }
};

// A tile shape: W warps (BM = 16 W queries), BN keys a block, K and V in one shared buffer or two.
struct FwdShape {
  int warps, block_n;
  bool one_kv_buffer;
};

// Padding of a shared-memory row, in elements: 16 bytes, so the 8 rows a fragment load touches start in distinct
// banks (rows of 16 n elements + 16 bytes).
template <class T>
constexpr int kRowPad = int(16 / sizeof(T));

// Shared bytes of a shape whose Q, K, V rows are `ld` elements: Q [BM][ld], K and V [BN][ld] (one buffer or two),
// the warps' P tiles [16][BN + pad].
template <class T>
constexpr int fwd_shared_bytes(FwdShape s, int ld) {
  return int(sizeof(T)) * (16 * s.warps * ld + (s.one_kv_buffer ? 1 : 2) * s.block_n * ld +
                           16 * s.warps * (s.block_n + kRowPad<T>));
}

// The largest shape (most warps, then most keys, then two K/V buffers) that fits kSharedLimit at head dims up to
// kMaxDim.
template <class T, int kMaxDim>
constexpr FwdShape fwd_shape() {
  constexpr FwdShape shapes[] = {{4, 64, false}, {4, 32, false}, {4, 32, true}, {4, 16, false},
                                 {4, 16, true},  {2, 16, true},  {1, 16, true}};
  for (const FwdShape& s : shapes) {
    if (fwd_shared_bytes<T>(s, kMaxDim + kRowPad<T>) <= kSharedLimit) return s;
  }
  return shapes[sizeof(shapes) / sizeof(shapes[0]) - 1];
}

template <class T, int kMaxDim>
struct FwdTiles {
  static constexpr FwdShape kShape = fwd_shape<T, kMaxDim>();
  static constexpr int kWarps = kShape.warps, kBlockM = 16 * kWarps, kBlockN = kShape.block_n;
  static constexpr bool kOneKvBuffer = kShape.one_kv_buffer;
  static constexpr int kThreads = kWarps * OF_WARP_SIZE;
  static constexpr int kDimTiles = kMaxDim / kMmaTile, kKeyTiles = kBlockN / kMmaTile;
  static_assert(fwd_shared_bytes<T>(kShape, kMaxDim + kRowPad<T>) <= kSharedLimit, "no tile shape fits");
};

template <class T, int kMaxDim>
__global__ __launch_bounds__((FwdTiles<T, kMaxDim>::kThreads)) void attention_fwd_kernel(
    olmo_fast_attention_fwd_args a) {
  using Tiles = FwdTiles<T, kMaxDim>;
  constexpr int BM = Tiles::kBlockM, BN = Tiles::kBlockN, kDimTiles = Tiles::kDimTiles;
  constexpr int kKeyTiles = Tiles::kKeyTiles;
  OF_DYNAMIC_SHARED(unsigned char, smem);
  constexpr int ld = kMaxDim + kRowPad<T>, ldp = BN + kRowPad<T>;
  const int dim_tiles = int((a.head_dim + kMmaTile - 1) / kMmaTile);
  T* const q_tile = reinterpret_cast<T*>(smem);
  T* const k_tile = q_tile + BM * ld;
  T* const v_tile = Tiles::kOneKvBuffer ? k_tile : k_tile + BN * ld;
  const int warp = int(threadIdx.x) / OF_WARP_SIZE;
  T* const p_tile = v_tile + BN * ld + warp * kMmaTile * ldp;
  T* const q_warp = q_tile + warp * kMmaTile * ld;  // the warp's 16 query rows (and, at the end, its O rows)

  const AttentionMask mask{a.q_len, a.kv_len, a.window, a.causal != 0};
  const int64_t D = a.head_dim, group = a.heads / a.kv_heads, pairs = a.batch * a.heads;
  const int64_t q_blocks = (a.q_len + BM - 1) / BM;
  const bool clip = a.has_clip != 0;
  const float scale_log2 = a.scale * kLog2e;

  for (int64_t task = blockIdx.x; task < q_blocks * pairs; task += gridDim.x) {
    const int64_t i0 = (q_blocks - 1 - task / pairs) * BM, bh = task % pairs;
    const int64_t b = bh / a.heads, h = bh - b * a.heads, kh = h / group;
    const int64_t rows = a.q_len - i0 < BM ? a.q_len - i0 : BM;
    stage_rows(q_tile, ld, BM, static_cast<const T*>(a.q) + b * a.q_strides[0] + i0 * a.q_strides[1] +
                                   h * a.q_strides[2],
               a.q_strides[1], rows, D, clip, a.clip);
    const T* const k = static_cast<const T*>(a.k) + b * a.k_strides[0] + kh * a.k_strides[2];
    const T* const v = static_cast<const T*>(a.v) + b * a.v_strides[0] + kh * a.v_strides[2];
    __syncthreads();

    // The warp's queries [w0, w1) and the keys they see; the block's key span.
    const int64_t w0 = i0 + warp * kMmaTile, w1 = a.q_len - w0 < kMmaTile ? a.q_len : w0 + kMmaTile;
    const bool warp_has_rows = w0 < a.q_len;
    const int64_t warp_keys_begin = warp_has_rows ? mask.keys_begin(w0) : 0;
    const int64_t warp_keys_end = warp_has_rows ? mask.keys_end(w1) : 0;
    const int64_t keys_end = mask.keys_end(i0 + rows);

    Acc o[kDimTiles];
#pragma unroll
    for (int c = 0; c < kDimTiles; ++c) acc_fill(o[c], 0.0f);
    float m[kRowsPerLane], l[kRowsPerLane];  // running max (log2 domain), this lane's partial sum
#pragma unroll
    for (int s = 0; s < kRowsPerLane; ++s) m[s] = -INFINITY, l[s] = 0.0f;

    for (int64_t n0 = mask.keys_begin(i0) / BN * BN; n0 < keys_end; n0 += BN) {
      const int64_t keys = a.kv_len - n0 < BN ? a.kv_len - n0 : BN;
      stage_rows(k_tile, ld, BN, k + n0 * a.k_strides[1], a.k_strides[1], keys, D, clip, a.clip);
      if constexpr (!Tiles::kOneKvBuffer) {
        stage_rows(v_tile, ld, BN, v + n0 * a.v_strides[1], a.v_strides[1], keys, D, clip, a.clip);
      }
      __syncthreads();
      const bool active = n0 < warp_keys_end && n0 + BN > warp_keys_begin;  // uniform over the warp
      if (active) {
        Acc s[kKeyTiles];
#pragma unroll
        for (int j = 0; j < kKeyTiles; ++j) acc_fill(s[j], 0.0f);
        mma_rows_by_rows<kKeyTiles, kDimTiles>(s, q_warp, ld, k_tile, ld, dim_tiles);  // S = Q K^T
        // Only a block that some row of the warp does not fully see needs the mask.
        const bool edge = !(n0 >= mask.key_begin(w1 - 1) && n0 + BN <= mask.key_end(w0));
        float top[kRowsPerLane];
#pragma unroll
        for (int r = 0; r < kRowsPerLane; ++r) top[r] = -INFINITY;
#pragma unroll
        for (int j = 0; j < kKeyTiles; ++j) {
#pragma unroll
          for (int i = 0; i < kAccPerLane; ++i) {
            float x = s[j].v[i] * scale_log2;
            if (edge && !mask.sees(w0 + acc_row(i), n0 + j * kMmaTile + acc_col(i))) x = -INFINITY;
            s[j].v[i] = x;
            top[acc_row_slot(i)] = fmaxf(top[acc_row_slot(i)], x);
          }
        }
        float alpha[kRowsPerLane], base[kRowsPerLane];
#pragma unroll
        for (int r = 0; r < kRowsPerLane; ++r) {
          const float m_new = fmaxf(m[r], acc_row_reduce(top[r], RowMax{}));
          base[r] = m_new == -INFINITY ? 0.0f : m_new;  // a row that has seen no key yet: P = 2^-inf = 0
          alpha[r] = exp2f(m[r] - base[r]);
          m[r] = m_new;
          l[r] *= alpha[r];
        }
#pragma unroll
        for (int j = 0; j < kKeyTiles; ++j) {
#pragma unroll
          for (int i = 0; i < kAccPerLane; ++i) {
            const float p = exp2f(s[j].v[i] - base[acc_row_slot(i)]);
            l[acc_row_slot(i)] += p;
            p_tile[acc_row(i) * ldp + j * kMmaTile + acc_col(i)] = from_float<T>(p);
          }
        }
#pragma unroll
        for (int c = 0; c < kDimTiles; ++c) {
#pragma unroll
          for (int i = 0; i < kAccPerLane; ++i) o[c].v[i] *= alpha[acc_row_slot(i)];
        }
      }
      __syncthreads();  // P written (and, with one K/V buffer, every warp done with K)
      if constexpr (Tiles::kOneKvBuffer) {
        stage_rows(v_tile, ld, BN, v + n0 * a.v_strides[1], a.v_strides[1], keys, D, clip, a.clip);
        __syncthreads();
      }
      if (active) mma_weights_by_rows<kDimTiles, kKeyTiles>(o, p_tile, ldp, v_tile, ld, dim_tiles);  // O += P V
      __syncthreads();  // K, V and P are overwritten by the next key block
    }

    // Epilogue: l over the row's lanes, O / l into the warp's own Q rows, lse; then the block writes out's rows.
    if (warp_has_rows) {
      float inv[kRowsPerLane];
#pragma unroll
      for (int r = 0; r < kRowsPerLane; ++r) {
        const float total = acc_row_reduce(l[r], RowSum{});
        inv[r] = total == 0.0f ? 0.0f : 1.0f / total;
        const int64_t i = w0 + acc_lane_row(r);
        if (acc_col(0) == 0 && i < a.q_len) {  // one lane of the row's lanes
          a.lse[bh * a.q_len + i] = total == 0.0f ? INFINITY : kLn2 * (m[r] + log2f(total));
        }
      }
#pragma unroll
      for (int c = 0; c < kDimTiles; ++c) {
        if (c < dim_tiles) {
#pragma unroll
          for (int i = 0; i < kAccPerLane; ++i) {
            q_warp[acc_row(i) * ld + c * kMmaTile + acc_col(i)] = from_float<T>(o[c].v[i] * inv[acc_row_slot(i)]);
          }
        }
      }
    }
    __syncthreads();
    store_rows(static_cast<T*>(a.out) + ((b * a.q_len + i0) * a.heads + h) * D, a.heads * D, q_tile, ld, rows, D);
    __syncthreads();  // the next task stages its Q over the tile
  }
}

template <class T, int kMaxDim>
int launch_attention_fwd(const olmo_fast_attention_fwd_args& a, gpuStream_t stream) {
  using Tiles = FwdTiles<T, kMaxDim>;
  constexpr int ld = kMaxDim + kRowPad<T>;
  const int64_t tasks = (a.q_len + Tiles::kBlockM - 1) / Tiles::kBlockM * a.batch * a.heads;
  OF_LAUNCH(grid_for(tasks, 1), Tiles::kThreads, size_t(fwd_shared_bytes<T>(Tiles::kShape, ld)), stream,
            attention_fwd_kernel<T, kMaxDim>)(a);
  return last_error();
}

}  // namespace
}  // namespace olmo_fast

using namespace olmo_fast;

extern "C" int olmo_fast_attention_fwd_gpu(const olmo_fast_attention_fwd_args* args, void* stream) {
  const olmo_fast_attention_fwd_args a = *args;
  if (a.batch < 0 || a.q_len < 0 || a.kv_len < 0 || a.heads < 0 || a.head_dim < 0 || a.head_dim > 256 ||
      a.kv_heads <= 0 || a.heads % a.kv_heads != 0 || a.window < 0 || (a.window > 0 && a.causal == 0)) {
    return int(gpuErrorInvalidValue);
  }
  if (a.batch == 0 || a.q_len == 0 || a.heads == 0 || a.head_dim == 0) return 0;
  const gpuStream_t s = static_cast<gpuStream_t>(stream);
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    if (a.head_dim <= 64) return launch_attention_fwd<T, 64>(a, s);
    if (a.head_dim <= 128) return launch_attention_fwd<T, 128>(a, s);
    return launch_attention_fwd<T, 256>(a, s);
  });
}
