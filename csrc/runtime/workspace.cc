#include "workspace.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <stdexcept>


namespace mar::runtime {
namespace {

// $JAX_MOE_AR_TRACE set (and not "0") when a workspace is created: its
// kernels record block 0's phase times of the last call (read_traces).
bool tracing_requested() {
  const char* v = std::getenv("JAX_MOE_AR_TRACE");
  return v != nullptr && *v != '\0' && std::strcmp(v, "0") != 0;
}

void check(cudaError_t e, const std::string& what) {
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear a non-sticky error
    throw std::runtime_error(what + ": " + cudaGetErrorString(e));
  }
}

// Restores the calling thread's current device on scope exit.
struct DeviceGuard {
  int saved = 0;
  DeviceGuard() { cudaGetDevice(&saved); }
  ~DeviceGuard() { cudaSetDevice(saved); }
};

struct Rank {
  int device = -1;
  int group = 0;
  char* area = nullptr;
  char* gather = nullptr;
  DeviceCounters* counters = nullptr;
  ErrorRecord* host_error = nullptr;
  uint64_t* host_trace = nullptr;  // kTraceWords, only when tracing
  bool reported = false;
  ExchangeView view;
};

class Workspace {
 public:
  Workspace(const std::vector<std::vector<int>>& groups, uint64_t slot_bytes, double timeout_s);
  ~Workspace();

  const Rank* rank_on(int ordinal) const {
    for (const Rank& r : ranks_)
      if (r.device == ordinal) return &r;
    return nullptr;
  }
  const Rank* rank_at(size_t index) const { return index < ranks_.size() ? &ranks_[index] : nullptr; }
  std::string failure_of_group(int group) const;
  void collect_errors(std::vector<std::string>* out);
  void collect_traces(std::vector<std::pair<int, std::vector<uint64_t>>>* out) const;
  void reset();

 private:
  std::string describe(const Rank& r) const;
  std::vector<Rank> ranks_;
  uint64_t slot_bytes_;
  double timeout_s_;
};

Workspace::Workspace(const std::vector<std::vector<int>>& groups, uint64_t slot_bytes,
                     double timeout_s)
    : slot_bytes_(slot_bytes), timeout_s_(timeout_s) {
  DeviceGuard guard;
  for (size_t g = 0; g < groups.size(); ++g) {
    const auto& devs = groups[g];
    if (devs.empty() || devs.size() > size_t(kMaxRanks))
      throw std::runtime_error("groups must hold 1 to " + std::to_string(kMaxRanks) + " GPUs");
    for (int d : devs) {
      Rank r;
      r.device = d;
      r.group = int(g);
      ranks_.push_back(r);  // registered first so the destructor frees partial work
      Rank& me = ranks_.back();
      const std::string on = "GPU " + std::to_string(d);
      check(cudaSetDevice(d), "cudaSetDevice(" + std::to_string(d) + ")");
      int major = 0, sms = 0;
      check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, d), on);
      check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, d), on);
      if (major < 9) throw std::runtime_error(on + " is not sm_90 or newer");
      const uint64_t bytes = exchange_area_bytes(devs.size(), slot_bytes);
      check(cudaMalloc(&me.area, bytes), on + ": allocating " + std::to_string(bytes) +
                                             " bytes of exchange buffers");
      check(cudaMemset(me.area, 0xff, bytes), on + ": initialising exchange buffers");
      const uint64_t gather_bytes = gather_area_bytes(slot_bytes);
      check(cudaMalloc(&me.gather, gather_bytes), on + ": allocating " +
                                                      std::to_string(gather_bytes) +
                                                      " bytes of gather buffers");
      check(cudaMemset(me.gather, 0, gather_bytes), on + ": initialising gather buffers");
      check(cudaMalloc(&me.counters, sizeof(DeviceCounters)), on + ": counters");
      check(cudaMemset(me.counters, 0, sizeof(DeviceCounters)), on + ": counters");
      check(cudaHostAlloc(&me.host_error, sizeof(ErrorRecord),
                          cudaHostAllocMapped | cudaHostAllocPortable),
            on + ": error record");
      *me.host_error = ErrorRecord{};
      ErrorRecord* dev_error = nullptr;
      check(cudaHostGetDevicePointer(&dev_error, me.host_error, 0), on + ": error record");
      if (tracing_requested()) {
        check(cudaHostAlloc(&me.host_trace, kTraceWords * sizeof(uint64_t),
                            cudaHostAllocMapped | cudaHostAllocPortable),
              on + ": trace record");
        std::memset(me.host_trace, 0, kTraceWords * sizeof(uint64_t));
        check(cudaHostGetDevicePointer(&me.view.trace, me.host_trace, 0), on + ": trace record");
      }
      me.view.rank = 0;
      me.view.nranks = int(devs.size());
      me.view.slot_bytes = slot_bytes;
      me.view.gather_bytes = gather_bytes;
      me.view.counters = me.counters;
      me.view.error = dev_error;
      me.view.timeout_ns = uint64_t(timeout_s * 1e9);
      // A group may name one device several times (the harness's virtual ranks):
      // those ranks' grids then share its SMs, so that every block stays resident.
      const int sharing = int(std::count(devs.begin(), devs.end(), d));
      me.view.group_sms = std::min(std::max(1, sms / sharing), kMaxGrid);  // then the group's minimum
    }
    // Peer access within the group, both directions.
    for (int a : devs) {
      for (int b : devs) {
        if (a == b) continue;
        int ok = 0;
        check(cudaDeviceCanAccessPeer(&ok, a, b), "cudaDeviceCanAccessPeer");
        if (!ok)
          throw std::runtime_error("GPU " + std::to_string(a) + " cannot access GPU " +
                                   std::to_string(b) + "'s memory (no peer access)");
        check(cudaSetDevice(a), "cudaSetDevice");
        cudaError_t e = cudaDeviceEnablePeerAccess(b, 0);
        if (e == cudaErrorPeerAccessAlreadyEnabled) {
          cudaGetLastError();
        } else {
          check(e, "enabling peer access from GPU " + std::to_string(a) + " to GPU " +
                       std::to_string(b));
        }
      }
    }
  }
  // Every rank sees every peer's area at the same (unified) address, and
  // launches the grid of the group's smallest GPU.
  for (Rank& me : ranks_) {
    int rank = 0;
    int32_t sms = me.view.group_sms;
    for (const Rank& peer : ranks_) {
      if (peer.group != me.group) continue;
      if (&peer == &me) me.view.rank = rank;
      me.view.gathers[rank] = peer.gather;
      me.view.areas[rank++] = peer.area;
      sms = std::min(sms, peer.view.group_sms);
    }
    me.view.group_sms = sms;
  }
  for (const Rank& r : ranks_) {
    check(cudaSetDevice(r.device), "cudaSetDevice");
    check(cudaDeviceSynchronize(), "GPU " + std::to_string(r.device) + ": initialisation");
  }
}

Workspace::~Workspace() {
  DeviceGuard guard;
  for (Rank& r : ranks_) {
    if (cudaSetDevice(r.device) != cudaSuccess) continue;
    cudaDeviceSynchronize();
    if (r.area) cudaFree(r.area);
    if (r.gather) cudaFree(r.gather);
    if (r.counters) cudaFree(r.counters);
    if (r.host_error) cudaFreeHost(r.host_error);
    if (r.host_trace) cudaFreeHost(r.host_trace);
  }
  cudaGetLastError();
}

std::string Workspace::describe(const Rank& r) const {
  const ErrorRecord& e = *r.host_error;
  return "jax_moe_ar_fused_v1: rank " + std::to_string(e.rank) + " (GPU " +
         std::to_string(r.device) + ") waited " + std::to_string(double(e.waited_ns) * 1e-9) +
         " s for rank " + std::to_string(e.peer) + " at call #" + std::to_string(e.epoch) +
         " of its group (bound " + std::to_string(timeout_s_) +
         " s, $JAX_MOE_AR_TIMEOUT_S). Likely cause: the ranks of the group did not all run "
         "the same jax_moe_ar calls (a data- or rank-dependent branch), or a GPU stalled. The "
         "group's workspace is now unusable: its calls return NaN.";
}

std::string Workspace::failure_of_group(int group) const {
  for (const Rank& r : ranks_) {
    if (r.group != group) continue;
    if (reinterpret_cast<const volatile ErrorRecord*>(r.host_error)->flag) return describe(r);
  }
  return "";
}

void Workspace::collect_errors(std::vector<std::string>* out) {
  for (Rank& r : ranks_) {
    if (r.reported || !reinterpret_cast<volatile ErrorRecord*>(r.host_error)->flag) continue;
    r.reported = true;
    out->push_back(describe(r));
  }
}

void Workspace::collect_traces(std::vector<std::pair<int, std::vector<uint64_t>>>* out) const {
  for (const Rank& r : ranks_) {
    if (r.host_trace == nullptr) continue;
    const volatile uint64_t* t = r.host_trace;
    out->emplace_back(r.device, std::vector<uint64_t>(t, t + kTraceWords));
  }
}

// Back to the state of a fresh workspace: waits for every rank's GPU (the
// kernels' waits are bounded, so this ends), then empty slots, zero flags and
// counters, no recorded failure.
void Workspace::reset() {
  DeviceGuard guard;
  for (const Rank& r : ranks_) {
    check(cudaSetDevice(r.device), "cudaSetDevice");
    check(cudaDeviceSynchronize(), "GPU " + std::to_string(r.device) + ": before reset");
  }
  for (Rank& r : ranks_) {
    check(cudaSetDevice(r.device), "cudaSetDevice");
    const std::string on = "GPU " + std::to_string(r.device) + ": reset";
    check(cudaMemset(r.area, 0xff, exchange_area_bytes(r.view.nranks, slot_bytes_)), on);
    check(cudaMemset(r.gather, 0, r.view.gather_bytes), on);
    check(cudaMemset(r.counters, 0, sizeof(DeviceCounters)), on);
    *r.host_error = ErrorRecord{};
    r.reported = false;
  }
  for (const Rank& r : ranks_) {
    check(cudaSetDevice(r.device), "cudaSetDevice");
    check(cudaDeviceSynchronize(), "GPU " + std::to_string(r.device) + ": reset");
  }
}

std::mutex g_mu;
std::map<int64_t, std::unique_ptr<Workspace>> g_workspaces;

// Ids carry a per-process random prefix, so an id baked into a program
// lowered by another process is never mistaken for one of ours.
int64_t next_id() {
  static const int64_t prefix = int64_t(std::random_device{}() & 0x7fffffu) << 24;
  static int64_t counter = 0;
  return prefix | (++counter);
}

}  // namespace

int64_t create_workspace(const std::vector<std::vector<int>>& groups, uint64_t slot_bytes,
                         double timeout_s) {
  auto ws = std::make_unique<Workspace>(groups, slot_bytes, timeout_s);
  std::lock_guard<std::mutex> lock(g_mu);
  const int64_t id = next_id();
  g_workspaces.emplace(id, std::move(ws));
  return id;
}

const ExchangeView* find_view(int64_t id, int ordinal, std::string* failure) {
  std::lock_guard<std::mutex> lock(g_mu);
  auto it = g_workspaces.find(id);
  if (it == g_workspaces.end()) return nullptr;
  const Rank* r = it->second->rank_on(ordinal);
  if (r == nullptr) return nullptr;
  *failure = it->second->failure_of_group(r->group);
  return &r->view;
}

const ExchangeView* find_view_at(int64_t id, size_t index) {
  std::lock_guard<std::mutex> lock(g_mu);
  auto it = g_workspaces.find(id);
  if (it == g_workspaces.end()) return nullptr;
  const Rank* r = it->second->rank_at(index);
  return r == nullptr ? nullptr : &r->view;
}

std::vector<std::pair<int, std::vector<uint64_t>>> read_traces() {
  std::lock_guard<std::mutex> lock(g_mu);
  std::vector<std::pair<int, std::vector<uint64_t>>> out;
  for (auto& entry : g_workspaces) entry.second->collect_traces(&out);
  return out;
}

std::vector<std::string> take_errors() {
  std::lock_guard<std::mutex> lock(g_mu);
  std::vector<std::string> out;
  for (auto& entry : g_workspaces) entry.second->collect_errors(&out);
  return out;
}

uint64_t device_bytes_used(int ordinal) {
  DeviceGuard guard;
  check(cudaSetDevice(ordinal), "cudaSetDevice(" + std::to_string(ordinal) + ")");
  size_t free = 0, total = 0;
  check(cudaMemGetInfo(&free, &total), "cudaMemGetInfo");
  return uint64_t(total - free);
}

void reset_all() {
  std::lock_guard<std::mutex> lock(g_mu);
  for (auto& entry : g_workspaces) entry.second->reset();
}

void destroy_all() {
  std::lock_guard<std::mutex> lock(g_mu);
  g_workspaces.clear();
}

}  // namespace mar::runtime
