// jax_moe_ar_noop_v1: a custom call that does no work of its own, for the bench's
// "ffi no-op" column — what XLA itself spends per custom call in a chain, beside the op.
//
// It accepts any operands (the bench passes the op's) and zero-fills its one small result.
// That result is what keeps the call alive: the bench threads it through the chain's
// barrier, so XLA can neither drop the call nor hoist it. On CUDA the zero-fill is one
// memset on XLA's stream, so a command-buffer capture of the call is never empty (XLA
// releases before mid-2026 reject an empty capture); like the op, the handler only
// enqueues work, so it is command-buffer compatible.
#include "noop.h"

#include <cstring>
#include <string>

#include "xla/ffi/api/ffi.h"

#if defined(JAX_MOE_AR_WITH_CUDA)
#include <cuda_runtime.h>
#endif

namespace mar::ffi_glue {
namespace {

namespace ffi = xla::ffi;

ffi::Error NoopCpu(ffi::RemainingArgs, ffi::Result<ffi::AnyBuffer> out) {
  std::memset(out->untyped_data(), 0, out->size_bytes());
  return ffi::Error::Success();
}

#if defined(JAX_MOE_AR_WITH_CUDA)
ffi::Error NoopCuda(cudaStream_t stream, ffi::RemainingArgs, ffi::Result<ffi::AnyBuffer> out) {
  const cudaError_t e = cudaMemsetAsync(out->untyped_data(), 0, out->size_bytes(), stream);
  if (e != cudaSuccess)
    return ffi::Error::Internal(std::string("jax_moe_ar_noop_v1: memset failed: ") +
                                cudaGetErrorString(e));
  return ffi::Error::Success();
}
#endif

}  // namespace
}  // namespace mar::ffi_glue

XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_moe_ar_noop_cpu, mar::ffi_glue::NoopCpu,
                              xla::ffi::Ffi::Bind()
                                  .RemainingArgs()
                                  .Ret<xla::ffi::AnyBuffer>());

#if defined(JAX_MOE_AR_WITH_CUDA)
XLA_FFI_DEFINE_HANDLER_SYMBOL(jax_moe_ar_noop_cuda, mar::ffi_glue::NoopCuda,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .RemainingArgs()
                                  .Ret<xla::ffi::AnyBuffer>(),
                              {xla::ffi::Traits::kCmdBufferCompatible});
#endif
