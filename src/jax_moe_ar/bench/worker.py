"""The measuring process: ``python -m jax_moe_ar.bench.worker [--platform P]`` reads one
JSON task per line on stdin and writes one JSON result per line on stdout (everything else
it prints goes to stderr). The ``Runner`` does the work; ``--in-process`` uses it directly.

The bench's parent starts one such process per set of XLA flags (the flags are read when
the backend starts), so a crash or a hang costs one measurement, not the bench.
"""

from __future__ import annotations

import argparse
import json
import os
import platform as _platform
import sys
import time

import numpy as np

from ..cli import add_platform_argument, compiled_path, dtype_of, select_devices, tp_mesh
from ..testing import force_host_devices
from .inputs import IN_SPEC_NAMES, make_inputs
from .programs import NOOP, NOOP_TARGET, chain_program, check_program
from .report import json_default
from .timing import measure_bandwidth, measure_ppermute_bandwidth, profile_kernel_time, time_runs

CHECK_TOLERANCE = 2e-2  # single-call residual agreement fused vs xla (bf16)
# Test hook: "quant:M:algo" makes the measuring process crash on that task (see tests).
TEST_CRASH_ENV = "JAX_MOE_AR_BENCH_TEST_CRASH"


def error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".strip()[:2000]


def _jaxlib_version():
    try:
        import jaxlib
        return jaxlib.__version__
    except Exception:
        return None


class Runner:
    """Runs measurement tasks in this process. Tasks are plain dicts (JSON in a worker):

    - ``{"op": "hello", "bandwidth": bool, "bw_mib": int}`` -> platform, devices, versions
      and (on >= 2 GPUs, when asked) the measured link bandwidth;
    - ``{"op": "measure", "algo", "N", "M", "quant", "H", "K", "E", "dtype", "chain",
      "unroll", "reps", "warmup", "profile", "seed"}`` -> wall/kernel time per call of one
      chained program; ``algo`` is "xla", a fused algorithm, or "noop" (the no-op chain);
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
            return dict(error=error_text(e))

    def _hello(self, task):
        import jax

        import jax_moe_ar as mar
        devs = self.devices
        meta = dict(platform=self.platform, device_kind=getattr(devs[0], "device_kind", "?"),
                    device_count=len(devs),
                    gpu_count=len(devs) if self.platform == "gpu" else 0,
                    jax_version=jax.__version__, jaxlib_version=_jaxlib_version(),
                    jax_moe_ar_version=mar.__version__, python=_platform.python_version(),
                    host=_platform.node(), xla_flags=os.environ.get("XLA_FLAGS", ""))
        if not task.get("bandwidth"):
            return meta
        if self.platform != "gpu" or len(devs) < 2:
            why = "CPU devices have no NVLink" if self.platform != "gpu" else "needs two GPUs"
            meta["bandwidth"] = dict(gbps=None, note=f"not measured: {why}")
            return meta
        try:
            meta["bandwidth"] = measure_bandwidth(devs, task["bw_mib"])
        except Exception as e:
            meta["bandwidth"] = dict(gbps=None, error=error_text(e))
        try:
            meta["bandwidth_ppermute"] = measure_ppermute_bandwidth(devs, task["bw_mib"])
        except Exception as e:
            meta["bandwidth_ppermute"] = dict(gbps=None, error=error_text(e))
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
        compiled = chain_program(mesh, t["quant"], t["algo"], t["chain"], t["unroll"],
                                 t.get("scatter", False)).lower(*args).compile()
        res["compile_s"] = time.perf_counter() - t0
        text = compiled.as_text()
        if t["algo"] != NOOP:
            res["path"] = compiled_path(text)
        elif NOOP_TARGET in text:
            res["path"] = "ffi-noop"
        else:
            raise RuntimeError(f"XLA dropped the {NOOP_TARGET} calls from the compiled chain; "
                               "the no-op column would time an empty program")
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
        a, b = check_program(mesh, t["quant"], t["algo"], t.get("scatter", False))(*args)
        a = np.asarray(a, np.float32)
        b = np.asarray(b, np.float32)
        rel = float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))
        return dict(residual_rel_diff=rel, ok=bool(rel < CHECK_TOLERANCE))


def serve(platform_arg: str) -> int:
    """Answers tasks from stdin until it closes; results go to the original stdout, and
    anything else printed here (JAX's warnings, ours) to stderr."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    runner = Runner(platform_arg)
    for line in sys.stdin:
        if not line.strip():
            continue
        result = runner.run(json.loads(line))
        proto.write(json.dumps(result, default=json_default) + "\n")
        proto.flush()
    return 0


def main(argv=None) -> int:
    # Before JAX starts its CPU backend: a machine without GPUs gets 8 devices, as
    # `python -m jax_moe_ar` gives its own process (harmless on GPU machines).
    force_host_devices(8)
    parser = argparse.ArgumentParser(
        prog="python -m jax_moe_ar.bench.worker",
        description="The bench's measuring process (started by `python -m jax_moe_ar "
                    "bench`): one JSON task per line on stdin, one JSON result per line on "
                    "stdout.")
    add_platform_argument(parser)
    args = parser.parse_args(argv)
    import faulthandler
    faulthandler.enable()  # a crash in native code still names the Python line
    return serve(args.platform)


if __name__ == "__main__":
    sys.exit(main())
