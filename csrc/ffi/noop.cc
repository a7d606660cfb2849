// jax_moe_ar_noop_v1: a custom call that does no work of its own, for the bench's
// "ffi no-op" column — what XLA itself spends per custom call in a chain, beside the op.
//
// It accepts any operands (the bench passes the op's) and returns one small result, whose
// value nobody reads: it is what keeps the call alive (the bench threads it into the next
// call as an operand, so XLA can neither drop the call nor hoist it). On CUDA the handler
// enqueues nothing on a plain stream, so the column is XLA's own cost per custom call and
// nothing of ours (it stayed at ~3 us on the 1xH200 host when this dropped the memset it
// used to enqueue every call: docs/perf.md v15). While XLA captures the call into a
// command buffer it enqueues one 4-byte memset, so that the capture is never empty (XLA
// releases before mid-2026 reject an empty capture); like the op, it is command-buffer
// compatible.
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
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  cudaError_t e = cudaStreamIsCapturing(stream, &capture);
  if (e == cudaSuccess && capture == cudaStreamCaptureStatusNone) return ffi::Error::Success();
  e = cudaMemsetAsync(out->untyped_data(), 0, out->size_bytes(), stream);
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
