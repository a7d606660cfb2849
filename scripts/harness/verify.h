// --verify: the GPU outputs against the package's CPU path (kernels/cpu.cc, the
// same common/ math that CI checks bit for bit against the NumPy oracle), run
// here on the host from the same inputs.
#pragma once

#include <cstdio>
#include <vector>

#include "inputs.h"
#include "kernels/cpu.h"

namespace harness {

// Every output byte of the group's call as the CPU path computes it.
inline std::vector<uint8_t> cpu_outputs(const Options& o, const std::vector<RankInputs>& ranks) {
  const size_t MH = size_t(o.M) * size_t(o.H);
  std::vector<uint16_t> wires(ranks.size() * MH);
  for (size_t r = 0; r < ranks.size(); ++r) {
    mar::LayerArgs a = ranks[r].args;  // dims and configuration; pointers replaced by host ones
    a.partial = ranks[r].expert_out.data();
    a.idx = ranks[r].idx.data();
    a.scales = ranks[r].scales.data();
    a.shared = ranks[r].shared.data();
    a.wire = wires.data() + r * MH;
    mar::cpu_finalize<mar::bf16_t>(a);
  }
  const OutputBytes b = output_bytes(o);
  std::vector<uint8_t> out(b.total());
  mar::LayerArgs t = ranks[0].args;
  t.partial = wires.data();
  t.N = int64_t(ranks.size());
  t.residual = ranks[0].residual.data();
  t.gamma = ranks[0].gamma.data();
  t.quant_scale = &ranks[0].quant_scale;
  uint8_t* p = out.data();
  t.residual_out = p;
  p += b.residual;
  t.norm_out = b.norm ? p : nullptr;
  p += b.norm;
  t.quant_out = b.quant ? p : nullptr;
  p += b.quant;
  t.scale_out = b.scale ? p : nullptr;
  mar::cpu_tail<mar::bf16_t>(t);
  return out;
}

// Compares one rank's outputs with the CPU path's: residual_out must be equal
// byte for byte; the rest may differ only where the sum of squares, taken in
// another order, rounds differently (SPEC §3: norm within 1 ulp on at most
// 0.1 % of values, and codes follow the norm) — so at most 0.1 % of those
// bytes. Returns false (and says why) otherwise.
inline bool verify_rank(const std::vector<uint8_t>& got, const std::vector<uint8_t>& want,
                        const Options& o, const char* what) {
  const OutputBytes b = output_bytes(o);
  size_t res_diff = 0, other_diff = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    if (got[i] == want[i]) continue;
    (i < b.residual ? res_diff : other_diff) += 1;
  }
  const size_t other = got.size() - b.residual;
  const bool ok = res_diff == 0 && other_diff * 1000 <= other;
  if (!ok || other_diff)
    std::printf("VERIFY %s %s: residual_out %zu of %zu bytes differ from the CPU path, other outputs %zu of %zu\n",
                ok ? "note" : "FAIL", what, res_diff, size_t(b.residual), other_diff, other);
  return ok;
}

}  // namespace harness
