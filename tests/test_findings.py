"""What a fuzzer found (issue 16, item 6), one test each: the "xla" path with P = 0 expert
rows, NaN rows on the "xla" path (finite scales, an NVFP4 scale of -448), Fp8Static(None) /
NvFp4(None), H = 0, and the dtype message with T = float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as PS

import jax_moe_ar as mar
import oracle
from cases import (ALL_QUANTS, BF16, F32, Q, check_against_oracle, gen_case, isnan, run_case,
                   seed_for)
from jax_moe_ar.testing import N4, make_mesh

S = jax.ShapeDtypeStruct


def trace(fn, shapes, specs, mesh_case=N4):
    """Traces jit(shard_map(fn)) for global shapes (tracing is where refusals happen)."""
    mesh = make_mesh("cpu", mesh_case)
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=PS())).trace(*shapes)


@pytest.mark.parametrize("dtype", [BF16, F32], ids=["bf16", "f32"])
def test_xla_path_with_no_expert_rows(request, dtype):
    """P = 0: every index is skipped; "xla" used to raise IndexError from jnp.take."""
    rng = np.random.default_rng(seed_for(request.node.nodeid))
    case = gen_case(rng, N4, dtype=dtype, M=5, H=64, K=3, P=0, scales="f32", shared=True,
                    rsf=2.0, quant=Q.fp8_per_token(), outputs=("residual", "norm", "quant"))
    fused = run_case(case, N4)[0]
    ref = check_against_oracle(fused, case)
    xla = run_case(case, N4, algorithm="xla")[0]
    # "xla" psums the shared experts' partials in T: within a few ulps of T
    tol = 8 * float(jnp.finfo(dtype).eps) * np.max(np.abs(ref["residual"].astype(np.float32)))
    err = np.max(np.abs(xla["residual"].astype(np.float32) - ref["residual"].astype(np.float32)))
    assert err <= tol, (err, tol)


@pytest.mark.parametrize("quant", [q for q in ALL_QUANTS if q.kind != "fp8_static"],
                         ids=lambda q: q.id)
@pytest.mark.parametrize("algorithm", ["xla", "auto"])
def test_nan_rows_keep_nan_scales(request, quant, algorithm):
    """SPEC §3: a row or group holding NaN has a NaN scale on every path; XLA's CPU
    reduction used to drop the NaN from a vectorized max (a finite 2.2e-13 scale at
    M = 64, H = 256, and an NVFP4 block scale of -448)."""
    rng = np.random.default_rng(seed_for(request.node.nodeid))
    case = gen_case(rng, N4, dtype=BF16, M=64, H=256, K=2, quant=quant,
                    outputs=("residual", "norm", "quant"))
    res = case.groups[0]["residual"]
    res[3, :] = np.nan            # a whole row
    res[40, 17] = np.nan          # one value: its row's norm is NaN too
    out = run_case(case, N4, algorithm=algorithm)[0]
    if algorithm == "auto":
        check_against_oracle(out, case)
    _, want = oracle.quantize(out["norm"], quant.kind, **quant.oracle_params())
    got_nan, want_nan = isnan(out["scale"]), isnan(want)
    assert want_nan.any()
    assert np.array_equal(got_nan, want_nan), \
        f"NaN scales at {np.argwhere(want_nan != got_nan)[:4].tolist()} differ from SPEC §3"
    sf = np.asarray(out["scale"]).astype(np.float32)
    assert not np.any(sf[~got_nan] < 0), "a negative scale"


@pytest.mark.parametrize("spec,field", [(lambda: mar.Fp8Static(None), "Fp8Static.scale"),
                                        (lambda: mar.NvFp4(None), "NvFp4.global_scale"),
                                        (lambda: mar.NvFp4(None, "linear"), "NvFp4.global_scale")],
                         ids=["fp8_static", "nvfp4", "nvfp4_linear"])
def test_none_scale_refused_by_name(spec, field):
    with pytest.raises(TypeError) as info:
        spec()
    msg = str(info.value)
    assert f"`{field}` is None" in msg and "Python float" in msg, msg


@pytest.mark.parametrize("dense", [False, True], ids=["moe", "dense"])
def test_zero_hidden_size_refused(dense):
    """SPEC §4: H a positive multiple of 16; H = 0 used to pass and fail in the compiler."""
    M, K, P = 3, 2, 5
    if dense:
        fn = lambda x, r, w: mar.allreduce_rmsnorm(x, r, w, axis_name="tp",  # noqa: E731
                                                   quant=mar.Fp8PerToken())
        shapes = (S((4 * M, 0), jnp.bfloat16), S((M, 0), jnp.bfloat16), S((0,), jnp.float32))
        specs, arg = (PS("tp"), PS(), PS()), "x"
    else:
        fn = lambda e, i, r, w: mar.moe_finalize_allreduce(  # noqa: E731
            e, i, r, w, axis_name="tp", quant=mar.Fp8PerToken())
        shapes = (S((4 * P, 0), jnp.bfloat16), S((4 * M, K), jnp.int32),
                  S((M, 0), jnp.bfloat16), S((0,), jnp.float32))
        specs, arg = (PS("tp"), PS("tp"), PS(), PS()), "expert_out"
    with pytest.raises(ValueError) as info:
        trace(fn, shapes, specs)
    msg = str(info.value)
    assert f"`{arg}` has H = 0" in msg and "positive multiple of 16" in msg, msg


@pytest.mark.parametrize("arg", ["norm_weight", "expert_scales"])
def test_float32_dtype_message(arg):
    """With T = float32, "T or float32" is one dtype: the message must not read
    "float32/float32"."""
    M, K, P, H = 3, 2, 5, 32
    nw = S((H,), jnp.float16 if arg == "norm_weight" else jnp.float32)
    sc = S((4 * M, K), jnp.float16 if arg == "expert_scales" else jnp.float32)

    def fn(e, i, r, w, s):
        return mar.moe_finalize_allreduce(e, i, r, w, axis_name="tp", expert_scales=s)

    shapes = (S((4 * P, H), jnp.float32), S((4 * M, K), jnp.int32), S((M, H), jnp.float32), nw,
              sc)
    with pytest.raises(TypeError) as info:
        trace(fn, shapes, (PS("tp"), PS("tp"), PS(), PS(), PS("tp")))
    msg = str(info.value)
    assert "float32/float32" not in msg and f"`{arg}`" in msg, msg
    assert "must have the activation dtype T = float32 (that of `expert_out`), got float16" in msg
