"""The CPU path is exact: bit for bit what SPEC §3's oracle computes (norm: <= 1 ulp,
>= 99.9 % identical), on every rank of every group, for every mesh, dtype, shape, quant
format and layout, output selection and special value."""

import ml_dtypes
import numpy as np
import pytest
from jax.sharding import PartitionSpec as PS

import jax_moe_ar as mar
import oracle
from cases import (ALL_QUANTS, BF16, DTYPES, EXTRA_MESHES, F16, F32, Q, assert_norm_agrees,
                   assert_ranks_identical, assert_same_bits, bits, check_against_oracle,
                   dtype_id, gen_case, mesh_id, oracle_outputs, run_case, subnormal)
from jax_moe_ar.testing import (MESH_CASES, N1, N2, N4, N4_DP2_TP2, N8, N8_TUPLE, make_mesh,
                                sharded)

PLATFORM = "cpu"


def check_all(case, mc, *, per_rank=True, algorithm="auto", **kw):
    """Runs the case (out_specs invariant, check_vma=True) and checks every group against
    the oracle; with per_rank also runs it returning every device's copy and checks that
    the ranks of each group are bit-identical."""
    outs = run_case(case, mc, platform=PLATFORM, algorithm=algorithm, **kw)
    refs = [check_against_oracle(o, case, g) for g, o in enumerate(outs)]
    if per_rank:
        for g, ranks in enumerate(run_case(case, mc, platform=PLATFORM, algorithm=algorithm,
                                           per_rank=True, **kw)):
            assert_ranks_identical(ranks, f"group {g}")
            for name, v in ranks[0].items():
                if v is not None:
                    assert_same_bits(v, outs[g][name], f"group {g} per-rank vs P() {name}",
                                     nan_equal=False)
    return outs, refs


# ------------------------------------------------------------------- meshes and dtypes

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("mc", MESH_CASES + EXTRA_MESHES, ids=mesh_id)
def test_moe_every_mesh_and_dtype(rng, mc, dtype):
    case = gen_case(rng, mc, dtype=dtype, M=13, H=144, K=4, scales="f32", shared=True,
                    rsf=2.5, oob=True)
    check_all(case, mc)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("mc", [N1, N2, N8, N4_DP2_TP2, N8_TUPLE], ids=mesh_id)
def test_dense_every_mesh_and_dtype(rng, mc, dtype):
    case = gen_case(rng, mc, dtype=dtype, M=7, H=64, dense=True)
    check_all(case, mc)


@pytest.mark.parametrize("algorithm", ["auto", "oneshot", "twoshot"])
def test_algorithms_on_cpu_are_exact(rng, algorithm):
    case = gen_case(rng, N4, dtype=F32, M=9, H=64, scales="f32", shared=True, rsf=1.7)
    check_all(case, N4, per_rank=False, algorithm=algorithm)


def test_f32_rank_order_matters_and_is_respected(rng):
    """The oracle's left-to-right rank sum is visible in float32 (so the exactness tests
    above do check the order), and the op follows it."""
    case = gen_case(rng, N8, dtype=F32, M=32, H=64, dense=True)
    ref = oracle_outputs(case)
    ranks = case.groups[0]["ranks"]
    rev = oracle.allreduce_rmsnorm([d["x"] for d in ranks[::-1]], case.groups[0]["residual"],
                                   case.norm_weight)
    assert not np.array_equal(bits(rev["residual"]), bits(ref["residual"]))
    check_all(case, N8, per_rank=False)


# --------------------------------------------------------------------- quant formats

@pytest.mark.parametrize("quant", ALL_QUANTS, ids=lambda q: q.id)
@pytest.mark.parametrize("mc", [N1, N4, N4_DP2_TP2], ids=mesh_id)
def test_quant_formats_bf16(rng, mc, quant):
    case = gen_case(rng, mc, dtype=BF16, M=13, H=256, K=4, scales="f32", shared=True,
                    rsf=2.5, quant=quant, outputs=("residual", "norm", "quant"))
    check_all(case, mc)


@pytest.mark.parametrize("quant", ALL_QUANTS, ids=lambda q: q.id)
@pytest.mark.parametrize("dtype", [F16, F32], ids=dtype_id)
def test_quant_formats_f16_f32(rng, dtype, quant):
    case = gen_case(rng, N2, dtype=dtype, M=7, H=256, K=3, scales="T", quant=quant,
                    outputs=("residual", "norm", "quant"))
    check_all(case, N2, per_rank=False)


@pytest.mark.parametrize("quant", [Q.fp8_static(0.02), Q.nvfp4(700.0, "linear")],
                         ids=lambda q: q.id)
def test_quant_scale_as_traced_operand(rng, quant):
    """The FP8 static scale / NVFP4 global scale may be a runtime (traced) value."""
    case = gen_case(rng, N4, dtype=BF16, M=5, H=64, quant=quant,
                    outputs=("residual", "norm", "quant"))
    check_all(case, N4, per_rank=False, scale_operand=True)


def _stress_case(rng, mc, dtype, quant, M=24, H=128):
    """Dense case whose norm_out spans many decades: per row a few large values and
    log-uniform small ones (e4m3/e2m1 subnormal codes, zero codes, saturation), some rows
    all zero (amax floor), some rows constant (ties)."""
    case = gen_case(rng, mc, dtype=dtype, M=M, H=H, dense=True, quant=quant,
                    outputs=("residual", "norm", "quant"))
    mag = 10.0 ** rng.uniform(-7, 1, size=(M, H))
    sign = np.where(rng.random((M, H)) < 0.5, -1.0, 1.0)
    vals = sign * mag
    vals[:, 0] = rng.choice([300.0, -5.0, 1e4], size=M)
    vals[0] = 0.0                                   # all-zero row: amax floor
    vals[1] = 0.75                                  # constant row: exact ties after scaling
    vals[2, :] = 2.0 ** -np.arange(H) * 4           # powers of two, down to nothing
    for grp in case.groups:
        grp["residual"] = vals.astype(dtype)
        for d in grp["ranks"]:
            d["x"] = np.zeros((M, H), dtype)
    case.norm_weight = np.ones(H, dtype)
    return case


@pytest.mark.parametrize("quant", [
    Q.fp8_static(1e-4), Q.fp8_static(3.0), Q.fp8_per_token(), Q.fp8_per_group(16),
    Q.fp8_per_group(32, ue8m0=True), Q.fp8_per_group(64, ue8m0=True, scale_layout="col"),
    Q.nvfp4(1e-3, "linear"), Q.nvfp4(448.0 * 6, "linear"), Q.nvfp4(1e6, "swizzled_128x4"),
], ids=lambda q: f"{q.id}_{q.scale_value}" if q.takes_scale else q.id)
@pytest.mark.parametrize("dtype", [BF16, F32], ids=dtype_id)
def test_quant_wide_dynamic_range(rng, dtype, quant):
    case = _stress_case(rng, N1, dtype, quant)
    check_all(case, N1, per_rank=False)


# ------------------------------------------------------------------------ token counts

@pytest.mark.parametrize("M", [1, 7, 13, 128, 129, 300])
def test_token_counts_swizzle_padding(rng, M):
    """Odd M and M > 128: the swizzled NVFP4 scales pad rows to 128 and blocks to 4
    (H = 144: 9 blocks) with zeros; the per-group col layout transposes [M, H/gs]."""
    quant = Q.nvfp4(500.0, "swizzled_128x4")
    case = gen_case(rng, N4, dtype=BF16, M=M, H=144, K=2, quant=quant,
                    outputs=("residual", "norm", "quant"))
    outs, _ = check_all(case, N4, per_rank=False)
    sf = outs[0]["scale"].view(np.uint8)
    assert sf.shape == (-(-M // 128) * 128, 12)
    used = np.zeros(sf.size, bool)
    mm, bb = np.meshgrid(np.arange(M), np.arange(9), indexing="ij")
    used[oracle.swizzled_offset(mm, bb, 144)] = True
    assert not sf.reshape(-1)[~used].any(), "swizzled padding not zero"
    case = gen_case(rng, N4, dtype=BF16, M=M, H=144, K=2, quant=Q.fp8_per_group(48, True, "col"),
                    outputs=("norm", "quant"))
    check_all(case, N4, per_rank=False)


@pytest.mark.parametrize("dense", [False, True], ids=["moe", "dense"])
@pytest.mark.parametrize("mc", [N4, N4_DP2_TP2], ids=mesh_id)
def test_zero_tokens(rng, mc, dense):
    case = gen_case(rng, mc, dtype=BF16, M=0, H=64, dense=dense, quant=Q.fp8_per_token(),
                    outputs=("residual", "norm", "quant"))
    outs, _ = check_all(case, mc)
    assert outs[0]["residual"].shape == (0, 64) and outs[0]["scale"].shape == (0, 1)


# ------------------------------------------------------------------ routing and finalize

@pytest.mark.parametrize("shared", [False, True], ids=["noshared", "shared"])
@pytest.mark.parametrize("scales", [None, "f32", "T"], ids=["noscales", "scalesf32", "scalesT"])
@pytest.mark.parametrize("K", [1, 8])
def test_topk_scales_shared(rng, K, scales, shared):
    mc = N8 if K == 8 else N2
    case = gen_case(rng, mc, dtype=BF16, M=11, H=64, K=K, scales=scales, shared=shared,
                    rsf=1.0 if K == 1 else 2.827)
    check_all(case, mc, per_rank=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_out_of_range_indices_skipped(rng, dtype):
    """-1, >= P, < -1, 2**30, -2**31, 2**31-1: skipped (and never read: no crash, no
    garbage), also with the router weight of a skipped slot NaN."""
    case = gen_case(rng, N4, dtype=dtype, M=40, H=64, K=6, P=5, scales="f32", oob=True)
    for d in case.groups[0]["ranks"]:
        idx, w = d["permuted_idx"], d["expert_scales"]
        w[(idx < 0) | (idx >= case.P)] = np.nan
        assert ((idx >= case.P) | (idx < -1)).any()
    check_all(case, N4, per_rank=False)


def test_no_expert_rows_and_all_skipped(rng):
    """P = 0 (no rows on any rank: every index is out of range) with a shared expert."""
    case = gen_case(rng, N2, dtype=BF16, M=6, H=32, K=3, P=0, shared=True, rsf=3.0, oob=True)
    check_all(case, N2, per_rank=False)


@pytest.mark.parametrize("rsf,offset,eps,nw", [
    (1.0, 0.0, 1e-6, "T"),
    (2.827, 0.0, 1e-5, "f32"),        # rsf and eps not representable: rounded to f32 first
    (-0.37, 1.0, 1e-6, "T"),          # negative scaling, Gemma offset
    (1e-3, 1.0, 0.1, "f32"),          # eps that matters
    (16.0, 0.0, 1e-30, "f32"),
], ids=["plain", "rsf_eps_rounded", "neg_rsf_gemma", "big_eps_gemma", "tiny_eps"])
@pytest.mark.parametrize("dtype", [BF16, F16], ids=dtype_id)
def test_static_arguments(rng, dtype, rsf, offset, eps, nw):
    case = gen_case(rng, N4, dtype=dtype, M=9, H=64, K=4, scales="f32", shared=True, rsf=rsf,
                    eps=eps, offset=offset, nw_dtype=nw)
    check_all(case, N4, per_rank=False)


# ---------------------------------------------------------------------------- outputs

@pytest.mark.parametrize("outputs", [
    None, ("residual",), ("norm",), ("norm", "residual"), ["residual", "norm"],
])
def test_outputs_without_quant(rng, outputs):
    case = gen_case(rng, N2, dtype=BF16, M=5, H=64, outputs=outputs)
    outs, _ = check_all(case, N2, per_rank=False)
    if outputs is None:  # SPEC §2 default
        assert outs[0]["residual"] is not None and outs[0]["norm"] is not None
        assert outs[0]["quant"] is None and outs[0]["scale"] is None


@pytest.mark.parametrize("outputs", [
    None, ("quant",), ("norm", "quant"), ("residual", "quant"), ("residual", "norm", "quant"),
    ("residual", "norm"), ("norm",),
])
@pytest.mark.parametrize("quant", [Q.fp8_static(0.01), Q.fp8_per_group(32, False, "col"),
                                   Q.nvfp4(600.0)], ids=lambda q: q.id)
def test_outputs_with_quant(rng, quant, outputs):
    case = gen_case(rng, N2, dtype=BF16, M=5, H=64, quant=quant, outputs=outputs)
    outs, _ = check_all(case, N2, per_rank=False)
    o = outs[0]
    if outputs is None:  # SPEC §2 default with quant: residual and quant
        assert o["residual"] is not None and o["norm"] is None and o["quant"] is not None
    if outputs is not None and "quant" not in outputs:
        assert o["quant"] is None and o["scale"] is None


def test_fused_outputs_type(rng):
    mesh = make_mesh(PLATFORM, N2)
    case = gen_case(rng, N2, dtype=F32, M=3, H=32, dense=True)
    seen = {}

    def body(x, r, g):
        out = mar.allreduce_rmsnorm(x, r, g, axis_name="tp", quant=mar.Fp8PerToken(),
                                    outputs=("norm", "quant"))
        seen["type"] = type(out)
        return out

    f = sharded(body, mesh, (PS("tp"), PS(), PS()), PS())
    out = f(np.concatenate([d["x"] for d in case.groups[0]["ranks"]]),
            case.groups[0]["residual"], case.norm_weight)
    assert seen["type"] is mar.FusedOutputs and isinstance(out, mar.FusedOutputs)
    assert out.residual is None and out.norm is not None and out.scale.shape == (3, 1)


# ---------------------------------------------------------------------- special values

@pytest.mark.parametrize("quant", [None, Q.fp8_per_token(), Q.fp8_per_group(16, True),
                                   Q.nvfp4(500.0, "linear"), Q.nvfp4(500.0)],
                         ids=lambda q: q.id if q else "noquant")
@pytest.mark.parametrize("dense", [False, True], ids=["moe", "dense"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_nan_inf_negative_zero(rng, dtype, dense, quant):
    """NaN, ±Inf, -0.0 in every input (and whole rows of -0.0) propagate as in the oracle
    (NaN == NaN whatever the payload; NVFP4 codes of NaN/Inf blocks unspecified)."""
    case = gen_case(rng, N4, dtype=dtype, M=16, H=64, K=4, dense=dense, scales="T",
                    shared=True, rsf=-1.5, oob=True, specials=6, subnormals=False,
                    zero_rows=True, quant=quant,
                    outputs=None if quant is None else ("residual", "norm", "quant"))
    check_all(case, N4)


def test_negative_zero_exchange(rng):
    """All -0.0 on every rank and in the residual: the rank sum starts from wire_0, so
    residual_out is -0.0 (0x8000), and so is norm_out."""
    case = gen_case(rng, N4, dtype=BF16, M=3, H=32, dense=True)
    for d in case.groups[0]["ranks"]:
        d["x"][:] = -0.0
    case.groups[0]["residual"][:] = -0.0
    outs, ref = check_all(case, N4)
    assert (bits(outs[0]["residual"]) == 0x8000).all()
    assert (bits(outs[0]["norm"]) == 0x8000).all()


@pytest.mark.parametrize("dtype", [BF16, F32], ids=dtype_id)
def test_subnormal_residual_passes_through(rng, dtype):
    """SPEC §3: residual_out = rT(y + f32(residual)) with IEEE float32 arithmetic; with
    y = 0 a subnormal residual comes out unchanged (no flush to zero)."""
    mc = N1
    case = gen_case(rng, mc, dtype=dtype, M=2, H=16, dense=True)
    tiny = subnormal(dtype)
    case.groups[0]["ranks"][0]["x"][:] = 0.0
    case.groups[0]["residual"][:] = np.array([[-tiny], [3 * tiny]]).astype(dtype)
    outs, _ = check_all(case, mc, per_rank=False)


@pytest.mark.parametrize("dense", [False, True], ids=["moe", "dense"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_subnormals(rng, dtype, dense):
    """Negative (and positive) subnormals anywhere in the data, whole rows of them too:
    results match the oracle bit for bit (IEEE float32: no flush to zero)."""
    case = gen_case(rng, N2, dtype=dtype, M=12, H=64, K=4, dense=dense, scales="T",
                    shared=True, specials=0, zero_rows=True)
    sub = subnormal(dtype)
    for grp in case.groups:
        for d in grp["ranks"]:
            for k in ("x", "expert_out", "shared_expert_out"):
                if k in d:
                    d[k][:, ::7] = (-sub * rng.integers(1, 4, d[k][:, ::7].shape)).astype(dtype)
    check_all(case, N2, per_rank=False)


def test_subnormal_eps(rng):
    """eps = 1e-45 rounds to the float32 subnormal 2**-149; an all-zero token then has
    inv = 1/sqrt(0 + 2**-149) (finite) and norm_out 0, not 0 * inf = NaN."""
    case = gen_case(rng, N2, dtype=F32, M=3, H=32, dense=True, eps=1e-45)
    for d in case.groups[0]["ranks"]:
        d["x"][0] = 0.0
    case.groups[0]["residual"][0] = 0.0
    check_all(case, N2, per_rank=False)


# ------------------------------------------------------------------ extremes and edges

@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_overflow_to_inf(rng, dtype):
    """Finalize and rank sums that overflow T (and float32) give ±Inf as rT says; the
    largest finite plus a little rounds to Inf or back exactly at the RNE threshold."""
    big = {F16: 3e4, BF16: 1e38, F32: 1e38}[np.dtype(dtype)]
    case = gen_case(rng, N4, dtype=dtype, M=8, H=64, K=4, scales="f32", rsf=4.0,
                    quant=Q.fp8_per_token(), outputs=("residual", "norm", "quant"))
    for d in case.groups[0]["ranks"]:
        d["expert_out"] = (d["expert_out"].astype(np.float32) * np.float32(big)).astype(dtype)
    check_all(case, N4, per_rank=False)
    case = gen_case(rng, N2, dtype=dtype, M=4, H=16, dense=True)
    mx = float(ml_dtypes.finfo(dtype).max)
    x0, x1 = case.groups[0]["ranks"][0]["x"], case.groups[0]["ranks"][1]["x"]
    x0[:] = np.array(mx, np.float64).astype(dtype)
    eps_t = float(ml_dtypes.finfo(dtype).eps)
    x1[:] = np.array([[mx * eps_t / 4], [mx * eps_t / 8], [-mx * eps_t], [mx * eps_t]],
                     np.float64).astype(dtype)            # half-ulp tie, below, down, up
    case.groups[0]["residual"][:] = 0
    check_all(case, N2, per_rank=False)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_norm_weight_special_values(rng, dtype):
    case = gen_case(rng, N2, dtype=dtype, M=6, H=64, nw_dtype="T",
                    quant=Q.nvfp4(500.0, "linear"), outputs=("residual", "norm", "quant"))
    case.norm_weight[[3, 17, 40, 41]] = np.array([np.nan, np.inf, -0.0, -np.inf]).astype(dtype)
    check_all(case, N2, per_rank=False)


@pytest.mark.parametrize("quant", [
    Q.fp8_static(0.0), Q.fp8_static(float("inf")), Q.fp8_static(-0.05),
    Q.fp8_static(float("nan")), Q.nvfp4(0.0), Q.nvfp4(-500.0), Q.nvfp4(1e-30, "linear"),
], ids=lambda q: f"{q.id}_{q.scale_value}")
def test_degenerate_quant_scales(rng, quant):
    """Scales that no sane caller passes still follow SPEC §3's formulas bit for bit.
    (Not NvFp4 with g = Inf/NaN: q_in * os is then NaN for finite q_in, and SPEC does
    not define e2m1(NaN) outside blocks holding NaN/Inf — the oracle (ml_dtypes) gives
    ±0, the package ±6.)"""
    case = gen_case(rng, N2, dtype=BF16, M=6, H=64, quant=quant,
                    outputs=("residual", "norm", "quant"))
    check_all(case, N2, per_rank=False)


def test_realistic_layer_size(rng):
    """Kimi/DeepSeek-like shapes: H = 7168, K = 8, 32 tokens, 8 ranks."""
    case = gen_case(rng, N8, dtype=BF16, M=32, H=7168, K=8, scales="f32", shared=True,
                    rsf=2.827, quant=Q.fp8_per_group(128, True, "col"),
                    outputs=("residual", "norm", "quant"))
    check_all(case, N8, per_rank=False)
    case = gen_case(rng, N4, dtype=BF16, M=20, H=7168, K=8, scales="f32", shared=True,
                    rsf=2.5, quant=Q.nvfp4(448.0 * 6 / 4), outputs=("residual", "norm", "quant"))
    check_all(case, N4, per_rank=False)


def _random_config(rng):
    meshes = MESH_CASES + EXTRA_MESHES
    mc = meshes[int(rng.integers(len(meshes)))]
    dtype = DTYPES[int(rng.integers(3))]
    H = int(rng.choice([16, 32, 48, 64, 144, 256]))
    M = int(rng.choice([0, 1, 2, 5, 16, 33, 130]))
    dense = bool(rng.random() < 0.3)
    qi = int(rng.integers(0, 6))
    if qi == 0:
        quant = None
    elif qi == 1:
        quant = Q.fp8_static(float(rng.choice([0.003, 0.01, 0.05])))
    elif qi == 2:
        quant = Q.fp8_per_token()
    elif qi == 3:
        gs = int(rng.choice([d for d in range(16, H + 1, 16) if H % d == 0]))
        quant = Q.fp8_per_group(gs, bool(rng.random() < 0.5), str(rng.choice(["row", "col"])))
    else:
        quant = Q.nvfp4(float(rng.uniform(100, 2000)),
                        str(rng.choice(["linear", "swizzled_128x4"])))
    names = ["residual", "norm"] + (["quant"] if quant is not None else [])
    pick = [n for n in names if rng.random() < 0.6] or [names[-1]]
    outputs = None if rng.random() < 0.3 else tuple(pick)
    kw = dict(dtype=dtype, M=M, H=H, K=int(rng.integers(1, 9)), dense=dense, quant=quant,
              outputs=outputs, scales=[None, "f32", "T"][int(rng.integers(3))],
              shared=bool(rng.random() < 0.5), rsf=float(rng.choice([1.0, 2.5, 2.827, -0.5])),
              eps=float(rng.choice([1e-6, 1e-5, 1e-2])),
              offset=float(rng.choice([0.0, 1.0])), nw_dtype=str(rng.choice(["T", "f32"])),
              oob=bool(rng.random() < 0.5), specials=int(rng.choice([0, 0, 3])),
              subnormals=False, zero_rows=bool(rng.random() < 0.2))
    return mc, kw


@pytest.mark.parametrize("i", range(24))
def test_random_configurations(rng, i):
    """Random mixes of every parameter above (no subnormals: see test_subnormals)."""
    mc, kw = _random_config(rng)
    case = gen_case(rng, mc, **kw)
    check_all(case, mc, per_rank=bool(i % 3 == 0))


# -------------------------------------------------------------- ranks and determinism

@pytest.mark.parametrize("mc", [N8, N4_DP2_TP2, N8_TUPLE], ids=mesh_id)
def test_ranks_identical_without_vma_check(rng, mc):
    """Each device's own copy (out_specs P(all axes), check_vma=False) is bit-identical
    across the group."""
    case = gen_case(rng, mc, dtype=F32, M=9, H=64, K=4, scales="f32", shared=True, rsf=1.3,
                    quant=Q.nvfp4(800.0), outputs=("residual", "norm", "quant"))
    for g, ranks in enumerate(run_case(case, mc, platform=PLATFORM, per_rank=True,
                                       check_vma=False)):
        assert_ranks_identical(ranks, f"group {g}")
        check_against_oracle(ranks[0], case, g)


def test_repeat_calls_deterministic(rng):
    from cases import build
    case = gen_case(rng, N4, dtype=F32, M=17, H=64, K=4, scales="f32", shared=True,
                    quant=Q.fp8_per_token(), outputs=("residual", "norm", "quant"))
    f, args = build(case, N4, make_mesh(PLATFORM, N4))
    a = [np.asarray(x) for x in f(*args) if x is not None]
    b = [np.asarray(x) for x in f(*args) if x is not None]
    for x, y in zip(a, b):
        assert_same_bits(x, y, "repeat", nan_equal=False)


def test_invariant_outputs_compose_with_psum_free_code(rng):
    """Outputs are typed invariant along the axis (like lax.psum's): usable with
    out_specs=P() under check_vma=True, and further replicated computation typechecks."""
    mesh = make_mesh(PLATFORM, N4)
    case = gen_case(rng, N4, dtype=F32, M=4, H=32, dense=True)

    def body(x, r, g):
        out = mar.allreduce_rmsnorm(x, r, g, axis_name="tp")
        return out.residual + r, out.norm * 2

    f = sharded(body, mesh, (PS("tp"), PS(), PS()), (PS(), PS()), check_vma=True)
    x = np.concatenate([d["x"] for d in case.groups[0]["ranks"]])
    r, n = f(x, case.groups[0]["residual"], case.norm_weight)
    ref = oracle_outputs(case)
    assert_same_bits(np.asarray(r), ref["residual"] + case.groups[0]["residual"], "res + r")
    assert_norm_agrees(np.asarray(n) / np.float32(2), ref["norm"])


def test_chained_layers(rng):
    """Two layers in one program (layer 2's residual is layer 1's residual_out), as in a
    model: each exact against the oracle applied in turn."""
    mesh = make_mesh(PLATFORM, N4)
    c1 = gen_case(rng, N4, dtype=BF16, M=7, H=64, K=4, scales="f32", shared=True, rsf=2.5)
    c2 = gen_case(rng, N4, dtype=BF16, M=7, H=64, dense=True, quant=Q.fp8_per_group(32),
                  outputs=("residual", "norm", "quant"))
    r1 = c1.groups[0]["ranks"]
    stack = lambda k, rs: np.concatenate([d[k] for d in rs])  # noqa: E731

    def body(eo, idx, sc, sh, x, res, g1, g2):
        o1 = mar.moe_finalize_allreduce(eo, idx, res, g1, axis_name="tp", expert_scales=sc,
                                        shared_expert_out=sh, routed_scaling_factor=2.5)
        o2 = mar.allreduce_rmsnorm(x, o1.residual, g2, axis_name="tp",
                                   quant=mar.Fp8PerGroup(32), outputs=("residual", "norm", "quant"))
        return o1, o2

    f = sharded(body, mesh, (PS("tp"),) * 5 + (PS(),) * 3, PS())
    o1, o2 = f(stack("expert_out", r1), stack("permuted_idx", r1), stack("expert_scales", r1),
               stack("shared_expert_out", r1), stack("x", c2.groups[0]["ranks"]),
               c1.groups[0]["residual"], c1.norm_weight, c2.norm_weight)
    def as_dict(o):
        return {k: (None if getattr(o, k) is None else np.asarray(getattr(o, k)))
                for k in ("residual", "norm", "quant", "scale")}
    ref1 = check_against_oracle(as_dict(o1), c1)
    c2.groups[0]["residual"] = ref1["residual"]
    check_against_oracle(as_dict(o2), c2)


def test_partial_manual_shard_map(rng):
    """Bound axis inside a shard_map that is manual over "tp" only ("dp" left to XLA):
    tokens sharded over dp automatically, still exact."""
    from jax.sharding import NamedSharding
    mesh = make_mesh(PLATFORM, N4_DP2_TP2)
    case = gen_case(rng, N2, dtype=F32, M=12, H=32, dense=True, quant=Q.fp8_per_token(),
                    outputs=("residual", "norm", "quant"))

    def body(x, r, g):
        return mar.allreduce_rmsnorm(x[0], r, g, axis_name="tp", quant=mar.Fp8PerToken(),
                                     outputs=("residual", "norm", "quant"))

    import jax
    f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(PS("tp"), PS(), PS()), out_specs=PS(),
                              axis_names={"tp"}))
    xs = np.stack([d["x"] for d in case.groups[0]["ranks"]])          # [tp, M, H]
    out = f(jax.device_put(xs, NamedSharding(mesh, PS("tp", "dp"))),
            jax.device_put(case.groups[0]["residual"], NamedSharding(mesh, PS("dp"))),
            case.norm_weight)
    check_against_oracle({k: np.asarray(getattr(out, k)) for k in ("residual", "norm", "quant",
                                                                    "scale")}, case)


# -------------------------------------------------------------------- the checker itself

def test_checker_rejects_wrong_results(rng):
    """check_against_oracle is not vacuous: 1-bit residual flips, 2-ulp norms, code and
    scale flips fail; a single 1-ulp norm among many and NVFP4 codes of NaN blocks pass."""
    case = gen_case(rng, N2, dtype=BF16, M=64, H=64, quant=Q.nvfp4(600.0, "linear"),
                    outputs=("residual", "norm", "quant"))
    ref = oracle_outputs(case)
    good = {k: (None if v is None else v.copy()) for k, v in ref.items()}
    check_against_oracle(good, case, ref=ref)

    def expect_fail(mutate):
        o = {k: (None if v is None else v.copy()) for k, v in ref.items()}
        mutate(o)
        with pytest.raises(AssertionError):
            check_against_oracle(o, case, ref=ref)

    def flip(name, i, by=1):
        def m(o):
            b = bits(o[name])
            b.reshape(-1)[i] ^= by
        return m

    expect_fail(flip("residual", 5))
    expect_fail(flip("norm", 7, 2))                               # 2..3 ulp away
    expect_fail(flip("quant", 3, 0x10))
    expect_fail(flip("scale", 1))
    expect_fail(lambda o: o.__setitem__("norm", None))

    one = {k: (None if v is None else v.copy()) for k, v in ref.items()}
    b = bits(one["norm"]).reshape(-1)
    b[0] += 1                                                     # 1 ulp, 1 of 4096
    codes, sf = oracle.quantize(one["norm"], "nvfp4", **case.quant.oracle_params())
    one["quant"], one["scale"] = codes, sf
    check_against_oracle(one, case, ref=ref)

    nan = {k: (None if v is None else v.copy()) for k, v in ref.items()}
    nan["norm"][3, 17] = np.nan
    codes, sf = oracle.quantize(nan["norm"], "nvfp4", **case.quant.oracle_params())
    nan["quant"], nan["scale"] = codes, sf
    nan["quant"][3, 8:16] ^= 0x77                                 # block 1 of row 3: masked
    with pytest.raises(AssertionError):                           # norm NaN where oracle isn't
        check_against_oracle(nan, case, ref=ref)
    ref_nan = dict(ref, norm=nan["norm"])
    check_against_oracle(nan, case, ref=ref_nan)
    nan["scale"][3, 1] = ml_dtypes.float8_e4m3fn(1.0)             # its scale is checked
    with pytest.raises(AssertionError):
        check_against_oracle(nan, case, ref=ref_nan)
