// Exchange workspaces: per device group, peer-visible buffers and counters,
// created once from Python at lowering time and alive until process exit.
// Only the data layout of common/exchange.h is shared with the kernels.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "../common/exchange.h"

namespace mar::runtime {

// Creates a workspace covering `groups` (CUDA device ordinals in rank order),
// each slot holding `slot_bytes`; returns its id. Throws std::runtime_error
// naming the reason when the groups cannot be served (no peer access, not
// sm_90, allocation failure); nothing is left allocated then.
int64_t create_workspace(const std::vector<std::vector<int>>& groups, uint64_t slot_bytes,
                         double timeout_s);

// The view of workspace `id` for the device `ordinal`; nullptr when unknown.
// `failure` receives a message when any rank of the device's group reported a
// failure (the workspace is then poisoned).
const ExchangeView* find_view(int64_t id, int ordinal, std::string* failure);

// The view of the index-th rank of workspace `id` (ranks of all groups in
// order); nullptr when out of range. For groups that name one device several
// times (virtual ranks, scripts/harness), where find_view is ambiguous.
const ExchangeView* find_view_at(int64_t id, size_t index);

// (device ordinal, kTraceWords phase times of block 0's last call) of every
// rank of every workspace created with $JAX_MOE_AR_TRACE set.
std::vector<std::pair<int, std::vector<uint64_t>>> read_traces();

// Messages for failures not reported yet (each is returned once).
std::vector<std::string> take_errors();

// ---- Groups that span processes (jax_moe_ar/multiprocess.py drives these) ----------

// One rank of this process in a group that spans processes.
struct IpcRank {
  int device = -1;     // CUDA ordinal in this process
  int group = 0;       // index of its group among the workspace's groups
  int rank = 0;        // its rank in the group
  int nranks = 1;
};

// Where rank r of a local rank's group lives.
struct IpcPeer {
  int local = -1;       // index of a rank of this workspace (same process), or -1
  std::string handles;  // otherwise: its ipc_handles() from the process that owns it
  int ordinal = -1;     // that rank's GPU as this process sees it, -1 if not visible
};

// Allocates this process's ranks of a cross-process workspace; returns its id
// and, per rank, the CUDA IPC handles of its buffers to publish to the peers.
// The workspace is pending (find_view does not see it) until ipc_attach.
std::pair<int64_t, std::vector<std::string>> ipc_create(const std::vector<IpcRank>& ranks,
                                                         uint64_t slot_bytes, double timeout_s);

// Opens the peers' buffers (peers[i]: the group of local rank i, in rank order)
// and sets each local rank's grid (group_sms[i]: the smallest grid_cap() over
// its group, the same in every process). Throws std::runtime_error naming the
// reason (no peer access, a handle that cannot be opened). Still pending after.
void ipc_attach(int64_t id, const std::vector<std::vector<IpcPeer>>& peers,
                const std::vector<int>& group_sms);

// Makes an attached workspace usable (find_view sees it): once every process
// of its groups has attached.
void ipc_commit(int64_t id);

// Frees a pending workspace (closing what ipc_attach opened).
void ipc_discard(int64_t id);

// Blocks one rank on GPU `ordinal` may launch when `sharing` ranks of its group
// share that GPU (the same rule as create_workspace's virtual ranks).
int grid_cap(int ordinal, int sharing);

// The UUID (32 hex digits) of every GPU this process sees, by ordinal.
std::vector<std::string> device_uuids();

// Waits for every GPU of every workspace (the first half of reset_all).
void synchronize_all();

// Bytes of GPU `ordinal`'s memory in use by anyone (cudaMemGetInfo), for tests.
uint64_t device_bytes_used(int ordinal);

// Returns every workspace to its fresh state (after a reported failure). Only
// while no program using them runs: waits for every GPU of every group first.
// Throws std::runtime_error on a CUDA failure.
void reset_all();

// Frees every workspace (at exit): waits for each device, then releases.
void destroy_all();

}  // namespace mar::runtime
