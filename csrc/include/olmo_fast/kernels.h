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

/* out[:, j] = silu(h[:, hidden + j]) * h[:, j] on h = [x | gate] ([rows, 2 * hidden]). */
typedef struct {
  olmo_fast_dtype dtype;
  int64_t rows, hidden;
  const void* h;
  int64_t h_stride;
  void* out; /* [rows, hidden] */
} olmo_fast_swiglu_fwd_args;

/* dh = [dout * silu(gate) | dout * x * silu'(gate)] ([rows, 2 * hidden]), the sigmoid recomputed. */
typedef struct {
  olmo_fast_dtype dtype;
  int64_t rows, hidden;
  const void* dout;
  int64_t dout_stride;
  const void* h;
  int64_t h_stride;
  void* dh; /* [rows, 2 * hidden] */
} olmo_fast_swiglu_bwd_args;

/* NeoX (rotate-half) rotary embedding of x [batch, seq, heads, head_dim] (any strides) into a contiguous out.
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
} olmo_fast_rope_args;

int olmo_fast_layer_norm_fwd_gpu(const olmo_fast_layer_norm_fwd_args* args, void* stream);
int olmo_fast_layer_norm_bwd_gpu(const olmo_fast_layer_norm_bwd_args* args, void* stream);
int olmo_fast_swiglu_fwd_gpu(const olmo_fast_swiglu_fwd_args* args, void* stream);
int olmo_fast_swiglu_bwd_gpu(const olmo_fast_swiglu_bwd_args* args, void* stream);
int olmo_fast_rope_gpu(const olmo_fast_rope_args* args, void* stream);
const char* olmo_fast_gpu_error_string(int error);

void olmo_fast_layer_norm_fwd_cpu(const olmo_fast_layer_norm_fwd_args* args, int64_t row_begin, int64_t row_end);
void olmo_fast_layer_norm_bwd_cpu(const olmo_fast_layer_norm_bwd_args* args, int64_t row_begin, int64_t row_end);
void olmo_fast_swiglu_fwd_cpu(const olmo_fast_swiglu_fwd_args* args, int64_t row_begin, int64_t row_end);
void olmo_fast_swiglu_bwd_cpu(const olmo_fast_swiglu_bwd_args* args, int64_t row_begin, int64_t row_end);
void olmo_fast_rope_cpu(const olmo_fast_rope_args* args, int64_t token_begin, int64_t token_end);

#ifdef __cplusplus
}
#endif

#endif /* OLMO_FAST_KERNELS_H */
