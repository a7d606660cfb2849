"""Public functions of SPEC §2 and §2.1: validate (SPEC §4), choose the path, bind the
primitive.

Over 400 lines because the four public functions live together with the checks they
share, and half the file is their user-facing docstrings (every argument's per-rank shape,
dtype and meaning); the logic per function is short."""

from __future__ import annotations

import numbers
import os

import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src import core as _jax_core  # get_axis_env: the bound axes, for error messages

from . import debug as debug_checks
from . import primitives, reference, transforms
from .quant import (QUANT_TYPES, Fp8PerGroup, FusedOutputs, output_shapes, scale_operand,
                    static_part)

ALGORITHMS = ("auto", "oneshot", "twoshot", "xla")
OUTPUT_NAMES = ("residual", "norm", "quant")
_FLOAT_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))

# Set to 1 to route every call through the plain-JAX path (the "xla" algorithm).
FORCE_XLA_ENV = "JAX_MOE_AR_FORCE_XLA"


def _fail(arg, rule, exc=ValueError):
    raise exc(f"jax_moe_ar: `{arg}` {rule}")


def _bound_axes() -> tuple:
    """Names of the mesh axes bound where the op is traced (empty outside shard_map)."""
    try:
        names = _jax_core.get_axis_env().axis_sizes
    except AttributeError:  # a JAX without this (private) view: list nothing
        return ()
    return tuple(n for n in names if isinstance(n, str))


def _is_bound(name) -> bool:
    try:
        lax.axis_size(name)
    except NameError:
        return False
    return True


def _axes(axis_name):
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    if not names or not all(isinstance(n, str) for n in names):
        _fail("axis_name", f"must be a mesh axis name or a tuple of names, got {axis_name!r}",
              TypeError)
    # Checked outside any `except` block, so the error is ours alone (no chained NameError).
    missing = [n for n in names if not _is_bound(n)]
    if missing:
        bound = _bound_axes()
        if bound:
            _fail("axis_name",
                  f"names {', '.join(map(repr, missing))}, not bound here; the mesh axes bound "
                  f"here (by the enclosing jax.shard_map) are {bound}: pass one of them (or a "
                  "tuple of them), the mesh axis of the group whose partials the op sums.")
        _fail("axis_name",
              f"names {', '.join(map(repr, missing))}, but no mesh axis is bound here: the op is "
              "a collective over the devices along that axis, so it must be traced inside "
              "jax.shard_map, e.g. jax.jit(jax.shard_map(f, mesh=mesh, in_specs=..., "
              f"out_specs=PartitionSpec())) over a mesh with an axis named {missing[0]!r}.")
    return names


def _static_float(arg, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        _fail(arg, f"must be a python float (static), got {type(value).__name__}", TypeError)
    return float(np.float32(value))


def _float_dtype(arg, x):
    """T, the activation dtype, of the operand that sets it."""
    dt = jnp.dtype(x.dtype)
    if dt not in _FLOAT_DTYPES:
        _fail(arg, f"must have dtype bfloat16, float16 or float32 (the activation dtype T), "
              f"got {dt}", TypeError)
    return dt


def _dtype_T(arg, x, T, source, or_f32=False):
    """`x` must have dtype T (that of `source`), or float32 when or_f32."""
    dt = jnp.dtype(x.dtype)
    allowed = {T, jnp.dtype(jnp.float32)} if or_f32 else {T}
    if dt not in allowed:
        rule = f"the activation dtype T = {T} (that of `{source}`)"
        if or_f32 and T != jnp.float32:
            rule += " or float32"
        _fail(arg, f"must have {rule}, got {dt}", TypeError)


def _ndim(arg, x, ndim, what):
    if x.ndim != ndim:
        _fail(arg, f"must be {ndim}-D {what}, got shape {tuple(x.shape)}")


def _shape(arg, x, shape, what):
    if tuple(x.shape) != tuple(shape):
        _fail(arg, f"must have shape {what} = {tuple(shape)}, got {tuple(x.shape)}")


def _hidden_size(partial_name, partial, residual, norm_weight) -> int:
    """H, from the partial's last dim; when `residual` and `norm_weight` agree with each
    other on another H, the partial is the odd one out and is named."""
    H = partial.shape[-1]
    r = residual.shape[-1] if residual.ndim == 2 else None
    w = norm_weight.shape[0] if norm_weight.ndim == 1 else None
    if r is not None and r == w and r != H:
        _fail(partial_name, f"has {H} columns but `residual` and `norm_weight` have H = {r} "
              "(the hidden size, the last dim of each): they must agree")
    if H <= 0 or H % 16:
        _fail(partial_name, f"has H = {H} columns (its last dim, the hidden size); H must be a "
              "positive multiple of 16 (SPEC §4)")
    return H


def _moe_partial(expert_out, permuted_idx, residual, norm_weight, expert_scales,
                 shared_expert_out):
    """(T, M, K, H) of an MoE call's per-rank partial operands, checked (SPEC §4)."""
    T = _float_dtype("expert_out", expert_out)
    _ndim("expert_out", expert_out, 2, "[P, H]")
    _ndim("permuted_idx", permuted_idx, 2, "[M, K]")
    if jnp.dtype(permuted_idx.dtype) != jnp.int32:
        _fail("permuted_idx", f"must be int32, got {permuted_idx.dtype}", TypeError)
    (M, K) = permuted_idx.shape
    H = _hidden_size("expert_out", expert_out, residual, norm_weight)
    if expert_scales is not None:
        _dtype_T("expert_scales", expert_scales, T, "expert_out", or_f32=True)
        _shape("expert_scales", expert_scales, (M, K), "[M, K]")
    if shared_expert_out is not None:
        _dtype_T("shared_expert_out", shared_expert_out, T, "expert_out")
        _shape("shared_expert_out", shared_expert_out, (M, H), "[M, H]")
    return T, M, K, H


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
    """The quant spec fits H (its scale was checked when the spec was made)."""
    if quant is None:
        return
    if not isinstance(quant, QUANT_TYPES):
        _fail("quant", "must be None, Fp8Static, Fp8PerToken, Fp8PerGroup or NvFp4, got "
              f"{type(quant).__name__}", TypeError)
    if isinstance(quant, Fp8PerGroup) and H % quant.group_size != 0:
        _fail("quant", f"Fp8PerGroup.group_size={quant.group_size} must divide H={H}")


def _common(residual, norm_weight, M, H, T, quant, outputs, algorithm, axis_name, eps,
            norm_weight_offset, *, source):
    """Checks shared by every public function; `source` names the operand that set T
    and H (expert_out or x). Returns (outputs, axes, eps, norm_weight_offset)."""
    if algorithm not in ALGORITHMS:
        _fail("algorithm", f"must be one of {ALGORITHMS}, got {algorithm!r}")
    _dtype_T("residual", residual, T, source)
    _shape("residual", residual, (M, H), "[M, H]")
    _dtype_T("norm_weight", norm_weight, T, source, or_f32=True)
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


_SHAPES_NOTE = """
    Shapes are per rank: what the function sees inside ``jax.shard_map``. Outside, a
    per-rank operand is one global array stacking the N ranks' blocks along axis 0
    (``in_specs=PartitionSpec(axis_name)``); ``residual`` and ``norm_weight`` are the same
    on every rank (``PartitionSpec()``). T is the activation dtype (bfloat16, float16 or
    float32). N is the number of ranks in the group.
"""

_STREAM_ARGS = """
      residual: [M, H] T. The residual stream, the same on every rank (pass it
        replicated); added once, after the sum over ranks.
      norm_weight: [H] T or float32. The RMSNorm weight (gamma), the same on every rank.
      axis_name: str or tuple of str (keyword). The mesh axis of the group whose partials
        are summed; a tuple names a group spanning several axes, ranked row-major in the
        order given. It must be bound: call inside ``jax.shard_map`` (under ``jax.jit``)."""

_KEYWORD_ARGS = """
      eps: Python float (static, rounded to float32). RMSNorm epsilon:
        ``norm = residual_out / sqrt(mean(residual_out**2) + eps) * gamma``.
      norm_weight_offset: Python float (static). ``gamma = norm_weight_offset +
        norm_weight``: 0.0 for the standard RMSNorm, 1.0 for Gemma's ``1 + w``.
      quant: ``None`` or a spec: ``Fp8Static(scale)``, ``Fp8PerToken()``,
        ``Fp8PerGroup(group_size=128, ue8m0=False, scale_layout="row")`` or
        ``NvFp4(global_scale, layout="swizzled_128x4")`` — how ``norm`` is quantized for
        the next layer's GEMM (shapes in the README table; formulas SPEC §3).
        ``Fp8Static(0.0)`` saturates every code (``debug=True`` flags it).
      outputs: a str or sequence from ``"residual"``, ``"norm"``, ``"quant"``: which
        outputs to compute. Default ``("residual", "norm")``, or ``("residual",
        "quant")`` when ``quant`` is given.
      algorithm: ``"auto"`` (default): the fused CUDA kernel where it can serve the group
        (Hopper GPUs with peer access), the exact C++ path on CPU, else the plain-JAX
        path with one warning. ``"oneshot"`` / ``"twoshot"`` force a fused algorithm
        (raise where it cannot run). ``"xla"``: plain XLA ops and ``lax.psum`` (the same
        as ``jax_moe_ar.reference``); within tolerance of the fused op but not bit
        for bit: it psums in T and leaves rounding order to XLA.
      debug: bool (static, default False). True adds run-time checks of the inputs that
        warn (``jax_moe_ar.DebugWarning``) about values users get wrong: non-finite
        inputs, a zero or non-finite quant scale, a partial (``shared_expert_out``,
        ``x``) equal on every rank (a replicated operand is summed N times), indices
        outside [-1, P), tokens that no rank routes anywhere. It costs a few
        reductions, collectives and a host callback per call; False adds nothing.

    Returns:
      ``FusedOutputs(residual, norm, quant, scale)``, equal on every rank of the group
      and typed invariant along ``axis_name`` (like ``lax.psum``), so
      ``out_specs=PartitionSpec()`` takes them: ``residual`` [M, H] T (the summed
      partials plus the residual), ``norm`` [M, H] T (its RMSNorm), ``quant`` /
      ``scale`` as the spec says; ``None`` for outputs not asked for. M = 0 gives
      empty outputs.

    Raises:
      TypeError / ValueError at trace time naming the argument, the rule and the fix
      (SPEC §4); RuntimeError for a forced fused algorithm that cannot run.

    Transformations: ``jax.grad`` / ``jax.vjp`` flow through ``residual`` and ``norm``
    into every floating-point operand (the backward pass is the VJP of SPEC §3's math;
    ``quant`` and ``scale`` carry no gradient); ``jax.vmap`` over a leading batch axis
    of the per-token operands gives the same bits as a loop.
"""


def moe_finalize_allreduce(expert_out, permuted_idx, residual, norm_weight, *, axis_name,
                           expert_scales=None, shared_expert_out=None, routed_scaling_factor=1.0,
                           eps=1e-6, norm_weight_offset=0.0, quant=None, outputs=None,
                           algorithm="auto", debug=False) -> FusedOutputs:
    """The end of an MoE layer as one collective: finalize, all-reduce, residual, RMSNorm, quant.

    Each rank finalizes its partial: for token m,
    ``routed_scaling_factor * sum_k expert_scales[m, k] * expert_out[permuted_idx[m, k]]
    + shared_expert_out[m]`` (SPEC §3 gives the rounding). The partials of the N ranks are
    summed, ``residual`` is added (output ``residual``), the sum is RMS-normalized
    (``norm``) and, with ``quant``, quantized (``quant``, ``scale``).
    {shapes}
    Args:
      expert_out: [P, H] T. This rank's expert output rows (e.g. its experts' rows, sorted
        by expert). P, its row count, may be 0; H, the hidden size, is a positive
        multiple of 16.
      permuted_idx: [M, K] int32. The row of ``expert_out`` holding token m's k-th
        expert's output on this rank, or -1 where this rank does not hold that expert.
        Every value outside [0, P) is skipped, never read: a token all of whose indices
        are out of range on every rank gets no routed contribution. M (tokens) may be 0.{stream}
      expert_scales: [M, K] float32 or T, optional. The router weights, slot by slot like
        ``permuted_idx`` (only the slots this rank holds are read); None means all 1.
      shared_expert_out: [M, H] T, optional. This rank's *partial* of the shared expert's
        output (e.g. the output of its slice of a tensor-parallel shared expert); summed
        over ranks, not scaled by ``routed_scaling_factor``. A shared-expert output that
        is replicated (the whole value on every rank) is counted N times: pass it on one
        rank and zeros on the others, or divide it by N. None means 0.
      routed_scaling_factor: Python float (static, rounded to float32). Multiplies the
        routed sum once, after the top-k sum (Kimi K2, DeepSeek V3, GLM).{keywords}"""
    return _moe(expert_out, permuted_idx, residual, norm_weight, axis_name, expert_scales,
                shared_expert_out, routed_scaling_factor, eps, norm_weight_offset, quant,
                outputs, algorithm, debug, scatter=False)


def allreduce_rmsnorm(x, residual, norm_weight, *, axis_name, eps=1e-6, norm_weight_offset=0.0,
                      quant=None, outputs=None, algorithm="auto", debug=False) -> FusedOutputs:
    """The dense layer end as one collective: all-reduce, residual, RMSNorm, quant.

    The partials ``x`` of the N ranks (e.g. each rank's attention output projection of
    its heads) are summed, ``residual`` is added (output ``residual``), the sum is
    RMS-normalized (``norm``) and, with ``quant``, quantized (``quant``, ``scale``).
    {shapes}
    Args:
      x: [M, H] T. This rank's partial sum. H, the hidden size, is a positive multiple of
        16; M (tokens) may be 0. An ``x`` replicated on every rank is counted N
        times.{stream}{keywords}"""
    return _dense(x, residual, norm_weight, axis_name, eps, norm_weight_offset, quant,
                  outputs, algorithm, debug, scatter=False)


# ---- reduce-scatter variants (SPEC §2.1) ------------------------------------------------

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
    ``lax.psum_scatter`` composition (within SPEC §3's tolerance, not exact), and the one
    to differentiate: the fused variants have no gradient rule yet (they raise under
    ``jax.grad``); ``jax.vmap`` runs them as a loop.
    """
    return _moe(expert_out, permuted_idx, residual, norm_weight, axis_name, expert_scales,
                shared_expert_out, routed_scaling_factor, eps, norm_weight_offset, quant,
                outputs, algorithm, False, scatter=True)


def reduce_scatter_rmsnorm(x, residual, norm_weight, *, axis_name, eps=1e-6,
                           norm_weight_offset=0.0, quant=None, outputs=None,
                           algorithm="auto") -> FusedOutputs:
    """Dense variant: reduce-scatter this rank's partial ``x`` [M, H] over ``axis_name``,
    add this rank's residual rows [M/N, H], RMSNorm and (optionally) quantize — SPEC §2.1.
    Same keywords as ``allreduce_rmsnorm``; rows, typing, the CUDA path and the
    transformations as in ``moe_finalize_reduce_scatter``. Call inside ``jax.shard_map``."""
    return _dense(x, residual, norm_weight, axis_name, eps, norm_weight_offset, quant,
                  outputs, algorithm, False, scatter=True)


# ---- the two bodies: the MoE and the dense layer end, all-reduce or reduce-scatter ------

def _moe(expert_out, permuted_idx, residual, norm_weight, axis_name, expert_scales,
         shared_expert_out, routed_scaling_factor, eps, norm_weight_offset, quant, outputs,
         algorithm, debug, *, scatter):
    T, M, K, H = _moe_partial(expert_out, permuted_idx, residual, norm_weight, expert_scales,
                              shared_expert_out)
    rsf = _static_float("routed_scaling_factor", routed_scaling_factor)
    rows = _scatter_rows("permuted_idx", M, H, residual, axis_name) if scatter else M
    outs, axes, eps, offset = _common(residual, norm_weight, rows, H, T, quant, outputs,
                                      algorithm, axis_name, eps, norm_weight_offset,
                                      source="expert_out")
    if debug:
        debug_checks.check_moe(axes, expert_out, permuted_idx, residual, norm_weight,
                               expert_scales, shared_expert_out, quant)
    if M == 0:
        return (_empty_varying(0, H, T, quant, outs, axes,
                               (expert_out, permuted_idx, residual, expert_scales,
                                shared_expert_out))
                if scatter else _empty(M, H, T, quant, outs))
    if _use_xla(algorithm):
        ref = (reference.moe_finalize_reduce_scatter if scatter
               else reference.moe_finalize_allreduce)
        return ref(expert_out, permuted_idx, residual, norm_weight, axis_name=axes,
                   expert_scales=expert_scales, shared_expert_out=shared_expert_out,
                   routed_scaling_factor=rsf, eps=eps, norm_weight_offset=offset, quant=quant,
                   outputs=outs)
    cfg = primitives.OpConfig(
        dense=False, axes=axes, outputs=outs, quant=_static_quant(quant, outs),
        has_scales=expert_scales is not None, has_shared=shared_expert_out is not None,
        routed_scaling_factor=rsf, eps=eps, norm_weight_offset=offset, algorithm=algorithm,
        scatter=scatter)
    operands = [expert_out, permuted_idx, residual, norm_weight]
    operands += [a for a in (expert_scales, shared_expert_out) if a is not None]
    return transforms.fused(cfg, operands, scale_operand(quant))


def _dense(x, residual, norm_weight, axis_name, eps, norm_weight_offset, quant, outputs,
           algorithm, debug, *, scatter):
    T = _float_dtype("x", x)
    _ndim("x", x, 2, "[M, H]")
    M = x.shape[0]
    H = _hidden_size("x", x, residual, norm_weight)
    rows = _scatter_rows("x", M, H, residual, axis_name) if scatter else M
    outs, axes, eps, offset = _common(residual, norm_weight, rows, H, T, quant, outputs,
                                      algorithm, axis_name, eps, norm_weight_offset, source="x")
    if debug:
        debug_checks.check_dense(axes, x, residual, norm_weight, quant)
    if M == 0:
        return (_empty_varying(0, H, T, quant, outs, axes, (x, residual)) if scatter
                else _empty(M, H, T, quant, outs))
    if _use_xla(algorithm):
        ref = reference.reduce_scatter_rmsnorm if scatter else reference.allreduce_rmsnorm
        return ref(x, residual, norm_weight, axis_name=axes, eps=eps, norm_weight_offset=offset,
                   quant=quant, outputs=outs)
    cfg = primitives.OpConfig(
        dense=True, axes=axes, outputs=outs, quant=_static_quant(quant, outs),
        has_scales=False, has_shared=False, routed_scaling_factor=1.0, eps=eps,
        norm_weight_offset=offset, algorithm=algorithm, scatter=scatter)
    return transforms.fused(cfg, [x, residual, norm_weight], scale_operand(quant))


def _fill_doc(fn, **parts):
    if fn.__doc__:  # None under python -OO
        fn.__doc__ = fn.__doc__.format(**parts)


for _fn in (moe_finalize_allreduce, allreduce_rmsnorm):
    _fill_doc(_fn, shapes=_SHAPES_NOTE, stream=_STREAM_ARGS, keywords=_KEYWORD_ARGS)
