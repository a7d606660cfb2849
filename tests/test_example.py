"""The README's usage example is a complete script that runs as written (8 CPU devices), the
README shows exactly that script, and the public docstrings describe every argument."""

import inspect
import os
import subprocess
import sys

import pytest

import jax_moe_ar as mar

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join("examples", "moe_layer_end.py")


def test_example_runs_as_written():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, EXAMPLE], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "8 cpu device(s)" in proc.stdout
    assert "'residual': 'bfloat16[4, 256]'" in proc.stdout
    assert "'scale': 'float32[4, 2]'" in proc.stdout
    assert "residual vs NumPy: max relative difference" in proc.stdout


def test_readme_shows_the_example():
    readme = open(os.path.join(ROOT, "README.md")).read()
    script = open(os.path.join(ROOT, EXAMPLE)).read()
    assert f"```python\n{script}```" in readme, "README's Use block differs from " + EXAMPLE
    assert 'pip install ".[bench]"' in readme and "build_info()" in readme


@pytest.mark.parametrize("fn", [mar.moe_finalize_allreduce, mar.allreduce_rmsnorm],
                         ids=lambda f: f.__name__)
def test_docstrings_describe_every_argument(fn):
    doc = inspect.getdoc(fn)
    for name in inspect.signature(fn).parameters:
        assert f"\n  {name}: " in doc, f"{fn.__name__}'s docstring does not describe {name}"
    for word in ("per rank", "PartitionSpec", "Returns:", "Raises:", "jax.grad", "jax.vmap"):
        assert word in doc, word


@pytest.mark.parametrize("cls,fields", [(mar.Fp8Static, ["scale"]),
                                        (mar.NvFp4, ["global_scale", "layout"]),
                                        (mar.Fp8PerGroup, ["group_size", "ue8m0",
                                                           "scale_layout"])])
def test_quant_spec_docstrings_describe_fields(cls, fields):
    for f in fields:
        assert f"``{f}``" in cls.__doc__, f"{cls.__name__}.{f}"
