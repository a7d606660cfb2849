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

// Bytes of GPU `ordinal`'s memory in use by anyone (cudaMemGetInfo), for tests.
uint64_t device_bytes_used(int ordinal);

// Returns every workspace to its fresh state (after a reported failure). Only
// while no program using them runs: waits for every GPU of every group first.
// Throws std::runtime_error on a CUDA failure.
void reset_all();

// Frees every workspace (at exit): waits for each device, then releases.
void destroy_all();

}  // namespace mar::runtime
