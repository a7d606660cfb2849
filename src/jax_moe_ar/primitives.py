"""The JAX primitive: abstract evaluation and the CPU, CUDA and default lowerings.

One primitive serves the four public functions (all-reduce and, with `scatter`,
the reduce-scatter variants of SPEC §2.1). Its operands are, in order,
``partial`` (expert_out [P,H] or the dense x [M,H]), ``permuted_idx`` (MoE
only), ``residual``, ``norm_weight``, then ``expert_scales`` and
``shared_expert_out`` when present (MoE only), then the quant scale operand
when the quant kind takes one. Its results are residual, norm, quant, scale —
each only when asked for; with `scatter` they hold this rank's M/N rows, as does
the residual operand, while the partial's operands keep all M tokens. The native
handlers decode the same order (csrc/ffi/attrs.h).
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax._src import core as _core  # NamedAxisEffect: the op is a collective like psum
from jax.extend.core import Primitive
from jax.interpreters import mlir

from . import multiprocess, reference, workspace
from . import quant as qm
from ._contract import OP_FLAGS, TARGETS, _native
from .quant import KIND_NAMES, KIND_NONE, FusedOutputs, QuantStatic

TARGET_FUSED = TARGETS["fused"]
TARGET_CPU_FINALIZE = TARGETS["cpu_finalize"]
TARGET_CPU_TAIL = TARGETS["cpu_tail"]


@dataclasses.dataclass(frozen=True)
class OpConfig:
    """Everything static about one call; hashable, so it is the primitive's parameter."""

    dense: bool
    axes: tuple[str, ...]
    outputs: tuple[str, ...]
    quant: QuantStatic | None  # None unless "quant" is among the outputs
    has_scales: bool
    has_shared: bool
    routed_scaling_factor: float  # already rounded to float32
    eps: float
    norm_weight_offset: float
    algorithm: str
    scatter: bool = False  # SPEC §2.1: reduce-scatter, rank r keeps rows [r*M/N, (r+1)*M/N)

    @property
    def flags(self) -> int:
        """The bits of csrc/common/config.h OpFlag that this configuration sets."""
        q = self.quant
        on = dict(has_scales=self.has_scales, has_shared=self.has_shared,
                  out_residual="residual" in self.outputs, out_norm="norm" in self.outputs,
                  dense=self.dense, out_quant=q is not None,
                  ue8m0=q is not None and q.ue8m0, scale_col=q is not None and q.scale_col,
                  fp4_swizzled=q is not None and q.fp4_swizzled, scatter=self.scatter)
        return sum(OP_FLAGS[name] for name, bit in on.items() if bit)

    def attributes(self, workspace_id: int = 0, algorithm_code: int = 0) -> dict:
        """The custom call's attributes, decoded by csrc/ffi/attrs.h OpAttrs."""
        q = self.quant
        return dict(
            quant=np.int32(q.kind if q else KIND_NONE),
            flags=np.int32(self.flags),
            routed_scaling_factor=np.float32(self.routed_scaling_factor),
            eps=np.float32(self.eps),
            norm_weight_offset=np.float32(self.norm_weight_offset),
            group_size=np.int32(q.group_size if q else 0),
            workspace=np.int64(workspace_id),
            algorithm=np.int32(algorithm_code),
        )

    def result_types(self, M: int, H: int, T) -> list[tuple[tuple[int, ...], jnp.dtype]]:
        out = []
        if "residual" in self.outputs:
            out.append(((M, H), T))
        if "norm" in self.outputs:
            out.append(((M, H), T))
        if self.quant is not None:
            codes, scale = self.quant.shapes(M, H)
            out.append(codes)
            if scale is not None:
                out.append(scale)
        return out


def split_operands(cfg: OpConfig, args):
    """Named view of the primitive's operand list."""
    args = list(args)
    named = {"partial": args.pop(0)}
    if not cfg.dense:
        named["permuted_idx"] = args.pop(0)
    named["residual"] = args.pop(0)
    named["norm_weight"] = args.pop(0)
    named["expert_scales"] = args.pop(0) if cfg.has_scales else None
    named["shared_expert_out"] = args.pop(0) if cfg.has_shared else None
    named["quant_scale"] = args.pop(0) if (cfg.quant and cfg.quant.takes_scale_input) else None
    assert not args, "operand list longer than the config describes"
    return named


def _residual_aval(cfg, avals):
    return avals[1 if cfg.dense else 2]


# ---- abstract evaluation ----------------------------------------------------------

def _varying(aval) -> frozenset:
    mat = getattr(aval, "mat", None)
    if mat is not None:
        return frozenset(mat.varying)
    return frozenset(getattr(aval, "vma", ()))


def _with_varying(aval, shape, dtype, varying):
    """An aval like `aval` (same mesh context) with a new shape, dtype and varying axes."""
    sharding = aval.sharding
    if hasattr(sharding, "update") and hasattr(sharding, "spec"):
        sharding = sharding.update(spec=jax.sharding.PartitionSpec(*([None] * len(shape))))
    if hasattr(aval, "mat"):
        return aval.update(shape=shape, dtype=dtype, weak_type=False, sharding=sharding,
                           manual_axis_type=aval.mat.update(varying=varying))
    return aval.update(shape=shape, dtype=dtype, weak_type=False, sharding=sharding,
                       vma=varying)


def _abstract_eval(*avals, cfg: OpConfig):
    res = _residual_aval(cfg, avals)
    M, H = res.shape
    axes = frozenset(cfg.axes)
    # Like psum(partial) + residual: the reduction removes the group's axes from the
    # partial's operands only. SPEC §2 asks for a residual, norm weight and quant scale
    # equal on every rank; one merely typed varying along the group keeps the outputs
    # typed varying, so check_vma never lets out_specs=P() pick one rank's values.
    named = split_operands(cfg, avals)
    replicated = ("residual", "norm_weight", "quant_scale")
    reduced = [a for k, a in named.items() if k not in replicated and a is not None]
    kept = [named[k] for k in replicated if named[k] is not None]
    varying = ((frozenset().union(*(_varying(a) for a in reduced)) - axes)
               | frozenset().union(*(_varying(a) for a in kept)))
    if cfg.scatter:  # like psum_scatter: each rank holds other rows
        varying |= axes
    outs = [_with_varying(res, s, d, varying) for s, d in cfg.result_types(M, H, res.dtype)]
    return outs, {_core.NamedAxisEffect(a) for a in cfg.axes}


fused_p = Primitive("jax_moe_ar_fused")
fused_p.multiple_results = True
fused_p.def_effectful_abstract_eval(_abstract_eval)


def bind(cfg: OpConfig, operands, quant_scale) -> FusedOutputs:
    return unpack(cfg, fused_p.bind(*operand_list(cfg, operands, quant_scale), cfg=cfg))


def operand_list(cfg: OpConfig, operands, quant_scale) -> list:
    """The primitive's operands: `operands` then the quant scale when the kind takes one."""
    args = list(operands)
    if cfg.quant is not None and cfg.quant.takes_scale_input:
        args.append(quant_scale)
    return args


def unpack(cfg: OpConfig, results) -> FusedOutputs:
    """The primitive's results as FusedOutputs (None where not asked for)."""
    results = iter(results)
    res = next(results) if "residual" in cfg.outputs else None
    norm = next(results) if "norm" in cfg.outputs else None
    codes = next(results) if cfg.quant is not None else None
    scale = next(results) if (cfg.quant is not None and cfg.quant.has_scale_output) else None
    return FusedOutputs(res, norm, codes, scale)


# ---- plain-JAX implementation (default lowering and fallback) -----------------------

def _quant_spec_for_reference(q: QuantStatic, quant_scale):
    if q.kind == qm.KIND_FP8_STATIC:
        return qm.Fp8Static(quant_scale)
    if q.kind == qm.KIND_FP8_PER_TOKEN:
        return qm.Fp8PerToken()
    if q.kind == qm.KIND_FP8_PER_GROUP:
        return qm.Fp8PerGroup(q.group_size, q.ue8m0, "col" if q.scale_col else "row")
    return qm.NvFp4(quant_scale, "swizzled_128x4" if q.fp4_swizzled else "linear")


def _xla_impl(*args, cfg: OpConfig):
    a = split_operands(cfg, args)
    quant = None if cfg.quant is None else _quant_spec_for_reference(cfg.quant, a["quant_scale"])
    common = dict(axis_name=cfg.axes, eps=cfg.eps, norm_weight_offset=cfg.norm_weight_offset,
                  quant=quant, outputs=cfg.outputs)
    if cfg.dense:
        dense = (reference.reduce_scatter_rmsnorm if cfg.scatter
                 else reference.allreduce_rmsnorm)
        out = dense(a["partial"], a["residual"], a["norm_weight"], **common)
    else:
        moe = (reference.moe_finalize_reduce_scatter if cfg.scatter
               else reference.moe_finalize_allreduce)
        out = moe(
            a["partial"], a["permuted_idx"], a["residual"], a["norm_weight"],
            expert_scales=a["expert_scales"], shared_expert_out=a["shared_expert_out"],
            routed_scaling_factor=cfg.routed_scaling_factor, **common)
    return [x for x in out if x is not None]


_xla_lowering = mlir.lower_fun(_xla_impl, multiple_results=True)


# ---- CPU: local finalize (FFI) -> all_gather -> rank-ordered tail (FFI) -----------------
# (reduce-scatter: all_to_all instead of all_gather, and the tail runs on this rank's rows)

def _cpu_impl(*args, cfg: OpConfig):
    a = split_operands(cfg, args)
    residual = a["residual"]
    (M, H), T = residual.shape, residual.dtype  # M/N rows with scatter
    attrs = cfg.attributes()
    if cfg.dense:
        wire = a["partial"]
    else:
        extra = [x for x in (a["expert_scales"], a["shared_expert_out"]) if x is not None]
        tokens = a["permuted_idx"].shape[0]
        wire = jax.ffi.ffi_call(TARGET_CPU_FINALIZE, jax.ShapeDtypeStruct((tokens, H), T))(
            a["partial"], a["permuted_idx"], *extra, **attrs)
    if cfg.scatter:
        # [N, M/N, H] -> [N, M/N, H]: entry j is rank j's wire rows of this rank's block,
        # in rank order (the order of lax.axis_index over cfg.axes).
        n = wire.shape[0] // M
        gathered = lax.all_to_all(wire.reshape(n, M, H), cfg.axes, 0, 0)
    else:
        gathered = lax.all_gather(wire, cfg.axes)  # [N, M, H] in rank order
    tail_in = [gathered, residual, a["norm_weight"]]
    if a["quant_scale"] is not None:
        tail_in.append(a["quant_scale"])
    types = [jax.ShapeDtypeStruct(s, d) for s, d in cfg.result_types(M, H, T)]
    return jax.ffi.ffi_call(TARGET_CPU_TAIL, types)(*tail_in, **attrs)


_cpu_lower_fun = mlir.lower_fun(_cpu_impl, multiple_results=True)


def _call_description(ctx, cfg: OpConfig) -> str:
    """What processes sharing a group must all lower alike (workspace.plan, multiprocess)."""
    return repr((cfg, [(tuple(a.shape), str(a.dtype)) for a in ctx.avals_in]))


def _cpu_lowering(ctx, *args, cfg: OpConfig):
    mesh = getattr(ctx.module_context.axis_context, "mesh", None)
    if mesh is not None and hasattr(mesh, "devices"):
        groups = workspace.device_groups(mesh, cfg.axes)
        if multiprocess.spans_processes(groups):
            multiprocess.check_call(mesh, cfg.axes, _call_description(ctx, cfg))
    return _cpu_lower_fun(ctx, *args, cfg=cfg)


# ---- CUDA: one fused custom call per device ----------------------------------------------

_warned: set[str] = set()


# Why a program that contains the fused CUDA call can't be serialized.
EXPORT_REASON = (
    "jax.export of the fused CUDA call: the call is bound to an exchange workspace (peer-mapped "
    "GPU buffers) that belongs to the process that lowers it, so a serialized program could "
    "not run anywhere else")


def _for_export(ctx) -> bool:
    params = getattr(ctx.module_context, "lowering_parameters", None)
    return bool(getattr(params, "for_export", False))


def _cuda_lowering(ctx, *args, cfg: OpConfig):
    res = _residual_aval(cfg, ctx.avals_in)
    H, T = res.shape[1], jnp.dtype(res.dtype)
    # Rows of the partial: every token (M), also for a reduce-scatter, whose residual
    # and results hold only this rank's M/N.
    M = ctx.avals_in[0 if cfg.dense else 1].shape[0]
    if _for_export(ctx):
        if cfg.algorithm != "auto":
            raise ValueError(
                f"jax_moe_ar: algorithm={cfg.algorithm!r} can't be exported: {EXPORT_REASON}. "
                "Export with algorithm='auto' or 'xla' (the exported program then uses plain "
                "XLA ops and lax.psum on CUDA, and is portable).")
        return _fallback(ctx, args, cfg, EXPORT_REASON + "; the exported program uses it instead")
    if cfg.algorithm == "auto" and workspace.auto_prefers_xla(
            _group_size(ctx, cfg), M * H * T.itemsize,
            KIND_NAMES[cfg.quant.kind] if cfg.quant is not None else "none"):
        return _xla_lowering(ctx, *args, cfg=cfg)  # measured faster here: a choice, no warning
    largest = max(int(np.prod(a.shape)) for a in ctx.avals_in)
    plan = workspace.plan(ctx.module_context.axis_context, cfg.axes, M, H, T, cfg.algorithm,
                          largest, _call_description(ctx, cfg))
    if plan.workspace_id is None:
        if cfg.algorithm != "auto":
            raise RuntimeError(
                f"jax_moe_ar: algorithm={cfg.algorithm!r} cannot run here: {plan.reason}. "
                "Use algorithm='auto' to fall back to the plain-JAX path, or 'xla'.")
        return _fallback(ctx, args, cfg, plan.reason)
    return jax.ffi.ffi_lowering(TARGET_FUSED)(
        ctx, *args, **cfg.attributes(plan.workspace_id, plan.algorithm_code))


def _group_size(ctx, cfg: OpConfig) -> int:
    """Ranks of the group along the op's axes (static, from the mesh being lowered)."""
    mesh = getattr(ctx.module_context.axis_context, "mesh", None)
    shape = dict(getattr(mesh, "shape", {}) or {})
    return int(np.prod([shape.get(a, 1) for a in cfg.axes]))


def _fallback(ctx, args, cfg: OpConfig, reason: str):
    """algorithm="auto" where the kernel can't serve: the plain-JAX path, one warning per
    reason."""
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"jax_moe_ar: using the plain-JAX (xla) path: {reason}",
                      RuntimeWarning, stacklevel=3)
    return _xla_lowering(ctx, *args, cfg=cfg)


def _register():
    for platform, targets in _native.registrations().items():
        for name, capsule in targets.items():
            jax.ffi.register_ffi_target(name, capsule, platform=platform)
    mlir.register_lowering(fused_p, _xla_lowering)  # any other platform: plain JAX
    mlir.register_lowering(fused_p, _cpu_lowering, platform="cpu")
    mlir.register_lowering(fused_p, _cuda_lowering, platform="cuda")


_register()
