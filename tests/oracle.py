"""NumPy oracle written from docs/spec.md §3 (SPEC); imports nothing from jax_moe_ar.

Every step is IEEE float32 with each product and sum rounded separately, in
the order SPEC §3 states.  Vectorised over tokens (M) and columns (H); the
loops over k (top-k slots) and over ranks are explicit and left to right.

Conventions the SPEC leaves to the oracle (see the docstrings below):
  * sum of squares for RMSNorm: squares rounded to float32, summed in float64,
    rounded once to float32 (the op may use another order: 1 ulp on norm_out).
  * cross-rank sum starts from f32(wire_0), not from 0.0 (matters for -0.0).
  * default layouts follow SPEC §2/§3 constructors: Fp8PerGroup(group_size=128,
    ue8m0=False, scale_layout="row"), NvFp4(layout="swizzled_128x4").
"""

import ml_dtypes
import numpy as np

F32 = np.float32
E4M3 = ml_dtypes.float8_e4m3fn
E2M1 = ml_dtypes.float4_e2m1fn
BF16 = ml_dtypes.bfloat16

WIRE_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), np.dtype(BF16))
QUANT_KINDS = ("fp8_static", "fp8_per_token", "fp8_per_group", "nvfp4")

E4M3_MAX = F32(448.0)
E2M1_MAX = F32(6.0)
NVFP4_BLOCK = 16
AMAX_FLOOR = F32(1e-10)

# float4_e2m1fn value of each 4-bit code (bit 3 = sign).
E2M1_TABLE = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
     -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32)


# ----------------------------------------------------------------- helpers

def _f32(x):
    """Widen exactly to float32 (values of T or float32)."""
    return np.asarray(x).astype(np.float32)


def _static(x):
    """Round a static python float to float32."""
    return F32(x)


def _scalar_f32(x, name):
    a = np.asarray(x)
    if a.size != 1:
        raise ValueError(f"{name} must be a float32 scalar, got shape {a.shape}")
    return F32(a.reshape(()).astype(np.float32))


def _wire_dtype(a, name):
    dt = np.asarray(a).dtype
    if dt not in WIRE_DTYPES:
        raise TypeError(f"{name} dtype {dt} not in (float32, float16, bfloat16)")
    return dt


def _sat(x, limit):
    """Clamp to [-limit, limit]; NaN propagates (np.clip uses min/max)."""
    return np.clip(x, -limit, limit)


def _e4m3(x):
    return np.asarray(x, dtype=np.float32).astype(E4M3)


def _roundup(x, m):
    return -(-x // m) * m


# ---------------------------------------------------------------- finalize

def finalize_wire(expert_out, permuted_idx, expert_scales=None, shared_expert_out=None,
                  routed_scaling_factor=1.0):
    """SPEC §3 per-rank finalize. expert_out [P,H] of T (np.float32, np.float16 or ml_dtypes.bfloat16),
    permuted_idx [M,K] int32, expert_scales [M,K] float32 or T or None, shared_expert_out [M,H] T or None.
    Returns wire [M,H] of T.

    Indices outside [0, P) are skipped and their rows are never read.
    """
    expert_out = np.asarray(expert_out)
    T = _wire_dtype(expert_out, "expert_out")
    permuted_idx = np.asarray(permuted_idx)
    if expert_out.ndim != 2 or permuted_idx.ndim != 2:
        raise ValueError("expert_out must be [P,H] and permuted_idx [M,K]")
    P, H = expert_out.shape
    M, K = permuted_idx.shape
    idx = permuted_idx.astype(np.int64)
    scales = None if expert_scales is None else _f32(expert_scales)
    if scales is not None and scales.shape != (M, K):
        raise ValueError(f"expert_scales shape {scales.shape} != {(M, K)}")
    rsf = _static(routed_scaling_factor)

    with np.errstate(all="ignore"):
        acc = np.zeros((M, H), dtype=np.float32)
        for k in range(K):
            p = idx[:, k]
            valid = (p >= 0) & (p < P)
            rows = np.zeros((M, H), dtype=np.float32)
            if valid.any():
                rows[valid] = _f32(expert_out[p[valid]])      # only valid rows are read
            if scales is None:
                w = np.ones((M, 1), dtype=np.float32)
            else:
                w = scales[:, k:k + 1]
            term = w * rows                                    # rounded product
            acc = np.where(valid[:, None], acc + term, acc)    # rounded sum, or skipped
        acc = acc * rsf                                        # once, after the routed sum
        if shared_expert_out is not None:
            sh = np.asarray(shared_expert_out)
            if sh.shape != (M, H):
                raise ValueError(f"shared_expert_out shape {sh.shape} != {(M, H)}")
            acc = acc + _f32(sh)                               # not scaled
        return acc.astype(T)


# ------------------------------------------------------------ reduce + norm

def _rms_inv(r32, eps):
    """inv = 1 / sqrt(sum_h r^2 / H + eps), float32; sum of f32 squares in f64, rounded once."""
    H = r32.shape[1]
    sq = r32 * r32                                             # float32 products
    sumsq = np.sum(sq.astype(np.float64), axis=1).astype(np.float32)
    mean = sumsq / F32(H)
    return (F32(1.0) / np.sqrt(mean + eps)).astype(np.float32)[:, None]


def reduce_norm(wires, residual, norm_weight, eps=1e-6, norm_weight_offset=0.0):
    """wires: list (rank order) of [M,H] T arrays. Returns (residual_out [M,H] T, norm_out [M,H] T)."""
    wires = [np.asarray(w) for w in wires]
    if not wires:
        raise ValueError("need at least one rank")
    T = _wire_dtype(wires[0], "wires[0]")
    residual = np.asarray(residual)
    for r, w in enumerate(wires):
        if w.dtype != T or w.shape != wires[0].shape:
            raise ValueError(f"wire {r}: {w.dtype}{w.shape} != {T}{wires[0].shape}")
    if residual.dtype != T or residual.shape != wires[0].shape:
        raise ValueError(f"residual {residual.dtype}{residual.shape} != {T}{wires[0].shape}")
    H = wires[0].shape[1]
    nw = np.asarray(norm_weight)
    if nw.shape != (H,):
        raise ValueError(f"norm_weight shape {nw.shape} != {(H,)}")
    eps32 = _static(eps)
    off32 = _static(norm_weight_offset)

    with np.errstate(all="ignore"):
        y = _f32(wires[0]).copy()                              # starts from wire_0, not 0.0
        for w in wires[1:]:
            y = y + _f32(w)
        residual_out = (y + _f32(residual)).astype(T)
        r32 = _f32(residual_out)
        inv = _rms_inv(r32, eps32)
        gamma = off32 + _f32(nw)                               # float32 add
        norm_out = ((r32 * inv) * gamma[None, :]).astype(T)
    return residual_out, norm_out


# ---------------------------------------------------------------- quantize

def _ue8m0(s):
    """s -> 2^ceil(log2 s) exactly, for positive finite s; NaN/Inf pass through."""
    s = np.asarray(s, dtype=np.float32)
    mant, ex = np.frexp(s)                                     # s = mant * 2^ex, mant in [0.5, 1)
    ex = np.where(mant == F32(0.5), ex - 1, ex)                # exact power of two stays
    p2 = np.ldexp(np.ones_like(s), ex).astype(np.float32)
    return np.where(np.isfinite(s) & (s > 0), p2, s).astype(np.float32)


def _fp8_codes(q, inv):
    return _e4m3(_sat(q * inv, E4M3_MAX))


def _quant_fp8_static(q, scale):
    s = _scalar_f32(scale, "scale")
    inv = F32(1.0) / s
    return _fp8_codes(q, inv), None


def _quant_fp8_per_token(q):
    amax = np.max(np.abs(q), axis=1, keepdims=True)           # [M,1], NaN-propagating
    s = (np.maximum(amax, AMAX_FLOOR) / E4M3_MAX).astype(np.float32)   # [M,1]
    inv = F32(1.0) / s
    return _fp8_codes(q, inv), s


def _quant_fp8_per_group(q, group_size=128, ue8m0=False, scale_layout="row"):
    M, H = q.shape
    gs = int(group_size)
    if gs <= 0 or H % gs:
        raise ValueError(f"group_size {gs} must divide H={H}")
    if scale_layout not in ("row", "col"):
        raise ValueError(f"scale_layout must be 'row' or 'col', got {scale_layout!r}")
    G = H // gs
    qg = q.reshape(M, G, gs)
    amax = np.max(np.abs(qg), axis=2)                          # [M,G]
    s = (np.maximum(amax, AMAX_FLOOR) / E4M3_MAX).astype(np.float32)
    if ue8m0:
        s = _ue8m0(s)
    inv = F32(1.0) / s
    codes = _fp8_codes(qg, inv[:, :, None]).reshape(M, H)
    if scale_layout == "col":
        s = np.ascontiguousarray(s.T)
    return codes, s


def swizzled_offset(m, b, H):
    """SPEC §3's 128x4 byte offset of (row m, block b) for hidden size H (works on ints or arrays)."""
    Kt = -(-int(H) // 64)
    return ((m // 128) * Kt * 512 + (b // 4) * 512 + (m % 32) * 16
            + ((m % 128) // 32) * 4 + (b % 4))


def _swizzle(sf, H):
    """Linear sf [M, H/16] e4m3 -> swizzled [roundup(M,128), roundup(H/16,4)] e4m3, padding 0."""
    M, nb = sf.shape
    Mp, nbp = _roundup(M, 128), _roundup(nb, 4)
    flat = np.zeros(Mp * nbp, dtype=np.uint8)
    if M and nb:
        mm, bb = np.meshgrid(np.arange(M, dtype=np.int64), np.arange(nb, dtype=np.int64),
                             indexing="ij")
        flat[swizzled_offset(mm, bb, H)] = sf.view(np.uint8)
    return flat.reshape(Mp, nbp).view(E4M3)


def _unswizzle(sfs, M, H):
    nb = H // NVFP4_BLOCK
    flat = np.ascontiguousarray(sfs).view(np.uint8).reshape(-1)
    if not (M and nb):
        return np.zeros((M, nb), dtype=E4M3)
    mm, bb = np.meshgrid(np.arange(M, dtype=np.int64), np.arange(nb, dtype=np.int64),
                         indexing="ij")
    return flat[swizzled_offset(mm, bb, H)].view(E4M3)


def _e2m1_codes(x):
    """4-bit e2m1 codes (round to nearest even) of float32 x already within [-6, 6]."""
    return np.asarray(x, dtype=np.float32).astype(E2M1).view(np.uint8) & np.uint8(0xF)


def _quant_nvfp4(q, global_scale, layout="swizzled_128x4"):
    M, H = q.shape
    if H % NVFP4_BLOCK:
        raise ValueError(f"H={H} must be a multiple of {NVFP4_BLOCK}")
    if layout not in ("linear", "swizzled_128x4"):
        raise ValueError(f"layout must be 'linear' or 'swizzled_128x4', got {layout!r}")
    g = _scalar_f32(global_scale, "global_scale")
    nb = H // NVFP4_BLOCK
    qb = q.reshape(M, nb, NVFP4_BLOCK)
    vmax = np.max(np.abs(qb), axis=2)                          # [M,nb], NaN-propagating
    sf = _e4m3(_sat(g * (vmax / E2M1_MAX), E4M3_MAX))          # vmax/6 then *g, float32
    sf32 = _f32(sf)
    os_ = np.where(sf32 == 0, F32(0.0), g / np.where(sf32 == 0, F32(1.0), sf32)).astype(np.float32)
    codes = _e2m1_codes(_sat(qb * os_[:, :, None], E2M1_MAX)).reshape(M, H)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << np.uint8(4))).astype(np.uint8)
    if layout == "swizzled_128x4":
        sf = _swizzle(sf, H)
    return packed, sf


def quantize(norm_out, kind, **params):
    """kind in {"fp8_static", "fp8_per_token", "fp8_per_group", "nvfp4"}.
    fp8_static: params scale (float32 scalar, the dequant scale s)      -> (codes [M,H] float8_e4m3fn, None)
    fp8_per_token: no params                                            -> (codes [M,H] e4m3fn, scale [M,1] float32)
    fp8_per_group: group_size=128, ue8m0=False, scale_layout="row"|"col" -> (codes [M,H] e4m3fn, scale [M,H/gs] or [H/gs,M] float32)
    nvfp4: global_scale (float32 scalar), layout="linear"|"swizzled_128x4"
         -> (codes [M,H/2] uint8, sf float8_e4m3fn [M,H/16] (linear) or [roundup(M,128), roundup(H/16,4)] (swizzled, padding 0))

    Input is q_in = f32(norm_out).  Default nvfp4 layout is "swizzled_128x4" (SPEC §3's NvFp4 default).
    """
    q = _f32(norm_out)
    if q.ndim != 2:
        raise ValueError(f"norm_out must be [M,H], got shape {q.shape}")
    with np.errstate(all="ignore"):
        if kind == "fp8_static":
            return _quant_fp8_static(q, **params)
        if kind == "fp8_per_token":
            return _quant_fp8_per_token(q, **params)
        if kind == "fp8_per_group":
            return _quant_fp8_per_group(q, **params)
        if kind == "nvfp4":
            return _quant_nvfp4(q, **params)
    raise ValueError(f"unknown quant kind {kind!r}; expected one of {QUANT_KINDS}")


def dequantize(codes, scale, kind, /, **params):
    """Back to float32 [M,H]; inverse of each format.

    Positional-only (codes, scale, kind) so that quantize's params can be splatted back in:
    dequantize(codes, scale_out, kind, **params) works for every kind.
    fp8_static: scale output is None; the dequant scale s is params["scale"] (or the scale arg).
    fp8_per_token: f32(code) * s_m.  fp8_per_group: group_size, scale_layout as for quantize.
    nvfp4: params global_scale, layout; value = (e2m1(code) * f32(sf)) / global_scale.
    """
    with np.errstate(all="ignore"):
        if kind == "fp8_static":
            s = _scalar_f32(params["scale"] if "scale" in params else scale, "scale")
            return _f32(codes) * s
        if kind == "fp8_per_token":
            return _f32(codes) * _f32(scale).reshape(-1, 1)
        if kind == "fp8_per_group":
            gs = int(params.get("group_size", 128))
            layout = params.get("scale_layout", "row")
            c = _f32(codes)
            M, H = c.shape
            s = _f32(scale)
            if layout == "col":
                s = s.T
            return (c.reshape(M, H // gs, gs) * s[:, :, None]).reshape(M, H)
        if kind == "nvfp4":
            g = _scalar_f32(params["global_scale"], "global_scale")
            layout = params.get("layout", "swizzled_128x4")
            c = np.asarray(codes, dtype=np.uint8)
            M, H = c.shape[0], 2 * c.shape[1]
            nib = np.empty((M, H), dtype=np.uint8)
            nib[:, 0::2] = c & 0xF
            nib[:, 1::2] = c >> 4
            vals = E2M1_TABLE[nib]
            sf = np.asarray(scale)
            if layout == "swizzled_128x4":
                sf = _unswizzle(sf, M, H)
            sf32 = _f32(sf.view(E4M3) if sf.dtype == np.uint8 else sf)
            sf_full = np.repeat(sf32, NVFP4_BLOCK, axis=1)
            return (vals * sf_full) / g
    raise ValueError(f"unknown quant kind {kind!r}; expected one of {QUANT_KINDS}")


# ------------------------------------------------------------ full pipeline

def _pipeline(wires, residual, norm_weight, eps, norm_weight_offset, quant):
    residual_out, norm_out = reduce_norm(wires, residual, norm_weight, eps=eps,
                                         norm_weight_offset=norm_weight_offset)
    qout = scale = None
    if quant is not None:
        kind, params = quant
        qout, scale = quantize(norm_out, kind, **(params or {}))
    return {"residual": residual_out, "norm": norm_out, "quant": qout, "scale": scale}


def moe_finalize_allreduce(per_rank, residual, norm_weight, *, eps=1e-6, norm_weight_offset=0.0,
                           routed_scaling_factor=1.0, quant=None):
    """per_rank: list of dicts with keys expert_out, permuted_idx, expert_scales (opt), shared_expert_out (opt).
    quant: None or (kind, params dict). Returns dict residual, norm, quant, scale (quant/scale None when quant None)."""
    wires = [finalize_wire(d["expert_out"], d["permuted_idx"],
                           expert_scales=d.get("expert_scales"),
                           shared_expert_out=d.get("shared_expert_out"),
                           routed_scaling_factor=routed_scaling_factor)
             for d in per_rank]
    return _pipeline(wires, residual, norm_weight, eps, norm_weight_offset, quant)


def allreduce_rmsnorm(xs, residual, norm_weight, *, eps=1e-6, norm_weight_offset=0.0, quant=None):
    """dense variant: wire_r = x_r itself."""
    wires = [np.asarray(x) for x in xs]
    return _pipeline(wires, residual, norm_weight, eps, norm_weight_offset, quant)


# ------------------------------------------------- reduce-scatter variants (SPEC §2.1)

def _owned_rows(wires, r):
    """Rank r's block of every rank's wire: rows [r*M/N, (r+1)*M/N), in rank order."""
    N, M = len(wires), np.asarray(wires[0]).shape[0]
    if M % N:
        raise ValueError(f"M={M} tokens is not a multiple of the group size N={N}")
    b = M // N
    return [np.asarray(w)[r * b:(r + 1) * b] for w in wires]


def _scatter_pipeline(wires, residuals, norm_weight, eps, norm_weight_offset, quant):
    if len(residuals) != len(wires):
        raise ValueError(f"{len(residuals)} residual blocks for {len(wires)} ranks")
    return [_pipeline(_owned_rows(wires, r), residuals[r], norm_weight, eps, norm_weight_offset,
                      quant) for r in range(len(wires))]


def moe_finalize_reduce_scatter(per_rank, residuals, norm_weight, *, eps=1e-6,
                                norm_weight_offset=0.0, routed_scaling_factor=1.0, quant=None):
    """per_rank as for moe_finalize_allreduce (every rank's operands cover all M tokens);
    residuals: list (rank order) of each rank's own [M/N, H] block of the residual stream.
    Returns a list (rank order) of dicts residual, norm, quant, scale for that rank's M/N
    tokens (NVFP4 swizzled scales padded per rank: [roundup(M/N,128), roundup(H/16,4)])."""
    wires = [finalize_wire(d["expert_out"], d["permuted_idx"],
                           expert_scales=d.get("expert_scales"),
                           shared_expert_out=d.get("shared_expert_out"),
                           routed_scaling_factor=routed_scaling_factor)
             for d in per_rank]
    return _scatter_pipeline(wires, residuals, norm_weight, eps, norm_weight_offset, quant)


def reduce_scatter_rmsnorm(xs, residuals, norm_weight, *, eps=1e-6, norm_weight_offset=0.0,
                           quant=None):
    """dense variant of moe_finalize_reduce_scatter: wire_r = x_r itself."""
    wires = [np.asarray(x) for x in xs]
    return _scatter_pipeline(wires, residuals, norm_weight, eps, norm_weight_offset, quant)


__all__ = [
    "finalize_wire", "reduce_norm", "quantize", "dequantize", "swizzled_offset",
    "moe_finalize_allreduce", "allreduce_rmsnorm", "moe_finalize_reduce_scatter",
    "reduce_scatter_rmsnorm", "E2M1_TABLE", "QUANT_KINDS",
]
