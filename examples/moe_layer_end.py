"""The end of an MoE layer with jax_moe_ar: a complete script (the README's "Use").

`python examples/moe_layer_end.py` runs it on every local device: the GPUs if there are
some, else the CPU (XLA_FLAGS=--xla_force_host_platform_device_count=8 gives 8 devices).
"""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, PartitionSpec

import jax_moe_ar as mar

# One mesh axis, "tp": the group of N devices whose partial results the op sums. Axis type
# Auto: shard_map's in_specs say how arrays are split (jax.make_mesh would make Explicit axes).
devices = jax.devices()
N = len(devices)
mesh = Mesh(np.array(devices), ("tp",), axis_types=(AxisType.Auto,))

M, H, K = 4, 256, 2  # tokens, hidden size (a multiple of 16), experts per token
E = 2 * N            # routed experts: rank r holds experts 2r and 2r + 1
ROWS = M * K         # expert-output rows per rank (its capacity)
quant = mar.Fp8PerGroup(128, ue8m0=True)


def layer_end(expert_out, permuted_idx, expert_scales, shared_expert_out, residual,
              norm_weight):
    # Inside shard_map each argument is this rank's block (per-rank shapes):
    #   expert_out        [ROWS, H] bf16   this rank's expert output rows
    #   permuted_idx      [M, K]    int32  row of expert_out holding token m's k-th
    #                                      expert on this rank, or -1 (not on this rank)
    #   expert_scales     [M, K]    f32    router weights
    #   shared_expert_out [M, H]    bf16   this rank's partial of the shared expert
    #   residual          [M, H]    bf16   the residual stream (the same on every rank)
    #   norm_weight       [H]       f32    the RMSNorm weight (the same on every rank)
    return mar.moe_finalize_allreduce(
        expert_out, permuted_idx, residual, norm_weight, axis_name="tp",
        expert_scales=expert_scales, shared_expert_out=shared_expert_out,
        routed_scaling_factor=2.5, quant=quant, outputs=("residual", "norm", "quant"))


per_rank, same = PartitionSpec("tp"), PartitionSpec()
f = jax.jit(jax.shard_map(layer_end, mesh=mesh,
                          in_specs=(per_rank, per_rank, per_rank, per_rank, same, same),
                          out_specs=same))  # the outputs are the same on every rank

# Outside shard_map the arrays are global: a per-rank operand stacks the N ranks' blocks
# along axis 0 (rank r's expert_out is rows r*ROWS .. (r+1)*ROWS - 1).
rng = np.random.default_rng(0)
experts = np.argsort(rng.random((M, E)), axis=1)[:, :K]  # token m's K routed experts
slot = np.arange(M * K).reshape(M, K)                     # row m*K + k holds slot (m, k)
permuted_idx = np.concatenate([np.where(experts // 2 == r, slot, -1) for r in range(N)])
permuted_idx = jnp.asarray(permuted_idx, jnp.int32)                           # [N*M, K]
expert_out = jnp.asarray(rng.standard_normal((N * ROWS, H)), jnp.bfloat16)   # [N*ROWS, H]
router = rng.random((M, K))
expert_scales = jnp.asarray(np.tile(router / router.sum(1, keepdims=True), (N, 1)),
                            jnp.float32)                                      # [N*M, K]
shared_expert_out = jnp.asarray(rng.standard_normal((N * M, H)) / N, jnp.bfloat16)  # [N*M, H]
residual = jnp.asarray(rng.standard_normal((M, H)), jnp.bfloat16)            # [M, H]
norm_weight = jnp.asarray(1 + 0.1 * rng.standard_normal(H), jnp.float32)     # [H]

out = f(expert_out, permuted_idx, expert_scales, shared_expert_out, residual, norm_weight)
print(f"{N} {devices[0].platform} device(s); outputs:",
      {k: f"{v.dtype}{list(v.shape)}" for k, v in out._asdict().items()})

# The same in NumPy, in float32 (the op rounds the sum to bf16 where SPEC §3 says).
f32 = lambda a: np.asarray(a, np.float32)  # noqa: E731
rows = f32(expert_out).reshape(N, ROWS, H)
idx = np.asarray(permuted_idx).reshape(N, M, K)
scales = f32(expert_scales).reshape(N, M, K)
routed = sum(np.where(idx[r, :, k, None] >= 0, scales[r, :, k, None] * rows[r, idx[r, :, k]], 0)
             for r in range(N) for k in range(K))
want = 2.5 * routed + f32(shared_expert_out).reshape(N, M, H).sum(0) + f32(residual)
err = np.max(np.abs(f32(out.residual) - want)) / np.max(np.abs(want))
norm = f32(out.norm)
deq = np.max(np.abs(f32(mar.dequantize(out, quant)) - norm)) / np.max(np.abs(norm))
print(f"residual vs NumPy: max relative difference {err:.1e}; "
      f"dequantized FP8 vs norm: {deq:.1e}")
assert err < 2e-2 and deq < 0.15, "unexpectedly large difference"
