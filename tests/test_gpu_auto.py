"""Which path runs on GPUs (marked `gpu`): `auto` picks one-shot or two-shot per call from
static shapes, falls back to the plain-JAX path (with a warning) for calls the kernel
cannot serve, and that plain-JAX path agrees with the fused kernel."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jax_moe_ar as mar
from jax_moe_ar import workspace
from jax_moe_ar.testing import N2, N4, make_mesh, sharded

from cases import BF16, H_REAL, Q, build, check_against_oracle, gen_case, run_case

pytestmark = pytest.mark.gpu


def test_auto_switches_inside_one_program(rng):
    """Small and large calls in one program, chained through the residual: `auto` runs
    one-shot for the small and two-shot for the large, interleaved on the same buffers."""
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


def test_auto_falls_back_with_one_warning_and_forced_raises():
    """A row too wide for the kernel's shared-memory staging cannot be served: `auto`
    uses the plain-JAX path with a warning, `oneshot` refuses."""
    mesh = make_mesh("gpu", N2)
    H = 64 * 1024  # 128 KiB of bf16 per row
    x = jnp.ones((2 * 4, H), jnp.bfloat16)
    r = jnp.ones((4, H), jnp.bfloat16)
    g = jnp.ones((H,), jnp.bfloat16)

    def run(algorithm):
        f = sharded(lambda x, r, g: mar.allreduce_rmsnorm(x, r, g, axis_name="tp",
                                                          algorithm=algorithm).residual,
                    mesh, (P("tp"), P(), P()), P())
        return f(x, r, g)

    with pytest.warns(RuntimeWarning, match="plain-JAX"):
        out = run("auto")
    np.testing.assert_array_equal(np.asarray(out, np.float32), 3.0)
    with pytest.raises(Exception, match="cannot run here"):
        run("oneshot")


@pytest.mark.parametrize("M", [128, 1000])
def test_xla_path_nvfp4_swizzled_compiles_and_agrees(rng, M):
    """Regression: XLA's GPU compiler segfaulted on the plain-JAX NVFP4 swizzled path
    (the `auto` fallback) from M = 128 up. It must compile, run, and agree with the fused
    kernel up to the xla path's tolerance (it psums in T)."""
    case = gen_case(rng, N2, dtype=BF16, M=M, H=H_REAL, K=8, quant=Q.nvfp4(),
                    outputs=("residual", "norm", "quant"))
    xla = run_case(case, N2, platform="gpu", algorithm="xla")[0]
    fused = run_case(case, N2, platform="gpu", algorithm="oneshot")[0]
    assert xla["scale"].shape == fused["scale"].shape
    spec = case.quant.spec()
    dq = lambda o: np.asarray(mar.dequantize(mar.FusedOutputs(None, None, o["quant"],
                                                              o["scale"]), spec))
    a, b = dq(xla), dq(fused)
    assert np.isfinite(a).all()
    rel = lambda x, y: float(np.linalg.norm(x - y) / np.linalg.norm(y))
    # Each path's codes encode its own norm_out within NVFP4's quantization error, and the
    # two paths' dequantized values are as close as that error allows (the xla path rounds
    # differently: it psums in T, so codes near a decision point may differ by one step).
    assert rel(a, xla["norm"].astype(np.float32)) < 0.2
    assert rel(b, fused["norm"].astype(np.float32)) < 0.2
    assert rel(a, b) < 0.15
