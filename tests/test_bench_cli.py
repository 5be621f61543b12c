"""``python -m bench`` end to end on a tiny sweep (the README's benchmark command; the
figures themselves are measured by hand, not in the test suite), and its ``--logits``
option (passed on through the environment, which the memory probes' subprocesses
inherit; what they measure is not checked here)."""

import csv
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_bench_runs_end_to_end_with_a_logits_level(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    env.pop("FUSEDCE_BENCH_LOGITS", None)
    cmd = [sys.executable, "-m", "bench", "--tokens", "8", "--vocab", "300", "--dtypes",
           "fp32,bf16", "--passes", "fwd,fwd_bwd", "--cases", "eager,fusedce,fusedce_inplace",
           "--repeats", "1", "--memory", "largest", "--logits=-60,3", "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "ce_cpu.csv")))
    # fwd: eager, fusedce (the in-place case has no forward alone); fwd_bwd: all three
    assert len(rows) == 2 * (2 + 3)
    assert all(float(r["time_ms"]) > 0 and r["extra_mib"] != "" for r in rows)
    md = (tmp_path / "ce_cpu.md").read_text()
    assert "logits ~ N(-60.0, 3.0)" in md and "| fusedce_inplace |" in md
    assert (tmp_path / "ce_cpu.png").stat().st_size > 0


def test_make_inputs_follows_the_logits_level(monkeypatch):
    from bench.ce import make_inputs

    monkeypatch.setenv("FUSEDCE_BENCH_LOGITS", "-60,3")
    x, t = make_inputs(64, 1000)
    assert abs(x.mean().item() + 60) < 0.1 and abs(x.std().item() - 3) < 0.1
    monkeypatch.delenv("FUSEDCE_BENCH_LOGITS")
    x, _ = make_inputs(64, 1000)
    assert abs(x.mean().item()) < 0.1 and abs(x.std().item() - 2) < 0.1
    assert t.dtype == torch.int64
