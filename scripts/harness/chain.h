// --chain C: C calls in a row, call k reading as its residual the residual_out
// that call k - 1 wrote (two buffers in turn), captured into one CUDA graph per
// rank with nothing between the calls. The kernels are launched so that each
// may start while its predecessor still runs (programmatic dependent launch)
// and must wait for it before reading anything (device.cuh,
// wait_for_predecessor); a kernel that read early would take a residual its
// predecessor had not yet written, and the chain's end would differ from the
// CPU path's run of the same chain, which this checks (verify.h's rules).
// A build with -DMAR_SKIP_PREDECESSOR_WAIT shows that the check can fail.
#pragma once

#include <functional>
#include <vector>

#include "inputs.h"
#include "verify.h"

namespace harness {

// run_graphs(calls) captures calls[r] into one graph on rank r's stream for
// every rank, then launches all the graphs and waits for them (every buffer is
// allocated before: an allocation could wait for a rank whose graph waits for
// a peer not yet launched).
inline bool chain_matches_cpu(
    const Options& o, const std::vector<RankInputs>& ins,
    const std::function<void(const std::vector<std::vector<mar::LayerArgs>>&)>& run_graphs,
    const std::function<void(size_t)>& set) {
  const size_t bytes = size_t(o.M) * size_t(o.H) * 2;
  std::vector<std::vector<mar::LayerArgs>> calls(ins.size());  // [rank][call]
  for (size_t r = 0; r < ins.size(); ++r) {
    set(r);
    void* buf[2] = {upload(ins[r].residual), zeros(bytes)};
    const mar::LayerArgs outs = with_outputs(ins[r].args, o);  // quant and norm outputs: the last call's
    for (int k = 0; k < o.chain; ++k) {
      mar::LayerArgs a = outs;
      a.residual = buf[k % 2];
      a.residual_out = buf[(k + 1) % 2];
      calls[r].push_back(a);
    }
  }
  for (size_t r = 0; r < ins.size(); ++r) {  // every upload done
    set(r);
    check(cudaDeviceSynchronize(), "synchronize");
  }
  run_graphs(calls);
  // The CPU path's chain: each call's residual_out is the next call's residual.
  std::vector<RankInputs> host = ins;
  std::vector<uint8_t> want;
  for (int k = 0; k < o.chain; ++k) {
    want = cpu_outputs(o, host);
    for (RankInputs& in : host) std::memcpy(in.residual.data(), want.data(), bytes);
  }
  bool ok = true;
  for (size_t r = 0; r < ins.size(); ++r) {
    set(r);
    const std::string what = "chain rank " + std::to_string(r);
    ok = verify_rank(outputs_of(calls[r].back(), o), want, o, what.c_str()) && ok;
  }
  if (ok) std::printf("CHAIN OK: %d calls in one graph per rank, each reading the residual its predecessor wrote\n", o.chain);
  else std::printf("CHAIN FAIL: the chain's outputs differ from the CPU path's chain\n");
  return ok;
}

}  // namespace harness
