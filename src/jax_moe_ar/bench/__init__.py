"""``python -m jax_moe_ar bench``: the fused op against the ``"xla"`` composition (SPEC §6).

For every group size N (``--ranks``), quant format (``--quant``) and token count M (``--M``)
it builds, per algorithm, ONE ``jax.jit(jax.shard_map(...))`` program that runs ``--chain``
calls of ``mar.moe_finalize_allreduce`` back to back (``[M, H]`` rows, K experts per token,
routed_scaling_factor 2.5, router scales, a shared-expert partial, default outputs:
residual + norm without quant, residual + quant with quant). Call i+1 consumes call i's
outputs: its residual is call i's new residual, and all of call i's outputs and all of
call i+1's operands pass through one ``lax.optimization_barrier``. The barrier costs
nothing at run time, but it keeps XLA from computing the loop-invariant finalize once for
all calls and from combining or reordering the all-reduces of different calls. It does
not keep alive an output that the next call does not read (norm_out, the quant codes and
scales): XLA removed the norm and the quantizer of the "xla" composition from every call
but the last of an unrolled block (one ``rsqrt`` in the compiled HLO of 8 unrolled calls
on an H200, docs/perf.md v12), while the fused op, one custom call, always writes all its
outputs. So each unrolled block ends with one side-effecting no-op custom call that takes
every output of its calls (the "keep-alive"; in every column alike, so the ffi no-op
column includes it too). The chain is a ``fori_loop`` over blocks of ``--unroll``
unrolled calls (trip count static, so XLA needs no host round trip per iteration; the
unrolling keeps compile time bounded).

Inputs are random normal (expert rows, shared-expert partials, residual, gamma near 1).
Each token's K distinct experts come from random router logits over ``--experts`` E
(default 256) owned by the ranks in blocks of E/N, with softmax scales; each rank's rows
are laid out expert-sorted, and its ``permuted_idx`` holds -1 where another rank owns
the expert (about (N-1)/N of the entries).

Reported per call:

- wall: median over ``--reps`` timed runs (after ``--warmup`` runs) of the whole program,
  dispatch to ``block_until_ready``, divided by the chain length;
- kernel: GPU time from a profile of one run (``jax.profiler.trace``; the ``.xplane.pb``
  is read with ``jax.profiler.ProfileData``): per GPU of the group, the union of the
  intervals of all events on its ``/device:GPU:<n>`` plane (kernels, NCCL kernels,
  memcpys), averaged over the group's GPUs, divided by the chain length. CPU runs have no
  device planes: "n/a";
- xla 1shot: the ``"xla"`` composition again, as a user would tune it: in a measuring
  process of its own started with
  ``XLA_FLAGS=--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true`` (appended to
  the flags already set; XLA reads them when its backend starts), which makes XLA's
  all-reduce its own one-shot peer-memory kernel. Meaningless on CPU: skipped there;
- ffi no-op: the same chain (same operands, same barriers) with a custom call that does no
  work of its own (``jax_moe_ar_noop_v1``: on a GPU it enqueues nothing, except one 4-byte
  memset while XLA captures it into a command buffer, so that a capture is never empty; its
  4-byte result, which the next call takes, is otherwise left unwritten) in place of the
  op — what XLA itself spends per custom call (~3 µs on the 1xH200 host of docs/perf.md
  v15, with or without the memset);
- speedup: the faster of the two xla columns' wall time / fused wall time (the JSON says
  which xla column it was, ``speedup_vs``);
- floor: the bytes each GPU must send over NVLink for one call, divided by the NVLink
  bandwidth measured in the same run::

      floor_bytes = (N - 1) / N * M * H * 2 * bytes(T)

  i.e. a reduce-scatter of the T partials plus an all-gather of residual_out in T (the
  default outputs always include it, and every rank derives norm and quant from it), the
  bytes of an all-reduce of T. The bandwidth is the best of several
  timed ``jax.device_put`` copies of ``--bw-mib`` MiB from GPU 0 to GPU 1 (one GPU's
  one-way copy-engine rate); "% of floor" = floor / fused wall time per call (100% = at
  the physical limit). CPU runs skip the measurement ("n/a").

Every measurement runs in a child process (``python -m jax_moe_ar.bench.worker``; one per
set of XLA flags; ``--in-process`` to measure here instead, without the xla 1shot column):
a crash in XLA's compiler or in a kernel, or a hang (``--task-timeout``), costs that one
measurement — reported in the table and the JSON — and a fresh child takes the next.
Each row also checks one fused call against one xla call (residual, max-norm relative
difference < 2e-2; ``--no-check`` skips it).

Outputs: a table on stdout, ``bench.json`` (device kind, GPU count, jax version, chain
length, bandwidth, every row) and ``bench.png`` (latency vs M, log-log; needs
matplotlib — ``pip install "jax_moe_ar[bench]"`` — skipped with a message without it) in
``--out``. On a machine without GPUs it runs small sizes on forced CPU devices; those
numbers are NOT meaningful for the GPU targets.

The package, one job a file: ``inputs`` (quant formats, routing, device arrays),
``programs`` (the chains, the check, the floor), ``timing`` (wall clock, profiles, link
bandwidth), ``worker`` (the measuring process), ``pool`` (where tasks run), ``report``
(table, JSON, plot), ``run`` (arguments and the run, parent side).
"""

from .run import add_arguments, main

DESCRIPTION = __doc__

__all__ = ["DESCRIPTION", "add_arguments", "main"]
