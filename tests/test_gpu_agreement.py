"""GPU results against the oracle, for each fused algorithm (marked `gpu`).

Every SPEC §3 agreement row on 1, 2 and 4 GPUs: without quantization and with every
quant format, scale group sizes, default outputs with a traced scale, the dense variant,
special values, two groups and a group of one; and two-shot's gather of only the asked
outputs. Every rank's outputs are bit-identical.
Run on a multi-GPU machine: `pytest -m gpu tests/test_gpu_agreement.py`.
"""

from __future__ import annotations

import pytest

import jax_moe_ar as mar
from jax_moe_ar.testing import N1, N4, N4_DP2_TP2, make_mesh

from cases import (ALL_QUANTS, BF16, DTYPES, F16, F32, GPU_MESHES, H_REAL, SMALL_GPU_MESHES, Q,
                   build, check_against_oracle, check_every_rank, dtype_id, gen_case, run_case)

pytestmark = pytest.mark.gpu

# Each algorithm keeps its own M sweep: two-shot's has M below the rank count and M not
# a multiple of it (its rows are owned in chunks of ceil(M / ranks)).
AGREEMENT_M = {"oneshot": (1, 7, 128, 300, 1501), "twoshot": (1, 3, 129, 1000, 4096)}

# With quantization: (M, dtype, shared expert, norm weight dtype) per algorithm.
AGREEMENT_QUANT = {
    "oneshot": [(1, F32, False, "f32"), (7, F32, True, "f32"), (128, BF16, True, "f32"),
                (300, BF16, True, "f32"), (1501, F32, True, "f32")],
    "twoshot": [(7, F16, True, "T"), (129, BF16, True, "T"), (1000, F16, True, "T")],
}


def _fused_target_in_hlo(case, mesh_case, algorithm):
    f, args = build(case, mesh_case, make_mesh("gpu", mesh_case), algorithm=algorithm)
    return "jax_moe_ar_fused_v1" in f.lower(*args).as_text()


@pytest.mark.parametrize("mesh_case", GPU_MESHES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("algorithm,M", [pytest.param(a, M, id=f"{a}-M{M}")
                                         for a, Ms in AGREEMENT_M.items() for M in Ms])
def test_agreement_no_quant(rng, algorithm, M, dtype, mesh_case):
    # the real hidden size for decode-sized M; 1024 keeps the large-M cases quick
    case = gen_case(rng, mesh_case, dtype=dtype, M=M, H=H_REAL if M <= 129 else 1024, K=8,
                    scales="f32", shared=True, rsf=2.5, oob=True,
                    outputs=("residual", "norm"))
    assert _fused_target_in_hlo(case, mesh_case, algorithm)
    check_every_rank(case, mesh_case, platform="gpu", algorithm=algorithm)


@pytest.mark.parametrize("mesh_case", GPU_MESHES)
@pytest.mark.parametrize("quant", ALL_QUANTS)
@pytest.mark.parametrize("algorithm,M,dtype,shared,nw_dtype", [
    pytest.param(a, M, dt, sh, nw, id=f"{a}-M{M}-{dtype_id(dt)}")
    for a, rows in AGREEMENT_QUANT.items() for M, dt, sh, nw in rows])
def test_agreement_quant(rng, algorithm, M, dtype, shared, nw_dtype, quant, mesh_case):
    case = gen_case(rng, mesh_case, dtype=dtype, M=M, H=1024, K=8, scales="T", shared=shared,
                    quant=quant, outputs=("residual", "norm", "quant"), nw_dtype=nw_dtype)
    check_every_rank(case, mesh_case, platform="gpu", algorithm=algorithm)


@pytest.mark.parametrize("mesh_case", SMALL_GPU_MESHES)
@pytest.mark.parametrize("dtype", [BF16, F32])
@pytest.mark.parametrize("gs", [8, 48, 256, 512])
def test_per_group_sizes(rng, algorithm, mesh_case, dtype, gs):
    """Scale groups that fall on 1 to 32 lanes of a warp are quantized inside the norm
    loop; the others (48, and 512 or 256 with float32) from the staged row. Both agree
    with the oracle."""
    case = gen_case(rng, mesh_case, dtype=dtype, M=37, H=1536, K=8, scales="f32", shared=True,
                    quant=Q.fp8_per_group(gs, ue8m0=gs == 48),
                    outputs=("residual", "norm", "quant"))
    check_every_rank(case, mesh_case, platform="gpu", algorithm=algorithm)


@pytest.mark.parametrize("quant", [None, Q.fp8_per_token(), Q.nvfp4()],
                         ids=lambda q: "none" if q is None else q.id)
def test_default_outputs_and_traced_scale(rng, algorithm, quant):
    case = gen_case(rng, N4, dtype=BF16, M=33, H=H_REAL, K=8, scales="f32", quant=quant)
    out = run_case(case, N4, platform="gpu", algorithm=algorithm, scale_operand=True)[0]
    check_against_oracle(out, case)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dense_variant(rng, algorithm, dtype):
    case = gen_case(rng, N4, dtype=dtype, M=19, H=2048, dense=True, offset=1.0,
                    quant=Q.fp8_per_group(128, ue8m0=True, scale_layout="col"),
                    outputs=("residual", "norm", "quant"))
    check_every_rank(case, N4, platform="gpu", algorithm=algorithm)


@pytest.mark.parametrize("dtype", DTYPES)
def test_special_values_complete_and_match(rng, algorithm, dtype):
    """-0.0, negative subnormals, NaN and Inf in every input: no stall, oracle results."""
    case = gen_case(rng, N4, dtype=dtype, M=40, H=512, K=8, scales="T", shared=True,
                    specials=40, zero_rows=True, quant=Q.nvfp4(),
                    outputs=("residual", "norm", "quant"))
    check_every_rank(case, N4, platform="gpu", algorithm=algorithm)
    mar.check_errors()


def test_dense_and_special_values(rng, algorithm):
    """The dense variant over many rows with special values and NVFP4 linear scales."""
    case = gen_case(rng, N4, dtype=BF16, M=1001, H=256, dense=True, specials=60,
                    zero_rows=True, quant=Q.nvfp4(layout="linear"),
                    outputs=("residual", "norm", "quant"))
    check_every_rank(case, N4, platform="gpu", algorithm=algorithm)
    mar.check_errors()


@pytest.mark.parametrize("M,H,shared", [(64, H_REAL, True), (777, 1024, False)],
                         ids=["M64-shared", "M777"])
def test_two_groups_dp2_tp2(rng, algorithm, M, H, shared):
    case = gen_case(rng, N4_DP2_TP2, dtype=BF16, M=M, H=H, K=8, scales="f32", shared=shared,
                    quant=Q.fp8_per_token(), outputs=("residual", "norm", "quant"))
    for g, out in enumerate(run_case(case, N4_DP2_TP2, platform="gpu", algorithm=algorithm)):
        check_against_oracle(out, case, g)


def test_group_of_one(rng, algorithm):
    case = gen_case(rng, N1, dtype=BF16, M=9, H=256, K=4, quant=Q.fp8_static(0.02))
    check_against_oracle(run_case(case, N1, platform="gpu", algorithm=algorithm)[0], case)


@pytest.mark.parametrize("outputs", [("quant",), ("norm",), ("residual", "quant"),
                                     ("norm", "quant")], ids="-".join)
@pytest.mark.parametrize("quant", [Q.fp8_per_group(128, scale_layout="col"), Q.nvfp4()])
def test_twoshot_gathers_only_what_was_asked(rng, outputs, quant):
    """Two-shot's all-gather carries exactly the asked outputs; each comes back right."""
    case = gen_case(rng, N4, dtype=BF16, M=4096 + 3, H=512, K=4, quant=quant, outputs=outputs)
    check_against_oracle(run_case(case, N4, platform="gpu", algorithm="twoshot")[0], case)
