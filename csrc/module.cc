// The compiled module: FFI handler capsules for registration, plus the CUDA
// workspace lifecycle when built with CUDA.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/vector.h>

#include "ffi/cpu.h"
#if defined(JAX_MOE_AR_WITH_CUDA)
#include "ffi/cuda.h"
#include "runtime/workspace.h"
#endif

namespace nb = nanobind;

namespace {

template <typename Fn>
nb::capsule handler_capsule(Fn* fn) {
  static_assert(std::is_invocable_r_v<XLA_FFI_Error*, Fn, XLA_FFI_CallFrame*>,
                "an XLA FFI handler");
  return nb::capsule(reinterpret_cast<void*>(fn));
}

#if defined(JAX_MOE_AR_WITH_CUDA)
void bind_workspace(nb::module_& m) {
  m.def("workspace_create", &mar::runtime::create_workspace, nb::arg("groups"),
        nb::arg("slot_bytes"), nb::arg("timeout_s"),
        "Creates the exchange workspace of device groups (CUDA ordinals in rank order); "
        "returns its id. Raises RuntimeError when the groups cannot be served.");
  m.def("take_errors", &mar::runtime::take_errors,
        "Failures the kernels reported since the last call (each returned once).");
  m.def("read_traces", &mar::runtime::read_traces,
        "[(device, words)] phase times of block 0's last call per rank, for workspaces "
        "created with $JAX_MOE_AR_TRACE set (see kernels/fused.h TraceWord).");
  m.def("device_bytes_used", &mar::runtime::device_bytes_used, nb::arg("ordinal"),
        "Bytes of the GPU's memory in use by anyone (cudaMemGetInfo): for leak tests.");
  m.def("reset_all", &mar::runtime::reset_all,
        "Returns every workspace to its fresh state (clears a poisoned one); call only "
        "while no jax_moe_ar program runs.");
  m.def("destroy_all", &mar::runtime::destroy_all, "Frees every workspace.");
}
#endif

}  // namespace

NB_MODULE(_native, m) {
  m.doc() = "jax_moe_ar native module: XLA FFI handlers and CUDA workspaces";

  // {platform: {target name: capsule}}
  m.def("registrations", []() {
    nb::dict cpu, cuda, out;
    cpu["jax_moe_ar_cpu_finalize_v1"] = handler_capsule(jax_moe_ar_cpu_finalize_v1);
    cpu["jax_moe_ar_cpu_tail_v1"] = handler_capsule(jax_moe_ar_cpu_tail_v1);
#if defined(JAX_MOE_AR_WITH_CUDA)
    cuda["jax_moe_ar_fused_v1"] = handler_capsule(jax_moe_ar_fused_v1);
#endif
    out["cpu"] = cpu;
    out["CUDA"] = cuda;
    return out;
  });

#if defined(JAX_MOE_AR_WITH_CUDA)
  m.attr("with_cuda") = true;
  m.attr("cuda_arch") = JAX_MOE_AR_CUDA_ARCH;
  bind_workspace(m);
#else
  m.attr("with_cuda") = false;
#endif
}
