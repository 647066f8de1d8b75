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

/* Row normalisation, forward: h = x (+ residual, rounded to the storage dtype and written to `h`),
 * y = (h - mean) * rstd (* weight) (+ bias), rstd = 1/sqrt(var(h) + eps); RMSNorm (rms != 0): mean = 0 and
 * var = mean(h^2). OLMo's LayerNorm is the non-parametric case (no weight, no bias, rms = 0). `residual` and `h`
 * are both NULL or both set; `mean` ([rows] fp32) is written when not NULL.
 * add_after != 0 (OLMo 2's post-norm): h = x, and y = residual + (the normalised row rounded to the storage
 * dtype); `h` is NULL. */
typedef struct {
  olmo_fast_dtype dtype;
  int64_t rows, cols;
  const void* x;
  int64_t x_stride;
  const void* residual;
  int64_t residual_stride;
  const void* weight; /* [cols] or NULL */
  const void* bias;   /* [cols] or NULL */
  void* y;            /* [rows, cols] */
  void* h;            /* [rows, cols] or NULL */
  float* mean;        /* [rows] or NULL */
  float* rstd;        /* [rows] */
  float eps;
  int rms;
  int add_after;
} olmo_fast_norm_fwd_args;

/* Backward: g = dy (* weight), xhat = the saved output y (no weight/bias: the input is not kept), or
 * (h - mean) * rstd recomputed from the saved input h (from_input != 0; mean = 0 for RMSNorm);
 * dx = rstd * (g - xhat * mean(g * xhat) - mean(g)) (+ dh), without the mean(g) term for RMSNorm.
 * dweight += dy * xhat and dbias += dy summed over rows into fp32 accumulators: `partials` zeroed rows of
 * [cols] each, summed by the caller (GPU: block b adds into row b; CPU: the caller names the row). */
typedef struct {
  olmo_fast_dtype dtype;
  int64_t rows, cols;
  const void* dy;
  int64_t dy_stride;
  const void* saved; /* y, or h when from_input */
  int64_t saved_stride;
  const void* weight; /* [cols] or NULL */
  const float* mean;  /* [rows] when from_input and not rms, else NULL */
  const float* rstd;  /* [rows] */
  const void* dh;     /* [rows, cols] or NULL */
  int64_t dh_stride;
  void* dx;       /* [rows, cols] */
  float* dweight; /* [partials, cols] or NULL */
  float* dbias;   /* [partials, cols] or NULL */
  int64_t partials;
  int from_input;
  int rms;
} olmo_fast_norm_bwd_args;

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

/* The attention prologue (OLMo's): qkv [batch, seq, (q_heads + 2 kv_heads) * head_dim] (last dim contiguous, token
 * rows strided) -> clamp to [-clip, clip] (has_clip != 0; `clip` is the bound rounded to the storage dtype, as
 * torch.clamp compares; NaN stays NaN) -> split Q | K | V -> NeoX RoPE (olmo_fast_rope_args' angles and
 * positions) on q and k -> contiguous q [batch, seq, q_heads, head_dim], k, v [batch, seq, kv_heads, head_dim].
 * A "row" of the CPU loop is one token. */
typedef struct {
  olmo_fast_dtype dtype;
  int64_t batch, seq, q_heads, kv_heads, head_dim;
  const void* qkv;
  int64_t qkv_strides[2]; /* batch, token */
  void* q;
  void* k;
  void* v;
  const int64_t* positions;
  int64_t positions_batch_stride;
  int64_t offset;
  float theta;
  float clip;
  int has_clip;
} olmo_fast_qkv_rope_fwd_args;

/* Its backward: dq, dk, dv (any strides [batch, seq, head, dim]) rotated back (dv as is) into a contiguous
 * dqkv [batch, seq, (q_heads + 2 kv_heads) * head_dim], zeroed where the forward's clamp blocked the gradient
 * (has_clip: qkv outside [-clip, clip], or NaN; `qkv` is the forward's input, read only then). */
typedef struct {
  olmo_fast_dtype dtype;
  int64_t batch, seq, q_heads, kv_heads, head_dim;
  const void* grads[3]; /* dq, dk, dv */
  int64_t grad_strides[3][4];
  const void* qkv; /* NULL without clip */
  int64_t qkv_strides[2];
  void* dqkv;
  const int64_t* positions;
  int64_t positions_batch_stride;
  int64_t offset;
  float theta;
  float clip;
  int has_clip;
} olmo_fast_qkv_rope_bwd_args;

/* OLMo 2's attention prologue: per token (b, t) of qkv [batch, seq, (q_heads + 2 kv_heads) * head_dim] (strides
 * below, last dim contiguous): q = RMSNorm over all q_heads * head_dim values (fp32 statistics, times q_weight in
 * fp32; rstd[token * 2] = its 1/sqrt(mean(q^2) + eps)), likewise k with k_weight (rstd[token * 2 + 1]), then RoPE
 * (NeoX) on q and k at the token's position with the inverse frequencies `inv_freq` [head_dim / 2], cos and sin
 * times `attention_factor`; v copied -> contiguous q [batch, seq, q_heads, head_dim], k, v [.., kv_heads, ..].
 * Weights are fp32. A "row" of the CPU loop is one token. */
typedef struct {
  olmo_fast_dtype dtype;
  int64_t batch, seq, q_heads, kv_heads, head_dim;
  const void* qkv;
  int64_t qkv_strides[2]; /* batch, token */
  const float* q_weight;  /* [q_heads * head_dim] */
  const float* k_weight;  /* [kv_heads * head_dim] */
  void* q;
  void* k;
  void* v;
  float* rstd; /* [batch * seq, 2] */
  const int64_t* positions;
  int64_t positions_batch_stride;
  int64_t offset;
  const float* inv_freq;
  float attention_factor;
  float eps;
} olmo_fast_qk_norm_rope_fwd_args;

/* Its backward: dq, dk (any strides [batch, seq, head, dim]) rotated back, through the RMSNorm (with the forward's
 * qkv and rstd), dv as is, into a contiguous dqkv [batch, seq, (q_heads + 2 kv_heads) * head_dim]; the weight
 * gradients sum(g * xhat) over the tokens are added into fp32 accumulator rows of dq_weight
 * [partials, q_heads * head_dim] and dk_weight [partials, kv_heads * head_dim] (zeroed by the caller, who sums the
 * rows): the CPU loop adds into row `partial`, the GPU launcher runs `partials` blocks, block p taking tokens
 * [p * tokens / partials, (p + 1) * tokens / partials). */
typedef struct {
  olmo_fast_dtype dtype;
  int64_t batch, seq, q_heads, kv_heads, head_dim;
  const void* grads[3]; /* dq, dk, dv */
  int64_t grad_strides[3][4];
  const void* qkv;
  int64_t qkv_strides[2];
  const float* q_weight;
  const float* k_weight;
  const float* rstd;
  void* dqkv;
  float* dq_weight;
  float* dk_weight;
  int64_t partials;
  const int64_t* positions;
  int64_t positions_batch_stride;
  int64_t offset;
  const float* inv_freq;
  float attention_factor;
} olmo_fast_qk_norm_rope_bwd_args;

/* The cross-entropy chunk of the fused linear cross-entropy: for each row i of logits [rows, vocab] (row stride
 * `logits_stride`, last dim contiguous) with label y_i and lse_i = logsumexp(z_i): loss[i] = lse_i - z_i[y_i] +
 * z_loss * lse_i^2 (fp32), 0 where y_i == ignore_index, NaN for a label outside [0, vocab); lse[i] = lse_i (0 where
 * ignored). With compute_grad the row is overwritten in place by softmax(z_i) * (1 + 2 z_loss lse_i) - onehot(y_i)
 * (0 for an ignored row). */
typedef struct {
  olmo_fast_dtype dtype;
  int64_t rows, vocab;
  void* logits;
  int64_t logits_stride;
  const int64_t* labels; /* [rows] */
  float* loss;           /* [rows] */
  float* lse;            /* [rows] */
  int64_t ignore_index;
  int compute_grad;
  float z_loss;
} olmo_fast_cross_entropy_chunk_args;

/* Decoding attention: q [batch, q_len, heads, head_dim] over caches k, v [batch, slots, kv_heads, head_dim] (strides
 * of the first three dims given, head_dim contiguous) where sequence b holds seqlens[b] valid keys, the q_len new
 * ones last: query i of b, at position p = seqlens[b] - q_len + i, sees keys 0 .. p, with window > 0 only keys
 * p - window + 1 .. p (slots past seqlens[b] are never read; a query that sees no key gets 0). Query head h
 * reads kv head h / (heads / kv_heads). Out [batch, q_len, heads, head_dim] contiguous, softmax(scale q k^T) v in
 * fp32. A "row" of the CPU loop is one (b, kv head) pair.
 * The GPU launcher (head_dim <= 256) splits the cache into spans whose partial results it merges through `workspace`:
 * olmo_fast_decode_attention_workspace_floats(args) fp32 values on the device (NULL when that is 0); how many spans
 * depends on `multiprocessors` (olmo_fast_gpu_multiprocessors()). The CPU loop ignores both. */
typedef struct {
  olmo_fast_dtype dtype;
  int64_t batch, q_len, heads, kv_heads, head_dim, slots;
  const void* q;
  int64_t q_strides[3];
  const void* k;
  int64_t k_strides[3];
  const void* v;
  int64_t v_strides[3];
  const int64_t* seqlens; /* [batch] */
  void* out;
  float scale;
  int64_t window;   /* sliding window in keys; 0 = unlimited */
  float* workspace;        /* GPU only: see above */
  int64_t multiprocessors; /* GPU only: the device's SMs (AMD: CUs), > 0 */
} olmo_fast_decode_attention_args;

/* Training attention (flash style), per batch b and query head h (kv head h / (heads / kv_heads), never
 * repeated): O = softmax(scale c(Q) c(K)^T + mask) c(V), c = clamp to [-clip, clip] when has_clip (the bound rounded
 * to the storage dtype; applied as tiles are loaded). q [batch, q_len, heads, head_dim], k, v [batch, kv_len,
 * kv_heads, head_dim]: strides of the first three dims given, head_dim contiguous. Causal masks align bottom-right
 * (query i sees keys j <= i + kv_len - q_len), with window > 0 (causal only) also j > i + kv_len - q_len - window;
 * a query that sees no key gets 0. fp32 softmax and accumulation.
 * Forward writes out (contiguous, q's shape) and lse [batch, heads, q_len] fp32: the natural log-sum-exp of the
 * scaled scores, +inf for a row without keys; it only travels to this backend's backward. A "row" of the forward's
 * CPU loop is a block of OLMO_FAST_ATTENTION_CPU_QUERIES queries of one (b, h):
 * row = (b * heads + h) * ceil(q_len / OLMO_FAST_ATTENTION_CPU_QUERIES) + block. */
#define OLMO_FAST_ATTENTION_CPU_QUERIES 64
typedef struct {
  olmo_fast_dtype dtype;
  int64_t batch, q_len, kv_len, heads, kv_heads, head_dim;
  const void* q;
  int64_t q_strides[3];
  const void* k;
  int64_t k_strides[3];
  const void* v;
  int64_t v_strides[3];
  void* out;
  float* lse;
  float scale;
  float clip;
  int has_clip;
  int causal;
  int64_t window; /* sliding window in keys; 0 = unlimited */
} olmo_fast_attention_fwd_args;

/* Backward: dq, dk, dv (contiguous, the inputs' shapes) from dout and the forward's out and lse, the clamp's
 * gradient applied (0 where the raw input lies outside [-clip, clip] or is NaN). A "row" of the CPU loop is one
 * (b, kv head) pair: it owns dk, dv of that head and dq of its group of query heads (no atomics), holding fp32
 * copies of its group's q, dout and dq ([heads / kv_heads * q_len, head_dim] each); it ignores `workspace`.
 * The GPU launcher needs head_dim <= 256 and a float workspace of olmo_fast_attention_bwd_workspace_floats(args)
 * elements on the device (dout . out per query row; no zeroing needed). */
typedef struct {
  olmo_fast_dtype dtype;
  int64_t batch, q_len, kv_len, heads, kv_heads, head_dim;
  const void* dout;
  int64_t dout_strides[3];
  const void* q;
  int64_t q_strides[3];
  const void* k;
  int64_t k_strides[3];
  const void* v;
  int64_t v_strides[3];
  const void* out;
  int64_t out_strides[3];
  const float* lse;
  void* dq;
  void* dk;
  void* dv;
  float scale;
  float clip;
  int has_clip;
  int causal;
  int64_t window;   /* as the forward's */
  float* workspace; /* GPU only: [olmo_fast_attention_bwd_workspace_floats(args)] */
} olmo_fast_attention_bwd_args;

int olmo_fast_norm_fwd_gpu(const olmo_fast_norm_fwd_args* args, void* stream);
int olmo_fast_norm_bwd_gpu(const olmo_fast_norm_bwd_args* args, void* stream); /* grid: `partials` blocks */
int olmo_fast_silu_mul_fwd_gpu(const olmo_fast_silu_mul_fwd_args* args, void* stream);
int olmo_fast_silu_mul_bwd_gpu(const olmo_fast_silu_mul_bwd_args* args, void* stream);
int olmo_fast_rope_gpu(const olmo_fast_rope_args* args, void* stream);
int olmo_fast_qk_norm_rope_fwd_gpu(const olmo_fast_qk_norm_rope_fwd_args* args, void* stream);
int olmo_fast_qk_norm_rope_bwd_gpu(const olmo_fast_qk_norm_rope_bwd_args* args, void* stream); /* `partials` blocks */
int olmo_fast_qkv_rope_fwd_gpu(const olmo_fast_qkv_rope_fwd_args* args, void* stream);
int olmo_fast_qkv_rope_bwd_gpu(const olmo_fast_qkv_rope_bwd_args* args, void* stream);
int olmo_fast_cross_entropy_chunk_gpu(const olmo_fast_cross_entropy_chunk_args* args, void* stream);
int olmo_fast_attention_fwd_gpu(const olmo_fast_attention_fwd_args* args, void* stream);
int olmo_fast_decode_attention_gpu(const olmo_fast_decode_attention_args* args, void* stream);
/* the fp32 workspace the GPU launcher needs for `args` (its shapes, window and head_dim; no pointer is read) */
int64_t olmo_fast_decode_attention_workspace_floats(const olmo_fast_decode_attention_args* args);
int olmo_fast_attention_bwd_gpu(const olmo_fast_attention_bwd_args* args, void* stream); /* needs `workspace` */
/* floats of the backward's GPU workspace: batch * heads * q_len */
int64_t olmo_fast_attention_bwd_workspace_floats(const olmo_fast_attention_bwd_args* args);
const char* olmo_fast_gpu_error_string(int error);
/* the current device's multiprocessors (SMs; on AMD, CUs), or 0 if the runtime cannot tell */
int olmo_fast_gpu_multiprocessors(void);

void olmo_fast_norm_fwd_cpu(const olmo_fast_norm_fwd_args* args, int64_t row_begin, int64_t row_end);
/* adds the rows' dweight/dbias terms into accumulator row `partial` */
void olmo_fast_norm_bwd_cpu(const olmo_fast_norm_bwd_args* args, int64_t row_begin, int64_t row_end, int64_t partial);
void olmo_fast_silu_mul_fwd_cpu(const olmo_fast_silu_mul_fwd_args* args, int64_t row_begin, int64_t row_end);
void olmo_fast_silu_mul_bwd_cpu(const olmo_fast_silu_mul_bwd_args* args, int64_t row_begin, int64_t row_end);
void olmo_fast_rope_cpu(const olmo_fast_rope_args* args, int64_t token_begin, int64_t token_end);
void olmo_fast_qkv_rope_fwd_cpu(const olmo_fast_qkv_rope_fwd_args* args, int64_t token_begin, int64_t token_end);
void olmo_fast_qkv_rope_bwd_cpu(const olmo_fast_qkv_rope_bwd_args* args, int64_t token_begin, int64_t token_end);
void olmo_fast_qk_norm_rope_fwd_cpu(const olmo_fast_qk_norm_rope_fwd_args* args, int64_t token_begin,
                                    int64_t token_end);
/* adds the tokens' weight-gradient terms into accumulator row `partial` */
void olmo_fast_qk_norm_rope_bwd_cpu(const olmo_fast_qk_norm_rope_bwd_args* args, int64_t token_begin,
                                    int64_t token_end, int64_t partial);
void olmo_fast_attention_fwd_cpu(const olmo_fast_attention_fwd_args* args, int64_t row_begin, int64_t row_end);
void olmo_fast_attention_bwd_cpu(const olmo_fast_attention_bwd_args* args, int64_t pair_begin, int64_t pair_end);
void olmo_fast_decode_attention_cpu(const olmo_fast_decode_attention_args* args, int64_t pair_begin,
                                    int64_t pair_end);
void olmo_fast_cross_entropy_chunk_cpu(const olmo_fast_cross_entropy_chunk_args* args, int64_t row_begin,
                                       int64_t row_end);

#ifdef __cplusplus
}
#endif

#endif /* OLMO_FAST_KERNELS_H */
