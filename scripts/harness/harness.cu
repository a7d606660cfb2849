// Standalone timing harness of the fused kernels, without JAX or XLA: for
// profilers that need a plain process (ncu) and for timing kernel variants.
// It creates the same exchange workspace the Python package does, random bf16
// inputs on GPUs 0..N-1, and launches launch_fused back to back
// on one stream per GPU; it reports µs per call from CUDA events per GPU.
// Correctness is the test suite's job; but two things the JAX tests cannot do
// are here:
//   --virtual   puts all ranks on GPU 0, each on its own stream with a grid of
//               SMs/N blocks (runtime: virtual ranks). No NVLink, so its
//               timings say nothing of the exchange; it runs the multi-rank
//               protocols on a single-GPU machine.
//   --check     runs one-shot and two-shot interleaved call by call on one
//               workspace, each into its own outputs, and requires every output
//               byte of both algorithms and every rank to equal rank 0's
//               one-shot (the ranks share the residual and gamma, as SPEC §2
//               requires), and no failure. Exit status 1 if not.
//
// Build and run on a GPU machine (scripts/harness/build.sh), e.g.
//   ./build/harness --ranks 2 --M 1 --iters 2000
//   ncu --kernel-name regex:oneshot -c 3 ./build/harness --ranks 1 --M 1 --iters 50
// ncu serializes kernels, so profile with --ranks 1 (a group of one never waits);
// with more ranks under ncu every wait runs into the bound.
//   ./build/harness --ranks 4 --virtual 1 --check 1 --M 3000 --iters 20
#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "kernels/fused.h"
#include "runtime/workspace.h"

namespace {

struct Options {
  int ranks = 2, M = 1, H = 7168, K = 8, iters = 1000, warmup = 50;
  bool virtual_ranks = false, check = false;
  std::string algo = "oneshot", quant = "none";
};

void usage() {
  std::fprintf(stderr,
               "harness [--ranks N] [--M m] [--H h] [--K k] [--iters n] [--warmup n]\n"
               "        [--algo oneshot|twoshot] [--quant none|fp8_per_group|nvfp4]\n"
               "        [--virtual 0|1] [--check 0|1]\n");
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
    else if (k == "--virtual") o.virtual_ranks = std::atoi(v) != 0;
    else if (k == "--check") o.check = std::atoi(v) != 0;
    else usage();
  }
  if (o.ranks < 1 || o.M < 1 || o.H % 128 != 0 || o.K < 1 || o.iters < 1) usage();
  return o;
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) {
    std::fprintf(stderr, "%s: %s\n", what, cudaGetErrorString(e));
    std::exit(1);
  }
}

// bf16 bits of a float (round to nearest even; inputs here are finite).
uint16_t bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

template <typename T>
T* upload(const std::vector<T>& host) {
  T* d = nullptr;
  check(cudaMalloc(&d, host.size() * sizeof(T)), "cudaMalloc");
  check(cudaMemcpy(d, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice), "upload");
  return d;
}

void* zeros(size_t bytes) {
  void* d = nullptr;
  check(cudaMalloc(&d, bytes), "cudaMalloc");
  check(cudaMemset(d, 0, bytes), "cudaMemset");
  return d;
}

// Bytes of each output buffer of a call (0: not asked): no quant asks for
// residual and norm, a quant format for residual, codes and scales.
struct OutputBytes {
  size_t residual, norm, quant, scale;
};

OutputBytes output_bytes(const Options& o) {
  const size_t M = size_t(o.M), H = size_t(o.H);
  if (o.quant == "fp8_per_group") return {M * H * 2, 0, M * H, M * (H / 128) * 4};
  if (o.quant == "nvfp4") return {M * H * 2, 0, M * H / 2, (M + 127) / 128 * 128 * ((H / 16 + 3) / 4 * 4)};
  return {M * H * 2, M * H * 2, 0, 0};
}

// Fresh zeroed output buffers for a (the sizes of output_bytes).
void allocate_outputs(mar::FusedArgs& a, const Options& o) {
  const OutputBytes b = output_bytes(o);
  a.residual_out = zeros(b.residual);
  a.norm_out = b.norm ? zeros(b.norm) : nullptr;
  a.quant_out = b.quant ? static_cast<uint8_t*>(zeros(b.quant)) : nullptr;
  a.scale_out = b.scale ? zeros(b.scale) : nullptr;
}

// A fast uniform value in [-2, 2) (the inputs run to hundreds of millions of
// values; their distribution does not matter here).
float fast_value(uint64_t& state) {
  state = state * 6364136223846793005ull + 1442695040888963407ull;
  return float(uint32_t(state >> 40)) * (4.0f / 16777216.0f) - 2.0f;
}

// One rank's operands and results, like the Python package passes them. The
// expert rows and routing come from `rng` (they differ by rank); the residual
// and gamma from `shared_seed`, alike for every rank (SPEC §2: the residual
// is the same on every rank of a group).
mar::FusedArgs make_args(const Options& o, std::mt19937& rng, uint64_t shared_seed) {
  uint64_t state = rng(), shared = shared_seed;
  const int64_t M = o.M, H = o.H, K = o.K;
  const int64_t P = std::max<int64_t>(1, M * K / o.ranks + 1);  // this rank's expert rows
  std::vector<uint16_t> ex(static_cast<size_t>(P * H)), res(static_cast<size_t>(M * H)),
      gam(static_cast<size_t>(H));
  for (auto& v : ex) v = bf16_bits(fast_value(state));
  for (auto& v : res) v = bf16_bits(fast_value(shared));
  for (auto& v : gam) v = bf16_bits(1.0f + 0.05f * fast_value(shared));
  // About 1/ranks of a token's experts live on this rank; the rest are -1.
  std::uniform_int_distribution<int32_t> row(0, int32_t(P - 1));
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  std::vector<int32_t> idx(size_t(M * K));
  std::vector<float> scales(size_t(M * K));
  for (size_t i = 0; i < idx.size(); ++i) {
    idx[i] = u(rng) * float(o.ranks) < 1.0f ? row(rng) : -1;
    scales[i] = 0.05f + 0.9f * u(rng);
  }
  mar::FusedArgs a;
  a.partial = upload(ex);
  a.idx = upload(idx);
  a.scales = upload(scales);
  a.scales_dtype = mar::DType::kF32;
  a.residual = upload(res);
  a.gamma = upload(gam);
  a.gamma_dtype = mar::DType::kBF16;
  a.P = P;
  a.M = M;
  a.H = H;
  a.K = K;
  allocate_outputs(a, o);
  a.cfg.routed_scaling_factor = 2.5f;
  a.cfg.flags = mar::kHasScales | mar::kOutResidual;
  if (o.quant == "none") {
    a.cfg.flags |= mar::kOutNorm;
  } else if (o.quant == "fp8_per_group") {
    a.cfg.quant = mar::QuantKind::kFp8PerGroup;
    a.cfg.flags |= mar::kOutQuant;
  } else if (o.quant == "nvfp4") {
    a.cfg.quant = mar::QuantKind::kNvFp4;
    a.cfg.flags |= mar::kOutQuant | mar::kFp4Swizzled;
    a.quant_scale = upload(std::vector<float>{448.0f * 6.0f / 8.0f});
  } else {
    usage();
  }
  return a;
}

// a with the same inputs and fresh zeroed outputs.
mar::FusedArgs with_fresh_outputs(mar::FusedArgs a, const Options& o) {
  allocate_outputs(a, o);
  return a;
}

// Every output byte of a, in a fixed order.
std::vector<uint8_t> outputs_of(const mar::FusedArgs& a, const Options& o) {
  const OutputBytes b = output_bytes(o);
  const std::pair<const void*, size_t> parts[] = {
      {a.residual_out, b.residual}, {a.norm_out, b.norm}, {a.quant_out, b.quant}, {a.scale_out, b.scale}};
  std::vector<uint8_t> out;
  for (const auto& p : parts) {
    if (p.second == 0) continue;
    const size_t at = out.size();
    out.resize(at + p.second);
    check(cudaMemcpy(out.data() + at, p.first, p.second, cudaMemcpyDeviceToHost), "download");
  }
  return out;
}

mar::Algorithm algorithm_named(const std::string& name) {
  if (name == "oneshot") return mar::Algorithm::kOneShot;
  if (name == "twoshot") return mar::Algorithm::kTwoShot;
  usage();
  return mar::Algorithm::kOneShot;
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
  std::vector<int> devs;
  for (int d = 0; d < o.ranks; ++d) devs.push_back(o.virtual_ranks ? 0 : d);
  const uint64_t slot = std::max<uint64_t>(1u << 20, uint64_t(o.M) * o.H * 2);
  int64_t ws = 0;
  try {
    ws = mar::runtime::create_workspace({devs}, slot, 10.0);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "workspace: %s\n", e.what());
    return 1;
  }
  // Algorithms run: the one asked, or under --check both, interleaved.
  std::vector<std::string> names = {o.algo};
  if (o.check) names = {"oneshot", "twoshot"};
  std::vector<mar::Algorithm> algos;
  for (const auto& n : names) algos.push_back(algorithm_named(n));
  std::mt19937 rng(7);
  std::vector<std::vector<mar::FusedArgs>> args(algos.size());  // [algorithm][rank]
  std::vector<const mar::ExchangeView*> views;
  std::vector<cudaStream_t> streams(devs.size());
  std::vector<cudaEvent_t> start(devs.size()), stop(devs.size());
  for (size_t r = 0; r < devs.size(); ++r) {
    check(cudaSetDevice(devs[r]), "cudaSetDevice");
    const mar::FusedArgs base = make_args(o, rng, 11);
    views.push_back(mar::runtime::find_view_at(ws, r));
    for (size_t v = 0; v < algos.size(); ++v) {
      args[v].push_back(v == 0 ? base : with_fresh_outputs(base, o));
      const char* problem =
          mar::fused_capacity_problem(mar::DType::kBF16, args[v][r], *views[r], algos[v]);
      if (problem != nullptr) {
        std::fprintf(stderr, "capacity (%s): %s\n", names[v].c_str(), problem);
        return 1;
      }
    }
    check(cudaStreamCreateWithFlags(&streams[r], cudaStreamNonBlocking), "stream");
    check(cudaEventCreate(&start[r]), "event");
    check(cudaEventCreate(&stop[r]), "event");
  }
  auto run = [&](int n, bool timed) {
    for (size_t r = 0; r < devs.size() && timed; ++r) {
      check(cudaSetDevice(devs[r]), "cudaSetDevice");
      check(cudaEventRecord(start[r], streams[r]), "record");
    }
    for (int i = 0; i < n; ++i) {
      for (size_t v = 0; v < algos.size(); ++v) {
        for (size_t r = 0; r < devs.size(); ++r) {
          check(cudaSetDevice(devs[r]), "cudaSetDevice");
          check(mar::launch_fused(mar::DType::kBF16, args[v][r], *views[r], algos[v], streams[r]),
                "launch");
        }
      }
    }
    for (size_t r = 0; r < devs.size(); ++r) {
      check(cudaSetDevice(devs[r]), "cudaSetDevice");
      if (timed) check(cudaEventRecord(stop[r], streams[r]), "record");
      check(cudaStreamSynchronize(streams[r]), "synchronize");
    }
  };
  run(o.warmup, false);
  run(o.iters, true);
  std::string label = names[0];
  for (size_t v = 1; v < names.size(); ++v) label += "+" + names[v];
  std::printf("ranks %d%s M %d H %d K %d %s %s: µs per call", o.ranks,
              o.virtual_ranks ? " (virtual, GPU 0)" : "", o.M, o.H, o.K, label.c_str(),
              o.quant.c_str());
  for (size_t r = 0; r < devs.size(); ++r) {
    float ms = 0.0f;
    check(cudaEventElapsedTime(&ms, start[r], stop[r]), "elapsed");
    std::printf(" rank%zu %.2f", r, 1e3 * ms / o.iters / double(algos.size()));
  }
  std::printf("\n");
  // With $JAX_MOE_AR_TRACE set: block 0's phase times of each rank's last call.
  for (const auto& t : mar::runtime::read_traces()) {
    const auto& w = t.second;
    std::printf("trace GPU%d block 0: total %.1f push %.1f stage %.1f finish %.1f other %.1f µs, %llu rows\n",
                t.first, 1e-3 * double(w[mar::kTraceEnd] - w[mar::kTraceStart]),
                1e-3 * double(w[mar::kTracePush]), 1e-3 * double(w[mar::kTraceStage]),
                1e-3 * double(w[mar::kTraceFinish]), 1e-3 * double(w[mar::kTraceOther]),
                static_cast<unsigned long long>(w[mar::kTraceRows]));
  }
  bool ok = true;
  const auto errors = mar::runtime::take_errors();
  for (const auto& e : errors) std::fprintf(stderr, "kernel failure: %s\n", e.c_str());
  ok = errors.empty();
  if (o.check) {
    const std::vector<uint8_t> want = outputs_of(args[0][0], o);
    // residual_out comes first: bf16 NaN (exponent all ones) there means a failed wait.
    size_t nans = 0;
    for (size_t i = 0; i + 1 < size_t(o.M) * o.H * 2; i += 2)
      nans += (want[i + 1] & 0x7f) == 0x7f && (want[i] & 0x80) == 0x80;
    if (nans) {
      std::printf("CHECK FAIL: %zu NaN in rank 0's one-shot residual_out\n", nans);
      ok = false;
    }
    for (size_t v = 0; v < algos.size(); ++v) {
      for (size_t r = 0; r < devs.size(); ++r) {
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
  mar::runtime::destroy_all();
  return ok ? 0 : 1;
}
