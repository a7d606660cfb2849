// XLA FFI handler of the fused CUDA op: decode, find this device's rank in
// the workspace, launch. Command-buffer compatible: it only enqueues work.
#include "cuda.h"

#include <cuda_runtime.h>

#include "../kernels/fused.h"
#include "../runtime/workspace.h"
#include "attrs.h"

namespace mar::ffi_glue {
namespace {

ffi::Error Fused(cudaStream_t stream, int32_t device, ffi::RemainingArgs args,
                 ffi::RemainingRets rets, OpAttrs attrs) {
  const OpConfig c = to_config(attrs);
  if (c.has(kScatter))  // jax_moe_ar/primitives.py FUSED_SCATTER_KERNEL keeps this unreachable
    return ffi::Error(ffi::ErrorCode::kUnimplemented,
                      "jax_moe_ar_fused_v1: the reduce-scatter kernel is not built yet");
  if (attrs.workspace == 0) {
    return ffi::Error(ffi::ErrorCode::kFailedPrecondition,
                      "jax_moe_ar_fused_v1: this program was lowered without CUDA devices "
                      "(e.g. jax.export on a CPU host), so no exchange workspace exists for it; "
                      "lower it in the process and on the GPUs that run it");
  }
  std::string failure;
  const ExchangeView* view = runtime::find_view(attrs.workspace, device, &failure);
  if (view == nullptr) {
    return ffi::Error(ffi::ErrorCode::kFailedPrecondition,
                      "jax_moe_ar_fused_v1: no exchange workspace " +
                          std::to_string(attrs.workspace) + " for GPU " + std::to_string(device) +
                          " in this process (a program lowered by another process, or a "
                          "persistent compilation cache entry?)");
  }
  if (!failure.empty()) return ffi::Error(ffi::ErrorCode::kDeadlineExceeded, failure);

  auto ops = decode_operands(args, c, /*with_tail=*/true);
  if (ops.has_error()) return ops.error();
  auto outs = decode_results(rets, c);
  if (outs.has_error()) return outs.error();

  const ffi::AnyBuffer& residual = *ops->residual;
  auto t = float_dtype(residual.element_type());
  auto gt = float_dtype(ops->gamma->element_type());
  if (!t || !gt || ops->partial->element_type() != residual.element_type())
    return ffi::Error::InvalidArgument("jax_moe_ar_fused_v1: unsupported operand dtypes");

  FusedArgs a;
  a.partial = ops->partial->untyped_data();
  a.M = dim(residual, 0);
  a.H = dim(residual, 1);
  if (!c.has(kDense)) {
    a.P = dim(*ops->partial, 0);
    a.idx = static_cast<const int32_t*>(ops->idx->untyped_data());
    a.K = dim(*ops->idx, 1);
    a.scales = in_ptr(ops->scales);
    if (ops->scales) a.scales_dtype = *float_dtype(ops->scales->element_type());
    a.shared = in_ptr(ops->shared);
  }
  a.residual = residual.untyped_data();
  a.gamma = ops->gamma->untyped_data();
  a.gamma_dtype = *gt;
  a.quant_scale = static_cast<const float*>(in_ptr(ops->quant_scale));
  a.residual_out = out_ptr(outs->residual_out);
  a.norm_out = out_ptr(outs->norm_out);
  a.quant_out = static_cast<uint8_t*>(out_ptr(outs->quant_out));
  a.scale_out = out_ptr(outs->scale_out);
  a.cfg = c;

  if (attrs.algorithm != int32_t(Algorithm::kOneShot) &&
      attrs.algorithm != int32_t(Algorithm::kTwoShot))
    return ffi::Error::InvalidArgument("jax_moe_ar_fused_v1: unknown algorithm code");
  const Algorithm algorithm = Algorithm(attrs.algorithm);
  if (const char* problem = fused_capacity_problem(*t, a, *view, algorithm))
    return ffi::Error::InvalidArgument(std::string("jax_moe_ar_fused_v1: ") + problem);
  const cudaError_t e = launch_fused(*t, a, *view, algorithm, stream);
  if (e != cudaSuccess)
    return ffi::Error::Internal(std::string("jax_moe_ar_fused_v1: launch failed: ") +
                                cudaGetErrorString(e));
  return ffi::Error::Success();
}

}  // namespace
}  // namespace mar::ffi_glue

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_moe_ar_fused_v1, mar::ffi_glue::Fused,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<xla::ffi::DeviceOrdinal>()
                                  .RemainingArgs()
                                  .RemainingRets()
                                  .Attrs<mar::ffi_glue::OpAttrs>(),
                              {xla::ffi::Traits::kCmdBufferCompatible});
