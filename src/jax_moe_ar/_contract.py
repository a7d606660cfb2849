"""The compiled module, and the numbers and names Python shares with the C++ side — quant
kinds, option flags, algorithm codes, limits and custom-call targets — read from it
(csrc/common/config.h defines each of them once). The package reaches the compiled module
only through here."""

from __future__ import annotations

from . import _native

_C = _native.constants()

QUANT_KINDS: dict[str, int] = dict(_C["quant_kinds"])
OP_FLAGS: dict[str, int] = dict(_C["op_flags"])
ALGORITHMS: dict[str, int] = dict(_C["algorithms"])
LIMITS: dict[str, int] = dict(_C["limits"])
TARGETS: dict[str, str] = dict(_C["targets"])
