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

// float8_e4m3fn code of x, round to nearest even. Callers saturate first
// (|x| <= 448); NaN maps to the NaN code 0x7f with x's sign.
MAR_HD uint8_t e4m3_encode(float x) {
  uint32_t u = f32_bits(x);
  uint32_t sign = (u >> 24) & 0x80u;
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint8_t(sign | 0x7fu);
  if (a >= 0x3c800000u) {  // >= 2^-6: normal e4m3 (exponent bias 7)
    uint32_t e = (a >> 23) - 120u;  // 127 - 7
    uint32_t q = (e << 3) | ((a >> 20) & 0x7u);
    uint32_t rem = a & 0xfffffu;
    if (rem > 0x80000u || (rem == 0x80000u && (q & 1u))) ++q;  // carry bumps exponent
    return uint8_t(sign | q);
  }
  // Subnormal e4m3: multiples of 2^-9; 8 * 2^-9 is the smallest normal (code 8).
  uint32_t e = a >> 23;
  if (e < 117u) return uint8_t(sign);  // below 2^-10: rounds to zero
  uint32_t m = (a & 0x7fffffu) | 0x800000u;  // value = m * 2^(e-150)
  return uint8_t(sign | shift_rne(m, 141u - e));  // units of 2^-9
}

MAR_HD float e4m3_decode(uint8_t c) {
  uint32_t sign = uint32_t(c & 0x80u) << 24;
  uint32_t e = (c >> 3) & 0xfu;
  uint32_t m = c & 0x7u;
  if (e == 15u && m == 7u) return bits_f32(sign | 0x7fc00000u);
  if (e == 0u) return bits_f32(f32_bits(mul_rn(float(m), 0.001953125f)) | sign);  // m * 2^-9
  return bits_f32(sign | ((e + 120u) << 23) | (m << 20));
}

// float4_e2m1fn code (4 bits) of x, round to nearest even. Callers saturate
// first (|x| <= 6). NaN has no code in e2m1: it maps to 0x7 with x's sign
// (SPEC: codes of a block holding NaN are unspecified).
MAR_HD uint8_t e2m1_encode(float x) {
  uint32_t u = f32_bits(x);
  uint32_t sign = (u >> 28) & 0x8u;
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint8_t(sign | 0x7u);
  if (a >= 0x3f800000u) {  // >= 1: normal e2m1 (exponent bias 1)
    uint32_t e = (a >> 23) - 126u;
    uint32_t q = (e << 1) | ((a >> 22) & 0x1u);
    uint32_t rem = a & 0x3fffffu;
    if (rem > 0x200000u || (rem == 0x200000u && (q & 1u))) ++q;
    return uint8_t(sign | (q > 7u ? 7u : q));
  }
  uint32_t e = a >> 23;  // subnormal e2m1: multiples of 0.5
  if (e < 125u) return uint8_t(sign);  // below 0.25: rounds to zero
  uint32_t m = (a & 0x7fffffu) | 0x800000u;
  return uint8_t(sign | shift_rne(m, 149u - e));  // units of 2^-1
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

// FP8 code of one element given the reciprocal of its dequant scale.
MAR_HD uint8_t fp8_code(float q, float inv_scale) {
  return e4m3_encode(sat(mul_rn(q, inv_scale), kFp8Max));
}

// NVFP4 block scale code: e4m3(sat(g * (vmax / 6), 448)).
MAR_HD uint8_t nvfp4_scale_code(float vmax, float global_scale) {
  return e4m3_encode(sat(mul_rn(global_scale, div_rn(vmax, kFp4Max)), kFp8Max));
}

// Multiplier applied to a block's values: g / f32(sf), or 0 when sf is 0.
MAR_HD float nvfp4_out_scale(uint8_t sf_code, float global_scale) {
  float sf = e4m3_decode(sf_code);
  return sf == 0.0f ? 0.0f : div_rn(global_scale, sf);
}

MAR_HD uint8_t nvfp4_code(float q, float out_scale) {
  return e2m1_encode(sat(mul_rn(q, out_scale), kFp4Max));
}

// ---- layouts ------------------------------------------------------------
MAR_HD int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Byte offset of block scale (row m, block b) in the swizzled 128x4 layout,
// Kt = ceil(H / 64) tiles of 4 blocks per 128-row band:
//   (m/128)*Kt*512 + (b/4)*512 + (m%32)*16 + ((m%128)/32)*4 + b%4
MAR_HD int64_t swizzled_128x4_offset(int64_t m, int64_t b, int64_t H) {
  int64_t kt = (H + 63) / 64;
  return (m / 128) * kt * 512 + (b / 4) * 512 + (m % 32) * 16 + ((m % 128) / 32) * 4 + (b % 4);
}

}  // namespace mar
