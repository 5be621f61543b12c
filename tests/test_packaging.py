"""The package as a user installs it: ``pip install .`` installs ``fusedce.kernels`` and no
top-level module named ``kernels`` (that name belongs to another PyPI package, which Hugging
Face transformers imports)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # pip builds and installs the package

ROOT = Path(__file__).resolve().parent.parent


def test_pip_install_dot_installs_kernels_as_a_subpackage(tmp_path):
    target = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
         "--no-build-isolation", "--target", str(target), str(ROOT)],
        capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PIP_NO_INPUT="1"))
    if build.returncode != 0 and "setuptools" in build.stderr and "No module" in build.stderr:
        pytest.skip("setuptools is not importable here: cannot build without isolation")
    assert build.returncode == 0, build.stderr
    assert (target / "fusedce" / "kernels" / "cross_entropy.py").is_file()
    assert not (target / "kernels").exists(), "a top-level 'kernels' package was installed"
    # from outside the repository, with only the installed copy on the path
    code = ("import importlib.util, fusedce, fusedce.kernels; "
            "print(fusedce.__file__); print(fusedce.kernels.__file__); "
            "spec = importlib.util.find_spec('kernels'); "
            f"print(spec is None or {str(target)!r} not in str(spec.origin))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(target)
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=tmp_path, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    fusedce_file, kernels_file, no_top_level = run.stdout.split()
    assert fusedce_file.startswith(str(target)) and kernels_file.startswith(str(target))
    assert no_top_level == "True"


def test_checkout_root_shadows_no_installed_package():
    """From the checkout's root (on sys.path first, as for `python -c` and `python -m
    pytest`), `import kernels` is Hugging Face's package when it is installed (.[dev] has it)
    and nothing of this checkout otherwise; transformers, which imports it, loads its models;
    fusedce's kernels come from fusedce/kernels/."""
    code = ("import importlib.util, fusedce.kernels, transformers; "
            "transformers.GPT2LMHeadModel; "
            "spec = importlib.util.find_spec('kernels'); "
            "print(spec.origin if spec else 'none'); print(fusedce.kernels.__file__)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    kernels_origin, fusedce_kernels = run.stdout.split()
    # (an environment made inside the checkout, e.g. ./.venv, installs it under ROOT too)
    origin = Path(kernels_origin)
    assert (kernels_origin == "none" or not origin.is_relative_to(ROOT)
            or "site-packages" in origin.relative_to(ROOT).parts), kernels_origin
    assert Path(fusedce_kernels) == ROOT / "fusedce" / "kernels" / "__init__.py"
