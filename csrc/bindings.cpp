// The torch binding of olmo-fast's kernels, the only translation unit that includes torch headers.
//
// TORCH_LIBRARY(olmo_fast_C) ops (torch.ops.olmo_fast_C.*) that check their inputs, allocate contiguous outputs
// and call the C ABI of csrc/include/olmo_fast/kernels.h: the CPU loops split over threads with
// at::parallel_for, or (built with OLMO_FAST_WITH_GPU) the CUDA/HIP launchers on the current stream.
// Importing the module olmo_fast._C registers the ops.
#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/add.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/scalar_tensor.h>
#include <ATen/ops/zeros.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <atomic>
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

#include "olmo_fast/kernels.h"

namespace {

using at::Tensor;

olmo_fast_dtype kernel_dtype(const Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return OLMO_FAST_F32;
    case at::kHalf: return OLMO_FAST_F16;
    case at::kBFloat16: return OLMO_FAST_BF16;
    default:
      TORCH_CHECK(false, "olmo_fast_C::", op, ": ", name, " must be float32, float16 or bfloat16, got ",
                  t.scalar_type());
  }
}

// A 2-D operand whose last dimension is contiguous (rows may be strided): copied only when it is not.
Tensor rows_of(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.dim() == 2, "olmo_fast_C::", op, ": ", name, " must be 2-D [N, C], got shape ", t.sizes());
  return t.size(1) <= 1 || t.stride(1) == 1 ? t : t.contiguous();
}

void check_like(const Tensor& t, const Tensor& ref, at::IntArrayRef sizes, const char* op, const char* name,
                const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), "olmo_fast_C::", op, ": ", name, " is on ", t.device(), " but ", ref_name,
              " is on ", ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), "olmo_fast_C::", op, ": ", name, " has dtype ",
              t.scalar_type(), " but ", ref_name, " has ", ref.scalar_type());
  TORCH_CHECK(t.sizes() == sizes, "olmo_fast_C::", op, ": ", name, " must have shape ", sizes, ", got ", t.sizes());
}

// Test hook (olmo_fast_C::poison_outputs): outputs start as NaN, so an element a kernel never writes shows.
std::atomic<bool> poison{false};

Tensor output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  Tensor t = at::empty(sizes, options);
  if (poison.load(std::memory_order_relaxed)) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

void poison_outputs(bool on) { poison.store(on); }

// The CPU loop `cpu` over [0, rows), split between threads in chunks of about 32K elements.
template <class Args>
void run_cpu(const Args& args, int64_t rows, int64_t row_elements, void (*cpu)(const Args*, int64_t, int64_t)) {
  if (rows == 0) return;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(1, row_elements));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) { cpu(&args, begin, end); });
}

// Runs the GPU launcher `gpu` on `args` on the current stream of `like`'s device.
template <class Args>
void run_gpu(const char* op, const Tensor& like, const Args& args, int (*gpu)(const Args*, void*)) {
#ifdef OLMO_FAST_WITH_GPU
  const c10::DeviceGuard guard(like.device());
  const c10::impl::VirtualGuardImpl impl(like.device().type());
  const int err = gpu(&args, impl.getStream(like.device()).native_handle());
  TORCH_CHECK(err == 0, "olmo_fast_C::", op, ": kernel launch failed: ", olmo_fast_gpu_error_string(err));
#else
  (void)args;
  (void)gpu;
  TORCH_CHECK(false, "olmo_fast_C::", op, ": this build of olmo_fast._C has no GPU kernels (input on ",
              like.device(), ")");
#endif
}

// Runs `args` on the device of `like`: the CPU loops (run_cpu), or the GPU launcher on the current stream.
template <class Args>
void run(const char* op, const Tensor& like, const Args& args, int64_t rows, int64_t row_elements,
         void (*cpu)(const Args*, int64_t, int64_t), int (*gpu)(const Args*, void*)) {
  if (rows == 0) return;
  if (like.is_cpu()) {
    run_cpu(args, rows, row_elements, cpu);
  } else {
    run_gpu(op, like, args, gpu);
  }
}

// A backward whose weight gradients accumulate into `args.partials` fp32 rows (a fixed number per row count, so
// the result does not depend on threads): on the CPU, partial p's rows [p * rows / partials, (p + 1) * rows /
// partials) on one thread; on the GPU, the launcher's `partials` blocks split the rows the same way.
template <class Args>
void run_partials(const char* op, const Tensor& like, const Args& args, int64_t rows,
                  void (*cpu)(const Args*, int64_t, int64_t, int64_t), int (*gpu)(const Args*, void*)) {
  if (rows == 0) return;
  if (!like.is_cpu()) {
    run_gpu(op, like, args, gpu);
    return;
  }
  const int64_t parts = args.partials;
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) cpu(&args, p * rows / parts, (p + 1) * rows / parts, p);
  });
}

// Accumulator rows for a backward's weight gradients over `rows` rows.
int64_t partials_for(int64_t rows, const Tensor& like) {
  return std::min<int64_t>(std::max<int64_t>(rows, 1), like.is_cpu() ? 32 : 256);
}

// A [cols] weight or bias: same dtype and device as x, contiguous.
Tensor affine_of(const std::optional<Tensor>& t, const Tensor& x, const char* op, const char* name) {
  if (!t.has_value()) return Tensor();
  check_like(*t, x, {x.size(1)}, op, name, "x");
  return t->contiguous();
}

const void* ptr_or_null(const Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

// The norm forward; with add_after (OLMo 2's post-norm) y = residual + norm(x) and no h.
std::tuple<Tensor, std::optional<Tensor>, std::optional<Tensor>, Tensor> norm_fwd_impl(
    const char* op, const Tensor& x_in, const std::optional<Tensor>& residual_in, const std::optional<Tensor>& weight_in,
    const std::optional<Tensor>& bias_in, double eps, bool rms, bool add_after) {
  const Tensor x = rows_of(x_in, op, "x");
  const int64_t rows = x.size(0), cols = x.size(1);
  TORCH_CHECK(cols > 0, "olmo_fast_C::", op, ": rows must not be empty, got shape ", x.sizes());
  olmo_fast_norm_fwd_args args{};
  args.dtype = kernel_dtype(x, op, "x");
  args.rows = rows;
  args.cols = cols;
  args.x = x.data_ptr();
  args.x_stride = x.stride(0);
  args.eps = float(eps);
  args.rms = rms ? 1 : 0;
  args.add_after = add_after ? 1 : 0;
  const Tensor weight = affine_of(weight_in, x, op, "weight"), bias = affine_of(bias_in, x, op, "bias");
  args.weight = ptr_or_null(weight);
  args.bias = ptr_or_null(bias);
  Tensor residual, h, mean;
  if (residual_in.has_value()) {
    residual = rows_of(*residual_in, op, "residual");
    check_like(residual, x, x.sizes(), op, "residual", "x");
    args.residual = residual.data_ptr();
    args.residual_stride = residual.stride(0);
    if (!add_after) {
      h = output({rows, cols}, x.options());
      args.h = h.data_ptr();
    }
  }
  Tensor y = output({rows, cols}, x.options());
  Tensor rstd = output({rows}, x.options().dtype(at::kFloat));
  if (!rms && (weight.defined() || bias.defined())) {  // what the backward recomputes xhat from
    mean = output({rows}, x.options().dtype(at::kFloat));
    args.mean = mean.data_ptr<float>();
  }
  args.y = y.data_ptr();
  args.rstd = rstd.data_ptr<float>();
  run(op, x, args, rows, cols, olmo_fast_norm_fwd_cpu, olmo_fast_norm_fwd_gpu);
  return {y, h.defined() ? std::optional<Tensor>(h) : std::nullopt,
          mean.defined() ? std::optional<Tensor>(mean) : std::nullopt, rstd};
}

std::tuple<Tensor, std::optional<Tensor>, std::optional<Tensor>, Tensor> norm_fwd(
    const Tensor& x, const std::optional<Tensor>& residual, const std::optional<Tensor>& weight,
    const std::optional<Tensor>& bias, double eps, bool rms) {
  return norm_fwd_impl("norm_fwd", x, residual, weight, bias, eps, rms, false);
}

// The CPU backward over rows without weight/bias accumulators.
constexpr auto norm_bwd_rows = [](const olmo_fast_norm_bwd_args* a, int64_t begin, int64_t end) {
  olmo_fast_norm_bwd_cpu(a, begin, end, 0);
};

// The norm backward; xhat from the saved input (from_input) or the saved output.
std::tuple<Tensor, std::optional<Tensor>, std::optional<Tensor>> norm_bwd_impl(
    const char* op, const Tensor& dy_in, const Tensor& saved_in, const std::optional<Tensor>& weight_in,
    const std::optional<Tensor>& mean_in, const Tensor& rstd_in, const std::optional<Tensor>& dh_in, bool has_bias,
    bool rms, bool from_input) {
  const Tensor dy = rows_of(dy_in, op, "dy");
  const Tensor saved = rows_of(saved_in, op, "saved");
  const int64_t rows = dy.size(0), cols = dy.size(1);
  TORCH_CHECK(cols > 0, "olmo_fast_C::", op, ": rows must not be empty, got shape ", dy.sizes());
  check_like(saved, dy, dy.sizes(), op, "saved", "dy");
  const auto stats = [&](const Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.device() == dy.device() && t.dim() == 1 && t.size(0) == rows,
                "olmo_fast_C::", op, ": ", name, " must be float32 [", rows, "] on ", dy.device(), ", got ",
                t.scalar_type(), " ", t.sizes(), " on ", t.device());
    return t.contiguous();
  };
  const Tensor rstd = stats(rstd_in, "rstd");
  const Tensor weight = affine_of(weight_in, dy, op, "weight");
  TORCH_CHECK(mean_in.has_value() == (from_input && !rms), "olmo_fast_C::", op, ": the mean is needed exactly for ",
              "LayerNorm with a weight or bias (saved = its input)");
  const Tensor mean = mean_in.has_value() ? stats(*mean_in, "mean") : Tensor();
  olmo_fast_norm_bwd_args args{};
  args.dtype = kernel_dtype(dy, op, "dy");
  args.rows = rows;
  args.cols = cols;
  args.dy = dy.data_ptr();
  args.dy_stride = dy.stride(0);
  args.saved = saved.data_ptr();
  args.saved_stride = saved.stride(0);
  args.weight = ptr_or_null(weight);
  args.mean = mean.defined() ? mean.data_ptr<float>() : nullptr;
  args.rstd = rstd.data_ptr<float>();
  args.from_input = from_input ? 1 : 0;
  args.rms = rms ? 1 : 0;
  Tensor dh;
  if (dh_in.has_value()) {
    dh = rows_of(*dh_in, op, "dh");
    check_like(dh, dy, dy.sizes(), op, "dh", "dy");
    args.dh = dh.data_ptr();
    args.dh_stride = dh.stride(0);
  }
  Tensor dx = output({rows, cols}, dy.options());
  args.dx = dx.data_ptr();
  if (!weight.defined() && !has_bias) {
    run(op, dy, args, rows, cols, +norm_bwd_rows, olmo_fast_norm_bwd_gpu);
    return {dx, std::nullopt, std::nullopt};
  }
  args.partials = partials_for(rows, dy);
  const at::TensorOptions fp32 = dy.options().dtype(at::kFloat);
  Tensor dw_part = weight.defined() ? at::zeros({args.partials, cols}, fp32) : Tensor();
  Tensor db_part = has_bias ? at::zeros({args.partials, cols}, fp32) : Tensor();
  args.dweight = dw_part.defined() ? dw_part.data_ptr<float>() : nullptr;
  args.dbias = db_part.defined() ? db_part.data_ptr<float>() : nullptr;
  run_partials(op, dy, args, rows, olmo_fast_norm_bwd_cpu, olmo_fast_norm_bwd_gpu);
  return {dx, dw_part.defined() ? std::optional<Tensor>(dw_part.sum(0)) : std::nullopt,
          db_part.defined() ? std::optional<Tensor>(db_part.sum(0)) : std::nullopt};
}

std::tuple<Tensor, std::optional<Tensor>, std::optional<Tensor>> norm_bwd(
    const Tensor& dy, const Tensor& saved, const std::optional<Tensor>& weight, const std::optional<Tensor>& mean,
    const Tensor& rstd, const std::optional<Tensor>& dh, bool has_bias, bool rms) {
  return norm_bwd_impl("norm_bwd", dy, saved, weight, mean, rstd, dh, has_bias, rms, weight.has_value() || has_bias);
}

// OLMo 2's post-norm residual (CPU loops): out = residual + (weight * x * rstd).to(x.dtype), in the promoted dtype.
// Mixed dtypes (autocast: a bf16 branch x, an fp32 residual stream and fp32 weight) run the norm in the promoted
// dtype of x and weight, round it to x's dtype and let ATen add the residual: the same roundings as PyTorch's.
at::ScalarType norm_dtype(const Tensor& x, const std::optional<Tensor>& weight) {
  return weight.has_value() ? c10::promoteTypes(x.scalar_type(), weight->scalar_type()) : x.scalar_type();
}

Tensor as_dtype(const Tensor& t, at::ScalarType dtype) { return t.scalar_type() == dtype ? t : t.to(dtype); }

std::optional<Tensor> as_dtype(const std::optional<Tensor>& t, at::ScalarType dtype) {
  return t.has_value() ? std::optional<Tensor>(as_dtype(*t, dtype)) : std::nullopt;
}

std::tuple<Tensor, Tensor> rms_norm_add_fwd(const Tensor& x, const std::optional<Tensor>& weight,
                                            const Tensor& residual, double eps) {
  const char* op = "rms_norm_add_fwd";
  const at::ScalarType dtype = norm_dtype(x, weight);
  if (residual.scalar_type() == x.scalar_type() && dtype == x.scalar_type()) {
    auto [out, h, mean, rstd] = norm_fwd_impl(op, x, residual, weight, std::nullopt, eps, true, true);
    return {out, rstd};
  }
  TORCH_CHECK(residual.sizes() == x.sizes() && residual.device() == x.device(), "olmo_fast_C::", op,
              ": residual must have x's shape ", x.sizes(), " and device, got ", residual.sizes());
  auto [y, h, mean, rstd] =
      norm_fwd_impl(op, as_dtype(x, dtype), std::nullopt, as_dtype(weight, dtype), std::nullopt, eps, true, false);
  return {at::add(residual, as_dtype(y, x.scalar_type())).contiguous(), rstd};
}

// -> (dx in x's dtype, dweight fp32): the RMSNorm backward from the saved input x with dy = dout in x's dtype.
std::tuple<Tensor, std::optional<Tensor>> rms_norm_add_bwd(const Tensor& dout, const Tensor& x,
                                                           const std::optional<Tensor>& weight, const Tensor& rstd) {
  const at::ScalarType dtype = norm_dtype(x, weight);
  const Tensor dy = as_dtype(as_dtype(dout, x.scalar_type()), dtype);
  auto [dx, dw, db] = norm_bwd_impl("rms_norm_add_bwd", dy, as_dtype(x, dtype), as_dtype(weight, dtype), std::nullopt,
                                    rstd, std::nullopt, false, true, true);
  return {as_dtype(dx, x.scalar_type()), dw};
}

std::tuple<Tensor, std::optional<Tensor>, Tensor> layer_norm_fwd(const Tensor& x, const std::optional<Tensor>& residual,
                                                                 double eps) {
  auto [y, h, mean, rstd] = norm_fwd(x, residual, std::nullopt, std::nullopt, eps, false);
  return {y, h, rstd};
}

Tensor layer_norm_bwd(const Tensor& dy, const Tensor& y, const Tensor& rstd, const std::optional<Tensor>& dh) {
  return std::get<0>(norm_bwd(dy, y, std::nullopt, std::nullopt, rstd, dh, false, false));
}

// OLMo's non-parametric LayerNorm with its autograd node in C++ (ops "layer_norm" and "layer_norm_residual", x
// [..., C]). Why a C++ node: at the small CPU shapes the node's own cost dominates. On a 2-core Xeon (1 thread,
// 67x129 fp32, one process) the op layer_norm_bwd called from Python takes 3.4 us, but torch.autograd.grad through
// a Python autograd.Function calling only it takes 16.7 us (ops/norms.py's custom op: 24.4 us), through eager
// F.layer_norm's C++ node 15.3 us and through this node 14.8 us. ops/norms.py calls these ops in plain eager calls;
// anything that traces keeps the custom op.

// [..., C] as [N, C] rows (a view when the leading dims collapse), as ops/_library.py's as_rows.
Tensor flat_rows(const Tensor& t) {
  TORCH_CHECK(t.dim() >= 1, "olmo_fast_C::layer_norm: expected a tensor with at least one dimension");
  return t.dim() == 2 ? t : t.reshape({-1, t.size(-1)});
}

std::optional<Tensor> flat_rows(const std::optional<Tensor>& t) {
  return t.has_value() ? std::optional<Tensor>(flat_rows(*t)) : std::nullopt;
}

// The kernel's [N, C] output shaped as `like` [..., C].
Tensor shaped_as(const Tensor& rows, const Tensor& like) { return like.dim() == 2 ? rows : rows.view(like.sizes()); }

// The registered op `name` (signature: the C++ function type `Fn`), called through the dispatcher so that a trace
// (fake tensors) reaches its fake kernel.
template <class Fn>
c10::TypedOperatorHandle<Fn> op_handle(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

// -> [y] or, with a residual, [y, h = x + residual]; the backward keeps y and rstd.
struct LayerNormFunction : torch::autograd::Function<LayerNormFunction> {
  static torch::autograd::variable_list forward(torch::autograd::AutogradContext* ctx, const Tensor& x,
                                                const std::optional<Tensor>& residual, double eps) {
    static const auto fwd = op_handle<decltype(layer_norm_fwd)>("olmo_fast_C::layer_norm_fwd");
    auto [y, h, rstd] = fwd.call(flat_rows(x), flat_rows(residual), eps);
    // y itself is this node's output, which a SavedVariable keeps without its grad_fn and rebuilds into a new
    // tensor at every unpack; a detached alias (same storage and version counter, so an in-place change of y is
    // still caught) unpacks as it is.
    ctx->save_for_backward({y.detach(), rstd});
    ctx->set_materialize_grads(false);  // an unused output's gradient stays undefined: no zeros to read
    if (!h.has_value()) return {shaped_as(y, x)};
    return {shaped_as(y, x), shaped_as(*h, x)};
  }

  // h's gradient dh adds to the norm's: x and the residual both get dx.
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    TORCH_CHECK(!at::GradMode::is_enabled(), "olmo_fast_C::layer_norm has no double backward (create_graph=True): ",
                "use backend=\"torch\"");
    const bool has_residual = grads.size() == 2;
    const Tensor& dy = grads[0];
    const Tensor dh = has_residual ? grads[1] : Tensor();
    Tensor dx = dh;  // without dy the norm adds nothing
    if (dy.defined()) {
      const at::AutoDispatchBelowADInplaceOrView below;  // straight to the kernel, past the autograd fallback
      const torch::autograd::variable_list saved = ctx->get_saved_variables();
      static const auto bwd = op_handle<decltype(layer_norm_bwd)>("olmo_fast_C::layer_norm_bwd");
      const std::optional<Tensor> dh_rows = dh.defined() ? std::optional<Tensor>(flat_rows(dh)) : std::nullopt;
      dx = shaped_as(bwd.call(flat_rows(dy), saved[0], saved[1], dh_rows), dy);
    }
    return {dx, has_residual ? dx : Tensor(), Tensor()};
  }
};

// The ops without autograd (no-grad and inference calls on the CPU/CUDA keys) and with it (the Autograd key).
Tensor layer_norm(const Tensor& x, double eps) {
  return shaped_as(std::get<0>(layer_norm_fwd(flat_rows(x), std::nullopt, eps)), x);
}

std::tuple<Tensor, Tensor> layer_norm_residual(const Tensor& x, const Tensor& residual, double eps) {
  auto [y, h, rstd] = layer_norm_fwd(flat_rows(x), flat_rows(residual), eps);
  return {shaped_as(y, x), shaped_as(*h, x)};
}

Tensor layer_norm_autograd(const Tensor& x, double eps) {
  return LayerNormFunction::apply(x, std::nullopt, eps)[0];
}

std::tuple<Tensor, Tensor> layer_norm_residual_autograd(const Tensor& x, const Tensor& residual, double eps) {
  const torch::autograd::variable_list out = LayerNormFunction::apply(x, residual, eps);
  return {out[0], out[1]};
}

// Column `col` of the rows of `t` (the second half of OLMo's fused [up | gate] projection).
const void* column(const Tensor& t, int64_t col) {
  return static_cast<const char*>(t.data_ptr()) + col * t.element_size();
}

Tensor silu_mul_fwd(const Tensor& gate_in, const Tensor& up_in) {
  const char* op = "silu_mul_fwd";
  const Tensor gate = rows_of(gate_in, op, "gate");
  const Tensor up = rows_of(up_in, op, "up");
  const olmo_fast_dtype dtype = kernel_dtype(gate, op, "gate");
  check_like(up, gate, gate.sizes(), op, "up", "gate");
  const int64_t rows = gate.size(0), hidden = gate.size(1);
  Tensor out = output({rows, hidden}, gate.options());
  const olmo_fast_silu_mul_fwd_args args{dtype, rows, hidden, gate.data_ptr(), gate.stride(0),
                                         up.data_ptr(), up.stride(0), out.data_ptr(), hidden};
  run(op, gate, args, rows, 2 * hidden, olmo_fast_silu_mul_fwd_cpu, olmo_fast_silu_mul_fwd_gpu);
  return out;
}

std::tuple<Tensor, Tensor> silu_mul_bwd(const Tensor& dout_in, const Tensor& gate_in, const Tensor& up_in) {
  const char* op = "silu_mul_bwd";
  const Tensor gate = rows_of(gate_in, op, "gate");
  const Tensor up = rows_of(up_in, op, "up");
  const Tensor dout = rows_of(dout_in, op, "dout");
  check_like(up, gate, gate.sizes(), op, "up", "gate");
  check_like(dout, gate, gate.sizes(), op, "dout", "gate");
  const olmo_fast_dtype dtype = kernel_dtype(gate, op, "gate");
  const int64_t rows = gate.size(0), hidden = gate.size(1);
  Tensor d_gate = output({rows, hidden}, gate.options());
  Tensor d_up = output({rows, hidden}, gate.options());
  const olmo_fast_silu_mul_bwd_args args{dtype, rows, hidden, dout.data_ptr(), dout.stride(0),
                                         gate.data_ptr(), gate.stride(0), up.data_ptr(), up.stride(0),
                                         d_gate.data_ptr(), hidden, d_up.data_ptr(), hidden};
  run(op, gate, args, rows, 3 * hidden, olmo_fast_silu_mul_bwd_cpu, olmo_fast_silu_mul_bwd_gpu);
  return {d_gate, d_up};
}

// h = [up | gate] [N, 2H]: the hidden width H, checked.
int64_t fused_hidden(const Tensor& h, const char* op) {
  TORCH_CHECK(h.size(1) % 2 == 0, "olmo_fast_C::", op, ": h = [up | gate] needs an even last dim, got shape ",
              h.sizes());
  return h.size(1) / 2;
}

Tensor swiglu_fwd(const Tensor& h_in) {
  const char* op = "swiglu_fwd";
  const Tensor h = rows_of(h_in, op, "h");
  const olmo_fast_dtype dtype = kernel_dtype(h, op, "h");
  const int64_t rows = h.size(0), hidden = fused_hidden(h, op);
  Tensor out = output({rows, hidden}, h.options());
  const olmo_fast_silu_mul_fwd_args args{dtype, rows, hidden, column(h, hidden), h.stride(0),
                                         h.data_ptr(), h.stride(0), out.data_ptr(), hidden};
  run(op, h, args, rows, 2 * hidden, olmo_fast_silu_mul_fwd_cpu, olmo_fast_silu_mul_fwd_gpu);
  return out;
}

Tensor swiglu_bwd(const Tensor& dout_in, const Tensor& h_in) {
  const char* op = "swiglu_bwd";
  const Tensor h = rows_of(h_in, op, "h");
  const int64_t rows = h.size(0), hidden = fused_hidden(h, op);
  const Tensor dout = rows_of(dout_in, op, "dout");
  check_like(dout, h, {rows, hidden}, op, "dout", "h");
  const olmo_fast_dtype dtype = kernel_dtype(h, op, "h");
  Tensor dh = output({rows, 2 * hidden}, h.options());
  const olmo_fast_silu_mul_bwd_args args{dtype, rows, hidden, dout.data_ptr(), dout.stride(0),
                                         column(h, hidden), h.stride(0), h.data_ptr(), h.stride(0),
                                         const_cast<void*>(column(dh, hidden)), 2 * hidden, dh.data_ptr(), 2 * hidden};
  run(op, h, args, rows, 3 * hidden, olmo_fast_silu_mul_bwd_cpu, olmo_fast_silu_mul_bwd_gpu);
  return dh;
}

// RoPE positions `[T]` or `[B or 1, T]` (int64) as a contiguous table and its batch stride (0: one
// row shared by all sequences); no table (data NULL) without positions.
struct RopePositions {
  Tensor table;
  const int64_t* data = nullptr;
  int64_t batch_stride = 0;
};

RopePositions rope_positions(const char* op, const std::optional<Tensor>& positions_in, const Tensor& x, int64_t batch,
                             int64_t seq) {
  RopePositions out;
  if (!positions_in.has_value()) return out;
  const Tensor& p = *positions_in;
  TORCH_CHECK(p.scalar_type() == at::kLong, "olmo_fast_C::", op, ": positions must be int64, got ", p.scalar_type());
  TORCH_CHECK(p.device() == x.device(), "olmo_fast_C::", op, ": positions are on ", p.device(), " but x is on ",
              x.device());
  const bool per_sequence = p.dim() == 2 && p.size(1) == seq && (p.size(0) == batch || p.size(0) == 1);
  TORCH_CHECK((p.dim() == 1 && p.size(0) == seq) || per_sequence, "olmo_fast_C::", op,
              ": positions must be [T] or [B, T] = [", batch, ", ", seq, "], got shape ", p.sizes());
  out.table = p.contiguous();
  out.data = out.table.data_ptr<int64_t>();
  out.batch_stride = per_sequence && p.size(0) == batch ? seq : 0;
  return out;
}

Tensor rotate(const char* op, const Tensor& x, const std::optional<Tensor>& positions_in, int64_t offset, double theta,
              bool inverse, bool interleaved) {
  TORCH_CHECK(x.dim() == 4, "olmo_fast_C::", op, ": x must be [B, T, H, D], got shape ", x.sizes());
  const int64_t batch = x.size(0), seq = x.size(1), heads = x.size(2), head_dim = x.size(3);
  TORCH_CHECK(head_dim % 2 == 0, "olmo_fast_C::", op, ": the head dim must be even (rotate-half), got ", head_dim);
  olmo_fast_rope_args args{};
  args.dtype = kernel_dtype(x, op, "x");
  args.batch = batch;
  args.seq = seq;
  args.heads = heads;
  args.head_dim = head_dim;
  args.x = x.data_ptr();
  for (int d = 0; d < 4; ++d) args.x_strides[d] = x.stride(d);
  args.offset = offset;
  args.theta = float(theta);
  args.inverse = inverse ? 1 : 0;
  args.interleaved = interleaved ? 1 : 0;
  const RopePositions positions = rope_positions(op, positions_in, x, batch, seq);
  args.positions = positions.data;
  args.positions_batch_stride = positions.batch_stride;
  Tensor out = output({batch, seq, heads, head_dim}, x.options());
  args.out = out.data_ptr();
  run(op, x, args, batch * seq, heads * head_dim, olmo_fast_rope_cpu, olmo_fast_rope_gpu);
  return out;
}

Tensor rope(const Tensor& x, const std::optional<Tensor>& positions, int64_t offset, double theta, bool inverse) {
  return rotate("rope", x, positions, offset, theta, inverse, false);
}

Tensor rope_interleaved(const Tensor& x, const std::optional<Tensor>& positions, int64_t offset, double theta,
                        bool inverse) {
  return rotate("rope_interleaved", x, positions, offset, theta, inverse, true);
}

// The clip value rounded to `dtype`, what torch.clamp compares against (kernels/_clamp.py's clip_bound).
float clip_bound(double clip, at::ScalarType dtype) {
  return float(at::scalar_tensor(clip, at::TensorOptions().dtype(dtype)).item<double>());
}

// `t` with a unit last stride (copied only when it has none).
Tensor unit_last_stride(const Tensor& t) { return t.size(-1) <= 1 || t.stride(-1) == 1 ? t : t.contiguous(); }

// The attention prologues' shared setup (qkv_rope and qk_norm_rope: their arg structs share these fields).
// Forward: qkv [B, T, (Hq + 2 Hkv) * D] checked and given a unit last stride; the sizes, qkv and the positions set.
template <class Args>
Tensor prologue_fwd_args(Args& args, const Tensor& qkv_in, int64_t n_heads, int64_t n_kv_heads,
                         const std::optional<Tensor>& positions_in, int64_t offset, RopePositions& positions,
                         const char* op) {
  TORCH_CHECK(qkv_in.dim() == 3, "olmo_fast_C::", op, ": qkv must be [B, T, (Hq + 2 Hkv) * D], got shape ",
              qkv_in.sizes());
  const int64_t heads = n_heads + 2 * n_kv_heads;
  TORCH_CHECK(n_heads > 0 && n_kv_heads > 0 && qkv_in.size(2) % heads == 0 && (qkv_in.size(2) / heads) % 2 == 0,
              "olmo_fast_C::", op, ": qkv's last dim ", qkv_in.size(2), " is not (", n_heads, " + 2 x ", n_kv_heads,
              ") heads of an even dim");
  const Tensor qkv = unit_last_stride(qkv_in);
  args.dtype = kernel_dtype(qkv, op, "qkv");
  args.batch = qkv.size(0);
  args.seq = qkv.size(1);
  args.q_heads = n_heads;
  args.kv_heads = n_kv_heads;
  args.head_dim = qkv.size(2) / heads;
  args.qkv = qkv.data_ptr();
  args.qkv_strides[0] = qkv.stride(0);
  args.qkv_strides[1] = qkv.stride(1);
  positions = rope_positions(op, positions_in, qkv, args.batch, args.seq);
  args.positions = positions.data;
  args.positions_batch_stride = positions.batch_stride;
  args.offset = offset;
  return qkv;
}

// Backward: dq [B, T, Hq, D], dk and dv [B, T, Hkv, D] (any strides) checked; the sizes, gradients and positions
// set. Returns the width (Hq + 2 Hkv) * D of the dqkv rows.
template <class Args>
int64_t prologue_bwd_args(Args& args, const Tensor& dq, const Tensor& dk, const Tensor& dv,
                          const std::optional<Tensor>& positions_in, int64_t offset, RopePositions& positions,
                          const char* op) {
  TORCH_CHECK(dq.dim() == 4 && dk.dim() == 4, "olmo_fast_C::", op, ": dq, dk, dv must be [B, T, H, D], got shapes ",
              dq.sizes(), ", ", dk.sizes());
  const int64_t batch = dq.size(0), seq = dq.size(1), n_heads = dq.size(2), n_kv_heads = dk.size(2);
  const int64_t head_dim = dq.size(3);
  TORCH_CHECK(head_dim % 2 == 0, "olmo_fast_C::", op, ": the head dim must be even, got ", head_dim);
  check_like(dk, dq, {batch, seq, n_kv_heads, head_dim}, op, "dk", "dq");
  check_like(dv, dq, dk.sizes(), op, "dv", "dk");
  args.dtype = kernel_dtype(dq, op, "dq");
  args.batch = batch;
  args.seq = seq;
  args.q_heads = n_heads;
  args.kv_heads = n_kv_heads;
  args.head_dim = head_dim;
  const Tensor* grads[3] = {&dq, &dk, &dv};
  for (int part = 0; part < 3; ++part) {
    args.grads[part] = grads[part]->data_ptr();
    for (int d = 0; d < 4; ++d) args.grad_strides[part][d] = grads[part]->stride(d);
  }
  positions = rope_positions(op, positions_in, dq, batch, seq);
  args.positions = positions.data;
  args.positions_batch_stride = positions.batch_stride;
  args.offset = offset;
  return (n_heads + 2 * n_kv_heads) * head_dim;
}

// The forward's qkv input of a prologue backward: [B, T, width] like dq, with a unit last stride, into args.
template <class Args>
Tensor prologue_saved_qkv(Args& args, const Tensor& qkv_in, const Tensor& dq, int64_t width, const char* op) {
  const Tensor qkv = unit_last_stride(qkv_in);
  check_like(qkv, dq, {dq.size(0), dq.size(1), width}, op, "qkv", "dq");
  args.qkv = qkv.data_ptr();
  args.qkv_strides[0] = qkv.stride(0);
  args.qkv_strides[1] = qkv.stride(1);
  return qkv;
}

std::tuple<Tensor, Tensor, Tensor> qkv_rope_fwd(const Tensor& qkv_in, int64_t n_heads, int64_t n_kv_heads,
                                                std::optional<double> clip, const std::optional<Tensor>& positions_in,
                                                int64_t offset, double theta) {
  const char* op = "qkv_rope_fwd";
  olmo_fast_qkv_rope_fwd_args args{};
  RopePositions positions;
  const Tensor qkv = prologue_fwd_args(args, qkv_in, n_heads, n_kv_heads, positions_in, offset, positions, op);
  const int64_t batch = args.batch, seq = args.seq, head_dim = args.head_dim, heads = n_heads + 2 * n_kv_heads;
  args.theta = float(theta);
  args.has_clip = clip.has_value() ? 1 : 0;
  args.clip = clip.has_value() ? clip_bound(*clip, qkv.scalar_type()) : 0.0f;
  Tensor q = output({batch, seq, n_heads, head_dim}, qkv.options());
  Tensor k = output({batch, seq, n_kv_heads, head_dim}, qkv.options());
  Tensor v = output({batch, seq, n_kv_heads, head_dim}, qkv.options());
  args.q = q.data_ptr();
  args.k = k.data_ptr();
  args.v = v.data_ptr();
  run(op, qkv, args, batch * seq, heads * head_dim, olmo_fast_qkv_rope_fwd_cpu, olmo_fast_qkv_rope_fwd_gpu);
  return {q, k, v};
}

Tensor qkv_rope_bwd(const Tensor& dq, const Tensor& dk, const Tensor& dv, const std::optional<Tensor>& qkv_in,
                    std::optional<double> clip, const std::optional<Tensor>& positions_in, int64_t offset,
                    double theta) {
  const char* op = "qkv_rope_bwd";
  olmo_fast_qkv_rope_bwd_args args{};
  RopePositions positions;
  const int64_t width = prologue_bwd_args(args, dq, dk, dv, positions_in, offset, positions, op);
  Tensor qkv;
  if (clip.has_value()) {
    TORCH_CHECK(qkv_in.has_value(), "olmo_fast_C::", op, ": the clip's gradient needs the forward's qkv input");
    qkv = prologue_saved_qkv(args, *qkv_in, dq, width, op);
    args.has_clip = 1;
    args.clip = clip_bound(*clip, qkv.scalar_type());
  }
  args.theta = float(theta);
  Tensor dqkv = output({args.batch, args.seq, width}, dq.options());
  args.dqkv = dqkv.data_ptr();
  run(op, dq, args, args.batch * args.seq, 2 * width, olmo_fast_qkv_rope_bwd_cpu, olmo_fast_qkv_rope_bwd_gpu);
  return dqkv;
}

// A fp32 copy of a [n] QK-norm weight on x's device (bf16/fp16 weights, or fp32 master weights under autocast).
Tensor fp32_weight(const Tensor& w, int64_t n, const Tensor& x, const char* op, const char* name) {
  TORCH_CHECK(w.dim() == 1 && w.size(0) == n && w.device() == x.device(), "olmo_fast_C::", op, ": ", name,
              " must be [", n, "] on ", x.device(), ", got ", w.sizes(), " on ", w.device());
  return w.to(at::kFloat).contiguous();
}

// The fp32 inverse frequencies [head_dim / 2] of a RoPE call on x's device.
Tensor inv_freq_of(const Tensor& inv_freq, int64_t head_dim, const Tensor& x, const char* op) {
  TORCH_CHECK(inv_freq.scalar_type() == at::kFloat && inv_freq.dim() == 1 && inv_freq.size(0) == head_dim / 2 &&
                  inv_freq.device() == x.device(),
              "olmo_fast_C::", op, ": inv_freq must be float32 [", head_dim / 2, "] on ", x.device(), ", got ",
              inv_freq.scalar_type(), " ", inv_freq.sizes(), " on ", inv_freq.device());
  return inv_freq.contiguous();
}

std::tuple<Tensor, Tensor, Tensor, Tensor> qk_norm_rope_fwd(const Tensor& qkv_in, const Tensor& q_weight_in,
                                                            const Tensor& k_weight_in, int64_t n_heads,
                                                            int64_t n_kv_heads, double eps,
                                                            const std::optional<Tensor>& positions_in, int64_t offset,
                                                            const Tensor& inv_freq_in, double attention_factor) {
  const char* op = "qk_norm_rope_fwd";
  olmo_fast_qk_norm_rope_fwd_args args{};
  RopePositions positions;
  const Tensor qkv = prologue_fwd_args(args, qkv_in, n_heads, n_kv_heads, positions_in, offset, positions, op);
  const int64_t batch = args.batch, seq = args.seq, head_dim = args.head_dim, heads = n_heads + 2 * n_kv_heads;
  const Tensor q_weight = fp32_weight(q_weight_in, n_heads * head_dim, qkv, op, "q_weight");
  const Tensor k_weight = fp32_weight(k_weight_in, n_kv_heads * head_dim, qkv, op, "k_weight");
  const Tensor inv_freq = inv_freq_of(inv_freq_in, head_dim, qkv, op);
  args.q_weight = q_weight.data_ptr<float>();
  args.k_weight = k_weight.data_ptr<float>();
  args.inv_freq = inv_freq.data_ptr<float>();
  args.attention_factor = float(attention_factor);
  args.eps = float(eps);
  Tensor q = output({batch, seq, n_heads, head_dim}, qkv.options());
  Tensor k = output({batch, seq, n_kv_heads, head_dim}, qkv.options());
  Tensor v = output({batch, seq, n_kv_heads, head_dim}, qkv.options());
  Tensor rstd = output({batch * seq, 2}, qkv.options().dtype(at::kFloat));
  args.q = q.data_ptr();
  args.k = k.data_ptr();
  args.v = v.data_ptr();
  args.rstd = rstd.data_ptr<float>();
  run(op, qkv, args, batch * seq, heads * head_dim, olmo_fast_qk_norm_rope_fwd_cpu, olmo_fast_qk_norm_rope_fwd_gpu);
  return {q, k, v, rstd};
}

std::tuple<Tensor, Tensor, Tensor> qk_norm_rope_bwd(const Tensor& dq, const Tensor& dk, const Tensor& dv,
                                                    const Tensor& qkv_in, const Tensor& q_weight_in,
                                                    const Tensor& k_weight_in, const Tensor& rstd_in,
                                                    const std::optional<Tensor>& positions_in, int64_t offset,
                                                    const Tensor& inv_freq_in, double attention_factor) {
  const char* op = "qk_norm_rope_bwd";
  olmo_fast_qk_norm_rope_bwd_args args{};
  RopePositions positions;
  const int64_t width = prologue_bwd_args(args, dq, dk, dv, positions_in, offset, positions, op);
  const int64_t batch = args.batch, seq = args.seq, n_heads = args.q_heads, n_kv_heads = args.kv_heads;
  const int64_t head_dim = args.head_dim;
  const Tensor qkv = prologue_saved_qkv(args, qkv_in, dq, width, op);  // held: a copy when it was strided
  TORCH_CHECK(rstd_in.scalar_type() == at::kFloat && rstd_in.sizes() == at::IntArrayRef({batch * seq, 2}) &&
                  rstd_in.device() == dq.device(),
              "olmo_fast_C::", op, ": rstd must be float32 [", batch * seq, ", 2], got ", rstd_in.scalar_type(), " ",
              rstd_in.sizes());
  const Tensor rstd = rstd_in.contiguous();
  const Tensor q_weight = fp32_weight(q_weight_in, n_heads * head_dim, dq, op, "q_weight");
  const Tensor k_weight = fp32_weight(k_weight_in, n_kv_heads * head_dim, dq, op, "k_weight");
  const Tensor inv_freq = inv_freq_of(inv_freq_in, head_dim, dq, op);
  args.q_weight = q_weight.data_ptr<float>();
  args.k_weight = k_weight.data_ptr<float>();
  args.rstd = rstd.data_ptr<float>();
  args.inv_freq = inv_freq.data_ptr<float>();
  args.attention_factor = float(attention_factor);
  args.partials = partials_for(batch * seq, dq);
  const at::TensorOptions fp32 = dq.options().dtype(at::kFloat);
  Tensor dq_weight = at::zeros({args.partials, n_heads * head_dim}, fp32);
  Tensor dk_weight = at::zeros({args.partials, n_kv_heads * head_dim}, fp32);
  Tensor dqkv = output({batch, seq, width}, dq.options());
  args.dqkv = dqkv.data_ptr();
  args.dq_weight = dq_weight.data_ptr<float>();
  args.dk_weight = dk_weight.data_ptr<float>();
  run_partials(op, dq, args, batch * seq, olmo_fast_qk_norm_rope_bwd_cpu, olmo_fast_qk_norm_rope_bwd_gpu);
  return {dqkv, dq_weight.sum(0), dk_weight.sum(0)};
}

std::tuple<Tensor, Tensor> cross_entropy_chunk(Tensor& logits, const Tensor& labels_in, int64_t ignore_index,
                                               bool compute_grad, double z_loss) {
  const char* op = "cross_entropy_chunk";
  TORCH_CHECK(logits.dim() == 2 && (logits.size(1) <= 1 || logits.stride(1) == 1), "olmo_fast_C::", op,
              ": logits must be 2-D [N, V] with a unit last stride (written in place), got shape ", logits.sizes(),
              " strides ", logits.strides());
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  TORCH_CHECK(labels_in.dim() == 1 && labels_in.size(0) == rows && !labels_in.is_floating_point() &&
                  labels_in.device() == logits.device(),
              "olmo_fast_C::", op, ": labels must be integers [", rows, "] on ", logits.device(), ", got ",
              labels_in.scalar_type(), " ", labels_in.sizes(), " on ", labels_in.device());
  const Tensor labels = labels_in.to(at::kLong).contiguous();
  Tensor loss = output({rows}, logits.options().dtype(at::kFloat));
  Tensor lse = output({rows}, logits.options().dtype(at::kFloat));
  olmo_fast_cross_entropy_chunk_args args{};
  args.dtype = kernel_dtype(logits, op, "logits");
  args.rows = rows;
  args.vocab = vocab;
  args.logits = logits.data_ptr();
  args.logits_stride = logits.stride(0);
  args.labels = labels.data_ptr<int64_t>();
  args.loss = loss.data_ptr<float>();
  args.lse = lse.data_ptr<float>();
  args.ignore_index = ignore_index;
  args.compute_grad = compute_grad ? 1 : 0;
  args.z_loss = float(z_loss);
  run(op, logits, args, rows, 3 * vocab, olmo_fast_cross_entropy_chunk_cpu, olmo_fast_cross_entropy_chunk_gpu);
  return {loss, lse};
}

// q [B, Tq, H, D], k and v [B, Tk, Hkv, D] of one dtype and device, H a multiple of Hkv.
void check_attention_inputs(const char* op, const Tensor& q, const Tensor& k, const Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4, "olmo_fast_C::", op, ": q must be [B, Tq, H, D] and k, v [B, Tk, Hkv, D], ",
              "got shapes ", q.sizes(), ", ", k.sizes());
  check_like(k, q, {q.size(0), k.size(1), k.size(2), q.size(3)}, op, "k", "q");
  check_like(v, k, k.sizes(), op, "v", "k");
  TORCH_CHECK(k.size(2) > 0 && q.size(2) % k.size(2) == 0, "olmo_fast_C::", op, ": ", q.size(2),
              " query heads are not a multiple of ", k.size(2), " key/value heads");
}

// A [B, T, H, D] operand of the attention kernels: its data and the strides of its first three dims (D unit-strided).
void set_operand(const Tensor& t, const void*& data, int64_t (&strides)[3]) {
  data = t.data_ptr();
  for (int d = 0; d < 3; ++d) strides[d] = t.stride(d);
}

// A sliding window of the attention kernels as their args hold it (0 = unlimited), checked: >= 1, causal only.
int64_t window_arg(const char* op, std::optional<int64_t> window, bool causal) {
  if (!window.has_value()) return 0;
  TORCH_CHECK(*window >= 1 && causal, "olmo_fast_C::", op, ": a sliding window needs causal attention and ",
              "window >= 1, got window ", *window, causal ? "" : " without causal");
  return *window;
}

// The shape, strides (first three dims), scale, clip and window fields that both attention arg structs share.
template <class Args>
void fill_attention_args(Args& args, const char* op, const Tensor& q, const Tensor& k, const Tensor& v, bool causal,
                         std::optional<double> clip, double scale, std::optional<int64_t> window) {
  args.dtype = kernel_dtype(q, op, "q");
  args.batch = q.size(0);
  args.q_len = q.size(1);
  args.kv_len = k.size(1);
  args.heads = q.size(2);
  args.kv_heads = k.size(2);
  args.head_dim = q.size(3);
  set_operand(q, args.q, args.q_strides);
  set_operand(k, args.k, args.k_strides);
  set_operand(v, args.v, args.v_strides);
  args.scale = float(scale);
  args.has_clip = clip.has_value() ? 1 : 0;
  args.clip = clip.has_value() ? clip_bound(*clip, q.scalar_type()) : 0.0f;
  args.causal = causal ? 1 : 0;
  args.window = window_arg(op, window, causal);
}

std::tuple<Tensor, Tensor> attention_fwd(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, bool causal,
                                         std::optional<double> clip, double scale, std::optional<int64_t> window) {
  const char* op = "attention_fwd";
  const Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  check_attention_inputs(op, q, k, v);
  olmo_fast_attention_fwd_args args{};
  fill_attention_args(args, op, q, k, v, causal, clip, scale, window);
  TORCH_CHECK(q.is_cpu() || args.head_dim <= 256, "olmo_fast_C::", op, ": the GPU kernel takes head_dim <= 256, got ",
              args.head_dim);
  Tensor out = output(q.sizes(), q.options());
  Tensor lse = output({q.size(0), q.size(2), q.size(1)}, q.options().dtype(at::kFloat));
  args.out = out.data_ptr();
  args.lse = lse.data_ptr<float>();
  if (out.numel() == 0) {  // nothing to attend (D = 0 included): the backward returns zeros
    lse.fill_(std::numeric_limits<double>::infinity());
    return {out, lse};
  }
  const int64_t blocks = (args.q_len + OLMO_FAST_ATTENTION_CPU_QUERIES - 1) / OLMO_FAST_ATTENTION_CPU_QUERIES;
  run(op, q, args, args.batch * args.heads * blocks, int64_t(1) << 15, olmo_fast_attention_fwd_cpu,
      olmo_fast_attention_fwd_gpu);
  return {out, lse};
}

std::tuple<Tensor, Tensor, Tensor> attention_bwd(const Tensor& dout_in, const Tensor& q_in, const Tensor& k_in,
                                                 const Tensor& v_in, const Tensor& out_in, const Tensor& lse_in,
                                                 bool causal, std::optional<double> clip, double scale,
                                                 std::optional<int64_t> window) {
  const char* op = "attention_bwd";
  const Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  check_attention_inputs(op, q, k, v);
  const Tensor dout = unit_last_stride(dout_in), out = unit_last_stride(out_in);
  check_like(dout, q, q.sizes(), op, "dout", "q");
  check_like(out, q, q.sizes(), op, "out", "q");
  TORCH_CHECK(lse_in.scalar_type() == at::kFloat && lse_in.device() == q.device() &&
                  lse_in.sizes() == at::IntArrayRef({q.size(0), q.size(2), q.size(1)}),
              "olmo_fast_C::", op, ": lse must be float32 [B, H, Tq] on ", q.device(), ", got ", lse_in.scalar_type(),
              " ", lse_in.sizes());
  const Tensor lse = lse_in.contiguous();
  olmo_fast_attention_bwd_args args{};
  fill_attention_args(args, op, q, k, v, causal, clip, scale, window);
  set_operand(dout, args.dout, args.dout_strides);
  set_operand(out, args.out, args.out_strides);
  args.lse = lse.data_ptr<float>();
  Tensor dq = output(q.sizes(), q.options()), dk = output(k.sizes(), k.options()), dv = output(v.sizes(), v.options());
  if (q.numel() == 0 || k.numel() == 0) {  // no query or no key (or D = 0): every gradient is 0
    dq.zero_();
    dk.zero_();
    dv.zero_();
    return {dq, dk, dv};
  }
  args.dq = dq.data_ptr();
  args.dk = dk.data_ptr();
  args.dv = dv.data_ptr();
  if (q.is_cpu()) {
    run_cpu(args, args.batch * args.kv_heads, int64_t(1) << 15, olmo_fast_attention_bwd_cpu);
    return {dq, dk, dv};
  }
#ifdef OLMO_FAST_WITH_GPU
  // dout . out per query row; the caching allocator is stream-ordered, so it may be freed before the kernels ran
  const Tensor workspace = at::empty({olmo_fast_attention_bwd_workspace_floats(&args)}, q.options().dtype(at::kFloat));
  args.workspace = workspace.data_ptr<float>();
#endif
  run_gpu(op, q, args, olmo_fast_attention_bwd_gpu);
  return {dq, dk, dv};
}

// The GPU launcher of decode_attention with its split-K workspace: the partials it merges, a float tensor on q's
// device (none with a single split), freed once the launches are enqueued (the caching allocator hands the memory
// only to this stream's later work).
void decode_attention_gpu(const char* op, const Tensor& q, olmo_fast_decode_attention_args& args) {
#ifdef OLMO_FAST_WITH_GPU
  TORCH_CHECK(args.head_dim <= 256, "olmo_fast_C::", op, ": the GPU kernel takes head_dim <= 256, got ",
              args.head_dim);
  {
    const c10::DeviceGuard guard(q.device());
    args.multiprocessors = olmo_fast_gpu_multiprocessors();
  }
  TORCH_CHECK(args.multiprocessors > 0, "olmo_fast_C::", op, ": the GPU runtime gave no multiprocessor count for ",
              q.device());
  Tensor workspace;
  if (const int64_t floats = olmo_fast_decode_attention_workspace_floats(&args); floats > 0) {
    workspace = at::empty({floats}, q.options().dtype(at::kFloat));
    args.workspace = workspace.data_ptr<float>();
  }
#endif
  run_gpu(op, q, args, olmo_fast_decode_attention_gpu);
}

Tensor decode_attention(const Tensor& q_in, const Tensor& k_in, const Tensor& v_in, const Tensor& seqlens_in,
                        std::optional<double> scale, std::optional<int64_t> window) {
  const char* op = "decode_attention";
  TORCH_CHECK(q_in.dim() == 4 && k_in.dim() == 4, "olmo_fast_C::", op,
              ": q must be [B, Tq, H, D] and the caches [B, S, Hkv, D], got shapes ", q_in.sizes(), ", ",
              k_in.sizes());
  const Tensor q = unit_last_stride(q_in), k = unit_last_stride(k_in), v = unit_last_stride(v_in);
  const int64_t batch = q.size(0), q_len = q.size(1), heads = q.size(2), head_dim = q.size(3);
  const int64_t slots = k.size(1), kv_heads = k.size(2);
  check_like(k, q, {batch, slots, kv_heads, head_dim}, op, "k_cache", "q");
  check_like(v, k, k.sizes(), op, "v_cache", "k_cache");
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, "olmo_fast_C::", op, ": ", heads,
              " query heads are not a multiple of ", kv_heads, " key/value heads");
  TORCH_CHECK(seqlens_in.dim() == 1 && seqlens_in.size(0) == batch && !seqlens_in.is_floating_point() &&
                  seqlens_in.device() == q.device(),
              "olmo_fast_C::", op, ": seqlens must be integers [", batch, "] on ", q.device(), ", got ",
              seqlens_in.scalar_type(), " ", seqlens_in.sizes(), " on ", seqlens_in.device());
  const Tensor seqlens = seqlens_in.to(at::kLong).contiguous();
  Tensor out = output({batch, q_len, heads, head_dim}, q.options());
  if (out.numel() == 0) return out;
  olmo_fast_decode_attention_args args{};
  args.dtype = kernel_dtype(q, op, "q");
  args.batch = batch;
  args.q_len = q_len;
  args.heads = heads;
  args.kv_heads = kv_heads;
  args.head_dim = head_dim;
  args.slots = slots;
  set_operand(q, args.q, args.q_strides);
  set_operand(k, args.k, args.k_strides);
  set_operand(v, args.v, args.v_strides);
  args.seqlens = seqlens.data_ptr<int64_t>();
  args.out = out.data_ptr();
  args.scale = float(scale.has_value() ? *scale : 1.0 / std::sqrt(double(head_dim)));
  args.window = window_arg(op, window, true);
  if (q.is_cpu()) {  // a (sequence, kv head) pair reads its whole cache: one pair per task
    run_cpu(args, batch * kv_heads, int64_t(1) << 15, olmo_fast_decode_attention_cpu);
    return out;
  }
  decode_attention_gpu(op, q, args);
  return out;
}

std::string gpu_runtime() {
#if defined(OLMO_FAST_WITH_HIP)
  return "hip";
#elif defined(OLMO_FAST_WITH_GPU)
  return "cuda";
#else
  return "none";
#endif
}

}  // namespace

TORCH_LIBRARY(olmo_fast_C, m) {
  m.def("layer_norm_fwd(Tensor x, Tensor? residual, float eps) -> (Tensor, Tensor?, Tensor)");
  m.def("layer_norm_bwd(Tensor dy, Tensor y, Tensor rstd, Tensor? dh) -> Tensor");
  m.def("layer_norm(Tensor x, float eps) -> Tensor");
  m.def("layer_norm_residual(Tensor x, Tensor residual, float eps) -> (Tensor, Tensor)");
  m.def("norm_fwd(Tensor x, Tensor? residual, Tensor? weight, Tensor? bias, float eps, bool rms) -> "
        "(Tensor, Tensor?, Tensor?, Tensor)");
  m.def("norm_bwd(Tensor dy, Tensor saved, Tensor? weight, Tensor? mean, Tensor rstd, Tensor? dh, bool has_bias, "
        "bool rms) -> (Tensor, Tensor?, Tensor?)");
  m.def("rms_norm_add_fwd(Tensor x, Tensor? weight, Tensor residual, float eps) -> (Tensor, Tensor)");
  m.def("rms_norm_add_bwd(Tensor dout, Tensor x, Tensor? weight, Tensor rstd) -> (Tensor, Tensor?)");
  m.def("swiglu_fwd(Tensor h) -> Tensor");
  m.def("swiglu_bwd(Tensor dout, Tensor h) -> Tensor");
  m.def("silu_mul_fwd(Tensor gate, Tensor up) -> Tensor");
  m.def("silu_mul_bwd(Tensor dout, Tensor gate, Tensor up) -> (Tensor, Tensor)");
  m.def("rope(Tensor x, Tensor? positions, int offset, float theta, bool inverse) -> Tensor");
  m.def("rope_interleaved(Tensor x, Tensor? positions, int offset, float theta, bool inverse) -> Tensor");
  m.def("qkv_rope_fwd(Tensor qkv, int n_heads, int n_kv_heads, float? clip, Tensor? positions, int offset, "
        "float theta) -> (Tensor, Tensor, Tensor)");
  m.def("qkv_rope_bwd(Tensor dq, Tensor dk, Tensor dv, Tensor? qkv, float? clip, Tensor? positions, int offset, "
        "float theta) -> Tensor");
  m.def("qk_norm_rope_fwd(Tensor qkv, Tensor q_weight, Tensor k_weight, int n_heads, int n_kv_heads, float eps, "
        "Tensor? positions, int offset, Tensor inv_freq, float attention_factor) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("qk_norm_rope_bwd(Tensor dq, Tensor dk, Tensor dv, Tensor qkv, Tensor q_weight, Tensor k_weight, "
        "Tensor rstd, Tensor? positions, int offset, Tensor inv_freq, float attention_factor) -> "
        "(Tensor, Tensor, Tensor)");
  m.def("cross_entropy_chunk(Tensor(a!) logits, Tensor labels, int ignore_index, bool compute_grad, "
        "float z_loss=0.0) -> (Tensor, Tensor)");
  m.def("attention_fwd(Tensor q, Tensor k, Tensor v, bool causal, float? clip, float scale, int? window) -> "
        "(Tensor, Tensor)");
  m.def("attention_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, bool causal, float? clip, "
        "float scale, int? window) -> (Tensor, Tensor, Tensor)");
  m.def("decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor seqlens, float? scale, int? window) -> "
        "Tensor");
  m.def("gpu_runtime() -> str", &gpu_runtime);
  m.def("poison_outputs(bool on) -> ()", &poison_outputs);
}

#define OLMO_FAST_IMPLS(m)                             \
  m.impl("layer_norm", &layer_norm);                   \
  m.impl("layer_norm_residual", &layer_norm_residual); \
  m.impl("layer_norm_fwd", &layer_norm_fwd);           \
  m.impl("layer_norm_bwd", &layer_norm_bwd);           \
  m.impl("norm_fwd", &norm_fwd);                       \
  m.impl("norm_bwd", &norm_bwd);                       \
  m.impl("rms_norm_add_fwd", &rms_norm_add_fwd);       \
  m.impl("rms_norm_add_bwd", &rms_norm_add_bwd);       \
  m.impl("swiglu_fwd", &swiglu_fwd);                   \
  m.impl("swiglu_bwd", &swiglu_bwd);                   \
  m.impl("silu_mul_fwd", &silu_mul_fwd);               \
  m.impl("silu_mul_bwd", &silu_mul_bwd);               \
  m.impl("rope", &rope);                               \
  m.impl("rope_interleaved", &rope_interleaved);       \
  m.impl("qkv_rope_fwd", &qkv_rope_fwd);               \
  m.impl("qkv_rope_bwd", &qkv_rope_bwd);               \
  m.impl("qk_norm_rope_fwd", &qk_norm_rope_fwd);       \
  m.impl("qk_norm_rope_bwd", &qk_norm_rope_bwd);       \
  m.impl("cross_entropy_chunk", &cross_entropy_chunk); \
  m.impl("decode_attention", &decode_attention);       \
  m.impl("attention_fwd", &attention_fwd);             \
  m.impl("attention_bwd", &attention_bwd)

TORCH_LIBRARY_IMPL(olmo_fast_C, CPU, m) { OLMO_FAST_IMPLS(m); }

#ifdef OLMO_FAST_WITH_GPU
TORCH_LIBRARY_IMPL(olmo_fast_C, CUDA, m) { OLMO_FAST_IMPLS(m); }
#endif

// Autograd covers every device's tensors: the C++ node above, then (autograd below it) the kernels.
TORCH_LIBRARY_IMPL(olmo_fast_C, Autograd, m) {
  m.impl("layer_norm", &layer_norm_autograd);
  m.impl("layer_norm_residual", &layer_norm_residual_autograd);
}

// `import olmo_fast._C` loads this library, whose static initialisers above register the ops.
PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "olmo-fast compiled kernels (torch.ops.olmo_fast_C)", -1,
                               nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module);
}
