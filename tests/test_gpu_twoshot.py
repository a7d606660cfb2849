"""GPU tests of the two-shot algorithm and of `auto` (marked `gpu`).

Two-shot reduce-scatters the partials by token chunk, runs the fused tail on the
owned rows and all-gathers the outputs; it must meet the same SPEC §3 agreement
rows as one-shot, at any M (including M < ranks and M not a multiple of them).
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jax_moe_ar as mar
from jax_moe_ar import workspace
from jax_moe_ar.testing import N1, N2, N4, N4_DP2_TP2, make_mesh, sharded

from cases import (ALL_QUANTS, BF16, DTYPES, F16, F32, Q, assert_ranks_identical, build,
                   check_against_oracle, dtype_id, gen_case, require_gpus, run_case,
                   seed_for)

pytestmark = pytest.mark.gpu
ALGO = "twoshot"


def _rng(request):
    return np.random.default_rng(seed_for(request.node.nodeid))


@pytest.mark.parametrize("mesh_case", [N1, N2, N4], ids=lambda c: c.id)
@pytest.mark.parametrize("M", [1, 3, 129, 1000, 4096])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_agreement_no_quant(request, mesh_case, M, dtype):
    rng = _rng(request)
    H = 7168 if M <= 129 else 1024
    case = gen_case(rng, mesh_case, dtype=dtype, M=M, H=H, K=8, scales="f32", shared=True,
                    rsf=2.5, oob=True, outputs=("residual", "norm"))
    per_rank = run_case(case, mesh_case, platform="gpu", algorithm=ALGO, per_rank=True)[0]
    assert_ranks_identical(per_rank)
    check_against_oracle(per_rank[0], case)


@pytest.mark.parametrize("mesh_case", [N1, N2, N4], ids=lambda c: c.id)
@pytest.mark.parametrize("quant", ALL_QUANTS, ids=lambda q: q.id)
@pytest.mark.parametrize("M", [7, 129, 1000])
def test_agreement_quant(request, mesh_case, quant, M):
    rng = _rng(request)
    case = gen_case(rng, mesh_case, dtype=(BF16, F16, F32)[M % 3], M=M, H=1024, K=8,
                    scales="T", shared=True, quant=quant, outputs=("residual", "norm", "quant"))
    per_rank = run_case(case, mesh_case, platform="gpu", algorithm=ALGO, per_rank=True)[0]
    assert_ranks_identical(per_rank)
    check_against_oracle(per_rank[0], case)


@pytest.mark.parametrize("outputs", [("quant",), ("norm",), ("residual", "quant"),
                                     ("norm", "quant")], ids="-".join)
@pytest.mark.parametrize("quant", [Q.fp8_per_group(128, scale_layout="col"), Q.nvfp4()],
                         ids=lambda q: q.id)
def test_gathers_only_what_was_asked(request, outputs, quant):
    """The all-gather carries exactly the asked outputs; each comes back right."""
    rng = _rng(request)
    case = gen_case(rng, N4, dtype=BF16, M=4096 + 3, H=512, K=4, quant=quant, outputs=outputs)
    check_against_oracle(run_case(case, N4, platform="gpu", algorithm=ALGO)[0], case)


def test_dense_and_special_values(request):
    rng = _rng(request)
    case = gen_case(rng, N4, dtype=BF16, M=1001, H=256, dense=True, specials=60,
                    zero_rows=True, quant=Q.nvfp4(layout="linear"),
                    outputs=("residual", "norm", "quant"))
    per_rank = run_case(case, N4, platform="gpu", algorithm=ALGO, per_rank=True)[0]
    assert_ranks_identical(per_rank)
    check_against_oracle(per_rank[0], case)
    mar.check_errors()


def test_two_groups(request):
    rng = _rng(request)
    case = gen_case(rng, N4_DP2_TP2, dtype=BF16, M=777, H=1024, K=8, scales="f32",
                    quant=Q.fp8_per_token(), outputs=("residual", "norm", "quant"))
    for g, out in enumerate(run_case(case, N4_DP2_TP2, platform="gpu", algorithm=ALGO)):
        check_against_oracle(out, case, g)


def test_auto_switches_inside_one_program(request):
    """Small and large calls in one program, chained through the residual: `auto` runs
    one-shot for the small and two-shot for the large, interleaved on the same buffers."""
    rng = _rng(request)
    H = 1024
    small_M, big_M = 8, 2 * workspace.TWOSHOT_MIN_BYTES // (H * 2)
    assert workspace.choose_algorithm("auto", small_M, H, 2, 4) == workspace.ALGO_ONESHOT
    assert workspace.choose_algorithm("auto", big_M, H, 2, 4) == workspace.ALGO_TWOSHOT
    small = gen_case(rng, N4, dtype=BF16, M=small_M, H=H, K=4)
    big = gen_case(rng, N4, dtype=BF16, M=big_M, H=H, K=4)
    mesh = make_mesh("gpu", N4)
    _, a_small = build(small, N4, mesh)
    _, a_big = build(big, N4, mesh)

    def body(es, i_s, rs, g, eb, ib, rb):
        outs = []
        for _ in range(3):
            o1 = mar.moe_finalize_allreduce(es, i_s, rs, g, axis_name="tp")
            o2 = mar.moe_finalize_allreduce(eb, ib, rb, g, axis_name="tp")
            rs, rb = o1.residual, o2.residual
            outs.append((o1.residual, o1.norm, o2.residual, o2.norm))
        return outs

    specs = (P("tp"), P("tp"), P(), P(), P("tp"), P("tp"), P())
    f = sharded(body, mesh, specs, P())
    text = f.lower(a_small[0], a_small[1], a_small[2], small.norm_weight, a_big[0], a_big[1],
                   a_big[2]).as_text()
    assert "algorithm = 0" in text and "algorithm = 1" in text
    big.norm_weight = small.norm_weight
    outs = f(a_small[0], a_small[1], a_small[2], small.norm_weight, a_big[0], a_big[1], a_big[2])
    for r1, n1, r2, n2 in outs:
        for case, res, nrm in ((small, r1, n1), (big, r2, n2)):
            ref = check_against_oracle(dict(residual=np.asarray(res), norm=np.asarray(nrm),
                                            quant=None, scale=None), case)
            case.groups[0]["residual"] = ref["residual"]


@pytest.mark.parametrize("M", [5, 2048])
def test_back_to_back_twoshot_exact(request, M):
    """300 chained two-shot calls back to back (a scan), inputs changing every call."""
    rng = _rng(request)
    mesh = make_mesh("gpu", N4)
    steps, H, K, Pr = 100, 256, 8, 16
    quant = Q.nvfp4()

    def body(eo, idx, res0, gamma):
        def step(res, xs):
            o = mar.moe_finalize_allreduce(xs[0], xs[1], res, gamma, axis_name="tp",
                                           quant=quant.spec(),
                                           outputs=("residual", "norm", "quant"), algorithm=ALGO)
            return o.residual, (o.residual, o.norm, o.quant, o.scale)
        return jax.lax.scan(step, res0, (eo, idx))[1]

    f = sharded(body, mesh, (P(None, "tp"), P(None, "tp"), P(), P()), P())
    gamma = (1 + 0.1 * rng.standard_normal(H)).astype(np.float32)
    residual = rng.standard_normal((M, H)).astype(BF16)
    for _ in range(3):
        cases = [gen_case(rng, N4, dtype=BF16, M=M, H=H, K=K, P=Pr) for _ in range(steps)]
        stack = lambda key: np.stack([np.concatenate([c.groups[0]["ranks"][r][key]
                                                      for r in range(4)]) for c in cases])
        ys = [np.asarray(y) for y in f(stack("expert_out"), stack("permuted_idx"), residual,
                                       gamma)]
        for s, c in enumerate(cases):
            c.groups[0]["residual"], c.norm_weight = residual, gamma
            c.quant, c.outputs = quant, ("residual", "norm", "quant")
            ref = check_against_oracle(dict(residual=ys[0][s], norm=ys[1][s], quant=ys[2][s],
                                            scale=ys[3][s]), c)
            residual = ref["residual"]
    mar.check_errors()


def test_missing_peer_twoshot_times_out():
    """The last rank skips a two-shot call: the others' waits (for its reduce-scatter pushes
    and for its rows' packets) end within the bound, their outputs are NaN, the error names
    the op; after mar.reset_workspaces() the same program shapes run exactly again."""
    require_gpus(2)
    n = 4 if len(jax.devices("gpu")) >= 4 else 2
    code = f"""
import sys, numpy as np, jax, jax.numpy as jnp
sys.path.insert(0, {os.path.dirname(__file__)!r})
from jax.sharding import PartitionSpec as P
import jax_moe_ar as mar
from jax_moe_ar.testing import N2, N4, make_mesh, sharded
n = {n}
mesh = make_mesh("gpu", N4 if n == 4 else N2)
def body(x, r, g):
    call = lambda x: mar.allreduce_rmsnorm(x, r, g, axis_name="tp", algorithm="twoshot").residual
    out = jax.lax.cond(jax.lax.axis_index("tp") == n - 1, lambda x: jnp.zeros_like(r), call, x)
    return out[None]
f = sharded(body, mesh, (P("tp"), P(), P()), P("tp"), check_vma=False)
x, r, g = (jnp.ones((n * 64, 256), jnp.bfloat16), jnp.ones((64, 256), jnp.bfloat16),
           jnp.ones((256,), jnp.bfloat16))
out = np.asarray(f(x, r, g), np.float32)
print("nan_ranks", [int(np.isnan(out[i]).any()) for i in range(n)])
try:
    mar.check_errors(); print("NO ERROR")
except RuntimeError as e:
    print("ERROR:", e)
mar.reset_workspaces()
good = lambda x, r, g: mar.allreduce_rmsnorm(x, r, g, axis_name="tp",
                                             algorithm="twoshot").residual[None]
f2 = sharded(good, mesh, (P("tp"), P(), P()), P("tp"), check_vma=False)
for _ in range(3):
    res = np.asarray(f2(x, r, g), np.float32)
mar.check_errors()
print("after reset", bool((res == n + 1).all()))
"""
    env = dict(os.environ, JAX_MOE_AR_TIMEOUT_S="2", XLA_PYTHON_CLIENT_PREALLOCATE="false")
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd="/", capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert f"nan_ranks {[1] * (n - 1) + [0]}" in proc.stdout, proc.stdout
    assert "ERROR: jax_moe_ar" in proc.stdout, proc.stdout
    assert "after reset True" in proc.stdout, proc.stdout
