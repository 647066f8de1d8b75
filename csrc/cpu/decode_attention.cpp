// Decoding attention on the CPU: a few new queries over a KV cache, one (sequence, kv head) pair per task, so that
// K/V are read once for the whole group of query heads that shares them (GQA without repeating K/V).
// Per pair, the group's rows (query head of the group, new token) in blocks of kRows; keys in blocks of kKeys:
// the block is converted to fp32 once (K transposed, so that the scores of a row are one vectorised
// multiply-add over the block per head dim), then each row runs the online softmax (running max m, sum l,
// fp32 accumulator rescaled by exp(m_old - m_new)) over the keys it sees; out = acc / l, 0 for a row without keys.
// Work: 4 B H Tq L D FLOPs (L = mean seqlen). Bytes: K/V read once per pair, e * B * Hkv * L * 2D (dominant),
// plus q and out.
#include <math.h>

#include <algorithm>
#include <vector>

#include "loops.h"

namespace olmo_fast {
namespace cpu {
namespace {

constexpr int64_t kRows = 16;  // query rows per block (a decode group x Tq fits in one)
constexpr int64_t kKeys = 64;  // keys per block: K^T and V blocks of 64 x D fp32 stay in L1/L2

// One block of rows against all the keys they see: rows r < n_rows of q (fp32, pre-scaled), row r seeing keys
// [0, limit[r]), limit[r] <= n_keys.
template <class T>
OLMO_FAST_CPU_CLONES void attend_rows(const float* q, int64_t n_rows, const int64_t* limit, int64_t n_keys,
                                      const T* k, int64_t k_stride, const T* v, int64_t v_stride, int64_t D,
                                      float* kt, float* vb, float* scores, float* acc, float* out_m, float* out_l) {
  for (int64_t r = 0; r < n_rows; ++r) {
    out_m[r] = -INFINITY;
    out_l[r] = 0.0f;
  }
  for (int64_t i = 0; i < n_rows * D; ++i) acc[i] = 0.0f;
  for (int64_t n0 = 0; n0 < n_keys; n0 += kKeys) {
    const int64_t nk = std::min(kKeys, n_keys - n0);
    for (int64_t n = 0; n < nk; ++n) {
      const T* kn = k + (n0 + n) * k_stride;
      const T* vn = v + (n0 + n) * v_stride;
      for (int64_t d = 0; d < D; ++d) kt[d * kKeys + n] = to_float(kn[d]);
      OLMO_FAST_IVDEP
      for (int64_t d = 0; d < D; ++d) vb[n * D + d] = to_float(vn[d]);
    }
    for (int64_t r = 0; r < n_rows; ++r) {
      const int64_t seen = std::min(nk, limit[r] - n0);  // keys of this block the row sees
      if (seen <= 0) continue;
      const float* qr = q + r * D;
      for (int64_t n = 0; n < seen; ++n) scores[n] = 0.0f;
      for (int64_t d = 0; d < D; ++d) {
        const float qd = qr[d];
        const float* kd = kt + d * kKeys;
        OLMO_FAST_IVDEP
        for (int64_t n = 0; n < seen; ++n) scores[n] += qd * kd[n];
      }
      const float m_old = out_m[r];
      const float m_new = std::max(m_old, lane_max(seen, [&](int64_t n) { return scores[n]; }));
      const float alpha = exp_f32(m_old - m_new);  // 0 on the first block (m_old = -inf)
      OLMO_FAST_IVDEP
      for (int64_t n = 0; n < seen; ++n) scores[n] = exp_f32(scores[n] - m_new);
      out_l[r] = out_l[r] * alpha + lane_sum(seen, [&](int64_t n) { return scores[n]; });
      out_m[r] = m_new;
      float* ar = acc + r * D;
      OLMO_FAST_IVDEP
      for (int64_t d = 0; d < D; ++d) ar[d] *= alpha;
      for (int64_t n = 0; n < seen; ++n) {
        const float p = scores[n];
        const float* vr = vb + n * D;
        OLMO_FAST_IVDEP
        for (int64_t d = 0; d < D; ++d) ar[d] += p * vr[d];
      }
    }
  }
}

template <class T>
void decode_pairs(const olmo_fast_decode_attention_args& a, int64_t pair_begin, int64_t pair_end) {
  const int64_t D = a.head_dim, Tq = a.q_len, group = a.heads / a.kv_heads, rows = group * Tq;
  std::vector<float> buffers(2 * kKeys * D + kKeys + 2 * kRows * D + 2 * kRows);
  float* kt = buffers.data();
  float* vb = kt + kKeys * D;
  float* scores = vb + kKeys * D;
  float* q = scores + kKeys;
  float* acc = q + kRows * D;
  float* m = acc + kRows * D;
  float* l = m + kRows;
  int64_t limit[kRows];
  for (int64_t pair = pair_begin; pair < pair_end; ++pair) {
    const int64_t b = pair / a.kv_heads, kh = pair - b * a.kv_heads;
    const int64_t seqlen = std::min(std::max<int64_t>(a.seqlens[b], 0), a.slots);  // never past the cache
    const T* k = static_cast<const T*>(a.k) + b * a.k_strides[0] + kh * a.k_strides[2];
    const T* v = static_cast<const T*>(a.v) + b * a.v_strides[0] + kh * a.v_strides[2];
    for (int64_t r0 = 0; r0 < rows; r0 += kRows) {
      const int64_t n_rows = std::min(kRows, rows - r0);
      int64_t n_keys = 0;
      for (int64_t r = 0; r < n_rows; ++r) {  // row r0 + r: query i of head kh * group + g
        const int64_t g = (r0 + r) / Tq, i = (r0 + r) - g * Tq;
        const T* qr = static_cast<const T*>(a.q) + b * a.q_strides[0] + i * a.q_strides[1] +
                      (kh * group + g) * a.q_strides[2];
        for (int64_t d = 0; d < D; ++d) q[r * D + d] = a.scale * to_float(qr[d]);
        limit[r] = std::min(std::max<int64_t>(seqlen - Tq + i + 1, 0), seqlen);
        n_keys = std::max(n_keys, limit[r]);
      }
      attend_rows(q, n_rows, limit, n_keys, k, a.k_strides[1], v, a.v_strides[1], D, kt, vb, scores, acc, m, l);
      for (int64_t r = 0; r < n_rows; ++r) {
        const int64_t g = (r0 + r) / Tq, i = (r0 + r) - g * Tq;
        T* o = static_cast<T*>(a.out) + ((b * Tq + i) * a.heads + kh * group + g) * D;
        const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
        for (int64_t d = 0; d < D; ++d) o[d] = from_float<T>(acc[r * D + d] * inv);
      }
    }
  }
}

}  // namespace
}  // namespace cpu
}  // namespace olmo_fast

using namespace olmo_fast;

extern "C" void olmo_fast_decode_attention_cpu(const olmo_fast_decode_attention_args* args, int64_t pair_begin,
                                               int64_t pair_end) {
  cpu::dispatch_dtype(args->dtype, [&](auto tag) { cpu::decode_pairs<decltype(tag)>(*args, pair_begin, pair_end); });
}
