"""jax_moe_ar: the end of an MoE layer (finalize + all-reduce + residual + RMSNorm + quant)
as one collective op for JAX on NVIDIA GPUs, and its reduce-scatter variants for
sequence-parallel layer ends.

Start with the README ("Use"); every public function's docstring gives each argument's
per-rank shape, dtype and meaning. `build_info()` says what this installation was built
with and which path a call takes on this machine's devices."""

from . import reference
from .debug import DebugWarning
from .info import BuildInfo, __version__, build_info
from .ops import (allreduce_rmsnorm, moe_finalize_allreduce, moe_finalize_reduce_scatter,
                  reduce_scatter_rmsnorm)
from .quant import Fp8PerGroup, Fp8PerToken, Fp8Static, FusedOutputs, NvFp4, dequantize
from .workspace import check_errors, reset_workspaces

__all__ = [
    "moe_finalize_allreduce",
    "allreduce_rmsnorm",
    "moe_finalize_reduce_scatter",
    "reduce_scatter_rmsnorm",
    "Fp8Static",
    "Fp8PerToken",
    "Fp8PerGroup",
    "NvFp4",
    "FusedOutputs",
    "dequantize",
    "check_errors",
    "reset_workspaces",
    "build_info",
    "BuildInfo",
    "DebugWarning",
    "reference",
]
