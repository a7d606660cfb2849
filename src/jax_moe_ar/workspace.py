"""Mesh + axis names -> device groups -> a native exchange workspace (created once).

The CUDA lowering asks `plan` for a workspace able to carry one call of the
given shape. A workspace covers every group of the mesh along the reduction
axes (a 2x2 mesh reduced over "tp" has two groups), holds per device the
peer-visible exchange buffers and counters, and lives until the process exits.
It is created here, at lowering time on the host — never inside a captured
region or a handler. Groups whose devices belong to several processes get theirs
from multiprocess.py, which agrees with the other processes first.
"""

from __future__ import annotations

import atexit
import dataclasses
import threading

import numpy as np

from . import multiprocess
from ._contract import ALGORITHMS, LIMITS, QUANT_KINDS, _native

MAX_GROUP = LIMITS["max_ranks"]          # ranks per group the kernel supports
MAX_ROW_BYTES = LIMITS["max_row_bytes"]  # one row of T per block
MAX_ELEMENTS = LIMITS["max_elements"]    # per array of a call: 32-bit index math
MIN_SLOT_BYTES = 1 << 20
ALGO_ONESHOT, ALGO_TWOSHOT = ALGORITHMS["oneshot"], ALGORITHMS["twoshot"]

# `auto` takes two-shot once a rank's partial is at least this many bytes, with three
# or more ranks. With two ranks one-shot moves the same bytes (each rank sends its
# partial once) without the second exchange, and it measured faster at every M, with
# and without quantized outputs (2xH200, docs/perf.md v2 and v3). With four ranks
# (4xH200, v3, H = 7168 bf16, no quant) one-shot won at M = 32 (448 KiB, 19.9 vs 22.4 us)
# and two-shot at M = 64 (896 KiB, 21.3 vs 23.3 us) and above, also with FP8 and NVFP4
# outputs at M >= 128: the threshold is where the measured gap interpolates to zero.
# Static shapes only: every rank decides alike.
TWOSHOT_MIN_BYTES = 704 * 1024

# `auto` takes the plain-JAX ("xla") path where the project's last committed
# measurements show the fused kernel slower than "xla" (SPEC §5), by group size and
# quant format ("none" without quantized outputs), from the bytes of one rank's partial
# (M * H * bytes(T)): "xla" below AUTO_XLA_BELOW_BYTES and from AUTO_XLA_FROM_BYTES
# (None: the fused kernel won at every larger size measured). From docs/perf.md (the
# multi-GPU issue re-derives the rows for groups of two and more):
#   1 rank (v13 and v14 benches, 1xH200, H = 7168 bf16, every call's outputs kept live;
#     fused against the faster "xla" column at M = 1, 32, 64, 128, 256, 2048; v13 had
#     none and NVFP4 at 1, 32, 128, 2048). Below M = 256 a call is bound by the host's
#     launches (perf.md v13) and the ratio moves by ~0.1 from run to run, so each
#     threshold is the largest M at which any run's ratio crosses 1 (linear between the
#     measured M), rounded up to 128 KiB of partial:
#       none          v13 0.74 0.89 - 1.02 - 1.12 (M ~ 114); v14 0.63 0.89 0.99 0.89
#                     1.23 1.10 (M ~ 169)                          -> 2,432 KiB (M >= 174)
#       fp8_static    v14 0.88 0.96 0.85 0.85 1.08 1.10 (M ~ 211)  -> 3,072 KiB (M >= 220)
#       fp8_per_token v14 1.11 0.98 1.11 0.92 1.21 1.20 (M ~ 163)  -> 2,304 KiB (M >= 165)
#       fp8_per_group v14 1.04 1.03 1.05 1.02 1.22 1.17            -> 0 (every M)
#       nvfp4         v13 0.93 1.53 - 1.26 - 1.27 (M ~ 5); v14 1.09 1.58 1.59 1.27 1.53
#                     1.31                                         -> 128 KiB (M >= 10)
#   2 ranks (v4 bench, 2xH200): fused 1.02-2.46x "xla" at every M and format.
#   3+ ranks (v3 bench, 4xH200, two-shot): without quant 1.19x at M = 512 and 0.95x at
#     2048, the gap zero near M = 1700 (24 MiB at H = 7168 bf16); with FP8 or NVFP4
#     outputs 1.05-1.07x at 512 and 0.77-0.78x at 2048, zero near M = 800 (11 MiB).


def _by_format(unquantized, quantized):
    """A row of the tables: `unquantized` for "none", `quantized` for every format."""
    return {name: unquantized if name == "none" else quantized for name in QUANT_KINDS}


AUTO_XLA_BELOW_BYTES = {1: {"none": 2432 << 10, "fp8_static": 3072 << 10,
                            "fp8_per_token": 2304 << 10, "fp8_per_group": 0,
                            "nvfp4": 128 << 10}}
AUTO_XLA_FROM_BYTES = {1: _by_format(None, None), 2: _by_format(None, None)}
AUTO_XLA_FROM_BYTES_MANY = _by_format(24 << 20, 11 << 20)


def auto_prefers_xla(ranks: int, partial_bytes: int, quant: str) -> bool:
    """Whether `auto` runs "xla" for a group of `ranks` whose per-rank partial holds
    `partial_bytes`, with quant format `quant` (a QUANT_KINDS name; "none" without
    quantized outputs). Static shapes only: every rank decides alike."""
    below = AUTO_XLA_BELOW_BYTES.get(ranks)
    if below is not None and partial_bytes < below[quant]:
        return True
    limit = AUTO_XLA_FROM_BYTES.get(ranks, AUTO_XLA_FROM_BYTES_MANY)[quant]
    return limit is not None and partial_bytes >= limit

TIMEOUT_ENV = "JAX_MOE_AR_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 10.0


@dataclasses.dataclass(frozen=True)
class Plan:
    """How the CUDA lowering serves a call: a workspace id, or None and the reason why not."""

    workspace_id: int | None
    algorithm_code: int = ALGO_ONESHOT
    reason: str = ""


def choose_algorithm(algorithm: str, M: int, H: int, itemsize: int, ranks: int) -> int:
    """The kernel `algorithm` ("auto", "oneshot", "twoshot") runs, from static shapes only."""
    if algorithm == "oneshot":
        return ALGO_ONESHOT
    if algorithm == "twoshot":
        return ALGO_TWOSHOT
    if ranks <= 2 or M * H * itemsize < TWOSHOT_MIN_BYTES:
        return ALGO_ONESHOT
    return ALGO_TWOSHOT


def device_groups(mesh, axes) -> list[tuple]:
    """Devices of each reduction group, in rank order (row-major over `axes` as given,
    the order of lax.axis_index and all_gather)."""
    names = list(mesh.axis_names)
    others = [n for n in names if n not in axes]
    order = [names.index(n) for n in others] + [names.index(n) for n in axes]
    devs = np.transpose(np.asarray(mesh.devices), order)
    n = int(np.prod([mesh.shape[a] for a in axes]))
    return [tuple(row) for row in devs.reshape(-1, n)]


def timeout_seconds() -> float:
    """Bound on every wait of the kernels, from $JAX_MOE_AR_TIMEOUT_S (default 10 s)."""
    return multiprocess.env_seconds(TIMEOUT_ENV, DEFAULT_TIMEOUT_S)


_lock = threading.Lock()
_by_groups: dict[tuple, list[tuple[int, int]]] = {}  # groups -> [(slot_bytes, id)]
_refused: dict[tuple, str] = {}


def _unservable_reason(groups, H, itemsize, largest) -> str | None:
    import jax
    if not getattr(_native, "with_cuda", False):
        return "jax_moe_ar was built without CUDA kernels (no nvcc at build time)"
    if len(groups[0]) > MAX_GROUP:
        return f"group of {len(groups[0])} ranks (the kernel serves at most {MAX_GROUP})"
    if H * itemsize > MAX_ROW_BYTES:
        return f"rows of {H * itemsize} bytes (the kernel stages at most {MAX_ROW_BYTES})"
    if largest >= MAX_ELEMENTS:
        return f"an operand of {largest} elements (the kernel indexes at most 2^31 - 1)"
    me = jax.process_index()
    for g in groups:
        for d in g:
            if d.process_index != me:
                continue
            cc = getattr(d, "compute_capability", None)
            try:
                major = int(str(cc).split(".")[0])
            except ValueError:
                major = 0
            if major < 9:
                return f"{d} has compute capability {cc}; the kernel needs sm_90 or newer"
    return None


def plan(axis_context, axes, M: int, H: int, dtype, algorithm: str, largest: int = 0,
         call: str = "") -> Plan:
    """Finds or creates the workspace for a call of [M, H] rows of `dtype` over `axes`;
    `largest` is the element count of the call's largest operand. `call` describes the
    call (the primitive's parameters and operand types): processes that share a group
    check that they all lowered the same one (multiprocess.py)."""
    mesh = getattr(axis_context, "mesh", None)
    if mesh is None or not hasattr(mesh, "devices"):
        return Plan(None, reason="the call is not inside jax.shard_map over a concrete mesh")
    devices = list(np.asarray(mesh.devices).flat)
    groups = device_groups(mesh, axes)
    itemsize = np.dtype(dtype).itemsize
    code = choose_algorithm(algorithm, M, H, itemsize, len(groups[0]))
    if any(d.platform != "gpu" for d in devices):
        # Lowered for CUDA on a machine without those devices (jax.export,
        # lower-only tests): no workspace can exist; the handler refuses to run.
        return Plan(0, code, reason="lowered without CUDA devices")
    reason = _unservable_reason(groups, H, itemsize, largest)
    if multiprocess.spans_processes(groups):
        slot = M * H * itemsize
        ws, reason = multiprocess.plan_shared(mesh, axes, groups, slot, f"{call} code={code}",
                                              reason, _capacity(slot), timeout_seconds())
        return Plan(ws, code, reason=reason)
    if reason is not None:
        return Plan(None, reason=reason)
    ws, reason = _workspace_for(groups, M * H * itemsize)
    return Plan(ws, code, reason=reason)


def _capacity(slot_bytes: int) -> int:
    """Slot size of a new workspace: powers of two, so that a program recompiled for
    growing shapes creates few workspaces."""
    return max(MIN_SLOT_BYTES, 1 << (max(slot_bytes, 1) - 1).bit_length())


def _workspace_for(groups, slot_bytes: int) -> tuple[int | None, str]:
    """(id, "") of a workspace whose slots hold `slot_bytes`, or (None, why not)."""
    import jax
    me = jax.process_index()
    local = tuple(tuple(d.local_hardware_id for d in g) for g in groups
                  if g[0].process_index == me)
    with _lock:
        for cap, ws in _by_groups.get(local, []):
            if cap >= slot_bytes:
                return ws, ""
        if local in _refused:
            return None, _refused[local]
        cap = _capacity(slot_bytes)
        try:
            ws = _native.workspace_create([list(g) for g in local], cap, timeout_seconds())
        except RuntimeError as e:  # no peer access, allocation failure, ...
            _refused[local] = str(e)
            return None, str(e)
        _by_groups.setdefault(local, []).append((cap, ws))
        return ws, ""


def check_errors() -> None:
    """Raises RuntimeError if a kernel reported a failure (e.g. a peer that never arrived)."""
    if not getattr(_native, "with_cuda", False):
        return
    errors = _native.take_errors()
    if errors:
        raise RuntimeError("jax_moe_ar: " + "; ".join(errors))


def reset_workspaces() -> None:
    """Returns every exchange workspace of this process to its fresh state.

    After a reported failure (a wait that timed out, see `check_errors`) the group's
    workspace is poisoned: its calls return NaN and raise. Once the cause is gone, call
    this — while no jax_moe_ar program is running — and the same compiled programs work
    again. It waits for every GPU of every group, then clears the exchange buffers,
    counters and recorded failures (failures not yet taken by `check_errors` are dropped).

    Groups that span processes: every process that shares a workspace with this one must
    call it too (it is collective, like the calls). Each process waits for its own GPUs,
    then for the others (jax.distributed's key-value store, bounded by
    $JAX_MOE_AR_KV_TIMEOUT_S), clears its own ranks, and waits for the others again, so
    that no process's next call lands in a buffer a peer has not cleared yet. The mapped
    peers' buffers stay mapped: compiled programs keep working after it.
    """
    if not getattr(_native, "with_cuda", False):
        return
    peers = multiprocess.reset_peers()
    if len(peers) > 1:
        _native.synchronize_all()
        multiprocess.barrier(peers, "before")
        _native.reset_all()
        multiprocess.barrier(peers, "after")
    else:
        _native.reset_all()


def _release():
    if getattr(_native, "with_cuda", False):
        _native.destroy_all()


atexit.register(_release)
