"""The plain-JAX path (algorithm="xla" and jax_moe_ar.reference) agrees with the oracle
within tolerance (it psums in T, SPEC §5); jax_moe_ar.dequantize inverts every format."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_moe_ar as mar
import oracle
from cases import (ALL_QUANTS, BF16, F16, F32, Q, assert_same_bits, build, check_against_oracle,
                   dtype_id, gen_case, oracle_outputs, run_case, ulp_distance)
from jax_moe_ar.testing import N1, N2, N4, N4_DP2_TP2, N8_TUPLE, make_mesh

PLATFORM = "cpu"
EPS_T = {BF16: 2.0 ** -7, F16: 2.0 ** -10, F32: 2.0 ** -23}


def assert_close_T(got, want, dtype, what, k=4.0):
    """|got - want| <= k * eps_T * (|want| + rms of the row): a few ulps of T at the
    scale of the row (psum in T loses up to an ulp of the partial sums). NaN == NaN."""
    g = np.asarray(got).astype(np.float32)
    w = np.asarray(want).astype(np.float32)
    assert g.shape == w.shape, what
    gn, wn = np.isnan(g), np.isnan(w)
    assert np.array_equal(gn, wn), f"{what}: NaN at different places"
    g, w = np.where(gn, 0, g), np.where(wn, 0, w)
    fin = np.isfinite(w)
    assert np.array_equal(g[~fin], w[~fin]), f"{what}: Inf differs"
    wf = np.where(fin, w, 0)
    rms = np.sqrt(np.mean(wf.astype(np.float64) ** 2, axis=-1, keepdims=True)) if w.size else 0
    tol = k * EPS_T[np.dtype(dtype)] * (np.abs(wf) + rms)
    err = np.abs(np.where(fin, g, 0) - wf)
    if (err > tol).any():
        i = tuple(int(x) for x in np.argwhere(err > tol)[0])
        raise AssertionError(f"{what}: {int((err > tol).sum())} beyond tolerance; first {i}: "
                             f"got {g[i]}, want {w[i]}, tol {tol[i]:.3g}")


def dequant_tolerance(quant: Q, q_in, scale_out):
    """Largest |dequantized - q_in| the format allows for values q_in (float32 [M, H]),
    given the scales the op produced: half a step of the code grid (+ saturation)."""
    M, H = q_in.shape
    a = np.abs(q_in)
    if quant.kind == "nvfp4":
        g = np.float32(quant.scale_value)
        sf = np.asarray(scale_out)
        if quant.p["layout"] == "swizzled_128x4":
            sf = oracle._unswizzle(sf, M, H)
        sf = np.repeat(sf.astype(np.float32), 16, axis=1)
        unit = sf / g                        # value of e2m1 1.0 in this block
        over = np.maximum(a - 6 * unit, 0)   # saturated part (sf itself saturates at 448)
        return 1.0 * unit + 1e-6 * a + over  # e2m1 steps are at most 2 units apart
    if quant.kind == "fp8_static":
        s = np.float32(quant.scale_value)
        over = np.maximum(a - 448 * s, 0)    # saturated part
        return 2.0 ** -4 * np.minimum(a, 448 * s) + s * 2.0 ** -9 + over
    s = np.asarray(scale_out).astype(np.float32)
    if quant.kind == "fp8_per_token":
        s = np.broadcast_to(s, (M, H))
    else:
        gs = quant.p["group_size"]
        if quant.p["scale_layout"] == "col":
            s = s.T
        s = np.repeat(s, gs, axis=1)
    return 2.0 ** -4 * a + s * 2.0 ** -9


def check_close_to_oracle(out, case, g=0):
    ref = oracle_outputs(case, g)
    T = case.dtype
    outs = case.resolved_outputs
    if "residual" in outs:
        assert out["residual"].dtype == T
        assert_close_T(out["residual"], ref["residual"], T, "residual")
    if "norm" in outs:
        assert out["norm"].dtype == T
        assert_close_T(out["norm"], ref["norm"], T, "norm", k=8.0)
    if "quant" in outs:
        q = case.quant
        (cs, cd), sc = q.output_shapes(case.M, case.H)
        assert out["quant"].shape == cs and out["quant"].dtype == cd
        if sc is not None:
            assert out["scale"].shape == sc[0] and out["scale"].dtype == sc[1]
        deq = np.asarray(mar.dequantize(
            mar.FusedOutputs(None, None, jnp.asarray(out["quant"]),
                             None if out["scale"] is None else jnp.asarray(out["scale"])),
            q.spec()))
        # within half a code step of the path's own norm_out (itself close to the oracle's,
        # checked above); without norm asked for, of the oracle's norm with its slack
        if out["norm"] is not None:
            q_in, slack = out["norm"].astype(np.float32), 0.0
        else:
            q_in = ref["norm"].astype(np.float32)
            rms = np.sqrt(np.mean(q_in.astype(np.float64) ** 2, axis=1, keepdims=True))
            slack = 8 * EPS_T[np.dtype(T)] * (np.abs(q_in) + rms) * 1.25
        tol = dequant_tolerance(q, q_in, out["scale"]) + slack
        err = np.abs(deq - q_in)
        assert (err <= tol).all(), \
            f"dequantized {q.id}: {int((err > tol).sum())} values off; max excess " \
            f"{np.max(err - tol):.3g}"
    return ref


CONFIGS = [
    (N4, BF16, dict(scales="f32", shared=True, rsf=2.5, oob=True)),
    (N2, F16, dict(scales="T", rsf=0.7, offset=1.0, nw_dtype="f32")),
    (N8_TUPLE, F32, dict(shared=True, eps=1e-5)),
    (N4_DP2_TP2, BF16, dict(dense=True)),
    (N1, BF16, dict(scales="f32", shared=True)),
]


def cfg_id(c):
    return f"{c[0].id}-{dtype_id(c[1])}-" + "-".join(k for k in c[2])


@pytest.mark.parametrize("cfg", CONFIGS, ids=cfg_id)
def test_xla_algorithm_close_to_oracle(rng, cfg):
    mc, dtype, kw = cfg
    case = gen_case(rng, mc, dtype=dtype, M=33, H=256, K=8, **kw)
    for g, out in enumerate(run_case(case, mc, platform=PLATFORM, algorithm="xla")):
        check_close_to_oracle(out, case, g)


def _amax_scale(rng, mc, dtype, kw):
    """NVFP4 global scale 448*6/amax of the (oracle's) norm, as users compute it."""
    probe = gen_case(np.random.default_rng(rng.integers(1 << 31)), mc, dtype=dtype, M=17,
                     H=256, K=4, **kw)
    amax = max(float(np.nanmax(np.abs(oracle_outputs(probe, g)["norm"].astype(np.float32))))
               for g in range(len(probe.groups)))
    return 448.0 * 6 / amax


@pytest.mark.parametrize("quant", ALL_QUANTS, ids=lambda q: q.id)
@pytest.mark.parametrize("mc,dtype", [(N4, BF16), (N2, F32)], ids=["n4-bf16", "n2-f32"])
def test_xla_algorithm_quant_close(rng, mc, dtype, quant):
    kw = dict(scales="f32", shared=True, rsf=1.5)
    seed = int(rng.integers(1 << 31))
    if quant.kind == "nvfp4":
        quant = Q.nvfp4(_amax_scale(np.random.default_rng(seed), mc, dtype, kw),
                        quant.p["layout"])
    case = gen_case(np.random.default_rng(seed + 1), mc, dtype=dtype, M=17, H=256, K=4,
                    quant=quant, outputs=("residual", "norm", "quant"), **kw)
    out = run_case(case, mc, platform=PLATFORM, algorithm="xla")[0]
    check_close_to_oracle(out, case)


@pytest.mark.parametrize("dense", [False, True], ids=["moe", "dense"])
def test_reference_module_inside_shard_map(rng, dense):
    """jax_moe_ar.reference called directly (no checks, same signature) in shard_map."""
    quant = Q.fp8_per_group(64, True, "col")
    case = gen_case(rng, N4, dtype=BF16, M=9, H=128, dense=dense, scales="f32", shared=True,
                    rsf=2.0, quant=quant, outputs=("residual", "norm", "quant"))

    def fn(named, spec):
        if dense:
            return mar.reference.allreduce_rmsnorm(
                named["x"], named["residual"], named["norm_weight"], axis_name="tp",
                quant=spec, outputs=case.outputs)
        return mar.reference.moe_finalize_allreduce(
            named["expert_out"], named["permuted_idx"], named["residual"],
            named["norm_weight"], axis_name="tp", expert_scales=named["expert_scales"],
            shared_expert_out=named["shared_expert_out"], routed_scaling_factor=case.rsf,
            quant=spec, outputs=case.outputs)

    f, args = build(case, N4, make_mesh(PLATFORM, N4), fn=fn)
    out = f(*args)
    check_close_to_oracle({k: (None if getattr(out, k) is None else np.asarray(getattr(out, k)))
                           for k in ("residual", "norm", "quant", "scale")}, case)


def test_reference_default_outputs(rng):
    case = gen_case(rng, N2, dtype=F32, M=4, H=32, dense=True)
    seen = {}

    def fn(named, spec):
        a = mar.reference.allreduce_rmsnorm(named["x"], named["residual"], named["norm_weight"],
                                            axis_name="tp")
        b = mar.reference.allreduce_rmsnorm(named["x"], named["residual"], named["norm_weight"],
                                            axis_name="tp", quant=mar.Fp8PerToken())
        seen["a"] = tuple(x is not None for x in a)
        seen["b"] = tuple(x is not None for x in b)
        return a

    f, args = build(case, N2, make_mesh(PLATFORM, N2), fn=fn)
    f(*args)
    assert seen["a"] == (True, True, False, False)
    assert seen["b"] == (True, False, True, True)


def test_force_xla_env_routes_to_reference(rng, monkeypatch):
    """$JAX_MOE_AR_FORCE_XLA=1 gives exactly what algorithm="xla" gives."""
    case = gen_case(rng, N4, dtype=BF16, M=9, H=64, scales="f32", shared=True, rsf=1.3)
    want = run_case(case, N4, algorithm="xla")[0]
    monkeypatch.setenv("JAX_MOE_AR_FORCE_XLA", "1")
    got = run_case(case, N4, algorithm="auto")[0]
    for k in ("residual", "norm"):
        assert_same_bits(got[k], want[k], k, nan_equal=False)


# ------------------------------------------------------------------------ dequantize

@pytest.mark.parametrize("quant", ALL_QUANTS + (Q.nvfp4(1e4, "swizzled_128x4"),),
                         ids=lambda q: f"{q.id}_{q.scale_value}" if q.takes_scale else q.id)
@pytest.mark.parametrize("M", [5, 130])
def test_dequantize_inverts_every_format(rng, M, quant):
    """mar.dequantize on the op's outputs equals oracle.dequantize of the same codes and
    scales (bit for bit, NaN == NaN), eagerly and under jit, and lands within half a code
    step of the op's own norm_out."""
    case = gen_case(rng, N2, dtype=BF16, M=M, H=128, quant=quant, outputs=("norm", "quant"),
                    specials=2, subnormals=False)
    out = run_case(case, N2, platform=PLATFORM)[0]
    check_against_oracle(out, case)
    fo = mar.FusedOutputs(None, jnp.asarray(out["norm"]), jnp.asarray(out["quant"]),
                          None if out["scale"] is None else jnp.asarray(out["scale"]))
    spec = quant.spec()
    got = np.asarray(mar.dequantize(fo, spec))
    got_jit = np.asarray(jax.jit(lambda o: mar.dequantize(o, spec))(fo))
    want = oracle.dequantize(out["quant"], out["scale"], quant.kind, **quant.oracle_params())
    assert got.dtype == np.float32 and got.shape == (M, 128)
    # fp8 formats: one float32 multiply, bit for bit; NVFP4 (codes * sf) / g: XLA may turn
    # the division into a multiply by 1/g, so allow 1 float32 ulp there
    want = want.astype(np.float32)
    if quant.kind == "nvfp4":
        fin = np.isfinite(want)
        assert np.array_equal(np.isnan(got), np.isnan(want))
        assert np.array_equal(got[~fin & ~np.isnan(want)], want[~fin & ~np.isnan(want)])
        assert ulp_distance(got[fin], want[fin]).max(initial=0) <= 1
    else:
        assert_same_bits(got, want, "dequantize vs oracle.dequantize")
    assert_same_bits(got_jit, got, "dequantize under jit vs eager")
    q_in = out["norm"].astype(np.float32)
    # rows holding NaN/Inf: scales and codes follow the oracle (checked above), not the values
    ok = np.broadcast_to(np.isfinite(q_in).all(axis=1, keepdims=True), q_in.shape)
    tol = dequant_tolerance(quant, q_in, out["scale"])
    err = np.abs(got - q_in)
    assert (err[ok] <= tol[ok]).all(), f"max excess {np.max((err - tol)[ok]):.3g}"


def test_dequantize_refuses_missing_quant():
    out = mar.FusedOutputs(jnp.zeros((1, 16)), None, None, None)
    with pytest.raises(ValueError, match="quant"):
        mar.dequantize(out, mar.Fp8PerToken())
