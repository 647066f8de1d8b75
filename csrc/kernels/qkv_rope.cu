// The attention prologue on the GPU, forward and backward (contract: kernels.h, olmo_fast_qkv_rope_*_args):
// clamp -> split Q | K | V -> NeoX RoPE (fp32 angles) in one pass over each token, and its inverse.
//
// A block handles one token at a time (grid-stride over the B*T tokens): its threads first put the token's
// cos/sin of the D/2 angles pos * theta^(-2i/D) in shared memory (the inverse frequencies are computed once per
// block), then cover the token's (q_heads + kv_heads) * D/2 rotation pairs and its kv_heads * D values of V,
// consecutive threads on consecutive elements (coalesced). Forward: each pair (x1, x2) = clamp(qkv[d],
// qkv[d + D/2]) -> (x1 c - x2 s, x2 c + x1 s); v = clamp(qkv). Backward: the pairs of dq, dk (any strides)
// turned back by -angle, dv copied, into the contiguous dqkv row; with a clip, zeroed where the forward's input
// lies outside [-clip, clip] or is NaN (torch.clamp's gradient).
// DRAM bytes per element (E its size): forward reads E and writes E; backward reads E (2E with a clip) and
// writes E; plus 8 bytes of position per token when a table is given.
#include "common.cuh"

namespace olmo_fast {
namespace {

// torch.clamp(x, -c, c) when `on` (NaN stays NaN), else x.
OF_DEVICE float clamp_if(float x, bool on, float c) { return on ? (x < -c ? -c : (x > c ? c : x)) : x; }

// The clamp's gradient mask: passes where -c <= x <= c (not at NaN), always without a clip.
OF_DEVICE bool clamp_passes_if(float x, bool on, float c) { return !on || (x >= -c && x <= c); }

// Shared memory [3][half]: inverse frequencies (set once per block), then this token's cos and sin (sin negated
// for the inverse rotation). Returns after a barrier, so every thread may read them.
OF_DEVICE void token_angles(float* table, int64_t half, int64_t pos, float sign) {
  const int tid = threadIdx.x;
  for (int64_t i = tid; i < half; i += blockDim.x) {
    float s, c;
    sincosf(float(pos) * table[i], &s, &c);
    table[half + i] = c;
    table[2 * half + i] = sign * s;
  }
  __syncthreads();
}

OF_DEVICE int64_t position_of(const int64_t* positions, int64_t batch_stride, int64_t offset, int64_t b, int64_t t) {
  return positions != nullptr ? positions[b * batch_stride + t] : offset + t;
}

template <class T>
__global__ OF_LAUNCH_BOUNDS void qkv_rope_fwd_kernel(olmo_fast_qkv_rope_fwd_args a) {
  OF_DYNAMIC_SHARED(float, table);
  const int64_t D = a.head_dim, half = D / 2, rotated = a.q_heads + a.kv_heads;
  const int64_t pairs = rotated * half, values = a.kv_heads * D;
  const bool clip = a.has_clip != 0;
  for (int64_t i = threadIdx.x; i < half; i += blockDim.x) table[i] = rope_inv_freq(i, D, a.theta);
  __syncthreads();
  for (int64_t token = blockIdx.x; token < a.batch * a.seq; token += gridDim.x) {
    const int64_t b = token / a.seq, t = token - b * a.seq;
    token_angles(table, half, position_of(a.positions, a.positions_batch_stride, a.offset, b, t), 1.0f);
    const T* src = static_cast<const T*>(a.qkv) + b * a.qkv_strides[0] + t * a.qkv_strides[1];
    for (int64_t j = threadIdx.x; j < pairs + values; j += blockDim.x) {
      if (j < pairs) {
        const int64_t head = j / half, i = j - head * half;
        const float x1 = clamp_if(to_float(src[head * D + i]), clip, a.clip);
        const float x2 = clamp_if(to_float(src[head * D + i + half]), clip, a.clip);
        const float c = table[half + i], s = table[2 * half + i];
        T* out = head < a.q_heads ? static_cast<T*>(a.q) + (token * a.q_heads + head) * D
                                  : static_cast<T*>(a.k) + (token * a.kv_heads + head - a.q_heads) * D;
        out[i] = from_float<T>(x1 * c - x2 * s);
        out[i + half] = from_float<T>(x2 * c + x1 * s);
      } else {
        const int64_t e = j - pairs;
        static_cast<T*>(a.v)[token * values + e] = from_float<T>(clamp_if(to_float(src[rotated * D + e]), clip, a.clip));
      }
    }
    __syncthreads();  // the next token's angles overwrite the table
  }
}

template <class T>
__global__ OF_LAUNCH_BOUNDS void qkv_rope_bwd_kernel(olmo_fast_qkv_rope_bwd_args a) {
  OF_DYNAMIC_SHARED(float, table);
  const int64_t D = a.head_dim, half = D / 2, rotated = a.q_heads + a.kv_heads;
  const int64_t pairs = rotated * half, values = a.kv_heads * D, width = (rotated + a.kv_heads) * D;
  const bool clip = a.has_clip != 0;
  for (int64_t i = threadIdx.x; i < half; i += blockDim.x) table[i] = rope_inv_freq(i, D, a.theta);
  __syncthreads();
  for (int64_t token = blockIdx.x; token < a.batch * a.seq; token += gridDim.x) {
    const int64_t b = token / a.seq, t = token - b * a.seq;
    token_angles(table, half, position_of(a.positions, a.positions_batch_stride, a.offset, b, t), -1.0f);
    const T* x = clip ? static_cast<const T*>(a.qkv) + b * a.qkv_strides[0] + t * a.qkv_strides[1] : nullptr;
    T* dst = static_cast<T*>(a.dqkv) + token * width;
    for (int64_t j = threadIdx.x; j < pairs + values; j += blockDim.x) {
      if (j < pairs) {
        const int64_t head = j / half, i = j - head * half;
        const int part = head < a.q_heads ? 0 : 1;
        const int64_t* s = a.grad_strides[part];
        const T* g = static_cast<const T*>(a.grads[part]) + b * s[0] + t * s[1] +
                     (part == 0 ? head : head - a.q_heads) * s[2];
        const float g1 = to_float(g[i * s[3]]), g2 = to_float(g[(i + half) * s[3]]);
        const float c = table[half + i], sn = table[2 * half + i];
        const int64_t d1 = head * D + i, d2 = d1 + half;
        // rounded to the storage dtype first, as the CPU loop stores it before masking
        const T lo = from_float<T>(g1 * c - g2 * sn), hi = from_float<T>(g2 * c + g1 * sn);
        dst[d1] = clamp_passes_if(clip ? to_float(x[d1]) : 0.0f, clip, a.clip) ? lo : from_float<T>(0.0f);
        dst[d2] = clamp_passes_if(clip ? to_float(x[d2]) : 0.0f, clip, a.clip) ? hi : from_float<T>(0.0f);
      } else {
        const int64_t e = j - pairs, h = e / D, d = e - h * D;
        const int64_t* s = a.grad_strides[2];
        const T gv = static_cast<const T*>(a.grads[2])[b * s[0] + t * s[1] + h * s[2] + d * s[3]];
        const int64_t col = rotated * D + e;
        dst[col] = clamp_passes_if(clip ? to_float(x[col]) : 0.0f, clip, a.clip) ? gv : from_float<T>(0.0f);
      }
    }
    __syncthreads();
  }
}

// Threads per block: enough for a token's pairs and values (a multiple of the warp size), at most 256.
inline int threads_for(int64_t work) {
  const int n = next_pow2(work);
  return n < 64 ? 64 : (n > 256 ? 256 : n);
}

}  // namespace
}  // namespace olmo_fast

using namespace olmo_fast;

extern "C" int olmo_fast_qkv_rope_fwd_gpu(const olmo_fast_qkv_rope_fwd_args* args, void* stream) {
  const olmo_fast_qkv_rope_fwd_args a = *args;
  const int64_t tokens = a.batch * a.seq;
  if (tokens == 0 || a.head_dim == 0) return 0;
  if (a.head_dim < 0 || a.head_dim % 2 != 0 || a.q_heads <= 0 || a.kv_heads <= 0) return int(gpuErrorInvalidValue);
  const int threads = threads_for((a.q_heads + a.kv_heads) * (a.head_dim / 2) + a.kv_heads * a.head_dim);
  const size_t smem = size_t(3 * (a.head_dim / 2)) * sizeof(float);
  return dispatch_dtype(a.dtype, [&](auto tag) {
    OF_LAUNCH(grid_for(tokens, 1), threads, smem, static_cast<gpuStream_t>(stream),
              qkv_rope_fwd_kernel<decltype(tag)>)(a);
    return last_error();
  });
}

extern "C" int olmo_fast_qkv_rope_bwd_gpu(const olmo_fast_qkv_rope_bwd_args* args, void* stream) {
  const olmo_fast_qkv_rope_bwd_args a = *args;
  const int64_t tokens = a.batch * a.seq;
  if (tokens == 0 || a.head_dim == 0) return 0;
  if (a.head_dim < 0 || a.head_dim % 2 != 0 || a.q_heads <= 0 || a.kv_heads <= 0 ||
      (a.has_clip != 0 && a.qkv == nullptr)) {
    return int(gpuErrorInvalidValue);
  }
  const int threads = threads_for((a.q_heads + a.kv_heads) * (a.head_dim / 2) + a.kv_heads * a.head_dim);
  const size_t smem = size_t(3 * (a.head_dim / 2)) * sizeof(float);
  return dispatch_dtype(a.dtype, [&](auto tag) {
    OF_LAUNCH(grid_for(tokens, 1), threads, smem, static_cast<gpuStream_t>(stream),
              qkv_rope_bwd_kernel<decltype(tag)>)(a);
    return last_error();
  });
}
