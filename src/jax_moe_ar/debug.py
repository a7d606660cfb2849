"""``debug=True``: run-time checks of inputs the op accepts but that are probably wrong.

Each check is a few reductions of this rank's operands (and, for what concerns the whole
group, a pmin/pmax over it); the counts reach the host through one
``jax.debug.callback`` per rank, which warns (`DebugWarning`) naming the argument, what
was found, what the op does with it and the fix. Works inside jit + shard_map (and under
vmap and grad); with ``debug=False`` none of this is traced, so it costs nothing.
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .quant import Fp8Static, NvFp4

_I32 = jnp.int32


class DebugWarning(RuntimeWarning):
    """A finding of ``debug=True``: an input the op accepts but that is probably wrong."""


# What each finding means and how to fix it. `{n}` is a count, `{arg}` the argument,
# `{where}` the rank, `{group}` the group size.
_MESSAGES = {
    "nonfinite": "`{arg}` holds {n} NaN/Inf value(s){where}; they propagate into every output "
                 "of the token(s) that use them (a NaN row of expert_out only where an index "
                 "points at it).",
    "bad_index": "`permuted_idx` holds {n} index(es) outside [-1, P){where}, P = {P} rows of "
                 "expert_out: they are skipped like -1. Indices are rows of this rank's "
                 "expert_out, not global expert or row numbers.",
    "unrouted": "{n} token(s) have no index in [0, P) on any of the {group} ranks: their "
                "routed part is 0 (only the shared expert and the residual remain). Is "
                "permuted_idx built from this rank's rows?",
    "same_partial": "`{arg}` is the same on every one of the {group} ranks (and not all zero): "
                    "the op sums it over the ranks, so it counts {group} times. Pass each "
                    "rank's partial (e.g. its slice of a tensor-parallel product), or the "
                    "value on one rank and zeros elsewhere, or divide it by {group}.",
    "zero_scale": "`Fp8Static.scale` is 0: every code saturates to ±448 (and 0 * inf gives "
                  "NaN codes). The scale is the dequant scale: about amax / 448.",
    "bad_scale": "`{arg}` is {value}: it must be a positive finite float32 (every code and "
                 "scale it produces is saturated, zero or NaN).",
}

# Findings that are the same on every rank of the group: reported by rank 0 only.
_GROUP_WIDE = ("unrouted", "same_partial", "zero_scale", "bad_scale")
_REPLICATED = ("residual", "norm_weight")  # operands SPEC §2 wants equal on every rank


def _group_size(axes) -> int:
    return math.prod(lax.axis_size(a) for a in axes)


def _count(mask):
    return jnp.sum(mask.astype(_I32))


def _nonfinite(x):
    return _count(~jnp.isfinite(x.astype(jnp.float32)))


def _bits(x):
    """x's bits as int32 (so NaN payloads and -0.0 compare exactly)."""
    width = {1: jnp.int8, 2: jnp.int16, 4: jnp.int32}[jnp.dtype(x.dtype).itemsize]
    return lax.bitcast_convert_type(x, width).astype(_I32)


def _same_on_every_rank(x, axes):
    """1 when x has the same bits on every rank of the group and is not all zero."""
    b = _bits(x)
    same = jnp.all(lax.pmax(b, axes) == lax.pmin(b, axes))
    return (same & jnp.any(x != 0)).astype(_I32)


def _scale_findings(quant, out):
    if isinstance(quant, Fp8Static):
        s = jnp.asarray(quant.scale, jnp.float32)
        out["zero_scale"] = (s == 0).astype(_I32)
        out["bad_scale:Fp8Static.scale"] = jnp.where(s == 0, jnp.float32(1), s)
    elif isinstance(quant, NvFp4):
        out["bad_scale:NvFp4.global_scale"] = jnp.asarray(quant.global_scale, jnp.float32)


def _common(axes, named, quant):
    out = {f"nonfinite:{k}": _nonfinite(v) for k, v in named.items() if v is not None}
    _scale_findings(quant, out)
    return out


def check_moe(axes, expert_out, permuted_idx, residual, norm_weight, expert_scales,
              shared_expert_out, quant):
    named = dict(expert_out=expert_out, expert_scales=expert_scales,
                 shared_expert_out=shared_expert_out, residual=residual,
                 norm_weight=norm_weight)
    out = _common(axes, named, quant)
    P = expert_out.shape[0]
    valid = (permuted_idx >= 0) & (permuted_idx < P)
    out["bad_index"] = _count(~valid & (permuted_idx != -1))
    nowhere_here = (~jnp.any(valid, axis=1)).astype(_I32)  # [M]
    out["unrouted"] = jnp.sum(lax.pmin(nowhere_here, axes))
    if shared_expert_out is not None and _group_size(axes) > 1:
        out["same_partial:shared_expert_out"] = _same_on_every_rank(shared_expert_out, axes)
    _report(axes, out, P)


def check_dense(axes, x, residual, norm_weight, quant):
    out = _common(axes, dict(x=x, residual=residual, norm_weight=norm_weight), quant)
    if _group_size(axes) > 1:
        out["same_partial:x"] = _same_on_every_rank(x, axes)
    _report(axes, out, None)


def _report(axes, findings, P):
    group = _group_size(axes)
    rank = lax.axis_index(axes)

    def callback(rank, findings):
        rank = int(rank)
        for key, value in findings.items():
            kind, _, arg = key.partition(":")
            if kind == "bad_scale":
                v = float(value)
                if np.isfinite(v) and v > 0:
                    continue
                n = 1
            else:
                v, n = None, int(value)
                if n == 0:
                    continue
            group_wide = kind in _GROUP_WIDE or arg in _REPLICATED
            if group_wide and rank != 0:
                continue
            where = "" if group_wide else f" on rank {rank}"
            text = _MESSAGES[kind].format(n=n, arg=arg, where=where, group=group, P=P, value=v)
            warnings.warn(f"jax_moe_ar debug: {text}", DebugWarning, stacklevel=2)

    jax.debug.callback(callback, rank, findings)
