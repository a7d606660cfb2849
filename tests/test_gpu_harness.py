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
import shutil
import subprocess

import pytest

pytestmark = pytest.mark.gpu
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """The CMake target `harness`, built by scripts/harness/build.sh into a temporary
    directory (the same build the timing scripts use)."""
    if shutil.which("nvcc") is None or shutil.which("cmake") is None:
        pytest.skip("needs nvcc and cmake to build the harness")
    build = str(tmp_path_factory.mktemp("harness") / "build")
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "harness", "build.sh"), build],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout.strip().splitlines()[-1]


CASES = [(ranks, quant, M) for ranks in (2, 4) for quant in ("none", "fp8_per_group", "nvfp4")
         for M in (1, 129, 3001)] + [(1, "none", 1000), (3, "nvfp4", 1000), (4, "none", 4099)]


@pytest.mark.parametrize("ranks,quant,M", CASES, ids=lambda v: str(v))
def test_virtual_ranks_both_algorithms_agree(harness, ranks, quant, M):
    H = 7168 if M <= 129 else 2048
    cmd = [harness, "--ranks", str(ranks), "--virtual", "1", "--check", "1", "--M", str(M),
           "--H", str(H), "--quant", quant, "--warmup", "3", "--iters", "10"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert f"CHECK OK: 2 algorithms x {ranks} ranks" in out, out[-4000:]
