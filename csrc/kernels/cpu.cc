// CPU stages of the op: sequential loops around the common/ math.
#include "cpu.h"

#include <cstring>
#include <vector>

#if defined(__SSE__) || defined(__x86_64__)
#include <xmmintrin.h>
#endif

#include "../common/layer_math.h"
#include "../common/quant.h"

namespace mar {

namespace {

// XLA's CPU runtime runs with denormals flushed (FTZ/DAZ); SPEC §3 is IEEE
// float32 with subnormals. Clear the flush bits for the duration of a stage.
class IeeeDenormals {
 public:
#if defined(__SSE__) || defined(__x86_64__)
  IeeeDenormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ & ~(0x8000u | 0x0040u)); }
  ~IeeeDenormals() { _mm_setcsr(saved_); }

 private:
  unsigned saved_;
#elif defined(__aarch64__)
  IeeeDenormals() {
    asm volatile("mrs %0, fpcr" : "=r"(saved_));
    uint64_t v = saved_ & ~(uint64_t(1) << 24);  // FZ
    asm volatile("msr fpcr, %0" ::"r"(v));
  }
  ~IeeeDenormals() { asm volatile("msr fpcr, %0" ::"r"(saved_)); }

 private:
  uint64_t saved_;
#endif
};

}  // namespace

template <typename T>
void cpu_finalize(const LayerArgs& a) {
  IeeeDenormals ieee;
  const T* x = static_cast<const T*>(a.partial);
  const T* shared = static_cast<const T*>(a.shared);
  T* wire = static_cast<T*>(a.wire);
  for (int64_t m = 0; m < a.M; ++m) {
    const int32_t* idx_row = a.idx + m * a.K;
    auto weights = [&](int k0, const bool (&in)[8], float (&w)[8]) {
      load_weights<8>(a.scales, a.scales_dtype, m * a.K + k0, in, w);
    };
    for (int64_t h = 0; h < a.H; ++h) {
      float acc[1];
      finalize_columns<1>(
          acc, idx_row, int(a.K), a.P, weights,
          [&](int32_t p, bool ok) { return ok ? x[p * a.H + h] : T{}; },
          [](T raw, float (&v)[1]) { v[0] = to_f32(raw); });
      float sh[1] = {0.0f};
      if (shared) sh[0] = to_f32(shared[m * a.H + h]);
      finalize_scale_and_shared<1>(acc, a.cfg.routed_scaling_factor, sh, shared != nullptr);
      wire[m * a.H + h] = from_f32<T>(acc[0]);
    }
  }
}

namespace {

// Quantizes one row of norm_out values (already rounded to T, held as float32).
void quantize_row(const LayerArgs& a, int64_t m, const float* q) {
  const OpConfig& c = a.cfg;
  const int64_t H = a.H;
  uint8_t* codes = a.quant_out;
  switch (c.quant) {
    case QuantKind::kFp8Static: {
      const float inv = div_rn(1.0f, a.quant_scale[0]);
      for (int64_t h = 0; h < H; ++h) codes[m * H + h] = fp8_code(q[h], inv);
      break;
    }
    case QuantKind::kFp8PerToken: {
      float amax = 0.0f;
      for (int64_t h = 0; h < H; ++h) amax = nan_max(amax, abs_f32(q[h]));
      const float s = fp8_scale(amax);
      const float inv = div_rn(1.0f, s);
      static_cast<float*>(a.scale_out)[m] = s;
      for (int64_t h = 0; h < H; ++h) codes[m * H + h] = fp8_code(q[h], inv);
      break;
    }
    case QuantKind::kFp8PerGroup: {
      const int64_t gs = c.group_size, G = H / gs;
      for (int64_t g = 0; g < G; ++g) {
        float amax = 0.0f;
        for (int64_t h = g * gs; h < (g + 1) * gs; ++h) amax = nan_max(amax, abs_f32(q[h]));
        float s = fp8_scale(amax);
        if (c.has(kUe8m0)) s = ue8m0_round(s);
        const float inv = div_rn(1.0f, s);
        static_cast<float*>(a.scale_out)[c.has(kScaleCol) ? g * a.M + m : m * G + g] = s;
        for (int64_t h = g * gs; h < (g + 1) * gs; ++h) codes[m * H + h] = fp8_code(q[h], inv);
      }
      break;
    }
    case QuantKind::kNvFp4: {
      const float g = a.quant_scale[0];
      const int64_t nb = H / kFp4Block;
      uint8_t* sf_out = static_cast<uint8_t*>(a.scale_out);
      for (int64_t b = 0; b < nb; ++b) {
        const float* v = q + b * kFp4Block;
        float vmax = 0.0f;
        for (int j = 0; j < kFp4Block; ++j) vmax = nan_max(vmax, abs_f32(v[j]));
        const uint8_t sf = uint8_t(nvfp4_scale_code(vmax, g));
        const float os = nvfp4_out_scale(sf, g);
        sf_out[c.has(kFp4Swizzled) ? swizzled_128x4_offset(m, b, H) : m * nb + b] = sf;
        for (int j = 0; j < kFp4Block; j += 8) {  // 8 codes: 4 bytes, little-endian
          const uint32_t w = nvfp4_pack<8>(v + j, os);
          uint8_t* out = codes + m * (H / 2) + (b * kFp4Block + j) / 2;
          for (int k = 0; k < 4; ++k) out[k] = uint8_t(w >> (8 * k));
        }
      }
      break;
    }
    case QuantKind::kNone:
      break;
  }
}

}  // namespace

template <typename T>
void cpu_tail(const LayerArgs& a) {
  IeeeDenormals ieee;
  const OpConfig& c = a.cfg;
  const int64_t M = a.M, H = a.H, MH = M * H;
  const T* parts = static_cast<const T*>(a.partial);
  const T* residual = static_cast<const T*>(a.residual);
  const bool quant = c.has(kOutQuant) && c.quant != QuantKind::kNone;
  if (quant && c.quant == QuantKind::kNvFp4 && c.has(kFp4Swizzled)) {
    // Padding rows and blocks of the swizzled layout are zero.
    const int64_t bytes = round_up(M, 128) * round_up(H / kFp4Block, 4);
    std::memset(a.scale_out, 0, size_t(bytes));
  }
  std::vector<float> res(static_cast<size_t>(H)), nrm(static_cast<size_t>(H));
  for (int64_t m = 0; m < M; ++m) {
    double sum_sq = 0.0;
    for (int64_t h = 0; h < H; ++h) {
      const int64_t i = m * H + h;
      float y = to_f32(parts[i]);
      for (int64_t s = 1; s < a.N; ++s) y = rank_sum_step(y, to_f32(parts[s * MH + i]));
      const T r = residual_value<T>(y, to_f32(residual[i]));
      if (a.residual_out) static_cast<T*>(a.residual_out)[i] = r;
      res[h] = to_f32(r);
      sum_sq = add_square(sum_sq, res[h]);
    }
    const float inv = rms_inv(sum_sq, H, c.eps);
    for (int64_t h = 0; h < H; ++h) {
      const T n = norm_value<T>(res[h], inv, c.norm_weight_offset,
                                load_f32(a.gamma, a.gamma_dtype, h));
      if (a.norm_out) static_cast<T*>(a.norm_out)[m * H + h] = n;
      nrm[h] = to_f32(n);
    }
    if (quant) quantize_row(a, m, nrm.data());
  }
}

template void cpu_finalize<float>(const LayerArgs&);
template void cpu_finalize<bf16_t>(const LayerArgs&);
template void cpu_finalize<f16_t>(const LayerArgs&);
template void cpu_tail<float>(const LayerArgs&);
template void cpu_tail<bf16_t>(const LayerArgs&);
template void cpu_tail<f16_t>(const LayerArgs&);

}  // namespace mar
