"""Reduce-scatter variants (SPEC §2.1): rank r of the N-rank group gets the tokens
[r*M/N, (r+1)*M/N). On CPU every output is exact (SPEC §3 via the oracle) and each row is
bit-identical to the matching row of the all-reduce functions on the same inputs; the
"xla" path (lax.psum_scatter) is within tolerance; refusals; lowering for CPU and CUDA."""

import dataclasses
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as PS

import jax_moe_ar as mar
import oracle
from cases import (ALL_QUANTS, BF16, F16, F32, Q, assert_norm_agrees, assert_same_bits,
                   check_against_oracle, device_layout, dtype_id, gen_case, run_case,
                   seed_for)
from jax_moe_ar import primitives
from jax_moe_ar.testing import (N1, N2, N4, N4_DP2_TP2, N8, N8_TUPLE, MeshCase, make_mesh,
                                sharded)
from test_lowering import (CPU_FINALIZE, CPU_TAIL, FUSED, KIND, collectives_in, custom_calls,
                           expected_flags)
from test_reference import assert_close_T, dequant_tolerance

S = jax.ShapeDtypeStruct
SCATTER = 512  # independent mirror of csrc/common/config.h OpFlag kScatter (1 << 9)

# A tuple in the reverse of mesh order, and a group of two axes of a three-axis mesh.
REVERSED_TUPLE = MeshCase((2, 4), ("x", "y"), ("y", "x"))
THREE_AXES = MeshCase((2, 2, 2), ("dp", "x", "y"), ("x", "y"))


def mesh_id(mc):
    axis = "+".join(mc.axis) if isinstance(mc.axis, tuple) else mc.axis
    return f"{mc.id}_over_{axis}"


@pytest.fixture
def rng(request):
    return np.random.default_rng(seed_for(request.node.nodeid))


# ---------------------------------------------------------------------------- runner

def _spec(names):
    names = tuple(names)
    return PS() if not names else PS(names[0] if len(names) == 1 else names)


def _operand_keys(case):
    keys = ["x"] if case.dense else ["expert_out", "permuted_idx"]
    return keys + ["expert_scales"] * case.has_scales + ["shared_expert_out"] * case.has_shared


def scatter_call(case, named, spec, axis_name, algorithm):
    kw = case.kwargs()
    if case.dense:
        return mar.reduce_scatter_rmsnorm(named["x"], named["residual"], named["norm_weight"],
                                          axis_name=axis_name, quant=spec,
                                          algorithm=algorithm, **kw)
    return mar.moe_finalize_reduce_scatter(
        named["expert_out"], named["permuted_idx"], named["residual"], named["norm_weight"],
        axis_name=axis_name, expert_scales=named.get("expert_scales"),
        shared_expert_out=named.get("shared_expert_out"), quant=spec, algorithm=algorithm,
        **kw)


def run_scatter(case, mc, *, algorithm="auto", scale_operand=False, platform="cpu"):
    """Runs the reduce-scatter variant of `case` on every group of the mesh: every
    per-rank operand (all M tokens) and each rank's residual block [M/N, H] are sharded
    over all mesh axes, as are the outputs. Returns [group][rank] -> output dict."""
    mesh = make_mesh(platform, mc)
    b = case.M // case.N
    layout = device_layout(mc)
    keys = _operand_keys(case)
    args = [np.concatenate([case.groups[g]["ranks"][r][k] for g, r in layout]) for k in keys]
    args.append(np.concatenate([case.groups[g]["residual"][r * b:(r + 1) * b]
                                for g, r in layout]))
    args.append(case.norm_weight)
    dev = _spec(mc.names)
    in_specs = [dev] * (len(keys) + 1) + [PS()]
    use_scale = scale_operand and case.quant is not None and case.quant.takes_scale
    if use_scale:
        args.append(np.float32(case.quant.scale_value))
        in_specs.append(PS())

    def body(*a):
        a = list(a)
        scale = a.pop() if use_scale else None
        spec = None if case.quant is None else case.quant.spec(scale)
        return scatter_call(case, dict(zip(keys + ["residual", "norm_weight"], a)), spec,
                            mc.axis, algorithm)

    out = sharded(body, mesh, tuple(in_specs), dev)(*args)
    res = [[None] * case.N for _ in case.groups]
    for d, (g, r) in enumerate(layout):
        res[g][r] = {f: (None if getattr(out, f) is None
                         else np.split(np.asarray(getattr(out, f)), mc.size)[d])
                     for f in out._fields}
    return res


def scatter_oracle(case, g):
    """The oracle's outputs of group g, one dict per rank (M/N rows each)."""
    grp, b = case.groups[g], case.M // case.N
    residuals = [grp["residual"][r * b:(r + 1) * b] for r in range(case.N)]
    quant = None if case.quant is None else (case.quant.kind, case.quant.oracle_params())
    common = dict(eps=case.eps, norm_weight_offset=case.offset, quant=quant)
    if case.dense:
        return oracle.reduce_scatter_rmsnorm([d["x"] for d in grp["ranks"]], residuals,
                                             case.norm_weight, **common)
    return oracle.moe_finalize_reduce_scatter(grp["ranks"], residuals, case.norm_weight,
                                              routed_scaling_factor=case.rsf, **common)


def block_of(out, case, r):
    """Rank r's rows [r*M/N, (r+1)*M/N) of an all-reduce output dict (M rows), every
    scale layout included."""
    b = case.M // case.N
    rows = slice(r * b, (r + 1) * b)
    d = {k: (None if out[k] is None else out[k][rows]) for k in ("residual", "norm", "quant")}
    s, q = out["scale"], case.quant
    if s is not None:
        if q.kind == "fp8_per_group" and q.p["scale_layout"] == "col":
            s = s[:, rows]
        elif q.kind == "nvfp4" and q.p["layout"] == "swizzled_128x4":
            s = oracle._swizzle(oracle._unswizzle(s, case.M, case.H)[rows], case.H)
        else:
            s = s[rows]
    d["scale"] = s
    return d


def check_scatter(case, mc, *, rows_vs_allreduce=True, platform="cpu", **kw):
    """Every rank of every group: exact against the oracle (SPEC §3's table on M/N rows)
    and, row for row, bit-identical to the all-reduce op's rows: every output on CPU (the
    same row code), the residual on GPU (norm there within SPEC §3's 1 ulp)."""
    outs = run_scatter(case, mc, platform=platform, **kw)
    block = dataclasses.replace(case, M=case.M // case.N)
    for g, ranks in enumerate(outs):
        refs = scatter_oracle(case, g)
        for r, out in enumerate(ranks):
            check_against_oracle(out, block, g, ref=refs[r])
    if rows_vs_allreduce:
        full = run_case(case, mc, platform=platform, algorithm=kw.get("algorithm", "auto"))
        for g, ranks in enumerate(outs):
            for r, out in enumerate(ranks):
                want = block_of(full[g], case, r)
                for name, v in out.items():
                    what = f"group {g} rank {r} {name} vs all-reduce"
                    if v is None:
                        assert want[name] is None, name
                    elif platform == "cpu" or name == "residual":
                        assert_same_bits(v, want[name], what, nan_equal=False)
                    elif name == "norm":
                        assert_norm_agrees(v, want[name], what)
    return outs


def check_scatter_close(case, mc, *, algorithm="xla", platform="cpu"):
    """Every rank of every group within tolerance of the oracle (the "xla" path: psums
    in T): residual and norm a few ulps of T, dequantized codes within half a step of the
    path's own norm."""
    block = dataclasses.replace(case, M=case.M // case.N)
    T = case.dtype
    for g, ranks in enumerate(run_scatter(case, mc, algorithm=algorithm, platform=platform)):
        for r, (out, ref) in enumerate(zip(ranks, scatter_oracle(case, g))):
            for name in ("residual", "norm"):
                if name in case.resolved_outputs:
                    assert_close_T(out[name], ref[name], T, f"rank {r} {name}",
                                   k=4.0 if name == "residual" else 8.0)
            if "quant" not in case.resolved_outputs:
                continue
            quant = case.quant
            (cs, cd), sc = quant.output_shapes(block.M, block.H)
            assert out["quant"].shape == cs and out["quant"].dtype == cd
            if sc is not None:
                assert out["scale"].shape == sc[0] and out["scale"].dtype == sc[1]
            deq = np.asarray(mar.dequantize(
                mar.FusedOutputs(None, None, jnp.asarray(out["quant"]),
                                 None if out["scale"] is None else jnp.asarray(out["scale"])),
                quant.spec()))
            q_in = out["norm"].astype(np.float32)
            err = np.abs(deq - q_in)
            assert (err <= dequant_tolerance(quant, q_in, out["scale"])).all(), \
                f"rank {r}: dequantized {quant.id} beyond half a code step"


# ------------------------------------------------------------- meshes, dtypes, paths

MESHES = [N1, N2, N4, N8, N4_DP2_TP2, N8_TUPLE, REVERSED_TUPLE, THREE_AXES]


@pytest.mark.parametrize("mc", MESHES, ids=mesh_id)
def test_moe_every_mesh(rng, mc):
    case = gen_case(rng, mc, dtype=BF16, M=3 * mc.group, H=144, K=4, scales="f32",
                    shared=True, rsf=2.5, oob=True)
    check_scatter(case, mc)


@pytest.mark.parametrize("mc", [N1, N2, N8, N4_DP2_TP2, N8_TUPLE], ids=mesh_id)
def test_dense_every_mesh(rng, mc):
    case = gen_case(rng, mc, dtype=BF16, M=2 * mc.group, H=64, dense=True)
    check_scatter(case, mc)


@pytest.mark.parametrize("dense", [False, True], ids=["moe", "dense"])
@pytest.mark.parametrize("dtype", [F16, F32], ids=dtype_id)
def test_dtypes(rng, dtype, dense):
    case = gen_case(rng, N4, dtype=dtype, M=8, H=64, dense=dense, scales="T", shared=True,
                    offset=1.0, nw_dtype="f32", eps=1e-5)
    check_scatter(case, N4)


def test_f32_rank_order_is_respected(rng):
    """The rank sum's order is visible in float32, so the exchange must hand the tail
    every rank's rows in rank order (a tuple of axes, reversed against the mesh)."""
    case = gen_case(rng, REVERSED_TUPLE, dtype=F32, M=16, H=64, dense=True)
    b = case.M // case.N
    ranks = case.groups[0]["ranks"]
    res = case.groups[0]["residual"][:b]
    fwd = oracle.reduce_scatter_rmsnorm([d["x"] for d in ranks], [res] * case.N,
                                        case.norm_weight)[0]
    rev = oracle.reduce_scatter_rmsnorm([d["x"] for d in ranks[::-1]], [res] * case.N,
                                        case.norm_weight)[0]
    assert not np.array_equal(fwd["residual"], rev["residual"])
    check_scatter(case, REVERSED_TUPLE, rows_vs_allreduce=False)


@pytest.mark.parametrize("algorithm", ["oneshot", "twoshot"])
def test_forced_algorithms_on_cpu_are_exact(rng, algorithm):
    case = gen_case(rng, N4, dtype=BF16, M=8, H=64, scales="f32", shared=True)
    check_scatter(case, N4, algorithm=algorithm, rows_vs_allreduce=False)


def test_special_values(rng):
    """NaN, Inf, -0.0 and subnormals, and whole rows of -0.0: as the oracle says."""
    case = gen_case(rng, N4, dtype=BF16, M=12, H=64, scales="f32", shared=True, specials=6,
                    zero_rows=True, quant=Q.nvfp4(600.0, "linear"),
                    outputs=("residual", "norm", "quant"))
    check_scatter(case, N4)


# ---------------------------------------------------------------------- quant formats

@pytest.mark.parametrize("quant", ALL_QUANTS, ids=lambda q: q.id)
def test_quant_formats(rng, quant):
    """Each rank's codes and scales cover its own M/N = 5 rows (NVFP4 swizzled scales
    padded per rank to 128 rows)."""
    case = gen_case(rng, N4, dtype=BF16, M=20, H=256, K=4, scales="f32", shared=True,
                    rsf=2.5, quant=quant, outputs=("residual", "norm", "quant"))
    check_scatter(case, N4)


@pytest.mark.parametrize("quant", [Q.fp8_static(0.02), Q.nvfp4(700.0)], ids=lambda q: q.id)
def test_dense_quant_scale_as_traced_operand(rng, quant):
    case = gen_case(rng, N4_DP2_TP2, dtype=BF16, M=6, H=64, dense=True, quant=quant)
    check_scatter(case, N4_DP2_TP2, scale_operand=True)


@pytest.mark.parametrize("H", [48, 208])
def test_odd_hidden_sizes(rng, H):
    """H/16 odd: NVFP4 block columns padded to 4 in the swizzled layout."""
    for quant in (Q.nvfp4(600.0), Q.fp8_per_group(16, scale_layout="col")):
        case = gen_case(rng, N2, dtype=BF16, M=6, H=H, K=3, scales="f32", quant=quant,
                        outputs=("residual", "norm", "quant"))
        check_scatter(case, N2)


def test_quant_only_output(rng):
    case = gen_case(rng, N8_TUPLE, dtype=BF16, M=8, H=128, quant=Q.fp8_per_token(),
                    outputs=("quant",))
    check_scatter(case, N8_TUPLE)


# --------------------------------------------------------------------- "xla" algorithm

@pytest.mark.parametrize("mc,dense", [(N4, False), (N8_TUPLE, True), (N4_DP2_TP2, False)],
                         ids=["n4-moe", "n8tuple-dense", "dp2tp2-moe"])
def test_xla_algorithm_close_to_oracle(rng, mc, dense):
    """algorithm="xla" is the lax.psum_scatter composition: SPEC §3 within tolerance."""
    case = gen_case(rng, mc, dtype=BF16, M=4 * mc.group, H=128, K=4, dense=dense,
                    scales="f32", shared=True, rsf=2.5, quant=Q.nvfp4(600.0),
                    outputs=("residual", "norm", "quant"))
    check_scatter_close(case, mc)


def test_force_xla_environment(rng, monkeypatch):
    monkeypatch.setenv(mar.ops.FORCE_XLA_ENV, "1")
    f, args = program(N4, M=8)
    text = f.trace(*args).lower().as_text()
    assert "reduce_scatter" in text and CPU_TAIL not in text


# ------------------------------------------------------------------ shapes and typing

@pytest.mark.parametrize("mc", [N4, N4_DP2_TP2], ids=mesh_id)
@pytest.mark.parametrize("dense", [False, True], ids=["moe", "dense"])
def test_zero_tokens(rng, mc, dense):
    quant = Q.nvfp4(600.0)
    case = gen_case(rng, mc, dtype=BF16, M=0, H=64, dense=dense, quant=quant,
                    outputs=("residual", "norm", "quant"))
    for ranks in run_scatter(case, mc):
        for out in ranks:
            assert out["residual"].shape == (0, 64) and out["norm"].shape == (0, 64)
            assert out["quant"].shape == (0, 32) and out["quant"].dtype == np.uint8
            assert out["scale"].shape == (0, 4)


@pytest.mark.parametrize("res_spec", [PS("tp"), PS()], ids=["res_sharded", "res_replicated"])
@pytest.mark.parametrize("M", [0, 8])
def test_outputs_typed_varying_along_the_group(M, res_spec):
    """Like psum_scatter results: typed varying along the axis (so out_specs=P() is
    refused by check_vma) even when the residual block is not, and not along axes the
    operands do not vary on."""
    mesh = make_mesh("cpu", N4_DP2_TP2)
    seen = {}

    def body(x, res, nw):
        out = mar.reduce_scatter_rmsnorm(x, res, nw, axis_name="tp",
                                         quant=mar.Fp8PerToken(),
                                         outputs=("residual", "norm", "quant"))
        ref = jax.lax.psum_scatter(x, "tp", scatter_dimension=0, tiled=True)
        seen["ref"] = jax.typeof(ref)
        seen["outs"] = [jax.typeof(o) for o in out if o is not None]
        return out

    x = jnp.zeros((2 * M, 64), jnp.bfloat16)  # sharded over tp only: invariant along dp
    rows = M if res_spec == PS("tp") else M // 2
    res = jnp.zeros((rows, 64), jnp.bfloat16)  # [M/2, 64] per rank
    nw = jnp.ones((64,), jnp.float32)
    f = sharded(body, mesh, (PS("tp"), res_spec, PS()), PS("tp"))
    jax.block_until_ready(f(x, res, nw))
    vma = primitives._varying
    for aval in seen["outs"]:
        assert vma(aval) == vma(seen["ref"]) == frozenset({"tp"}), aval
    with pytest.raises(ValueError, match="out_specs"):
        sharded(body, mesh, (PS("tp"), res_spec, PS()), PS())(x, res, nw)


# -------------------------------------------------------------------------- refusals

def _trace(mc, dense, M, rows, axis_name=None, **kw):
    mesh = make_mesh("cpu", mc)
    n = mc.size
    H, K, P = 32, 2, 4
    axis_name = mc.axis if axis_name is None else axis_name
    dev = _spec(mc.names)
    if dense:
        args = [S((n * M, H), jnp.bfloat16)]
    else:
        args = [S((n * P, H), jnp.bfloat16), S((n * M, K), jnp.int32)]
    args += [S((n * rows, H), jnp.bfloat16), S((H,), jnp.float32)]

    def body(*a):
        if dense:
            return mar.reduce_scatter_rmsnorm(*a, axis_name=axis_name, **kw)
        return mar.moe_finalize_reduce_scatter(*a, axis_name=axis_name, **kw)

    specs = (dev,) * (len(args) - 1) + (PS(),)
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=dev)).trace(*args)


@pytest.mark.parametrize("mc", [N4, N8_TUPLE], ids=mesh_id)
@pytest.mark.parametrize("dense,arg", [(False, "permuted_idx"), (True, "x")],
                         ids=["moe", "dense"])
def test_tokens_not_divisible_by_group_refused(mc, dense, arg):
    with pytest.raises(ValueError) as info:
        _trace(mc, dense, M=mc.group + 2, rows=1)
    msg = str(info.value)
    assert f"`{arg}`" in msg and f"M={mc.group + 2}" in msg and f"N={mc.group}" in msg, msg


@pytest.mark.parametrize("dense", [False, True], ids=["moe", "dense"])
def test_residual_must_be_this_ranks_block(dense):
    """A residual of all M tokens (the all-reduce's shape) is refused, naming [M/N, H]."""
    with pytest.raises(ValueError) as info:
        _trace(N4, dense, M=8, rows=8)
    msg = str(info.value)
    assert "`residual`" in msg and "[M/N, H]" in msg and "(2, 32)" in msg, msg


def test_other_rules_still_apply():
    with pytest.raises(ValueError, match="`algorithm`"):
        _trace(N4, False, M=8, rows=2, algorithm="ring")
    with pytest.raises(ValueError, match="`outputs`"):
        _trace(N4, True, M=8, rows=2, outputs=("quant",))
    with pytest.raises(ValueError, match="`axis_name`.*'sp'"):
        _trace(N4, True, M=8, rows=2, axis_name="sp")
    _trace(N1, False, M=3, rows=3)  # any M with a group of one


def test_called_outside_shard_map_says_how():
    x = jnp.zeros((4, 32), jnp.bfloat16)
    with pytest.raises(ValueError, match="shard_map"):
        mar.reduce_scatter_rmsnorm(x, x, jnp.ones((32,), jnp.float32), axis_name="tp")


# ---------------------------------------------------------------------------- oracle

@pytest.mark.parametrize("dense", [False, True], ids=["moe", "dense"])
def test_oracle_scatter_rows_are_allreduce_rows(rng, dense):
    """The oracle's reduce-scatter gives each rank its rows of the oracle's all-reduce."""
    case = gen_case(rng, N4, dtype=BF16, M=12, H=256, dense=dense, scales="f32",
                    quant=Q.nvfp4(600.0), outputs=("residual", "norm", "quant"))
    quant = (case.quant.kind, case.quant.oracle_params())
    grp = case.groups[0]
    if dense:
        full = oracle.allreduce_rmsnorm([d["x"] for d in grp["ranks"]], grp["residual"],
                                        case.norm_weight, quant=quant)
    else:
        full = oracle.moe_finalize_allreduce(grp["ranks"], grp["residual"], case.norm_weight,
                                             quant=quant)
    for r, out in enumerate(scatter_oracle(case, 0)):
        want = block_of(full, case, r)
        assert out["scale"].shape == (128, 16)  # roundup(M/N = 3, 128), 256/16
        for name in ("residual", "norm", "quant", "scale"):
            assert_same_bits(out[name], want[name], f"rank {r} {name}", nan_equal=False)
    with pytest.raises(ValueError, match="multiple"):
        oracle.reduce_scatter_rmsnorm([np.zeros((3, 16), np.float32)] * 2,
                                      [np.zeros((1, 16), np.float32)] * 2, np.ones(16))


# -------------------------------------------------------------------------- lowering

def program(mc, *, dense=False, dtype=jnp.bfloat16, M=8, H=64, K=3, P=6, scales=False,
            shared=False, quant=None, scale_operand=False, **kw):
    """jit(shard_map(reduce-scatter variant)) over a CPU mesh and its abstract args: M tokens
    of partial per rank, residual [M/N, H] per rank."""
    mesh = make_mesh("cpu", mc)
    n, b = mc.size, M // mc.group
    dev = _spec(mc.names)
    args = ([S((n * M, H), dtype)] if dense
            else [S((n * P, H), dtype), S((n * M, K), jnp.int32)])
    args += [S((n * b, H), dtype), S((H,), jnp.float32)]
    if scales:
        args.append(S((n * M, K), jnp.float32))
    if shared:
        args.append(S((n * M, H), dtype))
    specs = [dev, dev, PS()] if dense else [dev, dev, dev, PS()] + [dev] * (scales + shared)
    if scale_operand:
        args.append(S((), jnp.float32))
        specs.append(PS())

    def body(*a):
        a = list(a)
        sc = a.pop() if scale_operand else None
        spec = None if quant is None else quant.spec(sc)
        if dense:
            return mar.reduce_scatter_rmsnorm(a[0], a[1], a[2], axis_name=mc.axis, quant=spec,
                                              **kw)
        rest = a[4:]
        es = rest.pop(0) if scales else None
        sh = rest.pop(0) if shared else None
        return mar.moe_finalize_reduce_scatter(a[0], a[1], a[2], a[3], axis_name=mc.axis,
                                               expert_scales=es, shared_expert_out=sh,
                                               quant=spec, **kw)

    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=tuple(specs), out_specs=dev)), args


def cuda_text(mc, **kw):
    f, args = program(mc, **kw)
    return f.trace(*args).lower(lowering_platforms=("cuda",)).as_text()


CUDA_CASES = [
    dict(),
    dict(scales=True, shared=True, routed_scaling_factor=2.5, quant=Q.nvfp4(600.0),
         outputs=("residual", "norm", "quant"), scale_operand=True),
    dict(dense=True, quant=Q.fp8_per_group(32, True, "col"), eps=1e-5),
    dict(dense=True, dtype=jnp.float32, quant=Q.fp8_per_token(), outputs=("quant",)),
]


def case_id(c):
    return "-".join(f"{k}={v.id if isinstance(v, Q) else v}" for k, v in c.items()) or "plain"


@pytest.mark.parametrize("mc", [N4, N4_DP2_TP2, N8_TUPLE], ids=mesh_id)
@pytest.mark.parametrize("kw", CUDA_CASES, ids=case_id)
def test_cuda_fused_lowering(mc, kw):
    """One jax_moe_ar_fused_v1 call whose flags add SCATTER,
    operands of all M tokens but a residual of M/N rows, results of M/N rows, and no XLA
    collective."""
    M, H, K, P = 8, 64, 3, 6
    b = M // mc.group
    text = cuda_text(mc, M=M, H=H, K=K, P=P, **kw)
    calls = custom_calls(text, FUSED)
    assert len(calls) == 1 and not collectives_in(text), collectives_in(text)
    attrs, ops, res = calls[0]
    quant, dense = kw.get("quant"), kw.get("dense", False)
    outputs = kw.get("outputs", ("residual", "quant") if quant else ("residual", "norm"))
    assert attrs["flags"] == SCATTER | expected_flags(
        dense=dense, scales=kw.get("scales"), shared=kw.get("shared"), outputs=outputs,
        quant=quant)
    assert attrs["quant"] == KIND[quant.kind if quant else None]
    T = {jnp.bfloat16: "bf16", jnp.float32: "f32"}[kw.get("dtype", jnp.bfloat16)]
    want_ops = ([f"tensor<{M}x{H}x{T}>"] if dense
                else [f"tensor<{P}x{H}x{T}>", f"tensor<{M}x{K}xi32>"])
    want_ops += [f"tensor<{b}x{H}x{T}>", f"tensor<{H}xf32>"]
    want_ops += [f"tensor<{M}x{K}xf32>"] * bool(kw.get("scales"))
    want_ops += [f"tensor<{M}x{H}x{T}>"] * bool(kw.get("shared"))
    want_ops += ["tensor<f32>"] * (quant is not None and quant.takes_scale)
    assert ops == want_ops
    want_res = [f"tensor<{b}x{H}x{T}>"] * (("residual" in outputs) + ("norm" in outputs))
    if quant is not None:
        (cs, cd), sc = quant.output_shapes(b, H)
        name = "ui8" if np.dtype(cd) == np.uint8 else "f8E4M3FN"
        want_res.append(f"tensor<{'x'.join(map(str, cs))}x{name}>")
        if sc is not None:
            sname = "f32" if np.dtype(sc[1]) == np.float32 else "f8E4M3FN"
            want_res.append(f"tensor<{'x'.join(map(str, sc[0]))}x{sname}>")
    assert res == want_res


def test_cuda_fused_lowering_group_of_one():
    """Forced: the kernel; `auto`: plain JAX for a group of one (workspace's table)."""
    text = cuda_text(N1, M=5, algorithm="oneshot")
    assert len(custom_calls(text, FUSED)) == 1 and not collectives_in(text)
    assert FUSED not in cuda_text(N1, M=5)


def test_cuda_xla_algorithm_lowers_to_reduce_scatter():
    text = cuda_text(N4, algorithm="xla", quant=Q.nvfp4(600.0))
    assert FUSED not in text and "reduce_scatter" in text and "all_reduce" not in text


@pytest.mark.parametrize("mc", [N4, N8_TUPLE, N4_DP2_TP2], ids=mesh_id)
@pytest.mark.parametrize("dense", [False, True], ids=["moe", "dense"])
def test_cpu_lowering_finalize_all_to_all_tail(mc, dense):
    """CPU: (finalize FFI ->) all_to_all -> tail FFI on [N, M/N, H], no gather or reduce."""
    M = 8
    f, args = program(mc, dense=dense, M=M, scales=not dense, quant=Q.fp8_static(0.1))
    text = f.trace(*args).lower().as_text()
    tail = custom_calls(text, CPU_TAIL)
    assert len(tail) == 1 and FUSED not in text
    assert len(custom_calls(text, CPU_FINALIZE)) == (0 if dense else 1)
    found = collectives_in(text)
    assert set(found) <= {"all_to_all", "all-to-all"} and found, found
    i_tail = text.index(f"@{CPU_TAIL}(")
    a2a = [m.start() for m in re.finditer(r"all_to_all", text)]
    assert any(i < i_tail for i in a2a)
    if not dense:
        assert any(text.index(f"@{CPU_FINALIZE}(") < i for i in a2a)
    assert tail[0][1][0] == f"tensor<{mc.group}x{M // mc.group}x64xbf16>"
    assert tail[0][0]["flags"] & SCATTER


# ------------------------------------------------------------------- README and demo

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def readme_example(heading):
    """The first ```python block of the README section `heading`."""
    text = (ROOT / "README.md").read_text()
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_example_runs_as_written(capsys):
    ns = {"__name__": "readme_example"}
    exec(compile(readme_example("Reduce-scatter layer ends"), "README.md", "exec"), ns)
    N, M, H = ns["N"], ns["M"], ns["H"]
    assert N == jax.device_count() and M == 4 * N
    assert ns["residual"].shape == (M, H) and ns["residual"].dtype == jnp.bfloat16
    assert ns["codes"].shape == (M, H) and ns["codes"].dtype == jnp.float8_e4m3fn
    assert ns["scale"].shape == (M, 1) and ns["residual"].sharding.spec == PS("tp")
    assert capsys.readouterr().out.strip() == f"({M}, {H}) float8_e4m3fn ({M}, 1)"


def test_demo_scatter_runs_and_agrees(capsys):
    """`python -m jax_moe_ar demo --scatter` (in process, on 2 of the CPU devices)."""
    from jax_moe_ar import demo
    from jax_moe_ar.__main__ import build_parser

    def main(argv):
        return demo.main(build_parser().parse_args(argv))

    small = ["--hidden", "64", "--experts", "4", "--ffn", "32", "--shared-ffn", "32"]
    assert main(["demo", "--scatter", "--platform", "cpu", "--devices", "2", "--tokens", "4",
                 "--steps", "2", "--reps", "1"] + small) == 0
    out = capsys.readouterr().out
    assert "sequence-parallel" in out and "2 per rank" in out
    assert "all_to_all" in out and "step 1:" in out
    assert out.count("rows vs all-reduce op: 100.00% bit-identical") == 2, out
    assert "OK: reduce-scatter (auto) and xla agree" in out
    assert main(["demo", "--scatter", "--platform", "cpu", "--devices", "4", "--tokens",
                 "6"]) == 2
    assert "--tokens 6 must be a multiple of the device count 4" in capsys.readouterr().err
