"""The bench's parent side: its arguments, the settings a run takes from them and from the
devices, the loop over rows (per row: both xla columns, each fused algorithm, the no-op
chain, the agreement checks) and the summary. It measures nothing itself: every task goes
to the pool (pool.py), so unless ``--in-process`` this process never starts a JAX backend.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import numpy as np

from ..cli import add_platform_argument, dtype_of, int_list, str_list
from .inputs import QUANTS, ROUTED_SCALING_FACTOR
from .pool import DEFAULT_ENV, InProcess, WorkerPool
from .programs import FLOOR_FORMULA, NOOP, floor_bytes
from .report import BASELINES, XLA, XLA_ONE_SHOT, fmt, summary_lines, write_json, write_plot

ALGORITHMS = ("auto", "oneshot", "twoshot")
GPU_DEFAULTS = dict(M=(1, 8, 32, 128, 512, 2048, 8192), H=7168, chain=200)
CPU_DEFAULTS = dict(M=(1, 8, 32), H=256, chain=20)
CPU_NOTE = ("NOTE: no GPU here — these are CPU numbers (forced host devices, the CPU FFI "
            "path). They are NOT meaningful for the GPU targets of SPEC §6.")
# XLA's own one-shot peer-memory all-reduce (jax 0.10 and 0.11): the "xla 1shot" column.
ONE_SHOT_FLAG = "--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true"
# Two measuring processes share the GPUs; each would otherwise take 75 % of their memory.
_MEMORY_VARS = ("XLA_PYTHON_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_PREALLOCATE",
                "XLA_PYTHON_CLIENT_ALLOCATOR")
_WORKER_MEM_FRACTION = "0.4"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--M", type=int_list, default=None,
                        help="token counts, comma separated (GPU default "
                             "1,8,32,128,512,2048,8192; CPU default 1,8,32)")
    parser.add_argument("--H", type=int, default=None,
                        help="hidden size (GPU default 7168, CPU default 256)")
    parser.add_argument("--K", type=int, default=8, help="experts per token (default 8)")
    parser.add_argument("--experts", type=int, default=256,
                        help="routed experts E, split evenly over the ranks (default 256)")
    parser.add_argument("--dtype", choices=("bf16", "f16", "f32"), default="bf16")
    parser.add_argument("--quant", type=str_list, default=QUANTS,
                        help="quant formats, comma separated, from " + ",".join(QUANTS)
                             + " (default all; fp8_per_group uses group 128, nvfp4 the "
                               "swizzled 128x4 scale layout)")
    parser.add_argument("--ranks", type=int_list, default=None,
                        help="group sizes N, comma separated (default: 2,4,8 as far as there "
                             "are GPUs; 2,4 on CPU)")
    parser.add_argument("--algorithms", type=str_list, default=("auto",),
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
    parser.add_argument("--scatter", action="store_true",
                        help="time the reduce-scatter variant (moe_finalize_reduce_scatter: "
                             "each rank keeps M/N rows) against the lax.psum_scatter "
                             "composition; rows whose M is not a multiple of N are skipped")
    parser.add_argument("--no-check", action="store_true",
                        help="skip the single-call fused vs xla agreement check per row")
    parser.add_argument("--out", default="bench_out",
                        help="directory for bench.json and bench.png (default ./bench_out)")
    parser.add_argument("--task-timeout", type=float, default=600.0,
                        help="seconds one measurement may take before it counts as hung")
    parser.add_argument("--in-process", action="store_true",
                        help="measure in this process (default: in child processes, so a "
                             "crash or hang costs one measurement, not the bench; also "
                             "needed for the 'xla 1shot' column)")
    parser.add_argument("--seed", type=int, default=0)
    add_platform_argument(parser)


def worker_environments() -> dict[str, dict[str, str]]:
    """The variables of each measuring process: the default one, and the xla 1shot one with
    ONE_SHOT_FLAG appended to XLA_FLAGS (both with a bounded share of GPU memory unless
    the user chose how JAX allocates)."""
    memory = ({} if any(v in os.environ for v in _MEMORY_VARS)
              else {"XLA_PYTHON_CLIENT_MEM_FRACTION": _WORKER_MEM_FRACTION})
    flags = (os.environ.get("XLA_FLAGS", "") + " " + ONE_SHOT_FLAG).strip()
    return {DEFAULT_ENV: dict(memory), XLA_ONE_SHOT: dict(memory, XLA_FLAGS=flags)}


def main(args) -> int:
    t_start = time.perf_counter()
    bad = [q for q in args.quant if q not in QUANTS]
    bad += [a for a in args.algorithms if a not in ALGORITHMS]
    if bad:
        print(f"error: unknown --quant/--algorithms value(s) {bad}; quants: {QUANTS}, "
              f"algorithms: {', '.join(ALGORITHMS)}", file=sys.stderr)
        return 2
    pool = (InProcess(args.platform) if args.in_process
            else WorkerPool(args.platform, worker_environments()))
    try:
        return _run(args, pool, t_start)
    finally:
        pool.close()


@dataclasses.dataclass(frozen=True)
class Settings:
    """What one run measures, from the arguments and the platform's defaults."""

    Ms: tuple[int, ...]
    H: int
    chain: int
    ranks: tuple[int, ...]


def _run(args, pool, t_start) -> int:
    hello, err = pool.ask(dict(op="hello", bandwidth=True, bw_mib=args.bw_mib),
                          args.task_timeout)
    if err or "error" in hello:
        print(f"error: could not start measuring: {err or hello['error']}", file=sys.stderr)
        return 1
    settings, problem = _settings(args, hello)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    meta = _meta(args, hello, settings)
    if hello["platform"] == "cpu":
        meta["note"] = CPU_NOTE
        print(CPU_NOTE)
        print(CPU_NOTE, file=sys.stderr)
    bandwidth = _bandwidth(meta, t_start)
    meta["xla_one_shot"] = _one_shot_status(pool, args, hello["platform"])
    if meta["xla_one_shot"].get("skipped"):
        _progress(t_start, f"xla 1shot column skipped: {meta['xla_one_shot']['skipped']}")

    os.makedirs(args.out, exist_ok=True)
    jpath = os.path.join(args.out, "bench.json")

    def save(rows, complete):
        # Rewritten after every row, so a crash or a timeout still leaves the rows so far.
        meta["complete"] = complete
        meta["elapsed_s"] = time.perf_counter() - t_start
        write_json(jpath, meta, rows)

    rows = _measure_rows(args, pool, settings, meta, bandwidth, t_start, save)
    rows.sort(key=lambda r: (r["ranks"], QUANTS.index(r["quant"]), r["M"]))
    if isinstance(pool, WorkerPool):
        meta["worker_restarts"] = pool.restarts
    _print_summary(args, meta, rows, bandwidth)
    save(rows, complete=True)
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


def _settings(args, hello):
    """(Settings, None), or (None, why the arguments do not fit these devices)."""
    platform, ndev = hello["platform"], hello["device_count"]
    defaults = GPU_DEFAULTS if platform == "gpu" else CPU_DEFAULTS
    H = args.H or defaults["H"]
    chain = args.chain or defaults["chain"]
    if platform == "gpu":
        ranks = args.ranks or (tuple(n for n in (2, 4, 8) if n <= ndev) or (1,))
    else:
        ranks = args.ranks or (2, 4)
    if H % 16 or ("fp8_per_group" in args.quant and H % 128):
        return None, f"--H {H} must be a multiple of 16 (and of 128 for fp8_per_group)"
    if chain < 1:
        return None, "--chain must be >= 1"
    skipped = [n for n in ranks if n > ndev]
    ranks = tuple(n for n in ranks if n <= ndev)
    if skipped:
        print(f"note: skipping group sizes {skipped}: only {ndev} {platform} devices",
              file=sys.stderr)
    bad_e = [n for n in ranks if args.experts % n]
    if bad_e or args.K > args.experts:
        return None, (f"--experts {args.experts} must be >= --K and divisible by every group "
                      f"size (not by {bad_e})")
    if not ranks:
        return None, "no group size fits the devices"
    return Settings(Ms=tuple(args.M or defaults["M"]), H=H, chain=chain, ranks=ranks), None


def _meta(args, hello, s):
    meta = dict(hello)
    meta.update(H=s.H, K=args.K, experts=args.experts, dtype=args.dtype, chain=s.chain,
                unroll=args.unroll, reps=args.reps, warmup=args.warmup,
                routed_scaling_factor=ROUTED_SCALING_FACTOR, algorithms=list(args.algorithms),
                op=("moe_finalize_reduce_scatter (each rank keeps M/N rows) vs the "
                    "lax.psum_scatter composition" if args.scatter else
                    "moe_finalize_allreduce vs the lax.psum composition"),
                isolation="in-process" if args.in_process else "worker process",
                floor_formula=FLOOR_FORMULA.replace("BW", "bandwidth") +
                " — reduce-scatter of the T partials + all-gather of the requested outputs, "
                "per GPU",
                pct_of_floor="floor / fused wall time per call",
                kernel_time="per GPU: union of device-plane event intervals of one profiled "
                            "run / chain, mean over the group's GPUs",
                speedup="wall time of the faster of 'xla' and 'xla_one_shot' (the row's "
                        "speedup_vs) / fused wall time",
                noop="the same chain with jax_moe_ar_noop_v1 (a custom call that enqueues "
                     "nothing on a GPU, a 4-byte memset only inside a command-buffer capture; "
                     "its 4-byte token feeds the next call) in place of the op: XLA's own cost "
                     "per custom call (docs/perf.md v15)",
                beyond_noop_us="fused wall - ffi no-op wall per call: the part that is the op's",
                started=time.strftime("%Y-%m-%d %H:%M:%S"))
    if not args.in_process:
        meta["worker_env"] = worker_environments()
    return meta


def _bandwidth(meta, t_start):
    """The measured link bandwidth in GB/s (None when not measured), said on stderr."""
    bw = meta["bandwidth"]
    bandwidth = bw.get("gbps")
    if not bandwidth:
        _progress(t_start, f"link bandwidth {bw.get('note') or 'failed: ' + str(bw.get('error'))}"
                           "; floor = n/a")
        return None
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
    return bandwidth


def _one_shot_status(pool, args, platform):
    """{"flag", and "skipped": why} for the xla 1shot column; its process is started here
    once, so a flag this XLA does not know costs one start, not one per row."""
    info = dict(flag=ONE_SHOT_FLAG)
    if platform != "gpu":
        info["skipped"] = "the flag selects XLA's GPU all-reduce kernel; meaningless on CPU"
    elif args.in_process:
        info["skipped"] = ("needs a measuring process of its own (XLA reads its flags when "
                           "its backend starts); not with --in-process")
    else:
        hello, err = pool.ask(dict(op="hello", bandwidth=False), args.task_timeout,
                              env=XLA_ONE_SHOT)
        if err or "error" in hello:
            info["skipped"] = f"its measuring process failed: {err or hello['error']}"
        else:
            info["xla_flags"] = hello.get("xla_flags")
    return info


def _measure_rows(args, pool, s, meta, bandwidth, t_start, save):
    itemsize = np.dtype(dtype_of(args.dtype)).itemsize
    total = len(s.ranks) * len(s.Ms) * len(args.quant)
    _progress(t_start, f"{total} rows: ranks {list(s.ranks)} x M {list(s.Ms)} x quant "
                       f"{list(args.quant)}; H={s.H} K={args.K} chain={s.chain} on "
                       f"{meta['device_count']} {meta['platform']} device(s) "
                       f"({meta['device_kind']})")
    one_shot_skipped = meta["xla_one_shot"].get("skipped")
    rows = []
    for N in s.ranks:
        for M in s.Ms:
            if args.scatter and M % N:
                _progress(t_start, f"skipping M={M} with N={N}: the reduce-scatter needs M "
                                   "divisible by N")
                continue
            for q in args.quant:
                task = dict(N=N, M=M, quant=q, H=s.H, K=args.K, E=args.experts,
                            dtype=args.dtype, chain=s.chain, unroll=args.unroll,
                            reps=args.reps, warmup=args.warmup, profile=not args.no_profile,
                            seed=args.seed + 1000 * N + M, scatter=args.scatter)
                rows.append(measure_row(pool, task, args, itemsize, bandwidth,
                                        one_shot_skipped))
                _progress(t_start, _row_message(rows[-1], len(rows), total, args.algorithms))
                save(rows, complete=False)
    return rows


def measure_row(pool, task, args, itemsize, bandwidth, one_shot_skipped=None):
    """One (ranks, quant, M) row: both xla columns, each fused algorithm, the no-op chain,
    the checks, and what follows from them (speedups, % of floor, beyond no-op)."""
    N, M, H, q = task["N"], task["M"], task["H"], task["quant"]
    fb = floor_bytes(N, M, H, itemsize, q, scatter=task.get("scatter", False))
    row = dict(ranks=N, quant=q, M=M, H=H, K=task["K"], dtype=task["dtype"],
               scatter=task.get("scatter", False),
               rows_per_rank=None, floor_bytes=fb,
               floor_us=fb / (bandwidth * 1e9) * 1e6 if bandwidth else None,
               xla={}, xla_one_shot={}, noop={}, fused={}, errors={}, speedup={},
               speedup_vs=None, pct_of_floor={}, beyond_noop_us={})
    # (where the result goes, the program's algorithm, the process's environment)
    jobs = [(XLA, "xla", DEFAULT_ENV)]
    if one_shot_skipped:
        row[XLA_ONE_SHOT] = dict(skipped=one_shot_skipped)
    else:
        jobs.append((XLA_ONE_SHOT, "xla", XLA_ONE_SHOT))
    jobs += [(algo, algo, DEFAULT_ENV) for algo in args.algorithms] + [(NOOP, NOOP, DEFAULT_ENV)]
    for key, algo, env in jobs:
        res, err = pool.ask(dict(task, op="measure", algo=algo), args.task_timeout, env=env)
        res = res if err is None else dict(error=err)
        if "error" in res:
            row["errors"][key] = res["error"]
        row["rows_per_rank"] = res.pop("rows_per_rank", row["rows_per_rank"])
        if key in BASELINES:
            row[key] = res
        else:
            row["fused"][key] = res
    _derive(row)
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


def _derive(row):
    """Speedups against the faster xla column, % of floor, fused minus no-op."""
    walls = {k: row[k]["wall_us"] for k in (XLA, XLA_ONE_SHOT) if row[k].get("wall_us")}
    row["speedup_vs"] = min(walls, key=walls.get) if walls else None
    xw = walls.get(row["speedup_vs"])
    nw = row[NOOP].get("wall_us")
    for algo, res in row["fused"].items():
        fw = res.get("wall_us")
        row["speedup"][algo] = xw / fw if (xw and fw) else None
        row["pct_of_floor"][algo] = (100.0 * row["floor_us"] / fw
                                     if (fw and row["floor_us"]) else None)
        row["beyond_noop_us"][algo] = fw - nw if (fw and nw) else None


def _row_message(row, i, total, algorithms):
    f = row["fused"].get(algorithms[0], {})
    msg = (f"row {i}/{total}: N={row['ranks']} {row['quant']} M={row['M']}: fused "
           f"{fmt(f.get('wall_us'))} µs, xla {fmt(row[XLA].get('wall_us'))} µs")
    if "skipped" not in row[XLA_ONE_SHOT]:
        msg += f", xla 1shot {fmt(row[XLA_ONE_SHOT].get('wall_us'))} µs"
    msg += f", ffi no-op {fmt(row[NOOP].get('wall_us'))} µs per call [{f.get('path', '?')}]"
    if f.get("kernel_us") is not None:
        msg += (f"; kernel {fmt(f.get('kernel_us'))} vs "
                f"{fmt(row[XLA].get('kernel_us'))} µs")
    if row["errors"]:
        msg += f" ERRORS: {row['errors']}"
    return msg


def _print_summary(args, meta, rows, bandwidth):
    bw = meta["bandwidth"]
    bwtxt = (f"{bandwidth:.1f} GB/s (GPU0->GPU1 device_put)" if bandwidth
             else "n/a (" + (bw.get("note") or bw.get("error") or "") + ")")
    print("\n".join(summary_lines(meta, rows, args.algorithms, FLOOR_FORMULA, bwtxt)))
    errs = [(r["ranks"], r["quant"], r["M"], a, e) for r in rows for a, e in r["errors"].items()]
    for n, q, m, a, e in errs:
        print(f"error N={n} {q} M={m} {a}: {e.splitlines()[0][:300]}")
    if meta["platform"] == "cpu":
        print(CPU_NOTE)


def _progress(t_start, text):
    print(f"[{time.perf_counter() - t_start:7.1f} s] {text}", file=sys.stderr, flush=True)
