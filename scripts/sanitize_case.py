"""A small exact run of both kernels, for compute-sanitizer (memcheck, racecheck).

Two calls per algorithm on every GPU pair available (2 ranks), odd M and H, every
output and NVFP4 swizzled scales (the padding writes), then the oracle check. Prints
"SANITIZE-CASE OK" at the end. Run from the repository root on a GPU machine:
    compute-sanitizer --tool memcheck python scripts/sanitize_case.py
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import numpy as np  # noqa: E402

import jax_moe_ar as mar  # noqa: E402
from jax_moe_ar.testing import N2  # noqa: E402

from cases import BF16, Q, check_against_oracle, gen_case, run_case  # noqa: E402

rng = np.random.default_rng(11)
for algo in ("oneshot", "twoshot"):
    for quant, outputs in ((Q.nvfp4(), ("residual", "norm", "quant")),
                           (Q.fp8_per_group(64), ("quant",))):
        case = gen_case(rng, N2, dtype=BF16, M=5, H=320, K=5, scales="f32", shared=True,
                        oob=True, quant=quant, outputs=outputs)
        for _ in range(2):
            check_against_oracle(run_case(case, N2, platform="gpu", algorithm=algo)[0], case)
mar.check_errors()
print("SANITIZE-CASE OK")
