// Standalone timing harness of the fused kernels, without JAX or XLA: for
// profilers that need a plain process (ncu), for timing kernel variants, and
// for checks the JAX tests cannot make on a machine with one GPU. It creates
// the exchange workspace the Python package does, random bf16 inputs for each
// rank, and runs launch_fused on one stream per rank.
//
// Times (µs per call): from CUDA-graph replays of --iters launches (`graph`)
// and from the same launches issued one by one (`plain`); with --floors 1,
// beside them the floors of floors.cuh measured in the same run, and the op's
// ratio to the largest.
//   --virtual 1  puts all ranks on GPU 0, each on its own stream with a share
//                of the SMs (runtime: virtual ranks). No NVLink: its times say
//                nothing of the exchange; it runs the multi-rank protocols on a
//                single-GPU machine.
//   --check 1    runs one-shot and two-shot interleaved call by call on one
//                workspace, each into its own outputs, and requires every output
//                byte of both and of every rank to equal rank 0's one-shot
//                (the ranks share residual and gamma, as SPEC §2 requires).
//   --verify 1   compares rank 0's outputs with the package's CPU path run on
//                the host from the same inputs (verify.h).
//   --scatter 1  times the reduce-scatter variant instead, then requires each
//                rank's M/N rows to equal the all-reduce's rows (scatter.h).
//   --prefix P   then runs a call of only the first P rows (on every rank) and
//                requires its outputs to equal those rows of the M-row call,
//                byte for byte: with P below the many-rows switch and M above
//                it, the two geometries of fused.cu must agree.
//   --chain C    then runs C calls in one graph, each reading the residual its
//                predecessor wrote, and requires the last call's outputs to
//                equal the CPU path's run of the same chain (chain.h).
//   --host 1     also prints the host's time per launch call: the op's
//                launch_fused (every rank's), its plan alone, and an empty kernel
//                launched with the op's shape and PDL and without. Without a CUDA graph
//                (as XLA runs a custom call by default) a call costs at least this.
// Exit status 1 when a check fails or a kernel reports a failure.
//
// Build: scripts/harness/build.sh (the CMake target `harness`). Examples:
//   harness --ranks 1 --M 1 --floors 1
//   ncu --kernel-name regex:oneshot -c 3 harness --ranks 1 --M 1 --iters 50 --graph 0
//   harness --ranks 4 --virtual 1 --check 1 --verify 1 --M 3001 --quant nvfp4
// ncu serializes kernels, so profile with --ranks 1 (a group of one never waits).
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

#include "chain.h"
#include "floors.cuh"
#include "inputs.h"
#include "kernels/fused.h"
#include "runtime/workspace.h"
#include "scatter.h"
#include "verify.h"

namespace {

using namespace harness;

void usage() {
  std::fprintf(stderr,
               "harness [--ranks N] [--M m] [--H h] [--K k] [--iters n] [--warmup n]\n"
               "        [--algo oneshot|twoshot] [--quant none|fp8_static|fp8_per_token|"
               "fp8_per_group|nvfp4] [--group-size g]\n"
               "        [--virtual 0|1] [--check 0|1] [--verify 0|1] [--floors 0|1] [--graph 0|1]\n"
               "        [--timeout seconds (bound of every wait, default 10)] [--scatter 0|1]\n"
               "        [--prefix rows] [--chain calls] [--host 0|1]\n");
  std::exit(2);
}

Options parse(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    const std::string k = argv[i];
    if (i + 1 >= argc) usage();
    const char* v = argv[++i];
    if (k == "--ranks") o.ranks = std::atoi(v);
    else if (k == "--M") o.M = std::atoi(v);
    else if (k == "--H") o.H = std::atoi(v);
    else if (k == "--K") o.K = std::atoi(v);
    else if (k == "--iters") o.iters = std::atoi(v);
    else if (k == "--warmup") o.warmup = std::atoi(v);
    else if (k == "--algo") o.algo = v;
    else if (k == "--quant") o.quant = v;
    else if (k == "--group-size") o.group_size = std::atoi(v);
    else if (k == "--virtual") o.virtual_ranks = std::atoi(v) != 0;
    else if (k == "--check") o.check = std::atoi(v) != 0;
    else if (k == "--verify") o.verify = std::atoi(v) != 0;
    else if (k == "--floors") o.floors = std::atoi(v) != 0;
    else if (k == "--graph") o.graph = std::atoi(v) != 0;
    else if (k == "--timeout") o.timeout_s = std::atof(v);
    else if (k == "--scatter") o.scatter = std::atoi(v) != 0;
    else if (k == "--prefix") o.prefix = std::atoi(v);
    else if (k == "--chain") o.chain = std::atoi(v);
    else if (k == "--host") o.host = std::atoi(v) != 0;
    else usage();
  }
  if (o.ranks < 1 || o.ranks > int(mar::kMaxRanks) || o.M < 1 || o.H % 16 != 0 || o.K < 1 ||
      o.iters < 1 || o.group_size < 1 || o.H % o.group_size != 0 ||
      (o.scatter && (o.M % o.ranks != 0 || o.check)) || o.prefix < 0 || o.prefix > o.M ||
      (o.prefix && o.scatter) || o.chain < 0 || (o.chain && o.scatter))
    usage();
  output_bytes(o);  // refuses an unknown --quant
  return o;
}

mar::Algorithm algorithm_named(const std::string& name) {
  if (name == "oneshot") return mar::Algorithm::kOneShot;
  if (name == "twoshot") return mar::Algorithm::kTwoShot;
  usage();
  return mar::Algorithm::kOneShot;
}

// The ranks' devices and streams, and µs-per-iteration timers over them.
struct Ranks {
  std::vector<int> devs;
  std::vector<cudaStream_t> streams;
  std::vector<cudaEvent_t> start, stop;

  void set(size_t r) const { check(cudaSetDevice(devs[r]), "cudaSetDevice"); }

  std::vector<double> elapsed_us(int n) const {
    std::vector<double> us;
    for (size_t r = 0; r < devs.size(); ++r) {
      set(r);
      check(cudaStreamSynchronize(streams[r]), "synchronize");
      float ms = 0.0f;
      check(cudaEventElapsedTime(&ms, start[r], stop[r]), "elapsed");
      us.push_back(1e3 * double(ms) / n);
    }
    return us;
  }

  // n iterations of launch(r) on every rank's stream, issued one by one.
  std::vector<double> plain(int n, const std::function<void(size_t)>& launch) const {
    for (size_t r = 0; r < devs.size(); ++r) {
      set(r);
      check(cudaEventRecord(start[r], streams[r]), "record");
    }
    for (int i = 0; i < n; ++i)
      for (size_t r = 0; r < devs.size(); ++r) {
        set(r);
        launch(r);
      }
    for (size_t r = 0; r < devs.size(); ++r) {
      set(r);
      check(cudaEventRecord(stop[r], streams[r]), "record");
    }
    return elapsed_us(n);
  }

  // One CUDA graph per rank of what body(r) launches on rank r's stream, every
  // rank's captured before any is launched (ranks wait for each other).
  std::vector<cudaGraphExec_t> capture(const std::function<void(size_t)>& body) const {
    std::vector<cudaGraphExec_t> exec(devs.size());
    for (size_t r = 0; r < devs.size(); ++r) {
      set(r);
      cudaGraph_t g;
      check(cudaStreamBeginCapture(streams[r], cudaStreamCaptureModeRelaxed), "capture");
      body(r);
      check(cudaStreamEndCapture(streams[r], &g), "end capture");
      check(cudaGraphInstantiate(&exec[r], g, 0), "instantiate");
      check(cudaGraphDestroy(g), "graph destroy");
    }
    return exec;
  }

  void destroy(const std::vector<cudaGraphExec_t>& exec) const {
    for (size_t r = 0; r < devs.size(); ++r) {
      set(r);
      check(cudaGraphExecDestroy(exec[r]), "exec destroy");
    }
  }

  // The same n iterations captured into one CUDA graph per rank, replayed once
  // untimed and once timed (graphs of all ranks launched together).
  std::vector<double> graph(int n, const std::function<void(size_t)>& launch) const {
    const std::vector<cudaGraphExec_t> exec = capture([&](size_t r) {
      for (int i = 0; i < n; ++i) launch(r);
    });
    for (int timed = 0; timed < 2; ++timed) {
      for (size_t r = 0; r < devs.size(); ++r) {
        set(r);
        check(cudaEventRecord(start[r], streams[r]), "record");
      }
      for (size_t r = 0; r < devs.size(); ++r) {
        set(r);
        check(cudaGraphLaunch(exec[r], streams[r]), "graph launch");
      }
      for (size_t r = 0; r < devs.size(); ++r) {
        set(r);
        check(cudaEventRecord(stop[r], streams[r]), "record");
      }
      if (!timed) elapsed_us(n);
    }
    const std::vector<double> us = elapsed_us(n);
    destroy(exec);
    return us;
  }
};

double max_of(const std::vector<double>& v) { return *std::max_element(v.begin(), v.end()); }

void print_times(const char* what, const std::vector<double>& us) {
  std::printf(" %s", what);
  for (double u : us) std::printf(" %.2f", u);
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  int count = 0;
  check(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
  if (!o.virtual_ranks && count < o.ranks) {
    std::fprintf(stderr, "%d ranks asked, %d GPUs here (--virtual 1 puts them all on GPU 0)\n",
                 o.ranks, count);
    return 1;
  }
  Ranks rk;
  for (int d = 0; d < o.ranks; ++d) rk.devs.push_back(o.virtual_ranks ? 0 : d);
  const uint64_t slot = std::max<uint64_t>(1u << 20, uint64_t(o.M) * o.H * 2);
  int64_t ws = 0, floor_ws = 0;
  try {
    ws = mar::runtime::create_workspace({rk.devs}, slot, o.timeout_s);
    if (o.floors && o.ranks > 1) floor_ws = mar::runtime::create_workspace({rk.devs}, 1u << 20, o.timeout_s);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "workspace: %s\n", e.what());
    return 1;
  }
  // Every kernel loaded before any launch (see prepare_fused_kernels).
  for (int d = 0; d < count && d < o.ranks; ++d) {
    check(cudaSetDevice(rk.devs[d]), "cudaSetDevice");
    check(mar::prepare_fused_kernels(), "loading the kernels");
    cudaFuncAttributes attr;
    for (const void* k : {reinterpret_cast<const void*>(&empty_kernel<false>), reinterpret_cast<const void*>(&empty_kernel<true>),
                          reinterpret_cast<const void*>(&memory_kernel<false>), reinterpret_cast<const void*>(&memory_kernel<true>),
                          reinterpret_cast<const void*>(&protocol_kernel)})
      check(cudaFuncGetAttributes(&attr, k), "loading the floor kernels");
  }
  // Algorithms run: the one asked, or under --check both, interleaved.
  std::vector<std::string> names = {o.algo};
  if (o.check) names = {"oneshot", "twoshot"};
  std::vector<mar::Algorithm> algos;
  for (const auto& n : names) algos.push_back(algorithm_named(n));
  std::mt19937 rng(7);
  std::vector<RankInputs> ins;
  std::vector<std::vector<mar::LayerArgs>> args(algos.size());  // [algorithm][rank]
  std::vector<const mar::ExchangeView*> views;
  for (size_t r = 0; r < rk.devs.size(); ++r) {
    rk.set(r);
    ins.push_back(make_inputs(o, rng, 11));
    views.push_back(mar::runtime::find_view_at(ws, r));
    for (size_t v = 0; v < algos.size(); ++v) {
      args[v].push_back(with_outputs(ins[r].args, o));
      if (const char* problem =
              mar::fused_capacity_problem(mar::DType::kBF16, args[v][r], *views[r], algos[v])) {
        std::fprintf(stderr, "capacity (%s): %s\n", names[v].c_str(), problem);
        return 1;
      }
    }
    rk.streams.emplace_back();
    rk.start.emplace_back();
    rk.stop.emplace_back();
    check(cudaStreamCreateWithFlags(&rk.streams[r], cudaStreamNonBlocking), "stream");
    check(cudaEventCreate(&rk.start[r]), "event");
    check(cudaEventCreate(&rk.stop[r]), "event");
  }
  std::vector<mar::LayerArgs> scatter;  // [rank]
  for (size_t r = 0; o.scatter && r < rk.devs.size(); ++r) {
    rk.set(r);
    scatter.push_back(scatter_args(ins[r].args, o, int(r)));
  }
  auto op = [&](size_t r) {
    if (o.scatter) {
      check(mar::launch_fused(mar::DType::kBF16, scatter[r], *views[r], algos[0], rk.streams[r]),
            "launch");
      return;
    }
    for (size_t v = 0; v < algos.size(); ++v)
      check(mar::launch_fused(mar::DType::kBF16, args[v][r], *views[r], algos[v], rk.streams[r]),
            "launch");
  };
  rk.plain(o.warmup, op);
  const std::vector<double> plain = rk.plain(o.iters, op);
  std::vector<double> graph;
  if (o.graph) graph = rk.graph(o.iters, op);
  const double per = 1.0 / double(algos.size());  // µs per call of one algorithm

  std::string label = o.scatter ? "reduce-scatter" : names[0];
  for (size_t v = 1; v < names.size(); ++v) label += "+" + names[v];
  const mar::LaunchShape shape = mar::fused_launch_shape(
      mar::DType::kBF16, o.scatter ? scatter[0] : args[0][0], *views[0], algos[0]);
  std::printf("ranks %d%s M %d H %d K %d %s %s (grid %d x %d threads, cluster %d): µs per call",
              o.ranks, o.virtual_ranks ? " (virtual, GPU 0)" : "", o.M, o.H, o.K, label.c_str(),
              o.quant.c_str(), shape.grid, shape.block, shape.cluster);
  auto scaled = [per](std::vector<double> us) {
    for (double& u : us) u *= per;
    return us;
  };
  if (o.graph) print_times("graph", scaled(graph));
  print_times("| plain", scaled(plain));
  std::printf("\n");

  if (o.floors) {
    // Launch floor: an empty kernel of the op's grid.
    const auto empty = [&](bool pdl) {
      const void* k = pdl ? reinterpret_cast<const void*>(&empty_kernel<true>)
                          : reinterpret_cast<const void*>(&empty_kernel<false>);
      return [&, k, pdl](size_t r) { check(launch_floor(k, shape, pdl, rk.streams[r], nullptr), "empty launch"); };
    };
    // Memory floor: each rank reads its input bytes and writes its output bytes once.
    std::vector<void*> in_buf, out_buf;
    std::vector<size_t> in_vecs, out_vecs;
    int sms = 0;
    check(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, rk.devs[0]), "attribute");
    for (size_t r = 0; r < rk.devs.size(); ++r) {
      rk.set(r);
      in_vecs.push_back((min_input_bytes(o, ins[r]) + 15) / 16);
      Options rows_out = o;  // a reduce-scatter writes M/N rows per rank
      if (o.scatter) rows_out.M = o.M / o.ranks;
      out_vecs.push_back((output_bytes(rows_out).total() + 15) / 16);
      in_buf.push_back(zeros(in_vecs[r] * 16));
      out_buf.push_back(zeros(out_vecs[r] * 16));
    }
    mar::LaunchShape mem_shape;
    mem_shape.grid = std::max(1, 4 * sms / int(rk.devs.size()));
    mem_shape.block = 512;
    mem_shape.cluster = 1;
    const auto memory = [&](bool pdl) {
      const void* k = pdl ? reinterpret_cast<const void*>(&memory_kernel<true>)
                          : reinterpret_cast<const void*>(&memory_kernel<false>);
      return [&, k, pdl](size_t r) {
        const uint4* in = static_cast<const uint4*>(in_buf[r]);
        uint4* out = static_cast<uint4*>(out_buf[r]);
        size_t n_in = in_vecs[r], n_out = out_vecs[r];
        void* kargs[] = {&in, &n_in, &out, &n_out};
        check(launch_floor(k, mem_shape, pdl, rk.streams[r], kargs), "memory launch");
      };
    };
    std::vector<const mar::ExchangeView*> fviews;
    for (size_t r = 0; floor_ws && r < rk.devs.size(); ++r) fviews.push_back(mar::runtime::find_view_at(floor_ws, r));
    const auto protocol = [&](size_t r) {
      mar::ExchangeView x = *fviews[r];
      void* kargs[] = {&x};
      check(launch_floor(reinterpret_cast<const void*>(&protocol_kernel), shape, false, rk.streams[r], kargs),
            "protocol launch");
    };
    const auto time = [&](const std::function<void(size_t)>& f) {
      rk.plain(o.warmup, f);
      return o.graph ? rk.graph(o.iters, f) : rk.plain(o.iters, f);
    };
    const double op_us = max_of(scaled(o.graph ? graph : plain));
    const double launch_us = max_of(time(empty(false))), memory_us = max_of(time(memory(false)));
    const double launch_pdl_us = max_of(time(empty(true))), memory_pdl_us = max_of(time(memory(true)));
    const double protocol_us = floor_ws ? max_of(time(protocol)) : 0.0;
    const double largest = std::max({launch_us, memory_us, protocol_us});
    std::printf("floors (%s, µs, slowest rank): launch %.2f (PDL %.2f) | memory %.2f (PDL %.2f; %zu B in, %zu B out "
                "per rank) | protocol %s | op %.2f = %.2fx the largest\n",
                o.graph ? "graph" : "plain", launch_us, launch_pdl_us, memory_us, memory_pdl_us, in_vecs[0] * 16,
                out_vecs[0] * 16, floor_ws ? std::to_string(protocol_us).substr(0, 5).c_str() : "-", op_us,
                op_us / largest);
  }
  if (o.host) {
    // Host µs per launch call: the fastest of 5 runs of 100 calls, each run from idle
    // streams (100 launches stay well inside the launch queue). The op is launched on
    // every rank in turn, as a call is (a rank launched alone would wait for its peers
    // until the wait bound poisons the workspace), and its time divided by the ranks.
    const size_t n = rk.devs.size();
    const auto host_us = [&](const std::function<void()>& f) {
      double best = 1e30;
      for (int run = 0; run < 5; ++run) {
        for (size_t r = 0; r < n; ++r) {
          rk.set(r);
          check(cudaStreamSynchronize(rk.streams[r]), "synchronize");
        }
        const auto t0 = std::chrono::steady_clock::now();
        for (int i = 0; i < 100; ++i) f();
        const auto t1 = std::chrono::steady_clock::now();
        best = std::min(best, std::chrono::duration<double, std::micro>(t1 - t0).count() / 100);
      }
      for (size_t r = 0; r < n; ++r) {
        rk.set(r);
        check(cudaStreamSynchronize(rk.streams[r]), "synchronize");
      }
      rk.set(0);
      return best;
    };
    auto call_args = [&](size_t r) -> const mar::LayerArgs& { return o.scatter ? scatter[r] : args[0][r]; };
    const double op_host = host_us([&] {
      for (size_t r = 0; r < n; ++r) {
        rk.set(r);
        check(mar::launch_fused(mar::DType::kBF16, call_args(r), *views[r], algos[0], rk.streams[r]), "launch");
      }
    }) / double(n);
    volatile int sink = 0;
    const double plan_host = host_us([&] {
      sink = sink + mar::fused_launch_shape(mar::DType::kBF16, call_args(0), *views[0], algos[0]).grid;
    });
    const auto empty_host = [&](const mar::LaunchShape& s, bool pdl) {
      const void* k = pdl ? reinterpret_cast<const void*>(&empty_kernel<true>)
                          : reinterpret_cast<const void*>(&empty_kernel<false>);
      return host_us([&] { check(launch_floor(k, s, pdl, rk.streams[0], nullptr), "empty launch"); });
    };
    mar::LaunchShape bare = shape;
    bare.cluster = 1;
    std::printf("host µs per launch call (the op's: every rank's, averaged; the others on rank 0): op %.2f | "
                "its plan %.2f | empty kernel of the op's shape: with PDL %.2f, without %.2f, nor cluster %.2f\n",
                op_host, plan_host, empty_host(shape, true), empty_host(shape, false), empty_host(bare, false));
  }
  // With $JAX_MOE_AR_TRACE set: block 0's phase times of each rank's last call.
  for (const auto& t : mar::runtime::read_traces()) {
    const auto& w = t.second;
    std::printf("trace GPU%d block 0: total %.1f push %.1f stage %.1f finish %.1f other %.1f µs, %llu rows\n",
                t.first, 1e-3 * double(w[mar::kTraceEnd] - w[mar::kTraceStart]),
                1e-3 * double(w[mar::kTracePush]), 1e-3 * double(w[mar::kTraceStage]),
                1e-3 * double(w[mar::kTraceFinish]), 1e-3 * double(w[mar::kTraceOther]),
                static_cast<unsigned long long>(w[mar::kTraceRows]));
  }
  if (o.scatter) {
    // One all-reduce on every rank, then each rank's rows against it.
    for (size_t r = 0; r < rk.devs.size(); ++r) {
      rk.set(r);
      check(mar::launch_fused(mar::DType::kBF16, args[0][r], *views[r], algos[0], rk.streams[r]),
            "launch");
    }
    for (size_t r = 0; r < rk.devs.size(); ++r) {
      rk.set(r);
      check(cudaStreamSynchronize(rk.streams[r]), "synchronize");
    }
    Options local = o;
    local.M = o.M / o.ranks;
    const std::vector<uint8_t> all = outputs_of(args[0][0], o);
    bool same = true;
    for (size_t r = 0; r < rk.devs.size(); ++r) {
      const size_t diff = scatter_differences(outputs_of(scatter[r], local), all, o, int(r));
      if (diff) std::printf("SCATTER FAIL: rank %zu: %zu bytes differ from the all-reduce's rows\n", r, diff);
      same = same && diff == 0;
    }
    if (same) std::printf("SCATTER OK: %d ranks' rows equal the all-reduce's, byte for byte\n", o.ranks);
    if (!same) {
      mar::runtime::destroy_all();
      return 1;
    }
  }
  if (o.prefix > 0) {
    // The same inputs' first P rows (row-major: every per-row input's prefix).
    std::vector<mar::LayerArgs> fewer;
    Options local = o;
    local.M = o.prefix;
    for (size_t r = 0; r < rk.devs.size(); ++r) {
      rk.set(r);
      mar::LayerArgs a = ins[r].args;
      a.M = o.prefix;
      fewer.push_back(with_outputs(a, local));
      check(mar::launch_fused(mar::DType::kBF16, fewer[r], *views[r], algos[0], rk.streams[r]),
            "launch");
    }
    // The shapes of both calls, printed so that a test can tell whether two geometries met.
    const mar::LaunchShape s_few = mar::fused_launch_shape(mar::DType::kBF16, fewer[0], *views[0], algos[0]);
    const mar::LaunchShape s_all = mar::fused_launch_shape(mar::DType::kBF16, args[0][0], *views[0], algos[0]);
    char shapes[160];
    std::snprintf(shapes, sizeof(shapes), "(blocks of %d threads, cluster %d, against %d threads, cluster %d)",
                  s_few.block, s_few.cluster, s_all.block, s_all.cluster);
    bool same = true;
    for (size_t r = 0; r < rk.devs.size(); ++r) {
      rk.set(r);
      check(cudaStreamSynchronize(rk.streams[r]), "synchronize");
      const size_t diff = row_differences(outputs_of(fewer[r], local), outputs_of(args[0][r], o), o,
                                          o.prefix, 0);
      if (diff)
        std::printf("PREFIX FAIL: rank %zu: %zu bytes of the %d-row call differ from the %d-row call's "
                    "rows %s\n", r, diff, o.prefix, o.M, shapes);
      same = same && diff == 0;
    }
    if (same)
      std::printf("PREFIX OK: %d rows equal in a call of %d rows, byte for byte %s\n", o.prefix, o.M,
                  shapes);
    if (!same) {
      mar::runtime::destroy_all();
      return 1;
    }
  }
  const auto errors = mar::runtime::take_errors();
  for (const auto& e : errors) std::fprintf(stderr, "kernel failure: %s\n", e.c_str());
  bool ok = errors.empty();
  const std::vector<uint8_t> want = outputs_of(args[0][0], o);
  if (o.check) {
    for (size_t v = 0; v < algos.size(); ++v) {
      for (size_t r = 0; r < rk.devs.size(); ++r) {
        const std::vector<uint8_t> got = outputs_of(args[v][r], o);
        size_t diff = 0;
        for (size_t i = 0; i < got.size(); ++i) diff += got[i] != want[i];
        if (diff) {
          std::printf("CHECK FAIL: %s rank %zu: %zu of %zu output bytes differ from one-shot rank 0\n",
                      names[v].c_str(), r, diff, got.size());
          ok = false;
        }
      }
    }
    if (ok) std::printf("CHECK OK: %zu algorithms x %d ranks, every output byte equal\n", algos.size(), o.ranks);
  }
  if (o.verify) {
    const bool same = verify_rank(want, cpu_outputs(o, ins), o, names[0].c_str());
    if (same) std::printf("VERIFY OK: rank 0's outputs against the CPU path\n");
    ok = ok && same;
  }
  if (o.chain > 0) {
    const auto run_graphs = [&](const std::vector<std::vector<mar::LayerArgs>>& calls) {
      const std::vector<cudaGraphExec_t> exec = rk.capture([&](size_t r) {
        for (const mar::LayerArgs& a : calls[r])
          check(mar::launch_fused(mar::DType::kBF16, a, *views[r], algos[0], rk.streams[r]), "launch");
      });
      for (size_t r = 0; r < rk.devs.size(); ++r) {
        rk.set(r);
        check(cudaGraphLaunch(exec[r], rk.streams[r]), "graph launch");
      }
      for (size_t r = 0; r < rk.devs.size(); ++r) {
        rk.set(r);
        check(cudaStreamSynchronize(rk.streams[r]), "synchronize");
      }
      rk.destroy(exec);
    };
    ok = chain_matches_cpu(o, ins, run_graphs, [&](size_t r) { rk.set(r); }) && ok;
    for (const auto& e : mar::runtime::take_errors()) {
      std::fprintf(stderr, "kernel failure: %s\n", e.c_str());
      ok = false;
    }
  }
  mar::runtime::destroy_all();
  return ok ? 0 : 1;
}
