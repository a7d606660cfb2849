"""Errors a newcomer meets name the argument, the rule and the fix (issue 16, item 3), and
Python floats are accepted as quant scales (SPEC §4)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as PS

import jax_moe_ar as mar
from cases import BF16, Q, check_against_oracle, gen_case, run_case, seed_for
from jax_moe_ar.testing import N2, N4, N4_DP2_TP2, make_mesh

S = jax.ShapeDtypeStruct
M, H, K, P = 3, 32, 2, 5


def _raise(fn, exc=(ValueError, TypeError)):
    with pytest.raises(exc) as info:
        fn()
    return info.value


def _dense(mesh_case, axis_name, x=None, res=None, nw=None, **kw):
    mesh = make_mesh("cpu", mesh_case)
    n = mesh_case.size
    x = S((n * M, H), jnp.bfloat16) if x is None else x
    res = S((M, H), jnp.bfloat16) if res is None else res
    nw = S((H,), jnp.float32) if nw is None else nw
    axes = tuple(mesh_case.names)
    f = jax.jit(jax.shard_map(
        lambda x, r, w: mar.allreduce_rmsnorm(x, r, w, axis_name=axis_name, **kw), mesh=mesh,
        in_specs=(PS(axes), PS(), PS()), out_specs=PS(), check_vma=False))
    return lambda: f.trace(x, res, nw)


@pytest.mark.parametrize("axis", ["model", ("tp", "model")])
def test_wrong_axis_name_inside_shard_map_lists_bound_axes(axis):
    e = _raise(_dense(N4_DP2_TP2, axis))
    msg = str(e)
    assert "`axis_name`" in msg and "'model'" in msg, msg
    assert "('dp', 'tp')" in msg, f"bound axes not listed: {msg}"
    assert "call it inside" not in msg and "must be traced inside" not in msg, msg
    # ours alone: no chained NameError from lax.axis_size before it
    assert e.__cause__ is None and not isinstance(e.__context__, NameError), repr(e.__context__)


def test_axis_name_outside_shard_map_says_how_to_call_it():
    x = np.ones((M, H), BF16)
    e = _raise(lambda: jax.jit(lambda x, r, w: mar.allreduce_rmsnorm(
        x, r, w, axis_name="tp"))(x, x, np.ones(H, np.float32)))
    msg = str(e)
    assert "no mesh axis is bound here" in msg and "jax.shard_map" in msg, msg
    assert e.__cause__ is None and not isinstance(e.__context__, NameError)


def test_wrong_hidden_size_of_x_is_blamed_on_x():
    msg = str(_raise(_dense(N4, "tp", x=S((4 * M, H + 16), jnp.bfloat16))))
    assert msg.startswith("jax_moe_ar: `x` has 48 columns but `residual` and `norm_weight` "
                          "have H = 32"), msg


def test_wrong_hidden_size_of_expert_out_is_blamed_on_it():
    mesh = make_mesh("cpu", N4)
    f = jax.jit(jax.shard_map(
        lambda e, i, r, w: mar.moe_finalize_allreduce(e, i, r, w, axis_name="tp"), mesh=mesh,
        in_specs=(PS("tp"), PS("tp"), PS(), PS()), out_specs=PS()))
    msg = str(_raise(lambda: f.trace(S((4 * P, 64), jnp.bfloat16), S((4 * M, K), jnp.int32),
                                     S((M, H), jnp.bfloat16), S((H,), jnp.float32))))
    assert "`expert_out` has 64 columns" in msg, msg


@pytest.mark.parametrize("h", [24, 8])
def test_hidden_size_rule_names_the_argument(h):
    msg = str(_raise(_dense(N4, "tp", x=S((4 * M, h), jnp.bfloat16), res=S((M, h), jnp.bfloat16),
                            nw=S((h,), jnp.float32))))
    assert f"`x` has H = {h} columns" in msg and "positive multiple of 16" in msg, msg


@pytest.mark.parametrize("kind", ["fp8_static", "nvfp4"])
def test_python_float_scale_is_rounded_to_float32(request, kind):
    """A Python float scale gives the bits of the same scale as a float32 array (SPEC §4:
    rounded to float32), on the fused path; Q.spec() passes jnp.float32 itself."""
    value = 0.0123456789 if kind == "fp8_static" else 448.0 * 6 / 5.3
    spec = mar.Fp8Static(value) if kind == "fp8_static" else mar.NvFp4(value)
    stored = spec.scale if kind == "fp8_static" else spec.global_scale
    assert stored.dtype == np.float32 and stored == np.float32(value)
    rng = np.random.default_rng(seed_for(request.node.nodeid))
    q = Q.fp8_static(value) if kind == "fp8_static" else Q.nvfp4(value)
    case = gen_case(rng, N2, dtype=BF16, M=4, H=64, dense=True, quant=q,
                    outputs=("residual", "norm", "quant"))
    mesh = make_mesh("cpu", N2)
    ranks = case.groups[0]["ranks"]
    f = jax.jit(jax.shard_map(
        lambda x, r, w: mar.allreduce_rmsnorm(x, r, w, axis_name="tp", quant=spec,
                                              outputs=("residual", "norm", "quant")),
        mesh=mesh, in_specs=(PS("tp"), PS(), PS()), out_specs=PS()))
    out = f(np.concatenate([d["x"] for d in ranks]), case.groups[0]["residual"],
            case.norm_weight)
    got = {k: (None if v is None else np.asarray(v)) for k, v in out._asdict().items()}
    check_against_oracle(got, case)
    want = run_case(case, N2)[0]
    np.testing.assert_array_equal(got["quant"], want["quant"])


def test_scale_message_says_what_to_pass():
    msg = str(_raise(lambda: mar.NvFp4(jnp.ones((1,), jnp.float32))))
    assert "`NvFp4.global_scale`" in msg and "shape ()" in msg and "Python float" in msg, msg
