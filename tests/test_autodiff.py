"""SPEC §2.2: jax.grad / jax.vjp through the fused op (forward fused, backward the VJP of §3's
math) agree with algorithm="xla" (which JAX differentiates itself); quant outputs carry no
gradient. The `mesh` tests run on 4 CPU devices (the fused CPU path) and, marked `gpu`, on
the GPUs there are (4, 2 or a group of one: the fused kernel either way)."""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import PartitionSpec as PS

import jax_moe_ar as mar
from jax_moe_ar.testing import N1, N2, N4, N4_DP2_TP2, devices, make_mesh


def _fused(mesh):
    """The fused path to test: "auto" on CPU devices; on GPUs a forced fused algorithm,
    since `auto` takes the plain-JAX path for a group of one (workspace's table)."""
    return "oneshot" if mesh.devices.flat[0].platform == "gpu" else "auto"


@pytest.fixture(scope="module", params=["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def mesh(request):
    if request.param == "cpu":
        return make_mesh("cpu", N4)
    n = len(devices("gpu"))
    return make_mesh("gpu", N4 if n >= 4 else N2 if n >= 2 else N1)


def _rel_err(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


# ------------------------------------------------------------- a tiny MoE layer, trained

def init_params(key, n, H, E_local, F):
    ks = jax.random.split(key, 4)
    return dict(
        w_router=jax.random.normal(ks[0], (H, n * E_local), jnp.float32) / np.sqrt(H),
        w_experts=jax.random.normal(ks[1], (n * E_local, H, H), jnp.float32) / np.sqrt(H),
        w_shared=jax.random.normal(ks[2], (H, n * F), jnp.float32) / np.sqrt(H),
        w_shared_out=jax.random.normal(ks[3], (n * F, H), jnp.float32) / np.sqrt(F),
        norm_weight=jnp.ones((H,), jnp.float32),
    )


def layer_loss(params, x, target, *, K, E_local, algorithm, quant):
    """One MoE layer end inside shard_map: router (replicated), this rank's experts, this
    rank's slice of the shared expert, then the op; loss on norm and residual."""
    T = jnp.bfloat16
    M, H = x.shape
    rank = jax.lax.axis_index("tp")
    logits = x.astype(jnp.float32) @ params["w_router"]
    scales, experts = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), K)     # [M, K]
    mine = (experts // E_local) == rank
    local = jnp.where(mine, experts % E_local, 0)
    # row m*K + k of expert_out holds slot (m, k) when this rank owns that expert
    rows = jnp.einsum("mh,mkhd->mkd", x.astype(T), params["w_experts"][local].astype(T))
    expert_out = rows.reshape(M * K, H)
    idx = jnp.where(mine, jnp.arange(M * K, dtype=jnp.int32).reshape(M, K), -1)
    hidden = jax.nn.silu(x.astype(T) @ params["w_shared"].astype(T))
    shared = hidden @ params["w_shared_out"].astype(T)                      # this rank's partial
    out = mar.moe_finalize_allreduce(
        expert_out, idx, x, params["norm_weight"], axis_name="tp", expert_scales=scales,
        shared_expert_out=shared, routed_scaling_factor=2.0, quant=quant,
        outputs=("residual", "norm") + (("quant",) if quant is not None else ()),
        algorithm=algorithm)
    err = out.norm.astype(jnp.float32) - target
    return jnp.mean(err * err) + 1e-2 * jnp.mean(out.residual.astype(jnp.float32) ** 2)


def train(mesh, params, x, target, *, algorithm, quant=None, steps=2, lr=0.5):
    spec = dict(w_router=PS(), w_experts=PS("tp"), w_shared=PS(None, "tp"),
                w_shared_out=PS("tp"), norm_weight=PS())
    loss = functools.partial(layer_loss, K=2, E_local=2, algorithm=algorithm, quant=quant)

    def step(p, x, t):
        value, grads = jax.value_and_grad(loss)(p, x, t)
        return value, jax.tree.map(lambda a, g: a - lr * g, p, grads), grads

    f = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(spec, PS(), PS()),
                              out_specs=(PS(), spec, spec)))
    losses, grads = [], []
    for _ in range(steps):
        value, params, g = f(params, x, target)
        losses.append(float(value))
        grads.append(g)
    return losses, params, grads


def test_two_training_steps_match_xla(mesh):
    """Two SGD steps of a tiny bf16 MoE layer end: the fused op and algorithm="xla" give the
    same losses, gradients and parameters within bf16 tolerance (their forward passes
    differ in the last bits: "xla" psums in bf16)."""
    M, H = 8, 64
    key = jax.random.PRNGKey(0)
    params = init_params(key, mesh.shape["tp"], H, 2, 32)
    x = jax.random.normal(jax.random.PRNGKey(1), (M, H), jnp.float32).astype(jnp.bfloat16)
    target = jax.random.normal(jax.random.PRNGKey(2), (M, H), jnp.float32)
    # the fused op is also asked for FP8 codes, which carry no gradient
    l_f, p_f, g_f = train(mesh, params, x, target, algorithm=_fused(mesh), quant=mar.Fp8PerToken())
    l_x, p_x, g_x = train(mesh, params, x, target, algorithm="xla")
    assert np.allclose(l_f, l_x, rtol=2e-2), (l_f, l_x)
    assert l_f[1] < l_f[0], "the step did not lower the loss"
    for step in range(2):
        for name in params:
            err = _rel_err(g_f[step][name], g_x[step][name])
            assert err < 5e-2, f"step {step} grad of {name}: relative error {err:.3g}"
            assert np.any(np.asarray(g_f[step][name]) != 0), f"no gradient reached {name}"
    for name in params:
        err = _rel_err(p_f[name], p_x[name])
        assert err < 1e-2, f"{name} after two steps: relative error {err:.3g}"


# -------------------------------------------------------------- every argument, float32

def _moe_inputs(rng, n, M=6, H=32, K=3, P=7, T=np.float32, scales_T=np.float32):
    eo = rng.standard_normal((n * P, H)).astype(T)
    idx = rng.integers(-1, P + 1, (n * M, K)).astype(np.int32)
    sc = rng.random((n * M, K)).astype(scales_T)
    sh = rng.standard_normal((n * M, H)).astype(T)
    res = rng.standard_normal((M, H)).astype(T)
    nw = (1 + 0.1 * rng.standard_normal(H)).astype(np.float32)
    return eo, idx, sc, sh, res, nw


def _loss_of(out, H):
    """A loss that weighs every column differently, through whichever outputs exist."""
    w = jnp.linspace(-1.0, 2.0, H)
    total = 0.0
    if out.residual is not None:
        total = total + jnp.sum(out.residual.astype(jnp.float32) ** 2 * w)
    if out.norm is not None:
        total = total + jnp.sum(jnp.sin(out.norm.astype(jnp.float32)) * w)
    if out.quant is not None:
        total = total + jnp.sum(out.quant.astype(jnp.float32))
        total = total + jnp.sum(out.scale.astype(jnp.float32))
    return total


def _moe_grads(mesh, args, *, algorithm, outputs, quant=None, check_vma=True, shared=True):
    H = args[0].shape[1]

    def loss(eo, sc, sh, res, nw, idx):
        out = mar.moe_finalize_allreduce(eo, idx, res, nw, axis_name="tp", expert_scales=sc,
                                         shared_expert_out=sh if shared else None,
                                         routed_scaling_factor=1.5,
                                         quant=quant, outputs=outputs, algorithm=algorithm)
        return _loss_of(out, H)

    tp = PS("tp")
    f = jax.jit(jax.shard_map(jax.grad(loss, argnums=(0, 1, 2, 3, 4)), mesh=mesh,
                              in_specs=(tp, tp, tp, PS(), PS(), tp),
                              out_specs=(tp, tp, tp, PS(), PS()), check_vma=check_vma))
    eo, idx, sc, sh, res, nw = args
    return f(eo, sc, sh, res, nw, idx)


NAMES = ("expert_out", "expert_scales", "shared_expert_out", "residual", "norm_weight")


@pytest.mark.parametrize("outputs", [("residual",), ("norm",), ("residual", "norm")],
                         ids=lambda o: "+".join(o))
def test_vjp_every_argument_matches_xla_float32(mesh, outputs):
    args = _moe_inputs(np.random.default_rng(len(outputs)), mesh.shape["tp"])
    got = _moe_grads(mesh, args, algorithm=_fused(mesh), outputs=outputs)
    want = _moe_grads(mesh, args, algorithm="xla", outputs=outputs)
    for name, g, w in zip(NAMES, got, want):
        assert g.dtype == w.dtype and g.shape == w.shape, name
        if name == "norm_weight" and "norm" not in outputs:
            assert not np.any(np.asarray(g)), "norm_weight gets no gradient from residual"
            continue
        assert _rel_err(g, w) < 1e-5, f"{name}: relative error {_rel_err(g, w):.3g}"


def test_vjp_with_no_expert_rows_matches_xla(mesh):
    """P = 0: the routed part is zero, typed like the operands (the "xla" finalize used to
    make untyped zeros, which the backward pass could not match)."""
    args = _moe_inputs(np.random.default_rng(8), mesh.shape["tp"], P=0)
    got = _moe_grads(mesh, args, algorithm=_fused(mesh), outputs=("residual", "norm"), shared=False)
    want = _moe_grads(mesh, args, algorithm="xla", outputs=("residual", "norm"), shared=False)
    for name, g, w in zip(NAMES, got, want):
        assert g.shape == w.shape, name
        assert _rel_err(g, w) < 1e-5 if np.any(np.asarray(w)) else not np.any(np.asarray(g))


def test_vjp_bf16_scales_in_T_and_unchecked_vma(mesh):
    """bf16 operands with router weights in T, and shard_map(check_vma=False), where JAX's
    own psum transposes differently: the fused op follows algorithm="xla" either way."""
    T = ml_dtypes.bfloat16
    args = _moe_inputs(np.random.default_rng(7), mesh.shape["tp"], T=T, scales_T=T)
    for check_vma in (True, False):
        got = _moe_grads(mesh, args, algorithm=_fused(mesh), outputs=("residual", "norm"),
                         check_vma=check_vma)
        want = _moe_grads(mesh, args, algorithm="xla", outputs=("residual", "norm"),
                          check_vma=check_vma)
        for name, g, w in zip(NAMES, got, want):
            assert g.dtype == w.dtype, name
            assert _rel_err(g, w) < 3e-2, f"check_vma={check_vma} {name}: {_rel_err(g, w):.3g}"


def test_quant_outputs_carry_no_gradient(mesh):
    args = _moe_inputs(np.random.default_rng(3), mesh.shape["tp"])
    only_quant = _moe_grads(mesh, args, algorithm=_fused(mesh), outputs=("quant",),
                            quant=mar.Fp8PerGroup(16))
    for name, g in zip(NAMES, only_quant):
        assert not np.any(np.asarray(g)), f"{name} got a gradient from the quant output"
    with_res = _moe_grads(mesh, args, algorithm=_fused(mesh), outputs=("residual", "quant"),
                          quant=mar.NvFp4(600.0))
    res_only = _moe_grads(mesh, args, algorithm=_fused(mesh), outputs=("residual",))
    # The same cotangent flows either way; the backward pass is XLA's, whose GPU fusions
    # may round differently in the two programs (seen on 1xH200 in the last bits).
    for name, a, b in zip(NAMES, with_res, res_only):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6,
                                   err_msg=name)


def test_vjp_integer_indices_get_float0(mesh):
    eo, idx, sc, sh, res, nw = _moe_inputs(np.random.default_rng(4), mesh.shape["tp"])

    def body(eo, idx, res, nw):
        out, pull = jax.vjp(lambda e, i, r: mar.moe_finalize_allreduce(
            e, i, r, nw, axis_name="tp").residual, eo, idx, res)
        d_eo, d_idx, d_res = pull(jnp.ones_like(out))
        assert d_idx.dtype == jax.dtypes.float0
        return d_eo, d_res

    tp = PS("tp")
    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(tp, tp, PS(), PS()),
                              out_specs=(tp, PS())))
    d_eo, d_res = f(eo, idx, res, nw)
    assert np.all(np.asarray(d_res) == 1.0)  # d(residual_out)/d(residual) = 1


def test_dense_grad_on_dp_tp_mesh_matches_xla():
    """allreduce_rmsnorm on a 2x2 mesh reduced over "tp", with the residual replicated over
    "dp" while x varies over both: the residual's and norm weight's cotangents are summed
    over "dp" (as JAX does for algorithm="xla")."""
    mesh = make_mesh("cpu", N4_DP2_TP2)
    rng = np.random.default_rng(5)
    M, H = 4, 48
    x = rng.standard_normal((4 * M, H)).astype(np.float32)
    res = rng.standard_normal((M, H)).astype(np.float32)
    nw = rng.standard_normal(H).astype(np.float32)

    def grads(algorithm):
        def loss(x, res, nw):
            out = mar.allreduce_rmsnorm(x, res, nw, axis_name="tp", algorithm=algorithm)
            return _loss_of(out, H)
        xs = PS(("dp", "tp"))
        f = jax.jit(jax.shard_map(jax.grad(loss, argnums=(0, 1, 2)), mesh=mesh,
                                  in_specs=(xs, PS(), PS()), out_specs=(xs, PS(), PS())))
        return f(x, res, nw)

    for name, g, w in zip(("x", "residual", "norm_weight"), grads("auto"), grads("xla")):
        assert _rel_err(g, w) < 1e-5, f"{name}: {_rel_err(g, w):.3g}"


def test_cuda_lowering_of_a_gradient_is_one_fused_call_and_no_all_reduce():
    """Lowered for CUDA (lower-only, on this machine): the forward pass is one fused call and
    the backward pass adds no collective (the cotangent of the sum is the same on every rank)."""
    from jax_moe_ar.primitives import TARGET_FUSED
    mesh = make_mesh("cpu", N4)
    args = _moe_inputs(np.random.default_rng(6), 4)

    def loss(eo, sc, sh, res, nw, idx):
        out = mar.moe_finalize_allreduce(eo, idx, res, nw, axis_name="tp", expert_scales=sc,
                                         shared_expert_out=sh, outputs=("norm",))
        return _loss_of(out, 32)

    tp = PS("tp")
    f = jax.jit(jax.shard_map(jax.grad(loss, argnums=(0, 1, 2, 3, 4)), mesh=mesh,
                              in_specs=(tp, tp, tp, PS(), PS(), tp),
                              out_specs=(tp, tp, tp, PS(), PS())))
    eo, idx, sc, sh, res, nw = args
    text = f.trace(eo, sc, sh, res, nw, idx).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count(f"@{TARGET_FUSED}(") == 1
    for collective in ("all_reduce", "all_gather", "reduce_scatter", "collective_permute"):
        assert collective not in text, collective


def test_grad_with_a_residual_varying_along_the_group_matches_xla():
    """A residual that differs per rank (against SPEC §2, but typed honestly: the outputs
    then vary along "tp") still gets the gradients JAX gives algorithm="xla"."""
    mesh = make_mesh("cpu", N4)
    rng = np.random.default_rng(9)
    M, H = 3, 32
    x = rng.standard_normal((4 * M, H)).astype(np.float32)
    res = rng.standard_normal((4 * M, H)).astype(np.float32)
    nw = rng.standard_normal(H).astype(np.float32)

    def grads(algorithm):
        def loss(x, res, nw):
            return _loss_of(mar.allreduce_rmsnorm(x, res, nw, axis_name="tp",
                                                  algorithm=algorithm), H)
        tp = PS("tp")
        f = jax.jit(jax.shard_map(jax.grad(loss, argnums=(0, 1, 2)), mesh=mesh,
                                  in_specs=(tp, tp, PS()), out_specs=(tp, tp, PS())))
        return f(x, res, nw)

    for name, g, w in zip(("x", "residual", "norm_weight"), grads("auto"), grads("xla")):
        assert _rel_err(g, w) < 1e-5, f"{name}: {_rel_err(g, w):.3g}"
