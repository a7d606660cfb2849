"""Tests of the NumPy oracle itself against hand-checkable facts from docs/spec.md §3."""

import ml_dtypes
import numpy as np
import pytest

import oracle

F32 = np.float32
BF16 = ml_dtypes.bfloat16
E4M3 = ml_dtypes.float8_e4m3fn
NAN = np.float32("nan")


def f32(x):
    return np.asarray(x, dtype=np.float32)


def bits(a):
    a = np.asarray(a)
    return a.view({1: np.uint8, 2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


def same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(bits(a), bits(b))


def nvfp4_codes_unit(values):
    """NVFP4 codes of `values` with os == 1: one block holding a 6 (vmax 6), g = 1 -> sf = 1."""
    vals = list(values)
    out = []
    for i in range(0, len(vals), 15):
        chunk = vals[i:i + 15]
        blk = np.full(16, 0.0, np.float32)
        blk[0] = 6.0
        blk[1:1 + len(chunk)] = chunk
        codes, sf = oracle.quantize(blk[None, :], "nvfp4", global_scale=F32(1), layout="linear")
        assert _f(sf) == [1.0]
        nib = np.empty(16, np.uint8)
        nib[0::2] = codes[0] & 0xF
        nib[1::2] = codes[0] >> 4
        assert nib[0] == 7
        out += list(nib[1:1 + len(chunk)])
    return out


def _f(a):
    return f32(a).ravel().tolist()


# ------------------------------------------------------------ format tables

E2M1_TIES = [  # (input, code): ties go to the even code
    (0.25, 0), (0.75, 2), (1.25, 2), (1.75, 4), (2.5, 4), (3.5, 6), (5.0, 6),
    (-0.25, 8), (-0.75, 10), (-2.5, 12), (-5.0, 14), (-0.0, 8), (0.0, 0),
    (6.0, 7), (-6.0, 15),
    (0.2499, 0), (0.2501, 1), (2.4999, 4), (2.5001, 5), (4.99, 6), (5.01, 7),
]


def test_e2m1_table_values():
    assert oracle.E2M1_TABLE.tolist() == [0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6]
    assert np.signbit(oracle.E2M1_TABLE[8])
    # ml_dtypes float4 code sits in the low nibble
    assert np.arange(16, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn).astype(np.float32).tolist() \
        == oracle.E2M1_TABLE.tolist()


@pytest.mark.parametrize("x,code", E2M1_TIES)
def test_e2m1_rounding_through_nvfp4(x, code):
    assert nvfp4_codes_unit([x]) == [code]


def _e2m1_rne_reference(x):
    """Independent RNE onto the e2m1 grid: nearest value, ties to the even code."""
    x = float(x)
    mags = [0, .5, 1, 1.5, 2, 3, 4, 6]
    a = min(abs(x), 6.0)
    best = min(range(8), key=lambda i: (abs(mags[i] - a), i & 1))
    return best | (8 if np.signbit(x) else 0)


def test_e2m1_matches_independent_rne():
    rng = np.random.default_rng(0)
    xs = np.concatenate([rng.uniform(-6, 6, 300), np.arange(-24, 25) / 4.0]).astype(np.float32)
    got = nvfp4_codes_unit(xs)
    assert got == [_e2m1_rne_reference(x) for x in xs]


E4M3_CASES = [  # (input, expected float value of the e4m3 code, byte)
    (448.0, 448.0, 0x7E), (449.0, 448.0, 0x7E), (464.0, 448.0, 0x7E), (1e6, 448.0, 0x7E),
    (np.inf, 448.0, 0x7E), (-np.inf, -448.0, 0xFE), (-500.0, -448.0, 0xFE),
    (1.0625, 1.0, 0x38), (1.1875, 1.25, 0x3A),           # normal ties -> even mantissa
    (2.0 ** -9, 2.0 ** -9, 0x01),                         # smallest subnormal
    (2.0 ** -10, 0.0, 0x00),                              # tie 0 / 2^-9 -> 0
    (3 * 2.0 ** -10, 2.0 ** -8, 0x02),                    # tie 2^-9 / 2^-8 -> 2^-8 (even)
    (5 * 2.0 ** -10, 2.0 ** -8, 0x02),                    # tie 2^-8 / 3*2^-9 -> 2^-8 (even)
    (-0.0, -0.0, 0x80),
]


@pytest.mark.parametrize("x,val,byte", E4M3_CASES)
def test_e4m3_saturation_and_ties(x, val, byte):
    H = 16
    q = np.zeros((1, H), np.float32)
    q[0, 3] = x
    codes, scale = oracle.quantize(q, "fp8_static", scale=F32(1.0))
    assert scale is None and codes.dtype == E4M3 and codes.shape == (1, H)
    assert int(codes.view(np.uint8)[0, 3]) == byte
    got = codes.astype(np.float32)[0, 3]
    assert got == val and np.signbit(got) == np.signbit(val)


def _e4m3_grid():
    """Finite non-negative e4m3fn values by code, built from the format definition (bias 7)."""
    vals = []
    for code in range(0x7F):                              # 0x7F is NaN
        e, m = code >> 3, code & 7
        vals.append(m / 8 * 2.0 ** -6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7))
    return vals


def test_e4m3_matches_independent_rne():
    grid = _e4m3_grid()
    assert grid[-1] == 448.0 and grid[1] == 2.0 ** -9
    rng = np.random.default_rng(6)
    mids = [(a + b) / 2 for a, b in zip(grid, grid[1:])]  # every tie point
    xs = np.concatenate([mids, grid, rng.uniform(-460, 460, 400),
                         np.exp2(rng.uniform(-12, 9, 400)) * rng.choice([-1, 1], 400)])
    xs = xs.astype(np.float32)
    xs = xs[: xs.size // 16 * 16]
    codes, _ = oracle.quantize(xs.reshape(-1, 16), "fp8_static", scale=F32(1.0))
    got = codes.view(np.uint8).ravel()
    for x, c in zip(xs.tolist(), got.tolist()):
        a = min(abs(x), 448.0)
        best = min(range(0x7F), key=lambda i: (abs(grid[i] - a), i & 1))
        assert c == best | (0x80 if np.signbit(np.float32(x)) else 0), (x, hex(c))


def test_e4m3_nan_propagates():
    q = np.zeros((1, 16), np.float32)
    q[0, 0] = NAN
    codes, _ = oracle.quantize(q, "fp8_static", scale=F32(2.0))
    assert np.isnan(codes.astype(np.float32)[0, 0])
    assert np.all(codes.astype(np.float32)[0, 1:] == 0)


# ---------------------------------------------------------------- finalize

def test_finalize_skips_out_of_range_never_reads():
    H = 16
    P = 4
    buf = np.full((P + 4, H), NAN, np.float32)     # rows past P are NaN too
    buf[0] = 1.0
    buf[1] = 2.0                                    # rows 2 and 3 (the last ones) are NaN
    expert_out = buf[:P]
    idx = np.array([[0, -1, 1, 7, -3, 4],           # -1 / 7 / -3 / 4: all out of range
                    [-1, -1, -1, -2, 100, -100]], np.int32)
    scales = np.array([[0.5, NAN, 0.25, NAN, NAN, NAN],
                       [NAN] * 6], np.float32)
    # row 2/3 of expert_out are NaN but never referenced by a valid index
    wire = oracle.finalize_wire(expert_out, idx, expert_scales=scales)
    assert wire.dtype == np.float32
    assert _f(wire[0]) == [0.5 * 1 + 0.25 * 2] * H
    assert _f(wire[1]) == [0.0] * H and not np.signbit(wire[1]).any()   # acc starts at +0.0
    # clip-and-read would have read row 3 (NaN) for idx 7 / 4 / 100; wrap-around for -1 too
    sh = np.full((2, H), 3.0, np.float32)
    wire = oracle.finalize_wire(expert_out, idx, expert_scales=scales, shared_expert_out=sh,
                                routed_scaling_factor=2.0)
    assert _f(wire[0]) == [(0.5 + 0.5) * 2 + 3] * H
    assert _f(wire[1]) == [3.0] * H


def test_finalize_reads_valid_nan():
    expert_out = np.zeros((2, 16), np.float32)
    expert_out[1, 5] = NAN
    wire = oracle.finalize_wire(expert_out, np.array([[1, 0]], np.int32))
    assert np.isnan(wire[0, 5]) and np.all(wire[0, np.arange(16) != 5] == 0)


def test_routed_scaling_once_after_sum_not_on_shared():
    # f32: 1 + 2^-24 == 1 (tie to even), so (a+b)*3 == 3, whereas a*3 + b*3 == 3 + 2^-22
    a, b = 1.0, 2.0 ** -24
    expert_out = np.array([[a] * 16, [b] * 16], np.float32)
    idx = np.array([[0, 1]], np.int32)
    wire = oracle.finalize_wire(expert_out, idx, routed_scaling_factor=3.0)
    assert _f(wire) == [3.0] * 16
    assert F32(a) * F32(3) + F32(b) * F32(3) != F32(3)    # the other order would differ
    sh = np.full((1, 16), 1.0, np.float32)
    wire = oracle.finalize_wire(expert_out[:1], np.array([[0, -1]], np.int32),
                                shared_expert_out=sh, routed_scaling_factor=2.5)
    assert _f(wire) == [3.5] * 16                          # 1*2.5 + 1, not (1+1)*2.5


def test_routed_scaling_rounded_to_f32_first():
    x = F32(3.0)
    expert_out = np.full((1, 16), x, np.float32)
    wire = oracle.finalize_wire(expert_out, np.array([[0]], np.int32), routed_scaling_factor=0.1)
    assert _f(wire) == [float(x * F32(0.1))] * 16


def test_finalize_no_fma_and_rounds_to_T():
    # w*x rounded before the add: w = x = 1 + 2^-12 -> w*x = 1 + 2^-11 + 2^-24 -> f32 1 + 2^-11
    v = 1 + 2.0 ** -12
    expert_out = np.full((2, 16), v, np.float32)
    scales = np.array([[v, v]], np.float32)
    wire = oracle.finalize_wire(expert_out, np.array([[0, 1]], np.int32), expert_scales=scales)
    prod = F32(v) * F32(v)
    assert _f(wire) == [float(F32(0) + prod + prod)] * 16
    # bf16 wire (7 mantissa bits, ulp at 1 is 2^-7): rT is round-to-nearest-even
    eo = np.full((1, 16), 1.0, BF16)
    sh = np.full((1, 16), 2.0 ** -8, BF16)                # half an ulp of bf16 at 1 -> ties to 1.0
    wire = oracle.finalize_wire(eo, np.array([[0]], np.int32), shared_expert_out=sh)
    assert wire.dtype == BF16 and _f(wire) == [1.0] * 16
    sh = np.full((1, 16), 3 * 2.0 ** -8, BF16)            # 1 + 3*2^-8 -> tie -> 1 + 2^-6 (even)
    wire = oracle.finalize_wire(eo, np.array([[0]], np.int32), shared_expert_out=sh)
    assert _f(wire) == [1 + 2.0 ** -6] * 16


# ------------------------------------------------------- reduce and norm

def test_negative_zero_rank_sum_starts_from_wire0():
    H = 16
    negz = np.full((1, H), -0.0, np.float32)
    res, norm = oracle.reduce_norm([negz], negz, np.ones(H, np.float32))
    assert np.all(res == 0) and np.all(np.signbit(res))          # -0 + -0 = -0
    assert np.all(np.signbit(norm))
    res2 = oracle.allreduce_rmsnorm([negz, negz, negz], negz, np.ones(H, np.float32))["residual"]
    assert np.all(np.signbit(res2))
    # a +0 anywhere gives +0
    res3, _ = oracle.reduce_norm([negz, np.zeros_like(negz)], negz, np.ones(H, np.float32))
    assert not np.signbit(res3).any()
    # bf16 too
    nb = negz.astype(BF16)
    res4, _ = oracle.reduce_norm([nb, nb], nb, np.ones(H, BF16))
    assert res4.dtype == BF16 and np.all(np.signbit(res4.astype(np.float32)))


def test_rank_order_left_to_right():
    # (1 + 2^-24) + 2^-24 == 1 in f32, but 1 + (2^-24 + 2^-24) == 1 + 2^-23
    H = 16
    w = [np.full((1, H), v, np.float32) for v in (1.0, 2.0 ** -24, 2.0 ** -24)]
    z = np.zeros((1, H), np.float32)
    res, _ = oracle.reduce_norm(w, z, np.ones(H, np.float32))
    assert _f(res) == [1.0] * H
    res, _ = oracle.reduce_norm(w[::-1], z, np.ones(H, np.float32))
    assert _f(res) == [1 + 2.0 ** -23] * H


def test_rmsnorm_and_gemma_offset():
    H = 16
    res_in = np.full((1, H), 2.0, np.float32)
    z = np.zeros((1, H), np.float32)
    gamma = np.full(H, 0.5, np.float32)
    # mean square 4, eps 0 -> inv 0.5 -> r*inv = 1
    _, norm = oracle.reduce_norm([z], res_in, gamma, eps=0.0)
    assert _f(norm) == [0.5] * H
    _, norm = oracle.reduce_norm([z], res_in, gamma, eps=0.0, norm_weight_offset=1.0)
    assert _f(norm) == [1.5] * H                          # (1 + gamma)
    out = oracle.allreduce_rmsnorm([z, z], res_in, gamma, eps=0.0, norm_weight_offset=1.0)
    assert _f(out["norm"]) == [1.5] * H and out["quant"] is None and out["scale"] is None
    # eps rounded to float32 and added inside the sqrt
    x = np.array([[3.0] + [0.0] * 15], np.float32)
    _, norm = oracle.reduce_norm([x], z, np.ones(H, np.float32), eps=0.4375)
    inv = F32(1) / np.sqrt(F32(9) / F32(16) + F32(0.4375))     # sqrt(1) = 1
    assert inv == 1 and norm[0, 0] == 3.0


def test_norm_weight_float32_with_bf16_activations():
    H = 16
    x = np.full((1, H), 1.0, BF16)
    gamma = np.full(H, 1 + 2.0 ** -10, np.float32)        # not representable in bf16
    res, norm = oracle.reduce_norm([x], np.zeros((1, H), BF16), gamma, eps=0.0)
    assert res.dtype == BF16 and norm.dtype == BF16
    assert _f(norm) == [1.0] * H                          # rT(1 + 2^-10) = 1


def test_full_pipeline_close_to_float64():
    rng = np.random.default_rng(1)
    N, P, H, M, K = 4, 24, 256, 5, 4
    per_rank = []
    x64 = np.zeros((M, H))
    for r in range(N):
        eo = rng.standard_normal((P, H)).astype(BF16)
        idx = rng.integers(-1, P, (M, K)).astype(np.int32)
        sc = rng.uniform(0, 1, (M, K)).astype(np.float32)
        sh = rng.standard_normal((M, H)).astype(BF16)
        per_rank.append(dict(expert_out=eo, permuted_idx=idx, expert_scales=sc, shared_expert_out=sh))
        for m in range(M):
            for k in range(K):
                if idx[m, k] >= 0:
                    x64[m] += 2.5 * sc[m, k] * eo[idx[m, k]].astype(np.float64)
        x64 += sh.astype(np.float64)
    resid = rng.standard_normal((M, H)).astype(BF16)
    gamma = rng.uniform(0.5, 1.5, H).astype(BF16)
    out = oracle.moe_finalize_allreduce(per_rank, resid, gamma, routed_scaling_factor=2.5,
                                        quant=("fp8_per_token", {}))
    r64 = x64 + resid.astype(np.float64)
    n64 = r64 / np.sqrt((r64 ** 2).mean(1, keepdims=True) + 1e-6) * gamma.astype(np.float64)
    assert out["residual"].dtype == BF16 and out["norm"].dtype == BF16
    np.testing.assert_allclose(out["residual"].astype(np.float64), r64, rtol=3e-2, atol=3e-2)
    np.testing.assert_allclose(out["norm"].astype(np.float64), n64, rtol=3e-2, atol=3e-2)
    deq = oracle.dequantize(out["quant"], out["scale"], "fp8_per_token")
    np.testing.assert_allclose(deq, out["norm"].astype(np.float32), rtol=0.07, atol=1e-3)
    # the quantizer sees exactly f32(norm_out)
    c2, s2 = oracle.quantize(out["norm"], "fp8_per_token")
    assert same_bits(c2, out["quant"]) and same_bits(s2, out["scale"])


# ------------------------------------------------------------ fp8 quant

def test_fp8_per_token_hand_example():
    q = np.zeros((3, 16), np.float32)
    q[0, :4] = [1.0, -2.0, 0.5, 0.0]
    q[1, :2] = [448.0, -224.0]                            # amax 448 -> s = 1 exactly
    codes, s = oracle.quantize(q, "fp8_per_token")
    assert s.shape == (3, 1) and s.dtype == np.float32
    assert s[0, 0] == F32(2.0) / F32(448.0)
    assert s[1, 0] == 1.0
    assert s[2, 0] == F32(1e-10) / F32(448.0)             # zero row: floor 1e-10 (as float32)
    c = codes.astype(np.float32)
    assert c[0, :4].tolist() == [224.0, -448.0, 112.0, 0.0]
    assert c[1, :2].tolist() == [448.0, -224.0]
    assert np.all(c[2] == 0)
    inv = F32(1) / s[0, 0]
    assert c[0, 0] == F32(1.0 * inv).astype(E4M3).astype(np.float32)


def test_fp8_per_token_nan_scale():
    q = np.ones((2, 16), np.float32)
    q[0, 7] = NAN
    _, s = oracle.quantize(q, "fp8_per_token")
    assert np.isnan(s[0, 0]) and s[1, 0] == F32(1) / F32(448)


def test_fp8_static_uses_reciprocal_once():
    s = F32(3.0)
    q = np.full((1, 16), 7.0, np.float32)
    codes, _ = oracle.quantize(q, "fp8_static", scale=s)
    expect = F32(F32(7.0) * (F32(1.0) / s)).astype(E4M3)
    assert same_bits(codes[0, 0], expect)
    assert F32(F32(7.0) * (F32(1.0) / s)) != F32(7.0) / s   # reciprocal-multiply differs from divide


def test_ue8m0_power_of_two_rounding():
    gs = 16
    q = np.zeros((1, 4 * gs), np.float32)
    q[0, 0] = 448 * 2.0 ** -3             # s = 2^-3, exact power stays
    q[0, gs] = -448 * 1.5 * 2.0 ** 2      # s = 1.5 * 4 -> 8
    q[0, 2 * gs] = 448 * 1.0009765625     # s = 1 + 2^-10 -> 2
    q[0, 3 * gs + 5] = 448 * 0.75         # s = 0.75 -> 1
    _, s_plain = oracle.quantize(q, "fp8_per_group", group_size=gs)
    assert s_plain.tolist() == [[0.125, 6.0, 1.0009765625, 0.75]]
    codes, s = oracle.quantize(q, "fp8_per_group", group_size=gs, ue8m0=True)
    assert s.tolist() == [[0.125, 8.0, 2.0, 1.0]]
    c = codes.astype(np.float32)[0]
    # 336 = 448 * 0.75 is an e4m3 tie between 320 (mantissa 010) and 352 (011) -> 320
    assert c[0] == 448 and c[gs] == -320 and c[3 * gs + 5] == 320
    assert c[2 * gs] == F32(F32(448 * 1.0009765625) * (F32(1) / F32(2))).astype(E4M3).astype(np.float32)
    # floor: zero group -> 1e-10/448 -> 2^ceil(log2) computed exactly
    z = np.zeros((1, gs), np.float32)
    _, sz = oracle.quantize(z, "fp8_per_group", group_size=gs, ue8m0=True)
    floor = F32(1e-10) / F32(448)
    assert sz[0, 0] == 2.0 ** np.ceil(np.log2(float(floor))) and sz[0, 0] >= floor


def test_ue8m0_exact_for_all_powers():
    s = np.ldexp(np.ones(200, np.float32), np.arange(-120, 80)).astype(np.float32)
    assert np.array_equal(oracle._ue8m0(s), s)
    up = np.nextafter(s, np.float32(np.inf))
    assert np.array_equal(oracle._ue8m0(up), 2 * s)


def test_per_group_col_layout_and_defaults():
    rng = np.random.default_rng(2)
    q = rng.standard_normal((3, 256)).astype(np.float32)
    c_row, s_row = oracle.quantize(q, "fp8_per_group")                   # default gs 128, "row"
    c_col, s_col = oracle.quantize(q, "fp8_per_group", scale_layout="col")
    assert s_row.shape == (3, 2) and s_col.shape == (2, 3)
    assert same_bits(c_row, c_col) and np.array_equal(s_row.T, s_col)
    assert s_col.flags["C_CONTIGUOUS"]
    for layout, s in (("row", s_row), ("col", s_col)):
        d = oracle.dequantize(c_row, s, "fp8_per_group", scale_layout=layout)
        np.testing.assert_allclose(d, q, rtol=0.07, atol=0.02)


# ------------------------------------------------------------------ nvfp4

def test_nvfp4_packing_order():
    blk = np.zeros((1, 16), np.float32)
    blk[0, :4] = [1.0, 6.0, -0.5, 3.0]                    # codes 2, 7, 9, 5
    codes, sf = oracle.quantize(blk, "nvfp4", global_scale=F32(1), layout="linear")
    assert codes.dtype == np.uint8 and codes.shape == (1, 8)
    assert codes[0, :2].tolist() == [0x72, 0x59] and np.all(codes[0, 2:] == 0)
    assert sf.dtype == E4M3 and sf.shape == (1, 1) and sf.astype(np.float32)[0, 0] == 1.0


def test_nvfp4_e2m1_saturation():
    q = np.zeros((1, 16), np.float32)
    q[0, :3] = [6 * 448 * 2, -6 * 448 * 2, 6 * 448]       # sf = sat(1 * 5376/6 = 896) = 448
    codes, sf = oracle.quantize(q, "nvfp4", global_scale=F32(1), layout="linear")
    assert sf.astype(np.float32)[0, 0] == 448
    assert codes[0, 0] == (7 | 15 << 4) and codes[0, 1] & 0xF == 7   # 12 -> sat 6; -12 -> -6; 6


def test_nvfp4_scale_formula():
    g = F32(448 * 6 / 3.0)                                 # 896
    q = np.zeros((1, 64), np.float32)
    q[0, :16] = 3.0                                        # g * (3/6) = 448
    q[0, 16:32] = 1e30                                     # saturates at 448
    q[0, 32:48] = np.linspace(-1, 0.7, 16)                 # vmax 1 -> e4m3(896/6 = 149.33) = 144
    q[0, 48] = np.inf                                      # Inf block: sf 448 (codes unspecified)
    codes, sf = oracle.quantize(q, "nvfp4", global_scale=g, layout="linear")
    sfv = sf.astype(np.float32)[0]
    assert sfv.tolist() == [448.0, 448.0, 144.0, 448.0]
    assert F32(g * (F32(1) / F32(6))).astype(E4M3).astype(np.float32) == 144.0
    os2 = g / F32(144)
    nib = np.empty(64, np.uint8)
    nib[0::2] = codes[0] & 0xF
    nib[1::2] = codes[0] >> 4
    assert np.all(nib[:16] == 7)                           # os = 896/448 = 2: 3 * 2 = 6 -> code 7
    vals = oracle.E2M1_TABLE[nib[32:48]]
    ref = [oracle.E2M1_TABLE[_e2m1_rne_reference(np.clip(F32(x) * os2, -6, 6))] for x in q[0, 32:48]]
    assert vals.tolist() == ref


def test_nvfp4_nan_block_scale_and_zero_block():
    q = np.zeros((1, 32), np.float32)
    q[0, 3] = NAN
    q[0, 16:32] = -1e-30                                  # sf = e4m3(tiny) = 0 -> os 0 -> -0 codes
    codes, sf = oracle.quantize(q, "nvfp4", global_scale=F32(1), layout="linear")
    assert np.isnan(sf.astype(np.float32)[0, 0])
    assert sf.view(np.uint8)[0, 1] == 0
    assert np.all(codes[0, 8:] == 0x88)                   # sat(-1e-30 * 0) = -0.0 -> code 8


def test_nvfp4_all_zero_block_with_tiny_global_scale():
    q = np.zeros((2, 16), np.float32)
    codes, sf = oracle.quantize(q, "nvfp4", global_scale=F32(1e-30), layout="linear")
    assert np.all(codes == 0) and np.all(sf.view(np.uint8) == 0)


# --------------------------------------------------------------- swizzle

@pytest.mark.parametrize("m,b,H,off", [
    (0, 0, 64, 0), (0, 3, 64, 3), (1, 0, 64, 16), (31, 0, 64, 496), (32, 0, 64, 4),
    (33, 1, 64, 21), (127, 3, 64, 511), (128, 0, 64, 512), (96, 2, 64, 14),
    (0, 4, 256, 512), (128, 0, 256, 2048), (130, 5, 256, 2048 + 512 + 32 + 1),
    (128, 0, 80, 1024), (0, 4, 80, 512), (255, 4, 80, 1024 + 512 + 496 + 12),
])
def test_swizzled_offset_by_hand(m, b, H, off):
    assert oracle.swizzled_offset(m, b, H) == off


def test_swizzle_is_bijection_with_padding():
    M, H = 200, 80                     # nb = 5 -> 8 columns, Mp = 256
    Mp = (M + 127) // 128 * 128
    mm, bb = np.meshgrid(np.arange(Mp), np.arange(8), indexing="ij")
    offs = oracle.swizzled_offset(mm, bb, H).ravel()
    assert sorted(offs.tolist()) == list(range(Mp * 8))


def _exact_nvfp4_input(rng, M, H):
    """Blocks v * 2^k with v on the e2m1 grid and a 6 in each block: exact under g = 1 or 2."""
    nb = H // 16
    v = oracle.E2M1_TABLE[rng.integers(0, 16, (M, nb, 16))]
    v[:, :, 0] = 6.0 * rng.choice([-1, 1], (M, nb))
    k = rng.integers(-4, 5, (M, nb, 1))
    return (v * np.exp2(k)).astype(np.float32).reshape(M, H)


@pytest.mark.parametrize("g", [1.0, 2.0])
def test_nvfp4_swizzled_and_linear_round_trip(g):
    rng = np.random.default_rng(3)
    M, H = 130, 80                                        # 2 row tiles, nb = 5 -> 8
    q = _exact_nvfp4_input(rng, M, H)
    c_lin, sf_lin = oracle.quantize(q, "nvfp4", global_scale=F32(g), layout="linear")
    c_sw, sf_sw = oracle.quantize(q, "nvfp4", global_scale=F32(g))   # default swizzled
    assert same_bits(c_lin, c_sw)
    assert sf_lin.shape == (M, 5) and sf_sw.shape == (256, 8) and sf_sw.dtype == E4M3
    flat = sf_sw.view(np.uint8).ravel()
    for m, b in [(0, 0), (1, 4), (129, 3), (45, 2)]:
        assert flat[oracle.swizzled_offset(m, b, H)] == sf_lin.view(np.uint8)[m, b]
    used = np.zeros(flat.size, bool)
    mm, bb = np.meshgrid(np.arange(M), np.arange(5), indexing="ij")
    used[oracle.swizzled_offset(mm, bb, H).ravel()] = True
    assert np.all(flat[~used] == 0)                       # padding is 0
    for layout, sf in (("linear", sf_lin), ("swizzled_128x4", sf_sw)):
        d = oracle.dequantize(c_lin, sf, "nvfp4", global_scale=F32(g), layout=layout)
        assert same_bits(d, q) or np.array_equal(d, q)
        assert np.array_equal(np.signbit(d), np.signbit(q))


def test_fp8_round_trips_exact():
    rng = np.random.default_rng(4)
    M, H = 4, 256
    grid = np.arange(0, 0x7F, dtype=np.uint8).view(E4M3).astype(np.float32)   # finite positive codes
    base = grid[rng.integers(0, grid.size, (M, H))] * rng.choice([-1, 1], (M, H))
    base[:, ::128] = 448.0                                 # amax 448 per group / token
    for k in (-3, 0, 2):
        q = (base * 2.0 ** k).astype(np.float32)
        c, s = oracle.quantize(q, "fp8_per_token")
        assert np.all(s == 2.0 ** k)
        assert np.array_equal(oracle.dequantize(c, s, "fp8_per_token"), q)
        c, s = oracle.quantize(q, "fp8_per_group", ue8m0=True)
        assert np.array_equal(oracle.dequantize(c, s, "fp8_per_group"), q)
        c, s = oracle.quantize(q, "fp8_static", scale=F32(2.0 ** k))
        assert np.array_equal(oracle.dequantize(c, F32(2.0 ** k), "fp8_static"), q)
        assert np.array_equal(oracle.dequantize(c, None, "fp8_static", scale=F32(2.0 ** k)), q)


# ------------------------------------------------------------------ M = 0

QUANTS = [
    None,
    ("fp8_static", {"scale": F32(0.5)}),
    ("fp8_per_token", {}),
    ("fp8_per_group", {"group_size": 64}),
    ("fp8_per_group", {"scale_layout": "col"}),
    ("nvfp4", {"global_scale": F32(1.0), "layout": "linear"}),
    ("nvfp4", {"global_scale": F32(1.0)}),
]
EXPECT_SHAPES = [
    (None, None), ((0, 256), None), ((0, 256), (0, 1)), ((0, 256), (0, 4)), ((0, 256), (2, 0)),
    ((0, 128), (0, 16)), ((0, 128), (0, 16)),
]


@pytest.mark.parametrize("quant,shapes", list(zip(QUANTS, EXPECT_SHAPES)))
@pytest.mark.parametrize("T", [np.float32, np.float16, BF16])
def test_m_zero(quant, shapes, T):
    H, P, K = 256, 3, 2
    per_rank = [dict(expert_out=np.ones((P, H), T), permuted_idx=np.zeros((0, K), np.int32),
                     expert_scales=np.zeros((0, K), np.float32),
                     shared_expert_out=np.zeros((0, H), T)) for _ in range(2)]
    resid = np.zeros((0, H), T)
    out = oracle.moe_finalize_allreduce(per_rank, resid, np.ones(H, T), quant=quant)
    assert out["residual"].shape == (0, H) and out["residual"].dtype == np.dtype(T)
    assert out["norm"].shape == (0, H) and out["norm"].dtype == np.dtype(T)
    qs, ss = shapes
    assert (None if out["quant"] is None else out["quant"].shape) == qs
    assert (None if out["scale"] is None else out["scale"].shape) == ss
    dense = oracle.allreduce_rmsnorm([resid, resid], resid, np.ones(H, T), quant=quant)
    assert dense["residual"].shape == (0, H)
    if quant is not None:
        d = oracle.dequantize(out["quant"], out["scale"], quant[0], **quant[1])
        assert d.shape == (0, H) and d.dtype == np.float32


def test_dense_matches_moe_with_identity_routing():
    rng = np.random.default_rng(5)
    M, H = 3, 64
    xs = [rng.standard_normal((M, H)).astype(np.float16) for _ in range(3)]
    resid = rng.standard_normal((M, H)).astype(np.float16)
    gamma = rng.standard_normal(H).astype(np.float32)
    per_rank = [dict(expert_out=x, permuted_idx=np.arange(M, dtype=np.int32)[:, None]) for x in xs]
    a = oracle.moe_finalize_allreduce(per_rank, resid, gamma, quant=("nvfp4", {"global_scale": F32(100)}))
    b = oracle.allreduce_rmsnorm(xs, resid, gamma, quant=("nvfp4", {"global_scale": F32(100)}))
    for key in ("residual", "norm", "quant", "scale"):
        assert same_bits(a[key], b[key]), key
