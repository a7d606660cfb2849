// Standalone timing harness of the fused kernels, without JAX or XLA: for
// profilers that need a plain process (ncu) and for timing kernel variants.
// It creates the same exchange workspace the Python package does, random bf16
// inputs (never zeros) on GPUs 0..N-1, and launches launch_fused back to back
// on one stream per GPU; it reports µs per call from CUDA events per GPU.
// Correctness is the test suite's job, not this program's.
//
// Build and run on a GPU machine (scripts/harness/build.sh), e.g.
//   ./build/harness --ranks 2 --M 1 --iters 2000
//   ncu --kernel-name regex:oneshot -c 3 ./build/harness --ranks 1 --M 1 --iters 50
// ncu serializes kernels, so profile with --ranks 1 (a group of one never waits);
// with more ranks under ncu every wait runs into the bound.
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
  std::string algo = "oneshot", quant = "none";
};

void usage() {
  std::fprintf(stderr,
               "harness [--ranks N] [--M m] [--H h] [--K k] [--iters n] [--warmup n]\n"
               "        [--algo oneshot|twoshot] [--quant none|fp8_per_group|nvfp4]\n");
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

// One rank's operands and results, like the Python package passes them.
mar::FusedArgs make_args(const Options& o, int rank, std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t M = o.M, H = o.H, K = o.K;
  const int64_t P = std::max<int64_t>(1, M * K / o.ranks + 1);  // this rank's expert rows
  std::vector<uint16_t> ex(static_cast<size_t>(P * H)), res(static_cast<size_t>(M * H)),
      gam(static_cast<size_t>(H));
  for (auto& v : ex) v = bf16_bits(normal(rng));
  for (auto& v : res) v = bf16_bits(normal(rng));
  for (auto& v : gam) v = bf16_bits(1.0f + 0.1f * normal(rng));
  // About 1/ranks of a token's experts live on this rank; the rest are -1.
  std::uniform_int_distribution<int32_t> row(0, int32_t(P - 1));
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  std::vector<int32_t> idx(size_t(M * K));
  std::vector<float> scales(size_t(M * K));
  for (size_t i = 0; i < idx.size(); ++i) {
    idx[i] = u(rng) * float(o.ranks) < 1.0f ? row(rng) : -1;
    scales[i] = 0.05f + 0.9f * u(rng);
  }
  (void)rank;
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
  a.residual_out = zeros(size_t(M * H * 2));
  a.cfg.routed_scaling_factor = 2.5f;
  a.cfg.flags = mar::kHasScales | mar::kOutResidual;
  if (o.quant == "none") {
    a.norm_out = zeros(size_t(M * H * 2));
    a.cfg.flags |= mar::kOutNorm;
  } else if (o.quant == "fp8_per_group") {
    a.cfg.quant = mar::QuantKind::kFp8PerGroup;
    a.cfg.flags |= mar::kOutQuant;
    a.quant_out = static_cast<uint8_t*>(zeros(size_t(M * H)));
    a.scale_out = zeros(size_t(M * (H / 128) * 4));
  } else if (o.quant == "nvfp4") {
    a.cfg.quant = mar::QuantKind::kNvFp4;
    a.cfg.flags |= mar::kOutQuant | mar::kFp4Swizzled;
    a.quant_out = static_cast<uint8_t*>(zeros(size_t(M * H / 2)));
    a.scale_out = zeros(size_t((M + 127) / 128 * 128 * ((H / 16 + 3) / 4 * 4)));
    a.quant_scale = upload(std::vector<float>{448.0f * 6.0f / 8.0f});
  } else {
    usage();
  }
  return a;
}

}  // namespace

int main(int argc, char** argv) {
  const Options o = parse(argc, argv);
  int count = 0;
  check(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
  if (count < o.ranks) {
    std::fprintf(stderr, "%d ranks asked, %d GPUs here\n", o.ranks, count);
    return 1;
  }
  std::vector<int> devs;
  for (int d = 0; d < o.ranks; ++d) devs.push_back(d);
  const uint64_t slot = std::max<uint64_t>(1u << 20, uint64_t(o.M) * o.H * 2);
  int64_t ws = 0;
  try {
    ws = mar::runtime::create_workspace({devs}, slot, 10.0);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "workspace: %s\n", e.what());
    return 1;
  }
  const mar::Algorithm algo =
      o.algo == "twoshot" ? mar::Algorithm::kTwoShot : mar::Algorithm::kOneShot;
  std::mt19937 rng(7);
  std::vector<mar::FusedArgs> args;
  std::vector<const mar::ExchangeView*> views;
  std::vector<cudaStream_t> streams(devs.size());
  std::vector<cudaEvent_t> start(devs.size()), stop(devs.size());
  for (size_t r = 0; r < devs.size(); ++r) {
    check(cudaSetDevice(devs[r]), "cudaSetDevice");
    args.push_back(make_args(o, int(r), rng));
    std::string failure;
    views.push_back(mar::runtime::find_view(ws, devs[r], &failure));
    const char* problem = mar::fused_capacity_problem(mar::DType::kBF16, args[r], *views[r], algo);
    if (problem != nullptr) {
      std::fprintf(stderr, "capacity: %s\n", problem);
      return 1;
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
      for (size_t r = 0; r < devs.size(); ++r) {
        check(cudaSetDevice(devs[r]), "cudaSetDevice");
        check(mar::launch_fused(mar::DType::kBF16, args[r], *views[r], algo, streams[r]), "launch");
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
  std::printf("ranks %d M %d H %d K %d %s %s: µs per call", o.ranks, o.M, o.H, o.K,
              o.algo.c_str(), o.quant.c_str());
  for (size_t r = 0; r < devs.size(); ++r) {
    float ms = 0.0f;
    check(cudaEventElapsedTime(&ms, start[r], stop[r]), "elapsed");
    std::printf(" GPU%d %.2f", devs[r], 1e3 * ms / o.iters);
  }
  std::printf("\n");
  const auto errors = mar::runtime::take_errors();
  for (const auto& e : errors) std::fprintf(stderr, "kernel failure: %s\n", e.c_str());
  mar::runtime::destroy_all();
  return errors.empty() ? 0 : 1;
}
