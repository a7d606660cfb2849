"""The C++ encoders that the kernels and the CPU path share (csrc/common/quant.h) against
the NumPy oracle's (SPEC §3: e4m3(sat(x, 448)), e2m1(sat(x, 6)), byte j of a row =
code(2j) | code(2j + 1) << 4), on every float32 rounding boundary.

The encoders work on the bits (round to nearest even, saturating) and are tuned for the
kernels' instruction counts, so this holds them to the oracle on a set that contains,
for every sign and exponent and every value of the 11 leading mantissa bits, the
patterns of the 12 trailing bits that sit on and next to each tie: at 3 kept mantissa
bits (e4m3, ties at bit 19) and at 1 (e2m1, ties at bit 21), in the subnormal ranges
(ties at half-multiples of 2^-9 and of 0.5) and around the saturation points, plus
infinities and NaN. The program is compiled here from the headers alone (no CUDA)."""

import pathlib
import shutil
import subprocess

import numpy as np
import pytest

import oracle

ROOT = pathlib.Path(__file__).resolve().parents[1]

PROGRAM = r"""
#include <cstdio>
#include <vector>
#include "common/quant.h"
// stdin: n float32; stdout: n e4m3 codes, n e2m1 codes, n / 2 NVFP4 bytes (nvfp4_pack<8>
// of each run of 8 values with out_scale 1).
int main() {
  std::vector<float> x;
  float v;
  while (std::fread(&v, 4, 1, stdin) == 1) x.push_back(v);
  std::vector<unsigned char> out;
  for (float f : x) out.push_back((unsigned char)mar::e4m3_encode(f));
  for (float f : x) out.push_back((unsigned char)mar::e2m1_encode(f));
  for (size_t i = 0; i + 8 <= x.size(); i += 8) {
    const uint32_t w = mar::nvfp4_pack<8>(&x[i], 1.0f);
    for (int k = 0; k < 4; ++k) out.push_back((unsigned char)(w >> (8 * k)));
  }
  std::fwrite(out.data(), 1, out.size(), stdout);
}
"""


@pytest.fixture(scope="module")
def encode(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    assert cxx, "a C++ compiler is needed (the package's build needs one too)"
    d = tmp_path_factory.mktemp("encoders")
    (d / "enc.cc").write_text(PROGRAM)
    # -ffp-contract=off as the package's host build: no multiply-add contraction.
    subprocess.run([cxx, "-O2", "-std=c++17", "-ffp-contract=off", f"-I{ROOT / 'csrc'}",
                    str(d / "enc.cc"), "-o", str(d / "enc")], check=True)

    def run(x):
        x = np.ascontiguousarray(x, dtype=np.float32)
        assert x.size % 8 == 0
        out = subprocess.run([str(d / "enc")], input=x.tobytes(), capture_output=True,
                             check=True).stdout
        b = np.frombuffer(out, np.uint8)
        n = x.size
        return b[:n], b[n:2 * n], b[2 * n:]

    return run


def boundary_values():
    """Every sign x exponent x 11 leading mantissa bits, with the trailing 12 bits from `tails`."""
    tails = np.array([0x000, 0x001, 0x7FF, 0x800, 0x801, 0xFFE, 0xFFF], np.uint32)
    head = np.arange(1 << 20, dtype=np.uint32) << 12  # sign, exponent, 11 mantissa bits
    u = (head[:, None] | tails[None, :]).reshape(-1)
    return u.view(np.float32)


def test_the_value_set_reaches_every_boundary():
    """The set holds the ties the encoders round at (so the test below can fail there)."""
    u = np.sort(boundary_values().view(np.uint32))
    ties = np.array([0x3F880000, 0x3FA00000,   # 1.0625 (e4m3 tie), 1.25 (e2m1 tie)
                     0x3A800000, 0x3E800000,   # 2^-10 (e4m3 subnormal tie), 0.25 (e2m1's)
                     0x43E00000, 0x43E80000,   # 448, 464 (the first e4m3 tie past 448)
                     0x40C00000, 0x40E00000,   # 6, 7 (e2m1 past its largest)
                     0x7F800000, 0xFF800000],  # +-Inf
                    np.uint32)
    want = np.concatenate([ties - 1, ties, ties + 1])
    assert np.array_equal(u[np.searchsorted(u, want)], want)
    assert np.isnan(u.view(np.float32)).sum() > 0


def test_encoders_match_the_oracle_on_every_boundary(encode):
    x = boundary_values()
    e4m3, e2m1, packed = encode(x)
    nan = np.isnan(x)
    want8 = oracle._e4m3(oracle._sat(x, oracle.E4M3_MAX)).view(np.uint8)
    bad = np.flatnonzero((e4m3 != want8) & ~nan)
    assert bad.size == 0, f"e4m3: {bad.size} mismatches, first {x.view(np.uint32)[bad[:5]]}"
    # NaN: the NaN code 0x7f with x's sign (SPEC §3 has NaN propagate; e4m3fn's only NaN).
    assert np.array_equal(e4m3[nan] & 0x7F, np.full(nan.sum(), 0x7F, np.uint8))
    # e2m1 has no NaN: a block holding NaN has unspecified codes (SPEC §3).
    want4 = oracle._e2m1_codes(oracle._sat(x, oracle.E2M1_MAX))
    bad = np.flatnonzero((e2m1 != want4) & ~nan)
    assert bad.size == 0, f"e2m1: {bad.size} mismatches, first {x.view(np.uint32)[bad[:5]]}"
    # The packing of SPEC §3: byte j = code(2j) | code(2j + 1) << 4, runs of 8 without NaN.
    runs = ~nan.reshape(-1, 8).any(axis=1)
    w4 = want4.reshape(-1, 4, 2)
    want_bytes = (w4[..., 0] | (w4[..., 1] << 4)).astype(np.uint8)
    assert np.array_equal(packed.reshape(-1, 4)[runs], want_bytes[runs])
