// The compiled module: FFI handler capsules for registration, the constants
// Python shares with C++ (common/config.h), and the CUDA workspace lifecycle
// when built with CUDA.
#include <nanobind/nanobind.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/tuple.h>
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
// Loads the kernels on each device (at lowering time: outside any captured
// region, before any launch; see prepare_fused_kernels).
void load_kernels_on(const std::vector<int>& devices) {
  int saved = 0;
  cudaGetDevice(&saved);
  for (int d : devices) {
    cudaError_t e = cudaSetDevice(d);
    if (e == cudaSuccess) e = mar::prepare_fused_kernels();
    if (e != cudaSuccess) {
      cudaSetDevice(saved);
      throw std::runtime_error("GPU " + std::to_string(d) + ": loading the kernels: " +
                               cudaGetErrorString(e));
    }
  }
  cudaSetDevice(saved);
}

int64_t create_workspace(const std::vector<std::vector<int>>& groups, uint64_t slot_bytes,
                         double timeout_s) {
  const int64_t id = mar::runtime::create_workspace(groups, slot_bytes, timeout_s);
  for (const auto& group : groups) load_kernels_on(group);
  return id;
}

// Cross-process workspaces (runtime/workspace.h IpcRank, IpcPeer); tuples on the
// Python side, so that jax_moe_ar/multiprocess.py needs no bound classes.
void bind_ipc(nb::module_& m) {
  using RankTuple = std::tuple<int, int, int, int>;  // device, group, rank, nranks
  using PeerTuple = std::tuple<int, nb::bytes, int>;       // local index, handles, ordinal
  m.def(
      "ipc_create",
      [](const std::vector<RankTuple>& ranks, uint64_t slot_bytes, double timeout_s) {
        std::vector<mar::runtime::IpcRank> specs;
        std::vector<int> devices;
        for (const auto& [device, group, rank, nranks] : ranks) {
          specs.push_back({device, group, rank, nranks});
          devices.push_back(device);
        }
        auto [id, handles] = mar::runtime::ipc_create(specs, slot_bytes, timeout_s);
        load_kernels_on(devices);
        std::vector<nb::bytes> out;
        for (const auto& h : handles) out.emplace_back(h.data(), h.size());
        return std::make_pair(id, out);
      },
      nb::arg("ranks"), nb::arg("slot_bytes"), nb::arg("timeout_s"),
      "Allocates this process's ranks [(device, group, rank, nranks)] of a "
      "cross-process workspace; returns (pending id, [IPC handles per rank]).");
  m.def(
      "ipc_attach",
      [](int64_t id, const std::vector<std::vector<PeerTuple>>& peers,
         const std::vector<int>& group_sms) {
        std::vector<std::vector<mar::runtime::IpcPeer>> all;
        for (const auto& group : peers) {
          all.emplace_back();
          for (const auto& [local, handles, ordinal] : group)
            all.back().push_back({local, std::string(handles.c_str(), handles.size()), ordinal});
        }
        mar::runtime::ipc_attach(id, all, group_sms);
      },
      nb::arg("id"), nb::arg("peers"), nb::arg("group_sms"),
      "Opens the peers [[(local index or -1, handles, ordinal or -1)] per local rank] and "
      "sets each local rank's grid; raises RuntimeError naming the reason when it cannot.");
  m.def("ipc_commit", &mar::runtime::ipc_commit, nb::arg("id"),
        "Makes an attached cross-process workspace usable.");
  m.def("ipc_discard", &mar::runtime::ipc_discard, nb::arg("id"),
        "Frees a pending cross-process workspace.");
  m.def("grid_cap", &mar::runtime::grid_cap, nb::arg("ordinal"), nb::arg("sharing"),
        "Blocks a rank on this GPU may launch when `sharing` ranks of its group share it.");
  m.def("device_uuids", &mar::runtime::device_uuids, "UUIDs of the visible GPUs, by ordinal.");
  m.def("synchronize_all", &mar::runtime::synchronize_all,
        "Waits for every GPU of every workspace.");
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
  bind_ipc(m);
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
