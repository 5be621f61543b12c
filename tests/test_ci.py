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
