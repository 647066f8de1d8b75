// SwiGLU's activation silu(gate) * up on the CPU, forward and backward (OLMo's fused [up | gate] projection is
// the two halves of one row): one pass over each row, fp32 math with the vectorisable exp of numerics.h.
// The element loops carry OLMO_FAST_IVDEP (outputs never overlap inputs): without it GCC guards the
// vectorised loop with an overlap test that the fused layout's adjacent halves fail, and runs it scalar
// (measured: backward 5.7 -> 1.4 ns per element, bf16, 4096 x 2048).
#include "loops.h"

namespace olmo_fast {
namespace cpu {
namespace {

template <class T>
OLMO_FAST_CPU_CLONES void silu_mul_fwd_rows(const olmo_fast_silu_mul_fwd_args& a, int64_t row_begin,
                                            int64_t row_end) {
  const int64_t n = a.hidden;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const T* gate = static_cast<const T*>(a.gate) + row * a.gate_stride;
    const T* up = static_cast<const T*>(a.up) + row * a.up_stride;
    T* out = static_cast<T*>(a.out) + row * a.out_stride;
    OLMO_FAST_IVDEP
    for (int64_t i = 0; i < n; ++i) out[i] = from_float<T>(silu_mul(to_float(gate[i]), to_float(up[i])));
  }
}

template <class T>
OLMO_FAST_CPU_CLONES void silu_mul_bwd_rows(const olmo_fast_silu_mul_bwd_args& a, int64_t row_begin,
                                            int64_t row_end) {
  const int64_t n = a.hidden;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const T* dout = static_cast<const T*>(a.dout) + row * a.dout_stride;
    const T* gate = static_cast<const T*>(a.gate) + row * a.gate_stride;
    const T* up = static_cast<const T*>(a.up) + row * a.up_stride;
    T* d_gate = static_cast<T*>(a.d_gate) + row * a.d_gate_stride;
    T* d_up = static_cast<T*>(a.d_up) + row * a.d_up_stride;
    OLMO_FAST_IVDEP
    for (int64_t i = 0; i < n; ++i) {
      float dg, du;
      silu_mul_grad(to_float(dout[i]), to_float(gate[i]), to_float(up[i]), &dg, &du);
      d_gate[i] = from_float<T>(dg);
      d_up[i] = from_float<T>(du);
    }
  }
}

}  // namespace
}  // namespace cpu
}  // namespace olmo_fast

using namespace olmo_fast;

extern "C" void olmo_fast_silu_mul_fwd_cpu(const olmo_fast_silu_mul_fwd_args* args, int64_t row_begin,
                                           int64_t row_end) {
  cpu::dispatch_dtype(args->dtype, [&](auto tag) { cpu::silu_mul_fwd_rows<decltype(tag)>(*args, row_begin, row_end); });
}

extern "C" void olmo_fast_silu_mul_bwd_cpu(const olmo_fast_silu_mul_bwd_args* args, int64_t row_begin,
                                           int64_t row_end) {
  cpu::dispatch_dtype(args->dtype, [&](auto tag) { cpu::silu_mul_bwd_rows<decltype(tag)>(*args, row_begin, row_end); });
}
