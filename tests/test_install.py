"""A plain install, as a user gets it: the wheel built from this checkout, installed with pip
(not editable) into a fresh virtual environment, and ``fusedce demo`` run from a folder
outside the checkout: exit status 0, the demo on stdout, and nothing at all on stderr (no
warning, e.g. torch's "Failed to initialize NumPy" when numpy is missing); no network.

How the fresh environment gets torch & co. without a network: the test runs in an
environment that has fusedce's dependencies installed (CI installs torch, then
``pip install -e ".[dev]"``). From it, the test takes exactly the distributions that the
*built wheel's own* ``Requires-Dist`` asks for, and what those require in turn (markers
evaluated), and links their top-level packages and ``.dist-info`` folders into one folder,
which a ``.pth`` file puts on the fresh environment's ``sys.path``. Nothing else of the
running environment is visible there (no numpy unless it is declared, no fusedce itself, no
pip or setuptools of its own: the venv is made without pip). Then the running pip installs
the wheel into it (``pip --python <venv python> install --no-index``, pip >= 22.3), with no
index, no find-links and no pip configuration: every declared dependency must already be
there, and one the package imports but does not declare is missing at run time. So the
test checks "declare what the package imports" too: it also imports every module of the
installed package, with Triton's interpreter on (which imports numpy). It takes 8-15 s
on 2 cores (no download, no copy of torch: symlinks).
"""

import hashlib
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import venv
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # builds a wheel, makes a venv, installs, runs the demo

ROOT = Path(__file__).resolve().parent.parent
BPE_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
# what pip, the demo and the import check may not see from the running environment
HIDDEN_VARS = ("PYTHONPATH", "PYTHONHOME", "PYTHONWARNINGS", "PYTHONSTARTUP", "PYTHONUSERBASE",
               "FUSEDCE_GPT2_BPE", "TRITON_INTERPRET", "VIRTUAL_ENV")


def _requirement_class():
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pip vendors it
        from pip._vendor.packaging.requirements import Requirement
    return Requirement


def _clean_env(**changes):
    env = {k: v for k, v in os.environ.items()
           if k not in HIDDEN_VARS and not k.startswith("PIP_")}
    env.update(changes)
    return env


def _top_levels(dist):
    """The top-level names a distribution installs (packages, modules, ``*.libs`` folders)
    and its ``.dist-info`` folder, as paths in the running environment."""
    site = Path(dist.locate_file(""))
    names = set()
    for f in dist.files or []:
        if f.parts and f.parts[0] not in ("..", "__pycache__") and not f.parts[0].endswith(
                ".pth"):
            names.add(f.parts[0])
    if not names:
        raise AssertionError(f"{dist.metadata['Name']} lists no files (no RECORD)")
    return [site / name for name in sorted(names) if (site / name).exists()]


def _dependency_closure(requires):
    """The installed distributions that ``requires`` (Requires-Dist lines) need, with
    their own dependencies, markers evaluated for this interpreter."""
    Requirement = _requirement_class()
    todo = [(r, "") for r in requires]
    seen = {}
    while todo:
        line, extra = todo.pop()
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        key = re.sub(r"[-_.]+", "-", req.name).lower()
        if key in seen:
            continue
        try:
            dist = importlib.metadata.distribution(req.name)
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"{req.name}, a dependency of fusedce, is not installed in the "
                        "environment running the tests (pip install -e '.[dev]')")
        seen[key] = dist
        for sub in dist.requires or []:
            todo.append((sub, ""))
            todo.extend((sub, e) for e in req.extras)
    return seen


def _build_wheel(tmp_path):
    """The wheel of a copy of the checkout (build artefacts left out, so that a stale
    build/ of an earlier build cannot slip old files in)."""
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache",
        ".hypothesis", ".benchmarks", "*.pyc"))
    dist = tmp_path / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-index",
         "--no-build-isolation", "--wheel-dir", str(dist), str(src)],
        capture_output=True, text=True, timeout=300,
        env=_clean_env(PIP_CONFIG_FILE=os.devnull, PIP_NO_INPUT="1"))
    if build.returncode != 0 and "setuptools" in build.stderr and "No module" in build.stderr:
        pytest.skip("setuptools is not importable here: cannot build without isolation")
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = dist.glob("fusedce-*.whl")
    return wheel


def _source_version():
    text = (ROOT / "fusedce" / "__init__.py").read_text(encoding="utf-8")
    return re.search(r'^__version__ = "([^"]+)"$', text, re.M)[1]


def _check_wheel_contents(wheel):
    """The wheel's metadata and files: returns its Requires-Dist lines."""
    version = _source_version()
    assert wheel.name.startswith(f"fusedce-{version}-")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        info = f"fusedce-{version}.dist-info"
        meta = Parser().parsestr(zf.read(f"{info}/METADATA").decode())
        licence = next(n for n in names if n.startswith(f"{info}/") and "LICENSE" in n)
        assert "Copyright (c) 2026 the fusedce authors" in zf.read(licence).decode()
        bpe = zf.read("fusedce/app/data/gpt2.tiktoken")
        assert hashlib.sha256(bpe).hexdigest() == BPE_SHA256
        assert BPE_SHA256 in zf.read("fusedce/app/data/README.md").decode()
    assert meta["Version"] == version and meta["License-File"] == "LICENSE"
    assert not any(n.startswith(("tests/", "bench/", "kernels/")) for n in names)
    return meta.get_all("Requires-Dist") or []


def test_plain_install_runs_the_demo_offline_with_nothing_on_stderr(tmp_path):
    pip_version = tuple(int(p) for p in importlib.metadata.version("pip").split(".")[:2])
    if pip_version < (22, 3):
        pytest.skip("needs pip >= 22.3 (pip --python)")
    wheel = _build_wheel(tmp_path)
    requires = _check_wheel_contents(wheel)

    # the declared dependencies, and theirs, from the running environment: links only
    deps = tmp_path / "deps"
    deps.mkdir()
    for dist in _dependency_closure(requires).values():
        for path in _top_levels(dist):
            if not (deps / path.name).exists():
                (deps / path.name).symlink_to(path, target_is_directory=path.is_dir())
    assert not (deps / "fusedce").exists()

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=os.name != "nt").create(env_dir)
    bindir = "Scripts" if os.name == "nt" else "bin"
    python = env_dir / bindir / ("python.exe" if os.name == "nt" else "python")
    where = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib')); "
         "print(sysconfig.get_path('scripts'))"],
        capture_output=True, text=True, timeout=60, env=_clean_env(), check=True)
    purelib, scripts = map(Path, where.stdout.splitlines())
    (purelib / "fusedce_test_deps.pth").write_text(f"{deps}\n")

    # no index, no find-links, no pip configuration: nothing may be fetched
    offline = _clean_env(PIP_CONFIG_FILE=os.devnull, PIP_NO_INPUT="1",
                         HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9",
                         http_proxy="http://127.0.0.1:9", https_proxy="http://127.0.0.1:9")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index",
         "--no-cache-dir", str(wheel)],
        capture_output=True, text=True, timeout=300, env=offline)
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]

    # a folder outside the checkout, and a tiktoken cache that holds no GPT-2 download
    work = tmp_path / "elsewhere"
    work.mkdir()
    run_env = dict(offline, TIKTOKEN_CACHE_DIR=str(tmp_path / "tiktoken-cache"))

    # every module of the installed package imports, Triton's interpreter on (numpy)
    code = ("import importlib, pkgutil, fusedce, fusedce.app.tokenizer as t; "
            "[importlib.import_module(m.name) for m in "
            "pkgutil.walk_packages(fusedce.__path__, 'fusedce.') "
            "if not m.name.endswith('__main__')]; "
            "print(fusedce.__file__); print(fusedce.__version__); print(t._PACKAGED_FILE)")
    probe = subprocess.run([str(python), "-c", code], capture_output=True, text=True,
                           cwd=work, env=dict(run_env, TRITON_INTERPRET="1"), timeout=300)
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert probe.stderr == ""
    fusedce_file, version, bpe_file = probe.stdout.split()
    assert Path(fusedce_file).is_relative_to(env_dir), fusedce_file  # not the checkout
    assert version == _source_version()
    assert Path(bpe_file).is_relative_to(env_dir) and Path(bpe_file).is_file()

    # what a newcomer runs, from the console script pip made
    demo = subprocess.run([str(scripts / "fusedce"), "demo"], capture_output=True, text=True,
                          cwd=work, env=run_env, timeout=300)
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert demo.stderr == ""
    assert f"fusedce {version} demo" in demo.stdout
    assert "[16833, 3626, 6100, 345]" in demo.stdout  # "every effort moves you"
    assert "[40, 1107, 588, 11311]" in demo.stdout  # "I really like chocolate"
    assert not (tmp_path / "tiktoken-cache").exists()  # tiktoken downloaded nothing
