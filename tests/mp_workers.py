"""What the processes of a multi-process test run (jax_moe_ar.testing.run_process_group):
cases of tests/cases.py over meshes that span processes, returning each process's shards
of the outputs, which the test assembles and checks against the oracle. Nothing here
touches a jax backend at import time (jax.distributed is initialized after the import).

A spec is (name, MeshCase, gen_case keyword arguments, seed, run options); every process
generates the same case from the seed, so each holds the same global inputs.
"""

from __future__ import annotations

import os

import numpy as np

import cases

FIELDS = ("residual", "norm", "quant", "scale")


def spec(name, mc, seed, *, algorithm="auto", per_rank=True, scale_operand=False,
         devices=None, expect_fused=False, **gen):
    """A case to run: `devices` picks the mesh's devices (positions in jax.devices(), in
    mesh order; default the first mc.size), e.g. one device of each process;
    `expect_fused` checks that the program holds the fused custom call and no XLA
    collective."""
    return (name, mc, gen, seed, dict(algorithm=algorithm, per_rank=per_rank,
                                      scale_operand=scale_operand, devices=devices,
                                      expect_fused=expect_fused))


def make_case(s):
    name, mc, gen, seed, _ = s
    return cases.gen_case(np.random.default_rng(seed), mc, **gen)


def _index(idx, shape):
    return tuple(sl.indices(n)[:2] for sl, n in zip(idx, shape))


def local_shards(out) -> dict:
    """Per output field: (global shape, [(index as (start, stop) per dim, data)]) of the
    shards this process holds, or None."""
    res = {}
    for f in FIELDS:
        a = getattr(out, f)
        if a is None:
            res[f] = None
            continue
        res[f] = (tuple(a.shape), [(_index(s.index, a.shape), np.asarray(s.data))
                                   for s in a.addressable_shards])
    return res


def mesh_for(mc, devices=None, platform="cpu"):
    import jax
    from jax_moe_ar.testing import make_mesh
    if devices is None:
        return make_mesh(platform, mc)
    all_devices = jax.devices()
    grid = np.array([all_devices[i] for i in devices], dtype=object).reshape(mc.shape)
    return jax.sharding.Mesh(grid, mc.names,
                             axis_types=(jax.sharding.AxisType.Auto,) * len(mc.names))


FUSED_TARGET = "jax_moe_ar_fused_v1"
XLA_COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "collective_permute")


def program(s, platform="cpu"):
    """(jitted program, numpy arguments) of spec s."""
    name, mc, _, _, opts = s
    opts = dict(opts)
    expect_fused = opts.pop("expect_fused")
    mesh = mesh_for(mc, opts.pop("devices"), platform)
    f, args = cases.build(make_case(s), mc, mesh, **opts)
    if expect_fused:
        text = f.lower(*args).as_text()
        assert FUSED_TARGET in text, f"{name}: the program has no fused call"
        assert not any(c in text for c in XLA_COLLECTIVES), f"{name}: an XLA collective"
    return f, args


def run_specs(specs, platform="cpu"):
    """Runs each spec's case once; returns {name: local shards}."""
    out = {}
    for s in specs:
        f, args = program(s, platform)
        out[s[0]] = local_shards(f(*args))
    return out


def assemble(per_process: list, name: str) -> dict:
    """The global outputs of spec `name` from every process's shards; replicas of one
    index must be bit-identical (they are copies held by different ranks)."""
    got = {}
    for f in FIELDS:
        parts = [p[name][f] for p in per_process]
        if parts[0] is None:
            got[f] = None
            continue
        shape = parts[0][0]
        full, seen = None, None
        for _, shards in parts:
            for index, data in shards:
                if full is None:
                    full = np.zeros(shape, data.dtype)
                    seen = np.zeros(shape, bool)
                sl = tuple(slice(a, b) for a, b in index)
                if seen[sl].any():
                    assert np.array_equal(cases.bits(full[sl]), cases.bits(data)), \
                        f"{name}: {f}: two processes hold different copies of {index}"
                full[sl] = data
                seen[sl] = True
        assert seen.all(), f"{name}: {f}: no process held part of the output"
        got[f] = full
    return got


def check_spec(per_process: list, s) -> None:
    """Checks spec s against the oracle: every group, and with per_rank every rank's copy."""
    name, mc, _, _, opts = s
    case = make_case(s)
    got = assemble(per_process, name)
    n_groups = len(case.groups)
    if opts["per_rank"]:
        by_group = [[None] * case.N for _ in range(n_groups)]
        for d, (g, r) in enumerate(cases.device_layout(mc)):
            by_group[g][r] = {k: (None if v is None else v[d]) for k, v in got.items()}
        for g, ranks in enumerate(by_group):
            cases.assert_ranks_identical(ranks, f"{name} group {g}")
            cases.check_against_oracle(ranks[0], case, g)
    else:
        for g in range(n_groups):
            out = {k: (None if v is None else np.split(v, n_groups, axis=0)[g])
                   for k, v in got.items()}
            cases.check_against_oracle(out, case, g)


# ---- fault scenarios ------------------------------------------------------------------

def _error_of(specs, platform="cpu"):
    try:
        run_specs(specs, platform)
    except RuntimeError as e:
        return str(e)
    return None


def fault_sequence(good, skipper: int, platform="cpu"):
    """In order, in every process: a good call (shards returned); a new call whose M
    differs by process and one whose mesh order differs by process (each must raise the
    agreement's RuntimeError everywhere); the good call again (the processes are still in
    step); the same call lowered once more by process 0 alone, then a new call (still in
    step); then, with the key-value waits bounded at 3 s, every process but `skipper`
    lowers a call that `skipper` never lowers
    (each must raise the key-value timeout's RuntimeError; `skipper` waits for them to
    finish before it leaves). Returns a dict of shards and error texts."""
    import jax
    from jax._src import distributed
    me = jax.process_index()
    name, mc, gen, seed, opts = good
    out = {"first": run_specs([good], platform)}
    # Calls new to every process (a call agreed on before is not compared again): M
    # differs by process; then the mesh is reversed in every process but 0.
    out["shape_mismatch"] = _error_of([(name + "_m", mc, dict(gen, M=gen["M"] + 1 + me),
                                        seed, opts)], platform)
    order = opts["devices"] or list(range(mc.size))
    out["mesh_mismatch"] = _error_of([(name + "_o", mc, dict(gen, M=gen["M"] + 3), seed,
                                       dict(opts, devices=order[::-1] if me else order))],
                                     platform)
    out["again"] = run_specs([(name + "_again", mc, gen, seed, opts)], platform)
    # Process 0 alone lowers that call once more (a fresh jit: its lowering rule runs
    # again); the processes must still be in step for the next new call.
    if me == 0:
        f, args = program((name + "_again", mc, gen, seed, opts), platform)
        f.lower(*args)
    after = (name + "_after", mc, dict(gen, M=gen["M"] + 2), seed + 1, opts)
    out["after_extra_lowering"] = run_specs([after], platform)
    client = distributed.global_state.client
    os.environ["JAX_MOE_AR_KV_TIMEOUT_S"] = "3"  # read at each wait; only this step is short
    if me == skipper:
        for p in range(jax.process_count()):
            if p != skipper:
                client.blocking_key_value_get(f"test/skip/done/{p}", 120_000)
        out["timeout"] = None
    else:
        out["timeout"] = _error_of([(name + "_t", mc, dict(gen, M=gen["M"] + 1), seed, opts)],
                                   platform)
        client.key_value_set(f"test/skip/done/{me}", "1")
    return out


def specs_then_faults(specs, good, skipper: int):
    """In one process group: run_specs(specs); bootstrap_scenarios(); a collective
    reset_workspaces(); fault_sequence(good, skipper); last, a reset_workspaces() that
    only process 0 calls (it must time out naming the reset)."""
    import jax
    out = {"specs": run_specs(specs), "bootstrap": bootstrap_scenarios()}
    out["reset_together"] = reset_with_recording_native(True)
    out["faults"] = fault_sequence(good, skipper)   # ends with the key-value bound at 3 s
    out["reset_alone"] = reset_with_recording_native(jax.process_index() == 0)
    return out


def fail_in(bad: int):
    """Process `bad` raises; the others return 0 (for the launcher's own test)."""
    import jax
    if jax.process_index() == bad:
        return 1 / 0
    return 0


# ---- the CUDA bootstrap's decisions, with a recording stand-in for the native module ----

class _Dev:
    """What plan_shared reads of a jax device."""

    def __init__(self, id, process_index, local_hardware_id):
        self.id, self.process_index = id, process_index
        self.local_hardware_id = local_hardware_id if process_index == _me() else None


class _Mesh:
    def __init__(self, devices, names):
        self.devices, self.axis_names = np.array(devices, dtype=object), names
        self.shape = dict(zip(names, self.devices.shape))


def _me():
    import jax
    return jax.process_index()


class RecordingNative:
    """Stands in for jax_moe_ar._native's CUDA workspace calls (this machine has no GPU):
    records what the bootstrap asks for and answers like the real module would."""

    def __init__(self, uuids, fail_attach=None):
        self.uuids, self.fail_attach, self.calls, self.next = uuids, fail_attach, [], 0

    def device_uuids(self):
        return list(self.uuids)

    def grid_cap(self, ordinal, sharing):
        return 132 // sharing - _me()  # differs by process: the group takes the minimum

    def ipc_create(self, ranks, slot_bytes, timeout_s):
        self.next += 1
        ws = 1000 * (_me() + 1) + self.next
        self.calls.append(("create", ws, [tuple(r) for r in ranks], slot_bytes))
        return ws, [bytes([_me(), r[0]]) * 64 for r in ranks]

    def ipc_attach(self, ws, peers, group_sms):
        self.calls.append(("attach", ws, [[(i, h.hex(), o) for i, h, o in p] for p in peers],
                           list(group_sms)))
        if self.fail_attach:
            raise RuntimeError(self.fail_attach)

    def ipc_commit(self, ws):
        self.calls.append(("commit", ws))

    def ipc_discard(self, ws):
        self.calls.append(("discard", ws))

    with_cuda = True

    def synchronize_all(self):
        self.calls.append(("synchronize_all",))

    def reset_all(self):
        self.calls.append(("reset_all",))


def reset_with_recording_native(call: bool):
    """reset_workspaces() (if `call`) with the native module recorded; returns the
    outcome and the native calls. Needs a shared workspace recorded in this process
    (bootstrap_scenarios leaves some)."""
    from jax_moe_ar import workspace
    real = workspace._native
    workspace._native = RecordingNative([])
    try:
        outcome = _outcome(workspace.reset_workspaces) if call else ("skipped", None)
        return outcome, workspace._native.calls
    finally:
        workspace._native = real


def bootstrap_scenarios():
    """Runs jax_moe_ar.multiprocess.plan_shared (the CUDA path's cross-process bootstrap)
    in every process against a RecordingNative, over made-up GPU layouts; returns per
    scenario (plan result, recorded native calls)."""
    from jax_moe_ar import multiprocess as mp
    me = _me()
    real_native, real_host = mp._native, mp.host_id
    out = {}

    def run(name, devices, uuids, slot=1 << 20, reason=None, host=None, fail=None,
            names=("tp",), shape=None):
        mp._native = RecordingNative(uuids, fail)
        mp.host_id = (lambda: host) if host else real_host
        try:
            grid = np.empty(len(devices), dtype=object)
            grid[:] = devices
            mesh = _Mesh(grid if shape is None else grid.reshape(shape), names)
            from jax_moe_ar.workspace import device_groups
            groups = device_groups(mesh, ("tp",))
            res = mp.plan_shared(mesh, ("tp",), groups, slot, "call", reason, 1 << 21, 5.0)
            out[name] = (res, mp._native.calls)
        finally:
            mp._native, mp.host_id = real_native, real_host

    # Two processes, one GPU each (distinct GPUs of one host): a two-rank group.
    two = [_Dev(10, 0, 0), _Dev(11, 1, 0)]
    run("one_gpu_each", two, [f"gpu{me}"])
    run("reuse", two, [f"gpu{me}"], slot=1 << 19)          # fits the first: no new rounds
    # Both processes on the same GPU (uuid equal): each rank gets half the SMs.
    run("shared_gpu", [_Dev(20, 0, 0), _Dev(21, 1, 0)], ["gpuX"])
    # 2 processes x 2 GPUs, dp x tp with tp across processes: two groups of one rank in
    # each process; with tp within processes the groups would not span.
    grid = [_Dev(30, 0, 0), _Dev(31, 0, 1), _Dev(32, 1, 0), _Dev(33, 1, 1)]
    run("two_by_two", grid, [f"gpu{me}a", f"gpu{me}b"], names=("tp", "dp"), shape=(2, 2))
    # A group over 4 GPUs of 2 processes: local peers and remote ones in one group.
    run("four_ranks", [_Dev(40, 0, 0), _Dev(41, 0, 1), _Dev(42, 1, 0), _Dev(43, 1, 1)],
        [f"gpu{me}a", f"gpu{me}b"])
    # Refusals, the same in every process: hosts differ; one process cannot serve; one
    # process cannot open its peers.
    run("two_hosts", [_Dev(50, 0, 0), _Dev(51, 1, 0)], ["g"], host=f"node{me}/boot{me}")
    run("local_reason", [_Dev(60, 0, 0), _Dev(61, 1, 0)], ["g"],
        reason="GPU 0 has compute capability 8.0" if me == 0 else None)
    run("attach_fails", [_Dev(70, 0, 0), _Dev(71, 1, 0)], [f"gpu{me}"],
        fail="GPU 0 cannot access GPU 1's memory (no peer access)" if me == 1 else None)
    return out


# ---- GPU faults (tests/test_gpu_multiprocess.py) -----------------------------------------

def _outcome(fn):
    """('ok', value) or ('error', message) of fn()."""
    try:
        return ("ok", fn())
    except Exception as e:  # RuntimeError from check_errors, jax's error from the handler
        return ("error", f"{type(e).__name__}: {e}")


def peer_stops_then_reset(good, stopper: int):
    """A good call; then every process but `stopper` calls again while `stopper` does not
    (their waits time out: NaN outputs, check_errors names the op, the next call is
    refused); then every process calls reset_workspaces() and the same program is exact
    again through the same mapped buffers."""
    import jax
    import jax_moe_ar as mar
    me = jax.process_index()
    f, args = program(good, "gpu")
    out = {"first": {good[0]: local_shards(f(*args))}}
    if me != stopper:
        res = f(*args).residual
        out["stalled_all_nan"] = bool(np.isnan(np.asarray(
            res.addressable_shards[0].data, np.float32)).all())
        out["check_errors"] = _outcome(mar.check_errors)
        out["next_call"] = _outcome(lambda: np.asarray(
            f(*args).residual.addressable_shards[0].data))
    mar.reset_workspaces()
    out["after_reset"] = {good[0]: local_shards(f(*args))}
    out["check_errors_after"] = _outcome(mar.check_errors)
    return out


def peer_exits(good, leaver: int):
    """A good call; then process `leaver` exits (no goodbye) and the others call again:
    their waits end within the bound, outputs NaN, check_errors names the op."""
    import time

    import jax
    import jax_moe_ar as mar
    from jax._src import distributed
    client = distributed.global_state.client
    me = jax.process_index()
    f, args = program(good, "gpu")
    out = {"first": {good[0]: local_shards(f(*args))}}
    if me == leaver:
        client.key_value_set("test/leaving", "1")
        os._exit(3)
    client.blocking_key_value_get("test/leaving", 60_000)
    time.sleep(1.0)  # the process is gone (its CUDA context torn down)
    t = time.monotonic()
    res = f(*args).residual
    data = np.asarray(res.addressable_shards[0].data, np.float32)
    out["elapsed_s"] = time.monotonic() - t
    out["stalled_all_nan"] = bool(np.isnan(data).all())
    out["check_errors"] = _outcome(mar.check_errors)
    return out


def lower_with_other_host(good, other: int):
    """Process `other` claims another host: every process must lower the plain-JAX path
    (no fused call) with one warning naming the hosts. Lowered only: executing the xla
    path needs NCCL, which refuses one GPU twice."""
    import warnings
    import jax
    from jax_moe_ar import multiprocess
    me = jax.process_index()
    if me == other:
        multiprocess.host_id = lambda: "elsewhere/another-boot-id"
    name, mc, gen, seed, opts = good
    opts = dict(opts)
    opts.pop("expect_fused")
    mesh = mesh_for(mc, opts.pop("devices"), "gpu")
    f, args = cases.build(make_case(good), mc, mesh, **opts)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        text = f.lower(*args).as_text()
        text2 = f.lower(*args).as_text()   # lowered again: no second warning
    return {"fused": FUSED_TARGET in text or FUSED_TARGET in text2,
            "warnings": [str(w.message) for w in caught if "jax_moe_ar" in str(w.message)]}
