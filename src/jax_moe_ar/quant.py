"""Quantization specs of SPEC §3, their output shapes, and dequantization.

A spec is a small frozen dataclass. Its static part (kind, group size,
layouts) becomes the op's attributes; its arrays (the FP8 static scale, the
NVFP4 global scale) become operands of the op.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

FP8_MAX = 448.0
FP4_MAX = 6.0
FP4_BLOCK = 16

from ._contract import QUANT_KINDS

# csrc/common/config.h QuantKind.
KIND_NONE = QUANT_KINDS["none"]
KIND_FP8_STATIC = QUANT_KINDS["fp8_static"]
KIND_FP8_PER_TOKEN = QUANT_KINDS["fp8_per_token"]
KIND_FP8_PER_GROUP = QUANT_KINDS["fp8_per_group"]
KIND_NVFP4 = QUANT_KINDS["nvfp4"]
KIND_NAMES = {kind: name for name, kind in QUANT_KINDS.items()}


def checked_scale(owner: str, field: str, value):
    """A quant spec's scale as the op takes it: a float32 scalar array (a traced one too).

    Python numbers (and NumPy float64 scalars, which are Python floats) are rounded to
    float32 (SPEC §4); None and anything else are refused naming the field."""
    name = f"`{owner}.{field}`"
    if value is None:
        raise TypeError(f"jax_moe_ar: {name} is None; pass the scale as a Python float "
                        f"(e.g. {owner}(0.02)) or a float32 scalar array (jnp.float32(s))")
    if isinstance(value, (float, int)) and not isinstance(value, bool):
        return np.float32(value)
    if not hasattr(value, "dtype") or not hasattr(value, "shape"):
        raise TypeError(f"jax_moe_ar: {name} must be a Python float or a float32 scalar array, "
                        f"got {type(value).__name__}")
    if np.dtype(value.dtype) != np.float32 or tuple(value.shape) != ():
        raise TypeError(f"jax_moe_ar: {name} must be a float32 scalar (shape ()), got "
                        f"{np.dtype(value.dtype)}{list(value.shape)}; pass a Python float or "
                        "jnp.float32(s) (a one-element array: reshape it to ())")
    return value


@dataclasses.dataclass(frozen=True)
class Fp8Static:
    """float8_e4m3fn codes with a caller-given dequant scale.

    ``scale`` is the dequant scale s (code * s = value): a Python float (rounded to
    float32) or a float32 scalar array, traced or not; the same on every rank. Values
    beyond 448 * s saturate to ±448. ``scale = 0`` makes every code saturate (its
    reciprocal is inf; a zero input gives NaN): ``debug=True`` flags it.
    """

    scale: Any
    kind = KIND_FP8_STATIC

    def __post_init__(self):
        object.__setattr__(self, "scale", checked_scale("Fp8Static", "scale", self.scale))


@dataclasses.dataclass(frozen=True)
class Fp8PerToken:
    """float8_e4m3fn codes [M, H], one float32 scale per token: the ``scale`` output [M, 1],
    ``max(amax of the token's row, 1e-10) / 448``."""

    kind = KIND_FP8_PER_TOKEN


@dataclasses.dataclass(frozen=True)
class Fp8PerGroup:
    """float8_e4m3fn codes [M, H], one float32 scale per ``group_size`` columns of a token.

    ``group_size`` (int, default 128): columns per scale; it must divide H. Each scale is
    ``max(amax of the group, 1e-10) / 448``. ``ue8m0`` (bool, default False): round each
    scale up to a power of two (the UE8M0 scales of DeepSeek-style FP8 GEMMs).
    ``scale_layout``: ``"row"`` (default) for scales [M, H/group_size], ``"col"`` for their
    transpose [H/group_size, M] (DeepGEMM-style consumers).
    """

    group_size: int = 128
    ue8m0: bool = False
    scale_layout: str = "row"
    kind = KIND_FP8_PER_GROUP

    def __post_init__(self):
        if not isinstance(self.group_size, (int, np.integer)) or isinstance(self.group_size, bool) \
                or self.group_size <= 0:
            raise ValueError(f"Fp8PerGroup.group_size must be a positive int, got {self.group_size!r}")
        if self.scale_layout not in ("row", "col"):
            raise ValueError(
                f"Fp8PerGroup.scale_layout must be 'row' or 'col', got {self.scale_layout!r}")


@dataclasses.dataclass(frozen=True)
class NvFp4:
    """NVFP4: e2m1 codes (two per byte) and one e4m3 scale per 16 columns.

    ``global_scale`` is the encode scale g, typically 448 * 6 / amax of the normed
    activations: a Python float (rounded to float32) or a float32 scalar array, traced or
    not; the same on every rank. Codes [M, H/2] uint8 (two e2m1 codes per byte, the even
    column in the low nibble). ``layout`` of the block scales: ``"swizzled_128x4"``
    ([roundup(M,128), roundup(H/16,4)], 128x4 tile order, zero padding) or
    ``"linear"`` ([M, H/16]).
    """

    global_scale: Any
    layout: str = "swizzled_128x4"
    kind = KIND_NVFP4

    def __post_init__(self):
        object.__setattr__(self, "global_scale",
                           checked_scale("NvFp4", "global_scale", self.global_scale))
        if self.layout not in ("swizzled_128x4", "linear"):
            raise ValueError(
                f"NvFp4.layout must be 'swizzled_128x4' or 'linear', got {self.layout!r}")


QuantSpec = Fp8Static | Fp8PerToken | Fp8PerGroup | NvFp4
QUANT_TYPES = (Fp8Static, Fp8PerToken, Fp8PerGroup, NvFp4)


class FusedOutputs(NamedTuple):
    """What the op returns; fields that were not asked for are None."""

    residual: jax.Array | None
    norm: jax.Array | None
    quant: jax.Array | None
    scale: jax.Array | None


# So that jax.export can serialize programs that return FusedOutputs.
jax.export.register_namedtuple_serialization(FusedOutputs,
                                             serialized_name="jax_moe_ar.FusedOutputs")


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def scale_operand(spec) -> Any | None:
    """The array the spec feeds the op (FP8 static scale, NVFP4 global scale) or None."""
    if isinstance(spec, Fp8Static):
        return spec.scale
    if isinstance(spec, NvFp4):
        return spec.global_scale
    return None


@dataclasses.dataclass(frozen=True)
class QuantStatic:
    """The static (hashable) part of a spec: what the op's attributes carry."""

    kind: int
    group_size: int = 0
    ue8m0: bool = False
    scale_col: bool = False      # Fp8PerGroup "col" layout
    fp4_swizzled: bool = False   # NvFp4 "swizzled_128x4" layout

    @property
    def has_scale_output(self) -> bool:
        return self.kind != KIND_FP8_STATIC

    @property
    def takes_scale_input(self) -> bool:
        return self.kind in (KIND_FP8_STATIC, KIND_NVFP4)

    def shapes(self, M: int, H: int):
        """((codes shape, dtype), (scale shape, dtype) or None) for [M, H] rows."""
        if self.kind == KIND_NVFP4:
            blocks = H // FP4_BLOCK
            sf = (_round_up(M, 128), _round_up(blocks, 4)) if self.fp4_swizzled else (M, blocks)
            return ((M, H // 2), jnp.dtype(jnp.uint8)), (sf, jnp.dtype(jnp.float8_e4m3fn))
        codes = ((M, H), jnp.dtype(jnp.float8_e4m3fn))
        if self.kind == KIND_FP8_STATIC:
            return codes, None
        if self.kind == KIND_FP8_PER_TOKEN:
            return codes, ((M, 1), jnp.dtype(jnp.float32))
        groups = H // self.group_size
        return codes, (((groups, M) if self.scale_col else (M, groups)), jnp.dtype(jnp.float32))


def static_part(spec) -> QuantStatic:
    if isinstance(spec, Fp8PerGroup):
        return QuantStatic(spec.kind, spec.group_size, bool(spec.ue8m0),
                           spec.scale_layout == "col")
    if isinstance(spec, NvFp4):
        return QuantStatic(spec.kind, fp4_swizzled=spec.layout == "swizzled_128x4")
    if isinstance(spec, (Fp8Static, Fp8PerToken)):
        return QuantStatic(spec.kind)
    raise TypeError(f"unknown quant spec {spec!r}")


def output_shapes(spec, M: int, H: int):
    """((quant shape, dtype), (scale shape, dtype) or None) for a spec and [M, H] rows."""
    return static_part(spec).shapes(M, H)


def swizzled_to_linear(sf, M: int, H: int):
    """[roundup(M,128), roundup(H/16,4)] swizzled block scales -> [M, H/16] linear ones."""
    blocks = H // FP4_BLOCK
    mp, kp = sf.shape
    # Row-major bytes follow (m//128, b//4, m%32, (m%128)//32, b%4).
    tiles = jnp.reshape(sf, (mp // 128, kp // 4, 32, 4, 4))
    linear = jnp.transpose(tiles, (0, 3, 2, 1, 4)).reshape(mp, kp)
    return linear[:M, :blocks]


def linear_to_swizzled(sf):
    """[M, H/16] linear block scales -> the zero-padded swizzled 128x4 layout."""
    M, blocks = sf.shape
    mp, kp = _round_up(M, 128), _round_up(blocks, 4)
    # On the bytes, padded with jnp.pad: XLA's GPU compiler crashed (SIGSEGV, jax 0.11.2)
    # on the float8 zeros().at[].set() this used to be, from M = 128 up.
    bits = jax.lax.bitcast_convert_type(sf, jnp.uint8)
    bits = jnp.pad(bits, ((0, mp - M), (0, kp - blocks)))
    tiles = jnp.reshape(bits, (mp // 128, 4, 32, kp // 4, 4))
    swz = jnp.transpose(tiles, (0, 3, 2, 1, 4)).reshape(mp, kp)
    return jax.lax.bitcast_convert_type(swz, sf.dtype)


_E2M1_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                         -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)


def dequantize(out: FusedOutputs, quant) -> jax.Array:
    """Float32 [M, H] values that ``out.quant`` (and ``out.scale``) encode under ``quant``."""
    codes, scale = out.quant, out.scale
    if codes is None:
        raise ValueError("dequantize: out.quant is None (the call did not ask for 'quant')")
    if isinstance(quant, Fp8Static):
        return codes.astype(jnp.float32) * jnp.asarray(quant.scale, jnp.float32)
    if isinstance(quant, Fp8PerToken):
        return codes.astype(jnp.float32) * scale
    if isinstance(quant, Fp8PerGroup):
        s = scale if quant.scale_layout == "row" else scale.T
        return (codes.astype(jnp.float32).reshape(s.shape[0], s.shape[1], quant.group_size)
                * s[:, :, None]).reshape(codes.shape)
    if isinstance(quant, NvFp4):
        M, H = codes.shape[0], codes.shape[1] * 2
        lo = codes & 0xF
        hi = codes >> 4
        idx = jnp.stack([lo, hi], axis=-1).reshape(M, H)
        values = jnp.asarray(_E2M1_VALUES)[idx]
        sf = scale if quant.layout == "linear" else swizzled_to_linear(scale, M, H)
        sf = jnp.repeat(sf.astype(jnp.float32), FP4_BLOCK, axis=1)
        return values * sf / jnp.asarray(quant.global_scale, jnp.float32)
    raise TypeError(f"dequantize: unknown quant spec {quant!r}")
