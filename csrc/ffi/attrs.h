// What every handler of the op decodes: one attribute struct and the
// operand/result lists of SPEC §2, filled once into a LayerArgs. XLA types
// stop here: kernels and CPU stages see raw pointers only.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "xla/ffi/api/ffi.h"

#include "../common/args.h"

namespace mar::ffi_glue {

namespace ffi = xla::ffi;

// One attribute struct for every handler. Names are the attribute names the
// lowering emits (src/jax_moe_ar/primitives.py, OpConfig.attributes).
struct OpAttrs {
  int32_t quant;
  int32_t flags;
  float routed_scaling_factor;
  float eps;
  float norm_weight_offset;
  int32_t group_size;
  int64_t workspace;  // 0 on CPU
  int32_t algorithm;  // 0 on CPU; common/config.h Algorithm
};

inline OpConfig to_config(const OpAttrs& a) {
  OpConfig c;
  c.quant = QuantKind(a.quant);
  c.flags = a.flags;
  c.routed_scaling_factor = a.routed_scaling_factor;
  c.eps = a.eps;
  c.norm_weight_offset = a.norm_weight_offset;
  c.group_size = a.group_size;
  return c;
}

// Which handler decodes: its operand and result lists.
//   kFused:       [partial, idx*, residual, gamma, scales*, shared*, quant_scale*]
//                 -> [residual_out*, norm_out*, quant*, scale*]
//   kCpuFinalize: [expert_out, idx, scales*, shared*] -> [wire]
//   kCpuTail:     [wires [N, M, H], residual, gamma, quant_scale*] -> as kFused
// (* only when the attributes say so; idx, scales and shared are MoE only.)
enum class Stage { kFused, kCpuFinalize, kCpuTail };

namespace detail {

inline std::optional<DType> float_dtype(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32: return DType::kF32;
    case ffi::DataType::BF16: return DType::kBF16;
    case ffi::DataType::F16: return DType::kF16;
    default: return std::nullopt;
  }
}

inline ffi::Error invalid(const std::string& what) {
  return ffi::Error::InvalidArgument("jax_moe_ar: " + what);
}

}  // namespace detail

// Decodes args/rets into *a and returns the activation dtype T. Checks the
// counts and the dtypes the kernels rely on; the shapes were checked when the
// program was traced (src/jax_moe_ar/ops.py).
inline ffi::ErrorOr<DType> decode_call(const ffi::RemainingArgs& args,
                                       const ffi::RemainingRets& rets, const OpAttrs& attrs,
                                       Stage stage, LayerArgs* a) {
  using detail::float_dtype;
  using detail::invalid;
  a->cfg = to_config(attrs);
  const OpConfig& c = a->cfg;
  const bool moe = !c.has(kDense) && stage != Stage::kCpuTail;
  size_t i = 0;
  std::optional<ffi::Error> failed;
  auto next = [&]() -> std::optional<ffi::AnyBuffer> {
    auto b = args.get<ffi::AnyBuffer>(i++);
    if (b.has_error()) {
      if (!failed) failed = b.error();
      return std::nullopt;
    }
    return *b;
  };
  auto dim = [](const ffi::AnyBuffer& b, size_t d) { return int64_t(b.dimensions()[d]); };

  const auto partial = next();
  if (failed) return ffi::Unexpected(*failed);
  const auto t = float_dtype(partial->element_type());
  if (!t) return ffi::Unexpected(invalid("the partial must be bf16, f16 or f32"));
  a->partial = partial->untyped_data();
  if (stage == Stage::kCpuTail) {
    a->N = dim(*partial, 0);
    a->M = dim(*partial, 1);
    a->H = dim(*partial, 2);
  } else {
    a->H = dim(*partial, 1);
    a->M = a->P = dim(*partial, 0);  // dense: P unused
  }
  if (moe) {
    const auto idx = next();
    if (failed) return ffi::Unexpected(*failed);
    a->idx = static_cast<const int32_t*>(idx->untyped_data());
    a->M = dim(*idx, 0);
    a->K = dim(*idx, 1);
  } else {
    a->P = 0;
  }
  if (stage != Stage::kCpuFinalize) {
    const auto residual = next(), gamma = next();
    if (failed) return ffi::Unexpected(*failed);
    const auto gt = float_dtype(gamma->element_type());
    if (residual->element_type() != partial->element_type() || !gt)
      return ffi::Unexpected(invalid("residual must have the partial's dtype, norm_weight a float dtype"));
    a->residual = residual->untyped_data();
    a->gamma = gamma->untyped_data();
    a->gamma_dtype = *gt;
  }
  if (moe) {
    if (c.has(kHasScales)) {
      const auto scales = next();
      if (failed) return ffi::Unexpected(*failed);
      const auto st = float_dtype(scales->element_type());
      if (!st) return ffi::Unexpected(invalid("expert_scales must be a float dtype"));
      a->scales = scales->untyped_data();
      a->scales_dtype = *st;
    }
    if (c.has(kHasShared)) {
      const auto shared = next();
      if (failed) return ffi::Unexpected(*failed);
      a->shared = shared->untyped_data();
    }
  }
  if (stage != Stage::kCpuFinalize && c.quantizes() && quant_takes_scale_input(c.quant)) {
    const auto scale = next();
    if (failed) return ffi::Unexpected(*failed);
    a->quant_scale = static_cast<const float*>(scale->untyped_data());
  }
  if (i != args.size())
    return ffi::Unexpected(invalid("got " + std::to_string(args.size()) +
                                   " operands, the attributes describe " + std::to_string(i)));

  size_t j = 0;
  auto take = [&](void** out) {
    auto r = rets.get<ffi::AnyBuffer>(j++);
    if (r.has_error()) {
      if (!failed) failed = r.error();
      return;
    }
    *out = (*r)->untyped_data();
  };
  if (stage == Stage::kCpuFinalize) {
    take(&a->wire);
  } else {
    if (c.has(kOutResidual)) take(&a->residual_out);
    if (c.has(kOutNorm)) take(&a->norm_out);
    if (c.quantizes()) {
      void* codes = nullptr;
      take(&codes);
      a->quant_out = static_cast<uint8_t*>(codes);
      if (quant_has_scale_output(c.quant)) take(&a->scale_out);
    }
  }
  if (failed) return ffi::Unexpected(*failed);
  if (j != rets.size())
    return ffi::Unexpected(invalid("got " + std::to_string(rets.size()) +
                                   " results, the attributes describe " + std::to_string(j)));
  return *t;
}

}  // namespace mar::ffi_glue

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(
    mar::ffi_glue::OpAttrs,
    xla::ffi::StructMember<int32_t>("quant"),
    xla::ffi::StructMember<int32_t>("flags"),
    xla::ffi::StructMember<float>("routed_scaling_factor"),
    xla::ffi::StructMember<float>("eps"),
    xla::ffi::StructMember<float>("norm_weight_offset"),
    xla::ffi::StructMember<int32_t>("group_size"),
    xla::ffi::StructMember<int64_t>("workspace"),
    xla::ffi::StructMember<int32_t>("algorithm"));
