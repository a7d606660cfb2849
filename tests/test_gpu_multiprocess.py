"""GPU tests of groups that span processes, runnable on ONE GPU: 2 and 4 processes under
jax.distributed, each driving GPU 0 (local_device_ids=[0]), form real 2- and 4-rank
groups whose exchange buffers are opened through CUDA IPC (marked `gpu`; skipped without
CUDA GPUs). Results are compared with the oracle, not with "xla": lax.psum across two
processes on one GPU fails in NCCL. Faults: a peer that stops calling, a peer that exits,
a reset after a fault, a mismatched program, a key-value timeout, a group over two hosts.

    XLA_PYTHON_CLIENT_PREALLOCATE=false pytest -m gpu tests/test_gpu_multiprocess.py
"""

import pytest

import mp_workers as W
from cases import ALL_QUANTS, BF16, F16, F32, Q, require_gpus
from jax_moe_ar.testing import N2, N4, N4_DP2_TP2, run_process_group

pytestmark = pytest.mark.gpu

ALL_OUTPUTS = ("residual", "norm", "quant")
MOE = dict(K=8, scales="f32", shared=True, rsf=2.5)
H = 7168


def _on_gpu0(n):
    return dict(platform="gpu", gpu_ids=[[0]] * n, timeout_s=540)


# Two processes sharing GPU 0: one rank each.
SPECS_2 = (
    [W.spec(f"moe_{q.id}", N2, 600 + i, M=7, H=1024, quant=q, outputs=ALL_OUTPUTS,
            algorithm="oneshot", expect_fused=True, **MOE) for i, q in enumerate(ALL_QUANTS)]
    + [W.spec(f"dense_{q.id}", N2, 620 + i, M=33, H=2048, dense=True, quant=q,
              outputs=ALL_OUTPUTS, algorithm="twoshot", expect_fused=True)
       for i, q in enumerate(ALL_QUANTS)]
    + [W.spec(f"moe_{dt.name}_M{M}_{algo}", N2, 640 + 7 * M + k, dtype=dt, M=M,
              H=H if M <= 128 else 1024, oob=True, algorithm=algo, expect_fused=True, **MOE)
       for k, (dt, M, algo) in enumerate([(BF16, 1, "oneshot"), (F16, 128, "oneshot"),
                                          (F32, 300, "twoshot"), (BF16, 1501, "twoshot"),
                                          (BF16, 64, "auto")])]
    + [W.spec("moe_specials", N2, 660, M=40, H=512, specials=40, zero_rows=True,
              quant=Q.nvfp4(), outputs=ALL_OUTPUTS, algorithm="oneshot", expect_fused=True,
              **MOE),
       W.spec("dense_invariant_out", N2, 661, per_rank=False, M=19, H=H, dense=True,
              algorithm="auto", expect_fused=True)]
)

# Four processes sharing GPU 0: a 4-rank group, and two 2-rank groups (dp x tp).
SPECS_4 = [
    W.spec("moe_n4_M1", N4, 700, M=1, H=H, algorithm="oneshot", expect_fused=True, **MOE),
    W.spec("moe_n4_M128_nvfp4", N4, 701, M=128, H=H, quant=Q.nvfp4(), outputs=ALL_OUTPUTS,
           algorithm="oneshot", expect_fused=True, **MOE),
    W.spec("moe_n4_M300_twoshot", N4, 702, M=300, H=1024, quant=Q.fp8_per_token(),
           outputs=ALL_OUTPUTS, algorithm="twoshot", expect_fused=True, **MOE),
    W.spec("dense_n4_pergroup", N4, 703, M=19, H=2048, dense=True,
           quant=Q.fp8_per_group(128, ue8m0=True, scale_layout="col"), outputs=ALL_OUTPUTS,
           algorithm="auto", expect_fused=True),
    W.spec("moe_dp2_tp2", N4_DP2_TP2, 704, M=13, H=H, quant=Q.fp8_static(0.02),
           outputs=ALL_OUTPUTS, algorithm="oneshot", expect_fused=True, **MOE),
]


def _ids(specs):
    return [s[0] for s in specs]


@pytest.fixture(scope="module")
def results_2():
    require_gpus(1)
    return run_process_group(W.run_specs, 2, args=(SPECS_2, "gpu"), **_on_gpu0(2))


@pytest.fixture(scope="module")
def results_4():
    require_gpus(1)
    return run_process_group(W.run_specs, 4, args=(SPECS_4, "gpu"), **_on_gpu0(4))


@pytest.mark.parametrize("spec", SPECS_2, ids=_ids(SPECS_2))
def test_two_processes_on_one_gpu(results_2, spec):
    W.check_spec(results_2, spec)


@pytest.mark.parametrize("spec", SPECS_4, ids=_ids(SPECS_4))
def test_four_processes_on_one_gpu(results_4, spec):
    W.check_spec(results_4, spec)


GOOD = W.spec("moe_fault", N2, 800, M=8, H=1024, algorithm="oneshot", expect_fused=True, **MOE)


def test_peer_stops_then_reset_reuses_the_mapped_buffers():
    require_gpus(1)
    res = run_process_group(W.peer_stops_then_reset, 2, args=(GOOD, 1),
                            env={"JAX_MOE_AR_TIMEOUT_S": "2"}, **_on_gpu0(2))
    W.check_spec([r["first"] for r in res], GOOD)
    survivor = res[0]
    assert survivor["stalled_all_nan"], "a call whose peer never came must give NaN"
    kind, msg = survivor["check_errors"]
    assert kind == "error" and "jax_moe_ar_fused_v1" in msg and "waited" in msg, msg
    kind, msg = survivor["next_call"]
    assert kind == "error" and "jax_moe_ar_fused_v1" in msg, msg
    W.check_spec([r["after_reset"] for r in res], GOOD)
    assert all(r["check_errors_after"] == ("ok", None) for r in res)


def test_peer_process_exits():
    require_gpus(1)
    res = run_process_group(W.peer_exits, 2, args=(GOOD, 1), check=False, grace_s=120,
                            env={"JAX_MOE_AR_TIMEOUT_S": "2"}, **_on_gpu0(2))
    assert res[1].returncode == 3
    assert res[0].ok, res[0].error + res[0].output[-3000:]
    survivor = res[0].value
    assert survivor["stalled_all_nan"]
    assert survivor["elapsed_s"] < 30
    kind, msg = survivor["check_errors"]
    assert kind == "error" and "jax_moe_ar_fused_v1" in msg, msg


def test_mismatch_and_kv_timeout_on_gpu():
    require_gpus(1)
    res = run_process_group(W.fault_sequence, 2, args=(GOOD, 1, "gpu"), **_on_gpu0(2))
    W.check_spec([r["first"] for r in res], GOOD)
    W.check_spec([r["again"] for r in res], (GOOD[0] + "_again",) + GOOD[1:])
    for r in res:
        assert "lowered different jax_moe_ar calls" in (r["shape_mismatch"] or "")
        assert "mesh_devices" in (r["mesh_mismatch"] or "")
    assert "JAX_MOE_AR_KV_TIMEOUT_S" in (res[0]["timeout"] or "")


def test_group_over_two_hosts_falls_back_with_one_warning():
    require_gpus(1)
    good = W.spec("moe_hosts", N2, 801, M=8, H=1024, **MOE)
    res = run_process_group(W.lower_with_other_host, 2, args=(good, 1), **_on_gpu0(2))
    for r in res:
        assert not r["fused"]
        assert len(r["warnings"]) == 1, r["warnings"]
        assert "several hosts" in r["warnings"][0] and "elsewhere" in r["warnings"][0]
