"""jax_moe_ar: the end of an MoE layer (finalize + all-reduce + residual + RMSNorm + quant)
as one collective op for JAX on NVIDIA GPUs, and its reduce-scatter variants for
sequence-parallel layer ends. See docs/spec.md §2 for the API."""

from . import reference
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
    "reference",
]
__version__ = "0.1.0"
