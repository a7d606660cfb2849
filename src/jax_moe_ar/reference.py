"""The op in plain JAX with ``lax.psum``: the ``"xla"`` algorithm and the fallback.

This is what a user would write without jax_moe_ar: several XLA ops and an
all-reduce (``lax.psum_scatter`` for the reduce-scatter variants of SPEC §2.1). It
follows SPEC §3's formulas but leaves rounding order to XLA (and psums the wire in T, so
every partial sum of the all-reduce is rounded to T, where the fused op sums in float32
and rounds once), so it agrees with the oracle within tolerance, not bit for bit: in
bfloat16 residual_out may differ from the fused op's by an ulp or more. Its NaN rules for
scales are SPEC §3's. Same signatures and outputs as the public functions; no input checks.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from .quant import (FP4_BLOCK, FP4_MAX, FP8_MAX, Fp8PerGroup, Fp8PerToken, Fp8Static,
                    FusedOutputs, NvFp4, linear_to_swizzled)

_F32 = jnp.float32


def finalize(expert_out, permuted_idx, expert_scales=None, shared_expert_out=None,
             routed_scaling_factor=1.0):
    """This rank's wire [M, H] in T: weighted top-k gather, scaled, plus shared expert."""
    P = expert_out.shape[0]
    if P == 0:
        # No rows to gather from (jnp.take refuses an empty axis): every index is skipped.
        # Zeros typed like the operands (varying where they vary), as the gather would be.
        acc = (jnp.zeros_like(permuted_idx[:, :1], _F32)
               + jnp.sum(expert_out.astype(_F32), axis=0, keepdims=True))  # a sum of no rows
        if expert_scales is not None:
            acc = acc + jnp.zeros_like(expert_scales[:, :1], _F32)
    else:
        valid = (permuted_idx >= 0) & (permuted_idx < P)
        rows = jnp.take(expert_out, jnp.where(valid, permuted_idx, 0), axis=0).astype(_F32)
        if expert_scales is not None:
            rows = rows * expert_scales.astype(_F32)[..., None]
        # where() rather than a multiply by the mask: a skipped row is never used,
        # even when it holds NaN.
        acc = jnp.sum(jnp.where(valid[..., None], rows, 0.0), axis=1)
    acc = acc * jnp.float32(routed_scaling_factor)
    if shared_expert_out is not None:
        acc = acc + shared_expert_out.astype(_F32)
    return acc.astype(expert_out.dtype)


def _sat(x, limit):
    return jnp.clip(x, -limit, limit)


def _e2m1_codes(x):
    """float4_e2m1fn codes (round to nearest even) of saturated float32 values."""
    a = jnp.abs(x)
    mag = ((a > 0.25).astype(jnp.uint8) + (a >= 0.75) + (a > 1.25) + (a >= 1.75)
           + (a > 2.5) + (a >= 3.5) + (a > 5.0)).astype(jnp.uint8)
    return mag | jnp.where(jnp.signbit(x), jnp.uint8(8), jnp.uint8(0))


def _amax(x, axis, keepdims=False):
    """max |x| along `axis`, NaN where a NaN is among the values: XLA's CPU reduction
    drops NaN in vectorized rows (it gave -inf for a NaN row of 256), and SPEC §3 wants
    the NaN kept (a fallback never turns a NaN into a finite scale)."""
    amax = jnp.max(jnp.abs(x), axis=axis, keepdims=keepdims)
    return jnp.where(jnp.any(jnp.isnan(x), axis=axis, keepdims=keepdims), jnp.float32(jnp.nan),
                     amax)


def _fp8_scale(amax):
    return jnp.maximum(amax, jnp.float32(1e-10)) / jnp.float32(FP8_MAX)


def quantize(q, quant):
    """(codes, scale or None) of float32 values q [M, H] under a quant spec."""
    M, H = q.shape
    if isinstance(quant, Fp8Static):
        inv = jnp.float32(1.0) / jnp.asarray(quant.scale, _F32)
        return _sat(q * inv, FP8_MAX).astype(jnp.float8_e4m3fn), None
    if isinstance(quant, Fp8PerToken):
        s = _fp8_scale(_amax(q, axis=1, keepdims=True))
        return _sat(q * (1.0 / s), FP8_MAX).astype(jnp.float8_e4m3fn), s
    if isinstance(quant, Fp8PerGroup):
        g = q.reshape(M, H // quant.group_size, quant.group_size)
        s = _fp8_scale(_amax(g, axis=2))
        if quant.ue8m0:
            s = jnp.exp2(jnp.ceil(jnp.log2(s)))
        codes = _sat(g * (1.0 / s)[..., None], FP8_MAX).astype(jnp.float8_e4m3fn).reshape(M, H)
        return codes, (s if quant.scale_layout == "row" else s.T)
    if isinstance(quant, NvFp4):
        gs = jnp.asarray(quant.global_scale, _F32)
        b = q.reshape(M, H // FP4_BLOCK, FP4_BLOCK)
        vmax = _amax(b, axis=2)
        sf = _sat(gs * (vmax / FP4_MAX), FP8_MAX).astype(jnp.float8_e4m3fn)
        sf32 = sf.astype(_F32)
        os = jnp.where(sf32 == 0, 0.0, gs / jnp.where(sf32 == 0, 1.0, sf32))
        codes = _e2m1_codes(_sat(b * os[..., None], FP4_MAX)).reshape(M, H // 2, 2)
        packed = codes[..., 0] | (codes[..., 1] << 4)
        return packed, (sf if quant.layout == "linear" else linear_to_swizzled(sf))
    raise TypeError(f"unknown quant spec {quant!r}")


def rmsnorm(residual_out, norm_weight, eps=1e-6, norm_weight_offset=0.0):
    """norm_out [M, H] in T of residual_out [M, H] in T (SPEC §3; rounding order left to
    XLA). Also the function whose VJP the fused op's backward pass uses."""
    r = residual_out.astype(_F32)
    inv = 1.0 / jnp.sqrt(jnp.mean(r * r, axis=1, keepdims=True) + jnp.float32(eps))
    gamma = jnp.float32(norm_weight_offset) + norm_weight.astype(_F32)
    return ((r * inv) * gamma).astype(residual_out.dtype)


def _psum_scatter(wire, axis_name):
    """Rank r's block of rows [r*M/N, (r+1)*M/N) of the group's sum (SPEC §2.1)."""
    return lax.psum_scatter(wire, axis_name, scatter_dimension=0, tiled=True)


def _tail(wire, residual, norm_weight, *, axis_name, eps, norm_weight_offset, quant, outputs,
          reduce=lax.psum):
    T = residual.dtype
    y = reduce(wire, axis_name).astype(_F32)
    res = (y + residual.astype(_F32)).astype(T)
    norm = rmsnorm(res, norm_weight, eps, norm_weight_offset)
    codes = scale = None
    if "quant" in outputs:
        codes, scale = quantize(norm.astype(_F32), quant)
    return FusedOutputs(res if "residual" in outputs else None,
                        norm if "norm" in outputs else None, codes, scale)


def _default_outputs(quant, outputs):
    if outputs is None:
        return ("residual", "quant") if quant is not None else ("residual", "norm")
    return tuple(outputs)


def moe_finalize_allreduce(expert_out, permuted_idx, residual, norm_weight, *, axis_name,
                           expert_scales=None, shared_expert_out=None, routed_scaling_factor=1.0,
                           eps=1e-6, norm_weight_offset=0.0, quant=None, outputs=None):
    """Plain-JAX composition of SPEC §2's moe_finalize_allreduce (no input checks)."""
    wire = finalize(expert_out, permuted_idx, expert_scales, shared_expert_out,
                    routed_scaling_factor)
    return _tail(wire, residual, norm_weight, axis_name=axis_name, eps=eps,
                 norm_weight_offset=norm_weight_offset, quant=quant,
                 outputs=_default_outputs(quant, outputs))


def allreduce_rmsnorm(x, residual, norm_weight, *, axis_name, eps=1e-6, norm_weight_offset=0.0,
                      quant=None, outputs=None):
    """Plain-JAX composition of SPEC §2's allreduce_rmsnorm (no input checks)."""
    return _tail(x, residual, norm_weight, axis_name=axis_name, eps=eps,
                 norm_weight_offset=norm_weight_offset, quant=quant,
                 outputs=_default_outputs(quant, outputs))


def moe_finalize_reduce_scatter(expert_out, permuted_idx, residual, norm_weight, *, axis_name,
                                expert_scales=None, shared_expert_out=None,
                                routed_scaling_factor=1.0, eps=1e-6, norm_weight_offset=0.0,
                                quant=None, outputs=None):
    """Plain-JAX composition of SPEC §2.1's moe_finalize_reduce_scatter (no input checks):
    `residual` and every output are this rank's M/N rows."""
    wire = finalize(expert_out, permuted_idx, expert_scales, shared_expert_out,
                    routed_scaling_factor)
    return _tail(wire, residual, norm_weight, axis_name=axis_name, eps=eps,
                 norm_weight_offset=norm_weight_offset, quant=quant,
                 outputs=_default_outputs(quant, outputs), reduce=_psum_scatter)


def reduce_scatter_rmsnorm(x, residual, norm_weight, *, axis_name, eps=1e-6,
                           norm_weight_offset=0.0, quant=None, outputs=None):
    """Plain-JAX composition of SPEC §2.1's reduce_scatter_rmsnorm (no input checks)."""
    return _tail(x, residual, norm_weight, axis_name=axis_name, eps=eps,
                 norm_weight_offset=norm_weight_offset, quant=quant,
                 outputs=_default_outputs(quant, outputs), reduce=_psum_scatter)
