"""``python -m jax_moe_ar bench``: the fused op against the ``"xla"`` composition (SPEC §6).

For every group size N (``--ranks``), quant format (``--quant``) and token count M (``--M``)
it builds, per algorithm, ONE ``jax.jit(jax.shard_map(...))`` program that runs ``--chain``
calls of ``mar.moe_finalize_allreduce`` back to back (``[M, H]`` rows, K experts per token,
routed_scaling_factor 2.5, router scales, a shared-expert partial, default outputs:
residual + norm without quant, residual + quant with quant). Call i+1 consumes call i's
outputs: its residual is call i's new residual, and all of call i's outputs and all of
call i+1's operands pass through one ``lax.optimization_barrier``. The barrier costs
nothing at run time, but it keeps XLA from dropping outputs nobody reads (the quant codes
of the "xla" composition), from computing the loop-invariant finalize once for all calls,
and from combining or reordering the all-reduces of different calls. The chain is a
``fori_loop`` over blocks of ``--unroll`` unrolled calls (trip count static, so XLA needs
no host round trip per iteration; the unrolling keeps compile time bounded).

Inputs are random normal (expert rows, shared-expert partials, residual, gamma near 1).
Each token's K distinct experts come from random router logits over ``--experts`` E
(default 256) owned by the ranks in blocks of E/N, with softmax scales; each rank's rows
are laid out expert-sorted, and its ``permuted_idx`` holds -1 where another rank owns
the expert (about (N-1)/N of the entries).

Reported per call:

- wall: median over ``--reps`` timed runs (after ``--warmup`` runs) of the whole program,
  dispatch to ``block_until_ready``, divided by the chain length;
- kernel: GPU time from a profile of one run (``jax.profiler.trace``; the ``.xplane.pb``
  is read with ``jax.profiler.ProfileData``): per GPU of the group, the union of the
  intervals of all events on its ``/device:GPU:<n>`` plane (kernels, NCCL kernels,
  memcpys), averaged over the group's GPUs, divided by the chain length. CPU runs have no
  device planes: "n/a";
- floor: the bytes each GPU must send over NVLink for one call, divided by the NVLink
  bandwidth measured in the same run::

      floor_bytes = (N - 1) / N * M * H * 2 * bytes(T)

  i.e. a reduce-scatter of the T partials plus an all-gather of residual_out in T (the
  default outputs always include it, and every rank derives norm and quant from it), the
  bytes of an all-reduce of T. The bandwidth is the best of several
  timed ``jax.device_put`` copies of ``--bw-mib`` MiB from GPU 0 to GPU 1 (one GPU's
  one-way copy-engine rate); "% of floor" = floor / fused wall time per call (100% = at
  the physical limit). CPU runs skip the measurement ("n/a").

Every measurement runs in a child process (``--in-process`` to measure here instead): a
crash in XLA's compiler or in a kernel, or a hang (``--task-timeout``), costs that one
measurement — reported in the table and the JSON — and a fresh child takes the next.
Each row also checks one fused call against one xla call (residual, max-norm relative
difference < 2e-2; ``--no-check`` skips it).

Outputs: a table on stdout, ``bench.json`` (device kind, GPU count, jax version, chain
length, bandwidth, every row) and ``bench.png`` (latency vs M, log-log; needs
matplotlib, skipped with a message without it) in ``--out``. On a machine without GPUs it
runs small sizes on forced CPU devices; those numbers are NOT meaningful for the GPU
targets.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform as _platform
import statistics
import sys
import tempfile
import time

import numpy as np

from .demo import (PATH_DESCRIPTIONS, add_platform_argument, compiled_path, dtype_of,
                   select_devices, tp_mesh)

DESCRIPTION = __doc__

QUANTS = ("none", "fp8_static", "fp8_per_token", "fp8_per_group", "nvfp4")
GPU_DEFAULTS = dict(M=(1, 8, 32, 128, 512, 2048, 8192), H=7168, chain=200)
CPU_DEFAULTS = dict(M=(1, 8, 32), H=256, chain=20)
ROUTED_SCALING_FACTOR = 2.5
FP8_STATIC_SCALE = 0.02          # dequant scale: covers |norm| up to ~9
NVFP4_GLOBAL_SCALE = 448.0 * 6.0 / 8.0  # encode scale for amax ~8
CHECK_TOLERANCE = 2e-2            # single-call residual agreement fused vs xla (bf16)
CPU_NOTE = ("NOTE: no GPU here — these are CPU numbers (forced host devices, the CPU FFI "
            "path). They are NOT meaningful for the GPU targets of SPEC §6.")
# Test hook: "quant:M:algo" makes the measuring process crash on that task (see tests).
TEST_CRASH_ENV = "JAX_MOE_AR_BENCH_TEST_CRASH"
FLOOR_FORMULA = "floor = (N-1)/N * M*H*2*bytes(T) / BW"


def _int_list(text):
    return tuple(int(v) for v in text.split(",") if v.strip())


def _str_list(text):
    return tuple(v.strip() for v in text.split(",") if v.strip())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--M", type=_int_list, default=None,
                        help="token counts, comma separated (GPU default "
                             "1,8,32,128,512,2048,8192; CPU default 1,8,32)")
    parser.add_argument("--H", type=int, default=None,
                        help="hidden size (GPU default 7168, CPU default 256)")
    parser.add_argument("--K", type=int, default=8, help="experts per token (default 8)")
    parser.add_argument("--experts", type=int, default=256,
                        help="routed experts E, split evenly over the ranks (default 256)")
    parser.add_argument("--dtype", choices=("bf16", "f16", "f32"), default="bf16")
    parser.add_argument("--quant", type=_str_list, default=QUANTS,
                        help="quant formats, comma separated, from " + ",".join(QUANTS)
                             + " (default all; fp8_per_group uses group 128, nvfp4 the "
                               "swizzled 128x4 scale layout)")
    parser.add_argument("--ranks", type=_int_list, default=None,
                        help="group sizes N, comma separated (default: 2,4,8 as far as there "
                             "are GPUs; 2,4 on CPU)")
    parser.add_argument("--algorithms", type=_str_list, default=("auto",),
                        help="fused algorithms to time against 'xla', comma separated, from "
                             "auto,oneshot,twoshot (default auto)")
    parser.add_argument("--chain", type=int, default=None,
                        help="calls chained in one program (GPU default 200, CPU default 20)")
    parser.add_argument("--unroll", type=int, default=20,
                        help="calls unrolled per loop iteration of the chain (0 = all)")
    parser.add_argument("--reps", type=int, default=5, help="timed runs per program (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs per program")
    parser.add_argument("--bw-mib", type=int, default=256,
                        help="MiB copied GPU 0 -> GPU 1 to measure the link bandwidth")
    parser.add_argument("--no-profile", action="store_true",
                        help="skip the profiled run (no kernel times)")
    parser.add_argument("--no-check", action="store_true",
                        help="skip the single-call fused vs xla agreement check per row")
    parser.add_argument("--out", default="bench_out",
                        help="directory for bench.json and bench.png (default ./bench_out)")
    parser.add_argument("--task-timeout", type=float, default=600.0,
                        help="seconds one measurement may take before it counts as hung")
    parser.add_argument("--in-process", action="store_true",
                        help="measure in this process (default: in a child process, so a "
                             "crash or hang costs one measurement, not the bench)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0)
    add_platform_argument(parser)


# ----------------------------------------------------------------------- inputs

def quant_spec(name: str, arrays: bool = True):
    """The package's quant spec for a bench name. Its scale arrays are made where this is
    called (inside the traced program); ``arrays=False`` leaves them None, for shapes only
    (and touches no device)."""
    import jax.numpy as jnp

    import jax_moe_ar as mar

    def scalar(v):
        return jnp.float32(v) if arrays else None

    if name == "none":
        return None
    if name == "fp8_static":
        return mar.Fp8Static(scalar(FP8_STATIC_SCALE))
    if name == "fp8_per_token":
        return mar.Fp8PerToken()
    if name == "fp8_per_group":
        return mar.Fp8PerGroup(128)
    if name == "nvfp4":
        return mar.NvFp4(scalar(NVFP4_GLOBAL_SCALE), layout="swizzled_128x4")
    raise ValueError(f"unknown quant {name!r}; choose from {QUANTS}")


def routing(rng, N, M, K, E):
    """Realistic routing: each token's K distinct experts from random router logits,
    softmax-normalized scales, experts owned by ranks in contiguous blocks of E/N.

    Returns (permuted_idx [N, M, K] int32, scales [M, K] float32, P): rank r's row of
    token m's k-th expert in its expert-sorted (permuted) rows, -1 where another rank
    holds the expert; P = rows per rank (the most any rank holds, at least 1).
    """
    logits = rng.standard_normal((M, E)).astype(np.float32)
    top = np.argsort(-logits, axis=1, kind="stable")[:, :K]
    chosen = np.take_along_axis(logits, top, axis=1)
    w = np.exp(chosen - chosen.max(axis=1, keepdims=True))
    scales = (w / w.sum(axis=1, keepdims=True)).astype(np.float32)
    owner = top // (E // N)
    idx = np.full((N, M, K), -1, np.int32)
    counts = []
    for r in range(N):
        ms, ks = np.nonzero(owner == r)
        order = np.lexsort((ms, top[ms, ks]))  # by expert, then token
        idx[r, ms[order], ks[order]] = np.arange(order.size, dtype=np.int32)
        counts.append(order.size)
    return idx, scales, max(1, max(counts))


def make_inputs(mesh, N, M, H, K, E, T, seed):
    """Device arrays of one (N, M) case, random normal (not zeros), sharded over "tp"."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    rng = np.random.default_rng(seed)
    idx, scales, rows = routing(rng, N, M, K, E)
    tp, rep = NamedSharding(mesh, P("tp")), NamedSharding(mesh, P())

    def gen(key):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        ex = jax.random.normal(k1, (N * rows, H), jnp.float32).astype(T)
        sh = (0.5 * jax.random.normal(k2, (N * M, H), jnp.float32)).astype(T)
        res = jax.random.normal(k3, (M, H), jnp.float32).astype(T)
        nw = (1.0 + 0.1 * jax.random.normal(k4, (H,), jnp.float32)).astype(T)
        return ex, sh, res, nw

    ex, sh, res, nw = jax.jit(gen, out_shardings=(tp, tp, rep, rep))(jax.random.key(seed))
    idx_d = jax.device_put(idx.reshape(N * M, K), tp)
    sc_d = jax.device_put(np.tile(scales, (N, 1)), tp)
    return dict(expert_out=ex, permuted_idx=idx_d, expert_scales=sc_d, shared=sh,
                residual=res, norm_weight=nw, rows=rows)


IN_SPEC_NAMES = ("expert_out", "permuted_idx", "expert_scales", "shared", "residual",
                 "norm_weight")


def _in_specs():
    from jax.sharding import PartitionSpec as P
    return (P("tp"), P("tp"), P("tp"), P("tp"), P(), P())


# ------------------------------------------------------------------------ programs

def _to_varying(x):
    from jax import lax
    if hasattr(lax, "pcast"):
        return lax.pcast(x, ("tp",), to="varying")
    return lax.pvary(x, ("tp",))  # older jax


def chain_program(mesh, quant_name, algorithm, chain, unroll):
    """jit(shard_map) of `chain` chained calls; returns every output of the last call
    (per rank, stacked along "tp")."""
    import jax
    from jax import lax
    from jax.sharding import PartitionSpec as P

    import jax_moe_ar as mar

    unroll = chain if unroll <= 0 else min(unroll, chain)
    n_loop, n_tail = divmod(chain - 1, unroll)

    def body(ex, idx, sc, sh, res, nw):
        q = quant_spec(quant_name)

        def call(res, ex, idx, sc, sh):
            out = mar.moe_finalize_allreduce(
                ex, idx, res, nw, axis_name="tp", expert_scales=sc, shared_expert_out=sh,
                routed_scaling_factor=ROUTED_SCALING_FACTOR, quant=q, algorithm=algorithm)
            outs = tuple(o for o in out if o is not None)  # residual first
            # Free at run time; see the module docstring for what it prevents.
            return lax.optimization_barrier((outs, ex, idx, sc, sh))

        def steps(n, carry):
            outs, ex, idx, sc, sh = carry
            for _ in range(n):
                outs, ex, idx, sc, sh = call(outs[0], ex, idx, sc, sh)
            return outs, ex, idx, sc, sh

        # The first call, outside the loop, gives the carry its types (the barrier makes
        # everything varying along "tp"); then n_loop blocks of `unroll` calls, then the rest.
        carry = call(_to_varying(res), ex, idx, sc, sh)
        if n_loop:
            carry = lax.fori_loop(0, n_loop, lambda i, c: steps(unroll, c), carry)
        carry = steps(n_tail, carry)
        return carry[0]

    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=_in_specs(), out_specs=P("tp"),
                                 check_vma=True))


def check_program(mesh, quant_name, algorithm):
    """One fused and one xla call on the same inputs; returns both residuals."""
    import jax
    from jax.sharding import PartitionSpec as P

    import jax_moe_ar as mar

    def body(ex, idx, sc, sh, res, nw):
        q = quant_spec(quant_name)
        kw = dict(axis_name="tp", expert_scales=sc, shared_expert_out=sh,
                  routed_scaling_factor=ROUTED_SCALING_FACTOR, quant=q)
        a = mar.moe_finalize_allreduce(ex, idx, res, nw, algorithm=algorithm, **kw)
        b = mar.moe_finalize_allreduce(ex, idx, res, nw, algorithm="xla", **kw)
        return a.residual, b.residual

    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=_in_specs(), out_specs=P(),
                                 check_vma=True))


def floor_bytes(N, M, H, itemsize, quant_name):
    """(N-1)/N * M*H*2*bytes(T): a reduce-scatter of the T partials plus an all-gather
    of residual_out in T, per GPU. The bench asks for the default outputs, which always
    include residual_out: from it every rank derives norm and quant itself, so no
    smaller all-gather can carry them (the bytes of an all-reduce of T)."""
    del quant_name  # the default outputs all carry residual_out
    return (N - 1) / N * 2 * M * H * itemsize


# ------------------------------------------------------------------------ measuring

def time_runs(fn, args, reps, warmup):
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


# ------------------------------------------------------------ measurements (worker side)

def _fmt(v, spec=".1f"):
    return "n/a" if v is None else format(v, spec)


def _progress(t_start, text):
    print(f"[{time.perf_counter() - t_start:7.1f} s] {text}", file=sys.stderr, flush=True)


def _error(e):
    return f"{type(e).__name__}: {e}".strip()[:2000]


class Runner:
    """Runs measurement tasks in this process. Tasks are plain dicts (JSON in a worker):

    - ``{"op": "hello", "bandwidth": bool, "bw_mib": int}`` -> platform, devices, versions
      and (on >= 2 GPUs, when asked) the measured link bandwidth;
    - ``{"op": "measure", "algo", "N", "M", "quant", "H", "K", "E", "dtype", "chain",
      "unroll", "reps", "warmup", "profile", "seed"}`` -> wall/kernel time per call of one
      chained program;
    - ``{"op": "check", ...same keys...}`` -> one fused call vs one xla call, residual diff.
    """

    def __init__(self, platform_arg):
        self.platform, self.devices = select_devices(platform_arg)
        self._key = self._inp = None

    def run(self, task):
        crash = os.environ.get(TEST_CRASH_ENV)
        if crash and crash == f"{task.get('quant')}:{task.get('M')}:{task.get('algo')}":
            import signal  # test hook: die like a segfault in XLA's compiler would
            os.kill(os.getpid(), signal.SIGSEGV)
        try:
            return getattr(self, "_" + task["op"])(task)
        except Exception as e:  # reported per task; the run goes on
            return dict(error=_error(e))

    def _hello(self, task):
        import jax

        import jax_moe_ar as mar
        devs = self.devices
        meta = dict(platform=self.platform, device_kind=getattr(devs[0], "device_kind", "?"),
                    device_count=len(devs),
                    gpu_count=len(devs) if self.platform == "gpu" else 0,
                    jax_version=jax.__version__, jaxlib_version=_jaxlib_version(),
                    jax_moe_ar_version=mar.__version__, python=_platform.python_version(),
                    host=_platform.node())
        if not task.get("bandwidth"):
            return meta
        if self.platform != "gpu" or len(devs) < 2:
            why = "CPU devices have no NVLink" if self.platform != "gpu" else "needs two GPUs"
            meta["bandwidth"] = dict(gbps=None, note=f"not measured: {why}")
            return meta
        try:
            meta["bandwidth"] = measure_bandwidth(devs, task["bw_mib"])
        except Exception as e:
            meta["bandwidth"] = dict(gbps=None, error=_error(e))
        try:
            meta["bandwidth_ppermute"] = measure_ppermute_bandwidth(devs, task["bw_mib"])
        except Exception as e:
            meta["bandwidth_ppermute"] = dict(gbps=None, error=_error(e))
        return meta

    def _case(self, t):
        """(mesh, devices, inputs) of a task; inputs are kept for the next task of the same
        (N, M, ...), so the quants and algorithms of one case share them."""
        key = tuple(t[k] for k in ("N", "M", "H", "K", "E", "dtype", "seed"))
        if key != self._key:
            self._key = self._inp = None
            devs = self.devices[:t["N"]]
            mesh = tp_mesh(devs)
            inp = make_inputs(mesh, t["N"], t["M"], t["H"], t["K"], t["E"], dtype_of(t["dtype"]),
                              t["seed"])
            self._key, self._inp = key, (mesh, devs, inp)
        return self._inp

    def _measure(self, t):
        import jax_moe_ar as mar
        mesh, devs, inp = self._case(t)
        args = tuple(inp[n] for n in IN_SPEC_NAMES)
        res = dict(rows_per_rank=inp["rows"])
        t0 = time.perf_counter()
        compiled = chain_program(mesh, t["quant"], t["algo"], t["chain"], t["unroll"]) \
            .lower(*args).compile()
        res["compile_s"] = time.perf_counter() - t0
        res["path"] = compiled_path(compiled.as_text())
        wall, ts = time_runs(compiled, args, t["reps"], t["warmup"])
        mar.check_errors()
        res["wall_us"] = wall / t["chain"] * 1e6
        res["wall_runs_us"] = [x / t["chain"] * 1e6 for x in ts]
        res["kernel_us"] = None
        if self.platform != "gpu":
            res["kernel_note"] = "no GPU device planes on CPU"
        elif not t["profile"]:
            res["kernel_note"] = "--no-profile"
        else:
            prof, why = profile_kernel_time(compiled, args, devs, t["chain"])
            mar.check_errors()
            if prof is None:
                res["kernel_note"] = why
            else:
                res.update(prof)
        return res

    def _check(self, t):
        mesh, _, inp = self._case(t)
        args = tuple(inp[n] for n in IN_SPEC_NAMES)
        a, b = check_program(mesh, t["quant"], t["algo"])(*args)
        a = np.asarray(a, np.float32)
        b = np.asarray(b, np.float32)
        rel = float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))
        return dict(residual_rel_diff=rel, ok=bool(rel < CHECK_TOLERANCE))


def worker_main(args) -> int:
    """The measuring process: one JSON task per line on stdin, one JSON result per line
    on the original stdout; everything else it prints goes to stderr."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    runner = Runner(args.platform)
    for line in sys.stdin:
        if not line.strip():
            continue
        result = runner.run(json.loads(line))
        proto.write(json.dumps(result, default=_json_default) + "\n")
        proto.flush()
    return 0


# -------------------------------------------------------------- the run (parent side)

class InProcess:
    """Runs the tasks here (``--in-process``): no isolation from crashes."""

    def __init__(self, platform_arg):
        self.runner = Runner(platform_arg)

    def ask(self, task, timeout):
        return self.runner.run(task), None

    def close(self):
        pass


class WorkerPool:
    """Runs the tasks in a child process, so that a crash (a segfault in XLA's compiler,
    a kernel that takes the process down) or a hang costs one measurement, not the
    bench: the task is reported as failed and a fresh child takes the next one."""

    def __init__(self, platform_arg):
        self.cmd = [sys.executable, "-m", "jax_moe_ar", "bench", "--worker",
                    "--platform", platform_arg]
        self.proc = None
        self.restarts = 0

    def _spawn(self):
        import queue
        import subprocess
        import threading
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)
        self.lines = queue.Queue()

        def pump(stream, q):
            for line in stream:
                q.put(line)
            q.put(None)

        threading.Thread(target=pump, args=(self.proc.stdout, self.lines), daemon=True).start()

    def ask(self, task, timeout):
        import queue
        if self.proc is None or self.proc.poll() is not None:
            if self.proc is not None:
                self.restarts += 1
            self._spawn()
        try:
            self.proc.stdin.write(json.dumps(task) + "\n")
            self.proc.stdin.flush()
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            self._kill()
            return None, (f"no answer within {timeout:.0f} s (hung?); the measuring process "
                          "was killed and a fresh one takes the next task")
        except (BrokenPipeError, OSError):
            line = None
        if line is None:
            rc = self.proc.wait()
            return None, (f"the measuring process died ({_describe_exit(rc)}) during this "
                          "task — e.g. a crash in XLA's compiler or in a kernel; its last "
                          "words are on stderr. A fresh one takes the next task")
        return json.loads(line), None

    def _kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def close(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except Exception:
                self._kill()


def _describe_exit(rc):
    if rc is not None and rc < 0:
        import signal
        try:
            return f"signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"signal {-rc}"
    return f"exit status {rc}"


def table_lines(rows, algorithms, platform):
    head = (f"{'ranks':>5} {'quant':<13} {'M':>5} {'algo':<7} {'fused µs':>9} {'fused µs':>9} "
            f"{'xla µs':>9} {'xla µs':>9} {'speedup':>7} {'floor µs':>8} {'% of':>6}  ok")
    head2 = (f"{'':>5} {'':<13} {'':>5} {'':<7} {'wall':>9} {'kernel':>9} "
             f"{'wall':>9} {'kernel':>9} {'xla/fu':>7} {'':>8} {'floor':>6}")
    out = [head, head2, "-" * len(head)]
    for r in rows:
        for algo in algorithms:
            f = r["fused"].get(algo, {})
            x = r["xla"]
            chk = (r.get("check") or {}).get(algo)
            ok = "-" if chk is None else ("yes" if chk.get("ok") else "NO")
            if algo in r["errors"] or "error" in x:
                ok = "ERR"
            out.append(
                f"{r['ranks']:>5} {r['quant']:<13} {r['M']:>5} {algo:<7} "
                f"{_fmt(f.get('wall_us')):>9} {_fmt(f.get('kernel_us')):>9} "
                f"{_fmt(x.get('wall_us')):>9} {_fmt(x.get('kernel_us')):>9} "
                f"{_fmt(r['speedup'].get(algo), '.2f'):>7} {_fmt(r['floor_us']):>8} "
                f"{_fmt(r['pct_of_floor'].get(algo), '.0f'):>6}  {ok}")
    return out


def write_plot(path, rows, meta, algorithms):
    """latency vs M, log-log, one panel per quant; returns None or why not written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        return f"matplotlib is not available ({type(e).__name__}: {e}); install it for the plot"
    quants = list(dict.fromkeys(r["quant"] for r in rows))
    ranks = sorted({r["ranks"] for r in rows})
    ncols = min(3, len(quants))
    nrows = -(-len(quants) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 4.0 * nrows + 0.6),
                             squeeze=False)
    for ax in axes.flat[len(quants):]:
        ax.set_visible(False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, q in zip(axes.flat, quants):
        for i, n in enumerate(ranks):
            sel = sorted((r for r in rows if r["quant"] == q and r["ranks"] == n),
                         key=lambda r: r["M"])
            c = colors[i % len(colors)]
            ms = [r["M"] for r in sel]

            def series(get):
                pts = [(m, get(r)) for m, r in zip(ms, sel)]
                return [p[0] for p in pts if p[1]], [p[1] for p in pts if p[1]]

            for j, algo in enumerate(algorithms):
                xs, ys = series(lambda r, a=algo: r["fused"].get(a, {}).get("wall_us"))
                if xs:
                    ax.plot(xs, ys, color=c, marker="o^vD"[j % 4], linestyle=("-", "-.")[j % 2],
                            label=f"fused {algo} N={n}" if len(algorithms) > 1 else
                            f"fused N={n}")
            xs, ys = series(lambda r: r["xla"].get("wall_us"))
            if xs:
                ax.plot(xs, ys, "s--", color=c, label=f"xla N={n}")
            xs, ys = series(lambda r: r["floor_us"])
            if xs:
                ax.plot(xs, ys, ":", color=c, label=f"NVLink floor N={n}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(q)
        ax.set_xlabel("tokens M")
        ax.set_ylabel(f"µs per call (wall, chain of {meta['chain']})")
        ax.grid(True, which="both", alpha=0.3)
    axes.flat[0].legend(fontsize=7)
    title = (f"jax_moe_ar bench — {meta['device_kind']} x{meta['device_count']}, "
             f"H={meta['H']}, K={meta['K']}, {meta['dtype']}, jax {meta['jax_version']}")
    if meta["platform"] != "gpu":
        title += "\nCPU numbers: not meaningful for the GPU targets"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def main(args) -> int:
    if args.worker:
        return worker_main(args)
    t_start = time.perf_counter()
    bad = [q for q in args.quant if q not in QUANTS]
    bad += [a for a in args.algorithms if a not in ("auto", "oneshot", "twoshot")]
    if bad:
        print(f"error: unknown --quant/--algorithms value(s) {bad}; quants: {QUANTS}, "
              "algorithms: auto, oneshot, twoshot", file=sys.stderr)
        return 2

    pool = InProcess(args.platform) if args.in_process else WorkerPool(args.platform)
    try:
        return _run(args, pool, t_start)
    finally:
        pool.close()


def _run(args, pool, t_start) -> int:
    hello, err = pool.ask(dict(op="hello", bandwidth=True, bw_mib=args.bw_mib),
                          args.task_timeout)
    if err or "error" in hello:
        print(f"error: could not start measuring: {err or hello['error']}", file=sys.stderr)
        return 1
    platform, ndev, kind = hello["platform"], hello["device_count"], hello["device_kind"]
    defaults = GPU_DEFAULTS if platform == "gpu" else CPU_DEFAULTS
    Ms = args.M or defaults["M"]
    H = args.H or defaults["H"]
    chain = args.chain or defaults["chain"]
    if platform == "gpu":
        ranks = args.ranks or (tuple(n for n in (2, 4, 8) if n <= ndev) or (1,))
    else:
        ranks = args.ranks or (2, 4)
    if H % 16 or ("fp8_per_group" in args.quant and H % 128):
        print(f"error: --H {H} must be a multiple of 16 (and of 128 for fp8_per_group)",
              file=sys.stderr)
        return 2
    if chain < 1:
        print("error: --chain must be >= 1", file=sys.stderr)
        return 2
    skipped = [n for n in ranks if n > ndev]
    ranks = [n for n in ranks if n <= ndev]
    if skipped:
        print(f"note: skipping group sizes {skipped}: only {ndev} {platform} devices",
              file=sys.stderr)
    bad_e = [n for n in ranks if args.experts % n]
    if bad_e or args.K > args.experts:
        print(f"error: --experts {args.experts} must be >= --K and divisible by every group "
              f"size (not by {bad_e})", file=sys.stderr)
        return 2
    if not ranks:
        print("error: no group size fits the devices", file=sys.stderr)
        return 2

    meta = dict(hello)
    meta.update(H=H, K=args.K, experts=args.experts, dtype=args.dtype, chain=chain,
                unroll=args.unroll, reps=args.reps, warmup=args.warmup,
                routed_scaling_factor=ROUTED_SCALING_FACTOR, algorithms=list(args.algorithms),
                isolation="in-process" if args.in_process else "worker process",
                floor_formula=FLOOR_FORMULA.replace("BW", "bandwidth") +
                " — reduce-scatter of the T partials + all-gather of the requested outputs, "
                "per GPU",
                pct_of_floor="floor / fused wall time per call",
                kernel_time="per GPU: union of device-plane event intervals of one profiled "
                            "run / chain, mean over the group's GPUs",
                started=time.strftime("%Y-%m-%d %H:%M:%S"))
    if platform == "cpu":
        meta["note"] = CPU_NOTE
        print(CPU_NOTE)
        print(CPU_NOTE, file=sys.stderr)
    bw = meta["bandwidth"]
    bandwidth = bw.get("gbps")
    if bandwidth:
        _progress(t_start, f"link bandwidth: {bandwidth:.1f} GB/s best, "
                           f"{bw['gbps_median']:.1f} GB/s median ({bw['method']})")
        if bandwidth < 100:
            print(f"warning: {bandwidth:.0f} GB/s GPU0 -> GPU1 looks like a copy through the "
                  "host, not NVLink; the floor uses it anyway", file=sys.stderr)
        pp = meta.get("bandwidth_ppermute") or {}
        if pp.get("gbps"):
            _progress(t_start, f"cross-check: {pp['gbps']:.1f} GB/s best, "
                               f"{pp['gbps_median']:.1f} GB/s median ({pp['method']}; not "
                               "used for the floor)")
    else:
        _progress(t_start, f"link bandwidth {bw.get('note') or 'failed: ' + str(bw.get('error'))}"
                           "; floor = n/a")

    os.makedirs(args.out, exist_ok=True)
    jpath = os.path.join(args.out, "bench.json")
    rows = []

    def save(complete):
        # Rewritten after every row, so a crash or a timeout still leaves the rows so far.
        meta["complete"] = complete
        meta["elapsed_s"] = time.perf_counter() - t_start
        tmp = jpath + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(dict(meta=meta, rows=rows), fh, indent=1, default=_json_default)
        os.replace(tmp, jpath)

    itemsize = np.dtype(dtype_of(args.dtype)).itemsize
    total = len(ranks) * len(Ms) * len(args.quant)
    _progress(t_start, f"{total} rows: ranks {list(ranks)} x M {list(Ms)} x quant "
                       f"{list(args.quant)}; H={H} K={args.K} chain={chain} on "
                       f"{ndev} {platform} device(s) ({kind})")
    for N in ranks:
        for M in Ms:
            for q in args.quant:
                task = dict(N=N, M=M, quant=q, H=H, K=args.K, E=args.experts, dtype=args.dtype,
                            chain=chain, unroll=args.unroll, reps=args.reps,
                            warmup=args.warmup, profile=not args.no_profile,
                            seed=args.seed + 1000 * N + M)
                row = measure_row(pool, task, args, itemsize, bandwidth)
                rows.append(row)
                a0 = args.algorithms[0]
                f = row["fused"].get(a0, {})
                msg = (f"row {len(rows)}/{total}: N={N} {q} M={M}: fused "
                       f"{_fmt(f.get('wall_us'))} µs, xla {_fmt(row['xla'].get('wall_us'))} "
                       f"µs per call [{f.get('path', '?')}]")
                if f.get("kernel_us") is not None:
                    msg += (f"; kernel {_fmt(f.get('kernel_us'))} vs "
                            f"{_fmt(row['xla'].get('kernel_us'))} µs")
                if row["errors"]:
                    msg += f" ERRORS: {row['errors']}"
                _progress(t_start, msg)
                save(complete=False)

    rows.sort(key=lambda r: (r["ranks"], QUANTS.index(r["quant"]), r["M"]))
    if isinstance(pool, WorkerPool):
        meta["worker_restarts"] = pool.restarts
    bwtxt = (f"{bandwidth:.1f} GB/s (GPU0->GPU1 device_put)" if bandwidth
             else "n/a (" + (bw.get("note") or bw.get("error") or "") + ")")
    paths = sorted({res.get("path", "?") for r in rows for res in r["fused"].values()
                    if "path" in res})
    import jax  # the version only; this process never starts a backend
    print(f"\njax_moe_ar bench — {ndev} x {kind} ({platform}), jax {jax.__version__}, "
          f"H={H}, K={args.K}, {args.dtype}, chain={chain} calls per program")
    print("fused path: " + ("; ".join(f"{p} = {PATH_DESCRIPTIONS.get(p, p)}" for p in paths)
                            or "n/a"))
    if "xla" in paths and platform == "gpu":
        print("warning: some fused rows compiled to the plain-XLA fallback (see the warning "
              "on stderr and 'path' in the JSON); those rows do not time the fused kernel")
    print(f"per call: wall = median program time / chain; kernel = GPU busy time from a "
          f"profile / chain ({'n/a on CPU' if platform != 'gpu' else 'mean over the GPUs'})")
    print(f"{FLOOR_FORMULA}, BW = {bwtxt}; % of floor = floor / fused wall")
    print("\n".join(table_lines(rows, args.algorithms, platform)))
    errs = [(r["ranks"], r["quant"], r["M"], a, e) for r in rows for a, e in r["errors"].items()]
    for n, q, m, a, e in errs:
        print(f"error N={n} {q} M={m} {a}: {e.splitlines()[0][:300]}")
    if platform == "cpu":
        print(CPU_NOTE)

    save(complete=True)
    ppath = os.path.join(args.out, "bench.png")
    why = write_plot(ppath, rows, meta, args.algorithms)
    print(f"wrote {jpath}" + (f" and {ppath}" if why is None else f"; no plot: {why}"))
    _progress(t_start, "done")
    n_err = sum(bool(r["errors"]) for r in rows)
    n_bad = sum(1 for r in rows for c in (r.get("check") or {}).values() if not c.get("ok"))
    if n_err or n_bad:
        print(f"{n_err} row(s) with errors, {n_bad} failed agreement check(s)", file=sys.stderr)
        return 1
    return 0


def measure_row(pool, task, args, itemsize, bandwidth):
    """One (ranks, quant, M) row: the xla program, each fused algorithm, the checks."""
    N, M, H, q = task["N"], task["M"], task["H"], task["quant"]
    fb = floor_bytes(N, M, H, itemsize, q)
    row = dict(ranks=N, quant=q, M=M, H=H, K=task["K"], dtype=task["dtype"],
               rows_per_rank=None, floor_bytes=fb,
               floor_us=fb / (bandwidth * 1e9) * 1e6 if bandwidth else None,
               xla={}, fused={}, errors={}, speedup={}, pct_of_floor={})
    for algo in ("xla",) + tuple(args.algorithms):
        res, err = pool.ask(dict(task, op="measure", algo=algo), args.task_timeout)
        res = res if err is None else dict(error=err)
        if "error" in res:
            row["errors"][algo] = res["error"]
        row["rows_per_rank"] = res.pop("rows_per_rank", row["rows_per_rank"])
        if algo == "xla":
            row["xla"] = res
        else:
            row["fused"][algo] = res
    xw = row["xla"].get("wall_us")
    for algo, res in row["fused"].items():
        fw = res.get("wall_us")
        row["speedup"][algo] = xw / fw if (xw and fw) else None
        row["pct_of_floor"][algo] = (100.0 * row["floor_us"] / fw
                                     if (fw and row["floor_us"]) else None)
    if not args.no_check:
        row["check"] = {}
        for algo in args.algorithms:
            if algo in row["errors"]:
                continue
            res, err = pool.ask(dict(task, op="check", algo=algo), args.task_timeout)
            res = res if err is None else dict(error=err)
            if "error" in res:
                res["ok"] = False
            row["check"][algo] = res
    return row


def _jaxlib_version():
    try:
        import jaxlib
        return jaxlib.__version__
    except Exception:
        return None


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    return str(o)


if __name__ == "__main__":  # pragma: no cover
    from .__main__ import main as _cli
    sys.exit(_cli(["bench"] + sys.argv[1:]))
