// The CPU loops through the C ABI alone (no torch, no Python): each op on odd-sized bf16 / fp16 / fp32 rows
// against a double-precision reference computed here, within a few units of the storage dtype's rounding.
// Built and run by CMake (`ctest`); exits non-zero on the first mismatch.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "olmo_fast/kernels.h"
#include "olmo_fast/numerics.h"

namespace {

using olmo_fast::bf16;
using olmo_fast::fp16;
using olmo_fast::from_float;
using olmo_fast::to_float;

int failures = 0;

template <class T>
std::vector<T> random_rows(size_t n, float scale, float shift, unsigned seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> normal(shift, scale);
  std::vector<T> out(n);
  for (auto& v : out) v = from_float<T>(normal(gen));
  return out;
}

// |got - want| <= tol * (1 + |want|), tol a few ulps of the storage type
template <class T>
void expect_close(const char* what, const std::vector<T>& got, const std::vector<double>& want, double tol) {
  double worst = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double err = std::fabs(double(to_float(got[i])) - want[i]) / (1 + std::fabs(want[i]));
    worst = err > worst || std::isnan(err) ? err : worst;
  }
  const bool ok = worst <= tol;
  failures += !ok;
  std::printf("%-4s %-26s max scaled error %.3g (tolerance %.3g)\n", ok ? "ok" : "FAIL", what, worst, tol);
}

template <class T>
void check(olmo_fast_dtype dtype, const char* name, double tol) {
  const int64_t rows = 7, cols = 37, half = 19;
  char label[64];
  // LayerNorm with the residual add: y = (h - mean) / sqrt(var + eps), h = x + r rounded to T
  const auto x = random_rows<T>(rows * cols, 2.0f, 3.0f, 1), r = random_rows<T>(rows * cols, 1.0f, 0.0f, 2);
  std::vector<T> y(rows * cols), h(rows * cols);
  std::vector<float> rstd(rows);
  olmo_fast_norm_fwd_args ln{};
  ln.dtype = dtype;
  ln.rows = rows;
  ln.cols = cols;
  ln.x = x.data();
  ln.x_stride = cols;
  ln.residual = r.data();
  ln.residual_stride = cols;
  ln.y = y.data();
  ln.h = h.data();
  ln.rstd = rstd.data();
  ln.eps = 1e-5f;
  olmo_fast_norm_fwd_cpu(&ln, 0, rows);
  std::vector<double> want(rows * cols);
  for (int64_t i = 0; i < rows; ++i) {
    double mean = 0, var = 0;
    for (int64_t j = 0; j < cols; ++j) mean += to_float(h[i * cols + j]) / double(cols);
    for (int64_t j = 0; j < cols; ++j) var += std::pow(to_float(h[i * cols + j]) - mean, 2) / double(cols);
    for (int64_t j = 0; j < cols; ++j) want[i * cols + j] = (to_float(h[i * cols + j]) - mean) / std::sqrt(var + 1e-5);
  }
  std::snprintf(label, sizeof label, "%s layer_norm_fwd", name);
  expect_close(label, y, want, tol);

  // SwiGLU on the fused [up | gate] rows of h: out = silu(gate) * up
  const auto fused = random_rows<T>(rows * 2 * half, 3.0f, 0.0f, 3);
  std::vector<T> out(rows * half);
  const olmo_fast_silu_mul_fwd_args sw{dtype, rows, half, fused.data() + half, 2 * half, fused.data(), 2 * half,
                                       out.data(), half};
  olmo_fast_silu_mul_fwd_cpu(&sw, 0, rows);
  want.assign(rows * half, 0);
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t j = 0; j < half; ++j) {
      const double up = to_float(fused[i * 2 * half + j]), gate = to_float(fused[i * 2 * half + half + j]);
      want[i * half + j] = gate / (1 + std::exp(-gate)) * up;
    }
  }
  std::snprintf(label, sizeof label, "%s swiglu_fwd", name);
  expect_close(label, out, want, tol);

  // RoPE (rotate-half) of one head of dim 2 * half at positions offset + t
  const int64_t seq = 5, dim = 2 * half, offset = 1000;
  const auto q = random_rows<T>(seq * dim, 1.0f, 0.0f, 4);
  std::vector<T> rotated(seq * dim);
  olmo_fast_rope_args rope{};
  rope.dtype = dtype;
  rope.batch = 1;
  rope.seq = seq;
  rope.heads = 1;
  rope.head_dim = dim;
  rope.x = q.data();
  rope.x_strides[0] = seq * dim;
  rope.x_strides[1] = dim;
  rope.x_strides[2] = dim;
  rope.x_strides[3] = 1;
  rope.out = rotated.data();
  rope.offset = offset;
  rope.theta = 10000.0f;
  olmo_fast_rope_cpu(&rope, 0, seq);
  want.assign(seq * dim, 0);
  for (int64_t t = 0; t < seq; ++t) {
    for (int64_t i = 0; i < half; ++i) {
      const double angle = double(offset + t) * std::pow(10000.0, -2.0 * double(i) / double(dim));
      const double x1 = to_float(q[t * dim + i]), x2 = to_float(q[t * dim + half + i]);
      want[t * dim + i] = x1 * std::cos(angle) - x2 * std::sin(angle);
      want[t * dim + half + i] = x2 * std::cos(angle) + x1 * std::sin(angle);
    }
  }
  std::snprintf(label, sizeof label, "%s rope", name);
  expect_close(label, rotated, want, tol + 2e-4);  // + fp32 angles at position ~1000 (as the reference)
}

}  // namespace

int main() {
  check<float>(OLMO_FAST_F32, "f32", 1e-5);
  check<fp16>(OLMO_FAST_F16, "f16", 2e-3);
  check<bf16>(OLMO_FAST_BF16, "bf16", 1.6e-2);
  std::printf("%s\n", failures ? "cpu_loops_test: FAILED" : "cpu_loops_test: OK");
  return failures ? 1 : 0;
}
