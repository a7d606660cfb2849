// Handler symbols of the CPU path (registered by module.cc).
#pragma once

#include "xla/ffi/api/c_api.h"

extern "C" XLA_FFI_Error* jax_moe_ar_cpu_finalize_v1(XLA_FFI_CallFrame* call_frame);
extern "C" XLA_FFI_Error* jax_moe_ar_cpu_tail_v1(XLA_FFI_CallFrame* call_frame);
