"""A small exact run of both kernels, for compute-sanitizer (memcheck, racecheck).

Two calls per algorithm and quantizer on a group of two GPUs (one, on a machine with a
single GPU: both kernels still push, reduce and finish every row), odd M and H, every
output and NVFP4 swizzled scales (the padding writes), FP8 codes made in the norm loop
and from the staged row, then the oracle check. Prints "SANITIZE-CASE OK" at the end.
Run from the repository root on a GPU machine (PYTHONPATH=tests: it uses the tests'
case generator and oracle):
    PYTHONPATH=tests compute-sanitizer --tool memcheck python scripts/sanitize_case.py
"""

import sys

import jax
import numpy as np

import jax_moe_ar as mar
from jax_moe_ar.testing import N1, N2

try:
    from cases import ALGORITHMS, BF16, Q, check_against_oracle, gen_case, run_case
except ModuleNotFoundError as e:
    if e.name not in ("cases", "oracle"):
        raise
    sys.exit("sanitize_case.py uses the tests' helpers: run it from the repository root as "
             "PYTHONPATH=tests python scripts/sanitize_case.py")

mesh = N2 if len(jax.devices("gpu")) >= 2 else N1
print(f"group of {mesh.group}")
rng = np.random.default_rng(11)
for algo in ALGORITHMS:
    for quant, outputs, H in ((Q.nvfp4(), ("residual", "norm", "quant"), 336),
                              (Q.fp8_per_group(64), ("quant",), 320),
                              (Q.fp8_per_group(48), ("norm", "quant"), 336),
                              (Q.fp8_static(0.02), ("residual", "quant"), 320),
                              (Q.fp8_per_token(), ("quant",), 320)):
        case = gen_case(rng, mesh, dtype=BF16, M=5, H=H, K=5, scales="f32", shared=True,
                        oob=True, quant=quant, outputs=outputs)
        for _ in range(2):
            check_against_oracle(run_case(case, mesh, platform="gpu", algorithm=algo)[0], case)
mar.check_errors()
print("SANITIZE-CASE OK")
