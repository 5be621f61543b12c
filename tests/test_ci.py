"""What CI's run of the suite counts: ``.ci/run`` installs every optional dependency, so
under ``CI=true`` a skipped test fails the run (tests/conftest.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
@pytest.mark.parametrize("ci, returncode", [("true", 1), ("", 0)])
def test_a_skip_fails_the_run_under_ci(tmp_path, ci, returncode):
    """tests/conftest.py: with CI=true (.ci/run's machine, every extra installed) a skipped
    test is a check that did not run, and fails the run; elsewhere it stays a skip."""
    (tmp_path / "conftest.py").write_text((Path(__file__).parent / "conftest.py").read_text())
    (tmp_path / "test_one.py").write_text(
        "import pytest\n\ndef test_ran():\n    assert True\n\n"
        "def test_skipped():\n    pytest.skip('its module is not installed')\n")
    env = {**os.environ, "CI": ci}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert "1 passed, 1 skipped" in run.stdout, run.stdout + run.stderr
    assert run.returncode == returncode, run.stdout + run.stderr


def test_ci_runs_the_readmes_test_command():
    """The brief: CI runs the test command the README gives. ``.ci/run``'s last line is the
    command of the README's "as CI runs it" line, and the test extras install what it uses."""
    root = Path(__file__).resolve().parent.parent
    ci_command = (root / ".ci" / "run").read_text().strip().splitlines()[-1]
    readme = (root / "README.md").read_text()
    lines = [line.split("#")[0].strip() for line in readme.splitlines()
             if "# as CI runs it" in line]
    assert lines == [ci_command]
    if "-n " in ci_command:
        assert "pytest-xdist" in (root / "setup.py").read_text()
