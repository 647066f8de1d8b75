// The cross-entropy chunk of the fused linear cross-entropy on the GPU (contract: kernels.h,
// olmo_fast_cross_entropy_chunk_args; olmo_fast/ops/cross_entropy.py runs the matmuls around it). Per row of
// logits z with label y:
//   loss = lse + z_loss * lse^2 - z[y], lse = logsumexp(z)   (0 for ignore_index, NaN for a label outside [0, V);
//   lse is written too, 0 where ignored), and with compute_grad   z <- softmax(z) * (1 + 2 z_loss lse) - onehot(y)
//   in place (0 for an ignored row; z_loss = 0: exactly the plain cross-entropy).
// Row-parallel: one block per row (grid-stride over rows), its threads striding the vocabulary (coalesced), fp32
// math: a max pass and a sum-of-exp pass, each ended by a block all-reduce (warp shuffles, then the per-warp
// partials: any warp size, 32 or 64), then the gradient pass. z[y] is read before the first all-reduce's
// barrier, so no thread has overwritten it yet. Bytes: the logits read twice (the second pass mostly from L2 for
// a row of up to ~100 KB) and written once with the gradient, plus labels and fp32 losses and lse.
#include "common.cuh"

namespace olmo_fast {
namespace {

struct MaxOp {
  OF_DEVICE float operator()(float a, float b) const { return fmaxf(a, b); }
};

struct SumOp {
  OF_DEVICE float operator()(float a, float b) const { return a + b; }
};

template <class T>
__global__ OF_LAUNCH_BOUNDS void cross_entropy_chunk_kernel(olmo_fast_cross_entropy_chunk_args a) {
  const int64_t n = a.vocab;
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    T* z = static_cast<T*>(a.logits) + row * a.logits_stride;
    const int64_t label = a.labels[row];
    if (label == a.ignore_index) {  // uniform across the block: no barrier is skipped by only some threads
      if (threadIdx.x == 0) {
        a.loss[row] = 0.0f;
        a.lse[row] = 0.0f;
      }
      if (a.compute_grad) {
        for (int64_t i = threadIdx.x; i < n; i += blockDim.x) z[i] = from_float<T>(0.0f);
      }
      continue;
    }
    const bool valid = label >= 0 && label < n;
    const float z_label = valid ? to_float(z[label]) : 0.0f;
    float top = -INFINITY;  // fmaxf drops a NaN here; the sum below carries it
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) top = fmaxf(top, to_float(z[i]));
    top = block_allreduce(top, MaxOp{});
    float sum = 0.0f;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) sum += exp_f32(to_float(z[i]) - top);
    const float lse = top + logf(block_allreduce(sum, SumOp{}));
    if (threadIdx.x == 0) {
      a.loss[row] = valid ? lse - z_label + a.z_loss * lse * lse : NAN;
      a.lse[row] = lse;
    }
    if (a.compute_grad) {
      const float p_scale = 1.0f + 2.0f * a.z_loss * lse;  // d(lse + z_loss lse^2)/dz = softmax(z) (1 + 2 z_loss lse)
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
        const float p = exp_f32(to_float(z[i]) - lse) * p_scale;
        z[i] = from_float<T>(i == label ? p - 1.0f : p);
      }
    }
  }
}

}  // namespace
}  // namespace olmo_fast

using namespace olmo_fast;

extern "C" int olmo_fast_cross_entropy_chunk_gpu(const olmo_fast_cross_entropy_chunk_args* args, void* stream) {
  const olmo_fast_cross_entropy_chunk_args a = *args;
  if (a.rows == 0) return 0;
  if (a.rows < 0 || a.vocab < 0) return int(gpuErrorInvalidValue);
  const int threads = a.vocab >= 16384 ? 1024 : 256;  // multiples of both warp sizes
  return dispatch_dtype(a.dtype, [&](auto tag) {
    OF_LAUNCH(grid_for(a.rows, 1), threads, 0, static_cast<gpuStream_t>(stream),
              cross_entropy_chunk_kernel<decltype(tag)>)(a);
    return last_error();
  });
}
