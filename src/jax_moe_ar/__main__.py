"""``python -m jax_moe_ar demo|bench`` — see ``--help`` of each subcommand."""

from __future__ import annotations

import argparse
import faulthandler
import sys

from .testing import force_host_devices

# Must happen before JAX starts its CPU backend (the first jax.devices() call, not the
# import). It only affects the CPU platform, so it is harmless on GPU machines, and it
# gives a machine without GPUs 8 devices to build multi-rank meshes from.
force_host_devices(8)

from . import bench, demo  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jax_moe_ar",
        description="jax_moe_ar: the end of an MoE layer (finalize + all-reduce + residual + "
                    "RMSNorm + quant) as one collective op. Subcommands: `demo` runs a small "
                    "MoE decode layer with the op and checks it against the plain-XLA "
                    "composition; `bench` times the op against that composition (SPEC §6).")
    sub = parser.add_subparsers(dest="command", metavar="{demo,bench}")
    sub.required = True
    demo.add_arguments(sub.add_parser(
        "demo", help="run a small MoE decode layer (router, experts, shared expert, fused "
                     "finalize+all-reduce+RMSNorm+FP8 quant) for a few steps; compare fused vs "
                     "xla and time both",
        description=demo.DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter))
    bench.add_arguments(sub.add_parser(
        "bench", help="time the fused op vs the 'xla' composition over token counts, quant "
                      "formats and group sizes (wall and GPU kernel time per call, NVLink "
                      "floor); table + JSON + PNG",
        description=bench.DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter))
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    faulthandler.enable()  # a crash in native code still names the Python line
    if args.command == "demo":
        return demo.main(args)
    return bench.main(args)


if __name__ == "__main__":
    sys.exit(main())
