// Warp-level matrix multiply-accumulate on tensor cores, one interface for the three targets, so the attention
// kernels are written once:
//
//   Acc c;                        // a 16 x 16 fp32 tile C, spread over the lanes of one warp / wavefront
//   OperandA<T> a; OperandB<T> b; // 16 x 16 tiles of A (rows x k) and B (k x cols), T = fp16, bf16 or float
//   load_a(a, smem, rs, cs);      // A(r, k) = smem[r * rs + k * cs]   (rs, cs: strides in elements)
//   load_b(b, smem, ks, ns);      // B(k, n) = smem[k * ks + n * ns]
//   mma(c, a, b);                 // C += A B, fp32 accumulation
//
// Transposes are strides: Q K^T takes B(k = dim, n = key) = K[key][dim], so ks = 1, ns = the K tile's row stride;
// P^T dO takes A(r = key, k = query) = P[query][key], so rs = 1, cs = P's row stride.
//
// Element i (0 <= i < kAccPerLane) of a lane's accumulator is C(acc_row(i), acc_col(i)). Lanes that share rows
// reduce them with acc_row_reduce; a lane's rows are acc_lane_row(s) for its kRowsPerLane row slots s, element i in
// slot acc_row_slot(i) — per-row state (the running max and sum of a softmax) lives per slot.
//
// The layouts are the instructions' documented fragment layouts (g = lane / 4, t = lane % 4 on NVIDIA):
//   NVIDIA, warp 32: two mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16} (sm_80 and later), columns 0-7 and 8-15.
//     A: a_i at row g + 8 ((i / 2) % 2), k = 2t + i % 2 + 8 (i / 4)            (8 per lane)
//     B: b_i at k = 2t + i % 2 + 8 ((i / 2) % 2), n = g + 8 (i / 4)            (8 per lane, 4 per instruction)
//     C: c_i at row g + 8 ((i / 2) % 2), col = 2t + i % 2 + 8 (i / 4)          (8 per lane, 4 per instruction)
//   AMD CDNA, wavefront 64: one v_mfma_f32_16x16x16f16 / v_mfma_f32_16x16x16bf16_1k (gfx90a and later).
//     A: a_i at row lane % 16, k = 4 (lane / 16) + i;  B: b_i at k = 4 (lane / 16) + i, n = lane % 16;
//     C: c_i at row 4 (lane / 16) + i, col lane % 16                            (4 per lane each)
// The CPU emulation (csrc/emulation/emulated_gpu.h) runs warp 32 with the NVIDIA layout and warp 64 with the AMD
// one: each lane publishes its fragments, and the warp's product is formed from the published elements placed by
// these same layouts, so a kernel that loads, reduces or stores by the wrong coordinates fails there.
// float operands (fp32 inputs) are not tensor-core types: OperandA<float> / OperandB<float> keep where their tile
// lies in shared memory, and mma reads it there (SIMT FMAs) - same accumulator layout, exact fp32.
//
// Bytes: load_a / load_b read 512 bytes (16-bit T) of shared memory per warp; one 16x16x16 step is 8192 FLOPs.
#pragma once

#include "common.cuh"

namespace olmo_fast {
namespace mma_detail {

constexpr int kWarp = OF_WARP_SIZE;
static_assert(kWarp == 32 || kWarp == 64, "the tensor-core layouts are defined for warps of 32 and 64");

OF_DEVICE int lane() { return int(threadIdx.x) % kWarp; }

}  // namespace mma_detail

constexpr int kMmaTile = 16;                              // M = N = K of one warp-level step
constexpr int kAccPerLane = 256 / OF_WARP_SIZE;           // 8 on NVIDIA, 4 on AMD
constexpr int kOperandPerLane = 256 / OF_WARP_SIZE;       // elements of a 16 x 16 operand per lane
constexpr int kRowsPerLane = OF_WARP_SIZE == 32 ? 2 : 4;  // distinct accumulator rows a lane holds

struct Acc {
  float v[kAccPerLane];
};

OF_DEVICE void acc_fill(Acc& c, float x) {
#pragma unroll
  for (int i = 0; i < kAccPerLane; ++i) c.v[i] = x;
}

// The layouts, for lane `l` (the emulation evaluates them for every lane of the warp).
namespace layout {
#if OF_WARP_SIZE == 32
OF_DEVICE int acc_row_slot(int i) { return (i / 2) % 2; }
OF_DEVICE int acc_lane_row(int l, int slot) { return l / 4 + 8 * slot; }
OF_DEVICE int acc_col(int l, int i) { return 2 * (l % 4) + i % 2 + 8 * (i / 4); }
OF_DEVICE int a_row(int l, int i) { return l / 4 + 8 * ((i / 2) % 2); }
OF_DEVICE int a_k(int l, int i) { return 2 * (l % 4) + i % 2 + 8 * (i / 4); }
OF_DEVICE int b_k(int l, int i) { return 2 * (l % 4) + i % 2 + 8 * ((i / 2) % 2); }
OF_DEVICE int b_n(int l, int i) { return l / 4 + 8 * (i / 4); }
constexpr int kRowLanes = 4;  // lanes holding the same rows: the 4 of a group (lane / 4)
#else
OF_DEVICE int acc_row_slot(int i) { return i; }
OF_DEVICE int acc_lane_row(int l, int slot) { return 4 * (l / 16) + slot; }
OF_DEVICE int acc_col(int l, int /*i*/) { return l % 16; }
OF_DEVICE int a_row(int l, int /*i*/) { return l % 16; }
OF_DEVICE int a_k(int l, int i) { return 4 * (l / 16) + i; }
OF_DEVICE int b_k(int l, int i) { return 4 * (l / 16) + i; }
OF_DEVICE int b_n(int l, int /*i*/) { return l % 16; }
constexpr int kRowLanes = 16;  // lanes holding the same rows: the 16 of a row of lanes (lane / 16)
#endif
OF_DEVICE int acc_row(int l, int i) { return acc_lane_row(l, acc_row_slot(i)); }
}  // namespace layout

OF_DEVICE int acc_row_slot(int i) { return layout::acc_row_slot(i); }
OF_DEVICE int acc_lane_row(int slot) { return layout::acc_lane_row(mma_detail::lane(), slot); }
OF_DEVICE int acc_col(int i) { return layout::acc_col(mma_detail::lane(), i); }
OF_DEVICE int acc_row(int i) { return layout::acc_row(mma_detail::lane(), i); }

// op-reduce `v` over the lanes that hold the same accumulator rows (every lane gets the result).
template <class Op>
OF_DEVICE float acc_row_reduce(float v, Op op) {
#pragma unroll
  for (int mask = 1; mask < layout::kRowLanes; mask *= 2) v = op(v, shfl_xor(v, mask));
  return v;
}

// ---- operands ----

template <class T>
struct OperandA {
  uint16_t bits[kOperandPerLane];
};
template <class T>
struct OperandB {
  uint16_t bits[kOperandPerLane];
};

// fp32: where the tile lies (shared memory), read by mma itself.
struct SmemTile {
  const float* base;
  int row_stride, col_stride;
  OF_DEVICE float at(int r, int c) const { return base[r * row_stride + c * col_stride]; }
};
template <>
struct OperandA<float> {
  SmemTile tile;
};
template <>
struct OperandB<float> {
  SmemTile tile;
};

template <class T>
OF_DEVICE void load_a(OperandA<T>& a, const T* smem, int rs, int cs) {
  const int l = mma_detail::lane();
#pragma unroll
  for (int i = 0; i < kOperandPerLane; ++i) a.bits[i] = smem[layout::a_row(l, i) * rs + layout::a_k(l, i) * cs].bits;
}

template <class T>
OF_DEVICE void load_b(OperandB<T>& b, const T* smem, int ks, int ns) {
  const int l = mma_detail::lane();
#pragma unroll
  for (int i = 0; i < kOperandPerLane; ++i) b.bits[i] = smem[layout::b_k(l, i) * ks + layout::b_n(l, i) * ns].bits;
}

OF_DEVICE void load_a(OperandA<float>& a, const float* smem, int rs, int cs) { a.tile = SmemTile{smem, rs, cs}; }
OF_DEVICE void load_b(OperandB<float>& b, const float* smem, int ks, int ns) { b.tile = SmemTile{smem, ks, ns}; }

OF_DEVICE void mma(Acc& c, const OperandA<float>& a, const OperandB<float>& b) {
#pragma unroll
  for (int i = 0; i < kAccPerLane; ++i) {
    const int r = acc_row(i), n = acc_col(i);
    float sum = c.v[i];
#pragma unroll
    for (int k = 0; k < kMmaTile; ++k) sum = fmaf(a.tile.at(r, k), b.tile.at(k, n), sum);
    c.v[i] = sum;
  }
}

namespace mma_detail {

template <class T>
OF_DEVICE float bits_to_float(uint16_t bits) {
  return to_float(T{bits});
}

#if defined(OF_EMULATED)
// The warp's product from the fragments its lanes hold, each placed by the layouts above.
template <class T>
inline void emulated_mma(Acc& c, const OperandA<T>& a, const OperandB<T>& b) {
  float mine[2 * kOperandPerLane], all[2 * kOperandPerLane * kWarp];
  for (int i = 0; i < kOperandPerLane; ++i) {
    mine[i] = bits_to_float<T>(a.bits[i]);
    mine[kOperandPerLane + i] = bits_to_float<T>(b.bits[i]);
  }
  float A[kMmaTile][kMmaTile], B[kMmaTile][kMmaTile];
  emu::warp_gather(mine, 2 * kOperandPerLane, all);
  for (int l = 0; l < kWarp; ++l) {
    const float* held = all + l * 2 * kOperandPerLane;
    for (int i = 0; i < kOperandPerLane; ++i) {
      A[layout::a_row(l, i)][layout::a_k(l, i)] = held[i];
      B[layout::b_k(l, i)][layout::b_n(l, i)] = held[kOperandPerLane + i];
    }
  }
  for (int i = 0; i < kAccPerLane; ++i) {
    float sum = c.v[i];
    for (int k = 0; k < kMmaTile; ++k) sum = fmaf(A[acc_row(i)][k], B[k][acc_col(i)], sum);
    c.v[i] = sum;
  }
}
#elif defined(OF_CUDA)
OF_DEVICE uint32_t pack(uint16_t lo, uint16_t hi) { return uint32_t(lo) | (uint32_t(hi) << 16); }

template <class T>
OF_DEVICE void mma_m16n8k16(float* c, const uint16_t* a, const uint16_t* b) {
#if defined(__CUDA_ARCH__)
  const uint32_t a0 = pack(a[0], a[1]), a1 = pack(a[2], a[3]), a2 = pack(a[4], a[5]), a3 = pack(a[6], a[7]);
  const uint32_t b0 = pack(b[0], b[1]), b1 = pack(b[2], b[3]);
  if constexpr (std::is_same<T, bf16>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
#else
  (void)c, (void)a, (void)b;
#endif
}
#elif defined(OF_HIP)
typedef float float4_t __attribute__((ext_vector_type(4)));
typedef short short4_t __attribute__((ext_vector_type(4)));
typedef _Float16 half4_t __attribute__((ext_vector_type(4)));

template <class T>
OF_DEVICE void mfma_16x16x16(float* c, const uint16_t* a, const uint16_t* b) {
#if defined(__HIP_DEVICE_COMPILE__)
  float4_t acc = {c[0], c[1], c[2], c[3]};
  short4_t as = {short(a[0]), short(a[1]), short(a[2]), short(a[3])};
  short4_t bs = {short(b[0]), short(b[1]), short(b[2]), short(b[3])};
  if constexpr (std::is_same<T, bf16>::value) {
    acc = __builtin_amdgcn_mfma_f32_16x16x16bf16_1k(as, bs, acc, 0, 0, 0);
  } else {
    acc = __builtin_amdgcn_mfma_f32_16x16x16f16(__builtin_bit_cast(half4_t, as), __builtin_bit_cast(half4_t, bs),
                                                acc, 0, 0, 0);
  }
  for (int i = 0; i < 4; ++i) c[i] = acc[i];
#else
  (void)c, (void)a, (void)b;
#endif
}
#endif

}  // namespace mma_detail

// C += A B on the tensor cores (fp16 / bf16 operands, fp32 accumulators).
template <class T>
OF_DEVICE void mma(Acc& c, const OperandA<T>& a, const OperandB<T>& b) {
  static_assert(std::is_same<T, fp16>::value || std::is_same<T, bf16>::value, "tensor-core operands: fp16, bf16");
#if defined(OF_EMULATED)
  mma_detail::emulated_mma(c, a, b);
#elif defined(OF_CUDA)
  mma_detail::mma_m16n8k16<T>(c.v, a.bits, b.bits);          // columns 0-7
  mma_detail::mma_m16n8k16<T>(c.v + 4, a.bits, b.bits + 4);  // columns 8-15
#else
  mma_detail::mfma_16x16x16<T>(c.v, a.bits, b.bits);
#endif
}

}  // namespace olmo_fast
