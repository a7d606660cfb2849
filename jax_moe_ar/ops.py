"""Public functions of SPEC §2: validate (SPEC §4), choose the path, bind the primitive."""

from __future__ import annotations

import numbers
import os

import jax.numpy as jnp
import numpy as np
from jax import lax

from . import primitives, reference
from .quant import (QUANT_TYPES, Fp8PerGroup, FusedOutputs, output_shapes, scale_operand,
                    static_part)

ALGORITHMS = ("auto", "oneshot", "twoshot", "xla")
OUTPUT_NAMES = ("residual", "norm", "quant")
_FLOAT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))

# Set to 1 to route every call through the plain-JAX path (the "xla" algorithm).
FORCE_XLA_ENV = "JAX_MOE_AR_FORCE_XLA"


def _fail(arg, rule, exc=ValueError):
    raise exc(f"jax_moe_ar: `{arg}` {rule}")


def _axes(axis_name):
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    if not names or not all(isinstance(n, str) for n in names):
        _fail("axis_name", f"must be a mesh axis name or a tuple of names, got {axis_name!r}",
              TypeError)
    for n in names:
        try:
            lax.axis_size(n)
        except NameError:
            _fail("axis_name",
                  f"names axis {n!r}, which is not bound here. The op is a collective over the "
                  "group along that mesh axis: call it inside jax.shard_map, e.g. "
                  "jax.shard_map(f, mesh=mesh, in_specs=..., out_specs=P(), axis_names=...) "
                  f"where the mesh has an axis named {n!r}.")
    return names


def _static_float(arg, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        _fail(arg, f"must be a python float (static), got {type(value).__name__}", TypeError)
    return float(np.float32(value))


def _float_dtype(arg, x, allowed=_FLOAT_DTYPES):
    dt = jnp.dtype(x.dtype)
    if dt not in allowed:
        names = "/".join(str(d) for d in allowed)
        _fail(arg, f"must have dtype {names}, got {dt}", TypeError)
    return dt


def _shape(arg, x, shape, what):
    if tuple(x.shape) != tuple(shape):
        _fail(arg, f"must have shape {what} = {tuple(shape)}, got {tuple(x.shape)}")


def _scalar_f32(arg, x):
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        _fail(arg, "must be a float32 scalar array (e.g. jnp.float32(s)), got "
              f"{type(x).__name__}", TypeError)
    if jnp.dtype(x.dtype) != jnp.float32 or tuple(x.shape) != ():
        _fail(arg, f"must be a float32 scalar array of shape (), got {x.dtype}{list(x.shape)}",
              TypeError)


def _outputs(quant, outputs):
    if outputs is None:
        return ("residual", "quant") if quant is not None else ("residual", "norm")
    if isinstance(outputs, str):
        outputs = (outputs,)
    outputs = tuple(outputs)
    for name in outputs:
        if name not in OUTPUT_NAMES:
            _fail("outputs", f"may only name {OUTPUT_NAMES}, got {name!r}")
    if "quant" in outputs and quant is None:
        _fail("outputs", "names 'quant' but no quant= spec was given")
    if not outputs:
        _fail("outputs", "must name at least one of 'residual', 'norm', 'quant'")
    return tuple(n for n in OUTPUT_NAMES if n in outputs)


def _check_quant(quant, H):
    if quant is None:
        return
    if not isinstance(quant, QUANT_TYPES):
        _fail("quant", "must be None, Fp8Static, Fp8PerToken, Fp8PerGroup or NvFp4, got "
              f"{type(quant).__name__}", TypeError)
    if isinstance(quant, Fp8PerGroup) and H % quant.group_size != 0:
        _fail("quant", f"Fp8PerGroup.group_size={quant.group_size} must divide H={H}")
    s = scale_operand(quant)
    if s is not None:
        _scalar_f32("quant." + ("scale" if hasattr(quant, "scale") else "global_scale"), s)


def _common(residual, norm_weight, M, H, T, quant, outputs, algorithm, axis_name, eps,
            norm_weight_offset):
    if algorithm not in ALGORITHMS:
        _fail("algorithm", f"must be one of {ALGORITHMS}, got {algorithm!r}")
    if H % 16 != 0:
        _fail("H", f"(the hidden size, last dim) must be a multiple of 16, got {H}")
    if jnp.dtype(residual.dtype) != T:
        _fail("residual", f"must have the activation dtype {T}, got {residual.dtype}", TypeError)
    _shape("residual", residual, (M, H), "[M, H]")
    _float_dtype("norm_weight", norm_weight, (T, jnp.dtype(jnp.float32)))
    _shape("norm_weight", norm_weight, (H,), "[H]")
    _check_quant(quant, H)
    outs = _outputs(quant, outputs)
    axes = _axes(axis_name)
    return outs, axes, _static_float("eps", eps), _static_float("norm_weight_offset",
                                                                 norm_weight_offset)


def _empty(M, H, T, quant, outs):
    """M = 0: nothing to exchange; outputs of the right (empty) shapes."""
    res = jnp.zeros((M, H), T) if "residual" in outs else None
    norm = jnp.zeros((M, H), T) if "norm" in outs else None
    codes = scale = None
    if "quant" in outs:
        (qs, qd), sc = output_shapes(quant, M, H)
        codes = jnp.zeros(qs, qd)
        scale = jnp.zeros(sc[0], sc[1]) if sc is not None else None
    return FusedOutputs(res, norm, codes, scale)


def _static_quant(quant, outs):
    """The spec's static part when quant codes are asked for; otherwise no quantizer runs."""
    return static_part(quant) if "quant" in outs else None


def _use_xla(algorithm):
    return algorithm == "xla" or os.environ.get(FORCE_XLA_ENV, "0") not in ("", "0")


def moe_finalize_allreduce(expert_out, permuted_idx, residual, norm_weight, *, axis_name,
                           expert_scales=None, shared_expert_out=None, routed_scaling_factor=1.0,
                           eps=1e-6, norm_weight_offset=0.0, quant=None, outputs=None,
                           algorithm="auto") -> FusedOutputs:
    """Finalize this rank's MoE expert rows, all-reduce over ``axis_name``, add the residual,
    RMSNorm and (optionally) quantize — SPEC §2/§3. Call inside ``jax.shard_map``."""
    T = _float_dtype("expert_out", expert_out)
    if expert_out.ndim != 2:
        _fail("expert_out", f"must be 2-D [P, H], got shape {tuple(expert_out.shape)}")
    if permuted_idx.ndim != 2:
        _fail("permuted_idx", f"must be 2-D [M, K], got shape {tuple(permuted_idx.shape)}")
    if jnp.dtype(permuted_idx.dtype) != jnp.int32:
        _fail("permuted_idx", f"must be int32, got {permuted_idx.dtype}", TypeError)
    (M, K), H = permuted_idx.shape, expert_out.shape[1]
    if expert_scales is not None:
        _float_dtype("expert_scales", expert_scales, (jnp.dtype(jnp.float32), T))
        _shape("expert_scales", expert_scales, (M, K), "[M, K]")
    if shared_expert_out is not None:
        if jnp.dtype(shared_expert_out.dtype) != T:
            _fail("shared_expert_out", f"must have the activation dtype {T}, got "
                  f"{shared_expert_out.dtype}", TypeError)
        _shape("shared_expert_out", shared_expert_out, (M, H), "[M, H]")
    rsf = _static_float("routed_scaling_factor", routed_scaling_factor)
    outs, axes, eps, offset = _common(residual, norm_weight, M, H, T, quant, outputs, algorithm,
                                      axis_name, eps, norm_weight_offset)
    if M == 0:
        return _empty(M, H, T, quant, outs)
    if _use_xla(algorithm):
        return reference.moe_finalize_allreduce(
            expert_out, permuted_idx, residual, norm_weight, axis_name=axes,
            expert_scales=expert_scales, shared_expert_out=shared_expert_out,
            routed_scaling_factor=rsf, eps=eps, norm_weight_offset=offset, quant=quant,
            outputs=outs)
    cfg = primitives.OpConfig(
        dense=False, axes=axes, outputs=outs, quant=_static_quant(quant, outs),
        has_scales=expert_scales is not None, has_shared=shared_expert_out is not None,
        routed_scaling_factor=rsf, eps=eps, norm_weight_offset=offset, algorithm=algorithm)
    operands = [expert_out, permuted_idx, residual, norm_weight]
    operands += [a for a in (expert_scales, shared_expert_out) if a is not None]
    return primitives.bind(cfg, operands, scale_operand(quant))


def allreduce_rmsnorm(x, residual, norm_weight, *, axis_name, eps=1e-6, norm_weight_offset=0.0,
                      quant=None, outputs=None, algorithm="auto") -> FusedOutputs:
    """Dense variant: all-reduce this rank's partial ``x`` [M, H] over ``axis_name``, add the
    residual, RMSNorm and (optionally) quantize. Call inside ``jax.shard_map``."""
    T = _float_dtype("x", x)
    if x.ndim != 2:
        _fail("x", f"must be 2-D [M, H], got shape {tuple(x.shape)}")
    M, H = x.shape
    outs, axes, eps, offset = _common(residual, norm_weight, M, H, T, quant, outputs, algorithm,
                                      axis_name, eps, norm_weight_offset)
    if M == 0:
        return _empty(M, H, T, quant, outs)
    if _use_xla(algorithm):
        return reference.allreduce_rmsnorm(x, residual, norm_weight, axis_name=axes, eps=eps,
                                           norm_weight_offset=offset, quant=quant, outputs=outs)
    cfg = primitives.OpConfig(
        dense=True, axes=axes, outputs=outs, quant=_static_quant(quant, outs),
        has_scales=False, has_shared=False, routed_scaling_factor=1.0, eps=eps,
        norm_weight_offset=offset, algorithm=algorithm)
    return primitives.bind(cfg, [x, residual, norm_weight], scale_operand(quant))


# ---- reduce-scatter variants (SPEC §2.1) ------------------------------------------------

def _moe_operands(expert_out, permuted_idx, expert_scales, shared_expert_out):
    """(T, M, H) of the MoE partial's operands, checked per SPEC §4."""
    T = _float_dtype("expert_out", expert_out)
    if expert_out.ndim != 2:
        _fail("expert_out", f"must be 2-D [P, H], got shape {tuple(expert_out.shape)}")
    if permuted_idx.ndim != 2:
        _fail("permuted_idx", f"must be 2-D [M, K], got shape {tuple(permuted_idx.shape)}")
    if jnp.dtype(permuted_idx.dtype) != jnp.int32:
        _fail("permuted_idx", f"must be int32, got {permuted_idx.dtype}", TypeError)
    (M, K), H = permuted_idx.shape, expert_out.shape[1]
    if expert_scales is not None:
        _float_dtype("expert_scales", expert_scales, (jnp.dtype(jnp.float32), T))
        _shape("expert_scales", expert_scales, (M, K), "[M, K]")
    if shared_expert_out is not None:
        if jnp.dtype(shared_expert_out.dtype) != T:
            _fail("shared_expert_out", f"must have the activation dtype {T}, got "
                  f"{shared_expert_out.dtype}", TypeError)
        _shape("shared_expert_out", shared_expert_out, (M, H), "[M, H]")
    return T, M, H


def _scatter_rows(arg, M, H, residual, axis_name):
    """M/N, the rows each rank of the N-rank group owns; refuses M not divisible by N and
    a residual that is not this rank's [M/N, H] block."""
    axes = _axes(axis_name)
    n = 1
    for a in axes:
        n *= lax.axis_size(a)
    if M % n:
        group = "+".join(repr(a) for a in axes)
        _fail(arg, f"holds M={M} tokens, which the group of N={n} ranks along {group} cannot "
              "split evenly: the reduce-scatter variants give rank r the tokens "
              f"[r*M/N, (r+1)*M/N), so M must be a multiple of N={n}")
    _shape("residual", residual, (M // n, H), f"[M/N, H] (this rank's block of the M={M} "
           f"tokens; N={n})")
    return M // n


def _empty_varying(rows, H, T, quant, outs, axes, operands):
    """M = 0: empty outputs, typed varying along the group like psum_scatter results."""
    import jax
    varying = set(axes)
    for x in operands:
        if x is not None:
            varying |= primitives._varying(jax.typeof(x))
    varying = tuple(sorted(varying))

    def cast(x):
        if x is None:
            return None
        return lax.pcast(x, varying, to="varying") if hasattr(lax, "pcast") else \
            lax.pvary(x, varying)
    return FusedOutputs(*(cast(x) for x in _empty(rows, H, T, quant, outs)))


def moe_finalize_reduce_scatter(expert_out, permuted_idx, residual, norm_weight, *, axis_name,
                                expert_scales=None, shared_expert_out=None,
                                routed_scaling_factor=1.0, eps=1e-6, norm_weight_offset=0.0,
                                quant=None, outputs=None, algorithm="auto") -> FusedOutputs:
    """Finalize this rank's MoE expert rows (``permuted_idx`` [M, K] covers all M tokens),
    reduce-scatter over ``axis_name``, add this rank's residual rows, RMSNorm and
    (optionally) quantize — SPEC §2.1. Same keywords as ``moe_finalize_allreduce``; call
    inside ``jax.shard_map``.

    Rank r of the N-rank group along ``axis_name`` gets the tokens [r*M/N, (r+1)*M/N)
    (the ``lax.psum_scatter(..., scatter_dimension=0, tiled=True)`` convention; for a tuple
    of axes, r is ``lax.axis_index(axis_name)``). ``residual`` is this rank's block
    [M/N, H]; every output has M/N rows (NVFP4 swizzled scales: [roundup(M/N, 128),
    roundup(H/16, 4)]) and is typed varying along ``axis_name`` (``out_specs=P(axis)``).
    Each row equals, bit for bit, the matching row of ``moe_finalize_allreduce`` on the
    same inputs. M must be a multiple of N.

    On CUDA the fused kernel runs the reduce-scatter half of two-shot with the tail on this
    rank's rows, whatever fused ``algorithm`` is asked; ``"xla"`` is the
    ``lax.psum_scatter`` composition (within SPEC §3's tolerance, not exact).
    """
    T, M, H = _moe_operands(expert_out, permuted_idx, expert_scales, shared_expert_out)
    rsf = _static_float("routed_scaling_factor", routed_scaling_factor)
    rows = _scatter_rows("permuted_idx", M, H, residual, axis_name)
    outs, axes, eps, offset = _common(residual, norm_weight, rows, H, T, quant, outputs,
                                      algorithm, axis_name, eps, norm_weight_offset)
    if M == 0:
        return _empty_varying(0, H, T, quant, outs, axes,
                              (expert_out, permuted_idx, residual, expert_scales,
                               shared_expert_out))
    if _use_xla(algorithm):
        return reference.moe_finalize_reduce_scatter(
            expert_out, permuted_idx, residual, norm_weight, axis_name=axes,
            expert_scales=expert_scales, shared_expert_out=shared_expert_out,
            routed_scaling_factor=rsf, eps=eps, norm_weight_offset=offset, quant=quant,
            outputs=outs)
    cfg = primitives.OpConfig(
        dense=False, axes=axes, outputs=outs, quant=_static_quant(quant, outs),
        has_scales=expert_scales is not None, has_shared=shared_expert_out is not None,
        routed_scaling_factor=rsf, eps=eps, norm_weight_offset=offset, algorithm=algorithm,
        scatter=True)
    operands = [expert_out, permuted_idx, residual, norm_weight]
    operands += [a for a in (expert_scales, shared_expert_out) if a is not None]
    return primitives.bind(cfg, operands, scale_operand(quant))


def reduce_scatter_rmsnorm(x, residual, norm_weight, *, axis_name, eps=1e-6,
                           norm_weight_offset=0.0, quant=None, outputs=None,
                           algorithm="auto") -> FusedOutputs:
    """Dense variant: reduce-scatter this rank's partial ``x`` [M, H] over ``axis_name``,
    add this rank's residual rows [M/N, H], RMSNorm and (optionally) quantize — SPEC §2.1.
    Same keywords as ``allreduce_rmsnorm``; rows, typing and the CUDA path as in
    ``moe_finalize_reduce_scatter``. Call inside ``jax.shard_map``."""
    T = _float_dtype("x", x)
    if x.ndim != 2:
        _fail("x", f"must be 2-D [M, H], got shape {tuple(x.shape)}")
    M, H = x.shape
    rows = _scatter_rows("x", M, H, residual, axis_name)
    outs, axes, eps, offset = _common(residual, norm_weight, rows, H, T, quant, outputs,
                                      algorithm, axis_name, eps, norm_weight_offset)
    if M == 0:
        return _empty_varying(0, H, T, quant, outs, axes, (x, residual))
    if _use_xla(algorithm):
        return reference.reduce_scatter_rmsnorm(x, residual, norm_weight, axis_name=axes,
                                                eps=eps, norm_weight_offset=offset,
                                                quant=quant, outputs=outs)
    cfg = primitives.OpConfig(
        dense=True, axes=axes, outputs=outs, quant=_static_quant(quant, outs),
        has_scales=False, has_shared=False, routed_scaling_factor=1.0, eps=eps,
        norm_weight_offset=offset, algorithm=algorithm, scatter=True)
    return primitives.bind(cfg, [x, residual, norm_weight], scale_operand(quant))
