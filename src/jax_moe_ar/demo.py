"""``python -m jax_moe_ar demo``: a small MoE decode layer that ends in the fused op.
(Over 400 lines: the all-reduce layer end and, with ``--scatter``, its sequence-parallel
reduce-scatter counterpart share the model and the checks.)

The layer runs inside ``jax.jit(jax.shard_map(..., check_vma=True))`` over every local
device (one mesh axis ``"tp"``, the tensor/expert-parallel group). Per step:

1. router: ``x [M, H] @ w_router [H, E]`` -> top-k experts per token and softmax scales;
2. routed experts: rank r owns experts ``r*E/N .. (r+1)*E/N - 1``; it runs them on the
   tokens routed to them and lays the rows out *permuted* (sorted by expert, then token),
   giving ``expert_out [P, H]`` (P = M*K rows of capacity) and ``permuted_idx [M, K]``
   (the row of token m's k-th expert, -1 where another rank holds that expert);
3. shared expert: each rank holds a slice of its intermediate dimension, so its output is
   a partial sum;
4. ``mar.moe_finalize_allreduce(..., quant=mar.Fp8PerToken(),
   outputs=("residual", "norm", "quant"))`` — the fused op — and the same call with
   ``algorithm="xla"`` (plain XLA ops + ``lax.psum``) on the same inputs.

The fused outputs feed the next step (new residual; the normed activations are the next
layer's input). Each step prints how far fused and xla are apart and how long each layer
step takes. Exit status 0 when they agree within tolerance (bf16: relative error < 2e-2).

With ``--scatter`` it runs a sequence-parallel layer end instead: the residual stream and
the layer input stay token-sharded (M/N tokens per rank), the input is all-gathered for
the experts, and ``mar.moe_finalize_reduce_scatter`` hands each rank back its own tokens;
checked against ``algorithm="xla"`` (``lax.psum_scatter``) and, row for row, against the
all-reduce op on the same inputs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from .cli import (PATH_DESCRIPTIONS, add_platform_argument, compiled_path, device_summary,
                  dtype_of, select_devices, tp_mesh)

DESCRIPTION = __doc__

# Max-norm relative tolerance (max|fused - xla| / max|xla|) of residual and norm per dtype.
TOLERANCE = {"bf16": 2e-2, "f16": 2e-3, "f32": 1e-4}
# Dequantized FP8 values: one e4m3 step is at most 2^-3 of a value; a norm that differs by
# an ulp may flip a code by one step.
QUANT_TOLERANCE = 0.15


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", "-M", type=int, default=8, help="tokens per step M")
    parser.add_argument("--hidden", "-H", type=int, default=256,
                        help="hidden size H (multiple of 16)")
    parser.add_argument("--experts", "-E", type=int, default=16,
                        help="routed experts E (a multiple of the device count)")
    parser.add_argument("--topk", "-K", type=int, default=4, help="experts per token K")
    parser.add_argument("--ffn", type=int, default=128,
                        help="intermediate size of each routed expert")
    parser.add_argument("--shared-ffn", type=int, default=256,
                        help="intermediate size of the shared expert (split over the ranks)")
    parser.add_argument("--steps", type=int, default=4, help="decode steps")
    parser.add_argument("--devices", type=int, default=0,
                        help="use only the first N devices (0 = all local devices)")
    parser.add_argument("--dtype", choices=tuple(TOLERANCE), default="bf16",
                        help="activation dtype T")
    parser.add_argument("--routed-scaling-factor", type=float, default=2.5)
    parser.add_argument("--reps", type=int, default=5,
                        help="timed runs per step and path (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scatter", action="store_true",
                        help="run a sequence-parallel layer end instead: the residual stream "
                             "stays token-sharded (M/N tokens per rank) and "
                             "moe_finalize_reduce_scatter returns each rank its own M/N tokens; "
                             "checked against algorithm='xla' (lax.psum_scatter)")
    add_platform_argument(parser)


def _init_params(key, N, H, E, F, Fs, dtype):
    import jax
    import jax.numpy as jnp
    ks = jax.random.split(key, 6)

    def normal(k, shape, fan_in):
        return (jax.random.normal(k, shape, jnp.float32) / np.sqrt(fan_in)).astype(dtype)

    return dict(
        w_router=normal(ks[0], (H, E), H),
        w1=normal(ks[1], (E, H, F), H),           # sharded over experts
        w2=normal(ks[2], (E, F, H), F),
        ws1=normal(ks[3], (H, Fs), H),            # shared expert, sharded over Fs
        ws2=normal(ks[4], (Fs, H), Fs),
        norm_weight=(1.0 + 0.1 * jax.random.normal(ks[5], (H,), jnp.float32)).astype(dtype),
    )


def _moe_partials(x, w_router, w1, w2, ws1, ws2, *, K):
    """Steps 1-3 on one rank (inside shard_map) for the tokens x [M, H]: (expert_out,
    permuted_idx, expert scales, shared-expert partial), this rank's partial of the layer."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    M, H = x.shape
    e_local = w1.shape[0]
    T = x.dtype
    f32 = jnp.float32

    # 1. router (replicated): top-k experts, softmax over the chosen logits.
    logits = jnp.dot(x, w_router, preferred_element_type=f32)
    top_logits, top_e = lax.top_k(logits, K)
    scales = jax.nn.softmax(top_logits, axis=-1)                      # [M, K] float32

    # 2. this rank's experts, rows laid out sorted by (local expert, token).
    rank = lax.axis_index("tp")
    local = (top_e // e_local) == rank
    e_loc = jnp.where(local, top_e - rank * e_local, e_local)        # e_local = "elsewhere"
    token = jnp.broadcast_to(jnp.arange(M, dtype=jnp.int32)[:, None], (M, K))
    order = jnp.argsort((e_loc * M + token).reshape(-1), stable=True)  # row p -> pair
    position = jnp.argsort(order)                                     # pair -> row p
    permuted_idx = jnp.where(local, position.reshape(M, K), -1).astype(jnp.int32)
    h = jax.nn.silu(jnp.einsum("mh,ehf->emf", x, w1, preferred_element_type=f32)).astype(T)
    y = jnp.einsum("emf,efh->emh", h, w2, preferred_element_type=f32).astype(T)
    row_e, row_m = e_loc.reshape(-1)[order], token.reshape(-1)[order]
    rows = y[jnp.minimum(row_e, e_local - 1), row_m]
    expert_out = jnp.where((row_e < e_local)[:, None], rows, jnp.zeros_like(rows))  # [M*K, H]

    # 3. shared expert: this rank's slice of the intermediate dim -> a partial sum.
    hs = jax.nn.silu(jnp.dot(x, ws1, preferred_element_type=f32)).astype(T)
    shared = jnp.dot(hs, ws2, preferred_element_type=f32).astype(T)
    return expert_out, permuted_idx, scales, shared


def _layer(x, residual, w_router, w1, w2, ws1, ws2, norm_weight, *, K, rsf, algorithm):
    """One MoE layer tail on one rank (inside shard_map); returns the op's outputs."""
    import jax_moe_ar as mar

    expert_out, permuted_idx, scales, shared = _moe_partials(x, w_router, w1, w2, ws1, ws2,
                                                             K=K)
    # 4. finalize + all-reduce + residual + RMSNorm + FP8 per-token quant.
    return mar.moe_finalize_allreduce(
        expert_out, permuted_idx, residual, norm_weight, axis_name="tp",
        expert_scales=scales, shared_expert_out=shared, routed_scaling_factor=rsf,
        quant=mar.Fp8PerToken(), outputs=("residual", "norm", "quant"), algorithm=algorithm)


def _devices_or_none(args):
    """(platform, devices) for the demo's flags, or (platform, None) after printing why the
    sizes do not fit the device count."""
    platform, devs = select_devices(args.platform)
    if args.devices:
        if args.devices > len(devs):
            print(f"error: --devices {args.devices} but only {len(devs)} {platform} devices",
                  file=sys.stderr)
            return platform, None
        devs = devs[:args.devices]
    N = len(devs)
    M, H, E, K = args.tokens, args.hidden, args.experts, args.topk
    problems = []
    if E % N:
        problems.append(f"--experts {E} must be a multiple of the device count {N}")
    if K > E:
        problems.append(f"--topk {K} must be <= --experts {E}")
    if args.shared_ffn % N:
        problems.append(f"--shared-ffn {args.shared_ffn} must be a multiple of {N}")
    if H % 16:
        problems.append(f"--hidden {H} must be a multiple of 16")
    if getattr(args, "scatter", False) and M % N:
        problems.append(f"--tokens {M} must be a multiple of the device count {N} with "
                        "--scatter (each rank owns M/N tokens)")
    if problems:
        print("error: " + "; ".join(problems), file=sys.stderr)
        return platform, None
    return platform, devs


def _weights(args, mesh, N, T):
    """(partition specs, names, device-placed weights) of the layer."""
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    params = _init_params(jax.random.key(args.seed), N, args.hidden, args.experts, args.ffn,
                          args.shared_ffn, T)
    specs = dict(w_router=P(), w1=P("tp"), w2=P("tp"), ws1=P(None, "tp"), ws2=P("tp", None),
                 norm_weight=P())
    names = ("w_router", "w1", "w2", "ws1", "ws2", "norm_weight")
    return specs, names, [jax.device_put(params[n], NamedSharding(mesh, specs[n]))
                          for n in names]


def _compare(a, b):
    """(max |a-b|, max|a-b| / max|b|, fraction of bit-identical values)."""
    a = np.asarray(a)
    b = np.asarray(b)
    fa, fb = a.astype(np.float32), b.astype(np.float32)
    diff = np.abs(fa - fb)
    max_abs = float(np.nanmax(diff)) if diff.size else 0.0
    ref = float(np.nanmax(np.abs(fb))) if fb.size else 0.0
    rel = max_abs / ref if ref > 0 else (0.0 if max_abs == 0 else float("inf"))
    ident = 1.0
    if a.size:  # bit-identical per value (all of its bytes)
        bytes_a = a.view(np.uint8).reshape(a.size, -1)
        bytes_b = b.view(np.uint8).reshape(b.size, -1)
        ident = float(np.mean(np.all(bytes_a == bytes_b, axis=1)))
    if np.isnan(fa).any() or np.isnan(fb).any():
        rel = float("inf")
    return max_abs, rel, ident


def _time(fn, args, reps):
    import jax
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main(args) -> int:
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import jax_moe_ar as mar

    if getattr(args, "scatter", False):
        return scatter_main(args)
    platform, devs = _devices_or_none(args)
    if devs is None:
        return 2
    N = len(devs)
    M, H, E, K = args.tokens, args.hidden, args.experts, args.topk
    T = dtype_of(args.dtype)
    tol = TOLERANCE[args.dtype]

    mesh = tp_mesh(devs)
    print(f"jax_moe_ar demo — jax {jax.__version__}, running on {device_summary(platform, devs)}, "
          f"group of {N} ranks along mesh axis 'tp'")
    print(f"MoE decode layer: M={M} tokens, H={H}, E={E} experts ({E // N} per rank), K={K}, "
          f"dtype={args.dtype}, routed_scaling_factor={args.routed_scaling_factor}, "
          f"quant=Fp8PerToken, outputs=(residual, norm, quant)")

    specs, names, weights = _weights(args, mesh, N, T)
    kx, kr = jax.random.split(jax.random.key(args.seed + 1))
    rep = NamedSharding(mesh, P())
    x = jax.device_put(jax.random.normal(kx, (M, H), jnp.float32).astype(T), rep)
    residual = jax.device_put(jax.random.normal(kr, (M, H), jnp.float32).astype(T), rep)

    def program(algorithm):
        def body(x, residual, *w):
            return tuple(_layer(x, residual, *w, K=K, rsf=args.routed_scaling_factor,
                                algorithm=algorithm))
        return jax.jit(jax.shard_map(
            body, mesh=mesh, in_specs=(P(), P()) + tuple(specs[n] for n in names),
            out_specs=P(), check_vma=True))

    t0 = time.perf_counter()
    compiled = {}
    for algo in ("auto", "xla"):
        compiled[algo] = program(algo).lower(x, residual, *weights).compile()
    print(f"compiled both programs in {time.perf_counter() - t0:.1f} s; fused path: "
          f"{PATH_DESCRIPTIONS[compiled_path(compiled['auto'].as_text())]}")
    for algo in ("auto", "xla"):  # warm-up
        jax.block_until_ready(compiled[algo](x, residual, *weights))
    mar.check_errors()

    quant = mar.Fp8PerToken()
    ok = True
    walls = {"auto": [], "xla": []}
    print(f"\ntolerance: max|fused - xla| / max|xla| < {tol:g} for residual and norm, "
          f"< {QUANT_TOLERANCE:g} for dequantized FP8; times are medians of {args.reps} runs "
          "of the whole layer step")
    for step in range(args.steps):
        outs = {algo: mar.FusedOutputs(*compiled[algo](x, residual, *weights))
                for algo in ("auto", "xla")}
        mar.check_errors()
        f, r = outs["auto"], outs["xla"]
        res_abs, res_rel, res_id = _compare(f.residual, r.residual)
        nrm_abs, nrm_rel, nrm_id = _compare(f.norm, r.norm)
        _, q_rel, _ = _compare(mar.dequantize(f, quant), mar.dequantize(r, quant))
        _, _, code_id = _compare(f.quant, r.quant)
        for algo in ("auto", "xla"):
            walls[algo].append(_time(compiled[algo], (x, residual, *weights), args.reps))
        step_ok = res_rel < tol and nrm_rel < tol and q_rel < QUANT_TOLERANCE
        ok &= step_ok
        print(f"step {step}: residual max|d|={res_abs:.3g} rel={res_rel:.2e} "
              f"bit-identical={100 * res_id:.2f}% | norm max|d|={nrm_abs:.3g} "
              f"rel={nrm_rel:.2e} bit-identical={100 * nrm_id:.2f}% | fp8 codes identical="
              f"{100 * code_id:.2f}% dequant rel={q_rel:.2e} | wall/step fused "
              f"{1e3 * walls['auto'][-1]:.3f} ms, xla {1e3 * walls['xla'][-1]:.3f} ms"
              + ("" if step_ok else "  <-- OUT OF TOLERANCE"))
        # The fused outputs drive the next step: new residual, normed activations as input.
        x, residual = f.norm, f.residual

    fm, xm = statistics.median(walls["auto"]), statistics.median(walls["xla"])
    print(f"\nmedian wall time per layer step: fused {1e3 * fm:.3f} ms, xla {1e3 * xm:.3f} ms "
          f"({xm / fm:.2f}x) on {device_summary(platform, devs)}")
    if platform == "cpu":
        print("note: CPU timings (forced host devices) say nothing about GPU performance; "
              "run `python -m jax_moe_ar bench` on GPUs for that.")
    if ok:
        print("OK: fused and xla agree within tolerance at every step.")
        return 0
    print("FAIL: fused and xla disagree beyond tolerance (see the marked steps).")
    return 1



# ----------------------------------------------- --scatter: a sequence-parallel layer end

_SCATTER_PATHS = {
    "cuda-fused": "fused CUDA kernel",
    "cpu-ffi": "CPU FFI path (finalize FFI -> all_to_all -> reduce/norm/quant FFI on this "
               "rank's rows)",
    "xla": "plain XLA ops + lax.psum_scatter",
}


def _scatter_layer(x_local, residual_local, w_router, w1, w2, ws1, ws2, norm_weight, *, K,
                   rsf, algorithm):
    """A sequence-parallel MoE layer end on one rank: the residual stream and the layer's
    input stay token-sharded ([M/N, H] here); the experts need every token, so the input
    is all-gathered, and the reduce-scatter hands each rank back only its M/N tokens."""
    from jax import lax

    import jax_moe_ar as mar

    x = lax.all_gather(x_local, "tp", tiled=True)                    # [M, H]
    expert_out, permuted_idx, scales, shared = _moe_partials(x, w_router, w1, w2, ws1, ws2,
                                                             K=K)
    return mar.moe_finalize_reduce_scatter(
        expert_out, permuted_idx, residual_local, norm_weight, axis_name="tp",
        expert_scales=scales, shared_expert_out=shared, routed_scaling_factor=rsf,
        quant=mar.Fp8PerToken(), outputs=("residual", "norm", "quant"), algorithm=algorithm)


def scatter_main(args) -> int:
    """`demo --scatter`: the sequence-parallel layer end with the reduce-scatter variant,
    against algorithm="xla" (lax.psum_scatter); each step also reports how many values
    equal, bit for bit, the all-reduce op's rows on the same inputs."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import jax_moe_ar as mar

    platform, devs = _devices_or_none(args)
    if devs is None:
        return 2
    N = len(devs)
    M, H, E, K = args.tokens, args.hidden, args.experts, args.topk
    T = dtype_of(args.dtype)
    tol = TOLERANCE[args.dtype]
    mesh = tp_mesh(devs)
    print(f"jax_moe_ar demo --scatter — jax {jax.__version__}, running on "
          f"{device_summary(platform, devs)}, group of {N} ranks along mesh axis 'tp'")
    print(f"sequence-parallel MoE layer end: M={M} tokens, {M // N} per rank (residual stream "
          f"and layer input token-sharded, P('tp')), H={H}, E={E} experts ({E // N} per "
          f"rank), K={K}, dtype={args.dtype}, quant=Fp8PerToken, outputs=(residual, norm, "
          "quant); the input is all-gathered, moe_finalize_reduce_scatter returns each rank "
          "its own tokens")
    specs, names, weights = _weights(args, mesh, N, T)
    w_specs = tuple(specs[n] for n in names)
    kx, kr = jax.random.split(jax.random.key(args.seed + 1))
    tok = NamedSharding(mesh, P("tp"))
    x = jax.device_put(jax.random.normal(kx, (M, H), jnp.float32).astype(T), tok)
    residual = jax.device_put(jax.random.normal(kr, (M, H), jnp.float32).astype(T), tok)
    kw = dict(K=K, rsf=args.routed_scaling_factor)

    def scatter_program(algorithm):
        def body(x, residual, *w):
            return tuple(_scatter_layer(x, residual, *w, algorithm=algorithm, **kw))
        return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("tp"), P("tp")) + w_specs,
                                     out_specs=P("tp"), check_vma=True))

    def allreduce_program():
        # The same layer with the all-reduce op: every rank gets all M tokens.
        def body(x, residual, *w):
            from jax import lax
            full = lax.all_gather(x, "tp", tiled=True)
            res = lax.all_gather(residual, "tp", tiled=True)
            return tuple(_layer(full, res, *w, algorithm="auto", **kw))
        # all_gather results are typed varying; the op's outputs are equal on every rank
        return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("tp"), P("tp")) + w_specs,
                                     out_specs=P(), check_vma=False))

    t0 = time.perf_counter()
    args_now = (x, residual, *weights)
    compiled = {a: scatter_program(a).lower(*args_now).compile() for a in ("auto", "xla")}
    allreduce = allreduce_program()
    what = _SCATTER_PATHS[compiled_path(compiled["auto"].as_text())]
    print(f"compiled in {time.perf_counter() - t0:.1f} s; reduce-scatter path: {what}")

    quant = mar.Fp8PerToken()
    ok = True
    walls = {"auto": [], "xla": []}
    print(f"\ntolerance: max|auto - xla| / max|xla| < {tol:g} for residual and norm, "
          f"< {QUANT_TOLERANCE:g} for dequantized FP8; 'rows vs all-reduce op': values equal "
          "bit for bit to moe_finalize_allreduce's rows on the same inputs (100% on the exact "
          f"paths: CPU, fused kernel); times are medians of {args.reps} runs")
    for step in range(args.steps):
        args_now = (x, residual, *weights)
        outs = {a: mar.FusedOutputs(*compiled[a](*args_now)) for a in ("auto", "xla")}
        full = mar.FusedOutputs(*allreduce(*args_now))
        mar.check_errors()
        f, r = outs["auto"], outs["xla"]
        assert f.residual.shape == (M, H) and f.residual.sharding.spec == P("tp")
        res_abs, res_rel, _ = _compare(f.residual, r.residual)
        nrm_abs, nrm_rel, _ = _compare(f.norm, r.norm)
        _, q_rel, _ = _compare(mar.dequantize(f, quant), mar.dequantize(r, quant))
        rows_id = min(_compare(f.residual, full.residual)[2], _compare(f.norm, full.norm)[2],
                      _compare(f.quant, full.quant)[2])
        for a in ("auto", "xla"):
            walls[a].append(_time(compiled[a], args_now, args.reps))
        step_ok = res_rel < tol and nrm_rel < tol and q_rel < QUANT_TOLERANCE
        ok &= step_ok
        print(f"step {step}: residual max|d|={res_abs:.3g} rel={res_rel:.2e} | norm "
              f"max|d|={nrm_abs:.3g} rel={nrm_rel:.2e} | dequant rel={q_rel:.2e} | rows vs "
              f"all-reduce op: {100 * rows_id:.2f}% bit-identical | wall/step auto "
              f"{1e3 * walls['auto'][-1]:.3f} ms, xla {1e3 * walls['xla'][-1]:.3f} ms"
              + ("" if step_ok else "  <-- OUT OF TOLERANCE"))
        x, residual = f.norm, f.residual  # still token-sharded: the next layer's input
    am, xm = statistics.median(walls["auto"]), statistics.median(walls["xla"])
    print(f"\nmedian wall time per layer step: auto {1e3 * am:.3f} ms, xla {1e3 * xm:.3f} ms "
          f"on {device_summary(platform, devs)}")
    if platform == "cpu":
        print("note: CPU timings (forced host devices) say nothing about GPU performance.")
    if ok:
        print("OK: reduce-scatter (auto) and xla agree within tolerance at every step.")
        return 0
    print("FAIL: reduce-scatter (auto) and xla disagree beyond tolerance (see the marked "
          "steps).")
    return 1
