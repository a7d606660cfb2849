"""SPEC §2.2: jax.vmap over a leading batch axis of the per-token operands gives, bit for bit,
what a Python loop over the batch gives — every quant format and scale layout, batched and
unbatched operands mixed, a per-call norm weight (run as a loop), vmap inside and outside
shard_map, and grad through vmap. On 4 CPU devices and, marked `gpu`, on the GPUs there are
(4, 2 or a group of one)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as PS

import jax_moe_ar as mar
from cases import assert_same_bits
from jax_moe_ar.testing import N1, N2, N4, devices, make_mesh

B, M, H, K, P = 3, 5, 64, 2, 6
TP = PS("tp")


# The fused path the tests run: "auto" on CPU devices; on GPUs a forced fused algorithm,
# since `auto` takes the plain-JAX path for a group of one (workspace's table).
FUSED = {"algorithm": "auto"}


@pytest.fixture(scope="module", params=["cpu", pytest.param("gpu", marks=pytest.mark.gpu)])
def mesh(request):
    if request.param == "cpu":
        FUSED["algorithm"] = "auto"
        return make_mesh("cpu", N4)
    FUSED["algorithm"] = "oneshot"
    n = len(devices("gpu"))
    return make_mesh("gpu", N4 if n >= 4 else N2 if n >= 2 else N1)


def _inputs(mesh, seed, T=jnp.bfloat16):
    N = mesh.shape["tp"]
    rng = np.random.default_rng(seed)
    return dict(
        expert_out=jnp.asarray(rng.standard_normal((B, N * P, H)), T),
        permuted_idx=jnp.asarray(rng.integers(-2, P + 2, (B, N * M, K)), jnp.int32),
        expert_scales=jnp.asarray(rng.random((B, N * M, K)), jnp.float32),
        shared_expert_out=jnp.asarray(rng.standard_normal((B, N * M, H)), T),
        residual=jnp.asarray(rng.standard_normal((B, M, H)), T),
        norm_weight=jnp.asarray(1 + 0.1 * rng.standard_normal((B, H)), jnp.float32),
    )


def _moe(quant, outputs):
    def one(eo, idx, sc, sh, res, nw):
        return mar.moe_finalize_allreduce(eo, idx, res, nw, axis_name="tp", expert_scales=sc,
                                          shared_expert_out=sh, routed_scaling_factor=1.5,
                                          quant=quant, outputs=outputs,
                                          algorithm=FUSED["algorithm"])
    return one


SPECS = (TP, TP, TP, TP, PS(), PS())
KEYS = ("expert_out", "permuted_idx", "expert_scales", "shared_expert_out", "residual",
        "norm_weight")


def _check_against_loop(mesh, fn, args, batched):
    """vmap(fn) inside shard_map, with operand i batched (axis 0) where batched[i], equals
    fn called per batch element. Returns the vmapped program's jaxpr text."""
    in_axes = tuple(0 if b else None for b in batched)
    specs = tuple(PS(None, *s) if b else s for s, b in zip(SPECS, batched))
    vf = jax.jit(jax.shard_map(jax.vmap(fn, in_axes=in_axes), mesh=mesh, in_specs=specs,
                               out_specs=PS()))
    one = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=SPECS, out_specs=PS()))
    got = vf(*args)
    text = str(jax.make_jaxpr(vf)(*args))
    for b in range(B):
        want = one(*[a[b] if batched[i] else a for i, a in enumerate(args)])
        for name, g, w in zip(mar.FusedOutputs._fields, got, want):
            if w is None:
                assert g is None, name
                continue
            assert_same_bits(np.asarray(g[b]), np.asarray(w), f"batch {b} {name}")
    return text


def _one_call_of_all_tokens(text):
    """The batch ran as one call of the op over B*M tokens, not as a loop."""
    return "jax_moe_ar_fused" in text and f"[{B * M},{H}]" in text and "scan" not in text


QUANTS = [None, mar.Fp8Static(0.02), mar.Fp8PerToken(), mar.Fp8PerGroup(16, ue8m0=True),
          mar.Fp8PerGroup(32, scale_layout="col"), mar.NvFp4(600.0, "linear"),
          mar.NvFp4(600.0)]


QUANT_IDS = ["noquant", "static", "pertoken", "group16_ue8m0", "group32_col", "nvfp4_lin",
             "nvfp4_swz"]


@pytest.mark.parametrize("quant", QUANTS, ids=QUANT_IDS)
def test_vmap_equals_loop_every_quant(mesh, quant):
    x = _inputs(mesh, 1)
    outputs = ("residual", "norm") + (("quant",) if quant is not None else ())
    args = [x[k] if k != "norm_weight" else x[k][0] for k in KEYS]
    text = _check_against_loop(mesh, _moe(quant, outputs), args, (True,) * 5 + (False,))
    assert _one_call_of_all_tokens(text)


@pytest.mark.parametrize("batched", [
    (False, True, True, True, True, False),   # expert rows shared by the batch
    (True, True, False, False, False, False),  # only the expert rows and indices
    (True, False, True, False, True, False),  # indices shared
], ids=["shared_rows", "rows_idx_only", "shared_idx"])
def test_vmap_mixed_batched_operands(mesh, batched):
    x = _inputs(mesh, 2)
    args = [x[k] if batched[i] else x[k][0] for i, k in enumerate(KEYS)]
    text = _check_against_loop(mesh, _moe(mar.Fp8PerToken(), ("residual", "norm", "quant")),
                               args, batched)
    assert _one_call_of_all_tokens(text)


def test_vmap_per_call_norm_weight_and_scale_run_as_loop(mesh):
    x = _inputs(mesh, 3)

    def fn(eo, idx, sc, sh, res, nw):
        g = 2000.0 * jnp.mean(nw * nw)  # a per-call NVFP4 global scale
        return _moe(mar.NvFp4(g), ("residual", "norm", "quant"))(eo, idx, sc, sh, res, nw)

    text = _check_against_loop(mesh, fn, [x[k] for k in KEYS], (True,) * 6)
    assert "scan" in text and not _one_call_of_all_tokens(text)


def test_vmap_dense(mesh):
    x = _inputs(mesh, 4)

    def fn(x, res, nw):
        return mar.allreduce_rmsnorm(x, res, nw, axis_name="tp",
                                     quant=mar.Fp8PerGroup(16, scale_layout="col"),
                                     outputs=("residual", "norm", "quant"),
                                     algorithm=FUSED["algorithm"])

    vf = jax.jit(jax.shard_map(jax.vmap(fn, in_axes=(1, 0, None)), mesh=mesh,
                               in_specs=(TP, PS(), PS()), out_specs=PS()))
    one = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(TP, PS(), PS()), out_specs=PS()))
    xs = jnp.swapaxes(x["shared_expert_out"], 0, 1)  # batch axis 1: [N*M, B, H]
    got = vf(xs, x["residual"], x["norm_weight"][0])
    for b in range(B):
        want = one(xs[:, b], x["residual"][b], x["norm_weight"][0])
        for name, g, w in zip(mar.FusedOutputs._fields, got, want):
            assert_same_bits(np.asarray(g[b]), np.asarray(w), f"batch {b} {name}")


def test_vmap_outside_shard_map_and_grad_through_vmap(mesh):
    """vmap of the jitted shard_map program itself, and grad of a loss summed over a vmapped
    batch equals the sum of per-element grads."""
    x = _inputs(mesh, 5, T=jnp.float32)
    fn = _moe(None, ("residual", "norm"))
    f = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=SPECS, out_specs=PS()))
    nw = x["norm_weight"][0]
    args = [x[k] for k in KEYS[:5]]
    got = jax.vmap(f, in_axes=(0, 0, 0, 0, 0, None))(*args, nw)
    for b in range(B):
        want = f(*[a[b] for a in args], nw)
        assert_same_bits(np.asarray(got.norm[b]), np.asarray(want.norm), f"batch {b} norm")

    def loss(eo, sc, res, idx, sh, nw):
        out = fn(eo, idx, sc, sh, res, nw)
        return jnp.sum(out.norm * jnp.arange(H)) + jnp.sum(out.residual ** 2)

    def batch_loss(eo, sc, res, idx, sh, nw):
        return jnp.sum(jax.vmap(loss, in_axes=(0, 0, 0, 0, 0, None))(eo, sc, res, idx, sh, nw))

    specs_b = (PS(None, "tp"), PS(None, "tp"), PS(), PS(None, "tp"), PS(None, "tp"), PS())
    specs_1 = (TP, TP, PS(), TP, TP, PS())
    gb = jax.jit(jax.shard_map(jax.grad(batch_loss, argnums=(0, 1, 2, 5)), mesh=mesh,
                               in_specs=specs_b, out_specs=specs_b[:3] + (PS(),)))
    g1 = jax.jit(jax.shard_map(jax.grad(loss, argnums=(0, 1, 2, 5)), mesh=mesh,
                               in_specs=specs_1, out_specs=specs_1[:3] + (PS(),)))
    eo, idx, sc, sh, res = args
    got = gb(eo, sc, res, idx, sh, nw)
    per = [g1(eo[b], sc[b], res[b], idx[b], sh[b], nw) for b in range(B)]
    for i, name in enumerate(("expert_out", "expert_scales", "residual")):
        for b in range(B):
            np.testing.assert_allclose(np.asarray(got[i][b]), np.asarray(per[b][i]),
                                       rtol=1e-6, atol=1e-6, err_msg=f"{name} batch {b}")
    np.testing.assert_allclose(np.asarray(got[3]), sum(np.asarray(p[3]) for p in per),
                               rtol=1e-5, atol=1e-5, err_msg="norm_weight")


def test_cuda_lowering_of_vmap_is_one_fused_call_over_all_tokens():
    """Lowered for CUDA (lower-only): a vmapped call is one fused call of B*M rows."""
    from jax_moe_ar.primitives import TARGET_FUSED
    mesh = make_mesh("cpu", N4)
    x = _inputs(mesh, 6)
    fn = _moe(mar.NvFp4(600.0), ("residual", "quant"))
    f = jax.jit(jax.shard_map(jax.vmap(fn, in_axes=(0, 0, 0, 0, 0, None)), mesh=mesh,
                              in_specs=(PS(None, "tp"),) * 4 + (PS(), PS()), out_specs=PS()))
    args = [x[k] for k in KEYS[:5]] + [x["norm_weight"][0]]
    text = f.trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count(f"@{TARGET_FUSED}(") == 1 and f"tensor<{B * M}x{H}xbf16>" in text


def test_vmap_over_an_empty_batch(mesh):
    """B = 0: empty outputs of the right shapes, and no call of the op (nothing to exchange,
    as for M = 0)."""
    x = _inputs(mesh, 7)
    fn = _moe(mar.NvFp4(600.0), ("residual", "norm", "quant"))
    vf = jax.jit(jax.shard_map(jax.vmap(fn, in_axes=(0, 0, 0, 0, 0, None)), mesh=mesh,
                               in_specs=(PS(None, "tp"),) * 4 + (PS(), PS()), out_specs=PS()))
    args = [x[k][:0] for k in KEYS[:5]] + [x["norm_weight"][0]]
    out = vf(*args)
    assert out.residual.shape == (0, M, H) and out.norm.shape == (0, M, H)
    assert out.quant.shape == (0, M, H // 2) and out.scale.shape == (0, 128, 4)
    assert "jax_moe_ar_fused" not in str(jax.make_jaxpr(vf)(*args))
