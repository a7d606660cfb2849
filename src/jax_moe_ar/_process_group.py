"""Launches N JAX processes on this machine under jax.distributed, runs one function in
each, and collects what each returns (jax_moe_ar.testing re-exports it)."""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Sequence

# The child restores the parent's sys.path before unpickling anything, so that the
# function (pickled by reference) imports from where the parent imported it.
_BOOT = ("import pickle, sys; f = open(sys.argv[1], 'rb'); sys.path[:] = pickle.load(f); "
         "from jax_moe_ar._process_group import _child_main; _child_main(f, sys.argv[2])")


class ProcessGroupError(AssertionError):
    """Some process of the group raised, crashed or did not finish in time."""


@dataclasses.dataclass
class ProcessResult:
    """What one process of the group did."""

    process_id: int
    value: Any = None          # what the function returned
    error: str | None = None   # the exception's traceback, or why the process gave no result
    returncode: int | None = None
    output: str = ""           # its stdout and stderr

    @property
    def ok(self) -> bool:
        return self.error is None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _child_env(platform: str, devices_per_process: int, env: dict | None) -> dict:
    out = dict(os.environ)
    if platform == "cpu":
        flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                       out.get("XLA_FLAGS", ""))
        out["XLA_FLAGS"] = (flags + f" --xla_force_host_platform_device_count="
                            f"{devices_per_process}").strip()
        out["JAX_PLATFORMS"] = "cpu"
    else:
        out["JAX_PLATFORMS"] = "cuda"
        out.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # processes may share a GPU
    out.update(env or {})
    return out


def run_process_group(fn: Callable, n_processes: int, *, args: Sequence = (),
                      kwargs: dict | None = None, devices_per_process: int = 1,
                      platform: str = "cpu", gpu_ids: Sequence[Sequence[int]] | None = None,
                      timeout_s: float = 120.0, grace_s: float = 10.0, env: dict | None = None,
                      per_process_args: Sequence[Sequence] | None = None,
                      check: bool = True) -> list:
    """Runs ``fn(*args, **kwargs)`` in each of `n_processes` fresh Python processes that
    form one multi-process JAX program (``jax.distributed.initialize`` on localhost), and
    returns what each returned, in process order.

    - `fn` must be importable by reference (a module-level function of an importable
      module: the children get the parent's ``sys.path``); arguments and results must
      pickle (return numpy arrays, not jax arrays). Inside `fn`, ``jax.devices()`` holds
      every process's devices and ``jax.process_index()`` says which process this is.
    - ``platform="cpu"``: each process has `devices_per_process` CPU devices; cross-process
      collectives go through gloo. ``platform="gpu"``: process i drives the GPUs
      ``gpu_ids[i]`` (default: `devices_per_process` consecutive ones); several processes
      may name the same GPU. ``XLA_PYTHON_CLIENT_PREALLOCATE=false`` unless `env` sets it.
    - `per_process_args[i]`, when given, replaces `args` for process i.
    - `env` adds to the children's environment.
    - Bounded: after `timeout_s` every process still running prints its Python stacks
      (into its output) and is killed; once one process has failed, the others get
      `grace_s` more seconds (they may be waiting for it).
    - ``check=True``: raises ProcessGroupError naming each failed process with its
      traceback and output; ``check=False`` returns a ProcessResult per process instead
      (``check_results`` turns those into values or the error).
    """
    if platform not in ("cpu", "gpu"):
        raise ValueError(f"platform must be 'cpu' or 'gpu', got {platform!r}")
    if gpu_ids is None:
        gpu_ids = [list(range(i * devices_per_process, (i + 1) * devices_per_process))
                   for i in range(n_processes)]
    port = _free_port()
    work = tempfile.mkdtemp(prefix="jax_moe_ar_group_")
    procs = []
    for i in range(n_processes):
        spec = dict(fn=fn, args=tuple(per_process_args[i] if per_process_args else args),
                    kwargs=dict(kwargs or {}), coordinator=f"localhost:{port}",
                    n_processes=n_processes, process_id=i, platform=platform,
                    local_device_ids=list(gpu_ids[i]) if platform == "gpu" else None,
                    timeout_s=timeout_s)
        spec_path = os.path.join(work, f"spec{i}.pkl")
        with open(spec_path, "wb") as f:
            pickle.dump(list(sys.path), f)
            pickle.dump(spec, f)
        log = open(os.path.join(work, f"log{i}.txt"), "wb")
        procs.append((subprocess.Popen(
            [sys.executable, "-c", _BOOT, spec_path, os.path.join(work, f"result{i}.pkl")],
            env=_child_env(platform, devices_per_process, env), stdout=log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL), log))
    deadline = time.monotonic() + timeout_s
    timed_out = set()
    while True:
        codes = [p.poll() for p, _ in procs]
        if all(c is not None for c in codes):
            break
        if any(c not in (None, 0) for c in codes):
            deadline = min(deadline, time.monotonic() + grace_s)
            # Those still running but done (result written) only wait for the failed
            # one at the exit barrier: end them now.
            if all(c is not None or os.path.exists(os.path.join(work, f"result{i}.pkl"))
                   for i, c in enumerate(codes)):
                deadline = time.monotonic()
        if time.monotonic() > deadline:
            running = [i for i, (p, _) in enumerate(procs) if p.poll() is None]
            for i in running:  # each prints its threads' stacks into its output
                procs[i][0].send_signal(signal.SIGUSR1)
            time.sleep(1.0)
            for i in running:
                if procs[i][0].poll() is None:
                    procs[i][0].kill()
                    timed_out.add(i)
            for p, _ in procs:
                p.wait()
            break
        time.sleep(0.05)
    results = []
    for i, (p, log) in enumerate(procs):
        log.close()
        with open(os.path.join(work, f"log{i}.txt"), "rb") as f:
            output = f.read().decode(errors="replace")
        r = ProcessResult(i, returncode=p.returncode, output=output)
        path = os.path.join(work, f"result{i}.pkl")
        if os.path.exists(path):
            with open(path, "rb") as f:
                status, payload = pickle.load(f)
            if status == "ok":
                r.value = payload
            else:
                r.error = payload
        elif i in timed_out:
            r.error = f"process {i} did not finish within {timeout_s:g} s and was killed"
        else:
            r.error = f"process {i} exited with code {p.returncode} without a result"
        results.append(r)
    return check_results(results) if check else results


def check_results(results: Sequence[ProcessResult]) -> list:
    """The values of `results`; raises ProcessGroupError naming every failed process with
    its error and the tail of its output."""
    failed = [r for r in results if not r.ok]
    if failed:
        raise ProcessGroupError("\n\n".join(
            f"--- process {r.process_id} of {len(results)}: {r.error}\n"
            f"--- its output (last 4000 characters):\n{r.output[-4000:]}" for r in failed))
    return [r.value for r in results]


def _child_main(f, result_path: str) -> None:
    spec = pickle.load(f)
    f.close()
    import faulthandler
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the launcher's timeout report
    import jax
    if spec["platform"] == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    timeout = max(1, int(spec["timeout_s"]))
    jax.distributed.initialize(spec["coordinator"], spec["n_processes"], spec["process_id"],
                               local_device_ids=spec["local_device_ids"],
                               initialization_timeout=timeout,
                               shutdown_timeout_seconds=min(timeout, 30))
    try:
        result = ("ok", spec["fn"](*spec["args"], **spec["kwargs"]))
    except BaseException:
        result = ("error", traceback.format_exc())
    tmp = result_path + ".tmp"
    with open(tmp, "wb") as out:
        try:
            pickle.dump(result, out)
        except Exception:
            out.seek(0)
            out.truncate()
            pickle.dump(("error", "the result does not pickle:\n" + traceback.format_exc()), out)
            result = ("error", "")
    os.replace(tmp, result_path)
    sys.stdout.flush()
    sys.stderr.flush()
    # Leave together when every process succeeded (jax.distributed's shutdown is a
    # barrier); at once when one failed, since a failed peer never reaches that barrier.
    from jax._src import distributed
    client = distributed.global_state.client
    client.key_value_set(f"jax_moe_ar/process_group/done/{spec['process_id']}", result[0])
    if result[0] != "ok":
        os._exit(1)
    for p in range(spec["n_processes"]):
        try:
            peer = client.blocking_key_value_get(f"jax_moe_ar/process_group/done/{p}",
                                                 timeout * 1000)
        except Exception:  # the coordinator (process 0) is gone: it failed
            os._exit(0)
        if peer != "ok":
            os._exit(0)
    jax.distributed.shutdown()
