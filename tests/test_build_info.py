"""jax_moe_ar.build_info(): the build (CUDA kernels, architecture), the jax versions, and which
path a call takes on this machine's devices, with the reason for a fallback."""

import types

import jax
import jaxlib

import jax_moe_ar as mar
from jax_moe_ar import _native, info
from jax_moe_ar.ops import FORCE_XLA_ENV


def test_build_info_here():
    b = mar.build_info()
    assert b.version == mar.__version__
    assert b.cuda_kernels == bool(_native.with_cuda)
    assert b.cuda_arch == ("sm_90a" if _native.with_cuda else None)
    assert (b.jax_version, b.jaxlib_version) == (jax.__version__, jaxlib.__version__)
    assert len(b.devices) == len(jax.devices())
    if jax.default_backend() == "cpu":
        assert b.path.startswith("CPU: exact C++ path") and b.fallback_reason is None
    text = str(b)
    assert "CUDA kernels:" in text and f"jax {jax.__version__}" in text and b.path in text


def test_force_xla_is_reported(monkeypatch):
    monkeypatch.setenv(FORCE_XLA_ENV, "1")
    b = mar.build_info()
    assert "plain JAX" in b.path and FORCE_XLA_ENV in b.fallback_reason
    assert "fallback because" in str(b)


def _gpu(cc, i=0):
    return types.SimpleNamespace(platform="gpu", id=i, compute_capability=cc, process_index=0)


def test_fallback_reasons_for_gpus(monkeypatch):
    """The GPU reasons come from the same check the CUDA lowering uses (workspace.py)."""
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    if _native.with_cuda:
        path, reason = info._path([_gpu("8.0"), _gpu("8.0", 1)])
        assert "compute capability 8.0" in reason and "sm_90" in reason
        path, reason = info._path([_gpu("9.0"), _gpu("9.0", 1)])
        assert reason is None and path.startswith("fused CUDA kernel")
    else:
        path, reason = info._path([_gpu("9.0")])
        assert "without CUDA kernels" in reason
