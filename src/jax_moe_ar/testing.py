"""Multi-device meshes for tests — ours and our users'.

CPU meshes need forced host devices, which must be requested before JAX starts
its CPU backend: call ``force_host_devices()`` at the top of your conftest.py
(before anything imports jax's backends). Then::

    from jax_moe_ar.testing import MESH_CASES, make_mesh, sharded

    @pytest.mark.parametrize("case", MESH_CASES)
    def test_x(case):
        mesh = make_mesh("cpu", case)   # skips when the platform has too few devices
        f = sharded(body, mesh, in_specs=(P("tp"),), out_specs=P())

GPU tests use ``make_mesh("gpu", case)`` and the ``gpu`` marker.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np


def force_host_devices(n: int = 8) -> None:
    """Asks XLA for n CPU devices (a no-op for a count already requested)."""
    flag = f"--xla_force_host_platform_device_count={n}"
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " " + flag).strip()


@dataclasses.dataclass(frozen=True)
class MeshCase:
    """A mesh shape with axis names; `axis` is the reduction axis (or tuple of axes)."""

    shape: tuple[int, ...]
    names: tuple[str, ...]
    axis: str | tuple[str, ...] = "tp"

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def group(self) -> int:
        axes = self.axis if isinstance(self.axis, tuple) else (self.axis,)
        return int(np.prod([self.shape[self.names.index(a)] for a in axes]))

    @property
    def id(self) -> str:
        return f"n{self.size}_" + "_".join(f"{n}{s}" for n, s in zip(self.names, self.shape))


N1 = MeshCase((1,), ("tp",))
N2 = MeshCase((2,), ("tp",))
N4 = MeshCase((4,), ("tp",))
N8 = MeshCase((8,), ("tp",))
N4_DP2_TP2 = MeshCase((2, 2), ("dp", "tp"))
N8_TUPLE = MeshCase((2, 4), ("x", "y"), axis=("x", "y"))  # a group named by two axes

MESH_CASES = [N1, N2, N4, N8, N4_DP2_TP2, N8_TUPLE]


def devices(platform: str):
    import jax
    try:
        return jax.devices(platform)
    except RuntimeError:  # platform not present
        return []


def make_mesh(platform: str, case: MeshCase):
    """A Mesh (axis types Auto, as shard_map users expect) over the first devices of
    `platform`; skips the calling test when there are too few."""
    import jax
    devs = devices(platform)
    if len(devs) < case.size:
        import pytest
        pytest.skip(f"{case.id} needs {case.size} {platform} devices, have {len(devs)}")
    grid = np.array(devs[:case.size], dtype=object).reshape(case.shape)
    auto = (jax.sharding.AxisType.Auto,) * len(case.names)
    return jax.sharding.Mesh(grid, case.names, axis_types=auto)


def sharded(fn, mesh, in_specs, out_specs, check_vma: bool = True):
    """jax.jit(jax.shard_map(fn, ...)) — the way the op is meant to be called."""
    import jax
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                                 check_vma=check_vma))


# ---- groups of processes (jax.distributed on localhost) ------------------------------

from ._process_group import (ProcessGroupError, ProcessResult, check_results,  # noqa: E402
                             run_process_group)

try:
    import pytest as _pytest
except ImportError:  # the fixture needs pytest; run_process_group does not
    _pytest = None

if _pytest is not None:
    @_pytest.fixture
    def process_group():
        """A pytest fixture: the function `run_process_group`, which runs a function in N
        fresh processes forming one multi-process JAX program and returns what each
        returned. Use it from your tests after importing it into the test module or your
        conftest.py (``from jax_moe_ar.testing import process_group``)::

            # my_workers.py (importable; no jax backend use at import time)
            def body(n):
                import jax, numpy as np
                ...  # jax.devices() spans every process
                return np.asarray(...)          # something that pickles

            def test_two_processes(process_group):
                results = process_group(my_workers.body, 2, args=(7,), devices_per_process=2)

        See `run_process_group` for platforms, GPU ids, timeouts and failure reports.
        """
        return run_process_group
