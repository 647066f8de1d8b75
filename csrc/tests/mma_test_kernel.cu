// A test kernel of csrc/kernels/mma.cuh, built only into the emulated library (tests/test_gpu_emulation_mma.py)
// and by the GPU compile checks: C = A B for A [M, K] and B [K, N] given in either orientation (a_trans: A held as
// [K, M]; b_trans: B held as [N, K]), M, N, K multiples of 16, one block whose warps take the 16 x 16 output tiles
// in turn. The operands are staged in shared memory in their storage type and read by load_a / load_b with the
// strides of their orientation; C (fp32) is stored through acc_row / acc_col. Every lane checks its row slots:
// acc_row(i) == acc_lane_row(acc_row_slot(i)), and acc_row_reduce sums each output row into row_sums [M].
#include "../kernels/mma.cuh"

namespace olmo_fast {
namespace {

struct SumOp {
  OF_DEVICE float operator()(float a, float b) const { return a + b; }
};

template <class T>
__global__ OF_LAUNCH_BOUNDS void mma_test_kernel(int M, int N, int K, const T* a, const T* b, int a_trans,
                                                 int b_trans, float* c, float* row_sums) {
  OF_DYNAMIC_SHARED(unsigned char, smem_bytes);
  T* sa = reinterpret_cast<T*>(smem_bytes);
  T* sb = sa + M * K;
  for (int i = threadIdx.x; i < M * K; i += blockDim.x) sa[i] = a[i];
  for (int i = threadIdx.x; i < K * N; i += blockDim.x) sb[i] = b[i];
  __syncthreads();
  const int warp = threadIdx.x / OF_WARP_SIZE, warps = blockDim.x / OF_WARP_SIZE;
  const int a_rs = a_trans ? 1 : K, a_cs = a_trans ? M : 1;  // A(r, k)
  const int b_ks = b_trans ? 1 : N, b_ns = b_trans ? K : 1;  // B(k, n)
  for (int tile = warp; tile < (M / kMmaTile) * (N / kMmaTile); tile += warps) {
    const int m0 = tile / (N / kMmaTile) * kMmaTile, n0 = tile % (N / kMmaTile) * kMmaTile;
    Acc acc;
    acc_fill(acc, 0.0f);
    for (int k0 = 0; k0 < K; k0 += kMmaTile) {
      OperandA<T> fa;
      OperandB<T> fb;
      load_a(fa, sa + m0 * a_rs + k0 * a_cs, a_rs, a_cs);
      load_b(fb, sb + k0 * b_ks + n0 * b_ns, b_ks, b_ns);
      mma(acc, fa, fb);
    }
    float partial[kRowsPerLane] = {};
    for (int i = 0; i < kAccPerLane; ++i) {
      const bool slot_ok = acc_row(i) == acc_lane_row(acc_row_slot(i));
      c[(m0 + acc_row(i)) * N + n0 + acc_col(i)] = slot_ok ? acc.v[i] : NAN;
      partial[acc_row_slot(i)] += acc.v[i];
    }
    for (int s = 0; s < kRowsPerLane; ++s) {
      const float total = acc_row_reduce(partial[s], SumOp{});
      if (n0 == 0) row_sums[m0 + acc_lane_row(s)] = total;  // the row's sum over columns 0-15
    }
  }
}

}  // namespace
}  // namespace olmo_fast

using namespace olmo_fast;

extern "C" int olmo_fast_mma_test_gpu(olmo_fast_dtype dtype, int M, int N, int K, const void* a, const void* b,
                                      int a_trans, int b_trans, float* c, float* row_sums, int threads) {
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    OF_LAUNCH(1, threads, size_t(M * K + K * N) * sizeof(T), nullptr, mma_test_kernel<T>)
    (M, N, K, static_cast<const T*>(a), static_cast<const T*>(b), a_trans, b_trans, c, row_sums);
    return last_error();
  });
}
