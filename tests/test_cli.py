"""`python -m jax_moe_ar demo|bench` as a user runs them (subprocesses, CPU devices), plus
the bench's pure helpers (routing, floor, profile parsing) in process."""

import importlib.util
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest



def run_cli(*args, timeout=120):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)  # the CLI asks for its own CPU devices
    # Run from outside the source tree, as a user would: `python -m` puts the working
    # directory first on sys.path, and the source tree has no compiled module after a
    # non-editable install.
    proc = subprocess.run([sys.executable, "-m", "jax_moe_ar", *args], cwd=tempfile.gettempdir(),
                          env=env,
                          capture_output=True, text=True, timeout=timeout)
    return proc


def _explain(proc):
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


def test_help_says_what_each_subcommand_measures():
    top = run_cli("--help")
    assert top.returncode == 0, _explain(top)
    assert "demo" in top.stdout and "bench" in top.stdout
    bench = run_cli("bench", "--help")
    assert bench.returncode == 0, _explain(bench)
    for word in ("wall", "kernel", "floor", "--chain", "--ranks", "--quant", "--out"):
        assert word in bench.stdout, word
    demo = run_cli("demo", "--help")
    assert demo.returncode == 0, _explain(demo)
    assert "xla" in demo.stdout and "--steps" in demo.stdout


def test_demo_runs_and_agrees():
    proc = run_cli("demo", "--platform", "cpu", "--steps", "2", "--reps", "2", timeout=60)
    assert proc.returncode == 0, _explain(proc)
    out = proc.stdout
    assert "8 CPU device(s)" in out
    assert "step 0:" in out and "step 1:" in out
    assert "bit-identical" in out and "wall/step fused" in out
    assert "OK: fused and xla agree" in out


def test_demo_refuses_bad_sizes():
    proc = run_cli("demo", "--platform", "cpu", "--experts", "12", "--devices", "8")
    assert proc.returncode == 2, _explain(proc)
    assert "--experts 12" in proc.stderr


def test_bench_writes_table_json_and_plot(tmp_path):
    out = tmp_path / "bench"
    ranks, quants, ms = (2, 4), ("none", "fp8_per_token", "nvfp4"), (1, 8)
    proc = run_cli("bench", "--platform", "cpu", "--out", str(out),
                   "--ranks", ",".join(map(str, ranks)), "--quant", ",".join(quants),
                   "--M", ",".join(map(str, ms)), "--H", "128", "--chain", "5", "--unroll", "2",
                   "--reps", "2", "--warmup", "1", timeout=60)
    assert proc.returncode == 0, _explain(proc)
    # the table, with the CPU caveat and the floor formula
    assert "fused µs" in proc.stdout and "xla µs" in proc.stdout and "% of" in proc.stdout
    assert "NOT meaningful" in proc.stdout
    assert "(N-1)/N * M*H*2*bytes(T)" in proc.stdout
    table = [ln for ln in proc.stdout.splitlines()
             if ln.split()[:1] in (["2"], ["4"]) and "auto" in ln]
    assert len(table) == len(ranks) * len(quants) * len(ms), proc.stdout
    # progress on stderr, one line per row
    assert proc.stderr.count("row ") == len(ranks) * len(quants) * len(ms)

    data = json.loads((out / "bench.json").read_text())
    meta, rows = data["meta"], data["rows"]
    for key in ("device_kind", "gpu_count", "jax_version", "chain", "bandwidth"):
        assert key in meta, key
    assert meta["chain"] == 5 and meta["platform"] == "cpu" and meta["gpu_count"] == 0
    keys = [(r["ranks"], r["quant"], r["M"]) for r in rows]
    assert sorted(keys) == sorted((n, q, m) for n in ranks for q in quants for m in ms)
    for r in rows:
        assert r["xla"]["wall_us"] > 0
        assert r["fused"]["auto"]["wall_us"] > 0
        assert r["fused"]["auto"]["path"] == "cpu-ffi"
        assert r["xla"]["path"] == "xla"
        assert r["fused"]["auto"]["kernel_us"] is None  # no device planes on CPU
        assert r["floor_us"] is None and r["floor_bytes"] > 0
        assert r["check"]["auto"]["ok"]
        assert not r["errors"]
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "bench.png").stat().st_size > 0
    else:
        assert "no plot" in proc.stdout


def test_bench_survives_a_crashing_measurement(tmp_path):
    """A segfault (here: the test hook) costs one measurement; the bench goes on."""
    from jax_moe_ar.bench import TEST_CRASH_ENV
    os.environ[TEST_CRASH_ENV] = "fp8_per_token:8:xla"
    try:
        proc = run_cli("bench", "--platform", "cpu", "--out", str(tmp_path), "--ranks", "2",
                       "--quant", "none,fp8_per_token", "--M", "1,8", "--H", "128",
                       "--chain", "3", "--reps", "1", "--warmup", "0", timeout=60)
    finally:
        del os.environ[TEST_CRASH_ENV]
    assert proc.returncode == 1, _explain(proc)
    assert "SIGSEGV" in proc.stdout
    rows = {(r["quant"], r["M"]): r for r in json.loads((tmp_path / "bench.json").read_text())
            ["rows"]}
    assert len(rows) == 4
    bad = rows[("fp8_per_token", 8)]
    assert "SIGSEGV" in bad["errors"]["xla"] and bad["xla"]["error"]
    assert bad["fused"]["auto"]["wall_us"] > 0 and bad["check"]["auto"]["ok"]  # went on
    assert all(not r["errors"] for k, r in rows.items() if k != ("fp8_per_token", 8))


# ----------------------------------------------------------------- helpers, in process

def test_routing_spreads_experts_over_ranks():
    from jax_moe_ar.bench import routing
    rng = np.random.default_rng(0)
    N, M, K, E = 4, 64, 8, 256
    idx, scales, rows = routing(rng, N, M, K, E)
    assert idx.shape == (N, M, K) and idx.dtype == np.int32
    np.testing.assert_allclose(scales.sum(axis=1), 1.0, rtol=1e-5)
    # every (token, k) lives on exactly one rank
    assert ((idx >= 0).sum(axis=0) == 1).all()
    for r in range(N):
        used = np.sort(idx[r][idx[r] >= 0])
        np.testing.assert_array_equal(used, np.arange(used.size))  # rows 0..P_r-1, once each
        assert used.size <= rows
    assert 0 < (idx[0] >= 0).mean() < 1  # a realistic mix of local rows and -1


def test_floor_bytes_formula():
    from jax_moe_ar.bench import floor_bytes
    M, H = 32, 7168
    # reduce-scatter of bf16 partials + all-gather of bf16 residual_out: (N-1)/N * M*H*2*2,
    # whatever the quant format (every rank derives norm and quant from residual_out)
    assert floor_bytes(4, M, H, 2, "none") == pytest.approx(0.75 * M * H * 4)
    assert floor_bytes(2, M, H, 2, "fp8_per_token") == pytest.approx(0.5 * M * H * 4)
    assert floor_bytes(2, M, H, 4, "nvfp4") == pytest.approx(0.5 * M * H * 8)
    assert floor_bytes(1, M, H, 2, "nvfp4") == 0


def test_device_time_reads_gpu_planes():
    import jax

    from jax_moe_ar.bench import device_time
    txt = """
    planes { id: 1 name: "/device:GPU:0"
      lines { id: 1 name: "Stream #13(Compute)" timestamp_ns: 1000
        events { metadata_id: 1 offset_ps: 0 duration_ps: 4000000 }
        events { metadata_id: 2 offset_ps: 2000000 duration_ps: 4000000 } }
      lines { id: 2 name: "XLA Ops" timestamp_ns: 1000
        events { metadata_id: 1 offset_ps: 0 duration_ps: 99000000 } }
      event_metadata { key: 1 value { id: 1 name: "fused" } }
      event_metadata { key: 2 value { id: 2 name: "nccl" } } }
    planes { id: 2 name: "/device:GPU:1"
      lines { id: 1 name: "Stream #7" timestamp_ns: 0
        events { metadata_id: 1 offset_ps: 0 duration_ps: 1000000 } }
      event_metadata { key: 1 value { id: 1 name: "fused" } } }
    planes { id: 3 name: "/host:CPU" }
    """
    data = jax.profiler.ProfileData.from_text_proto(txt)
    got = device_time(data, {0, 1})
    # overlapping events count once; the summary line "XLA Ops" is left out
    assert got["busy_ns"] == {"/device:GPU:0": 6000, "/device:GPU:1": 1000}
    assert got["sum_ns"] == {"/device:GPU:0": 8000, "/device:GPU:1": 1000}
    assert got["kernels"] == {"fused": 5000, "nccl": 4000}
    assert list(device_time(data, {1})["busy_ns"]) == ["/device:GPU:1"]
