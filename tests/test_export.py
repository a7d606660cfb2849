"""jax.export, per platform (README "Transformations"): a CPU program exports with the
documented recipe, serializes, and runs bit-identically in another process; on CUDA the
fused call can't be serialized, so "auto" exports the plain-JAX path with a warning and a
forced fused algorithm raises, saying why."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from jax import export
from jax.sharding import PartitionSpec as PS

import jax_moe_ar as mar
from jax_moe_ar import primitives
from jax_moe_ar.testing import N4, make_mesh

CPU_TARGETS = ("jax_moe_ar_cpu_finalize_v1", "jax_moe_ar_cpu_tail_v1")
SPECS = (PS("tp"), PS("tp"), PS(), PS())


def _program(mesh, algorithm="auto"):
    def body(eo, idx, res, nw):
        return mar.moe_finalize_allreduce(eo, idx, res, nw, axis_name="tp",
                                          quant=mar.NvFp4(600.0), algorithm=algorithm,
                                          outputs=("residual", "norm", "quant"))
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=SPECS, out_specs=PS()))


def _args(seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((4 * 6, 64)).astype(np.float32),
            rng.integers(-1, 6, (4 * 3, 2)).astype(np.int32),
            rng.standard_normal((3, 64)).astype(np.float32), np.ones(64, np.float32))


def test_cpu_export_serializes_and_runs_in_another_process(tmp_path):
    pytest.importorskip("flatbuffers", reason="jax.export serialization needs flatbuffers "
                        "(the `test` extra installs it)")
    mesh = make_mesh("cpu", N4)
    f, args = _program(mesh), _args()
    checks = [export.DisabledSafetyCheck.custom_call(t) for t in CPU_TARGETS]
    exp = export.export(f, platforms=["cpu"], disabled_checks=checks)(*args)
    (tmp_path / "program.bin").write_bytes(exp.serialize())
    want = f(*args)
    np.savez(tmp_path / "io.npz", *args, *[np.asarray(o) for o in want])
    script = textwrap.dedent("""
        import sys
        import numpy as np
        import jax
        from jax import export
        from jax.sharding import Mesh, NamedSharding, PartitionSpec as PS
        import jax_moe_ar  # registers the CPU handlers and FusedOutputs

        d = sys.argv[1]
        exp = export.deserialize(open(d + "/program.bin", "rb").read())
        io = np.load(d + "/io.npz")
        arrays = [io[f"arr_{i}"] for i in range(len(io.files))]
        mesh = Mesh(np.array(jax.devices()[:4]), ("tp",),
                    axis_types=(jax.sharding.AxisType.Auto,))
        specs = (PS("tp"), PS("tp"), PS(), PS())
        args = [jax.device_put(a, NamedSharding(mesh, s)) for a, s in zip(arrays, specs)]
        out = jax.jit(exp.call)(*args)
        assert type(out).__name__ == "FusedOutputs", type(out)
        for got, want in zip([o for o in out if o is not None], arrays[4:]):
            assert np.array_equal(np.asarray(got).view(np.uint8), want.view(np.uint8))
        print("same bits")
    """)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu")
    # from outside the source tree, as a user's other process would run
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "same bits" in proc.stdout, proc.stderr[-3000:]


def test_cpu_export_without_the_recipe_names_the_custom_call():
    f = _program(make_mesh("cpu", N4))
    with pytest.raises(ValueError, match="custom call"):
        export.export(f, platforms=["cpu"])(*_args())


def test_cuda_export_auto_uses_the_plain_path_and_says_why(monkeypatch):
    monkeypatch.setattr(primitives, "_warned", set())  # the warning is once per reason
    f = _program(make_mesh("cpu", N4))
    with pytest.warns(RuntimeWarning, match="exchange workspace"):
        exp = export.export(f, platforms=["cuda"])(*_args())
    text = exp.mlir_module()
    assert primitives.TARGET_FUSED not in text and "all_reduce" in text


@pytest.mark.parametrize("algorithm", ["oneshot", "twoshot"])
def test_cuda_export_of_a_forced_fused_algorithm_raises(algorithm):
    f = _program(make_mesh("cpu", N4), algorithm=algorithm)
    with pytest.raises(ValueError) as info:
        export.export(f, platforms=["cuda"])(*_args())
    msg = str(info.value)
    assert f"algorithm='{algorithm}' can't be exported" in msg and "workspace" in msg, msg
    assert "algorithm='auto' or 'xla'" in msg


def test_cuda_lowering_for_jit_is_unchanged():
    """Not exporting: lowering for CUDA still emits the fused call (tests/test_lowering.py)."""
    f = _program(make_mesh("cpu", N4))
    text = f.trace(*_args()).lower(lowering_platforms=("cuda",)).as_text()
    assert primitives.TARGET_FUSED in text


def test_export_recipe_in_readme_matches_targets():
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    for t in CPU_TARGETS:
        assert t in readme and t in (primitives.TARGET_CPU_FINALIZE, primitives.TARGET_CPU_TAIL)
    assert "DisabledSafetyCheck.custom_call" in readme
