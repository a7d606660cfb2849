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



def run_cli(*args, timeout=120, **env_vars):
    env = dict(os.environ, PYTHONUNBUFFERED="1", **env_vars)
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


BENCH_RANKS, BENCH_QUANTS, BENCH_MS = (2, 4), ("none", "fp8_per_token", "nvfp4"), (1, 8)


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """One small CPU bench run, shared by the tests that read its table and JSON."""
    out = tmp_path_factory.mktemp("bench")
    proc = run_cli("bench", "--platform", "cpu", "--out", str(out),
                   "--ranks", ",".join(map(str, BENCH_RANKS)), "--quant", ",".join(BENCH_QUANTS),
                   "--M", ",".join(map(str, BENCH_MS)), "--H", "128", "--chain", "5",
                   "--unroll", "2", "--reps", "2", "--warmup", "1", timeout=300)
    assert proc.returncode == 0, _explain(proc)
    return proc, out


def _table(stdout):
    return [ln for ln in stdout.splitlines()
            if ln.split()[:1] in (["2"], ["4"]) and "auto" in ln]


def test_bench_writes_table_json_and_plot(bench_run):
    proc, out = bench_run
    ranks, quants, ms = BENCH_RANKS, BENCH_QUANTS, BENCH_MS
    # the table, with the CPU caveat and the floor formula
    assert "fused µs" in proc.stdout and "xla µs" in proc.stdout and "% of" in proc.stdout
    assert "NOT meaningful" in proc.stdout
    assert "(N-1)/N * M*H*2*bytes(T)" in proc.stdout
    table = _table(proc.stdout)
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
        assert "no plot" in proc.stdout and "jax_moe_ar[bench]" in proc.stdout


def test_bench_times_the_noop_custom_call(bench_run):
    """The "ffi no-op" column: the chain with the no-op custom call in the op's place."""
    proc, out = bench_run
    assert "ffi no-op" in proc.stdout
    rows = json.loads((out / "bench.json").read_text())["rows"]
    for r in rows:
        assert r["noop"]["path"] == "ffi-noop"  # the compiled chain kept the calls
        assert r["noop"]["wall_us"] > 0
        fused = r["fused"]["auto"]["wall_us"]
        assert r["beyond_noop_us"]["auto"] == pytest.approx(fused - r["noop"]["wall_us"])
    for line in _table(proc.stdout):
        cells = line.split()
        assert float(cells[9]) > 0, line  # the no-op wall column (after "skipped")


def test_bench_skips_the_one_shot_xla_column_on_cpu(bench_run):
    """The second xla column (XLA's one-shot all-reduce flag) is GPU-only: skipped with a
    note on CPU, and speedups are quoted against the one xla column measured."""
    proc, out = bench_run
    data = json.loads((out / "bench.json").read_text())
    one_shot = data["meta"]["xla_one_shot"]
    assert one_shot["flag"] == "--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true"
    assert "CPU" in one_shot["skipped"]
    assert "xla 1shot" in proc.stdout and one_shot["skipped"] in proc.stdout
    for r in data["rows"]:
        assert r["xla_one_shot"] == {"skipped": one_shot["skipped"]}
        assert r["speedup_vs"] == "xla"
        assert r["speedup"]["auto"] == pytest.approx(
            r["xla"]["wall_us"] / r["fused"]["auto"]["wall_us"])
    for line in _table(proc.stdout):
        assert line.split()[8] == "skipped", line


def test_bench_survives_a_crashing_measurement(tmp_path):
    """A segfault (here: the test hook) costs one measurement; the bench goes on."""
    from jax_moe_ar.bench.worker import TEST_CRASH_ENV
    os.environ[TEST_CRASH_ENV] = "fp8_per_token:8:xla"
    try:
        proc = run_cli("bench", "--platform", "cpu", "--out", str(tmp_path), "--ranks", "2",
                       "--quant", "none,fp8_per_token", "--M", "1,8", "--H", "128",
                       "--chain", "3", "--reps", "1", "--warmup", "0", timeout=300)
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


def _worker_env():
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("XLA_FLAGS", None)  # the worker asks for its own CPU devices, as the CLI does
    return env


def test_worker_module_answers_tasks():
    """`python -m jax_moe_ar.bench.worker` is the measuring process: JSON tasks in, one
    JSON result per line out; it gets 8 CPU devices on its own, like the CLI."""
    task = dict(op="measure", algo="noop", N=2, M=1, quant="none", H=128, K=8, E=256,
                dtype="bf16", chain=3, unroll=2, reps=1, warmup=0, profile=False, seed=0)
    stdin = "\n".join(json.dumps(t) for t in (dict(op="hello"), task, dict(op="nonsense")))
    proc = subprocess.run([sys.executable, "-m", "jax_moe_ar.bench.worker", "--platform", "cpu"],
                          input=stdin + "\n", cwd=tempfile.gettempdir(), env=_worker_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, _explain(proc)
    hello, measured, refused = [json.loads(ln) for ln in proc.stdout.splitlines()]
    assert hello["platform"] == "cpu" and hello["device_count"] == 8
    assert measured["path"] == "ffi-noop" and measured["wall_us"] > 0
    assert "error" in refused  # an unknown task is answered, not fatal
    assert "found in sys.modules" not in proc.stderr  # runpy: the package did not import it


def test_worker_pool_gives_each_environment_its_own_process(monkeypatch):
    """The xla 1shot column's process: XLA_FLAGS with the one-shot flag appended (this
    XLA accepts the flag: an unknown one would abort the process), the default one without."""
    from jax_moe_ar.bench.pool import WorkerPool
    from jax_moe_ar.bench.report import XLA_ONE_SHOT
    from jax_moe_ar.bench.run import ONE_SHOT_FLAG, worker_environments

    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
    pool = WorkerPool("cpu", worker_environments())
    try:
        plain, err = pool.ask(dict(op="hello"), 120)
        assert err is None, err
        tuned, err = pool.ask(dict(op="hello"), 120, env=XLA_ONE_SHOT)
        assert err is None, err
        assert set(pool.workers) == {"default", XLA_ONE_SHOT}
        assert pool.workers["default"].proc.pid != pool.workers[XLA_ONE_SHOT].proc.pid
    finally:
        pool.close()
    assert ONE_SHOT_FLAG not in plain["xla_flags"]
    assert tuned["xla_flags"] == "--xla_force_host_platform_device_count=4 " + ONE_SHOT_FLAG
    assert plain["device_count"] == tuned["device_count"] == 4  # the flags were appended to
    assert pool.restarts == 0


def test_no_import_circle():
    """Only `python -m jax_moe_ar` runs __main__: the bench, the worker, demo and the CLI
    helpers import without it (and without asking for host devices on import)."""
    code = ("import os, sys\n"
            "import jax_moe_ar.bench, jax_moe_ar.bench.worker, jax_moe_ar.demo, jax_moe_ar.cli\n"
            "assert 'jax_moe_ar.__main__' not in sys.modules, 'imported __main__'\n"
            "assert 'XLA_FLAGS' not in os.environ, os.environ['XLA_FLAGS']\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tempfile.gettempdir(),
                          env=_worker_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", _explain(proc)
    import jax_moe_ar
    root = os.path.dirname(jax_moe_ar.__file__)
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if name.endswith(".py") and name != "__main__.py":
                with open(path) as fh:
                    text = fh.read()
                assert "__main__ import" not in text and "jax_moe_ar.__main__" not in text, path


@pytest.mark.gpu
def test_bench_on_gpu_times_noop_and_both_xla_columns(tmp_path):
    import jax
    n = min(2, len(jax.devices("gpu")))
    proc = run_cli("bench", "--platform", "gpu", "--out", str(tmp_path), "--ranks", str(n),
                   "--quant", "none", "--M", "1", "--chain", "20", "--reps", "2",
                   "--warmup", "1", "--bw-mib", "16", timeout=600,
                   # This test process may already hold most of the GPU's memory (JAX
                   # preallocates 75 % once a GPU test ran here): the bench's two
                   # measuring processes then allocate on demand instead of 40 % each.
                   XLA_PYTHON_CLIENT_PREALLOCATE="false")
    assert proc.returncode == 0, _explain(proc)
    (row,) = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert row["noop"]["path"] == "ffi-noop" and row["noop"]["wall_us"] > 0
    assert row["xla_one_shot"]["wall_us"] > 0 and "skipped" not in row["xla_one_shot"]
    best = min(row["xla"]["wall_us"], row["xla_one_shot"]["wall_us"])
    assert row["speedup"]["auto"] == pytest.approx(best / row["fused"]["auto"]["wall_us"])
    assert row[row["speedup_vs"]]["wall_us"] == best


# ----------------------------------------------------------------- helpers, in process

def test_routing_spreads_experts_over_ranks():
    from jax_moe_ar.bench.inputs import routing
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
    from jax_moe_ar.bench.programs import floor_bytes
    M, H = 32, 7168
    # reduce-scatter of bf16 partials + all-gather of bf16 residual_out: (N-1)/N * M*H*2*2,
    # whatever the quant format (every rank derives norm and quant from residual_out)
    assert floor_bytes(4, M, H, 2, "none") == pytest.approx(0.75 * M * H * 4)
    assert floor_bytes(2, M, H, 2, "fp8_per_token") == pytest.approx(0.5 * M * H * 4)
    assert floor_bytes(2, M, H, 4, "nvfp4") == pytest.approx(0.5 * M * H * 8)
    assert floor_bytes(1, M, H, 2, "nvfp4") == 0


def test_device_time_reads_gpu_planes():
    import jax

    from jax_moe_ar.bench.timing import device_time
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


def _noop_calls(text, target, side_effect):
    """Custom calls of `target` in compiled HLO text, with or without side effect."""
    lines = [ln for ln in text.splitlines() if f'custom_call_target="{target}"' in ln]
    return sum(("custom_call_has_side_effect=true" in ln) == side_effect for ln in lines)


def test_noop_chain_keeps_every_call():
    """XLA may drop a call whose result nobody reads; each no-op call's token is read by
    the next, so the compiled chain holds one custom call per chained call (outside the
    loop: the first and the tail; inside: one unrolled block), beside the chain's
    side-effecting keep-alive calls (one per block, as in every column)."""
    import jax

    from jax_moe_ar.bench.inputs import IN_SPEC_NAMES, make_inputs
    from jax_moe_ar.bench.programs import NOOP, NOOP_TARGET, chain_program
    from jax_moe_ar.cli import dtype_of, tp_mesh
    mesh = tp_mesh(jax.devices("cpu")[:2])
    inp = make_inputs(mesh, 2, 8, 128, 8, 256, dtype_of("bf16"), 0)
    args = tuple(inp[n] for n in IN_SPEC_NAMES)
    for quant, chain, unroll, calls in (("none", 4, 2, 1 + 2 + 1), ("nvfp4", 7, 3, 1 + 3 + 0),
                                        ("fp8_static", 5, 0, 5)):
        f = chain_program(mesh, quant, NOOP, chain, unroll)
        text = f.lower(*args).compile().as_text()
        assert _noop_calls(text, NOOP_TARGET, side_effect=False) == calls, (quant, chain)
        residual, token = f(*args)
        # the residual passes through unchanged; the token is the handler's zeros
        np.testing.assert_array_equal(np.asarray(residual)[:8], np.asarray(inp["residual"]))
        np.testing.assert_array_equal(np.asarray(token), np.zeros(2, np.int32))


def test_xla_chain_runs_every_calls_norm_and_quant():
    """The "xla" composition's norm_out and quant outputs are read by no later call; XLA
    dropped them from every call but the last of an unrolled block (docs/perf.md v12), so
    its column did less work than the op. The chain's keep-alive calls hold them: the
    compiled chain normalizes once per call, with or without quant (a quant output is
    made from the normed row). Checked on CPU, whose XLA drops them the same way."""
    import jax

    from jax_moe_ar.bench.inputs import IN_SPEC_NAMES, make_inputs
    from jax_moe_ar.bench.programs import NOOP_TARGET, chain_program
    from jax_moe_ar.cli import dtype_of, tp_mesh
    mesh = tp_mesh(jax.devices("cpu")[:2])
    inp = make_inputs(mesh, 2, 8, 128, 8, 256, dtype_of("bf16"), 0)
    args = tuple(inp[n] for n in IN_SPEC_NAMES)
    for quant in ("none", "nvfp4", "fp8_per_token"):
        text = chain_program(mesh, quant, "xla", 5, 0).lower(*args).compile().as_text()
        assert text.count(" rsqrt(") == 5, quant
        # one keep-alive for the first call, one for the other four (one unrolled block)
        assert _noop_calls(text, NOOP_TARGET, side_effect=True) == 2, quant


def test_plot_without_matplotlib_names_the_extra(monkeypatch, tmp_path):
    from jax_moe_ar.bench import report
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    why = report.write_plot(str(tmp_path / "bench.png"), [], {}, ("auto",))
    assert 'pip install "jax_moe_ar[bench]"' in why
    assert not (tmp_path / "bench.png").exists()


def test_bench_scatter_times_the_reduce_scatter_variant(tmp_path):
    """`bench --scatter`: rows of the reduce-scatter variant against the psum_scatter
    composition, M not divisible by N skipped, the floor half an all-reduce's."""
    # CPU devices asked for: on a machine with one GPU, `auto` would pick it and find no pair.
    proc = run_cli("bench", "--platform", "cpu", "--scatter", "--ranks", "2", "--M", "2,3",
                   "--quant", "none", "--chain", "2", "--reps", "1", "--warmup", "1", "--out", str(tmp_path),
                   timeout=300)
    assert proc.returncode == 0, _explain(proc)
    data = json.loads((tmp_path / "bench.json").read_text())
    assert "reduce_scatter" in data["meta"]["op"]
    (row,) = data["rows"]
    assert row["M"] == 2 and row["scatter"] is True
    assert row["floor_bytes"] == 0.5 * 2 * 256 * 2  # (N-1)/N * M*H*bytes(bf16)
    assert row["check"]["auto"]["ok"], row["check"]
    assert "op: moe_finalize_reduce_scatter" in proc.stdout
