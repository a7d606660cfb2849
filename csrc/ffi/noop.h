// Handler symbols of jax_moe_ar_noop_v1 (registered by module.cc; see noop.cc).
#pragma once

#include "xla/ffi/api/c_api.h"

extern "C" XLA_FFI_Error* jax_moe_ar_noop_cpu(XLA_FFI_CallFrame* call_frame);
#if defined(JAX_MOE_AR_WITH_CUDA)
extern "C" XLA_FFI_Error* jax_moe_ar_noop_cuda(XLA_FFI_CallFrame* call_frame);
#endif
