// The compiled module: FFI handler capsules for registration, the constants
// Python shares with C++ (common/config.h), and the CUDA workspace lifecycle
// when built with CUDA.
#include <nanobind/nanobind.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "common/config.h"
#include "common/exchange.h"
#include "ffi/cpu.h"
#include "ffi/noop.h"
#if defined(JAX_MOE_AR_WITH_CUDA)
#include <cuda_runtime.h>

#include <stdexcept>

#include "ffi/cuda.h"
#include "kernels/fused.h"
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

// Every list of common/config.h as a {Python name: value} dict.
nb::dict constants() {
  using namespace mar;
  nb::dict kinds, flags, algorithms, limits, targets, out;
#define MAR_KIND(name, py, value) kinds[#py] = int32_t(QuantKind::name);
#define MAR_FLAG(name, py, value) flags[#py] = int32_t(name);
#define MAR_ALGO(name, py, value) algorithms[#py] = int32_t(Algorithm::name);
#define MAR_LIMIT(name, py, value) limits[#py] = int64_t(name);
#define MAR_TARGET(name, py, value) targets[#py] = std::string(name);
  MAR_QUANT_KINDS(MAR_KIND)
  MAR_OP_FLAGS(MAR_FLAG)
  MAR_ALGORITHMS(MAR_ALGO)
  MAR_LIMITS(MAR_LIMIT)
  MAR_TARGETS(MAR_TARGET)
#undef MAR_KIND
#undef MAR_FLAG
#undef MAR_ALGO
#undef MAR_LIMIT
#undef MAR_TARGET
  limits["num_buffers"] = int64_t(kNumBuffers);
  out["quant_kinds"] = kinds;
  out["op_flags"] = flags;
  out["algorithms"] = algorithms;
  out["limits"] = limits;
  out["targets"] = targets;
  return out;
}

#if defined(JAX_MOE_AR_WITH_CUDA)
// Creates the workspace, then loads the kernels on each of its devices (at
// lowering time: outside any captured region, before any launch).
int64_t create_workspace(const std::vector<std::vector<int>>& groups, uint64_t slot_bytes,
                         double timeout_s) {
  const int64_t id = mar::runtime::create_workspace(groups, slot_bytes, timeout_s);
  int saved = 0;
  cudaGetDevice(&saved);
  for (const auto& group : groups) {
    for (int d : group) {
      cudaError_t e = cudaSetDevice(d);
      if (e == cudaSuccess) e = mar::prepare_fused_kernels();
      if (e != cudaSuccess) {
        cudaSetDevice(saved);
        throw std::runtime_error("GPU " + std::to_string(d) + ": loading the kernels: " +
                                 cudaGetErrorString(e));
      }
    }
  }
  cudaSetDevice(saved);
  return id;
}

void bind_workspace(nb::module_& m) {
  m.def("workspace_create", &create_workspace, nb::arg("groups"), nb::arg("slot_bytes"),
        nb::arg("timeout_s"),
        "Creates the exchange workspace of device groups (CUDA ordinals in rank order); "
        "returns its id. Raises RuntimeError when the groups cannot be served.");
  m.def("take_errors", &mar::runtime::take_errors,
        "Failures the kernels reported since the last call (each returned once).");
  m.def("read_traces", &mar::runtime::read_traces,
        "[(device, words)] phase times of block 0's last call per rank, for workspaces "
        "created with $JAX_MOE_AR_TRACE set (see common/exchange.h TraceWord).");
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
  m.doc() = "jax_moe_ar native module: XLA FFI handlers, shared constants, CUDA workspaces";

  m.def("constants", &constants,
        "{quant_kinds, op_flags, algorithms, limits, targets}: the numbers and names Python "
        "shares with the C++ (csrc/common/config.h), each a {name: value} dict.");

  // {platform: {target name: capsule}}
  m.def("registrations", []() {
    nb::dict cpu, cuda, out;
    cpu[mar::kTargetCpuFinalize] = handler_capsule(jax_moe_ar_cpu_finalize_v1);
    cpu[mar::kTargetCpuTail] = handler_capsule(jax_moe_ar_cpu_tail_v1);
    cpu[mar::kTargetNoop] = handler_capsule(jax_moe_ar_noop_cpu);
#if defined(JAX_MOE_AR_WITH_CUDA)
    cuda[mar::kTargetFused] = handler_capsule(jax_moe_ar_fused_v1);
    cuda[mar::kTargetNoop] = handler_capsule(jax_moe_ar_noop_cuda);
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
