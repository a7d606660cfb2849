// What every handler of the op decodes: one attribute struct, the dtype
// mapping, and the operand/result lists of SPEC §2 in the order
// jax_moe_ar/primitives.py emits them. XLA types stop here: kernels see raw
// pointers only.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "xla/ffi/api/ffi.h"

#include "../common/config.h"
#include "../common/numerics.h"

namespace mar::ffi_glue {

namespace ffi = xla::ffi;

// One attribute struct for every handler. Names are the attribute names the
// lowering emits (see primitives.py `_attributes`).
struct OpAttrs {
  int32_t quant;
  int32_t flags;
  float routed_scaling_factor;
  float eps;
  float norm_weight_offset;
  int32_t group_size;
  int64_t workspace;  // 0 on CPU
  int32_t algorithm;  // 0 on CPU; see kernels/fused.h
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

// Activation dtype T -> our enum; nullopt for anything else.
inline std::optional<DType> float_dtype(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32: return DType::kF32;
    case ffi::DataType::BF16: return DType::kBF16;
    case ffi::DataType::F16: return DType::kF16;
    default: return std::nullopt;
  }
}

inline int64_t dim(const ffi::AnyBuffer& b, size_t i) { return b.dimensions()[i]; }

// Operands of the op, decoded from the custom call's argument list.
struct Operands {
  // MoE: expert_out [P,H], idx [M,K]; dense: x [M,H] in `partial`.
  std::optional<ffi::AnyBuffer> partial, idx, scales, shared;
  std::optional<ffi::AnyBuffer> residual, gamma, quant_scale;
};

struct Results {
  std::optional<ffi::Result<ffi::AnyBuffer>> residual_out, norm_out, quant_out, scale_out;
};

// Decodes `count` leading arguments in the order [partial, (idx), residual,
// gamma, (scales), (shared), (quant_scale)] as the flags say. When
// `with_tail` is false the layout is the CPU finalize stage's:
// [expert_out, idx, (scales), (shared)].
inline ffi::ErrorOr<Operands> decode_operands(const ffi::RemainingArgs& args, const OpConfig& c,
                                              bool with_tail) {
  Operands o;
  size_t i = 0;
  auto next = [&]() -> ffi::ErrorOr<ffi::AnyBuffer> { return args.get<ffi::AnyBuffer>(i++); };
#define MAR_NEXT(field)                      \
  do {                                       \
    auto r = next();                         \
    if (r.has_error()) return ffi::Unexpected(r.error()); \
    o.field.emplace(*r);                     \
  } while (0)
  MAR_NEXT(partial);
  if (!c.has(kDense)) MAR_NEXT(idx);
  if (with_tail) {
    MAR_NEXT(residual);
    MAR_NEXT(gamma);
  }
  if (!c.has(kDense)) {
    if (c.has(kHasScales)) MAR_NEXT(scales);
    if (c.has(kHasShared)) MAR_NEXT(shared);
  }
  if (with_tail && quant_takes_scale_input(c.quant) && c.has(kOutQuant)) MAR_NEXT(quant_scale);
#undef MAR_NEXT
  if (i != args.size()) {
    return ffi::Unexpected(ffi::Error::InvalidArgument(
        "jax_moe_ar: got " + std::to_string(args.size()) + " operands, the attributes describe " +
        std::to_string(i)));
  }
  return o;
}

inline ffi::ErrorOr<Results> decode_results(const ffi::RemainingRets& rets, const OpConfig& c) {
  Results r;
  size_t i = 0;
  auto take = [&](std::optional<ffi::Result<ffi::AnyBuffer>>& slot) -> std::optional<ffi::Error> {
    auto x = rets.get<ffi::AnyBuffer>(i++);
    if (x.has_error()) return x.error();
    slot.emplace(*x);
    return std::nullopt;
  };
  if (c.has(kOutResidual))
    if (auto e = take(r.residual_out)) return ffi::Unexpected(*e);
  if (c.has(kOutNorm))
    if (auto e = take(r.norm_out)) return ffi::Unexpected(*e);
  if (c.has(kOutQuant) && c.quant != QuantKind::kNone) {
    if (auto e = take(r.quant_out)) return ffi::Unexpected(*e);
    if (quant_has_scale_output(c.quant))
      if (auto e = take(r.scale_out)) return ffi::Unexpected(*e);
  }
  if (i != rets.size()) {
    return ffi::Unexpected(ffi::Error::InvalidArgument(
        "jax_moe_ar: got " + std::to_string(rets.size()) + " results, the attributes describe " +
        std::to_string(i)));
  }
  return r;
}

inline const void* in_ptr(const std::optional<ffi::AnyBuffer>& b) {
  return b ? b->untyped_data() : nullptr;
}
inline void* out_ptr(std::optional<ffi::Result<ffi::AnyBuffer>>& b) {
  return b ? (*b)->untyped_data() : nullptr;
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
