"""The exact CPU path across processes: 2 and 4 processes on localhost under
jax.distributed (gloo), 1-2 CPU devices each, bit for bit the oracle on every rank, both
public functions and every quant format; and the agreement's faults (a different program
or mesh in one process, a process that never lowers). Each process group is started once
per module and runs many cases; the checks run here, on the shards every process returned.
"""

import pytest

import mp_workers as W
from cases import ALL_QUANTS, BF16, F16, F32, Q
from jax_moe_ar.testing import (N2, N4, N4_DP2_TP2, N8, N8_TUPLE, MeshCase,
                                process_group, run_process_group)  # noqa: F401 (fixture)

TP_MAJOR = MeshCase((2, 2), ("tp", "dp"), "tp")   # reduce over the major axis
THREE_AXES = MeshCase((2, 2, 2), ("dp", "x", "y"), ("x", "y"))
ALL_OUTPUTS = ("residual", "norm", "quant")
MOE = dict(K=4, scales="f32", shared=True, rsf=2.5)

# 2 processes x 2 CPU devices: process p holds jax.devices()[2p], [2p + 1].
# N4: one group of 4 ranks, 2 per process. TP_MAJOR: two groups, each one rank per
# process. N4_DP2_TP2: two groups, each inside one process. ONE_EACH: devices 0 and 2, a
# group of one rank per process (the one-process-per-GPU layout).
ONE_EACH_2 = [0, 2]
SPECS_2x2 = (
    [W.spec(f"moe_n4_{q.id}", N4, 100 + i, M=13, H=256, quant=q, outputs=ALL_OUTPUTS, **MOE)
     for i, q in enumerate(ALL_QUANTS)]
    + [W.spec(f"dense_tpmajor_{q.id}", TP_MAJOR, 200 + i, M=9, H=256, dense=True, quant=q,
              outputs=ALL_OUTPUTS) for i, q in enumerate(ALL_QUANTS)]
    + [W.spec("moe_n4_noquant_f32", N4, 300, dtype=F32, M=13, H=144, oob=True, **MOE),
       W.spec("dense_n4_noquant_f16", N4, 301, dtype=F16, M=7, H=64, dense=True),
       W.spec("moe_tpmajor_noquant", TP_MAJOR, 302, M=11, H=128, **MOE),
       W.spec("moe_local_groups", N4_DP2_TP2, 303, M=11, H=128, **MOE),
       W.spec("moe_one_each", N2, 304, devices=ONE_EACH_2, M=13, H=256, **MOE),
       W.spec("dense_one_each_nvfp4", N2, 305, devices=ONE_EACH_2, M=7, H=128, dense=True,
              quant=Q.nvfp4(600.0, "swizzled_128x4"), outputs=ALL_OUTPUTS),
       W.spec("moe_n4_invariant_out", N4, 306, per_rank=False, M=13, H=128, **MOE),
       W.spec("moe_n4_oneshot", N4, 307, algorithm="oneshot", M=5, H=64, **MOE),
       W.spec("moe_n4_twoshot", N4, 308, algorithm="twoshot", M=5, H=64, **MOE),
       W.spec("dense_n4_traced_scale", N4, 309, scale_operand=True, M=5, H=64, dense=True,
              quant=Q.fp8_static(0.02), outputs=ALL_OUTPUTS),
       W.spec("moe_n4_specials", N4, 310, dtype=BF16, M=16, H=128, specials=6,
              zero_rows=True, **MOE)]
)

# 4 processes x 2 CPU devices: N8 (4 processes, 2 ranks each); a group named by two
# axes; three axes; one device of each process (N4: one rank per process; dp x tp: the
# groups {p0, p1} and {p2, p3}).
ONE_EACH_4 = [0, 2, 4, 6]
SPECS_4x2 = [
    W.spec("moe_n8", N8, 400, M=13, H=256, quant=Q.fp8_per_group(64), outputs=ALL_OUTPUTS,
           **MOE),
    W.spec("dense_n8_tuple", N8_TUPLE, 401, M=7, H=128, dense=True),
    W.spec("moe_three_axes", THREE_AXES, 402, M=9, H=128, quant=Q.nvfp4(448.0, "linear"),
           outputs=ALL_OUTPUTS, **MOE),
    W.spec("moe_one_each_n4", N4, 403, devices=ONE_EACH_4, M=13, H=256, **MOE),
    W.spec("dense_one_each_n4_pertoken", N4, 404, devices=ONE_EACH_4, M=7, H=128,
           dense=True, quant=Q.fp8_per_token(), outputs=ALL_OUTPUTS),
    W.spec("moe_one_each_dp2_tp2", N4_DP2_TP2, 405, devices=ONE_EACH_4, M=11, H=128,
           quant=Q.fp8_per_group(32, ue8m0=True, scale_layout="col"), outputs=ALL_OUTPUTS,
           **MOE),
]


def _ids(specs):
    return [s[0] for s in specs]


# After the matrix, the same two processes run the fault sequence on a group of one
# device of each (mp_workers.fault_sequence).
GOOD = W.spec("moe_one_each_faults", N2, 500, devices=ONE_EACH_2, M=8, H=64, **MOE)


@pytest.fixture(scope="module")
def run_2x2():
    return run_process_group(W.specs_then_faults, 2, args=(SPECS_2x2, GOOD, 1),
                             devices_per_process=2, timeout_s=300)


@pytest.fixture(scope="module")
def results_2x2(run_2x2):
    return [r["specs"] for r in run_2x2]


@pytest.fixture(scope="module")
def faults(run_2x2):
    return [r["faults"] for r in run_2x2]


@pytest.fixture(scope="module")
def results_4x2():
    return run_process_group(W.run_specs, 4, args=(SPECS_4x2,), devices_per_process=2,
                             timeout_s=300)


@pytest.mark.parametrize("spec", SPECS_2x2, ids=_ids(SPECS_2x2))
def test_two_processes_exact(results_2x2, spec):
    W.check_spec(results_2x2, spec)


@pytest.mark.parametrize("spec", SPECS_4x2, ids=_ids(SPECS_4x2))
def test_four_processes_exact(results_4x2, spec):
    W.check_spec(results_4x2, spec)


def test_every_quant_format_and_function_covered():
    """The matrix above holds both functions with every quant format across processes."""
    for prefix in ("moe_n4_", "dense_tpmajor_"):
        assert {s[2].get("quant") for s in SPECS_2x2 if s[0].startswith(prefix)} \
            >= set(ALL_QUANTS)


def test_faults_good_calls_before_and_after_are_exact(faults):
    W.check_spec([r["first"] for r in faults], GOOD)
    again = (GOOD[0] + "_again",) + GOOD[1:]
    W.check_spec([r["again"] for r in faults], again)


def test_relowering_in_one_process_keeps_the_processes_in_step(faults):
    name, mc, gen, seed, opts = GOOD
    after = (name + "_after", mc, dict(gen, M=gen["M"] + 2), seed + 1, opts)
    W.check_spec([r["after_extra_lowering"] for r in faults], after)


def test_fault_different_shapes_in_one_process(faults):
    for p, r in enumerate(faults):
        err = r["shape_mismatch"]
        assert err is not None, f"process {p} lowered a mismatched call without an error"
        assert "lowered different jax_moe_ar calls" in err
        assert "(9, 64)" in err and "(10, 64)" in err, err  # the residual shapes differ


def test_fault_different_mesh_in_one_process(faults):
    for p, r in enumerate(faults):
        err = r["mesh_mismatch"]
        assert err is not None, f"process {p} lowered over another mesh without an error"
        assert "lowered different jax_moe_ar calls" in err and "mesh_devices" in err, err


def test_fault_process_that_never_lowers(faults):
    err = faults[0]["timeout"]
    assert err is not None
    assert "waited 3 s" in err and "process 1" in err and "JAX_MOE_AR_KV_TIMEOUT_S" in err, err
    assert faults[1]["timeout"] is None


def test_process_group_reports_failures(process_group):
    """A failed process is reported by number with its traceback; the others' values
    still come back."""
    from jax_moe_ar.testing import ProcessGroupError, check_results
    res = process_group(W.fail_in, 2, args=(1,), timeout_s=60, check=False)
    assert res[0].ok and res[0].value == 0
    assert not res[1].ok and "ZeroDivisionError" in res[1].error
    with pytest.raises(ProcessGroupError, match=r"process 1 of 2(.|\n)*ZeroDivisionError"):
        check_results(res)


# ---- the CUDA bootstrap's decisions (mp_workers.bootstrap_scenarios) ---------------------

@pytest.fixture(scope="module")
def boot(run_2x2):
    return [r["bootstrap"] for r in run_2x2]


def _handles(process, ordinal):
    return (bytes([process, ordinal]) * 64).hex()


def test_bootstrap_two_processes_one_gpu_each(boot):
    for me, b in enumerate(boot):
        (ws, reason), calls = b["one_gpu_each"]
        own = 1000 * (me + 1) + 1
        assert (ws, reason) == (own, "")
        peer = 1 - me
        expect_peers = [None, None]
        expect_peers[me] = (0, "", -1)
        expect_peers[peer] = (-1, _handles(peer, 0), -1)  # the peer's GPU is not visible here
        assert calls == [("create", own, [(0, 0, me, 2)], 1 << 21),
                         ("attach", own, [expect_peers], [131]),  # min of 132 and 131
                         ("commit", own)]
        # A smaller call reuses the workspace: only the agreement round, no native call.
        assert b["reuse"] == ((own, ""), [])


def test_bootstrap_one_gpu_shared_by_two_processes(boot):
    for me, b in enumerate(boot):
        (ws, reason), calls = b["shared_gpu"]
        assert reason == "" and ws is not None
        attach = [c for c in calls if c[0] == "attach"]
        assert len(attach) == 1
        _, _, peers, sms = attach[0]
        assert sms == [65]  # both ranks on one GPU: 132 // 2, minus the process number
        assert peers[0][1 - me] == (-1, _handles(1 - me, 0), 0)  # same GPU: ordinal 0 here


def test_bootstrap_two_by_two_groups_across_processes(boot):
    for me, b in enumerate(boot):
        (ws, reason), calls = b["two_by_two"]
        assert reason == ""
        create, attach, commit = calls
        assert create[2] == [(0, 0, me, 2), (1, 1, me, 2)]  # one rank of each group here
        peers = attach[2]
        for g in range(2):
            assert peers[g][me] == (g, "", -1)
            assert peers[g][1 - me] == (-1, _handles(1 - me, g), -1)
        assert commit == ("commit", ws)


def test_bootstrap_group_with_local_and_remote_peers(boot):
    for me, b in enumerate(boot):
        (ws, reason), calls = b["four_ranks"]
        assert reason == ""
        create, attach, _ = calls
        assert create[2] == [(0, 0, 2 * me, 4), (1, 0, 2 * me + 1, 4)]
        other = 1 - me
        for local in range(2):
            row = attach[2][local]
            assert row[2 * me] == (0, "", -1) and row[2 * me + 1] == (1, "", -1)
            assert row[2 * other] == (-1, _handles(other, 0), -1)
            assert row[2 * other + 1] == (-1, _handles(other, 1), -1)
        assert attach[3] == [131, 131]


def test_bootstrap_refusals_are_the_same_everywhere(boot):
    hosts = {b["two_hosts"][0] for b in boot}
    assert len(hosts) == 1
    (ws, reason), = hosts
    assert ws is None and "several hosts (node0, node1)" in reason
    assert all(b["two_hosts"][1] == [] for b in boot)  # nothing allocated

    assert {b["local_reason"][0] for b in boot} == {
        (None, "process 0: GPU 0 has compute capability 8.0")}
    assert all(b["local_reason"][1] == [] for b in boot)

    assert {b["attach_fails"][0] for b in boot} == {
        (None, "process 1: GPU 0 cannot access GPU 1's memory (no peer access)")}
    for me, b in enumerate(boot):
        kinds = [c[0] for c in b["attach_fails"][1]]
        assert kinds == ["create", "attach", "discard"], kinds  # never committed


def test_reset_is_collective_across_processes(run_2x2):
    """With workspaces shared across processes, reset_workspaces() waits for the
    process's GPUs, meets every peer, clears, and meets them again; alone, it stops at
    the first meeting with an error naming it, without clearing anything."""
    for r in run_2x2:
        assert r["reset_together"] == (("ok", None), [("synchronize_all",), ("reset_all",)])
    outcome, calls = run_2x2[0]["reset_alone"]
    assert outcome[0] == "error" and "reset_workspaces() (before)" in outcome[1], outcome
    assert calls == [("synchronize_all",)]
    assert run_2x2[1]["reset_alone"] == (("skipped", None), [])
