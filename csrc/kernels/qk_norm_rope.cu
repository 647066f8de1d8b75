// OLMo 2's attention prologue on the GPU, forward and backward: split Q | K | V, RMSNorm over all of q (and all of
// k) with its fp32 weight, RoPE (NeoX) with the call's inverse frequencies and attention factor; v copied.
//   forward:  xhat = x * rstd, rstd = 1/sqrt(mean(x^2) + eps);  out = R(pos) (xhat * w)   (fp32 in between)
//   backward: g = R(pos)^T dout;  dx = rstd * (g w - xhat * mean(g w xhat));  dw += g xhat;  dv copied
// One block per token (grid-striding): the norm spans every head of a part, so a part's sum of squares (forward)
// or of g w xhat (backward) is one block all-reduce; each thread then handles rotation pairs (dims i, i + D/2 of
// a head), computing their cos/sin itself. The backward runs `partials` blocks, each adding its tokens' dw terms
// into its own fp32 accumulator row (threads own distinct elements: no atomics; the caller sums the rows).
// DRAM bytes per element (E = element size): forward reads E, writes E (+ 8 B of rstd per token); backward reads
// 2E (gradient and the forward's input), writes E, plus partials x (Hq + Hkv) D x 4 B of weight-gradient rows.
#include "common.cuh"

namespace olmo_fast {
namespace {

struct Sum1 {
  float s;
};

struct AddSum1 {
  OF_DEVICE Sum1 operator()(Sum1 a, Sum1 b) const { return {a.s + b.s}; }
};

// Token `token`'s position.
OF_DEVICE int64_t position_of(const int64_t* positions, int64_t batch_stride, int64_t offset, int64_t seq,
                              int64_t token) {
  const int64_t b = token / seq;
  const int64_t t = token - b * seq;
  return positions != nullptr ? positions[b * batch_stride + t] : offset + t;
}

// cos and sin (times `factor`) of pair i's angle at `pos`.
OF_DEVICE void pair_angle(int64_t pos, const float* inv_freq, int64_t i, float factor, float& c, float& s) {
  sincosf(float(pos) * inv_freq[i], &s, &c);
  c *= factor;
  s *= factor;
}

template <class T>
__global__ OF_LAUNCH_BOUNDS void qk_norm_rope_fwd_kernel(olmo_fast_qk_norm_rope_fwd_args a) {
  const int64_t D = a.head_dim, half = D / 2;
  const int64_t tokens = a.batch * a.seq;
  for (int64_t token = blockIdx.x; token < tokens; token += gridDim.x) {
    const int64_t b = token / a.seq;
    const T* src = static_cast<const T*>(a.qkv) + b * a.qkv_strides[0] + (token - b * a.seq) * a.qkv_strides[1];
    const int64_t pos = position_of(a.positions, a.positions_batch_stride, a.offset, a.seq, token);
    for (int part = 0; part < 2; ++part) {
      const int64_t heads = part == 0 ? a.q_heads : a.kv_heads;
      const float* w = part == 0 ? a.q_weight : a.k_weight;
      T* out = static_cast<T*>(part == 0 ? a.q : a.k) + token * heads * D;
      const int64_t n = heads * D;
      Sum1 sq{0.0f};
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
        const float x = to_float(src[i]);
        sq.s += x * x;
      }
      const float rstd = rsqrtf(block_allreduce(sq, AddSum1()).s / float(n) + a.eps);
      if (threadIdx.x == 0) a.rstd[token * 2 + part] = rstd;
      for (int64_t p = threadIdx.x; p < heads * half; p += blockDim.x) {
        const int64_t i = p % half;
        const int64_t d1 = (p / half) * D + i, d2 = d1 + half;
        float c, s;
        pair_angle(pos, a.inv_freq, i, a.attention_factor, c, s);
        const float y1 = to_float(src[d1]) * rstd * w[d1];
        const float y2 = to_float(src[d2]) * rstd * w[d2];
        out[d1] = from_float<T>(y1 * c - y2 * s);
        out[d2] = from_float<T>(y2 * c + y1 * s);
      }
      src += n;
    }
    T* v = static_cast<T*>(a.v) + token * a.kv_heads * D;
    for (int64_t i = threadIdx.x; i < a.kv_heads * D; i += blockDim.x) v[i] = src[i];
  }
}

template <class T>
__global__ OF_LAUNCH_BOUNDS void qk_norm_rope_bwd_kernel(olmo_fast_qk_norm_rope_bwd_args a) {
  const int64_t D = a.head_dim, half = D / 2;
  const int64_t tokens = a.batch * a.seq;
  const int64_t width = (a.q_heads + 2 * a.kv_heads) * D;
  const int64_t first = blockIdx.x * tokens / a.partials, last = (blockIdx.x + 1) * tokens / a.partials;
  for (int64_t token = first; token < last; ++token) {
    const int64_t b = token / a.seq;
    const int64_t t = token - b * a.seq;
    const T* x = static_cast<const T*>(a.qkv) + b * a.qkv_strides[0] + t * a.qkv_strides[1];
    T* dst = static_cast<T*>(a.dqkv) + token * width;
    const int64_t pos = position_of(a.positions, a.positions_batch_stride, a.offset, a.seq, token);
    for (int part = 0; part < 2; ++part) {
      const int64_t heads = part == 0 ? a.q_heads : a.kv_heads;
      const float* w = part == 0 ? a.q_weight : a.k_weight;
      float* dw = (part == 0 ? a.dq_weight : a.dk_weight) + blockIdx.x * heads * D;
      const int64_t* s = a.grad_strides[part];
      const T* grad = static_cast<const T*>(a.grads[part]) + b * s[0] + t * s[1];
      const float rstd = a.rstd[token * 2 + part];
      // g = R^T dout of pair p (dims d1, d2 of head h): the inverse rotation, times the factor
      const auto unrotate = [&](int64_t p, float& g1, float& g2, int64_t& d1, int64_t& d2) {
        const int64_t h = p / half, i = p % half;
        d1 = h * D + i;
        d2 = d1 + half;
        float c, sn;
        pair_angle(pos, a.inv_freq, i, a.attention_factor, c, sn);
        const float o1 = to_float(grad[h * s[2] + i * s[3]]);
        const float o2 = to_float(grad[h * s[2] + (i + half) * s[3]]);
        g1 = o1 * c + o2 * sn;
        g2 = o2 * c - o1 * sn;
      };
      Sum1 dot{0.0f};
      for (int64_t p = threadIdx.x; p < heads * half; p += blockDim.x) {
        float g1, g2;
        int64_t d1, d2;
        unrotate(p, g1, g2, d1, d2);
        dot.s += g1 * w[d1] * to_float(x[d1]) + g2 * w[d2] * to_float(x[d2]);
      }
      const float mean = block_allreduce(dot, AddSum1()).s * rstd / float(heads * D);
      for (int64_t p = threadIdx.x; p < heads * half; p += blockDim.x) {
        float g1, g2;
        int64_t d1, d2;
        unrotate(p, g1, g2, d1, d2);
        const float xhat1 = to_float(x[d1]) * rstd, xhat2 = to_float(x[d2]) * rstd;
        dst[d1] = from_float<T>(rstd * (g1 * w[d1] - xhat1 * mean));
        dst[d2] = from_float<T>(rstd * (g2 * w[d2] - xhat2 * mean));
        dw[d1] += g1 * xhat1;
        dw[d2] += g2 * xhat2;
      }
      x += heads * D;
      dst += heads * D;
    }
    const int64_t* s = a.grad_strides[2];
    const T* dv = static_cast<const T*>(a.grads[2]) + b * s[0] + t * s[1];
    for (int64_t i = threadIdx.x; i < a.kv_heads * D; i += blockDim.x) dst[i] = dv[(i / D) * s[2] + (i % D) * s[3]];
  }
}

// Threads per token block: enough for the widest part's pairs, a multiple of the warp size, at most 1024.
int token_threads(int64_t pairs) {
  const int t = next_pow2(pairs);
  return t < 64 ? 64 : t;
}

}  // namespace
}  // namespace olmo_fast

using namespace olmo_fast;

extern "C" int olmo_fast_qk_norm_rope_fwd_gpu(const olmo_fast_qk_norm_rope_fwd_args* args, void* stream) {
  const olmo_fast_qk_norm_rope_fwd_args a = *args;
  const int64_t tokens = a.batch * a.seq;
  if (tokens == 0) return 0;
  if (a.head_dim <= 0 || a.head_dim % 2 != 0 || a.q_heads <= 0 || a.kv_heads <= 0) return int(gpuErrorInvalidValue);
  const int64_t heads = a.q_heads > a.kv_heads ? a.q_heads : a.kv_heads;
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    OF_LAUNCH(grid_for(tokens, 1), token_threads(heads * a.head_dim / 2), 0, static_cast<gpuStream_t>(stream),
              qk_norm_rope_fwd_kernel<T>)(a);
    return last_error();
  });
}

extern "C" int olmo_fast_qk_norm_rope_bwd_gpu(const olmo_fast_qk_norm_rope_bwd_args* args, void* stream) {
  const olmo_fast_qk_norm_rope_bwd_args a = *args;
  const int64_t tokens = a.batch * a.seq;
  if (tokens == 0) return 0;
  if (a.head_dim <= 0 || a.head_dim % 2 != 0 || a.q_heads <= 0 || a.kv_heads <= 0 || a.partials <= 0 ||
      a.partials > OF_MAX_BLOCKS) {
    return int(gpuErrorInvalidValue);
  }
  const int64_t heads = a.q_heads > a.kv_heads ? a.q_heads : a.kv_heads;
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    OF_LAUNCH(unsigned(a.partials), token_threads(heads * a.head_dim / 2), 0, static_cast<gpuStream_t>(stream),
              qk_norm_rope_bwd_kernel<T>)(a);
    return last_error();
  });
}
