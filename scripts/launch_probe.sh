#!/usr/bin/env bash
# Does XLA capture the fused custom call in its command buffers (CUDA graphs),
# and what do the launch settings pay? Small-M one-shot bench rows under three
# XLA_FLAGS settings, plus a grep of the optimized HLO for command buffers.
# Usage (device machine, after a build): bash scripts/launch_probe.sh [ranks]
set -uo pipefail
OUT=${OUT:-/tmp/jax_moe_ar_out}
R=${1:-2}
mkdir -p "$OUT/probe"
run() {  # name, XLA_FLAGS
  XLA_FLAGS="$2" timeout -s INT 120 python3 -m jax_moe_ar bench --ranks "$R" --quant none \
    --M 1,32,128 --algorithms oneshot --no-check --out "$OUT/probe/$1" > "$OUT/probe/$1.log" 2>&1
  echo "== $1 (XLA_FLAGS='$2')"
  grep -E "^ +$R none" "$OUT/probe/$1.log"
}
run default ""
run cmdbuf_off "--xla_gpu_enable_command_buffer="
run cmdbuf_cc "--xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL,WHILE --xla_gpu_graph_min_graph_size=1"
dump=/tmp/jax_moe_ar_hlo_dump
rm -rf "$dump"
XLA_FLAGS="--xla_dump_to=$dump --xla_dump_hlo_as_text" timeout -s INT 120 python3 -m jax_moe_ar \
  bench --ranks "$R" --quant none --M 1 --algorithms oneshot --no-check --no-profile --reps 1 \
  --in-process --out "$OUT/probe/dump" > "$OUT/probe/dump.log" 2>&1
for f in $(grep -l "jax_moe_ar_fused_v1" "$dump"/*after_optimizations.txt 2>/dev/null); do
  echo "== $(basename "$f"): custom calls $(grep -c 'custom_call_target="jax_moe_ar_fused_v1"' "$f"),"\
       "command_buffer mentions $(grep -ci 'command_buffer' "$f")"
  grep -i "command_buffer" "$f" | head -5 | cut -c1-200
done
ls "$dump" | grep -ci "thunk" | sed 's/^/thunk files: /'
for f in $(ls "$dump"/*thunk* 2>/dev/null | head -3); do echo "== $f"; grep -i "command\|custom" "$f" | head -8 | cut -c1-200; done
