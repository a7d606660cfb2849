"""Groups that span processes: agreement through jax.distributed's key-value store and
the CUDA IPC bootstrap of their exchange workspaces (design: docs/multiprocess.md).

Every process of a multi-process JAX program lowers the same program. When a call's
reduction groups span processes, each process's lowering publishes what it is about to
lower under a key that names the processes of the mesh and this lowering's sequence
number among them, and reads every other process's entry: a different program, mesh or
workspace history is a clear RuntimeError, never a mixed-up exchange. On CUDA, the same
rounds carry what every process must know to reach the same decision (hosts, GPUs,
grids) and then the CUDA IPC handles of each process's exchange buffers.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import numpy as np

from ._contract import _native

KV_TIMEOUT_ENV = "JAX_MOE_AR_KV_TIMEOUT_S"
DEFAULT_KV_TIMEOUT_S = 120.0
PREFIX = "jax_moe_ar/v1"


def env_seconds(name: str, default: float) -> float:
    """A positive number of seconds from $name (default when unset); a clear error otherwise."""
    raw = os.environ.get(name, "")
    try:
        value = float(raw) if raw else default
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number of seconds") from None
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {raw!r}")
    return value


def kv_timeout_seconds() -> float:
    """Bound on each wait for another process at lowering or reset, from
    $JAX_MOE_AR_KV_TIMEOUT_S (default 120 s)."""
    return env_seconds(KV_TIMEOUT_ENV, DEFAULT_KV_TIMEOUT_S)


def spans_processes(groups) -> bool:
    return any(len({d.process_index for d in g}) > 1 for g in groups)


def _client():
    from jax._src import distributed  # the key-value store's only public route (0.10, 0.11)
    return distributed.global_state.client


def _me() -> int:
    import jax
    return jax.process_index()


_lock = threading.Lock()
_sequence: dict[tuple, int] = {}   # processes of a mesh -> lowerings they agreed on so far
_resets: dict[tuple, int] = {}     # processes -> collective resets so far
# Calls already agreed on, and their plans: lowering an identical call again (a jit cache
# miss in one process only) needs no round, so the processes' counters stay in step.
_agreed: set[str] = set()
_planned: dict[str, tuple] = {}


def _tag(procs) -> str:
    return "p" + "-".join(str(p) for p in procs)


def _next(counter: dict, procs) -> int:
    with _lock:
        n = counter.get(procs, 0)
        counter[procs] = n + 1
        return n


def exchange(key: str, value: str, procs, what: str) -> dict[int, str]:
    """Publishes `value` under key/<this process> and returns every process's value by
    index. Each wait is bounded by kv_timeout_seconds(); `what` names the round in errors."""
    client = _client()
    me = _me()
    if client is None:
        raise RuntimeError("jax_moe_ar: a group spans processes but jax.distributed is not "
                           "initialized, so its processes cannot agree")
    client.key_value_set(f"{key}/{me}", value)
    timeout = kv_timeout_seconds()
    deadline = time.monotonic() + timeout
    out = {me: value}
    for p in procs:
        if p == me:
            continue
        left_ms = max(1, int((deadline - time.monotonic()) * 1000))
        try:
            out[p] = client.blocking_key_value_get(f"{key}/{p}", left_ms)
        except Exception as e:  # jaxlib's runtime error: DEADLINE_EXCEEDED, or the service gone
            raise RuntimeError(
                f"jax_moe_ar: process {me} waited {timeout:g} s (${KV_TIMEOUT_ENV}) for process "
                f"{p} at {what} (key {key!r}) and it never arrived. Likely cause: the processes "
                "did not lower the same jax_moe_ar programs in the same order (a program "
                "lowered or compiled in only some processes, a process-dependent branch), or "
                f"process {p} stopped or is still busy. ({type(e).__name__}: {e})") from None
    return out


def _differences(mine: dict, theirs: dict) -> list[str]:
    """'field: theirs vs ours' for each field that differs; long texts around the first
    character that differs."""
    def window(a, b):
        a, b = repr(a), repr(b)
        i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        lo = max(0, i - 60)
        cut = lambda s: ("..." if lo else "") + s[lo:i + 60] + ("..." if len(s) > i + 60 else "")
        return cut(a), cut(b)
    out = []
    for k in sorted(set(mine) | set(theirs)):
        if mine.get(k) != theirs.get(k):
            t, m = window(theirs.get(k), mine.get(k))
            out.append(f"{k}: {t} there vs {m} here")
    return out


def agree(procs, call: dict, facts: dict | None = None) -> tuple[str, dict[int, dict]]:
    """One lowering's agreement among `procs`: every process publishes `call` (what must be
    equal everywhere) and `facts` (what it alone knows). Returns this lowering's key and
    every process's facts; raises RuntimeError naming the differences when any process's
    `call` differs from ours."""
    procs = tuple(procs)
    n = _next(_sequence, procs)
    key = f"{PREFIX}/{_tag(procs)}/{n}"
    mine = json.dumps({"call": call, "facts": facts or {}}, sort_keys=True)
    got = {p: json.loads(v) for p, v in exchange(key + "/call", mine, procs,
                                                 f"lowering #{n}").items()}
    me = _me()
    bad = []
    for p in procs:
        diff = _differences(call, got[p]["call"])
        if diff:
            bad.append(f"process {p}: " + "; ".join(diff))
    if bad:
        raise RuntimeError(
            f"jax_moe_ar: the processes {list(procs)} lowered different jax_moe_ar calls at "
            f"their lowering #{n} of a call over these processes (as seen by process {me}): "
            + " | ".join(bad) + ". Every process must lower the same programs over the same "
            "mesh, in the same order (SPMD).")
    return key, {p: got[p]["facts"] for p in procs}


def mesh_description(mesh, axes) -> dict:
    return {"mesh_devices": [int(d.id) for d in np.asarray(mesh.devices).flat],
            "mesh_shape": [int(s) for s in np.asarray(mesh.devices).shape],
            "mesh_axes": [str(a) for a in mesh.axis_names], "reduce_over": list(axes)}


def participants(mesh) -> tuple[int, ...]:
    return tuple(sorted({int(d.process_index) for d in np.asarray(mesh.devices).flat}))


def check_call(mesh, axes, call: str) -> None:
    """The agreement of a call whose groups span processes and that needs nothing else
    (the CPU path): raises RuntimeError when the processes lowered different calls."""
    if _client() is None:
        return  # nothing to check against; jax itself cannot run such a mesh then
    described = dict(mesh_description(mesh, axes), op=call)
    memo = json.dumps(described, sort_keys=True)
    if memo in _agreed:
        return
    agree(participants(mesh), described)
    _agreed.add(memo)


# ---- CUDA: exchange workspaces shared across processes ------------------------------

_shared: dict[str, list[tuple[int, int]]] = {}   # group layout -> [(slot bytes, id)]
_refused: dict[str, str] = {}
_procs_of: dict[int, tuple[int, ...]] = {}        # workspace id -> processes sharing it


def host_id() -> str:
    """This machine: the kernel's boot id (shared by containers on one host, distinct across
    hosts), with the host name for messages."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def _hosts_reason(groups, facts) -> str | None:
    for gi, g in enumerate(groups):
        hosts = sorted({facts[d.process_index]["host"] for d in g})
        if len(hosts) > 1:
            names = ", ".join(h.split("/")[0] for h in hosts)
            return (f"a group spans several hosts ({names}); the fused kernel exchanges "
                    "through CUDA IPC, which works within one node")
    return None


def plan_shared(mesh, axes, groups, slot_bytes: int, call: str,
                local_reason: str | None, new_capacity: int, timeout_s: float):
    """(workspace id, "") for a call whose groups span processes, or (None, why not) — the
    same answer in every process. Collective: every process of the mesh lowers it."""
    me = _me()
    procs = participants(mesh)
    layout = json.dumps([[int(d.id) for d in g] for g in groups])
    memo = json.dumps([layout, mesh_description(mesh, axes), call, slot_bytes])
    if memo in _planned:
        return _planned[memo]
    result = _plan_shared(mesh, axes, groups, slot_bytes, call, local_reason, new_capacity,
                          timeout_s, me, procs, layout)
    _planned[memo] = result
    return result


def _plan_shared(mesh, axes, groups, slot_bytes, call, local_reason, new_capacity, timeout_s,
                 me, procs, layout):
    existing = _shared.get(layout, [])
    reuse = next((ws for cap, ws in existing if cap >= slot_bytes), None)
    described = dict(mesh_description(mesh, axes), op=call,
                     workspaces=[cap for cap, _ in existing], refused=_refused.get(layout))
    local = [(d, gi, r) for gi, g in enumerate(groups) for r, d in enumerate(g)
             if d.process_index == me]
    uuids = []
    if local_reason is None:
        try:
            uuids = _native.device_uuids()
        except RuntimeError as e:
            local_reason = str(e)
    facts = {"host": host_id(), "reason": local_reason,
             "uuid": {str(d.id): uuids[d.local_hardware_id] for d, _, _ in local} if uuids
             else {}}
    key, facts = agree(procs, described, facts)
    if layout in _refused:
        return None, _refused[layout]
    if reuse is not None:
        return reuse, ""
    reason = next((f"process {p}: {facts[p]['reason']}" for p in procs if facts[p]["reason"]),
                  None) or _hosts_reason(groups, facts)
    if reason is not None:
        _refused[layout] = reason
        return None, reason
    ws, reason = _bootstrap(key, procs, groups, local, facts, new_capacity, timeout_s)
    if ws is None:
        _refused[layout] = reason
        return None, reason
    _shared.setdefault(layout, []).append((new_capacity, ws))
    _procs_of[ws] = procs
    return ws, ""


def _bootstrap(key, procs, groups, local, facts, capacity, timeout_s):
    """Rounds 2 and 3 of a new shared workspace: allocate and publish handles and grids,
    open the peers', then commit only if every process opened all of its peers. A round
    that times out frees what this process allocated before the error propagates."""
    pending = []
    try:
        return _bootstrap_rounds(key, procs, groups, local, facts, capacity, timeout_s,
                                 pending)
    except BaseException:
        for ws in pending:
            _native.ipc_discard(ws)
        raise


def _bootstrap_rounds(key, procs, groups, local, facts, capacity, timeout_s, pending):
    me = _me()
    uuid = {int(d): u for f in facts.values() for d, u in f["uuid"].items()}
    host = {d.id: facts[d.process_index]["host"] for g in groups for d in g}

    def where(d):  # one physical GPU: the same host and UUID
        return host[d.id], uuid[d.id]

    entry, ws = {}, None
    try:
        ws, handles = _native.ipc_create([(d.local_hardware_id, gi, r, len(groups[gi]))
                                          for d, gi, r in local], capacity, timeout_s)
        pending.append(ws)
        for (d, gi, _), h in zip(local, handles):
            sharing = sum(where(o) == where(d) for o in groups[gi])
            entry[str(d.id)] = {"handles": h.hex(), "cap": _native.grid_cap(
                d.local_hardware_id, sharing)}
        published = {"ranks": entry}
    except RuntimeError as e:
        published = {"error": f"process {me}: {e}"}
    got = {p: json.loads(v) for p, v in exchange(
        key + "/ipc", json.dumps(published), procs, "the exchange of CUDA IPC handles").items()}
    errors = [got[p]["error"] for p in procs if "error" in got[p]]
    if not errors:
        ranks = {int(d): v for p in procs for d, v in got[p]["ranks"].items()}
        mine = {d.id: i for i, (d, _, _) in enumerate(local)}
        visible = {u: i for i, u in enumerate(_native.device_uuids())}
        peers, sms = [], []
        for d, gi, _ in local:
            g = groups[gi]
            sms.append(min(ranks[o.id]["cap"] for o in g))
            peers.append([(mine[o.id], b"", -1) if o.id in mine else
                          (-1, bytes.fromhex(ranks[o.id]["handles"]),
                           visible.get(uuid[o.id], -1) if host[o.id] == host[d.id] else -1)
                          for o in g])
        try:
            _native.ipc_attach(ws, peers, sms)
            opened = {"ok": True}
        except RuntimeError as e:
            opened = {"error": f"process {me}: {e}"}
    else:
        opened = {"error": errors[0]}
    got = {p: json.loads(v) for p, v in exchange(
        key + "/open", json.dumps(opened), procs, "the opening of peers' buffers").items()}
    errors = [got[p]["error"] for p in procs if "error" in got[p]]
    pending.clear()
    if errors:
        if ws is not None:
            _native.ipc_discard(ws)
        return None, errors[0]
    _native.ipc_commit(ws)
    return ws, ""


def reset_peers() -> tuple[int, ...]:
    """Every process this one shares an exchange workspace with (itself included)."""
    return tuple(sorted({p for procs in _procs_of.values() for p in procs}))


def barrier(procs, phase: str) -> None:
    """All of `procs` reach this point (bounded by kv_timeout_seconds)."""
    procs = tuple(procs)
    n = _next(_resets, (procs, phase))
    exchange(f"{PREFIX}/{_tag(procs)}/reset/{n}/{phase}", "1", procs,
             f"reset_workspaces() ({phase}); every process sharing a workspace must call it")


