"""The bench's inputs: quant formats by name, realistic routing, and the device arrays of
one (N, M) case, sharded over the mesh axis "tp"."""

from __future__ import annotations

import numpy as np

QUANTS = ("none", "fp8_static", "fp8_per_token", "fp8_per_group", "nvfp4")
ROUTED_SCALING_FACTOR = 2.5
FP8_STATIC_SCALE = 0.02                  # dequant scale: covers |norm| up to ~9
NVFP4_GLOBAL_SCALE = 448.0 * 6.0 / 8.0  # encode scale for amax ~8

# The op's array operands in the order the programs take them.
IN_SPEC_NAMES = ("expert_out", "permuted_idx", "expert_scales", "shared", "residual",
                 "norm_weight")


def quant_spec(name: str, arrays: bool = True):
    """The package's quant spec for a bench name. Its scale arrays are made where this is
    called (inside the traced program); ``arrays=False`` leaves them None, for shapes only
    (and touches no device)."""
    import jax.numpy as jnp

    import jax_moe_ar as mar

    def scalar(v):
        return jnp.float32(v) if arrays else None

    if name == "none":
        return None
    if name == "fp8_static":
        return mar.Fp8Static(scalar(FP8_STATIC_SCALE))
    if name == "fp8_per_token":
        return mar.Fp8PerToken()
    if name == "fp8_per_group":
        return mar.Fp8PerGroup(128)
    if name == "nvfp4":
        return mar.NvFp4(scalar(NVFP4_GLOBAL_SCALE), layout="swizzled_128x4")
    raise ValueError(f"unknown quant {name!r}; choose from {QUANTS}")


def routing(rng, N, M, K, E):
    """Realistic routing: each token's K distinct experts from random router logits,
    softmax-normalized scales, experts owned by ranks in contiguous blocks of E/N.

    Returns (permuted_idx [N, M, K] int32, scales [M, K] float32, P): rank r's row of
    token m's k-th expert in its expert-sorted (permuted) rows, -1 where another rank
    holds the expert; P = rows per rank (the most any rank holds, at least 1).
    """
    logits = rng.standard_normal((M, E)).astype(np.float32)
    top = np.argsort(-logits, axis=1, kind="stable")[:, :K]
    chosen = np.take_along_axis(logits, top, axis=1)
    w = np.exp(chosen - chosen.max(axis=1, keepdims=True))
    scales = (w / w.sum(axis=1, keepdims=True)).astype(np.float32)
    owner = top // (E // N)
    idx = np.full((N, M, K), -1, np.int32)
    counts = []
    for r in range(N):
        ms, ks = np.nonzero(owner == r)
        order = np.lexsort((ms, top[ms, ks]))  # by expert, then token
        idx[r, ms[order], ks[order]] = np.arange(order.size, dtype=np.int32)
        counts.append(order.size)
    return idx, scales, max(1, max(counts))


def make_inputs(mesh, N, M, H, K, E, T, seed):
    """Device arrays of one (N, M) case, random normal (not zeros), sharded over "tp",
    keyed by IN_SPEC_NAMES, plus ``rows`` (P, the rows per rank)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    rng = np.random.default_rng(seed)
    idx, scales, rows = routing(rng, N, M, K, E)
    tp, rep = NamedSharding(mesh, P("tp")), NamedSharding(mesh, P())

    def gen(key):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        ex = jax.random.normal(k1, (N * rows, H), jnp.float32).astype(T)
        sh = (0.5 * jax.random.normal(k2, (N * M, H), jnp.float32)).astype(T)
        res = jax.random.normal(k3, (M, H), jnp.float32).astype(T)
        nw = (1.0 + 0.1 * jax.random.normal(k4, (H,), jnp.float32)).astype(T)
        return ex, sh, res, nw

    ex, sh, res, nw = jax.jit(gen, out_shardings=(tp, tp, rep, rep))(jax.random.key(seed))
    idx_d = jax.device_put(idx.reshape(N * M, K), tp)
    sc_d = jax.device_put(np.tile(scales, (N, 1)), tp)
    return dict(expert_out=ex, permuted_idx=idx_d, expert_scales=sc_d, shared=sh,
                residual=res, norm_weight=nw, rows=rows)


def in_specs(scatter=False):
    """shard_map in_specs of the IN_SPEC_NAMES operands; with `scatter` the residual is
    token-sharded (each rank's M/N rows), as the reduce-scatter variant takes it."""
    from jax.sharding import PartitionSpec as P
    return (P("tp"), P("tp"), P("tp"), P("tp"), P("tp") if scatter else P(), P())
