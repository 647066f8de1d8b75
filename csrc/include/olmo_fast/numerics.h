// Element types and the fp32 math shared by the GPU kernels and the CPU loops (one definition of each formula).
//
// bf16/fp16 are stored as 16-bit patterns. Conversions round to nearest even; on the GPU they use the hardware
// instructions, on the CPU branch-free bit manipulation that compilers vectorise.
#pragma once

#include <math.h>
#include <string.h>

#include "olmo_fast/portability.h"

namespace olmo_fast {

struct bf16 {
  uint16_t bits;
};
struct fp16 {
  uint16_t bits;
};

OF_HD uint32_t f32_bits(float f) {
#ifdef OF_DEVICE_PASS
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, sizeof u);
  return u;
#endif
}

OF_HD float bits_f32(uint32_t u) {
#ifdef OF_DEVICE_PASS
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, sizeof f);
  return f;
#endif
}

OF_HD float to_float(float x) { return x; }
OF_HD float to_float(bf16 x) { return bits_f32(uint32_t(x.bits) << 16); }

OF_HD float to_float(fp16 x) {
#ifdef OF_DEVICE_PASS
  return __half2float(__ushort_as_half(x.bits));
#else
  // Exponent re-bias by one multiply for normals; subnormals via a magic-number subtraction.
  const uint32_t w = uint32_t(x.bits) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normal = bits_f32((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float subnormal = bits_f32((two_w >> 17) | (126u << 23)) - 0.5f;
  return bits_f32(sign | (two_w < (1u << 27) ? f32_bits(subnormal) : f32_bits(normal)));
#endif
}

template <class T>
OF_HD T from_float(float x);

template <>
OF_HD float from_float<float>(float x) {
  return x;
}

template <>
OF_HD bf16 from_float<bf16>(float x) {
#if defined(OF_DEVICE_PASS) && defined(OF_CUDA)
  return bf16{__bfloat16_as_ushort(__float2bfloat16_rn(x))};
#else
  const uint32_t u = f32_bits(x);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const bool nan = (u & 0x7fffffffu) > 0x7f800000u;
  return bf16{uint16_t(nan ? ((u >> 16) | 0x40u) : rounded)};
#endif
}

template <>
OF_HD fp16 from_float<fp16>(float x) {
#ifdef OF_DEVICE_PASS
  return fp16{__half_as_ushort(__float2half_rn(x))};
#else
  // Scaling by 2^112 then 2^-110 makes the FPU round the mantissa to 10 bits (and overflow to inf);
  // adding a power of two of the right exponent aligns it.
  float base = (fabsf(x) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = f32_bits(x);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  bias = bias < 0x71000000u ? 0x71000000u : bias;
  base = bits_f32((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return fp16{uint16_t((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign))};
#endif
}

// expf. On the host a branch-free version (Cody-Waite reduction by ln2, degree-7 polynomial, ~1.5 ulp) that
// compilers vectorise, where libm's expf keeps loops scalar. inf above ~88.7 (a little early: from 88.03 on),
// 0 below ~-87.3, NaN stays NaN. The clamps act on k and r, not x: a select on x lets the compiler split off
// constant-result paths whose vectorised evaluation underflows (slow denormal arithmetic on every element).
OF_HD float exp_f32(float x) {
#ifdef OF_DEVICE_PASS
  return expf(x);
#else
  constexpr float kShift = 0x1.8p23f;  // adding it rounds to an integer, held in the low mantissa bits
  float k = (x * 1.44269504088896341f + kShift) - kShift;  // round(x / ln2)
  k = k > 128.0f ? 128.0f : k;    // 2^128: the bit pattern of +inf
  k = k < -127.0f ? -127.0f : k;  // 2^-127: the bit pattern of +0
  float r = (x - k * 0.693145751953125f) - k * 1.428606765330187e-06f;  // |r| <= ln2 / 2 when not clamped
  r = r > 1.0f ? 1.0f : r;
  r = r < -1.0f ? -1.0f : r;
  float p = 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p * bits_f32((f32_bits(k + kShift) - f32_bits(kShift) + 127u) << 23);
#endif
}

OF_HD float sigmoid(float g) { return 1.0f / (1.0f + exp_f32(-g)); }

// SwiGLU's activation: silu(gate) * up (OLMo's fused projection is [up | gate]).
OF_HD float silu_mul(float gate, float up) { return gate / (1.0f + exp_f32(-gate)) * up; }

// Its gradients from dout, one pass: d_gate = dout * up * silu'(gate), d_up = dout * silu(gate).
OF_HD void silu_mul_grad(float dout, float gate, float up, float* d_gate, float* d_up) {
  const float s = sigmoid(gate);
  *d_gate = dout * up * s * (1.0f + gate * (1.0f - s));
  *d_up = dout * gate * s;
}

// RoPE inverse frequency of pair i of a head of dim D, as the reference computes it in fp32:
// 1 / theta ** (float(2i) / D).
OF_HD float rope_inv_freq(int64_t i, int64_t head_dim, float theta) {
  return 1.0f / powf(theta, float(2 * i) / float(head_dim));
}

}  // namespace olmo_fast
