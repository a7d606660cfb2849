"""SPEC §4: inputs refused at trace time with ValueError/TypeError naming the argument;
M = 0 returns empty outputs; a group of one rank works.

The refusal tests take a `mesh` of CPU devices and, marked `gpu`, of GPUs (4 when the
machine has them, else 2): the same rules hold whichever platform the program targets."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as PS

import jax_moe_ar as mar
from cases import ALL_QUANTS, BF16, Q, check_against_oracle, gen_case, run_case
from jax_moe_ar.testing import N1, N2, N4, make_mesh, sharded

S = jax.ShapeDtypeStruct
M, H, K, P = 3, 32, 2, 5
BAD = (ValueError, TypeError)


@pytest.fixture(scope="module", params=["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def mesh(request):
    if request.param == "gpu" and len(jax.devices("gpu")) < 4:
        return make_mesh("gpu", N2)
    return make_mesh(request.param, N4)


def _n(mesh):
    """Ranks along "tp"."""
    return mesh.shape["tp"]


def _moe_specs(has_scales, has_shared):
    return [PS("tp"), PS("tp"), PS(), PS()] + [PS("tp")] * (has_scales + has_shared)


def trace_moe(mesh, eo=None, idx=None, res=None, nw=None, scales=None, shared=None,
              axis_name="tp", **kw):
    """Traces (only) jit(shard_map(moe_finalize_allreduce)) for per-rank shapes."""
    eo = S((P, H), jnp.bfloat16) if eo is None else eo
    idx = S((M, K), jnp.int32) if idx is None else idx
    res = S((M, H), jnp.bfloat16) if res is None else res
    nw = S((H,), jnp.float32) if nw is None else nw
    stack = lambda s: S((_n(mesh) * s.shape[0],) + tuple(s.shape[1:]), s.dtype)  # noqa: E731
    args = [stack(eo), stack(idx), res, nw]
    args += [stack(a) for a in (scales, shared) if a is not None]

    def body(*a):
        a = list(a)
        e, i, r, n = a[:4]
        rest = a[4:]
        sc = rest.pop(0) if scales is not None else None
        sh = rest.pop(0) if shared is not None else None
        return mar.moe_finalize_allreduce(e, i, r, n, axis_name=axis_name, expert_scales=sc,
                                          shared_expert_out=sh, **kw)

    f = jax.jit(jax.shard_map(body, mesh=mesh,
                              in_specs=tuple(_moe_specs(scales is not None, shared is not None)),
                              out_specs=PS()))
    return f.trace(*args)


def trace_dense(mesh, x=None, res=None, nw=None, axis_name="tp", **kw):
    x = S((M, H), jnp.bfloat16) if x is None else x
    res = S((M, H), jnp.bfloat16) if res is None else res
    nw = S((H,), jnp.float32) if nw is None else nw
    xs = S((_n(mesh) * x.shape[0],) + tuple(x.shape[1:]), x.dtype)

    def body(x, r, n):
        return mar.allreduce_rmsnorm(x, r, n, axis_name=axis_name, **kw)

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(PS("tp"), PS(), PS()), out_specs=PS()))
    return f.trace(xs, res, nw)


def refused(fn, arg, *more):
    """fn() raises ValueError/TypeError whose message names `arg` (and mentions `more`)."""
    with pytest.raises(BAD) as info:
        fn()
    msg = str(info.value)
    assert re.search(rf"\b{re.escape(arg)}\b", msg), f"message does not name {arg!r}: {msg}"
    for m in more:
        assert m in msg, f"message lacks {m!r}: {msg}"
    return msg


def test_valid_call_traces(mesh):
    trace_moe(mesh)
    trace_dense(mesh)
    trace_moe(mesh, scales=S((M, K), jnp.float32), shared=S((M, H), jnp.bfloat16),
              quant=mar.NvFp4(jnp.float32(600.0)))


# ------------------------------------------------------------------------------ dtypes

def test_expert_out_float64_refused(mesh):
    with jax.enable_x64(True):
        refused(lambda: trace_moe(mesh, eo=S((P, H), jnp.float64),
                                  res=S((M, H), jnp.float64), nw=S((H,), jnp.float64)),
                "expert_out", "float64")


@pytest.mark.parametrize("dt", [jnp.int8, jnp.float8_e4m3fn, jnp.int32])
def test_expert_out_other_dtypes_refused(mesh, dt):
    refused(lambda: trace_moe(mesh, eo=S((P, H), dt)), "expert_out")


def test_dense_x_float64_refused(mesh):
    with jax.enable_x64(True):
        refused(lambda: trace_dense(mesh, x=S((M, H), jnp.float64), res=S((M, H), jnp.float64),
                                    nw=S((H,), jnp.float64)), "x", "float64")


@pytest.mark.parametrize("dt", [jnp.float32, jnp.float16])
def test_residual_not_T_refused(mesh, dt):
    refused(lambda: trace_moe(mesh, res=S((M, H), dt)), "residual")
    refused(lambda: trace_dense(mesh, res=S((M, H), dt)), "residual")


@pytest.mark.parametrize("dt", [jnp.float32, jnp.float16])
def test_shared_not_T_refused(mesh, dt):
    refused(lambda: trace_moe(mesh, shared=S((M, H), dt)), "shared_expert_out")


def test_idx_int64_refused(mesh):
    with jax.enable_x64(True):
        refused(lambda: trace_moe(mesh, idx=S((M, K), jnp.int64)), "permuted_idx", "int32")


@pytest.mark.parametrize("dt", [jnp.float32, jnp.uint32, jnp.int16])
def test_idx_not_int32_refused(mesh, dt):
    refused(lambda: trace_moe(mesh, idx=S((M, K), dt)), "permuted_idx", "int32")


def test_norm_weight_f16_with_bf16_refused(mesh):
    refused(lambda: trace_moe(mesh, nw=S((H,), jnp.float16)), "norm_weight")
    refused(lambda: trace_dense(mesh, nw=S((H,), jnp.float16)), "norm_weight")


def test_norm_weight_T_or_f32_accepted(mesh):
    trace_moe(mesh, nw=S((H,), jnp.bfloat16))
    trace_moe(mesh, eo=S((P, H), jnp.float16), res=S((M, H), jnp.float16),
              nw=S((H,), jnp.float16))


@pytest.mark.parametrize("dt", [jnp.float16, jnp.int32])
def test_expert_scales_dtype_refused(mesh, dt):
    refused(lambda: trace_moe(mesh, scales=S((M, K), dt)), "expert_scales")


def test_expert_scales_T_or_f32_accepted(mesh):
    trace_moe(mesh, scales=S((M, K), jnp.bfloat16))
    trace_moe(mesh, scales=S((M, K), jnp.float32))


# ------------------------------------------------------------------------------ shapes

@pytest.mark.parametrize("what,kw,arg", [
    ("residual M", dict(res=S((M + 1, H), jnp.bfloat16)), "residual"),
    ("residual H", dict(res=S((M, H + 16), jnp.bfloat16)), "residual"),
    ("expert_out H", dict(eo=S((P, H + 16), jnp.bfloat16)), "expert_out"),
    ("scales K", dict(scales=S((M, K + 1), jnp.float32)), "expert_scales"),
    ("scales M", dict(scales=S((M + 1, K), jnp.float32)), "expert_scales"),
    ("shared H", dict(shared=S((M, H + 16), jnp.bfloat16)), "shared_expert_out"),
    ("shared M", dict(shared=S((M + 1, H), jnp.bfloat16)), "shared_expert_out"),
    ("norm_weight long", dict(nw=S((H + 16,), jnp.float32)), "norm_weight"),
    ("norm_weight 2-D", dict(nw=S((H, 1), jnp.float32)), "norm_weight"),
    ("norm_weight scalar", dict(nw=S((), jnp.float32)), "norm_weight"),
    ("expert_out 3-D", dict(eo=S((P, H, 1), jnp.bfloat16)), "expert_out"),
    ("idx 1-D", dict(idx=S((M,), jnp.int32)), "permuted_idx"),
    ("idx 3-D", dict(idx=S((M, K, 1), jnp.int32)), "permuted_idx"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_shape_mismatch_refused(mesh, what, kw, arg):
    refused(lambda: trace_moe(mesh, **kw), arg)


@pytest.mark.parametrize("kw,arg", [
    (dict(res=S((M + 1, H), jnp.bfloat16)), "residual"),
    (dict(res=S((M, H + 16), jnp.bfloat16)), "residual"),
    (dict(nw=S((H + 16,), jnp.float32)), "norm_weight"),
    (dict(x=S((M, H, 1), jnp.bfloat16)), "x"),
])
def test_dense_shape_mismatch_refused(mesh, kw, arg):
    refused(lambda: trace_dense(mesh, **kw), arg)


@pytest.mark.parametrize("h", [24, 8, 100])
def test_H_not_multiple_of_16_refused(mesh, h):
    msg = refused(lambda: trace_moe(mesh, eo=S((P, h), jnp.bfloat16), res=S((M, h), jnp.bfloat16),
                                    nw=S((h,), jnp.float32)), "H", "16")
    assert str(h) in msg
    refused(lambda: trace_dense(mesh, x=S((M, h), jnp.bfloat16), res=S((M, h), jnp.bfloat16),
                                nw=S((h,), jnp.float32)), "H", "16")


@pytest.mark.parametrize("gs", [48, 64, 24])
def test_group_size_not_dividing_H_refused(mesh, gs):
    msg = refused(lambda: trace_moe(mesh, quant=mar.Fp8PerGroup(gs)), "group_size")
    assert "quant" in msg or "Fp8PerGroup" in msg
    refused(lambda: trace_dense(mesh, quant=mar.Fp8PerGroup(gs, True, "col")), "group_size")


def test_per_group_default_128_needs_H_multiple_of_128(mesh):
    refused(lambda: trace_moe(mesh, quant=mar.Fp8PerGroup()), "group_size")


@pytest.mark.parametrize("make", [
    lambda: jnp.float16(0.5),                     # float16 array
    lambda: jnp.bfloat16(0.5),
    lambda: jnp.ones((1,), jnp.float32),          # shape (1,)
    lambda: jnp.ones((1, 1), jnp.float32),
    lambda: np.array(0.5),                        # float64 0-d array
    lambda: jnp.int32(1),
    lambda: None,
    lambda: "0.5",
], ids=["f16", "bf16", "shape1", "shape11", "np_f64_0d", "int32", "none", "str"])
@pytest.mark.parametrize("kind", ["fp8_static", "nvfp4"])
def test_scale_not_float32_scalar_refused(mesh, kind, make):
    name = "scale" if kind == "fp8_static" else "global_scale"

    def go():
        q = mar.Fp8Static(make()) if kind == "fp8_static" else mar.NvFp4(make())
        return trace_moe(mesh, quant=q)
    refused(go, name)


@pytest.mark.parametrize("make", [lambda: jnp.float32(0.5), lambda: np.float32(0.5),
                                  lambda: np.array(0.5, np.float32), lambda: 0.5, lambda: 2,
                                  lambda: np.float64(0.5)],
                         ids=["jnp", "np_scalar", "np_0d", "pyfloat", "pyint", "np_f64"])
def test_scale_float32_scalar_accepted(mesh, make):
    trace_moe(mesh, quant=mar.Fp8Static(make()))
    trace_moe(mesh, quant=mar.NvFp4(make()))


# ----------------------------------------------------------------- outputs, algorithm

@pytest.mark.parametrize("outputs", [("quant",), ("residual", "quant"), ("norm", "quant")])
def test_outputs_quant_without_spec_refused(mesh, outputs):
    msg = refused(lambda: trace_moe(mesh, outputs=outputs), "outputs", "quant")
    refused(lambda: trace_dense(mesh, outputs=outputs), "outputs", "quant")
    assert msg


@pytest.mark.parametrize("outputs", [("residual", "scale"), ("normed",), ("residual", None)])
def test_outputs_unknown_name_refused(mesh, outputs):
    refused(lambda: trace_moe(mesh, outputs=outputs), "outputs")
    refused(lambda: trace_dense(mesh, outputs=outputs, quant=mar.Fp8PerToken()), "outputs")


@pytest.mark.parametrize("algorithm", ["threeshot", "XLA", None, "nccl"])
def test_unknown_algorithm_refused(mesh, algorithm):
    refused(lambda: trace_moe(mesh, algorithm=algorithm), "algorithm")
    refused(lambda: trace_dense(mesh, algorithm=algorithm), "algorithm")


def test_unknown_quant_spec_refused(mesh):
    refused(lambda: trace_moe(mesh, quant="fp8"), "quant")


@pytest.mark.parametrize("kw", ["eps", "routed_scaling_factor", "norm_weight_offset"])
def test_non_static_floats_refused(mesh, kw):
    """A traced value (and a jax array) for a static python float is refused."""
    N = _n(mesh)
    eo = S((N * P, H), jnp.bfloat16)
    idx = S((N * M, K), jnp.int32)
    res, nw = S((M, H), jnp.bfloat16), S((H,), jnp.float32)

    def body(e, i, r, n, v):
        return mar.moe_finalize_allreduce(e, i, r, n, axis_name="tp", **{kw: v})

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(PS("tp"), PS("tp"), PS(), PS(), PS()),
                              out_specs=PS()))
    refused(lambda: f.trace(eo, idx, res, nw, S((), jnp.float32)), kw)
    refused(lambda: trace_moe(mesh, **{kw: jnp.float32(0.5)}), kw)
    if kw == "eps":
        def dense(x, r, n, v):
            return mar.allreduce_rmsnorm(x, r, n, axis_name="tp", eps=v)
        g = jax.jit(jax.shard_map(dense, mesh=mesh, in_specs=(PS("tp"), PS(), PS(), PS()),
                                  out_specs=PS()))
        refused(lambda: g.trace(S((N * M, H), jnp.bfloat16), res, nw, S((), jnp.float32)), "eps")


# ------------------------------------------------------------------------ axis binding

def _plain_args():
    return (np.ones((P, H), BF16), np.zeros((M, K), np.int32), np.ones((M, H), BF16),
            np.ones((H,), np.float32))


def test_axis_unbound_under_plain_jit():
    eo, idx, res, nw = _plain_args()
    f = jax.jit(lambda e, i, r, n: mar.moe_finalize_allreduce(e, i, r, n, axis_name="tp"))
    refused(lambda: f(eo, idx, res, nw), "axis_name", "shard_map")
    g = jax.jit(lambda x, r, n: mar.allreduce_rmsnorm(x, r, n, axis_name="tp"))
    refused(lambda: g(res, res, nw), "axis_name", "shard_map")


def test_axis_unbound_eager():
    eo, idx, res, nw = _plain_args()
    refused(lambda: mar.moe_finalize_allreduce(eo, idx, res, nw, axis_name="tp"),
            "axis_name", "shard_map")


@pytest.mark.parametrize("axis", ["dp", ("tp", "dp"), "x"])
def test_axis_the_mesh_lacks(mesh, axis):
    refused(lambda: trace_moe(mesh, axis_name=axis), "axis_name", "shard_map")
    refused(lambda: trace_dense(mesh, axis_name=axis), "axis_name", "shard_map")


@pytest.mark.parametrize("axis", [0, None, (), ("tp", 1)])
def test_axis_name_not_a_name(mesh, axis):
    refused(lambda: trace_moe(mesh, axis_name=axis), "axis_name")


# ------------------------------------------------------------------------ M = 0, N = 1

@pytest.mark.parametrize("quant", [None, *ALL_QUANTS], ids=lambda q: q.id if q else "noquant")
@pytest.mark.parametrize("dense", [False, True], ids=["moe", "dense"])
def test_zero_tokens_empty_outputs(rng, dense, quant):
    H = 256
    outputs = ("residual", "norm") if quant is None else ("residual", "norm", "quant")
    case = gen_case(rng, N4, dtype=BF16, M=0, H=H, dense=dense, quant=quant, outputs=outputs,
                    scales="f32", shared=True)
    out = run_case(case, N4)[0]
    assert out["residual"].shape == (0, H) and out["residual"].dtype == BF16
    assert out["norm"].shape == (0, H) and out["norm"].dtype == BF16
    if quant is not None:
        (cs, cd), sc = quant.output_shapes(0, H)
        assert out["quant"].shape == cs and out["quant"].dtype == cd
        if sc is None:
            assert out["scale"] is None
        else:
            assert out["scale"].shape == sc[0] and out["scale"].dtype == sc[1]
        if quant.kind == "nvfp4" and quant.p["layout"] == "swizzled_128x4":
            assert cs == (0, H // 2) and sc[0] == (0, 16)
    check_against_oracle(out, case)


def test_zero_tokens_still_validated(mesh):
    refused(lambda: trace_moe(mesh, idx=S((0, K), jnp.int32), res=S((0, H), jnp.float32)),
            "residual")
    refused(lambda: trace_moe(mesh, idx=S((0, K), jnp.int32), res=S((0, H), jnp.bfloat16),
                              axis_name="dp"), "axis_name")


@pytest.mark.parametrize("quant", [None, Q.fp8_per_token(), Q.nvfp4(600.0)],
                         ids=lambda q: q.id if q else "noquant")
@pytest.mark.parametrize("dense", [False, True], ids=["moe", "dense"])
def test_group_of_one(rng, dense, quant):
    case = gen_case(rng, N1, dtype=BF16, M=5, H=64, dense=dense, quant=quant, scales="f32",
                    shared=True, rsf=2.0,
                    outputs=None if quant is None else ("residual", "norm", "quant"))
    check_against_oracle(run_case(case, N1)[0], case)


def test_group_of_one_plain_call():
    """A group of one through the plain sharded() helper (as users call it)."""
    mesh1 = make_mesh("cpu", N1)
    rng = np.random.default_rng(0)
    case = gen_case(rng, N1, dtype=BF16, M=4, H=32, dense=True)
    f = sharded(lambda x, r, n: mar.allreduce_rmsnorm(x, r, n, axis_name="tp"), mesh1,
                (PS("tp"), PS(), PS()), PS())
    out = f(case.groups[0]["ranks"][0]["x"], case.groups[0]["residual"], case.norm_weight)
    check_against_oracle({"residual": np.asarray(out.residual), "norm": np.asarray(out.norm),
                          "quant": None, "scale": None}, case)


@pytest.mark.parametrize("which", ["residual", "norm_weight"])
def test_rank_varying_residual_not_typed_invariant(mesh, which):
    """SPEC §2: outputs are typed like lax.psum results; §2/§3: the residual (and gamma) are
    the same on every rank. A residual/norm_weight that varies along axis_name makes the
    outputs differ per rank, so they must not be typed invariant: either the op refuses it
    at trace time or check_vma rejects out_specs=P() — never a silent pick of one rank's
    values ("never silently wrong")."""
    specs = {"residual": (PS("tp"), PS("tp"), PS()), "norm_weight": (PS("tp"), PS(), PS("tp"))}
    N = _n(mesh)
    shapes = {"residual": (S((N * M, H), jnp.float32), S((N * M, H), jnp.float32),
                           S((H,), jnp.float32)),
              "norm_weight": (S((N * M, H), jnp.float32), S((M, H), jnp.float32),
                              S((N * H,), jnp.float32))}
    f = jax.jit(jax.shard_map(lambda x, r, g: mar.allreduce_rmsnorm(x, r, g, axis_name="tp"),
                              mesh=mesh, in_specs=specs[which], out_specs=PS()))
    with pytest.raises(BAD):
        f.trace(*shapes[which])
