"""What the command-line tools share: the ``--platform`` argument and device choice, the
1-D ``"tp"`` mesh, dtype names, comma-separated list arguments, and which implementation a
compiled program of the op took (read from its custom-call targets).

Used by ``demo``, the ``bench`` package (parent and measuring process) and
``scripts/phase_trace.py``; it imports nothing of theirs.
"""

from __future__ import annotations

import numpy as np

from ._contract import TARGETS as _NATIVE_TARGETS

# (custom-call target, short name, description): how a compiled program of the op is told
# apart. The plain composition has no target of ours, so it is the default, "xla".
TARGETS = (
    (_NATIVE_TARGETS["fused"], "cuda-fused", "fused CUDA kernel"),
    (_NATIVE_TARGETS["cpu_tail"], "cpu-ffi",
     "CPU FFI path (finalize FFI -> all_gather -> reduce/norm/quant FFI)"),
)
PATH_DESCRIPTIONS = {short: what for _, short, what in TARGETS}
PATH_DESCRIPTIONS["xla"] = "plain XLA ops + psum (the 'xla' composition)"

DTYPES = ("bf16", "f16", "f32")


def int_list(text: str) -> tuple[int, ...]:
    """argparse type: "1,8,32" -> (1, 8, 32)."""
    return tuple(int(v) for v in text.split(",") if v.strip())


def str_list(text: str) -> tuple[str, ...]:
    """argparse type: "none, nvfp4" -> ("none", "nvfp4")."""
    return tuple(v.strip() for v in text.split(",") if v.strip())


def add_platform_argument(parser) -> None:
    parser.add_argument("--platform", choices=("auto", "gpu", "cpu"), default="auto",
                        help="devices to run on; auto = GPUs when present, else CPU devices "
                             "(8 forced host devices)")


def select_devices(platform: str):
    """(platform name, devices): GPUs when present (or asked for), else CPU devices."""
    from .testing import devices
    if platform in ("auto", "gpu"):
        gpus = devices("gpu")
        if gpus:
            return "gpu", gpus
        if platform == "gpu":
            raise SystemExit("error: --platform gpu but JAX sees no GPU "
                             f"(backends: {_backends()})")
    return "cpu", devices("cpu")


def _backends() -> str:
    import jax
    try:
        return jax.default_backend()
    except Exception as e:  # pragma: no cover - diagnostic only
        return repr(e)


def tp_mesh(devs):
    """A 1-D mesh named "tp" (axis type Auto, as shard_map users expect)."""
    import jax
    grid = np.array(list(devs), dtype=object).reshape(len(devs))
    return jax.sharding.Mesh(grid, ("tp",), axis_types=(jax.sharding.AxisType.Auto,))


def compiled_path(hlo_text: str) -> str:
    """Which implementation a compiled program of the op uses: "cuda-fused", "cpu-ffi" or
    "xla" (the plain composition, also what a fused call that fell back compiles to)."""
    for target, short, _ in TARGETS:
        if target in hlo_text:
            return short
    return "xla"


def dtype_of(name: str):
    import jax.numpy as jnp
    return {"bf16": jnp.bfloat16, "f16": jnp.float16, "f32": jnp.float32}[name]


def device_summary(platform, devs) -> str:
    kind = getattr(devs[0], "device_kind", "?")
    return f"{len(devs)} {platform.upper()} device(s) ({kind})"
