// The fused kernels' entry points (fused.h): each dispatches on the element
// type to the kernels compiled for it (fused_<type>.cu).
#include "fused.h"

#include <cstdlib>
#include <cstring>

namespace mar {
namespace {

FusedOps ops_of(DType t) {
  return with_float_type(t, [](auto tag) { return fused_ops<decltype(tag)>(); });
}

}  // namespace

bool programmatic_launch() {
  static const bool on = [] {
    const char* v = std::getenv("JAX_MOE_AR_PDL");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return on;
}

cudaError_t prepare_fused_kernels() {
  for (DType t : {DType::kF32, DType::kBF16, DType::kF16}) {
    const cudaError_t e = ops_of(t).prepare();
    if (e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

const char* fused_capacity_problem(DType t, const LayerArgs& a, const ExchangeView& x,
                                   Algorithm algorithm) {
  if (algorithm != Algorithm::kOneShot && algorithm != Algorithm::kTwoShot)
    return "unknown algorithm code";
  return ops_of(t).capacity_problem(a, x, algorithm);
}

cudaError_t launch_fused(DType t, const LayerArgs& a, const ExchangeView& x, Algorithm algorithm,
                         cudaStream_t stream) {
  if (a.M <= 0) return cudaSuccess;
  return ops_of(t).launch(a, x, algorithm, stream);
}

LaunchShape fused_launch_shape(DType t, const LayerArgs& a, const ExchangeView& x,
                               Algorithm algorithm) {
  return ops_of(t).shape(a, x, algorithm);
}

}  // namespace mar
