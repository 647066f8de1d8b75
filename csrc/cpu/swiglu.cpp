// Fused SwiGLU on OLMo's [x | gate] layout on the CPU, forward and backward: one pass over each row, fp32 math
// (the vectorisable exp of numerics.h, so the loops compile to SIMD).
#include "loops.h"

namespace olmo_fast {
namespace cpu {
namespace {

template <class T>
void swiglu_fwd_rows(const olmo_fast_swiglu_fwd_args& a, int64_t row_begin, int64_t row_end) {
  const int64_t n = a.hidden;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const T* x = static_cast<const T*>(a.h) + row * a.h_stride;
    const T* gate = x + n;
    T* out = static_cast<T*>(a.out) + row * n;
    for (int64_t i = 0; i < n; ++i) out[i] = from_float<T>(swiglu(to_float(x[i]), to_float(gate[i])));
  }
}

template <class T>
void swiglu_bwd_rows(const olmo_fast_swiglu_bwd_args& a, int64_t row_begin, int64_t row_end) {
  const int64_t n = a.hidden;
  for (int64_t row = row_begin; row < row_end; ++row) {
    const T* dout = static_cast<const T*>(a.dout) + row * a.dout_stride;
    const T* x = static_cast<const T*>(a.h) + row * a.h_stride;
    const T* gate = x + n;
    T* dx = static_cast<T*>(a.dh) + row * 2 * n;
    T* dgate = dx + n;
    for (int64_t i = 0; i < n; ++i) {
      float gx, gg;
      swiglu_grad(to_float(dout[i]), to_float(x[i]), to_float(gate[i]), &gx, &gg);
      dx[i] = from_float<T>(gx);
      dgate[i] = from_float<T>(gg);
    }
  }
}

}  // namespace
}  // namespace cpu
}  // namespace olmo_fast

using namespace olmo_fast;

extern "C" void olmo_fast_swiglu_fwd_cpu(const olmo_fast_swiglu_fwd_args* args, int64_t row_begin, int64_t row_end) {
  cpu::dispatch_dtype(args->dtype, [&](auto tag) { cpu::swiglu_fwd_rows<decltype(tag)>(*args, row_begin, row_end); });
}

extern "C" void olmo_fast_swiglu_bwd_cpu(const olmo_fast_swiglu_bwd_args* args, int64_t row_begin, int64_t row_end) {
  cpu::dispatch_dtype(args->dtype, [&](auto tag) { cpu::swiglu_bwd_rows<decltype(tag)>(*args, row_begin, row_end); });
}
