// Quantizers and scale layouts of SPEC §3, identical on host and device.
//
// The float8/float4 encoders are written on the bits (round to nearest even)
// rather than through hardware conversions so that the CPU path, which CI
// runs, executes exactly the code the kernels execute.
#pragma once

#include "numerics.h"

namespace mar {

constexpr float kFp8Max = 448.0f;   // largest finite float8_e4m3fn
constexpr float kFp4Max = 6.0f;     // largest float4_e2m1fn
constexpr float kAmaxFloor = 1e-10f;
constexpr int kFp4Block = 16;       // NVFP4 elements per scale

// float8_e4m3fn code of x, round to nearest even, saturating: |x| >= 448,
// infinities included, gives 448's code 0x7e, which is SPEC §3's sat(x, 448)
// followed by the encoding, so callers need not saturate first (one integer min
// on the magnitude's bits instead of two compares and two selects per element).
// NaN maps to the NaN code 0x7f with x's sign. Branch-free: both candidate
// codes are computed and one is selected. The code comes in the low 8 bits of a
// 32-bit word (the rest zero), so that packing needs no narrowing masks.
MAR_HD uint32_t e4m3_encode(float x) {
  const uint32_t u = f32_bits(x);
  const uint32_t sign = (u >> 24) & 0x80u;
  const uint32_t a = u & 0x7fffffffu;
  // >= 2^-6, normal e4m3: keep exponent and 3 mantissa bits, rounding the 20
  // dropped bits to nearest even (a carry moves into the exponent, as it
  // must), then rebias the exponent from 127 to 7. Magnitudes above 448
  // (0x43e00000) are taken as 448.
  const uint32_t s = a < 0x43e00000u ? a : 0x43e00000u;
  const uint32_t normal = ((s + 0x7ffffu + ((s >> 20) & 1u)) >> 20) - (120u << 3);
  // < 2^-6, subnormal e4m3: multiples of 2^-9. |x| * 2^9 < 8 is exact, and
  // adding 2^23 rounds it to an integer (nearest even); 8 is the smallest normal.
  // (One fma: the product is exact, so the sum is the one rounding.)
  const uint32_t sub = f32_bits(fma_rn(abs_f32(x), 512.0f, 8388608.0f)) - 0x4b000000u;
  const uint32_t q = a > 0x7f800000u ? 0x7fu : (a >= 0x3c800000u ? normal : sub);
  return sign | q;
}

MAR_HD float e4m3_decode(uint8_t c) {
  uint32_t sign = uint32_t(c & 0x80u) << 24;
  uint32_t e = (c >> 3) & 0xfu;
  uint32_t m = c & 0x7u;
  if (e == 15u && m == 7u) return bits_f32(sign | 0x7fc00000u);
  if (e == 0u) return bits_f32(f32_bits(mul_rn(float(m), 0.001953125f)) | sign);  // m * 2^-9
  return bits_f32(sign | ((e + 120u) << 23) | (m << 20));
}

// float4_e2m1fn code (4 bits) of x, round to nearest even, saturating: |x| >= 6,
// infinities included, gives 6's code 7, which is SPEC §3's sat(x, 6) followed by
// the encoding, so callers need not saturate first. NaN has no code in e2m1: it
// gives 0x7 with x's sign (SPEC §3: codes of a block holding NaN are
// unspecified). Both come from the normal branch, with no compare of their own:
// magnitudes from 6 to 7 round to 6's code 7, and a magnitude of 7 or more (the
// bits of Inf and NaN too) gives a code of 8 or more, clamped to 7 (no overflow:
// the bits are below 2^31). Branch-free, as above.
MAR_HD uint8_t e2m1_encode(float x) {
  const uint32_t u = f32_bits(x);
  const uint32_t sign = (u >> 28) & 0x8u;
  const uint32_t a = u & 0x7fffffffu;
  // >= 1, normal e2m1: exponent and 1 mantissa bit, the 22 dropped bits
  // rounded to nearest even, exponent rebiased from 127 to 1; 6 is code 7.
  const uint32_t normal = ((a + 0x1fffffu + ((a >> 22) & 1u)) >> 22) - (126u << 1);
  // < 1, subnormal e2m1: multiples of 0.5, rounded like e4m3's above (2 is 1.0).
  const uint32_t sub = f32_bits(fma_rn(abs_f32(x), 2.0f, 8388608.0f)) - 0x4b000000u;
  const uint32_t q = a >= 0x3f800000u ? (normal > 7u ? 7u : normal) : sub;
  return sign | q;
}

MAR_HD float e2m1_decode(uint8_t c) {
  const float mag[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
  float v = mag[c & 0x7u];
  return (c & 0x8u) ? -v : v;
}

// ---- scales -------------------------------------------------------------
// FP8 dequant scale from an absolute maximum: max(amax, 1e-10) / 448.
MAR_HD float fp8_scale(float amax) { return div_rn(nan_max(amax, kAmaxFloor), kFp8Max); }

// ue8m0: s -> 2^ceil(log2 s) for positive s (NaN and Inf unchanged).
MAR_HD float ue8m0_round(float s) {
  uint32_t u = f32_bits(s);
  if ((u & 0x7f800000u) == 0x7f800000u) return s;
  if ((u & 0x7fffffu) != 0u) u = (u & 0xff800000u) + 0x800000u;
  return bits_f32(u);
}

// FP8 code of one element given the reciprocal of its dequant scale:
// e4m3(sat(q * inv_scale, 448)), e4m3_encode saturating.
MAR_HD uint32_t fp8_code(float q, float inv_scale) { return e4m3_encode(mul_rn(q, inv_scale)); }

// NVFP4 block scale code: e4m3(sat(g * (vmax / 6), 448)), e4m3_encode saturating.
MAR_HD uint32_t nvfp4_scale_code(float vmax, float global_scale) {
  return e4m3_encode(mul_rn(global_scale, div_rn(vmax, kFp4Max)));
}

// Multiplier applied to a block's values: g / f32(sf), or 0 when sf is 0.
MAR_HD float nvfp4_out_scale(uint32_t sf_code, float global_scale) {
  const float sf = e4m3_decode(uint8_t(sf_code));  // a code is one byte
  return sf == 0.0f ? 0.0f : div_rn(global_scale, sf);
}

// e2m1(sat(q * out_scale, 6)) in the low 4 bits: e2m1_encode saturates.
MAR_HD uint32_t nvfp4_code(float q, float out_scale) { return e2m1_encode(mul_rn(q, out_scale)); }

// The codes of n consecutive values of one block (n even, at most 8) as SPEC §3's
// bytes, little-endian: value j's code in bits 4j .. 4j + 3, so byte j / 2 is
// code(j) | code(j + 1) << 4. The fields are disjoint, so each code is added in (one
// shift-and-add on the device) rather than or-ed after a shift.
template <int n>
MAR_HD uint32_t nvfp4_pack(const float* q, float out_scale) {
  static_assert(n % 2 == 0 && n <= 8, "n codes of 4 bits fill at most one 32-bit word");
  uint32_t w = 0;
  MAR_UNROLL
  for (int j = 0; j < n; ++j) w += nvfp4_code(q[j], out_scale) << (4 * j);
  return w;
}

// ---- layouts ------------------------------------------------------------
MAR_HD int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Byte offset of block scale (row m, block b) in the swizzled 128x4 layout,
// Kt = ceil(H / 64) tiles of 4 blocks per 128-row band:
//   (m/128)*Kt*512 + (b/4)*512 + (m%32)*16 + ((m%128)/32)*4 + b%4
// In the integer type of its arguments: int64_t on the host, uint32_t in the
// kernels (whose arrays stay under 2^31 elements), where it is shifts and masks.
template <typename I>
MAR_HD I swizzled_128x4_offset(I m, I b, I H) {
  const I kt = (H + 63) / 64;
  return (m / 128) * kt * 512 + (b / 4) * 512 + (m % 32) * 16 + ((m % 128) / 32) * 4 + (b % 4);
}

}  // namespace mar
