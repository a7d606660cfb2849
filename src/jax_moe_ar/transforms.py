"""JAX transformations of the fused primitive (SPEC §2.2): reverse-mode autodiff and vmap.

grad / vjp: the forward pass is the fused op; the backward pass is the VJP of SPEC §3's
math as `reference` writes it, taken at the fused op's own residual_out: the norm's VJP
(`reference.rmsnorm`), the all-reduce's transpose (every rank's partial receives the
cotangent of the sum), the finalize's VJP (`reference.finalize`). It runs no collective
of its own: the only ones are those JAX's typing asks for when an operand is replicated
where the outputs vary (the transpose of an implicit broadcast), exactly as it would for
`algorithm="xla"`. Quant outputs carry no gradient; integer operands get none.

vmap: B calls are one call over B*M tokens (every output row depends only on its token's
inputs and on operands shared by all tokens), with each call's indices moved to its own
rows of the batched expert_out. A batched norm weight or quant scale runs as a loop.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.interpreters import batching

from . import quant as qm
from . import reference
from .primitives import OpConfig, _varying, fused_p, operand_list, split_operands, unpack
from .quant import FusedOutputs


def fused(cfg: OpConfig, operands, quant_scale) -> FusedOutputs:
    """Binds the primitive through the custom VJP below (what the public functions call);
    the reduce-scatter variants through one that refuses differentiation."""
    f = _fused_scatter if cfg.scatter else _fused
    return unpack(cfg, f(cfg, *operand_list(cfg, operands, quant_scale)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_scatter(cfg, *args):
    return fused_p.bind(*args, cfg=cfg)


def _scatter_fwd(cfg, *args):
    return fused_p.bind(*args, cfg=cfg), None


def _scatter_bwd(cfg, saved, cts):
    raise NotImplementedError(
        "jax_moe_ar: the fused reduce-scatter variants (SPEC §2.1) have no gradient rule yet; "
        "differentiate through algorithm='xla' (the lax.psum_scatter composition) instead.")


_fused_scatter.defvjp(_scatter_fwd, _scatter_bwd)


def _keys(cfg: OpConfig) -> list[str]:
    """The primitive's operand names in order (split_operands' order)."""
    return (["partial"] + ([] if cfg.dense else ["permuted_idx"])
            + ["residual", "norm_weight", "expert_scales", "shared_expert_out", "quant_scale"])


def _join(cfg: OpConfig, named: dict) -> list:
    """Inverse of split_operands."""
    return [named[k] for k in _keys(cfg) if named.get(k) is not None]


# ---- reverse-mode autodiff ----------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(cfg, *args):
    return fused_p.bind(*args, cfg=cfg)


def _with_residual(cfg: OpConfig) -> OpConfig:
    if "residual" in cfg.outputs:
        return cfg
    return dataclasses.replace(cfg, outputs=("residual",) + cfg.outputs)


def _fwd(cfg, *args):
    # The backward pass linearizes at residual_out: ask for it even when the caller did not.
    fcfg = _with_residual(cfg)
    outs = fused_p.bind(*args, cfg=fcfg)
    asked = outs if fcfg is cfg else outs[1:]
    return list(asked), (args, outs[0])


def _vma(x) -> frozenset:
    return _varying(jax.typeof(x))


def _reduce_to(ct, target: frozenset):
    """Cotangent of an operand typed invariant along axes its cotangent varies along: the
    sum over those axes (the transpose of JAX's implicit broadcast)."""
    extra = tuple(sorted(_vma(ct) - target))
    return lax.psum(ct, extra) if extra else ct


def _psum_transpose(ct, wire_vma: frozenset, axes):
    """Cotangent of each rank's partial from that of their sum over `axes`: the same on
    every rank (typed varying along the axes the partials vary along); a partial that is
    the same on every rank along an axis was summed axis-size times."""
    # The sum is invariant along `axes`; a cotangent varying along them (outputs made
    # varying by a residual that varies there) first sums its copies.
    ct = _reduce_to(ct, _vma(ct) - frozenset(axes))
    copies = [a for a in axes if a not in wire_vma]
    if copies:
        ct = ct * jnp.asarray(math.prod(lax.axis_size(a) for a in copies), ct.dtype)
    vary = tuple(a for a in axes if a in wire_vma)
    if vary:
        ct = lax.pcast(ct, vary, to="varying")
    return ct


def _bwd(cfg, saved, cts):
    args, res_out = saved
    a = split_operands(cfg, args)
    cts = list(cts)
    ct_res = cts.pop(0) if "residual" in cfg.outputs else None
    ct_norm = cts.pop(0) if "norm" in cfg.outputs else None
    # what remains are the quant codes and scales: no gradient flows through them

    total, d_nw = ct_res, None
    if ct_norm is not None:
        _, norm_vjp = jax.vjp(
            lambda r, w: reference.rmsnorm(r, w, cfg.eps, cfg.norm_weight_offset),
            res_out, a["norm_weight"])
        d_r, d_nw = norm_vjp(ct_norm)
        total = d_r if total is None else total + d_r
    if total is None:  # only quant outputs: nothing to differentiate
        total = jnp.zeros_like(res_out)

    d = dict.fromkeys(_keys(cfg))  # None: no cotangent (integers, quant scales)
    d["residual"] = _reduce_to(total, _vma(a["residual"])).astype(a["residual"].dtype)
    d["norm_weight"] = d_nw
    partials = [a[k] for k in ("partial", "permuted_idx", "expert_scales", "shared_expert_out")
                if a.get(k) is not None]
    wire_vma = frozenset().union(*(_vma(x) for x in partials))
    d_wire = _reduce_to(_psum_transpose(total, wire_vma, cfg.axes), wire_vma)
    if cfg.dense:
        d["partial"] = d_wire.astype(a["partial"].dtype)
    else:
        idx = a["permuted_idx"]
        _, fin_vjp = jax.vjp(
            lambda e, s, sh: reference.finalize(e, idx, s, sh, cfg.routed_scaling_factor),
            a["partial"], a["expert_scales"], a["shared_expert_out"])
        d["partial"], d["expert_scales"], d["shared_expert_out"] = fin_vjp(d_wire)
    return tuple(d[k] for k in _keys(cfg) if a.get(k) is not None)


_fused.defvjp(_fwd, _bwd)


# ---- vmap ----------------------------------------------------------------------------------

_NOT_MAPPED = None  # the batch dim JAX gives an operand without one (batching.not_mapped)


def _batch(args, dims, *, cfg: OpConfig):
    B = next(x.shape[d] for x, d in zip(args, dims) if d is not _NOT_MAPPED)
    named, nd = split_operands(cfg, args), split_operands(cfg, dims)
    # A reduce-scatter's rows belong to ranks by position: folding calls would move them.
    if (cfg.scatter or nd["norm_weight"] is not _NOT_MAPPED
            or nd["quant_scale"] is not _NOT_MAPPED):
        return _batch_loop(args, dims, B, cfg)

    def lead(k):  # operand k with the batch axis first (broadcast when not batched)
        x, bd = named[k], nd[k]
        return jnp.moveaxis(x, bd, 0) if bd is not None else jnp.broadcast_to(x, (B,) + x.shape)

    def fold(x):
        return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])

    new = dict(named)
    per_token = ["residual", "expert_scales", "shared_expert_out"]
    per_token.append("partial" if cfg.dense else "permuted_idx")
    for k in per_token:
        if named[k] is not None:
            new[k] = lead(k)
    M, H = new["residual"].shape[1:]
    if not cfg.dense and nd["partial"] is not None:
        # Call b's expert rows become rows b*P .. b*P + P - 1; indices outside [0, P) stay
        # outside every call's rows.
        eo = lead("partial")
        P = eo.shape[1]
        idx = new["permuted_idx"]
        offset = (jnp.arange(B, dtype=jnp.int32) * P)[:, None, None]
        new["permuted_idx"] = jnp.where((idx >= 0) & (idx < P), idx + offset, -1)
        new["partial"] = fold(eo)
    for k in per_token:
        if named[k] is not None:
            new[k] = fold(new[k])

    q = cfg.quant
    bcfg = cfg
    if q is not None and q.kind == qm.KIND_NVFP4 and q.fp4_swizzled:
        # the swizzled layout pads each call's rows to 128: swizzle per call afterwards
        bcfg = dataclasses.replace(cfg, quant=dataclasses.replace(q, fp4_swizzled=False))
    if B * M == 0:  # no tokens (as ops does for M = 0): nothing to exchange
        T = new["residual"].dtype
        outs = [jnp.zeros(shape, dt) for shape, dt in bcfg.result_types(0, H, T)]
    else:
        outs = list(fused_p.bind(*_join(bcfg, new), cfg=bcfg))
    n_rows = len(cfg.outputs)  # residual, norm, codes: [B*M, ...] rows
    result = [o.reshape((B, M) + o.shape[1:]) for o in outs[:n_rows]]
    if q is not None and q.has_scale_output:
        s = outs[n_rows]
        if q.kind == qm.KIND_FP8_PER_GROUP and q.scale_col:  # [G, B*M] -> [B, G, M]
            s = jnp.transpose(s.reshape(s.shape[0], B, M), (1, 0, 2))
        else:
            s = s.reshape((B, M) + s.shape[1:])
            if bcfg is not cfg:
                s = jax.vmap(qm.linear_to_swizzled)(s)
        result.append(s)
    return result, [0] * len(result)


def _batch_loop(args, dims, B, cfg):
    """One call per batch element (a per-call norm weight or quant scale)."""
    mapped = [i for i, d in enumerate(dims) if d is not _NOT_MAPPED]
    xs = [jnp.moveaxis(args[i], dims[i], 0) for i in mapped]

    def one(slices):
        full = list(args)
        for i, x in zip(mapped, slices):
            full[i] = x
        return fused_p.bind(*full, cfg=cfg)

    outs = lax.map(one, xs)
    return list(outs), [0] * len(outs)


batching.primitive_batchers[fused_p] = _batch
