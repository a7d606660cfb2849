"""Lower-only tests: programs over a CPU mesh lowered for CUDA on this (GPU-less) machine.

The CUDA lowering is one custom call `jax_moe_ar_fused_v1` per device whose attributes
carry the call's static configuration, and no XLA collective: the fused kernel exchanges
data itself. The "xla" algorithm lowers to an all-reduce; the CPU lowering is
finalize (FFI) -> all_gather -> tail (FFI)."""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as PS

import jax_moe_ar as mar
from cases import Q
from jax_moe_ar.testing import N1, N4, N4_DP2_TP2, N8_TUPLE, make_mesh

S = jax.ShapeDtypeStruct
FUSED = "jax_moe_ar_fused_v1"
CPU_FINALIZE = "jax_moe_ar_cpu_finalize_v1"
CPU_TAIL = "jax_moe_ar_cpu_tail_v1"
COLLECTIVES = ("all_reduce", "all-reduce", "all_gather", "all-gather", "reduce_scatter",
               "reduce-scatter", "all_to_all", "all-to-all", "collective_permute",
               "collective-permute", "collective_broadcast")

# Independent mirror of csrc/common/config.h (QuantKind, OpFlag).
KIND = {None: 0, "fp8_static": 1, "fp8_per_token": 2, "fp8_per_group": 3, "nvfp4": 4}
HAS_SCALES, HAS_SHARED, OUT_RESIDUAL, OUT_NORM, OUT_QUANT = 1, 2, 4, 8, 16
UE8M0, SCALE_COL, FP4_SWIZZLED, DENSE = 32, 64, 128, 256
ATTRS = ("quant", "flags", "routed_scaling_factor", "eps", "norm_weight_offset", "group_size",
         "workspace", "algorithm")
ALGORITHM_CODES = {"oneshot": 0, "twoshot": 1}
LIMITS = {"max_ranks": 16, "max_row_bytes": 96 * 1024, "max_elements": 2 ** 31, "num_buffers": 3}


def test_native_constants_match_this_independent_copy():
    """The package reads every shared number and name from the compiled module
    (csrc/common/config.h); this file's copy is written independently, on purpose, so a
    change on either side shows up here."""
    from jax_moe_ar import _native
    c = _native.constants()
    assert dict(c["quant_kinds"]) == {("none" if k is None else k): v for k, v in KIND.items()}
    assert dict(c["op_flags"]) == dict(
        has_scales=HAS_SCALES, has_shared=HAS_SHARED, out_residual=OUT_RESIDUAL,
        out_norm=OUT_NORM, out_quant=OUT_QUANT, ue8m0=UE8M0, scale_col=SCALE_COL,
        fp4_swizzled=FP4_SWIZZLED, dense=DENSE, scatter=512)
    assert dict(c["algorithms"]) == ALGORITHM_CODES
    assert dict(c["limits"]) == LIMITS
    assert dict(c["targets"]) == dict(fused=FUSED, cpu_finalize=CPU_FINALIZE, cpu_tail=CPU_TAIL,
                                      noop="jax_moe_ar_noop_v1")


def expected_flags(*, dense, scales, shared, outputs, quant):
    f = (HAS_SCALES * bool(scales) | HAS_SHARED * bool(shared) | DENSE * dense
         | OUT_RESIDUAL * ("residual" in outputs) | OUT_NORM * ("norm" in outputs))
    if "quant" in outputs:
        p = quant.p
        f |= OUT_QUANT
        f |= UE8M0 * bool(p.get("ue8m0", False))
        f |= SCALE_COL * (p.get("scale_layout") == "col")
        f |= FP4_SWIZZLED * (p.get("layout") == "swizzled_128x4")
    return f


# ------------------------------------------------------------------------- programs

def _group_axes(mc):
    axes = mc.axis if isinstance(mc.axis, tuple) else (mc.axis,)
    return axes, tuple(n for n in mc.names if n not in axes)


def _spec(names):
    names = tuple(names)
    return PS() if not names else PS(names[0] if len(names) == 1 else names)


def program(mc, *, dense=False, dtype=jnp.bfloat16, M=5, H=64, K=3, P=6, scales=False,
            shared=False, quant: Q | None = None, calls=1, scale_operand=False, **kw):
    """(jit(shard_map(...)) over a CPU mesh, abstract args). `calls` chains that many ops
    (each layer's residual_out feeds the next)."""
    mesh = make_mesh("cpu", mc)
    axes, others = _group_axes(mc)
    dev, grp = _spec(mc.names), _spec(others)
    n, ng = mc.size, mc.size // mc.group
    args, specs = [], []
    if dense:
        args.append(S((n * M, H), dtype))
        specs.append(dev)
    else:
        args += [S((n * P, H), dtype), S((n * M, K), jnp.int32)]
        specs += [dev, dev]
        if scales:
            args.append(S((n * M, K), jnp.float32))
            specs.append(dev)
        if shared:
            args.append(S((n * M, H), dtype))
            specs.append(dev)
    args += [S((ng * M, H), dtype), S((H,), jnp.float32)]
    specs += [grp, PS()]
    if scale_operand:
        args.append(S((), jnp.float32))
        specs.append(PS())

    def body(*a):
        a = list(a)
        sc = a.pop() if scale_operand else None
        spec = None if quant is None else quant.spec(sc)
        nw, res = a.pop(), a.pop()
        outs = []
        for _ in range(calls):
            if dense:
                o = mar.allreduce_rmsnorm(a[0], res, nw, axis_name=mc.axis, quant=spec, **kw)
            else:
                rest = a[2:]
                es = rest.pop(0) if scales else None
                sh = rest.pop(0) if shared else None
                o = mar.moe_finalize_allreduce(a[0], a[1], res, nw, axis_name=mc.axis,
                                               expert_scales=es, shared_expert_out=sh,
                                               quant=spec, **kw)
            outs.append(o)
            if o.residual is not None:
                res = o.residual
        return outs

    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=tuple(specs), out_specs=grp))
    return f, args


def cuda_text(mc, **kw):
    f, args = program(mc, **kw)
    return f.trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def cpu_text(mc, **kw):
    f, args = program(mc, **kw)
    return f.trace(*args).lower().as_text()


def custom_calls(text, target):
    """[(attrs dict, operand types, result types)] of every custom call to `target`."""
    out = []
    for line in text.splitlines():
        if f"stablehlo.custom_call @{target}(" not in line:
            continue
        m = re.search(r"mhlo\.backend_config = \{([^}]*)\}", line)
        assert m, f"no backend_config attributes on: {line}"
        attrs = {}
        for name, val, ty in re.findall(r"(\w+) = ([^,]+?) : (\w+)", m.group(1)):
            attrs[name] = (float(val) if ty.startswith("f") else int(val))
        sig = re.search(r"\}\s*:\s*\((.*)\)\s*->\s*(.*)$", line)
        ops = re.findall(r"tensor<[^>]*>", sig.group(1)) if sig else []
        res = re.findall(r"tensor<[^>]*>", sig.group(2)) if sig else []
        out.append((attrs, ops, res))
    return out


def collectives_in(text):
    return [c for c in COLLECTIVES if c in text]


# ---------------------------------------------------------------------- CUDA lowering

CUDA_CASES = [
    dict(),
    dict(scales=True, shared=True, routed_scaling_factor=2.5),
    dict(dense=True, eps=1e-5, norm_weight_offset=1.0),
    dict(quant=Q.fp8_static(0.02), outputs=("residual", "norm", "quant")),
    dict(quant=Q.fp8_per_token(), scales=True, routed_scaling_factor=0.3),
    dict(quant=Q.fp8_per_group(32, True, "col"), outputs=("norm", "quant")),
    dict(quant=Q.fp8_per_group(64), dtype=jnp.float16, outputs=("quant",)),
    dict(quant=Q.nvfp4(600.0, "linear"), dense=True, dtype=jnp.float32),
    dict(quant=Q.nvfp4(600.0), shared=True, outputs=("residual", "norm", "quant"),
         scale_operand=True),
    dict(quant=Q.nvfp4(600.0), outputs=("residual", "norm")),   # quant not asked for
    dict(algorithm="oneshot", scales=True),
]


def case_id(c):
    return "-".join(f"{k}={v.id if isinstance(v, Q) else v}" for k, v in c.items()) or "plain"


@pytest.mark.parametrize("mc", [N4, N4_DP2_TP2, N8_TUPLE], ids=lambda m: m.id)
@pytest.mark.parametrize("kw", CUDA_CASES, ids=case_id)
def test_cuda_lowering_is_one_fused_call_without_collectives(mc, kw):
    kw = dict(kw)
    text = cuda_text(mc, **kw)
    calls = custom_calls(text, FUSED)
    assert len(calls) == 1, f"expected one {FUSED} call, found {len(calls)}"
    found = collectives_in(text)
    assert not found, f"CUDA lowering holds XLA collectives {found}"
    assert CPU_FINALIZE not in text and CPU_TAIL not in text

    attrs, ops, res = calls[0]
    assert set(ATTRS) <= set(attrs), f"missing attributes {set(ATTRS) - set(attrs)}"
    quant = kw.get("quant")
    dense = kw.get("dense", False)
    outputs = kw.get("outputs", ("residual", "quant") if quant else ("residual", "norm"))
    q_out = quant if "quant" in outputs else None
    assert attrs["quant"] == KIND[q_out.kind if q_out else None]
    assert attrs["flags"] == expected_flags(dense=dense, scales=kw.get("scales"),
                                            shared=kw.get("shared"), outputs=outputs,
                                            quant=quant)
    assert np.float32(attrs["eps"]) == np.float32(kw.get("eps", 1e-6))
    assert np.float32(attrs["routed_scaling_factor"]) == np.float32(
        kw.get("routed_scaling_factor", 1.0))
    assert np.float32(attrs["norm_weight_offset"]) == np.float32(kw.get("norm_weight_offset", 0.0))
    gs = q_out.p["group_size"] if q_out is not None and q_out.kind == "fp8_per_group" else 0
    assert attrs["group_size"] == gs
    assert isinstance(attrs["workspace"], int) and isinstance(attrs["algorithm"], int)

    # operands: per-device shapes, SPEC §2 order, then the quant scale operand
    T = {jnp.bfloat16: "bf16", jnp.float16: "f16",
         jnp.float32: "f32"}[kw.get("dtype", jnp.bfloat16)]
    M, H, K, P = 5, 64, 3, 6
    if dense:
        want_ops = [f"tensor<{M}x{H}x{T}>"]
    else:
        want_ops = [f"tensor<{P}x{H}x{T}>", f"tensor<{M}x{K}xi32>"]
    want_ops += [f"tensor<{M}x{H}x{T}>", f"tensor<{H}xf32>"]
    if not dense and kw.get("scales"):
        want_ops.append(f"tensor<{M}x{K}xf32>")
    if not dense and kw.get("shared"):
        want_ops.append(f"tensor<{M}x{H}x{T}>")
    if q_out is not None and q_out.takes_scale:
        want_ops.append("tensor<f32>")
    assert ops == want_ops
    want_res = [f"tensor<{M}x{H}x{T}>"] * (("residual" in outputs) + ("norm" in outputs))
    if q_out is not None:
        (cs, cd), sc = q_out.output_shapes(M, H)
        name = {np.dtype(np.uint8): "ui8"}.get(np.dtype(cd), "f8E4M3FN")
        want_res.append(f"tensor<{'x'.join(map(str, cs))}x{name}>")
        if sc is not None:
            sname = "f32" if np.dtype(sc[1]) == np.float32 else "f8E4M3FN"
            want_res.append(f"tensor<{'x'.join(map(str, sc[0]))}x{sname}>")
    assert res == want_res


def test_cuda_lowering_chained_layers():
    """Two layers: two fused calls, still no collective."""
    text = cuda_text(N4, calls=2, scales=True, quant=Q.fp8_per_token(),
                     outputs=("residual", "quant"))
    assert len(custom_calls(text, FUSED)) == 2
    assert not collectives_in(text)


def test_cuda_lowering_group_of_one():
    """A forced fused algorithm is the kernel (no collective); `auto` takes the plain-JAX
    path for a group of one where XLA's own fusions measured faster (few rows), the kernel
    from the measured crossover up (workspace.py)."""
    text = cuda_text(N1, algorithm="oneshot")
    assert len(custom_calls(text, FUSED)) == 1 and not collectives_in(text)
    assert FUSED not in cuda_text(N1)
    assert FUSED not in cuda_text(N1, M=128, H=7168)
    text = cuda_text(N1, M=192, H=7168)
    assert len(custom_calls(text, FUSED)) == 1 and not collectives_in(text)


def test_auto_follows_the_measured_table():
    """`auto` is never the fused kernel where the committed measurements show it slower
    than "xla" (SPEC §5; the tables and their sources: workspace.AUTO_XLA_BELOW_BYTES and
    AUTO_XLA_FROM_BYTES)."""
    from jax_moe_ar import workspace
    H, b = 7168, 2
    xla = workspace.auto_prefers_xla
    formats = ("none", "fp8_static", "fp8_per_token", "fp8_per_group", "nvfp4")
    quantized = formats[1:]
    # A group of one (v13-v14): "xla" below the format's crossing at H = 7168 bf16.
    for q, first_fused in (("none", 174), ("fp8_static", 220), ("fp8_per_token", 165),
                           ("fp8_per_group", 0), ("nvfp4", 10)):
        assert all(xla(1, M * H * b, q) for M in (0, 1, 32, first_fused - 1) if M < first_fused)
        assert not any(xla(1, M * H * b, q) for M in (first_fused, 256, 2048, 8192))
    assert not any(xla(2, M * H * b, q) for M in (1, 2048, 8192) for q in formats)
    for n in (3, 4, 8):
        assert not any(xla(n, 512 * H * b, q) for q in formats)
        assert all(xla(n, 2048 * H * b, q) for q in formats)
        assert not xla(n, 1024 * H * b, "none") and all(xla(n, 1024 * H * b, q) for q in quantized)
    # In a lowered program: the fused call where the table says so, plain JAX elsewhere.
    assert FUSED not in cuda_text(N1, M=192, H=H, quant=Q.fp8_static(0.5))
    assert FUSED in cuda_text(N1, M=192, H=H, quant=Q.fp8_per_group())
    assert FUSED in cuda_text(N1, M=32, H=H, quant=Q.nvfp4(1.0))
    assert FUSED in cuda_text(N4, M=512, H=H)
    assert FUSED not in cuda_text(N4, M=2048, H=H)
    assert FUSED not in cuda_text(N4, M=1024, H=H, quant=Q.fp8_per_token())
    assert FUSED in cuda_text(N4_DP2_TP2, M=2048, H=H)


def test_cuda_lowering_oneshot():
    text = cuda_text(N4, algorithm="oneshot", M=256, H=1024)
    calls = custom_calls(text, FUSED)
    assert len(calls) == 1 and not collectives_in(text)


def test_cuda_lowering_twoshot():
    """SPEC §2 lists algorithm="twoshot" (§5: two-shot for large messages); forcing it
    lowers to the fused call with an `algorithm` attribute other than one-shot's."""
    text = cuda_text(N4, algorithm="twoshot", M=256, H=1024)
    calls = custom_calls(text, FUSED)
    assert len(calls) == 1 and not collectives_in(text)
    one = custom_calls(cuda_text(N4, algorithm="oneshot", M=256, H=1024), FUSED)[0][0]
    assert calls[0][0]["algorithm"] != one["algorithm"]


def test_cuda_lowering_auto_picks_by_static_shape():
    """SPEC §5: `auto` takes one-shot for small messages and two-shot for large ones,
    from static shapes only (and "xla" where the table says, test below)."""
    def algo(mc, **kw):
        return custom_calls(cuda_text(mc, **kw), FUSED)[0][0]["algorithm"]

    one = algo(N4, algorithm="oneshot", M=8, H=1024)
    two = algo(N4, algorithm="twoshot", M=8, H=1024)
    assert one != two
    assert algo(N4, M=1, H=7168) == one
    assert algo(N4, M=32, H=7168) == one
    assert algo(N4, M=1024, H=7168) == two  # below the sizes where "xla" takes over
    assert algo(N4, dense=True, M=1024, H=7168) == two
    # Two ranks: one-shot at every M (same bytes, one exchange), quantized or not.
    assert algo(N4_DP2_TP2, M=8192, H=7168) == one
    assert algo(N4_DP2_TP2, M=8192, H=7168, quant=Q.fp8_per_token()) == one
    assert algo(N1, M=8192, H=7168, algorithm="oneshot") == one


def test_operands_of_2_31_elements_are_not_served(monkeypatch):
    """The kernels index with 32-bit math: a call with an operand of 2^31 elements or
    more gets the plain-JAX path, with the reason (checked where the GPU plan is made)."""
    from jax_moe_ar import workspace

    class Dev:
        process_index = 0
        compute_capability = "9.0"

    monkeypatch.setattr(workspace._native, "with_cuda", True, raising=False)
    groups = [[Dev(), Dev()]]
    assert workspace._unservable_reason(groups, 7168, 2, (1 << 31) - 1) is None
    reason = workspace._unservable_reason(groups, 7168, 2, 1 << 31)
    assert reason is not None and "2147483648 elements" in reason


@pytest.mark.parametrize("kw", [dict(), dict(dense=True, quant=Q.nvfp4(600.0))],
                         ids=["moe", "dense"])
def test_xla_algorithm_lowers_to_all_reduce(kw):
    text = cuda_text(N4, algorithm="xla", **kw)
    assert "all_reduce" in text or "all-reduce" in text
    assert FUSED not in text


def test_zero_tokens_lower_to_nothing():
    text = cuda_text(N4, M=0, quant=Q.fp8_per_token())
    assert FUSED not in text and not collectives_in(text)


def test_cuda_export_single_and_multi_platform():
    """jax.export for ("cuda",) and ("cpu", "cuda"): the fused CUDA call is bound to a
    process's exchange workspace, so an exported program uses the plain-JAX path on CUDA
    (with one warning); the CPU handlers are exported (their custom targets have no
    compatibility guarantee, so their check is disabled explicitly)."""
    from jax import export
    f, args = program(N4, scales=True, quant=Q.nvfp4(600.0))
    dc = [export.DisabledSafetyCheck.custom_call(t) for t in (CPU_FINALIZE, CPU_TAIL)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # tests/test_export.py checks it
        ex = export.export(f, platforms=["cuda"])(*args)
    text = ex.mlir_module()
    assert FUSED not in text and "all_reduce" in text
    ex2 = export.export(f, platforms=["cpu", "cuda"], disabled_checks=dc)(*args)
    text2 = ex2.mlir_module()
    assert FUSED not in text2 and CPU_FINALIZE in text2 and CPU_TAIL in text2
    with pytest.raises(ValueError, match="custom call"):
        export.export(f, platforms=["cpu"])(*args)


# ----------------------------------------------------------------------- CPU lowering

@pytest.mark.parametrize("mc", [N4, N4_DP2_TP2, N8_TUPLE], ids=lambda m: m.id)
@pytest.mark.parametrize("quant", [None, Q.fp8_static(0.1), Q.nvfp4(600.0)],
                         ids=lambda q: q.id if q else "noquant")
def test_cpu_lowering_finalize_all_gather_tail(mc, quant):
    text = cpu_text(mc, scales=True, shared=True, quant=quant, routed_scaling_factor=1.5)
    fin, tail = custom_calls(text, CPU_FINALIZE), custom_calls(text, CPU_TAIL)
    assert len(fin) == 1 and len(tail) == 1
    assert FUSED not in text
    i_fin = text.index(f"@{CPU_FINALIZE}(")
    i_tail = text.index(f"@{CPU_TAIL}(")
    gathers = [m.start() for m in re.finditer(r"all_gather", text)]
    assert any(i_fin < g < i_tail for g in gathers), "no all_gather between finalize and tail"
    assert "all_reduce" not in text
    for attrs, _, _ in fin + tail:
        assert np.float32(attrs["routed_scaling_factor"]) == np.float32(1.5)
        assert attrs["quant"] == KIND[quant.kind if quant else None]
    # the tail sees [N, M, H]: every rank's wire, in rank order
    assert tail[0][1][0] == f"tensor<{mc.group}x5x64xbf16>"


def test_cpu_lowering_dense_has_no_finalize():
    text = cpu_text(N4, dense=True)
    assert CPU_FINALIZE not in text and len(custom_calls(text, CPU_TAIL)) == 1
    assert text.index("all_gather") < text.index(f"@{CPU_TAIL}(")


def test_cpu_compiled_hlo_has_all_gather_between_handlers():
    f, args = program(N4, scales=True)
    hlo = f.trace(*args).lower().compile().as_text()
    assert "all-gather" in hlo
    assert f'custom_call_target="{CPU_FINALIZE}"' in hlo
    assert f'custom_call_target="{CPU_TAIL}"' in hlo
