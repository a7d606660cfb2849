// XLA FFI handler of the fused CUDA op. In order: decode the call, fill its
// LayerArgs, check that the workspace can serve it, launch. Command-buffer
// compatible: it only enqueues work.
#include "cuda.h"

#include <cuda_runtime.h>

#include "../kernels/fused.h"
#include "../runtime/workspace.h"
#include "attrs.h"

namespace mar::ffi_glue {
namespace {

ffi::Error failed_precondition(const std::string& why) {
  return ffi::Error(ffi::ErrorCode::kFailedPrecondition, std::string(kTargetFused) + ": " + why);
}

ffi::Error Fused(cudaStream_t stream, int32_t device, ffi::RemainingArgs args,
                 ffi::RemainingRets rets, OpAttrs attrs) {
  LayerArgs a;
  const auto t = decode_call(args, rets, attrs, Stage::kFused, &a);
  if (t.has_error()) return t.error();

  if (attrs.workspace == 0)
    return failed_precondition(
        "this program was lowered without CUDA devices (e.g. jax.export on a CPU host), so no "
        "exchange workspace exists for it; lower it in the process and on the GPUs that run it");
  std::string failure;
  const ExchangeView* view = runtime::find_view(attrs.workspace, device, &failure);
  if (view == nullptr)
    return failed_precondition(
        "no exchange workspace " + std::to_string(attrs.workspace) + " for GPU " +
        std::to_string(device) +
        " in this process (a program lowered by another process, or a persistent compilation "
        "cache entry?)");
  if (!failure.empty()) return ffi::Error(ffi::ErrorCode::kDeadlineExceeded, failure);
  const Algorithm algorithm = Algorithm(attrs.algorithm);
  if (const char* problem = fused_capacity_problem(*t, a, *view, algorithm))
    return ffi::Error::InvalidArgument(std::string(kTargetFused) + ": " + problem);

  const cudaError_t e = launch_fused(*t, a, *view, algorithm, stream);
  if (e != cudaSuccess)
    return ffi::Error::Internal(std::string(kTargetFused) + ": launch failed: " +
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
