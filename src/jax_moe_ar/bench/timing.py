"""How the bench measures: wall time of repeated runs, GPU busy time read from a profile
(``jax.profiler``'s ``.xplane.pb``), and the link bandwidth between two GPUs."""

from __future__ import annotations

import glob
import os
import statistics
import tempfile
import time

from ..cli import tp_mesh


def time_runs(fn, args, reps, warmup):
    """(median seconds, every timed run's seconds) of `reps` runs of fn(*args) after
    `warmup` untimed ones, each from dispatch to block_until_ready."""
    import jax
    for _ in range(max(warmup, 0)):
        jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(max(reps, 1)):
        t0 = time.perf_counter()
        out = fn(*args)
        jax.block_until_ready(out)
        ts.append(time.perf_counter() - t0)
        del out
    return statistics.median(ts), ts


# Lines of a device plane that summarize rather than record device activity.
_DERIVED_LINES = ("XLA Modules", "XLA Ops", "XLA TraceMe", "Steps", "TensorFlow Ops",
                  "TensorFlow Name Scope", "Source", "Framework", "Launch Stats",
                  "Async XLA Ops", "Sparse Core")


def _union_ns(intervals):
    total, end = 0, None
    for s, e in sorted(intervals):
        if end is None or s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def device_time(data, ordinals):
    """{"busy_ns": per-GPU union of event intervals, "sum_ns": per-GPU sum of event
    durations, "kernels": {name: ns} summed over GPUs} from a jax.profiler.ProfileData,
    for the GPUs whose ordinals are given (all GPU planes when none of them match).

    Device planes are named "/device:GPU:<ordinal>"; their lines are the CUDA streams
    ("Stream #..."), each event a kernel or memcpy. Lines that summarize (XLA Modules,
    XLA Ops, ...) are left out when stream lines exist."""
    planes = [p for p in data.planes if p.name.startswith("/device:GPU:")]
    chosen = [p for p in planes if _ordinal(p.name) in ordinals] or planes
    busy, sums, kernels = {}, {}, {}
    for plane in chosen:
        lines = list(plane.lines)
        streams = [ln for ln in lines if ln.name.startswith("Stream")]
        if not streams:
            streams = [ln for ln in lines if not ln.name.startswith(_DERIVED_LINES)]
        intervals, total = [], 0
        for ln in streams:
            for ev in ln.events:
                d = float(ev.duration_ns)
                s = float(ev.start_ns)
                intervals.append((s, s + d))
                total += d
                kernels[ev.name] = kernels.get(ev.name, 0) + d
        if intervals:
            busy[plane.name] = _union_ns(intervals)
            sums[plane.name] = total
    return dict(busy_ns=busy, sum_ns=sums, kernels=kernels)


def _ordinal(plane_name):
    try:
        return int(plane_name.rsplit(":", 1)[1])
    except ValueError:
        return -1


def profile_kernel_time(fn, args, devs, chain):
    """GPU time per call (µs) of one run of `fn` from a profile, or (None, why)."""
    import jax
    with tempfile.TemporaryDirectory(prefix="jax_moe_ar_bench_") as d:
        jax.profiler.start_trace(d)
        try:
            jax.block_until_ready(fn(*args))
        finally:
            jax.profiler.stop_trace()
        files = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        if not files:
            return None, "the profiler wrote no .xplane.pb"
        ordinals = {getattr(dv, "local_hardware_id", dv.id) for dv in devs}
        data = jax.profiler.ProfileData.from_file(max(files, key=os.path.getmtime))
        got = device_time(data, ordinals)
    if not got["busy_ns"]:
        return None, "no GPU device plane with events in the profile"
    busy = statistics.mean(got["busy_ns"].values()) / 1e3 / chain
    top = sorted(got["kernels"].items(), key=lambda kv: -kv[1])[:6]
    return dict(kernel_us=busy,
                kernel_sum_us=statistics.mean(got["sum_ns"].values()) / 1e3 / chain,
                per_device_us={k: v / 1e3 / chain for k, v in got["busy_ns"].items()},
                top_kernels_us_per_call={k: v / 1e3 / chain / len(got["busy_ns"])
                                         for k, v in top}), ""


def measure_bandwidth(devs, mib, reps=8):
    """GB/s of a jax.device_put copy of `mib` MiB from devs[0] to devs[1] (best, median)."""
    import jax
    import jax.numpy as jnp
    n = mib * (1 << 20)
    src = jax.device_put(jnp.zeros((n,), jnp.uint8), devs[0])
    src.block_until_ready()
    for _ in range(2):
        jax.device_put(src, devs[1]).block_until_ready()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        dst = jax.device_put(src, devs[1])
        dst.block_until_ready()
        ts.append(time.perf_counter() - t0)
        dst.delete()
    src.delete()
    return dict(gbps=n / min(ts) / 1e9, gbps_median=n / statistics.median(ts) / 1e9,
                bytes=n, reps=reps, method=f"jax.device_put {mib} MiB {devs[0]} -> {devs[1]}")


def measure_ppermute_bandwidth(devs, mib, reps=8):
    """GB/s each GPU sends in a lax.ppermute (NCCL) swap of `mib` MiB between devs[0] and
    devs[1] — a cross-check of the device_put figure (best, median)."""
    import jax
    import jax.numpy as jnp
    from jax import lax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P
    n = mib * (1 << 20)
    mesh = tp_mesh(devs[:2])
    swap = jax.jit(jax.shard_map(lambda x: lax.ppermute(x, "tp", [(0, 1), (1, 0)]), mesh=mesh,
                                 in_specs=P("tp"), out_specs=P("tp")))
    x = jax.device_put(jnp.zeros((2 * n,), jnp.uint8), NamedSharding(mesh, P("tp")))
    wall, ts = time_runs(swap, (x,), reps, 2)
    del x
    return dict(gbps=n / min(ts) / 1e9, gbps_median=n / wall / 1e9, bytes=n, reps=reps,
                method=f"lax.ppermute swap of {mib} MiB per GPU between {devs[0]} and {devs[1]}")
