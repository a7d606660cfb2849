"""GPU tests through the standalone harness (scripts/harness): the multi-rank
exchange protocols on any GPU machine, a single-GPU one included (marked `gpu`).

`--virtual 1` runs N ranks as N concurrent kernels on GPU 0, each with a grid of
SMs/N blocks, so every rank's blocks are resident together; `--check 1` runs
one-shot and two-shot interleaved call by call on one workspace and requires
every output byte of both and of every rank to equal rank 0's one-shot. The JAX
tests check both against the NumPy oracle, but with groups of one only where a
machine has one GPU; this runs 2-4 ranks' exchanges there too (no NVLink: it
says nothing of speed).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

pytestmark = pytest.mark.gpu
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _build(tmp_path_factory, name, cuda_flags=""):
    """The CMake target `harness`, built by scripts/harness/build.sh into a temporary
    directory (the same build the timing scripts use), with extra nvcc flags."""
    if shutil.which("nvcc") is None or shutil.which("cmake") is None:
        pytest.skip("needs nvcc and cmake to build the harness")
    build = str(tmp_path_factory.mktemp(name) / "build")
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "harness", "build.sh"), build],
                          capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, HARNESS_CUDA_FLAGS=cuda_flags))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    return _build(tmp_path_factory, "harness")


QUANTS = ("none", "fp8_static", "fp8_per_token", "fp8_per_group", "nvfp4")
# Sizes across the kernels' switch points: one row (a cluster of blocks, one vector per
# thread), a row count past the many-rows switch (128: a row per block, several vectors
# per thread at H = 7168) and not a multiple of the ranks, more rows than co-resident
# blocks (each walks several rows), and a wide grid at H = 2048 (one vector per thread in
# either geometry); every quant format; 1-4 ranks.
CASES = ([(ranks, quant, M) for ranks in (2, 4) for quant in QUANTS for M in (1, 129, 3001)]
         + [(1, q, 1000) for q in QUANTS] + [(3, "nvfp4", 1000), (4, "none", 4099)])


def _run(harness, *args):
    proc = subprocess.run([harness, "--virtual", "1", "--warmup", "3", "--iters", "10",
                           "--graph", "0", "--timeout", "5", *map(str, args)],
                          capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


@pytest.mark.parametrize("ranks,quant,M", CASES, ids=lambda v: str(v))
def test_virtual_ranks_both_algorithms_agree(harness, ranks, quant, M):
    """One-shot and two-shot byte-equal on every rank, and rank 0 equal to the package's
    CPU path run on the host (residual_out exactly; SPEC §3's 1-ulp rule for the rest)."""
    H = 7168 if M <= 129 else 2048
    out = _run(harness, "--ranks", ranks, "--check", 1, "--verify", 1, "--M", M, "--H", H,
               "--quant", quant)
    assert f"CHECK OK: 2 algorithms x {ranks} ranks" in out, out[-4000:]
    assert "VERIFY OK" in out, out[-4000:]


@pytest.mark.parametrize("group_size", [48, 512])
def test_staged_group_quantizer(harness, group_size):
    """Scale groups that do not fall on 1-32 lanes are quantized from the staged row,
    read across the row's cluster."""
    out = _run(harness, "--ranks", 2, "--check", 1, "--verify", 1, "--M", 37, "--H", 3072,
               "--quant", "fp8_per_group", "--group-size", group_size)
    assert "CHECK OK" in out and "VERIFY OK" in out, out[-4000:]


@pytest.mark.parametrize("ranks,quant,M", [(r, q, M) for r in (1, 2, 4) for q in QUANTS
                                          for M in (r, 700 * r)]
                         + [(3, q, M) for q in QUANTS for M in (9, 3003)],
                         ids=lambda v: str(v))
def test_reduce_scatter_rows_equal_allreduce(harness, ranks, quant, M):
    """SPEC §2.1: every rank's M/N reduce-scatter rows equal, byte for byte, the matching
    rows of the all-reduce on the same inputs."""
    H = 2048 if M > 1000 else 7168
    out = _run(harness, "--ranks", ranks, "--scatter", 1, "--M", M, "--H", H, "--quant", quant)
    assert f"SCATTER OK: {ranks} ranks" in out, out[-4000:]


# (ranks, quant, H, M): the many-rows geometry with 4 vectors per thread (H = 7168), 2
# (H = 4096), 448-thread blocks (H = 14336), the staged group quantizer (H = 3072, groups of
# 48) and a row of one vector per thread either way (H = 2048).
# The prefix call must take the few-rows geometry: with so few rows every candidate needs one
# round, and the tie goes to few rows (plan_launch). At 100 rows many rows won (one round
# against two) on 2 ranks, and the cases compared a geometry with itself.
PREFIX = 8
GEOMETRY_CASES = ([(1, q, 7168, 300) for q in QUANTS]
                  + [(2, "none", 4096, 257), (2, "nvfp4", 14336, 200), (1, "fp8_per_token", 2048, 400)])


@pytest.mark.parametrize("ranks,quant,H,M", GEOMETRY_CASES, ids=lambda v: str(v))
def test_rows_equal_in_every_geometry(harness, ranks, quant, H, M):
    """A row's outputs do not depend on how many rows the call has: the first PREFIX rows of an
    M-row call (a row per block, several vectors per thread) equal, byte for byte, a call of
    those rows alone (a row per cluster, one vector per thread)."""
    out = _run(harness, "--ranks", ranks, "--M", M, "--H", H, "--quant", quant, "--prefix", PREFIX)
    _assert_two_geometries_agree(out)


def test_rows_equal_in_every_geometry_staged_groups(harness):
    out = _run(harness, "--ranks", 2, "--M", 300, "--H", 3072, "--quant", "fp8_per_group",
               "--group-size", 48, "--prefix", PREFIX)
    _assert_two_geometries_agree(out)


def _assert_two_geometries_agree(out):
    m = re.search(rf"PREFIX OK: {PREFIX} rows .*\(blocks of (\d+) threads, cluster (\d+), "
                  r"against (\d+) threads, cluster (\d+)\)", out)
    assert m, out[-4000:]
    few, many = m.group(1, 2), m.group(3, 4)
    assert few != many, f"both calls ran one geometry {few}: the case tests nothing"


# Chained calls (harness --chain): each call reads as its residual the residual_out its
# predecessor wrote, the calls in one CUDA graph per rank, where launches follow each other
# closest. Each kernel may start while its predecessor runs (programmatic dependent launch)
# and must wait for it before reading; JAX's own chained-calls test (test_gpu_protocol.py)
# did not catch a build without that wait (docs/perf.md v10 §5), this does (below).
CHAIN = 16
CHAIN_CASES = [(1, "none", 1), (1, "nvfp4", 1), (1, "fp8_per_token", 300), (2, "none", 1),
               (2, "fp8_per_group", 129), (4, "none", 1), (4, "nvfp4", 300)]


@pytest.mark.parametrize("ranks,quant,M", CHAIN_CASES, ids=lambda v: str(v))
def test_chained_calls_in_a_graph(harness, ranks, quant, M):
    H = 7168 if M <= 129 else 2048
    out = _run(harness, "--ranks", ranks, "--M", M, "--H", H, "--quant", quant, "--chain", CHAIN)
    assert f"CHAIN OK: {CHAIN} calls" in out, out[-4000:]


@pytest.fixture(scope="module")
def harness_without_wait(tmp_path_factory):
    """Kernels built without the wait for their predecessor (-DMAR_SKIP_PREDECESSOR_WAIT)."""
    return _build(tmp_path_factory, "harness_without_wait", "-DMAR_SKIP_PREDECESSOR_WAIT")


def test_chain_check_catches_a_kernel_that_reads_early(harness_without_wait):
    """The check above can fail: kernels that do not wait for their predecessor read a
    residual not yet written, and the chain ends elsewhere than the CPU path's. A group of
    one, which lets its successor start at once and has no peer to wait for."""
    proc = subprocess.run([harness_without_wait, "--ranks", "1", "--virtual", "1", "--M", "1",
                           "--chain", "64", "--warmup", "1", "--iters", "3", "--graph", "0",
                           "--timeout", "5"], capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1 and "CHAIN FAIL" in out, out[-4000:]


def test_floors_and_host_cost_lines(harness):
    """`--floors 1` prints the launch, memory and protocol floors beside the op, and
    `--host 1` the host's µs per launch call: every figure a positive number, and the op's
    launch at least its own plan's cost. Two ranks: the op's launches must leave the
    workspace usable (a rank launched alone would wait out the bound and poison it)."""
    out = _run(harness, "--ranks", 2, "--M", 1, "--floors", 1, "--host", 1)
    floors = re.search(r"floors \(plain, µs, slowest rank\): launch ([\d.]+) \(PDL ([\d.]+)\) \| "
                       r"memory ([\d.]+) \(PDL ([\d.]+);.*\| protocol ([\d.]+) \| op ([\d.]+)", out)
    assert floors, out[-4000:]
    assert all(float(v) > 0 for v in floors.groups()), floors.group(0)
    host = re.search(r"host µs per launch call \(.*\): op ([\d.]+) \| its plan ([\d.]+) \| "
                     r"empty kernel of the op's shape: with PDL ([\d.]+), without ([\d.]+), "
                     r"nor cluster ([\d.]+)", out)
    assert host, out[-4000:]
    op, plan, *empty = map(float, host.groups())
    assert plan > 0 and op > plan and all(e > 0 for e in empty), host.group(0)
