"""The programs the bench times and checks: the chain of calls (of the op, or of the no-op
custom call in its place), the single-call agreement check, and the NVLink floor formula."""

from __future__ import annotations

from .._contract import TARGETS
from .inputs import ROUTED_SCALING_FACTOR, in_specs, quant_spec

# The pseudo-algorithm of the chain whose calls are the no-op custom call (csrc/ffi/noop.cc).
NOOP = "noop"
NOOP_TARGET = TARGETS["noop"]  # csrc/ffi/noop.cc
FLOOR_FORMULA = ("floor = (N-1)/N * M*H*2*bytes(T) / BW (with --scatter: (N-1)/N * M*H*bytes(T)"
                 " / BW)")


def _to_varying(x):
    """x typed varying along "tp" (a no-op at run time; already varying: x itself)."""
    import jax
    from jax import lax
    aval = jax.typeof(x)
    mat = getattr(aval, "mat", None)  # jax 0.10 keeps the varying axes there, older in .vma
    if "tp" in (mat.varying if mat is not None else getattr(aval, "vma", ())):
        return x
    if hasattr(lax, "pcast"):
        return lax.pcast(x, ("tp",), to="varying")
    return lax.pvary(x, ("tp",))  # older jax


def _op(scatter):
    """The public function a chain calls: the all-reduce or (scatter) the reduce-scatter."""
    import jax_moe_ar as mar
    return mar.moe_finalize_reduce_scatter if scatter else mar.moe_finalize_allreduce


def _op_step(quant_name, algorithm, nw, scatter=False):
    """One call of the op: (previous outputs, operands) -> its outputs, residual first."""
    q = quant_spec(quant_name)
    op = _op(scatter)

    def step(prev, ex, idx, sc, sh):
        out = op(ex, idx, prev[0], nw, axis_name="tp", expert_scales=sc, shared_expert_out=sh,
                 routed_scaling_factor=ROUTED_SCALING_FACTOR, quant=q, algorithm=algorithm)
        return tuple(o for o in out if o is not None)

    return step


def _noop_step(quant_name, nw):
    """One no-op custom call on the op's operands (its quant scale too). It returns the
    residual unchanged and a 4-byte token that the next call takes as one more operand:
    that data dependence, not the barrier, is what keeps XLA from dropping the calls (an
    output only carried through the loop is dead to XLA, and to JAX's own loop DCE)."""
    import jax
    import jax.numpy as jnp

    from ..quant import scale_operand
    extra = [x for x in (scale_operand(quant_spec(quant_name)),) if x is not None]
    fixed = [_to_varying(x) for x in [nw] + extra]  # the call's operands must agree in vma
    noop = jax.ffi.ffi_call(NOOP_TARGET, jax.ShapeDtypeStruct((1,), jnp.int32))

    def step(prev, ex, idx, sc, sh):
        res = prev[0]
        token = noop(ex, idx, res, *fixed[:1], sc, sh, *fixed[1:],
                     *(_to_varying(t) for t in prev[1:]))
        return res, token

    return step


def _keep_alive(outputs):
    """One side-effecting no-op custom call that takes `outputs` as operands, so that XLA
    must compute them. Without it, an output the next call does not read (norm_out, the
    quant codes and scales) is dead code: XLA removes it from the "xla" composition (its
    norm and quantizer then run for the last call of an unrolled block only) while the
    fused op, one custom call, always writes it (docs/perf.md v12). One per unrolled block,
    the same in every column."""
    import jax
    import jax.numpy as jnp

    if outputs:
        jax.ffi.ffi_call(NOOP_TARGET, jax.ShapeDtypeStruct((1,), jnp.int32),
                         has_side_effect=True)(*outputs)


def chain_program(mesh, quant_name, algorithm, chain, unroll, scatter=False):
    """jit(shard_map) of `chain` chained calls of the op (``algorithm`` "auto", "oneshot",
    "twoshot" or "xla"; with ``scatter`` the reduce-scatter variant, whose residual is each
    rank's M/N rows) or of the no-op custom call (``NOOP``); returns every output of the
    last call (per rank, stacked along "tp")."""
    import jax
    from jax import lax
    from jax.sharding import PartitionSpec as P

    unroll = chain if unroll <= 0 else min(unroll, chain)
    n_loop, n_tail = divmod(chain - 1, unroll)

    def body(ex, idx, sc, sh, res, nw):
        step = (_noop_step(quant_name, nw) if algorithm == NOOP
                else _op_step(quant_name, algorithm, nw, scatter))

        def call(prev, ex, idx, sc, sh):
            outs = step(prev, ex, idx, sc, sh)
            # Free at run time; see the package docstring for what it prevents.
            return lax.optimization_barrier((outs, ex, idx, sc, sh))

        def steps(n, carry):
            outs, ex, idx, sc, sh = carry
            read_by_none = []  # every output but the residual, which the next call reads
            for _ in range(n):
                outs, ex, idx, sc, sh = call(outs, ex, idx, sc, sh)
                read_by_none.extend(outs[1:])
            _keep_alive(read_by_none)
            return outs, ex, idx, sc, sh

        # The first call, outside the loop, gives the carry its types (the barrier makes
        # everything varying along "tp"); then n_loop blocks of `unroll` calls, then the rest.
        carry = call((_to_varying(res),), ex, idx, sc, sh)
        _keep_alive(list(carry[0][1:]))
        if n_loop:
            carry = lax.fori_loop(0, n_loop, lambda i, c: steps(unroll, c), carry)
        carry = steps(n_tail, carry)
        return carry[0]

    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=in_specs(scatter),
                                 out_specs=P("tp"), check_vma=True))


def check_program(mesh, quant_name, algorithm, scatter=False):
    """One fused and one xla call on the same inputs; returns both residuals."""
    import jax
    from jax.sharding import PartitionSpec as P

    def body(ex, idx, sc, sh, res, nw):
        q = quant_spec(quant_name)
        kw = dict(axis_name="tp", expert_scales=sc, shared_expert_out=sh,
                  routed_scaling_factor=ROUTED_SCALING_FACTOR, quant=q)
        a = _op(scatter)(ex, idx, res, nw, algorithm=algorithm, **kw)
        b = _op(scatter)(ex, idx, res, nw, algorithm="xla", **kw)
        return a.residual, b.residual

    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=in_specs(scatter),
                                 out_specs=P("tp") if scatter else P(), check_vma=True))


def floor_bytes(N, M, H, itemsize, quant_name, scatter=False):
    """(N-1)/N * M*H*2*bytes(T): a reduce-scatter of the T partials plus an all-gather
    of residual_out in T, per GPU. The bench asks for the default outputs, which always
    include residual_out: from it every rank derives norm and quant itself, so no
    smaller all-gather can carry them (the bytes of an all-reduce of T). A reduce-scatter
    (SPEC §2.1) keeps each rank's rows: only the first half, (N-1)/N * M*H*bytes(T)."""
    del quant_name  # the default outputs all carry residual_out
    return (N - 1) / N * (1 if scatter else 2) * M * H * itemsize
