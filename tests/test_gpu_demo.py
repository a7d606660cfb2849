"""The demo end to end on GPUs (marked `gpu`): `python -m jax_moe_ar demo` runs the fused
op inside a small MoE decode layer and finishes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

pytestmark = pytest.mark.gpu


def test_demo_runs_fused_on_gpus():
    # This pytest process holds most of each GPU's memory (XLA preallocates), so the
    # child allocates on demand. Should it ever stall, SIGABRT makes Python's
    # faulthandler print every thread's stack into the failure message.
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONFAULTHANDLER="1")
    proc = subprocess.Popen([sys.executable, "-m", "jax_moe_ar", "demo"], cwd="/", env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        out, err = proc.communicate()
        pytest.fail("demo did not finish in 180 s:\n" + out[-3000:] + err[-6000:])
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    assert "gpu" in out.lower()
