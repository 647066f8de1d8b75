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

  // OLMo 2's post-norm (RMSNorm, then the residual add): out = r + (w * x / sqrt(mean(x^2) + eps)) rounded to T
  const auto w = random_rows<T>(cols, 0.5f, 1.0f, 9);
  std::vector<T> post_out(rows * cols);
  olmo_fast_norm_fwd_args post{};
  post.dtype = dtype;
  post.rows = rows;
  post.cols = cols;
  post.x = x.data();
  post.x_stride = cols;
  post.residual = r.data();
  post.residual_stride = cols;
  post.weight = w.data();
  post.y = post_out.data();
  post.rstd = rstd.data();
  post.eps = 1e-6f;
  post.rms = 1;
  post.add_after = 1;
  olmo_fast_norm_fwd_cpu(&post, 0, rows);
  for (int64_t i = 0; i < rows; ++i) {
    double mean_sq = 0;
    for (int64_t j = 0; j < cols; ++j) mean_sq += std::pow(to_float(x[i * cols + j]), 2) / double(cols);
    for (int64_t j = 0; j < cols; ++j) {
      const double normed = to_float(w[j]) * to_float(x[i * cols + j]) / std::sqrt(mean_sq + 1e-6);
      want[i * cols + j] = to_float(r[i * cols + j]) + to_float(from_float<T>(float(normed)));
    }
  }
  std::snprintf(label, sizeof label, "%s rms_norm_add_fwd", name);
  expect_close(label, post_out, want, tol);

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

  // The qkv prologue: [q | k | v] of one head each, clamped to +-1, q and k rotated as above, v only clamped
  const auto qkv = random_rows<T>(seq * 3 * dim, 1.5f, 0.0f, 5);
  std::vector<T> pq(seq * dim), pk(seq * dim), pv(seq * dim);
  olmo_fast_qkv_rope_fwd_args pro{};
  pro.dtype = dtype;
  pro.batch = 1;
  pro.seq = seq;
  pro.q_heads = pro.kv_heads = 1;
  pro.head_dim = dim;
  pro.qkv = qkv.data();
  pro.qkv_strides[0] = seq * 3 * dim;
  pro.qkv_strides[1] = 3 * dim;
  pro.q = pq.data();
  pro.k = pk.data();
  pro.v = pv.data();
  pro.offset = offset;
  pro.theta = 10000.0f;
  pro.clip = 1.0f;
  pro.has_clip = 1;
  olmo_fast_qkv_rope_fwd_cpu(&pro, 0, seq);
  const auto clipped = [&](int64_t t, int64_t part, int64_t d) {
    return std::fmin(1.0, std::fmax(-1.0, double(to_float(qkv[t * 3 * dim + part * dim + d]))));
  };
  std::vector<double> want_q(seq * dim), want_k(seq * dim), want_v(seq * dim);
  for (int64_t t = 0; t < seq; ++t) {
    for (int64_t i = 0; i < half; ++i) {
      const double angle = double(offset + t) * std::pow(10000.0, -2.0 * double(i) / double(dim));
      for (int64_t part = 0; part < 2; ++part) {
        std::vector<double>& w = part == 0 ? want_q : want_k;
        const double x1 = clipped(t, part, i), x2 = clipped(t, part, half + i);
        w[t * dim + i] = x1 * std::cos(angle) - x2 * std::sin(angle);
        w[t * dim + half + i] = x2 * std::cos(angle) + x1 * std::sin(angle);
      }
    }
    for (int64_t d = 0; d < dim; ++d) want_v[t * dim + d] = clipped(t, 2, d);
  }
  std::snprintf(label, sizeof label, "%s qkv_rope_fwd q", name);
  expect_close(label, pq, want_q, tol + 2e-4);
  std::snprintf(label, sizeof label, "%s qkv_rope_fwd k", name);
  expect_close(label, pk, want_k, tol + 2e-4);
  std::snprintf(label, sizeof label, "%s qkv_rope_fwd v", name);
  expect_close(label, pv, want_v, 0.0);  // exact: a clamp

  // The cross-entropy chunk with a z-loss: losses (fp32), lse, and the gradient softmax (1 + 2 z lse) - onehot
  // written over the logits
  const int64_t vocab = 101;
  auto logits = random_rows<T>(rows * vocab, 3.0f, 0.0f, 6);
  const auto original = logits;
  std::vector<int64_t> labels(rows);
  for (int64_t i = 0; i < rows; ++i) labels[i] = (i * 37) % vocab;
  labels[1] = -100;
  std::vector<float> losses(rows), lses(rows);
  const float z_loss = 0.05f;
  const olmo_fast_cross_entropy_chunk_args ce{dtype,         rows, vocab, logits.data(), vocab, labels.data(),
                                              losses.data(), lses.data(), -100, 1, z_loss};
  olmo_fast_cross_entropy_chunk_cpu(&ce, 0, rows);
  std::vector<double> want_loss(rows), got_loss(losses.begin(), losses.end()), want_lse(rows);
  std::vector<double> got_lse(lses.begin(), lses.end());
  want.assign(rows * vocab, 0);
  for (int64_t i = 0; i < rows; ++i) {
    if (labels[i] == -100) continue;
    double top = -INFINITY, sum = 0;
    for (int64_t j = 0; j < vocab; ++j) top = std::fmax(top, to_float(original[i * vocab + j]));
    for (int64_t j = 0; j < vocab; ++j) sum += std::exp(to_float(original[i * vocab + j]) - top);
    const double lse = top + std::log(sum);
    want_lse[i] = lse;
    want_loss[i] = lse - to_float(original[i * vocab + labels[i]]) + z_loss * lse * lse;
    for (int64_t j = 0; j < vocab; ++j) {
      want[i * vocab + j] =
          std::exp(to_float(original[i * vocab + j]) - lse) * (1 + 2 * z_loss * lse) - (j == labels[i] ? 1.0 : 0.0);
    }
  }
  std::snprintf(label, sizeof label, "%s cross_entropy loss", name);
  expect_close(label, got_loss, want_loss, 1e-5);  // fp32 math on the same stored logits
  std::snprintf(label, sizeof label, "%s cross_entropy lse", name);
  expect_close(label, got_lse, want_lse, 1e-5);
  std::snprintf(label, sizeof label, "%s cross_entropy grad", name);
  expect_close(label, logits, want, tol);

  // Attention forward: 2 query heads sharing 1 kv head, 5 queries over 7 keys, causal (bottom-right), clip 1
  const int64_t tq = 5, tk = 7, heads = 2, hd = 6;
  const auto aq = random_rows<T>(tq * heads * hd, 1.5f, 0.0f, 7), ak = random_rows<T>(tk * hd, 1.5f, 0.0f, 8);
  const auto av = random_rows<T>(tk * hd, 1.5f, 0.0f, 9);
  std::vector<T> aout(tq * heads * hd);
  std::vector<float> lse(heads * tq);
  olmo_fast_attention_fwd_args at{};
  at.dtype = dtype;
  at.batch = 1;
  at.q_len = tq;
  at.kv_len = tk;
  at.heads = heads;
  at.kv_heads = 1;
  at.head_dim = hd;
  at.q = aq.data();
  at.q_strides[0] = tq * heads * hd;
  at.q_strides[1] = heads * hd;
  at.q_strides[2] = hd;
  at.k = ak.data();
  at.v = av.data();
  at.k_strides[0] = at.v_strides[0] = tk * hd;
  at.k_strides[1] = at.v_strides[1] = hd;
  at.k_strides[2] = at.v_strides[2] = hd;
  at.out = aout.data();
  at.lse = lse.data();
  at.scale = 0.4f;
  at.clip = 1.0f;
  at.has_clip = 1;
  at.causal = 1;
  olmo_fast_attention_fwd_cpu(&at, 0, heads);  // one block of queries per head
  const auto clip1 = [](const T& x) { return std::fmin(1.0, std::fmax(-1.0, double(to_float(x)))); };
  want.assign(tq * heads * hd, 0);
  for (int64_t i = 0; i < tq; ++i) {
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t keys = i + tk - tq + 1;
      std::vector<double> p(keys);
      double top = -INFINITY, sum = 0;
      for (int64_t j = 0; j < keys; ++j) {
        double s = 0;
        for (int64_t d = 0; d < hd; ++d) s += clip1(aq[(i * heads + h) * hd + d]) * clip1(ak[j * hd + d]);
        p[j] = 0.4 * s;
        top = std::fmax(top, p[j]);
      }
      for (int64_t j = 0; j < keys; ++j) sum += p[j] = std::exp(p[j] - top);
      for (int64_t j = 0; j < keys; ++j) {
        for (int64_t d = 0; d < hd; ++d) want[(i * heads + h) * hd + d] += p[j] / sum * clip1(av[j * hd + d]);
      }
    }
  }
  std::snprintf(label, sizeof label, "%s attention_fwd", name);
  expect_close(label, aout, want, tol);
}

}  // namespace

int main() {
  check<float>(OLMO_FAST_F32, "f32", 1e-5);
  check<fp16>(OLMO_FAST_F16, "f16", 2e-3);
  check<bf16>(OLMO_FAST_BF16, "bf16", 1.6e-2);
  std::printf("%s\n", failures ? "cpu_loops_test: FAILED" : "cpu_loops_test: OK");
  return failures ? 1 : 0;
}
