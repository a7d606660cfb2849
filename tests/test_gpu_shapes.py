"""GPU tests at the edges of the kernel's shapes (marked `gpu`).

The smallest H (16: one NVFP4 block, one 16-byte vector of f32), the largest H the
kernel stages (96 KiB rows: 49152 in bf16/f16, 24576 in f32; rows wider than
a block's two-vectors-per-thread batch take several batches), K not a multiple of the
finalize's 8-slot chunk, float32 gamma with 16-bit activations, and M far beyond one
block per SM. Both algorithms, exact against the oracle, every rank identical.
"""

from __future__ import annotations

import pytest

from cases import BF16, F16, F32, GPU_MESHES, SMALL_GPU_MESHES, Q, check_every_rank, gen_case

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("mesh_case", GPU_MESHES)
@pytest.mark.parametrize("dtype", [BF16, F32])
def test_smallest_H(rng, algorithm, mesh_case, dtype):
    case = gen_case(rng, mesh_case, dtype=dtype, M=5, H=16, K=3, scales="f32",
                    shared=True, oob=True, quant=Q.nvfp4(), outputs=("residual", "norm", "quant"))
    check_every_rank(case, mesh_case, platform="gpu", algorithm=algorithm)


@pytest.mark.parametrize("mesh_case", GPU_MESHES)
@pytest.mark.parametrize("dtype,H,quant", [(BF16, 49152, Q.nvfp4()),
                                           (F16, 49152, Q.fp8_per_group(128)),
                                           (F32, 24576, Q.fp8_per_token()),
                                           (BF16, 9216, Q.fp8_per_group(128, scale_layout="col"))],
                         ids=["bf16-49152", "f16-49152", "f32-24576", "bf16-9216"])
def test_largest_H(rng, algorithm, mesh_case, dtype, H, quant):
    case = gen_case(rng, mesh_case, dtype=dtype, M=6, H=H, K=8, scales="T",
                    shared=True, oob=True, nw_dtype="f32", quant=quant,
                    outputs=("residual", "norm", "quant"))
    check_every_rank(case, mesh_case, platform="gpu", algorithm=algorithm)


@pytest.mark.parametrize("mesh_case", SMALL_GPU_MESHES)
@pytest.mark.parametrize("K", [1, 9, 13, 17])
def test_K_not_a_multiple_of_the_chunk(rng, algorithm, mesh_case, K):
    case = gen_case(rng, mesh_case, dtype=BF16, M=33, H=1024, K=K, scales="f32",
                    shared=True, rsf=2.5, oob=True, nw_dtype="f32")
    check_every_rank(case, mesh_case, platform="gpu", algorithm=algorithm)


@pytest.mark.parametrize("mesh_case", GPU_MESHES)
def test_many_rows_per_block(rng, algorithm, mesh_case):
    """M = 2500 rows on at most one block per SM: every block walks many rows and
    pushes many vectors; gamma in float32 against bf16 activations."""
    case = gen_case(rng, mesh_case, dtype=BF16, M=2500, H=2048, K=8, scales="f32",
                    shared=True, oob=True, nw_dtype="f32", quant=Q.fp8_per_token(),
                    outputs=("residual", "norm", "quant"))
    check_every_rank(case, mesh_case, platform="gpu", algorithm=algorithm)


# The many-rows geometry (a row per block, 2 or 4 vectors per thread: M >= 128 and H/V > 256)
# with what the other many-rows tests leave out: K beyond one 8-slot chunk with bf16 router
# weights and no shared expert, float32 rows without weights, K = 1 with the staged per-group
# quantizer (group 96), and the dense variant.
@pytest.mark.parametrize("mesh_case", GPU_MESHES)
@pytest.mark.parametrize(
    "dtype,H,K,scales,shared,dense,quant",
    [(BF16, 7168, 9, "T", False, False, Q.nvfp4()),
     (F32, 2048, 8, None, True, False, Q.fp8_per_token()),
     (F16, 4608, 1, "f32", True, False, Q.fp8_per_group(96)),
     (BF16, 4096, 8, None, False, True, Q.fp8_static())],
    ids=["bf16-7168-K9-noshared", "f32-2048-unweighted", "f16-4608-K1-staged", "bf16-4096-dense"])
def test_many_rows_geometry_variants(rng, algorithm, mesh_case, dtype, H, K, scales, shared,
                                     dense, quant):
    case = gen_case(rng, mesh_case, dtype=dtype, M=300, H=H, K=K, scales=scales, shared=shared,
                    dense=dense, oob=not dense, nw_dtype="f32", quant=quant,
                    outputs=("residual", "norm", "quant"))
    check_every_rank(case, mesh_case, platform="gpu", algorithm=algorithm)
