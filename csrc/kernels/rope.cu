// Rotary position embedding (fp32 angles) on the GPU, forward and inverse (the backward); NeoX rotate-half
// layout (OLMo's; vectorised) or GPT-J's interleaved pairs (scalar).
//
// A block of (tx, ty, tz) threads handles tz tokens; tx threads cover a head's D/2 rotation pairs in vectors
// (16 bytes of each half when x is contiguous in D and aligned, scalar with any strides otherwise) and compute
// each pair's cos/sin once, ty threads loop over the heads reusing them. The D/2 inverse frequencies are
// computed once per block into shared memory. DRAM bytes: reads and writes B*T*H*D elements each, plus 8 bytes
// per token of positions.
#include "common.cuh"

namespace olmo_fast {
namespace {

template <class T, int V>
__global__ OF_LAUNCH_BOUNDS void rope_kernel(olmo_fast_rope_args a) {
  OF_DYNAMIC_SHARED(float, inv_freq);
  const int64_t half = a.head_dim / 2;
  const int tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  for (int64_t i = tid; i < half; i += blockDim.x * blockDim.y * blockDim.z) {
    inv_freq[i] = rope_inv_freq(i, a.head_dim, a.theta);
  }
  __syncthreads();

  const int64_t* stride = a.x_strides;
  const int64_t tokens = a.batch * a.seq;
  const int64_t pair_step = a.interleaved ? 2 : 1;   // pair p: dims (p, p + D/2), or (2p, 2p + 1) interleaved
  const int64_t second = a.interleaved ? 1 : half;
  for (int64_t token = int64_t(blockIdx.x) * blockDim.z + threadIdx.z; token < tokens;
       token += int64_t(gridDim.x) * blockDim.z) {
    const int64_t b = token / a.seq;
    const int64_t t = token - b * a.seq;
    const int64_t pos = a.positions != nullptr ? a.positions[b * a.positions_batch_stride + t] : a.offset + t;
    const T* x = static_cast<const T*>(a.x) + b * stride[0] + t * stride[1];
    T* out = static_cast<T*>(a.out) + token * a.heads * a.head_dim;
    for (int64_t p = threadIdx.x; p < half / V; p += blockDim.x) {
      float c[V], s[V];
#pragma unroll
      for (int j = 0; j < V; ++j) {
        sincosf(float(pos) * inv_freq[p * V + j], &s[j], &c[j]);
        if (a.inverse) s[j] = -s[j];
      }
      const int64_t d1 = p * V * pair_step;  // the pair's dims: d1 and d1 + second
      for (int64_t head = threadIdx.y; head < a.heads; head += blockDim.y) {
        const T* xh = x + head * stride[2];
        Vec<T, V> lo, hi;
        if constexpr (V > 1) {
          lo = load_vec<T, V>(xh + d1);
          hi = load_vec<T, V>(xh + d1 + second);
        } else {
          lo.v[0] = xh[d1 * stride[3]];
          hi.v[0] = xh[(d1 + second) * stride[3]];
        }
        Vec<T, V> out_lo, out_hi;
#pragma unroll
        for (int j = 0; j < V; ++j) {
          const float x1 = to_float(lo.v[j]);
          const float x2 = to_float(hi.v[j]);
          out_lo.v[j] = from_float<T>(x1 * c[j] - x2 * s[j]);
          out_hi.v[j] = from_float<T>(x2 * c[j] + x1 * s[j]);
        }
        T* oh = out + head * a.head_dim;
        store_vec<T, V>(oh + d1, out_lo);
        store_vec<T, V>(oh + d1 + second, out_hi);
      }
    }
  }
}

}  // namespace
}  // namespace olmo_fast

using namespace olmo_fast;

extern "C" int olmo_fast_rope_gpu(const olmo_fast_rope_args* args, void* stream) {
  const olmo_fast_rope_args a = *args;
  const int64_t tokens = a.batch * a.seq;
  if (tokens == 0 || a.heads == 0 || a.head_dim == 0) return 0;  // an empty x (the CPU loop accepts D = 0 too)
  if (a.head_dim < 0 || a.head_dim % 2 != 0) return int(gpuErrorInvalidValue);
  const int64_t half = a.head_dim / 2;
  return dispatch_dtype(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    constexpr int64_t v = 16 / sizeof(T);
    const bool vec = !a.interleaved && a.x_strides[3] == 1 && a.x_strides[0] % v == 0 && a.x_strides[1] % v == 0 &&
                     a.x_strides[2] % v == 0 && half % v == 0 && aligned16(a.x) && aligned16(a.out);
    return dispatch_vec<T>(vec, [&](auto width) {
      constexpr int V = decltype(width)::value;
      // 128 threads: tx over the pair vectors, ty over heads (about 4 heads per thread), tz over tokens.
      const int tx = next_pow2(half / V) < 128 ? next_pow2(half / V) : 128;
      const int ty_want = next_pow2((a.heads + 3) / 4);
      const int ty = ty_want < 128 / tx ? ty_want : 128 / tx;
      const int tz = 128 / (tx * ty) < 64 ? 128 / (tx * ty) : 64;  // blockDim.z is at most 64 on NVIDIA
      const dim3 block{unsigned(tx), unsigned(ty), unsigned(tz)};
      const size_t smem = size_t(half) * sizeof(float);
      OF_LAUNCH(grid_for(tokens, block.z), block, smem, static_cast<gpuStream_t>(stream), rope_kernel<T, V>)(a);
      return last_error();
    });
  });
}
