// --scatter: the reduce-scatter variant (SPEC §2.1) against the all-reduce on the
// same inputs. Rank r's reduce-scatter call gets its block of the residual and
// returns M/N rows; each must equal, byte for byte, rows [r*M/N, (r+1)*M/N) of
// the all-reduce's outputs (codes and scales compared value by value, each in
// its own layout).
#pragma once

#include <cstdio>
#include <vector>

#include "inputs.h"

namespace harness {

// Rank r's reduce-scatter arguments: the all-reduce's inputs with the scatter
// flag, this rank's M/N-row block of the residual, fresh outputs of M/N rows.
inline mar::LayerArgs scatter_args(const mar::LayerArgs& all, const Options& o, int r) {
  mar::LayerArgs a = all;
  const int64_t rows = o.M / o.ranks;
  a.cfg.flags |= mar::kScatter;
  a.residual = static_cast<const uint16_t*>(all.residual) + size_t(r) * size_t(rows) * size_t(o.H);
  Options local = o;
  local.M = int(rows);
  mar::LayerArgs out = with_outputs(a, local);
  return out;
}

// Byte offset and size of output row m's j-th scale in a layout of M rows.
inline size_t scale_offset(const Options& o, int64_t M, int64_t m, int64_t j) {
  const int64_t H = o.H;
  if (o.quant == "fp8_per_token") return size_t(m) * 4;
  if (o.quant == "fp8_per_group") return size_t(m * (H / o.group_size) + j) * 4;
  if (o.quant == "nvfp4") return size_t(mar::swizzled_128x4_offset(m, j, H));
  (void)M;
  return 0;
}

inline int64_t scales_per_row(const Options& o) {
  if (o.quant == "fp8_per_token") return 1;
  if (o.quant == "fp8_per_group") return o.H / o.group_size;
  if (o.quant == "nvfp4") return o.H / 16;
  return 0;
}

// Counts the bytes of a call's outputs (`got`, `rows` rows) that differ from
// rows [first, first + rows) of another call's outputs (`all`, o.M rows); both
// in outputs_of order.
inline size_t row_differences(const std::vector<uint8_t>& got, const std::vector<uint8_t>& all,
                              const Options& o, int64_t rows, int64_t first) {
  Options local = o;
  local.M = int(rows);
  const OutputBytes bl = output_bytes(local), ba = output_bytes(o);
  size_t diff = 0, gl = 0, ga = 0;  // section starts in got / all
  auto rowwise = [&](size_t bytes_local, size_t bytes_all) {
    const size_t row = rows ? bytes_local / size_t(rows) : 0;
    for (size_t i = 0; i < bytes_local; ++i) diff += got[gl + i] != all[ga + size_t(first) * row + i];
    gl += bytes_local;
    ga += bytes_all;
  };
  rowwise(bl.residual, ba.residual);
  rowwise(bl.norm, ba.norm);
  rowwise(bl.quant, ba.quant);
  const int64_t per = scales_per_row(o);
  const size_t width = o.quant == "nvfp4" ? 1 : 4;
  for (int64_t i = 0; i < rows && bl.scale; ++i)
    for (int64_t j = 0; j < per; ++j)
      for (size_t b = 0; b < width; ++b)
        diff += got[gl + scale_offset(o, rows, i, j) + b] != all[ga + scale_offset(o, o.M, first + i, j) + b];
  return diff;
}

// Rank r's reduce-scatter outputs (M/N rows) against the all-reduce's rows.
inline size_t scatter_differences(const std::vector<uint8_t>& got, const std::vector<uint8_t>& all,
                                  const Options& o, int r) {
  const int64_t rows = o.M / o.ranks;
  return row_differences(got, all, o, rows, int64_t(r) * rows);
}

}  // namespace harness
