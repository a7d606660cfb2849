// Scalar arithmetic of SPEC §3, identical on host and device.
//
// Every operation here is IEEE float32 with one rounding (round to nearest
// even). On the device the explicit *_rn intrinsics keep nvcc from contracting
// a multiply and an add into an FMA; on the host the build passes
// -ffp-contract=off for the same reason. Conversions between float32 and the
// 16-bit storage types are done on the bits, so host and device agree exactly
// (subnormals included: nothing here flushes to zero).
#pragma once

#include <cstdint>
#include <cstring>
#include <cmath>

#if defined(__CUDACC__)
#define MAR_HD __host__ __device__ __forceinline__
#define MAR_UNROLL _Pragma("unroll")
#else
#define MAR_HD inline
#define MAR_UNROLL
#endif

namespace mar {

// Storage types: raw bits; arithmetic always happens in float32.
struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

MAR_HD uint32_t f32_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
#endif
}

MAR_HD float bits_f32(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, 4);
  return f;
#endif
}

// ---- one-rounding float32 operations -------------------------------------
MAR_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
MAR_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
// a * b + c with one rounding. Used only where the product is exact (a power-of-two
// multiple), so that it equals add_rn(mul_rn(a, b), c) in one instruction.
MAR_HD float fma_rn(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}
MAR_HD float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
MAR_HD float sqrt_rn(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}

MAR_HD bool is_nan(float a) { return a != a; }
MAR_HD float abs_f32(float a) { return bits_f32(f32_bits(a) & 0x7fffffffu); }

// max that propagates NaN from either side (numpy's np.maximum). Only ever
// applied to magnitudes (|x|, never -0.0), so which zero or which NaN payload
// comes out does not matter: the device uses the single max.NaN instruction.
MAR_HD float nan_max(float a, float b) {
#if defined(__CUDA_ARCH__)
  float d;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  return d;
#else
  if (is_nan(a)) return a;
  if (is_nan(b)) return b;
  return a > b ? a : b;
#endif
}

// Round-to-nearest-even right shift of a non-negative integer by s >= 1.
MAR_HD uint32_t shift_rne(uint32_t v, uint32_t s) {
  if (s >= 32) return 0;
  uint32_t q = v >> s;
  uint32_t rem = v & ((1u << s) - 1u);
  uint32_t half = 1u << (s - 1u);
  if (rem > half || (rem == half && (q & 1u))) ++q;
  return q;
}

// ---- float32 <-> 16-bit storage --------------------------------------------
MAR_HD float to_f32(float x) { return x; }
MAR_HD float to_f32(bf16_t x) { return bits_f32(uint32_t(x.bits) << 16); }
MAR_HD float to_f32(f16_t x) {
#if defined(__CUDA_ARCH__)
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));  // exact
  return f;
#else
  uint32_t h = x.bits;
  uint32_t sign = (h & 0x8000u) << 16;
  uint32_t e = (h >> 10) & 0x1fu;
  uint32_t m = h & 0x3ffu;
  if (e == 31u) return bits_f32(sign | 0x7f800000u | (m << 13));
  if (e == 0u) {
    // Subnormal: m * 2^-24, exact in float32.
    float v = mul_rn(float(m), 5.9604644775390625e-8f);
    return bits_f32(f32_bits(v) | sign);
  }
  return bits_f32(sign | ((e + 112u) << 23) | (m << 13));
#endif
}

// float32 -> bf16 / f16 bits, round to nearest even, subnormals kept. The
// device uses the hardware conversion (the same rounding; a NaN comes out as
// the canonical NaN, where the host keeps the payload: SPEC §3 leaves NaN
// payloads open).
MAR_HD uint16_t f32_to_bf16_bits(float f) {
#if defined(__CUDA_ARCH__)
  uint16_t h;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
#else
  uint32_t u = f32_bits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);  // quiet NaN
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
#endif
}

MAR_HD uint16_t f32_to_f16_bits(float f) {
#if defined(__CUDA_ARCH__)
  uint16_t h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
#else
  uint32_t u = f32_bits(f);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  if (a > 0x7f800000u) return uint16_t(sign | 0x7e00u | ((a >> 13) & 0x3ffu));  // NaN
  if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // >= 65520 rounds to inf
  if (a >= 0x38800000u) {                                  // normal half (>= 2^-14)
    uint32_t r = a - 0x38000000u;                          // rebias 127 -> 15
    return uint16_t(sign | ((r + 0xfffu + ((r >> 13) & 1u)) >> 13));
  }
  uint32_t e = a >> 23;  // subnormal half: units of 2^-24
  if (e < 102u) return uint16_t(sign);  // below 2^-25: rounds to zero
  uint32_t m = (a & 0x7fffffu) | 0x800000u;
  return uint16_t(sign | shift_rne(m, 126u - e));
#endif
}

// rT of SPEC §3: float32 -> T, round to nearest even.
template <typename T> MAR_HD T from_f32(float f);
template <> MAR_HD float from_f32<float>(float f) { return f; }
template <> MAR_HD bf16_t from_f32<bf16_t>(float f) { return bf16_t{f32_to_bf16_bits(f)}; }
template <> MAR_HD f16_t from_f32<f16_t>(float f) { return f16_t{f32_to_f16_bits(f)}; }

// rT then back: the value an unfused pipeline would hold after storing to T.
template <typename T> MAR_HD float round_to(float f) { return to_f32(from_f32<T>(f)); }

// The floating dtypes an operand may have (activations T; norm weight and
// router scales, which may also be float32 with T 16-bit).
enum class DType : int32_t { kF32 = 0, kBF16 = 1, kF16 = 2 };

// The one dtype dispatch: calls f(T{}) with T the storage type of t (float,
// bf16_t or f16_t) and returns what it returns.
template <typename F>
auto with_float_type(DType t, F&& f) {
  switch (t) {
    case DType::kBF16: return f(bf16_t{});
    case DType::kF16: return f(f16_t{});
    default: return f(float{});
  }
}

MAR_HD float load_f32(const void* base, DType dt, int64_t i) {
  switch (dt) {
    case DType::kBF16: return to_f32(static_cast<const bf16_t*>(base)[i]);
    case DType::kF16: return to_f32(static_cast<const f16_t*>(base)[i]);
    default: return static_cast<const float*>(base)[i];
  }
}

}  // namespace mar
