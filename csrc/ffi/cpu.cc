// XLA FFI handlers of the CPU path: local finalize, then (after the
// all_gather the lowering places between them) the rank-ordered tail.
#include "cpu.h"

#include "../kernels/cpu.h"
#include "attrs.h"

namespace mar::ffi_glue {
namespace {

ffi::Error Finalize(ffi::RemainingArgs args, ffi::RemainingRets rets, OpAttrs attrs) {
  LayerArgs a;
  const auto t = decode_call(args, rets, attrs, Stage::kCpuFinalize, &a);
  if (t.has_error()) return t.error();
  with_float_type(*t, [&](auto tag) { cpu_finalize<decltype(tag)>(a); });
  return ffi::Error::Success();
}

ffi::Error Tail(ffi::RemainingArgs args, ffi::RemainingRets rets, OpAttrs attrs) {
  LayerArgs a;
  const auto t = decode_call(args, rets, attrs, Stage::kCpuTail, &a);
  if (t.has_error()) return t.error();
  with_float_type(*t, [&](auto tag) { cpu_tail<decltype(tag)>(a); });
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
