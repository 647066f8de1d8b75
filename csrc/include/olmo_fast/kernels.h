/* The C ABI of olmo-fast's compiled kernels: no torch, no CUDA headers; usable from any C or C++ program.
 *
 * Each op takes one argument struct. Strides are in elements; the last dimension of every 2-D operand is
 * contiguous (stride 1) and its rows may be strided; outputs are contiguous. Math is fp32 whatever the storage.
 *
 * GPU launchers (CUDA or HIP build, libolmo_fast_gpu): enqueue on `stream` (a cudaStream_t / hipStream_t,
 * NULL = the default stream) and return 0 or the runtime's error code (see olmo_fast_gpu_error_string).
 * CPU loops (libolmo_fast_cpu): process rows [row_begin, row_end) on the calling thread; the caller splits
 * rows between threads (the torch binding uses at::parallel_for).
 */
#ifndef OLMO_FAST_KERNELS_H
#define OLMO_FAST_KERNELS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { OLMO_FAST_F32 = 0, OLMO_FAST_F16 = 1, OLMO_FAST_BF16 = 2 } olmo_fast_dtype;

/* y = LN(h) with h = x (+ residual, rounded to the storage dtype and written to `h`); rstd = 1/sqrt(var(h)+eps).
 * Non-parametric: no weight, no bias. `residual` and `h` are both NULL or both set. */
typedef struct {
  olmo_fast_dtype dtype;
  int64_t rows, cols;
  const void* x;
  int64_t x_stride;
  const void* residual;
  int64_t residual_stride;
  void* y;    /* [rows, cols] */
  void* h;    /* [rows, cols] or NULL */
  float* rstd; /* [rows] */
  float eps;
} olmo_fast_layer_norm_fwd_args;

/* dx = rstd * (dy - mean(dy) - y * mean(dy * y)) (+ dh): the backward from the output, not the input. */
typedef struct {
  olmo_fast_dtype dtype;
  int64_t rows, cols;
  const void* dy;
  int64_t dy_stride;
  const void* y;
  int64_t y_stride;
  const float* rstd;
  const void* dh; /* NULL or [rows, cols] */
  int64_t dh_stride;
  void* dx; /* [rows, cols] */
} olmo_fast_layer_norm_bwd_args;

/* out = silu(gate) * up over [rows, hidden]. OLMo's fused projection h = [up | gate] ([rows, 2 * hidden]) is
 * gate = h + hidden, up = h, both with h's row stride. */
typedef struct {
  olmo_fast_dtype dtype;
  int64_t rows, hidden;
  const void* gate;
  int64_t gate_stride;
  const void* up;
  int64_t up_stride;
  void* out;
  int64_t out_stride;
} olmo_fast_silu_mul_fwd_args;

/* d_gate = dout * up * silu'(gate), d_up = dout * silu(gate), in one pass, the sigmoid recomputed. For the
 * fused layout, d_up and d_gate are the two halves of one dh [rows, 2 * hidden]. */
typedef struct {
  olmo_fast_dtype dtype;
  int64_t rows, hidden;
  const void* dout;
  int64_t dout_stride;
  const void* gate;
  int64_t gate_stride;
  const void* up;
  int64_t up_stride;
  void* d_gate;
  int64_t d_gate_stride;
  void* d_up;
  int64_t d_up_stride;
} olmo_fast_silu_mul_bwd_args;

/* Rotary embedding of x [batch, seq, heads, head_dim] (any strides) into a contiguous out. Pair i is dims
 * (i, i + head_dim / 2) in NeoX's rotate-half layout (OLMo's), or (2i, 2i + 1) when interleaved (GPT-J's).
 * Token (b, t) sits at position positions[b * positions_batch_stride + t], or offset + t when positions is NULL
 * (positions_batch_stride 0 shares one [seq] row between sequences). Angles pos * theta^(-2i/D) in fp32;
 * inverse != 0 rotates by the negated angle (the backward). A "row" of the CPU loop is one token b * seq + t. */
typedef struct {
  olmo_fast_dtype dtype;
  int64_t batch, seq, heads, head_dim;
  const void* x;
  int64_t x_strides[4];
  void* out;
  const int64_t* positions;
  int64_t positions_batch_stride;
  int64_t offset;
  float theta;
  int inverse;
  int interleaved;
} olmo_fast_rope_args;

int olmo_fast_layer_norm_fwd_gpu(const olmo_fast_layer_norm_fwd_args* args, void* stream);
int olmo_fast_layer_norm_bwd_gpu(const olmo_fast_layer_norm_bwd_args* args, void* stream);
int olmo_fast_silu_mul_fwd_gpu(const olmo_fast_silu_mul_fwd_args* args, void* stream);
int olmo_fast_silu_mul_bwd_gpu(const olmo_fast_silu_mul_bwd_args* args, void* stream);
int olmo_fast_rope_gpu(const olmo_fast_rope_args* args, void* stream);
const char* olmo_fast_gpu_error_string(int error);

void olmo_fast_layer_norm_fwd_cpu(const olmo_fast_layer_norm_fwd_args* args, int64_t row_begin, int64_t row_end);
void olmo_fast_layer_norm_bwd_cpu(const olmo_fast_layer_norm_bwd_args* args, int64_t row_begin, int64_t row_end);
void olmo_fast_silu_mul_fwd_cpu(const olmo_fast_silu_mul_fwd_args* args, int64_t row_begin, int64_t row_end);
void olmo_fast_silu_mul_bwd_cpu(const olmo_fast_silu_mul_bwd_args* args, int64_t row_begin, int64_t row_end);
void olmo_fast_rope_cpu(const olmo_fast_rope_args* args, int64_t token_begin, int64_t token_end);

#ifdef __cplusplus
}
#endif

#endif /* OLMO_FAST_KERNELS_H */
