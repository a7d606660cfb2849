"""Reduce-scatter variants on GPUs (marked `gpu`): what `algorithm="auto"` serves today
(the lax.psum_scatter composition, within tolerance) and, once
primitives.FUSED_SCATTER_KERNEL is on, the fused kernel exact against the oracle and row
for row against the fused all-reduce; the handler's refusal of the SCATTER flag while the
kernel is not built."""

import numpy as np
import pytest

from cases import ALL_QUANTS, BF16, F32, Q, dtype_id, gen_case, seed_for
from jax_moe_ar import primitives
from jax_moe_ar.testing import N1, N2, N4
from test_reduce_scatter import check_scatter, check_scatter_close, run_scatter

pytestmark = pytest.mark.gpu


@pytest.fixture
def rng(request):
    return np.random.default_rng(seed_for(request.node.nodeid))


def _check(case, mc):
    if primitives.FUSED_SCATTER_KERNEL:
        for algorithm in ("auto", "oneshot", "twoshot"):
            check_scatter(case, mc, platform="gpu", algorithm=algorithm)
    else:
        check_scatter_close(case, mc, algorithm="auto", platform="gpu")


@pytest.mark.parametrize("mc", [N1, N2, N4], ids=lambda m: m.id)
@pytest.mark.parametrize("dense", [False, True], ids=["moe", "dense"])
@pytest.mark.parametrize("dtype", [BF16, F32], ids=dtype_id)
def test_gpu_scatter(rng, mc, dense, dtype):
    for M in (mc.group, 40 * mc.group, 1024 * mc.group):
        case = gen_case(rng, mc, dtype=dtype, M=M, H=256, K=8, dense=dense, scales="f32",
                        shared=True, rsf=2.5)
        _check(case, mc)


@pytest.mark.parametrize("quant", ALL_QUANTS, ids=lambda q: q.id)
@pytest.mark.parametrize("mc", [N2, N4], ids=lambda m: m.id)
def test_gpu_scatter_quant(rng, mc, quant):
    case = gen_case(rng, mc, dtype=BF16, M=6 * mc.group, H=512, K=4, scales="f32",
                    shared=True, quant=quant, outputs=("residual", "norm", "quant"))
    _check(case, mc)


def test_gpu_handler_refuses_scatter_flag_until_the_kernel_lands(rng, monkeypatch):
    """csrc/ffi/cuda.cc refuses the SCATTER flag with a clear error (the lowering never
    sends it while FUSED_SCATTER_KERNEL is off; forced on here)."""
    if primitives.FUSED_SCATTER_KERNEL:
        pytest.skip("the fused reduce-scatter kernel is built: test_gpu_scatter covers it")
    monkeypatch.setattr(primitives, "FUSED_SCATTER_KERNEL", True)
    case = gen_case(rng, N1, dtype=BF16, M=4, H=64, quant=Q.fp8_per_token())
    with pytest.raises(Exception, match="reduce-scatter kernel is not built yet"):
        run_scatter(case, N1, platform="gpu")
