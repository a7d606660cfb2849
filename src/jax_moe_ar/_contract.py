"""The numbers and names Python shares with the C++ side — quant kinds, option flags,
algorithm codes, limits and custom-call targets — read from the compiled module, where
csrc/common/config.h defines each of them once."""

from __future__ import annotations

from . import _native

_C = _native.constants()

QUANT_KINDS: dict[str, int] = dict(_C["quant_kinds"])
OP_FLAGS: dict[str, int] = dict(_C["op_flags"])
ALGORITHMS: dict[str, int] = dict(_C["algorithms"])
LIMITS: dict[str, int] = dict(_C["limits"])
TARGETS: dict[str, str] = dict(_C["targets"])
