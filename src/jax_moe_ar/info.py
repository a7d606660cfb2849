"""`build_info()`: what this installation was built with and which path a call takes here."""

from __future__ import annotations

import dataclasses
import os

from importlib import metadata

from . import workspace
from ._contract import _native

try:  # the version pyproject.toml gives, as installed
    __version__ = metadata.version("jax_moe_ar")
except metadata.PackageNotFoundError:  # imported from a tree that was never installed
    __version__ = "unknown"


@dataclasses.dataclass(frozen=True)
class BuildInfo:
    """What `jax_moe_ar.build_info()` reports; ``print()`` it for a readable summary."""

    version: str                # jax_moe_ar's
    cuda_kernels: bool          # the fused CUDA kernels were compiled into this build
    cuda_arch: str | None       # the GPU architecture they were compiled for (e.g. "sm_90a")
    jax_version: str
    jaxlib_version: str
    backend: str                # jax.default_backend() here
    devices: tuple[str, ...]    # jax.devices() here, as "platform:id kind"
    path: str                   # the path a default call over these devices takes
    fallback_reason: str | None  # why algorithm="auto" would use the plain-JAX path here

    def __str__(self) -> str:
        lines = [
            f"jax_moe_ar {self.version}",
            "  CUDA kernels: "
            + (f"built for {self.cuda_arch}" if self.cuda_kernels else "not built"),
            f"  jax {self.jax_version}, jaxlib {self.jaxlib_version}, backend {self.backend}",
            f"  devices: {', '.join(self.devices) or 'none'}",
            f"  path here: {self.path}",
        ]
        if self.fallback_reason:
            lines.append(f"  fallback because: {self.fallback_reason}")
        return "\n".join(lines)


def _path(devices) -> tuple[str, str | None]:
    from .ops import FORCE_XLA_ENV
    if os.environ.get(FORCE_XLA_ENV, "0") not in ("", "0"):
        return ("plain JAX (algorithm 'xla')", f"{FORCE_XLA_ENV} is set: every call uses the "
                "plain-JAX path")
    gpus = [d for d in devices if d.platform == "gpu"]
    if not gpus:
        platform = devices[0].platform if devices else "none"
        if platform == "cpu":
            return ("CPU: exact C++ path (finalize FFI -> all_gather -> reduce/norm/quant FFI)",
                    None)
        return ("plain JAX (algorithm 'xla')",
                f"no CPU or CUDA devices (platform {platform!r}): the op lowers to plain JAX")
    reason = workspace._unservable_reason([tuple(gpus)], 16, 2, 0)
    if reason is not None:
        return "plain JAX (algorithm 'xla') with one warning", reason
    return ("fused CUDA kernel (peer access is checked when a group's first program is "
            "lowered; without it 'auto' falls back with one warning)", None)


def build_info() -> BuildInfo:
    """Reports the build (CUDA kernels or not, their architecture, jax and jaxlib versions)
    and, for the devices JAX sees here, which path a call with ``algorithm="auto"`` takes
    and why it would fall back to the plain-JAX path. Shape-dependent limits (rows over
    96 KiB, operands of 2^31 elements or more, groups over 16 ranks) also fall back; see
    the README's "Platforms and paths"."""
    import jax
    import jaxlib

    devices = jax.devices()
    path, reason = _path(devices)
    with_cuda = bool(getattr(_native, "with_cuda", False))
    return BuildInfo(
        version=__version__,
        cuda_kernels=with_cuda,
        cuda_arch=getattr(_native, "cuda_arch", None) if with_cuda else None,
        jax_version=jax.__version__,
        jaxlib_version=jaxlib.__version__,
        backend=jax.default_backend(),
        devices=tuple(f"{d.platform}:{d.id} {getattr(d, 'device_kind', '')}".strip()
                      for d in devices),
        path=path,
        fallback_reason=reason,
    )
