// XLA FFI handlers of the CPU path: local finalize, then (after the
// all_gather the lowering places between them) the rank-ordered tail.
#include "cpu.h"

#include "../kernels/cpu.h"
#include "attrs.h"

namespace mar::ffi_glue {
namespace {

ffi::Error Finalize(ffi::RemainingArgs args, ffi::RemainingRets rets, OpAttrs attrs) {
  const OpConfig c = to_config(attrs);
  auto ops = decode_operands(args, c, /*with_tail=*/false);
  if (ops.has_error()) return ops.error();
  auto wire = rets.get<ffi::AnyBuffer>(0);
  if (wire.has_error()) return wire.error();
  const ffi::AnyBuffer& x = *ops->partial;
  auto t = float_dtype(x.element_type());
  if (!t) return ffi::Error::InvalidArgument("jax_moe_ar finalize: expert_out must be bf16/f16/f32");
  FinalizeArgs a;
  a.expert_out = x.untyped_data();
  a.P = dim(x, 0);
  a.H = dim(x, 1);
  a.idx = static_cast<const int32_t*>(ops->idx->untyped_data());
  a.M = dim(*ops->idx, 0);
  a.K = dim(*ops->idx, 1);
  a.scales = in_ptr(ops->scales);
  if (ops->scales) a.scales_dtype = *float_dtype(ops->scales->element_type());
  a.shared = in_ptr(ops->shared);
  a.routed_scaling_factor = c.routed_scaling_factor;
  a.wire = (*wire)->untyped_data();
  switch (*t) {
    case DType::kF32: cpu_finalize<float>(a); break;
    case DType::kBF16: cpu_finalize<bf16_t>(a); break;
    case DType::kF16: cpu_finalize<f16_t>(a); break;
  }
  return ffi::Error::Success();
}

ffi::Error Tail(ffi::RemainingArgs args, ffi::RemainingRets rets, OpAttrs attrs) {
  OpConfig c = to_config(attrs);
  // The gathered partials stand where the dense x would: decode as dense.
  c.flags |= kDense;
  auto ops = decode_operands(args, c, /*with_tail=*/true);
  if (ops.has_error()) return ops.error();
  auto outs = decode_results(rets, c);
  if (outs.has_error()) return outs.error();
  const ffi::AnyBuffer& parts = *ops->partial;  // [N, M, H]
  auto t = float_dtype(parts.element_type());
  auto gt = float_dtype(ops->gamma->element_type());
  if (!t || !gt) return ffi::Error::InvalidArgument("jax_moe_ar tail: unsupported dtype");
  TailArgs a;
  a.partials = parts.untyped_data();
  a.N = dim(parts, 0);
  a.M = dim(parts, 1);
  a.H = dim(parts, 2);
  a.residual = ops->residual->untyped_data();
  a.gamma = ops->gamma->untyped_data();
  a.gamma_dtype = *gt;
  a.quant_scale = static_cast<const float*>(in_ptr(ops->quant_scale));
  a.cfg = c;
  a.residual_out = out_ptr(outs->residual_out);
  a.norm_out = out_ptr(outs->norm_out);
  a.quant_out = static_cast<uint8_t*>(out_ptr(outs->quant_out));
  a.scale_out = out_ptr(outs->scale_out);
  switch (*t) {
    case DType::kF32: cpu_tail<float>(a); break;
    case DType::kBF16: cpu_tail<bf16_t>(a); break;
    case DType::kF16: cpu_tail<f16_t>(a); break;
  }
  return ffi::Error::Success();
}

}  // namespace
}  // namespace mar::ffi_glue

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_moe_ar_cpu_finalize_v1, mar::ffi_glue::Finalize,
                              xla::ffi::Ffi::Bind()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attrs<mar::ffi_glue::OpAttrs>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_moe_ar_cpu_tail_v1, mar::ffi_glue::Tail,
                              xla::ffi::Ffi::Bind()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attrs<mar::ffi_glue::OpAttrs>());
