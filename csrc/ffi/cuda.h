// Handler symbol of the CUDA path (registered by module.cc).
#pragma once

#include "xla/ffi/api/c_api.h"

extern "C" XLA_FFI_Error* jax_moe_ar_fused_v1(XLA_FFI_CallFrame* call_frame);
