"""Test session setup: 8 forced CPU devices; `gpu` tests skip without CUDA GPUs.

Shared fixtures: `rng` (fresh data per test, the same on every run) and `algorithm`
(each of the fused kernel's algorithms). Readable ids for mesh cases, quant specs and
dtypes wherever a test parametrizes over them.
"""

from jax_moe_ar.testing import MeshCase, devices, force_host_devices

force_host_devices(8)

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from cases import ALGORITHMS, DTYPES, Q, dtype_id, seed_for  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if devices("gpu"):
        return
    skip = pytest.mark.skip(reason="needs CUDA GPUs")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_make_parametrize_id(config, val, argname):
    if isinstance(val, (MeshCase, Q)):
        return val.id
    if isinstance(val, np.dtype) and val in DTYPES:
        return dtype_id(val)
    return None


@pytest.fixture
def rng(request):
    """A generator seeded from the test's node id ($JAX_MOE_AR_TEST_SEED shifts it)."""
    return np.random.default_rng(seed_for(request.node.nodeid))


@pytest.fixture(params=ALGORITHMS)
def algorithm(request):
    """Each fused algorithm in turn; a test that runs only some parametrizes `algorithm`
    itself, which overrides this."""
    return request.param
