"""Random cases for jax_moe_ar, a runner over a MeshCase, and SPEC §3's agreement check.

Shared by the CPU tests and the GPU tests: the platform ("cpu" / "gpu") and the
op's `algorithm` are parameters of the runner; nothing here assumes a platform.

    case = gen_case(rng, N4, dtype=BF16, M=7, H=64, quant=Q.nvfp4(600.0, "linear"))
    outs = run_case(case, N4)                  # list (one per group) of output dicts
    for g, out in enumerate(outs):
        check_against_oracle(out, case, g)

A case holds, per group of the mesh, the per-rank operands (numpy) and the group's
residual; the norm weight and every static argument are shared by all groups.
"""

from __future__ import annotations

import dataclasses
import os
import zlib

import ml_dtypes
import numpy as np

import oracle
from jax_moe_ar.testing import N1, N2, N4, MeshCase

F32 = np.dtype(np.float32)
F16 = np.dtype(np.float16)
BF16 = np.dtype(ml_dtypes.bfloat16)
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
DTYPES = (BF16, F16, F32)
H_REAL = 7168  # DeepSeek-V3's hidden size
OUTPUT_NAMES = ("residual", "norm", "quant")

# What the tests range over, in one place (the meshes themselves: jax_moe_ar.testing).
ALGORITHMS = ("oneshot", "twoshot")          # the fused kernel's; the `algorithm` fixture
GPU_MESHES = (N1, N2, N4)                    # one group over 1, 2 and 4 GPUs
SMALL_GPU_MESHES = (N1, N2)                  # for the wider parameter sweeps
# Meshes beyond testing.MESH_CASES for the CPU path: the reduction axis major, three
# axes, a tuple in the reverse of mesh order, a tuple of one name.
EXTRA_MESHES = [
    MeshCase((2, 2), ("tp", "dp"), "tp"),
    MeshCase((2, 2, 2), ("dp", "x", "y"), ("x", "y")),
    MeshCase((2, 4), ("x", "y"), ("y", "x")),
    MeshCase((4,), ("tp",), ("tp",)),
]

INT32_MIN = -2 ** 31
INT32_MAX = 2 ** 31 - 1
HUGE_INDICES = (2 ** 30, INT32_MIN, INT32_MAX, INT32_MIN + 1, -2, -7)


def require_gpus(n: int) -> None:
    """Skips the calling test on machines with fewer than n CUDA GPUs (for tests that build
    their meshes in a child process, where make_mesh cannot skip them)."""
    import jax
    import pytest
    have = len([d for d in jax.devices() if d.platform == "gpu"])
    if have < n:
        pytest.skip(f"needs {n} GPUs, have {have}")


def mesh_id(mc: MeshCase) -> str:
    """A mesh case's id with its reduction axes (n4_dp2_tp2_over_tp)."""
    axis = "+".join(mc.axis) if isinstance(mc.axis, tuple) else mc.axis
    return f"{mc.id}_over_{axis}"


def dtype_id(dt) -> str:
    return {BF16: "bf16", F16: "f16", F32: "f32"}[np.dtype(dt)]


def seed_for(name: str) -> int:
    """Deterministic per-test seed (fresh data per test); $JAX_MOE_AR_TEST_SEED shifts all."""
    base = int(os.environ.get("JAX_MOE_AR_TEST_SEED", "0"))
    return (zlib.crc32(name.encode()) + 7919 * base) % (2 ** 32)


# --------------------------------------------------------------------- quant specs

@dataclasses.dataclass(frozen=True)
class Q:
    """A quant spec described without jax arrays: makes both the package's spec and the
    oracle's (kind, params)."""

    kind: str                    # one of oracle.QUANT_KINDS
    params: tuple = ()           # sorted (name, value) pairs; python values

    @staticmethod
    def fp8_static(scale: float = 0.01) -> "Q":
        return Q("fp8_static", (("scale", float(scale)),))

    @staticmethod
    def fp8_per_token() -> "Q":
        return Q("fp8_per_token")

    @staticmethod
    def fp8_per_group(group_size: int = 128, ue8m0: bool = False, scale_layout: str = "row") -> "Q":
        return Q("fp8_per_group", (("group_size", int(group_size)), ("scale_layout", scale_layout),
                                   ("ue8m0", bool(ue8m0))))

    @staticmethod
    def nvfp4(global_scale: float = 448.0 * 6 / 5, layout: str = "swizzled_128x4") -> "Q":
        return Q("nvfp4", (("global_scale", float(global_scale)), ("layout", layout)))

    @property
    def p(self) -> dict:
        return dict(self.params)

    @property
    def id(self) -> str:
        p = self.p
        if self.kind == "fp8_per_group":
            return (f"pergroup{p['group_size']}{'_ue8m0' if p['ue8m0'] else ''}"
                    f"_{p['scale_layout']}")
        if self.kind == "nvfp4":
            return f"nvfp4_{'swz' if p['layout'] == 'swizzled_128x4' else 'lin'}"
        return {"fp8_static": "static", "fp8_per_token": "pertoken"}[self.kind]

    @property
    def takes_scale(self) -> bool:
        return self.kind in ("fp8_static", "nvfp4")

    @property
    def scale_value(self) -> float | None:
        p = self.p
        return p.get("scale", p.get("global_scale"))

    def spec(self, scale=None):
        """The jax_moe_ar spec; `scale` (a traced or concrete float32 scalar) overrides the
        FP8 static scale / NVFP4 global scale, which otherwise is jnp.float32(value)."""
        import jax.numpy as jnp
        import jax_moe_ar as mar
        p = self.p
        if scale is None and self.takes_scale:
            scale = jnp.float32(self.scale_value)
        if self.kind == "fp8_static":
            return mar.Fp8Static(scale)
        if self.kind == "fp8_per_token":
            return mar.Fp8PerToken()
        if self.kind == "fp8_per_group":
            return mar.Fp8PerGroup(p["group_size"], p["ue8m0"], p["scale_layout"])
        return mar.NvFp4(scale, p["layout"])

    def oracle_params(self) -> dict:
        p = self.p
        if self.kind == "fp8_static":
            return {"scale": np.float32(p["scale"])}
        if self.kind == "nvfp4":
            return {"global_scale": np.float32(p["global_scale"]), "layout": p["layout"]}
        return p

    def output_shapes(self, M: int, H: int):
        """((codes shape, dtype), (scale shape, dtype) or None) per SPEC §3's table."""
        def ru(x, m):
            return -(-x // m) * m
        p = self.p
        if self.kind == "nvfp4":
            nb = H // 16
            sf = (M, nb) if p["layout"] == "linear" else (ru(M, 128), ru(nb, 4))
            return ((M, H // 2), np.dtype(np.uint8)), (sf, E4M3)
        codes = ((M, H), E4M3)
        if self.kind == "fp8_static":
            return codes, None
        if self.kind == "fp8_per_token":
            return codes, ((M, 1), F32)
        G = H // p["group_size"]
        return codes, (((G, M) if p["scale_layout"] == "col" else (M, G)), F32)


ALL_QUANTS = (
    Q.fp8_static(0.01),
    Q.fp8_per_token(),
    Q.fp8_per_group(128),
    Q.fp8_per_group(32, ue8m0=True),
    Q.fp8_per_group(16, scale_layout="col"),
    Q.fp8_per_group(64, ue8m0=True, scale_layout="col"),
    Q.nvfp4(448.0 * 6 / 5, "linear"),
    Q.nvfp4(448.0 * 6 / 5, "swizzled_128x4"),
)


def default_outputs(quant) -> tuple[str, ...]:
    return ("residual", "quant") if quant is not None else ("residual", "norm")


# --------------------------------------------------------------------------- cases

@dataclasses.dataclass
class Case:
    """One call of the op over every group of a mesh."""

    dense: bool
    dtype: np.dtype
    N: int                      # ranks per group
    M: int
    H: int
    K: int
    P: int
    groups: list                # per group: {"ranks": [per-rank dict], "residual": [M,H] T}
    norm_weight: np.ndarray     # [H], T or float32
    has_scales: bool = False
    has_shared: bool = False
    rsf: float = 1.0
    eps: float = 1e-6
    offset: float = 0.0
    quant: Q | None = None
    outputs: tuple | None = None   # as passed to the op (None = default)

    @property
    def resolved_outputs(self) -> tuple[str, ...]:
        outs = default_outputs(self.quant) if self.outputs is None else self.outputs
        if isinstance(outs, str):
            outs = (outs,)
        return tuple(outs)

    def kwargs(self) -> dict:
        """Static keyword arguments of the op (without axis_name, quant, algorithm)."""
        kw = dict(eps=self.eps, norm_weight_offset=self.offset)
        if not self.dense:
            kw["routed_scaling_factor"] = self.rsf
        if self.outputs is not None:
            kw["outputs"] = self.outputs
        return kw


def _normal(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)).astype(dtype)


def random_indices(rng, M, K, P, oob: bool = False, p_skip: float = 0.25):
    """[M, K] int32 in [-1, P): about p_skip are -1; with oob also values >= P, < -1 and
    the extremes of int32."""
    if P > 0:
        idx = rng.integers(0, P, size=(M, K), dtype=np.int64)
    else:
        idx = np.full((M, K), -1, np.int64)
    idx[rng.random((M, K)) < p_skip] = -1
    if oob and M * K:
        pool = np.array([P, P + 1, P + 1000, *HUGE_INDICES], dtype=np.int64)
        mask = rng.random((M, K)) < 0.2
        mask.flat[rng.integers(0, M * K)] = True
        idx[mask] = rng.choice(pool, size=int(mask.sum()))
    return idx.astype(np.int32)


def subnormal(dtype) -> float:
    """A (positive) subnormal value of `dtype`."""
    return {BF16: 2.0 ** -130, F16: 2.0 ** -20, F32: 2.0 ** -140}[np.dtype(dtype)]


def special_values(dtype, subnormals: bool = True) -> list:
    """NaN, ±Inf, -0.0 and (when subnormals) negative/positive subnormals of `dtype`."""
    vals = [np.nan, np.inf, -np.inf, -0.0]
    if subnormals:
        sub = subnormal(dtype)
        vals += [-sub, sub, -3 * sub]
    return vals


def inject(rng, a, values, count):
    """Puts `count` of `values` at random places of a (in place); returns a."""
    if a.size == 0 or count == 0:
        return a
    flat = a.reshape(-1)
    pos = rng.choice(a.size, size=min(count, a.size), replace=False)
    flat[pos] = np.array([values[i % len(values)] for i in range(len(pos))],
                         dtype=np.float64).astype(a.dtype)
    return a


def gen_case(rng, mesh_case=None, *, N=None, n_groups=None, dtype=BF16, M=8, H=64, K=4, P=None,
             dense=False, scales=None, shared=False, rsf=1.0, eps=1e-6, offset=0.0,
             nw_dtype="T", quant: Q | None = None, outputs=None, oob=False,
             specials: int = 0, subnormals: bool = True, zero_rows: bool = False) -> Case:
    """A random case of realistic (normal) data.

    mesh_case sets N (ranks per group) and n_groups unless given. scales: None, "f32" or
    "T" (router weights' dtype). nw_dtype: "T" or "f32". specials: how many NaN/Inf/-0.0/
    subnormal values to plant in each input tensor. zero_rows: some tokens of every rank
    and of the residual are all -0.0 / negative subnormals (exercises the exchange)."""
    dtype = np.dtype(dtype)
    if mesh_case is not None:
        N = mesh_case.group if N is None else N
        n_groups = mesh_case.size // mesh_case.group if n_groups is None else n_groups
    N = 1 if N is None else N
    n_groups = 1 if n_groups is None else n_groups
    if P is None:
        P = max(1, (M * K) // max(N, 1) // 2 + 3)
    if dense:
        scales, shared = None, False
    sv = special_values(dtype, subnormals)
    tiny = -subnormal(dtype) if subnormals else -0.0
    groups = []
    for _ in range(n_groups):
        ranks = []
        for _ in range(N):
            d = {}
            if dense:
                d["x"] = _normal(rng, (M, H), dtype, 0.5)
                inject(rng, d["x"], sv, specials)
            else:
                d["expert_out"] = _normal(rng, (P, H), dtype, 0.5)
                inject(rng, d["expert_out"], sv, specials)
                d["permuted_idx"] = random_indices(rng, M, K, P, oob=oob)
                if scales is not None:
                    w = rng.random((M, K), dtype=np.float32) * np.float32(0.9) + np.float32(0.05)
                    d["expert_scales"] = w.astype(F32 if scales == "f32" else dtype)
                    inject(rng, d["expert_scales"], sv, specials // 2)
                if shared:
                    d["shared_expert_out"] = _normal(rng, (M, H), dtype, 0.3)
                    inject(rng, d["shared_expert_out"], sv, specials)
            if zero_rows and M:
                rows = rng.choice(M, size=max(1, M // 3), replace=False)
                for key in ("x", "shared_expert_out"):
                    if key in d:
                        d[key][rows] = np.where(rng.random((len(rows), H)) < 0.5, -0.0,
                                                tiny).astype(dtype)
                if "permuted_idx" in d:
                    d["permuted_idx"][rows] = -1
            ranks.append(d)
        res = _normal(rng, (M, H), dtype, 1.0)
        inject(rng, res, sv, specials)
        if zero_rows and M:
            rows = rng.choice(M, size=max(1, M // 3), replace=False)
            res[rows] = np.where(rng.random((len(rows), H)) < 0.5, -0.0, tiny).astype(dtype)
        groups.append({"ranks": ranks, "residual": res})
    nwt = F32 if nw_dtype == "f32" else dtype
    if offset:
        nw = _normal(rng, (H,), nwt, 0.1)
    else:
        nw = np.float32(1.0) + rng.standard_normal(H, dtype=np.float32) * np.float32(0.1)
        nw = nw.astype(nwt)
    return Case(dense=dense, dtype=dtype, N=N, M=M, H=H, K=K, P=P, groups=groups,
                norm_weight=nw, has_scales=scales is not None, has_shared=shared, rsf=rsf,
                eps=eps, offset=offset, quant=quant, outputs=outputs)


# -------------------------------------------------------------------------- oracle

def oracle_outputs(case: Case, g: int = 0) -> dict:
    """The oracle's residual, norm (and quant, scale) for group g."""
    grp = case.groups[g]
    quant = None if case.quant is None else (case.quant.kind, case.quant.oracle_params())
    if case.dense:
        return oracle.allreduce_rmsnorm([d["x"] for d in grp["ranks"]], grp["residual"],
                                        case.norm_weight, eps=case.eps,
                                        norm_weight_offset=case.offset, quant=quant)
    return oracle.moe_finalize_allreduce(grp["ranks"], grp["residual"], case.norm_weight,
                                         eps=case.eps, norm_weight_offset=case.offset,
                                         routed_scaling_factor=case.rsf, quant=quant)


# -------------------------------------------------------------------------- runner

def _axes(mesh_case) -> tuple[str, ...]:
    a = mesh_case.axis
    return a if isinstance(a, tuple) else (a,)


def device_layout(mesh_case):
    """For each device in row-major mesh order (the order of P(all names) stacking):
    (group index, rank index)."""
    axes = _axes(mesh_case)
    names = mesh_case.names
    others = [n for n in names if n not in axes]
    out = []
    for flat in range(mesh_case.size):
        idx = dict(zip(names, np.unravel_index(flat, mesh_case.shape)))
        g = int(np.ravel_multi_index([idx[n] for n in others],
                                     [mesh_case.shape[names.index(n)] for n in others])) \
            if others else 0
        r = int(np.ravel_multi_index([idx[n] for n in axes],
                                     [mesh_case.shape[names.index(n)] for n in axes]))
        out.append((g, r))
    return out


def _spec(names):
    from jax.sharding import PartitionSpec as PS
    names = tuple(names)
    if not names:
        return PS()
    return PS(names[0] if len(names) == 1 else names)


def _stack(case, mesh_case, key):
    return np.concatenate([case.groups[g]["ranks"][r][key] for g, r in device_layout(mesh_case)],
                          axis=0)


def build(case: Case, mesh_case, mesh, *, algorithm="auto", per_rank=False,
          scale_operand=False, check_vma=True, fn=None):
    """(jitted shard_map program, its numpy arguments).

    Per-rank operands are stacked in device order and sharded P(all mesh axes); the
    residual is stacked per group, P(non-reduction axes) (P() with one group); the norm
    weight is P(). per_rank=True returns every device's outputs with a leading axis
    (out_specs P(all mesh axes)); otherwise outputs are invariant along the reduction
    axes: out_specs P(non-reduction axes). scale_operand=True feeds the FP8 static /
    NVFP4 global scale as a traced P() operand rather than a constant."""
    import jax
    import jax_moe_ar as mar
    from jax_moe_ar.testing import sharded

    assert mesh_case.group == case.N, (mesh_case.id, case.N)
    assert mesh_case.size // mesh_case.group == len(case.groups)
    axes = _axes(mesh_case)
    others = tuple(n for n in mesh_case.names if n not in axes)
    dev_spec, grp_spec = _spec(mesh_case.names), _spec(others)
    from jax.sharding import PartitionSpec as PS

    keys = ["x"] if case.dense else ["expert_out", "permuted_idx"]
    if case.has_scales:
        keys.append("expert_scales")
    if case.has_shared:
        keys.append("shared_expert_out")
    args = [_stack(case, mesh_case, k) for k in keys]
    args.append(np.concatenate([g["residual"] for g in case.groups], axis=0))
    args.append(case.norm_weight)
    in_specs = [dev_spec] * len(keys) + [grp_spec, PS()]
    use_scale_arg = scale_operand and case.quant is not None and case.quant.takes_scale
    if use_scale_arg:
        args.append(np.float32(case.quant.scale_value))
        in_specs.append(PS())
    axis_name = mesh_case.axis
    quant, kw = case.quant, case.kwargs()

    def body(*a):
        a = list(a)
        scale = a.pop() if use_scale_arg else None
        spec = None if quant is None else quant.spec(scale)
        named = dict(zip(keys + ["residual", "norm_weight"], a))
        if fn is not None:
            out = fn(named, spec)
        elif case.dense:
            out = mar.allreduce_rmsnorm(named["x"], named["residual"], named["norm_weight"],
                                        axis_name=axis_name, quant=spec, algorithm=algorithm,
                                        **kw)
        else:
            out = mar.moe_finalize_allreduce(
                named["expert_out"], named["permuted_idx"], named["residual"],
                named["norm_weight"], axis_name=axis_name,
                expert_scales=named.get("expert_scales"),
                shared_expert_out=named.get("shared_expert_out"), quant=spec,
                algorithm=algorithm, **kw)
        if per_rank:
            out = jax.tree.map(lambda x: x[None], out)
        return out

    out_spec = dev_spec if per_rank else grp_spec
    return sharded(body, mesh, tuple(in_specs), out_spec, check_vma=check_vma), args


def _to_dict(out) -> dict:
    fields = ("residual", "norm", "quant", "scale")
    return {f: (None if getattr(out, f) is None else np.asarray(getattr(out, f)))
            for f in fields}


def run_case(case: Case, mesh_case, *, platform="cpu", algorithm="auto", per_rank=False,
             scale_operand=False, check_vma=True, mesh=None):
    """Runs the op; returns a list over groups of output dicts (residual, norm, quant,
    scale: numpy or None) — or, with per_rank=True, a list over groups of lists over
    ranks of such dicts (each device's own copy)."""
    from jax_moe_ar.testing import make_mesh
    mesh = make_mesh(platform, mesh_case) if mesh is None else mesh
    f, args = build(case, mesh_case, mesh, algorithm=algorithm, per_rank=per_rank,
                    scale_operand=scale_operand, check_vma=check_vma)
    out = _to_dict(f(*args))
    n_groups = len(case.groups)
    if per_rank:
        res = [[None] * case.N for _ in range(n_groups)]
        for d, (g, r) in enumerate(device_layout(mesh_case)):
            res[g][r] = {k: (None if v is None else v[d]) for k, v in out.items()}
        return res
    return [{k: (None if v is None else np.split(v, n_groups, axis=0)[g])
             for k, v in out.items()} for g in range(n_groups)]


# ---------------------------------------------------------------------- comparisons

def bits(a):
    a = np.asarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[a.dtype.itemsize])


def isnan(a):
    a = np.asarray(a)
    if a.dtype == np.uint8:
        return np.zeros(a.shape, bool)
    return np.isnan(a.astype(np.float32))


def assert_same_bits(got, want, what, nan_equal=True, mask=None):
    """Bit-identical (NaN == NaN whatever the payload when nan_equal); `mask` marks
    positions not compared."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    diff = bits(got) != bits(want)
    if nan_equal:
        diff &= ~(isnan(got) & isnan(want))
    if mask is not None:
        diff &= ~mask
    if diff.any():
        where = np.argwhere(diff)
        first = tuple(int(i) for i in where[0])
        raise AssertionError(
            f"{what}: {int(diff.sum())}/{diff.size} elements differ; first at {first}: "
            f"got {got[first]!r} (bits {bits(got)[first]:#x}), want {want[first]!r} "
            f"(bits {bits(want)[first]:#x})")


def _ordered(a):
    """Sign-magnitude bits -> integers ordered like the values (±0 -> 0)."""
    b = bits(a).astype(np.int64)
    nbits = np.asarray(a).dtype.itemsize * 8
    sign = np.int64(1) << (nbits - 1)
    mag = b & (sign - 1)
    return np.where(b & sign, -mag, mag)


def ulp_distance(got, want):
    return np.abs(_ordered(got) - _ordered(want))


def assert_norm_agrees(got, want, what="norm"):
    """SPEC §3: within 1 ulp of T and >= 99.9 % bit-identical (NaN == NaN)."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    if got.size == 0:
        return
    gn, wn = isnan(got), isnan(want)
    assert np.array_equal(gn, wn), \
        f"{what}: NaN at different places ({int((gn != wn).sum())} elements)"
    ok = ~gn
    d = ulp_distance(got, want)
    bad = ok & (d > 1)
    if bad.any():
        i = tuple(int(x) for x in np.argwhere(bad)[0])
        raise AssertionError(f"{what}: {int(bad.sum())} elements beyond 1 ulp; first at {i}: "
                             f"got {got[i]!r}, want {want[i]!r} ({int(d[i])} ulp)")
    same = (bits(got) == bits(want)) | (gn & wn)
    frac = float(same.mean())
    assert frac >= 0.999, f"{what}: only {100 * frac:.3f}% bit-identical (SPEC §3: >= 99.9%)"


def nvfp4_unspecified_mask(q_in, M, H):
    """[M, H/2] bool: code bytes of 16-blocks whose q_in holds NaN or Inf."""
    q = np.asarray(q_in).astype(np.float32).reshape(M, H // 16, 16)
    bad_block = ~np.isfinite(q).all(axis=2)                    # [M, H/16]
    return np.repeat(bad_block, 8, axis=1)                     # 8 bytes per block


def check_against_oracle(out: dict, case: Case, g: int = 0, ref: dict | None = None) -> dict:
    """Checks one group's outputs against SPEC §3's agreement table; returns the oracle's.

    residual: bit-identical (NaN == NaN); norm: <= 1 ulp, >= 99.9 % identical; quant codes and
    scales: bit-identical to oracle.quantize applied to the op's own norm_out (the oracle's
    norm when the op was not asked for norm), NVFP4 codes of blocks holding NaN/Inf masked;
    outputs not asked for: None."""
    ref = oracle_outputs(case, g) if ref is None else ref
    asked = case.resolved_outputs
    M, H, T = case.M, case.H, case.dtype
    for name in ("residual", "norm"):
        if name not in asked:
            assert out[name] is None, f"{name} was not asked for but returned"
            continue
        assert out[name] is not None, f"{name} was asked for but is None"
        assert out[name].dtype == T and out[name].shape == (M, H), \
            f"{name}: {out[name].dtype}{out[name].shape} != {T}{(M, H)}"
    if "residual" in asked:
        assert_same_bits(out["residual"], ref["residual"], "residual")
    if "norm" in asked:
        assert_norm_agrees(out["norm"], ref["norm"])
    if "quant" not in asked:
        assert out["quant"] is None and out["scale"] is None, "quant not asked for but returned"
        return ref
    q = case.quant
    (cs, cd), sc = q.output_shapes(M, H)
    assert out["quant"] is not None, "quant asked for but None"
    assert out["quant"].dtype == cd and out["quant"].shape == cs, \
        f"quant: {out['quant'].dtype}{out['quant'].shape} != {cd}{cs}"
    if sc is None:
        assert out["scale"] is None, f"{q.kind} has no scale output, got one"
    else:
        assert out["scale"] is not None, "scale output missing"
        assert out["scale"].dtype == sc[1] and out["scale"].shape == sc[0], \
            f"scale: {out['scale'].dtype}{out['scale'].shape} != {sc[1]}{sc[0]}"
    norm_src = out["norm"] if out["norm"] is not None else ref["norm"]
    codes, scale = oracle.quantize(norm_src, q.kind, **q.oracle_params())
    mask = nvfp4_unspecified_mask(norm_src, M, H) if q.kind == "nvfp4" else None
    assert_same_bits(out["quant"], codes, f"quant codes ({q.id})", mask=mask)
    if scale is not None:
        assert_same_bits(out["scale"], scale, f"quant scale ({q.id})")
    return ref


def check_every_rank(case: Case, mesh_case, *, platform="cpu", algorithm="auto", **kw):
    """Runs a one-group case returning each device's copy: all ranks bit-identical, and
    exact against the oracle."""
    per_rank = run_case(case, mesh_case, platform=platform, algorithm=algorithm,
                        per_rank=True, **kw)[0]
    assert_ranks_identical(per_rank)
    check_against_oracle(per_rank[0], case)


def assert_ranks_identical(per_rank: list, what="outputs"):
    """Every rank's outputs are bit-identical to rank 0's (NaN payloads included)."""
    first = per_rank[0]
    for r, o in enumerate(per_rank[1:], start=1):
        for k, v in o.items():
            if v is None or first[k] is None:
                assert v is None and first[k] is None, f"{what}: rank {r} {k} presence differs"
                continue
            assert_same_bits(v, first[k], f"{what}: rank {r} vs rank 0, {k}", nan_equal=False)


__all__ = [
    "Q", "Case", "ALL_QUANTS", "DTYPES", "BF16", "F16", "F32", "E4M3", "H_REAL", "gen_case",
    "oracle_outputs", "build", "run_case", "check_against_oracle", "check_every_rank",
    "assert_same_bits", "assert_norm_agrees", "assert_ranks_identical", "ulp_distance",
    "seed_for", "dtype_id", "mesh_id", "require_gpus", "default_outputs", "random_indices",
    "special_values", "subnormal", "inject", "device_layout",
    "ALGORITHMS", "GPU_MESHES", "SMALL_GPU_MESHES", "EXTRA_MESHES",
]
