"""Soak and lifetime tests of the fused kernels (marked `gpu`; the soak also `slow`).

Soak: $JAX_MOE_AR_SOAK_CALLS calls (default 100,000) over random M, quant formats and
both algorithms, on every mesh this machine has (tp over all GPUs; dp2 x tp2 with 4),
as chains of calls inside jitted programs; every tenth program is followed by a
single call checked bit for bit against the oracle. At the end: zero mismatches, no
reported failure, device memory and host memory flat after the warm-up. Command:

    JAX_MOE_AR_SOAK_CALLS=100000 pytest -m "gpu and slow" tests/test_gpu_soak.py -s

Lifetime: programs recompiled for new shapes and meshes created and dropped keep
reusing workspaces (their count stops growing), and a call never reads the data of an
earlier call (each call's inputs differ; every output is checked).
"""

from __future__ import annotations

import os
import time

import jax
import pytest
from jax import lax

import jax_moe_ar as mar
from jax_moe_ar.testing import N2, N4, N4_DP2_TP2, make_mesh

from cases import ALGORITHMS, BF16, Q, build, check_against_oracle, gen_case, run_case

pytestmark = pytest.mark.gpu

CHAIN = 200
QUANTS = (None, Q.fp8_per_token(), Q.fp8_per_group(128), Q.nvfp4())


def _meshes():
    n = len(jax.devices("gpu"))
    return [N4, N4_DP2_TP2] if n >= 4 else [N2]


def _rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _device_bytes():
    """GPU memory in use by anyone (cudaMemGetInfo): XLA's pool and our workspaces."""
    from jax_moe_ar import _native
    used = sum(_native.device_bytes_used(d.local_hardware_id) for d in jax.devices("gpu"))
    assert used > 0
    return used


def _chain(case, mesh_case, algorithm):
    """(jitted program of CHAIN calls chained through the residual, its arguments)."""
    kw = case.kwargs()

    def chain(named, spec):
        def step(_, r):
            return mar.moe_finalize_allreduce(
                named["expert_out"], named["permuted_idx"], r, named["norm_weight"],
                axis_name=mesh_case.axis, quant=spec, algorithm=algorithm, **kw).residual
        return lax.fori_loop(0, CHAIN, step, named["residual"])

    return build(case, mesh_case, make_mesh("gpu", mesh_case), algorithm=algorithm, fn=chain)


@pytest.mark.slow
def test_soak(rng):
    total = int(os.environ.get("JAX_MOE_AR_SOAK_CALLS", "100000"))
    meshes = _meshes()
    programs = []
    for mc in meshes:
        for quant in QUANTS:
            for algo in ALGORITHMS:
                M = int(rng.choice([1, 5, 33, 128, 300, 1100]))
                case = gen_case(rng, mc, dtype=BF16, M=M, H=1024, K=8, quant=quant)
                programs.append((mc, case, algo, *_chain(case, mc, algo)))
    calls = mismatches = runs = 0
    base_dev = base_rss = None
    t0 = time.time()
    while calls < total:
        mc, case, algo, f, args = programs[runs % len(programs)]
        jax.block_until_ready(f(*args))
        calls += CHAIN
        runs += 1
        if runs % 10 == 0:  # a fresh single call, exact against the oracle
            M = int(rng.choice([1, 7, 64, 257]))
            q = QUANTS[runs // 10 % len(QUANTS)]
            single = gen_case(rng, mc, dtype=BF16, M=M, H=1024, K=8, quant=q,
                              outputs=("residual", "norm", "quant") if q else None)
            try:
                check_against_oracle(run_case(single, mc, platform="gpu", algorithm=algo)[0],
                                     single)
            except AssertionError:
                mismatches += 1
            calls += 1
        if runs == 2 * len(programs):  # everything compiled and allocated once
            base_dev, base_rss = _device_bytes(), _rss_bytes()
    mar.check_errors()
    dev, rss = _device_bytes(), _rss_bytes()
    print(f"\nsoak: {calls} calls in {time.time() - t0:.0f} s over {len(programs)} programs "
          f"({', '.join(m.id for m in meshes)}); mismatches {mismatches}; GPU memory in use "
          f"{base_dev >> 20} -> {dev >> 20} MiB; host RSS {base_rss >> 20} -> {rss >> 20} MiB")
    assert mismatches == 0
    assert base_dev is not None, "too few calls to measure after the warm-up"
    assert dev - base_dev <= 16 << 20, (base_dev, dev)
    assert rss - base_rss <= 256 << 20, (base_rss, rss)


def test_recompiles_and_dropped_meshes_reuse_workspaces(rng):
    """New shapes and new meshes over the same GPUs: workspaces are created only while
    capacity grows (M = 1100 needs more than the first one's 1 MiB slots), then reused;
    every call of every program is exact (a call that read an earlier call's data would
    differ: each case has fresh random inputs)."""
    mc = _meshes()[0]
    counts = []
    for rnd in range(3):
        for M in (3, 40, 200, 1100):
            for algo in ALGORITHMS:
                case = gen_case(rng, mc, dtype=BF16, M=M, H=512, K=4,
                                quant=Q.fp8_per_group(128), outputs=("residual", "norm", "quant"))
                # run_case builds a new mesh and a new jitted program each time
                check_against_oracle(run_case(case, mc, platform="gpu", algorithm=algo)[0], case)
        counts.append(_workspace_count())
    mar.check_errors()
    assert counts[1] == counts[2] == counts[0], counts


def _workspace_count():
    from jax_moe_ar import workspace
    return sum(len(v) for v in workspace._by_groups.values())
