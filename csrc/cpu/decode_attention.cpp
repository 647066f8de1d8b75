// Decoding attention on the CPU: a few new queries over a KV cache, one (sequence, kv head) pair per task, so that
// K/V are read once for the whole group of query heads that shares them (GQA without repeating K/V).
// Per pair, the group's rows (query head of the group, new token) in blocks of kRows run attend.h's online softmax
// (running max m, sum l, fp32 accumulator rescaled by exp(m_old - m_new)) over the keys each sees, key blocks
// converted to fp32 once for all the rows; out = acc / l, 0 for a row without keys. With a sliding window
// (query at position p sees keys p - window < j <= p) the key blocks start at the window of the block's first row:
// the older part of the cache is never read.
// Work: 4 B H Tq L D FLOPs (L = mean seqlen; with a window at most window + Tq - 1). Bytes: K/V read once per
// pair, e * B * Hkv * L * 2D (dominant), plus q and out.
#include "attend.h"

namespace olmo_fast {
namespace cpu {
namespace {

constexpr int64_t kRows = 16;  // query rows per block (a decode group x Tq fits in one)

template <class T>
OLMO_FAST_CPU_CLONES void decode_pairs(const olmo_fast_decode_attention_args& a, int64_t pair_begin,
                                       int64_t pair_end) {
  const int64_t D = a.head_dim, Tq = a.q_len, group = a.heads / a.kv_heads, rows = group * Tq;
  AttendBuffers w(kRows, D);
  std::vector<float> q(kRows * D);
  int64_t first[kRows], limit[kRows];
  const Clamp none{INFINITY};
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
        first[r] = window_first(seqlen - Tq + i, a.window);
        n_keys = std::max(n_keys, limit[r]);
      }
      attend_rows(q.data(), n_rows, first, limit, n_keys, D, 1,
                  KeyBlock<T>{k, a.k_strides[1], v, a.v_strides[1], D, none, w}, w);
      for (int64_t r = 0; r < n_rows; ++r) {
        const int64_t g = (r0 + r) / Tq, i = (r0 + r) - g * Tq;
        T* o = static_cast<T*>(a.out) + ((b * Tq + i) * a.heads + kh * group + g) * D;
        const float inv = w.l[r] > 0.0f ? 1.0f / w.l[r] : 0.0f;
        for (int64_t d = 0; d < D; ++d) o[d] = from_float<T>(w.acc[r * D + d] * inv);
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
