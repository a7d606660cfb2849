// Exchange workspaces: per device group, the peer-visible buffers, counters
// and error records, and the views the kernels read. Over 400 lines because
// both ways a workspace comes to be — every rank in this process
// (create_workspace) or ranks spread over processes, joined through CUDA IPC
// (ipc_create / ipc_attach / ipc_commit) — share one Workspace class and its
// reset, error and lifetime handling.
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
  std::vector<void*> opened;  // peers' buffers this rank's device mapped (CUDA IPC), to close
};

// Blocks one rank may launch: its GPU's SMs shared among the group's ranks on that
// GPU (so that every block of every sharing rank stays resident), at most kMaxGrid.
// The group then launches its smallest rank's value.
int rank_grid_cap(int sms, int sharing) {
  return std::min(std::max(1, sms / std::max(1, sharing)), kMaxGrid);
}

// Lets GPU `a` read and write GPU `b`'s memory; throws naming the pair when it cannot.
void enable_peer_access(int a, int b) {
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

class Workspace {
 public:
  Workspace(const std::vector<std::vector<int>>& groups, uint64_t slot_bytes, double timeout_s);
  // This process's ranks of groups that span processes (runtime/workspace.h IpcRank);
  // usable after attach().
  Workspace(const std::vector<IpcRank>& ranks, uint64_t slot_bytes, double timeout_s);
  ~Workspace();

  size_t size() const { return ranks_.size(); }
  std::string ipc_handles(size_t index) const;
  void attach(const std::vector<std::vector<IpcPeer>>& peers, const std::vector<int>& group_sms);

  const Rank* rank_on(int ordinal) const {
    for (const Rank& r : ranks_)
      if (r.device == ordinal) return &r;
    return nullptr;
  }
  const Rank* rank_at(size_t index) const { return index < ranks_.size() ? &ranks_[index] : nullptr; }
  std::string failure_of_group(int group) const;
  void collect_errors(std::vector<std::string>* out);
  void collect_traces(std::vector<std::pair<int, std::vector<uint64_t>>>* out) const;
  void synchronize() const;
  void reset();

 private:
  void build(const std::vector<std::vector<int>>& groups);
  void build(const std::vector<IpcRank>& ranks);
  void release();
  Rank& allocate(int device, int group, int nranks);
  std::string describe(const Rank& r) const;
  std::vector<Rank> ranks_;
  uint64_t slot_bytes_;
  double timeout_s_;
};

// Allocates and initialises one rank's buffers on `device` (its view's rank and
// peers are filled in later); registered first, so that release() frees partial work.
Rank& Workspace::allocate(int device, int group, int nranks) {
  Rank r;
  r.device = device;
  r.group = group;
  ranks_.push_back(r);
  Rank& me = ranks_.back();
  const std::string on = "GPU " + std::to_string(device);
  check(cudaSetDevice(device), "cudaSetDevice(" + std::to_string(device) + ")");
  int major = 0;
  check(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), on);
  if (major < 9) throw std::runtime_error(on + " is not sm_90 or newer");
  const uint64_t bytes = exchange_area_bytes(uint64_t(nranks), slot_bytes_);
  check(cudaMalloc(&me.area, bytes), on + ": allocating " + std::to_string(bytes) +
                                         " bytes of exchange buffers");
  check(cudaMemset(me.area, 0xff, bytes), on + ": initialising exchange buffers");
  const uint64_t gather_bytes = gather_area_bytes(slot_bytes_);
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
  me.view.nranks = nranks;
  me.view.slot_bytes = slot_bytes_;
  me.view.gather_bytes = gather_bytes;
  me.view.counters = me.counters;
  me.view.error = dev_error;
  me.view.timeout_ns = uint64_t(timeout_s_ * 1e9);
  return me;
}

Workspace::Workspace(const std::vector<std::vector<int>>& groups, uint64_t slot_bytes,
                     double timeout_s)
    : slot_bytes_(slot_bytes), timeout_s_(timeout_s) {
  try {
    build(groups);
  } catch (...) {
    release();  // a throwing constructor runs no destructor
    throw;
  }
}

void Workspace::build(const std::vector<std::vector<int>>& groups) {
  DeviceGuard guard;
  for (size_t g = 0; g < groups.size(); ++g) {
    const auto& devs = groups[g];
    if (devs.empty() || devs.size() > size_t(kMaxRanks))
      throw std::runtime_error("groups must hold 1 to " + std::to_string(kMaxRanks) + " GPUs");
    for (int d : devs) {
      Rank& me = allocate(d, int(g), int(devs.size()));
      int sms = 0;
      check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, d),
            "GPU " + std::to_string(d));
      // A group may name one device several times (the harness's virtual ranks).
      const int sharing = int(std::count(devs.begin(), devs.end(), d));
      me.view.group_sms = rank_grid_cap(sms, sharing);  // then the group's minimum
    }
    // Peer access within the group, both directions.
    for (int a : devs)
      for (int b : devs)
        if (a != b) enable_peer_access(a, b);
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

Workspace::Workspace(const std::vector<IpcRank>& ranks, uint64_t slot_bytes, double timeout_s)
    : slot_bytes_(slot_bytes), timeout_s_(timeout_s) {
  try {
    build(ranks);
  } catch (...) {
    release();
    throw;
  }
}

void Workspace::build(const std::vector<IpcRank>& ranks) {
  DeviceGuard guard;
  for (const IpcRank& spec : ranks) {
    if (spec.nranks < 1 || spec.nranks > kMaxRanks || spec.rank < 0 || spec.rank >= spec.nranks)
      throw std::runtime_error("rank " + std::to_string(spec.rank) + " of a group of " +
                               std::to_string(spec.nranks) + " (groups hold 1 to " +
                               std::to_string(kMaxRanks) + " ranks)");
    Rank& me = allocate(spec.device, spec.group, spec.nranks);
    me.view.rank = spec.rank;
  }
  for (const Rank& r : ranks_) {
    check(cudaSetDevice(r.device), "cudaSetDevice");
    check(cudaDeviceSynchronize(), "GPU " + std::to_string(r.device) + ": initialisation");
  }
}

// The CUDA IPC handles of rank `index`'s exchange area and gather area, back to back.
std::string Workspace::ipc_handles(size_t index) const {
  const Rank& r = ranks_.at(index);
  cudaIpcMemHandle_t h[2];
  const std::string on = "GPU " + std::to_string(r.device) + ": cudaIpcGetMemHandle";
  check(cudaIpcGetMemHandle(&h[0], r.area), on);
  check(cudaIpcGetMemHandle(&h[1], r.gather), on);
  return std::string(reinterpret_cast<const char*>(h), sizeof(h));
}

// Fills every local rank's view with its group's buffers: local peers' directly
// (with peer access), other processes' through CUDA IPC. On a failure the
// mappings made so far stay recorded in `opened` and are closed by release().
void Workspace::attach(const std::vector<std::vector<IpcPeer>>& peers,
                       const std::vector<int>& group_sms) {
  DeviceGuard guard;
  if (peers.size() != ranks_.size() || group_sms.size() != ranks_.size())
    throw std::runtime_error("attach: one list of peers and one grid per local rank is needed");
  for (size_t i = 0; i < ranks_.size(); ++i) {
    Rank& me = ranks_[i];
    me.view.group_sms = std::min(std::max(1, group_sms[i]), kMaxGrid);
    const std::string on = "GPU " + std::to_string(me.device);
    if (peers[i].size() != size_t(me.view.nranks))
      throw std::runtime_error("attach: " + on + " needs " + std::to_string(me.view.nranks) +
                               " peers, got " + std::to_string(peers[i].size()));
    for (size_t r = 0; r < peers[i].size(); ++r) {
      const IpcPeer& p = peers[i][r];
      if (p.local >= 0) {
        if (size_t(p.local) >= ranks_.size() || (r == size_t(me.view.rank)) != (size_t(p.local) == i))
          throw std::runtime_error("attach: bad local peer index");
        const Rank& peer = ranks_[p.local];
        if (peer.device != me.device) enable_peer_access(me.device, peer.device);
        me.view.areas[r] = peer.area;
        me.view.gathers[r] = peer.gather;
        continue;
      }
      if (p.handles.size() != 2 * sizeof(cudaIpcMemHandle_t))
        throw std::runtime_error("attach: a peer's IPC handles must be " +
                                 std::to_string(2 * sizeof(cudaIpcMemHandle_t)) + " bytes");
      if (p.ordinal >= 0 && p.ordinal != me.device) {
        int ok = 0;
        check(cudaDeviceCanAccessPeer(&ok, me.device, p.ordinal), "cudaDeviceCanAccessPeer");
        if (!ok)
          throw std::runtime_error(on + " cannot access GPU " + std::to_string(p.ordinal) +
                                   "'s memory (no peer access)");
      }
      cudaIpcMemHandle_t h[2];
      std::memcpy(h, p.handles.data(), sizeof(h));
      check(cudaSetDevice(me.device), "cudaSetDevice");
      void* ptrs[2] = {nullptr, nullptr};
      for (int k = 0; k < 2; ++k) {
        check(cudaIpcOpenMemHandle(&ptrs[k], h[k], cudaIpcMemLazyEnablePeerAccess),
              on + ": opening rank " + std::to_string(r) +
                  "'s buffers from another process (cudaIpcOpenMemHandle)");
        me.opened.push_back(ptrs[k]);
      }
      me.view.areas[r] = static_cast<char*>(ptrs[0]);
      me.view.gathers[r] = static_cast<char*>(ptrs[1]);
    }
  }
  for (const Rank& r : ranks_) {
    check(cudaSetDevice(r.device), "cudaSetDevice");
    check(cudaDeviceSynchronize(), "GPU " + std::to_string(r.device) + ": attaching peers");
  }
}

Workspace::~Workspace() { release(); }

// Waits for every rank's GPU, then unmaps the peers' buffers each opened and frees
// its own. Errors are ignored: this runs at exit and after failures.
void Workspace::release() {
  DeviceGuard guard;
  for (const Rank& r : ranks_)
    if (cudaSetDevice(r.device) == cudaSuccess) cudaDeviceSynchronize();
  for (Rank& r : ranks_) {
    if (cudaSetDevice(r.device) != cudaSuccess) continue;
    for (void* p : r.opened) cudaIpcCloseMemHandle(p);
    r.opened.clear();
    if (r.area) cudaFree(r.area);
    if (r.gather) cudaFree(r.gather);
    if (r.counters) cudaFree(r.counters);
    if (r.host_error) cudaFreeHost(r.host_error);
    if (r.host_trace) cudaFreeHost(r.host_trace);
    r.area = r.gather = nullptr;
    r.counters = nullptr;
    r.host_error = nullptr;
    r.host_trace = nullptr;
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

// Waits for every rank's GPU (the kernels' waits are bounded, so this ends).
void Workspace::synchronize() const {
  DeviceGuard guard;
  for (const Rank& r : ranks_) {
    check(cudaSetDevice(r.device), "cudaSetDevice");
    check(cudaDeviceSynchronize(), "GPU " + std::to_string(r.device) + ": before reset");
  }
}

// Back to the state of a fresh workspace: after synchronize(), empty slots, zero
// flags and counters, no recorded failure. Only this process's ranks: peers in
// other processes reset theirs (workspace.py reset_workspaces orders the two).
void Workspace::reset() {
  DeviceGuard guard;
  synchronize();
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
// Cross-process workspaces between ipc_create and a successful ipc_attach.
std::map<int64_t, std::unique_ptr<Workspace>> g_pending;

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

std::pair<int64_t, std::vector<std::string>> ipc_create(const std::vector<IpcRank>& ranks,
                                                         uint64_t slot_bytes, double timeout_s) {
  auto ws = std::make_unique<Workspace>(ranks, slot_bytes, timeout_s);
  std::vector<std::string> handles;
  for (size_t i = 0; i < ws->size(); ++i) handles.push_back(ws->ipc_handles(i));
  std::lock_guard<std::mutex> lock(g_mu);
  const int64_t id = next_id();
  g_pending.emplace(id, std::move(ws));
  return {id, handles};
}

void ipc_attach(int64_t id, const std::vector<std::vector<IpcPeer>>& peers,
                const std::vector<int>& group_sms) {
  std::lock_guard<std::mutex> lock(g_mu);
  auto it = g_pending.find(id);
  if (it == g_pending.end()) throw std::runtime_error("no pending workspace " + std::to_string(id));
  it->second->attach(peers, group_sms);
}

void ipc_commit(int64_t id) {
  std::lock_guard<std::mutex> lock(g_mu);
  auto it = g_pending.find(id);
  if (it == g_pending.end()) throw std::runtime_error("no pending workspace " + std::to_string(id));
  g_workspaces.emplace(id, std::move(it->second));
  g_pending.erase(it);
}

void ipc_discard(int64_t id) {
  std::lock_guard<std::mutex> lock(g_mu);
  g_pending.erase(id);
}

int grid_cap(int ordinal, int sharing) {
  int sms = 0;
  check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, ordinal),
        "GPU " + std::to_string(ordinal));
  return rank_grid_cap(sms, sharing);
}

std::vector<std::string> device_uuids() {
  int n = 0;
  check(cudaGetDeviceCount(&n), "cudaGetDeviceCount");
  std::vector<std::string> out;
  for (int d = 0; d < n; ++d) {
    cudaDeviceProp prop;
    check(cudaGetDeviceProperties(&prop, d), "GPU " + std::to_string(d));
    static const char* hex = "0123456789abcdef";
    std::string s;
    for (char c : prop.uuid.bytes) {
      s += hex[(static_cast<unsigned char>(c) >> 4) & 15];
      s += hex[static_cast<unsigned char>(c) & 15];
    }
    out.push_back(s);
  }
  return out;
}

void synchronize_all() {
  std::lock_guard<std::mutex> lock(g_mu);
  for (auto& entry : g_workspaces) entry.second->synchronize();
}

void reset_all() {
  std::lock_guard<std::mutex> lock(g_mu);
  for (auto& entry : g_workspaces) entry.second->reset();
}

void destroy_all() {
  std::lock_guard<std::mutex> lock(g_mu);
  g_pending.clear();
  g_workspaces.clear();
}

}  // namespace mar::runtime
