"""Where the fused kernel's time goes: block 0's phase times per rank.

Runs chains of calls like `python -m jax_moe_ar bench` (same inputs and program) with
$JAX_MOE_AR_TRACE=1, so the workspaces record what block 0 of each rank did in the last
call (kernels/fused.h TraceWord), and prints them in µs. Device machine only.
Usage: python scripts/phase_trace.py --ranks 2 --M 1,128,8192 --quant none --algorithms oneshot
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("JAX_MOE_AR_TRACE", "1")

import jax  # noqa: E402

from jax_moe_ar import _native  # noqa: E402
from jax_moe_ar.bench.inputs import IN_SPEC_NAMES, make_inputs  # noqa: E402
from jax_moe_ar.bench.programs import chain_program  # noqa: E402
from jax_moe_ar.cli import dtype_of, int_list, str_list, tp_mesh  # noqa: E402

WORDS = ("start", "end", "push", "stage", "finish", "other", "rows", "epoch")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ranks", type=int_list, default=[2])
    p.add_argument("--M", type=int_list, default=[1, 32, 128, 2048, 8192])
    p.add_argument("--H", type=int, default=7168)
    p.add_argument("--quant", type=str_list, default=["none"])
    p.add_argument("--algorithms", type=str_list, default=["oneshot", "twoshot"])
    p.add_argument("--chain", type=int, default=40)
    p.add_argument("--samples", type=int, default=2)
    a = p.parse_args()
    gpus = jax.devices("gpu")
    print(f"{'N':>2} {'quant':<14} {'M':>5} {'algo':<8} {'dev':>3} {'total':>8} {'push':>8} "
          f"{'stage':>8} {'finish':>8} {'other':>8} {'rows':>5}   (µs, block 0, last call)")
    for n in a.ranks:
        mesh = tp_mesh(gpus[:n])
        for m in a.M:
            inp = make_inputs(mesh, n, m, a.H, 8, 256, dtype_of("bf16"), 0)
            args = tuple(inp[k] for k in IN_SPEC_NAMES)
            for q in a.quant:
                for algo in a.algorithms:
                    f = chain_program(mesh, q, algo, a.chain, 20)
                    jax.block_until_ready(f(*args))
                    for _ in range(a.samples):
                        before = _native.read_traces()
                        jax.block_until_ready(f(*args))
                        for i, (d, w) in enumerate(_native.read_traces()):
                            if i < len(before) and tuple(before[i][1]) == tuple(w):
                                continue  # a workspace this program did not use
                            t = dict(zip(WORDS, w))
                            us = [(t["end"] - t["start"]) / 1e3] + [t[k] / 1e3 for k in
                                                                    ("push", "stage", "finish", "other")]
                            print(f"{n:>2} {q:<14} {m:>5} {algo:<8} {d:>3} " +
                                  " ".join(f"{u:8.2f}" for u in us) + f" {t['rows']:>5}")


if __name__ == "__main__":
    main()
