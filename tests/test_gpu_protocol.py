"""The exchange protocol on GPUs, for each fused algorithm (marked `gpu`).

Many calls in one program (two call sites, long scans of chained calls), XLA command
buffers on and off, and the never-hang rule: a rank that skips a call makes the others'
waits end within the bound, with NaN outputs and a Python error naming the op, and
`mar.reset_workspaces()` makes the same programs exact again. Tests that need a fresh
process (a poisoned workspace, other XLA flags) run their body in a child.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jax_moe_ar as mar
from jax_moe_ar.testing import N1, N2, N4, make_mesh, sharded

from cases import ALGORITHMS, BF16, H_REAL, Q, build, check_against_oracle, gen_case, \
    require_gpus

pytestmark = pytest.mark.gpu

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


def test_two_call_sites_in_one_program(rng, algorithm):
    """Two independent calls and a dependent third in one jitted program."""
    a = gen_case(rng, N4, dtype=BF16, M=16, H=H_REAL, K=8, scales="f32")
    b = gen_case(rng, N4, dtype=BF16, M=200, H=1024, K=4, quant=Q.nvfp4(),
                 outputs=("residual", "norm", "quant"))
    mesh = make_mesh("gpu", N4)
    fa, args_a = build(a, N4, mesh, algorithm=algorithm)
    fb, args_b = build(b, N4, mesh, algorithm=algorithm)

    def body(ea, ia, sa, ra, ga, eb, ib, rb, gb):
        oa = mar.moe_finalize_allreduce(ea, ia, ra, ga, axis_name="tp", expert_scales=sa,
                                        routed_scaling_factor=a.rsf, algorithm=algorithm)
        ob = mar.moe_finalize_allreduce(eb, ib, rb, gb, axis_name="tp", quant=b.quant.spec(),
                                        outputs=("residual", "norm", "quant"),
                                        algorithm=algorithm)
        # The third call consumes the first's residual: the same buffers, the next epoch.
        oc = mar.moe_finalize_allreduce(ea, ia, oa.residual, ga, axis_name="tp",
                                        expert_scales=sa, routed_scaling_factor=a.rsf,
                                        algorithm=algorithm)
        return oa, ob, oc

    specs = (P("tp"), P("tp"), P("tp"), P(), P(), P("tp"), P("tp"), P(), P())
    f = sharded(body, mesh, specs, P())
    oa, ob, oc = f(*args_a, *args_b)
    to_np = lambda o: {k: None if v is None else np.asarray(v) for k, v in o._asdict().items()}
    ref_a = check_against_oracle(to_np(oa), a)
    check_against_oracle(to_np(ob), b)
    a.groups[0]["residual"] = ref_a["residual"]
    check_against_oracle(to_np(oc), a)


# Per algorithm: its row counts, how many programs of 100 scanned calls, expert-output
# rows per rank, the quant format, and the router weights' dtype (None: no weights).
BACK_TO_BACK = {
    "oneshot": dict(Ms=(128, 512, 37), programs=10, P=24, quant=Q.fp8_per_token(),
                    scales="f32"),
    "twoshot": dict(Ms=(5, 2048), programs=3, P=16, quant=Q.nvfp4(), scales=None),
}


@pytest.mark.parametrize("mc", [N1, N4], ids=lambda m: m.id)
@pytest.mark.parametrize("algorithm,M", [pytest.param(a, M, id=f"{a}-M{M}")
                                         for a, cfg in BACK_TO_BACK.items() for M in cfg["Ms"]])
def test_back_to_back_calls_exact(rng, algorithm, M, mc):
    """Programs of 100 calls back to back on 4 GPUs and on a group of one (a scan; 1,000
    one-shot calls, 300 two-shot; 300 each on a group of one, to keep the oracle's share
    of the suite down), inputs changing every call and the residual chained:
    every call's outputs match the oracle. A stale buffer, a reader racing a clearer, a
    lost sentinel, or a kernel reading before its predecessor finished (programmatic
    dependent launch) shows up as a mismatch or a hang."""
    cfg = BACK_TO_BACK[algorithm]
    mesh = make_mesh("gpu", mc)
    steps, H, K = 100, 256, 8
    quant, outputs = cfg["quant"], ("residual", "norm", "quant")
    keys = ["expert_out", "permuted_idx"] + (["expert_scales"] if cfg["scales"] else [])

    def body(res0, gamma, *xs):
        def step(res, x):
            o = mar.moe_finalize_allreduce(x[0], x[1], res, gamma, axis_name="tp",
                                           expert_scales=x[2] if len(x) > 2 else None,
                                           quant=quant.spec(), outputs=outputs,
                                           algorithm=algorithm)
            return o.residual, (o.residual, o.norm, o.quant, o.scale)
        return jax.lax.scan(step, res0, xs)[1]

    f = sharded(body, mesh, (P(), P()) + (P(None, "tp"),) * len(keys), P())
    gamma = (1 + 0.1 * rng.standard_normal(H)).astype(np.float32)
    residual = rng.standard_normal((M, H)).astype(BF16)
    for _ in range(cfg["programs"] if mc.size > 1 else 3):
        cases = [gen_case(rng, mc, dtype=BF16, M=M, H=H, K=K, P=cfg["P"], scales=cfg["scales"])
                 for _ in range(steps)]
        stack = lambda key: np.stack([np.concatenate([c.groups[0]["ranks"][r][key]
                                                      for r in range(mc.size)]) for c in cases])
        ys = [np.asarray(y) for y in f(residual, gamma, *map(stack, keys))]
        for s, c in enumerate(cases):
            c.groups[0]["residual"], c.norm_weight = residual, gamma
            c.quant, c.outputs = quant, outputs
            ref = check_against_oracle(dict(residual=ys[0][s], norm=ys[1][s], quant=ys[2][s],
                                            scale=ys[3][s]), c)
            residual = ref["residual"]
    mar.check_errors()


@pytest.mark.parametrize("mc", [N1, N2, N4], ids=lambda m: m.id)
@pytest.mark.parametrize("M", [1, 300])
def test_chained_calls_with_nothing_between(rng, algorithm, M, mc):
    """Twelve calls in a row, each reading the residual the previous one wrote, with no
    other kernel between them: the kernels are launched so that the next may be scheduled
    while the previous still runs (programmatic dependent launch), and each must wait
    for its predecessor before it reads anything. Reading early shows up here as a
    mismatch: the residual would be the one of a call before. Both geometries (1 row,
    300 rows), every call against the oracle."""
    mesh = make_mesh("gpu", mc)
    calls, H = 12, H_REAL if M == 1 else 2048  # (the oracle's time)
    cases = [gen_case(rng, mc, dtype=BF16, M=M, H=H, K=8, scales="f32", rsf=2.5)
             for _ in range(calls)]

    def body(res, gamma, *xs):
        outs = []
        for c in range(calls):
            o = mar.moe_finalize_allreduce(xs[3 * c], xs[3 * c + 1], res, gamma,
                                           axis_name="tp", expert_scales=xs[3 * c + 2],
                                           routed_scaling_factor=2.5,
                                           outputs=("residual", "norm"), algorithm=algorithm)
            res = o.residual
            outs.append((o.residual, o.norm))
        return outs

    keys = ("expert_out", "permuted_idx", "expert_scales")
    xs = [np.concatenate([c.groups[0]["ranks"][r][k] for r in range(mc.size)])
          for c in cases for k in keys]
    f = sharded(body, mesh, (P(), P()) + (P("tp"),) * len(xs), P())
    residual, gamma = cases[0].groups[0]["residual"], cases[0].norm_weight
    outs = f(residual, gamma, *xs)
    for c, (res_out, norm_out) in zip(cases, outs):
        c.groups[0]["residual"], c.norm_weight = residual, gamma
        c.outputs = ("residual", "norm")
        ref = check_against_oracle(dict(residual=np.asarray(res_out),
                                        norm=np.asarray(norm_out), quant=None, scale=None), c)
        residual = ref["residual"]
    mar.check_errors()


# ----------------------------------------------------------- in a child process

_SCRIPT_PRELUDE = """
import numpy as np, jax, jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import jax_moe_ar as mar
from jax_moe_ar.testing import N2, N4, make_mesh, sharded
from cases import BF16, Q, gen_case, run_case, check_against_oracle
MC = N4 if len(jax.devices()) >= 4 else N2
"""


def _run_script(body: str, env_extra: dict, timeout=300):
    """Runs the prelude and `body` in a fresh Python that imports this directory's
    helpers (`cases`) through PYTHONPATH; cwd / keeps the source tree off its path."""
    path = os.pathsep.join(filter(None, [TESTS_DIR, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONPATH=path,
               **env_extra)
    code = _SCRIPT_PRELUDE + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], env=env, cwd="/", capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("flags", [
    "--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL --xla_gpu_graph_min_graph_size=1",
    "--xla_gpu_enable_command_buffer=",
], ids=["cmdbuf_on", "cmdbuf_off"])
def test_command_buffers(flags):
    """Correct, repeatedly, whether or not XLA captures the custom call in CUDA graphs."""
    require_gpus(2)
    proc = _run_script(f"""
        rng = np.random.default_rng(5)
        for it in range(3):
            case = gen_case(rng, MC, dtype=BF16, M=24, H=2048, K=8, scales="f32",
                            quant=Q.nvfp4(), outputs=("residual", "norm", "quant"))
            for rep in range(3):
                for algo in {ALGORITHMS!r}:
                    out = run_case(case, MC, platform="gpu", algorithm=algo)[0]
                    check_against_oracle(out, case)
        mar.check_errors()
        print("OK")
    """, {"XLA_FLAGS": flags})
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]


# Per algorithm: which rank skips the call, tokens per rank, and what the waiting ranks'
# outputs show ("all": every value NaN; "any": some value NaN).
MISSING_PEER = [pytest.param("oneshot", "first", 8, "all", id="oneshot"),
                pytest.param("twoshot", "last", 64, "any", id="twoshot")]


@pytest.mark.parametrize("algorithm,skipper,rows,waiters_nan", MISSING_PEER)
def test_missing_peer_times_out_with_clear_error(algorithm, skipper, rows, waiters_nan):
    """One rank skips the call through a rank-dependent branch: the other ranks' waits end
    within the bound, their outputs are NaN (never silently wrong), and the failure
    surfaces as a Python error naming the op, also from the next call — the process does
    not freeze. After mar.reset_workspaces() the same workspace serves exact results."""
    require_gpus(2)
    proc = _run_script(f"""
        import time
        mesh = make_mesh("gpu", MC)
        n = MC.group
        skipper = {0 if skipper == "first" else "n - 1"}
        def body(x, r, g):
            def call(x):
                return mar.allreduce_rmsnorm(x, r, g, axis_name="tp",
                                             algorithm={algorithm!r}).residual
            skip = jax.lax.axis_index("tp") == skipper
            out = jax.lax.cond(skip, lambda x: jnp.zeros_like(r), call, x)
            return out[None]
        f = sharded(body, mesh, (P("tp"), P(), P()), P("tp"), check_vma=False)
        x = jnp.ones((n * {rows}, 256), jnp.bfloat16)
        r = jnp.ones(({rows}, 256), jnp.bfloat16)
        g = jnp.ones((256,), jnp.bfloat16)
        t = time.time()
        out = np.asarray(f(x, r, g), np.float32)
        print("elapsed", time.time() - t)
        print("nan_all", [int(np.isnan(out[i]).all()) for i in range(n)])
        print("nan_any", [int(np.isnan(out[i]).any()) for i in range(n)])
        try:
            mar.check_errors()
            print("NO ERROR")
        except RuntimeError as e:
            print("ERROR:", e)
        try:
            np.asarray(f(x, r, g))
            print("SECOND CALL RAN")
        except Exception as e:
            print("SECOND CALL ERROR:", str(e)[:400])
        # Every rank calls: after a reset the same workspace serves exact results again.
        mar.reset_workspaces()
        def good(x, r, g):
            return mar.allreduce_rmsnorm(x, r, g, axis_name="tp",
                                         algorithm={algorithm!r}).residual[None]
        f2 = sharded(good, mesh, (P("tp"), P(), P()), P("tp"), check_vma=False)
        for _ in range(3):
            res = np.asarray(f2(x, r, g), np.float32)
        mar.check_errors()
        print("after reset", bool((res == n + 1).all()))
    """, {"JAX_MOE_AR_TIMEOUT_S": "2"}, timeout=240)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-5000:]
    assert "ERROR: jax_moe_ar" in out and "jax_moe_ar_fused_v1" in out, out
    n = 4 if len(jax.devices("gpu")) >= 4 else 2
    skip = 0 if skipper == "first" else n - 1
    assert f"nan_{waiters_nan} {[int(i != skip) for i in range(n)]}" in out, out
    assert "SECOND CALL ERROR" in out and "jax_moe_ar_fused_v1" in out, out
    assert "after reset True" in out, out
