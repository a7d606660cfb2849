"""debug=True flags, inside jit + shard_map, inputs the op accepts but that are probably
wrong (a shared-expert output or dense x equal on every rank, indices out of range, tokens
no rank routes, non-finite values, a zero or non-finite quant scale); clean inputs give no
warning; debug=False adds nothing to the program."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as PS

import jax_moe_ar as mar
from jax_moe_ar.testing import N1, N4, N4_DP2_TP2, make_mesh

M, H, K, P = 4, 32, 2, 5
TP = PS("tp")


def _inputs(n, seed=0):
    rng = np.random.default_rng(seed)
    eo = rng.standard_normal((n * P, H)).astype(np.float32)
    idx = np.tile(np.array([[0, 1], [2, -1], [3, 4], [-1, 0]], np.int32), (n, 1))
    sc = rng.random((n * M, K)).astype(np.float32)
    sh = rng.standard_normal((n * M, H)).astype(np.float32)
    res = rng.standard_normal((M, H)).astype(np.float32)
    nw = np.ones(H, np.float32)
    return dict(eo=eo, idx=idx, sc=sc, sh=sh, res=res, nw=nw)


def _run(mesh_case, a, quant=None, shared_spec=TP, debug=True, scale_operand=None):
    """Runs moe_finalize_allreduce(debug=...) and returns the DebugWarning messages."""
    mesh = make_mesh("cpu", mesh_case)

    def body(eo, idx, sc, sh, res, nw, *s):
        q = quant if not s else mar.Fp8Static(s[0])
        return mar.moe_finalize_allreduce(eo, idx, res, nw, axis_name="tp", expert_scales=sc,
                                          shared_expert_out=sh, quant=q, debug=debug)

    specs = (TP, TP, TP, shared_spec, PS(), PS()) + ((PS(),) if scale_operand is not None else ())
    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=PS()))
    args = [a[k] for k in ("eo", "idx", "sc", "sh", "res", "nw")]
    if scale_operand is not None:
        args.append(np.float32(scale_operand))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jax.block_until_ready(f(*args))
    return [str(w.message) for w in caught if issubclass(w.category, mar.DebugWarning)]


def _one(msgs, *needles):
    hits = [m for m in msgs if all(n in m for n in needles)]
    assert len(hits) == 1, f"want one warning with {needles}, got {msgs}"
    return hits[0]


def test_clean_inputs_give_no_warning():
    assert _run(N4, _inputs(4), quant=mar.Fp8Static(0.05)) == []


def test_replicated_shared_expert_is_flagged():
    a = _inputs(4)
    a["sh"] = a["sh"][:M]  # one [M, H] array passed with PartitionSpec(): the same on all ranks
    msg = _one(_run(N4, a, shared_spec=PS()), "`shared_expert_out` is the same on every one")
    assert "counts 4 times" in msg and "divide it by 4" in msg


def test_equal_but_varying_shared_expert_is_flagged():
    """The same values stacked per rank (typed varying): found by comparing the ranks."""
    a = _inputs(4)
    a["sh"] = np.tile(a["sh"][:M], (4, 1))
    _one(_run(N4, a), "`shared_expert_out` is the same on every one of the 4 ranks")


def test_all_zero_shared_and_group_of_one_are_not_flagged():
    a = _inputs(4)
    a["sh"][:] = 0
    assert _run(N4, a) == []
    assert _run(N1, _inputs(1)) == []


def test_out_of_range_indices_and_unrouted_tokens():
    a = _inputs(4)
    a["idx"][M + 1] = [P, 7]           # rank 1, token 1: out of range, not -1
    a["idx"][0::M] = -1                # token 0: no index on any rank
    msgs = _run(N4, a)
    _one(msgs, "`permuted_idx` holds 2 index(es) outside [-1, P) on rank 1", "P = 5")
    _one(msgs, "1 token(s) have no index in [0, P) on any of the 4 ranks")
    assert len(msgs) == 2, msgs


def test_non_finite_inputs_name_argument_and_rank():
    a = _inputs(4)
    a["eo"][2 * P + 1, 3] = np.nan     # rank 2
    a["sc"][3 * M, 0] = np.inf         # rank 3
    a["res"][1, 1] = -np.inf           # replicated: reported once
    msgs = _run(N4, a)
    _one(msgs, "`expert_out` holds 1 NaN/Inf value(s) on rank 2")
    _one(msgs, "`expert_scales` holds 1 NaN/Inf value(s) on rank 3")
    _one(msgs, "`residual` holds 1 NaN/Inf value(s);")
    assert len(msgs) == 3, msgs


@pytest.mark.parametrize("traced", [False, True], ids=["constant", "traced"])
def test_zero_static_scale_is_flagged(traced):
    a = _inputs(4)
    if traced:
        msgs = _run(N4, a, scale_operand=0.0)
    else:
        msgs = _run(N4, a, quant=mar.Fp8Static(0.0))
    msg = _one(msgs, "`Fp8Static.scale` is 0: every code saturates")
    assert "amax / 448" in msg


@pytest.mark.parametrize("g", [np.inf, -2.0, 0.0])
def test_bad_nvfp4_global_scale_is_flagged(g):
    _one(_run(N4, _inputs(4), quant=mar.NvFp4(g)), "`NvFp4.global_scale` is")


def test_dense_replicated_x_is_flagged_once_per_group():
    mesh = make_mesh("cpu", N4_DP2_TP2)
    x = np.random.default_rng(1).standard_normal((2 * M, H)).astype(np.float32)
    f = jax.jit(jax.shard_map(
        lambda x, r, w: mar.allreduce_rmsnorm(x, r, w, axis_name="tp", debug=True), mesh=mesh,
        in_specs=(PS("dp"), PS("dp"), PS()), out_specs=PS("dp")))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jax.block_until_ready(f(x, x, np.ones(H, np.float32)))
    msgs = [str(w.message) for w in caught if issubclass(w.category, mar.DebugWarning)]
    assert len(msgs) == 2 and all("`x` is the same on every one of the 2 ranks" in m
                                  for m in msgs), msgs


def test_debug_off_adds_nothing_and_on_adds_a_callback():
    mesh = make_mesh("cpu", N4)
    a = _inputs(4)
    args = [a[k] for k in ("eo", "idx", "res", "nw")]

    def text(**kw):
        f = jax.shard_map(lambda e, i, r, w: mar.moe_finalize_allreduce(
            e, i, r, w, axis_name="tp", **kw), mesh=mesh, in_specs=(TP, TP, PS(), PS()),
            out_specs=PS())
        return str(jax.make_jaxpr(f)(*args))

    assert text(debug=False) == text()
    assert "callback" not in text() and "callback" in text(debug=True)


def test_debug_under_vmap_and_grad():
    """The checks trace under vmap and grad too (a finding per batch element)."""
    mesh = make_mesh("cpu", N4)
    a = _inputs(4)
    a["eo"][0, 0] = np.nan

    def loss(eo, idx, res, nw):
        out = mar.moe_finalize_allreduce(eo, idx, res, nw, axis_name="tp", debug=True)
        return jnp.sum(out.norm)

    def body(eo, idx, res, nw):
        return jax.vmap(jax.grad(loss), in_axes=(None, None, 0, None))(eo, idx, res, nw)

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(TP, TP, PS(), PS()),
                              out_specs=PS(None, "tp")))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jax.block_until_ready(f(a["eo"], a["idx"], np.stack([a["res"]] * 2), a["nw"]))
    msgs = [str(w.message) for w in caught if issubclass(w.category, mar.DebugWarning)]
    assert msgs and all("`expert_out` holds 1 NaN/Inf value(s) on rank 0" in m
                        for m in msgs), msgs


@pytest.mark.gpu
def test_debug_on_gpus_flags_a_replicated_shared_expert():
    from jax_moe_ar.testing import N2, devices
    if len(devices("gpu")) < 2:
        pytest.skip("needs 2 GPUs (a group of one has nothing to compare)")
    mesh = make_mesh("gpu", N2)
    a = _inputs(2)
    a["sh"] = a["sh"][:M]

    def body(eo, idx, sc, sh, res, nw):
        return mar.moe_finalize_allreduce(eo, idx, res, nw, axis_name="tp", expert_scales=sc,
                                          shared_expert_out=sh, debug=True)

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(TP, TP, TP, PS(), PS(), PS()),
                              out_specs=PS()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jax.block_until_ready(f(*[a[k] for k in ("eo", "idx", "sc", "sh", "res", "nw")]))
    msgs = [str(w.message) for w in caught if issubclass(w.category, mar.DebugWarning)]
    _one(msgs, "`shared_expert_out` is the same on every one of the 2 ranks")
