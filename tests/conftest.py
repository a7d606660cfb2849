"""Test session setup: 8 forced CPU devices; `gpu` tests skip without CUDA GPUs."""

import os
import sys

from jax_moe_ar.testing import devices, force_host_devices

force_host_devices(8)
sys.path.insert(0, os.path.dirname(__file__))  # tests import `oracle` directly

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if devices("gpu"):
        return
    skip = pytest.mark.skip(reason="needs CUDA GPUs")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
