"""Where the bench's measurement tasks run: ``WorkerPool`` (child processes, one per
environment, so that a crash or a hang costs one measurement, not the bench) or
``InProcess`` (here, ``--in-process``: no isolation, default environment only).

Both answer ``ask(task, timeout, env=DEFAULT_ENV) -> (result, error)``: a result dict, or
None and why there is none.
"""

from __future__ import annotations

import json
import os
import sys

DEFAULT_ENV = "default"
WORKER_MODULE = "jax_moe_ar.bench.worker"


class InProcess:
    """Runs the tasks here (``--in-process``): no isolation from crashes, and no other
    environment than this process's own."""

    def __init__(self, platform_arg):
        from .worker import Runner
        self.runner = Runner(platform_arg)
        self.restarts = 0

    def ask(self, task, timeout, env=DEFAULT_ENV):
        if env != DEFAULT_ENV:
            return None, (f"environment {env!r} needs a measuring process of its own; "
                          "not available with --in-process")
        return self.runner.run(task), None

    def close(self):
        pass


class WorkerPool:
    """Runs the tasks in child processes (``python -m jax_moe_ar.bench.worker``), one per
    environment: ``environments`` maps a name to the variables set for its process on top
    of this one's (e.g. other XLA_FLAGS, which XLA reads only when its backend starts).
    Each is started at its first task and again after it died: the task it died on is
    reported as failed, a fresh one takes the next."""

    def __init__(self, platform_arg, environments=None):
        self.cmd = [sys.executable, "-m", WORKER_MODULE, "--platform", platform_arg]
        self.environments = {DEFAULT_ENV: {}, **(environments or {})}
        self.workers = {}
        self.restarts = 0

    def ask(self, task, timeout, env=DEFAULT_ENV):
        worker = self.workers.get(env)
        if worker is None or not worker.alive():
            if worker is not None:
                self.restarts += 1
            worker = self.workers[env] = _Worker(
                self.cmd, dict(os.environ, **self.environments[env]))
        return worker.ask(task, timeout)

    def close(self):
        for worker in self.workers.values():
            worker.close()


class _Worker:
    """One measuring process and a thread that moves its answers into a queue (so that a
    wait for one can time out)."""

    def __init__(self, cmd, env):
        import queue
        import subprocess
        import threading
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1, env=env)
        self.lines = queue.Queue()

        def pump(stream, q):
            for line in stream:
                q.put(line)
            q.put(None)

        threading.Thread(target=pump, args=(self.proc.stdout, self.lines), daemon=True).start()

    def alive(self):
        return self.proc.poll() is None

    def ask(self, task, timeout):
        import queue
        try:
            self.proc.stdin.write(json.dumps(task) + "\n")
            self.proc.stdin.flush()
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            self.kill()
            return None, (f"no answer within {timeout:.0f} s (hung?); the measuring process "
                          "was killed and a fresh one takes the next task")
        except (BrokenPipeError, OSError):
            line = None
        if line is None:
            rc = self.proc.wait()
            return None, (f"the measuring process died ({describe_exit(rc)}) during this "
                          "task — e.g. a crash in XLA's compiler or in a kernel; its last "
                          "words are on stderr. A fresh one takes the next task")
        return json.loads(line), None

    def kill(self):
        if self.alive():
            self.proc.kill()
            self.proc.wait()

    def close(self):
        if self.alive():
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=30)
            except Exception:
                self.kill()


def describe_exit(rc):
    """An exit status in words: "signal SIGSEGV", "exit status 1"."""
    if rc is not None and rc < 0:
        import signal
        try:
            return f"signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"signal {-rc}"
    return f"exit status {rc}"
