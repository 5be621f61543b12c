"""PyTorch's FSDP2 with fusedce, on CPU processes (gloo) under ``torchrun``, each run bounded
by a timeout so that a hung collective fails instead of blocking:

- ``examples/fsdp_vocab_parallel.py``: a tiny GPT whose blocks FSDP2 shards and whose LM head
  is a vocabulary-sharded DTensor under ``fusedce.linear_cross_entropy``, on 2 and 3 processes
  (3 split GPT-2's vocabulary unevenly): the losses of the unsharded run with
  ``F.cross_entropy`` on full logits;
- ``tests/fsdp_hf_train.py``: a Hugging Face GPT-2 with ``fusedce.hf.apply`` wrapped with
  ``fully_shard`` on 2 processes: the losses of the unsharded model with its own loss.
"""

import os
import subprocess
import sys

import pytest

pytest.importorskip("torch.distributed.fsdp")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 240


def _losses(args, procs=None):
    cmd = [sys.executable] + (["-m", "torch.distributed.run", f"--nproc-per-node={procs}",
                               "--standalone"] if procs else []) + args
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=ROOT,
                          env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (line,) = [s for s in done.stdout.splitlines() if s.startswith("losses")]
    return [float(v) for v in line.split()[1:]]


@pytest.mark.slow
@pytest.mark.parametrize("procs", [2, 3])
def test_example_fsdp_with_vocab_sharded_head(procs):
    script = os.path.join("examples", "fsdp_vocab_parallel.py")
    single = _losses([script, "--single"])
    sharded = _losses([script], procs)
    assert single[-1] < single[0] - 0.1  # it trains
    assert sharded == pytest.approx(single, rel=1e-5, abs=1e-5)


@pytest.mark.slow
def test_example_refuses_bad_runs_in_one_line():
    """Found walking the README: without torchrun, ``--cuda`` without CUDA, ``--single
    --cuda`` (which ran on the CPU) and ``--steps 0`` (a bare "losses") each end with one
    usage error, status 2, before any work."""
    import torch

    script = os.path.join("examples", "fsdp_vocab_parallel.py")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    cases = [([], "torchrun"), (["--single", "--cuda"], "--single"),
             (["--single", "--steps", "0"], "--steps")]
    if not torch.cuda.is_available():
        cases.append((["--cuda"], "CUDA is not available"))
    for args, words in cases:
        done = subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                              timeout=TIMEOUT_S, cwd=ROOT, env={**env, "PYTHONPATH": ROOT})
        last = done.stderr.rstrip().splitlines()[-1]
        assert done.returncode == 2 and "Traceback" not in done.stderr, (args, done.stderr)
        assert last.startswith("fsdp_vocab_parallel.py: error:") and words in last, (args, last)


@pytest.mark.slow
def test_hf_apply_under_fsdp2():
    pytest.importorskip("transformers")
    script = os.path.join("tests", "fsdp_hf_train.py")
    single = _losses([script, "--single"])
    sharded = _losses([script], 2)
    assert single[-1] < single[0] - 0.1
    assert sharded == pytest.approx(single, rel=1e-5, abs=1e-5)
