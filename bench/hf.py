"""``python -m bench.hf``: a Hugging Face GPT-2 training step with ``fusedce.hf.apply`` against
the unpatched model, on the CPU: peak extra memory and time.

The model: GPT-2's vocabulary (50,257), hidden 256, 2 layers, random weights; a step is
forward with ``labels`` and backward, batch 4 x 512 tokens, fp32. Memory: each case in a
fresh subprocess, the peak resident memory of one step above what the process held before it
(after a warm-up step whose gradients were freed). Time: both models in one process, steps
interleaved, medians; the ratio fusedce / unpatched.

    python -m bench.hf                      # the issue's shape
    python -m bench.hf --batch 2 --tokens 256 --repeats 3
"""

import argparse
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build(args, apply):
    import transformers

    import fusedce.hf

    cfg = transformers.GPT2Config(vocab_size=50_257, n_positions=args.tokens, n_embd=args.hidden,
                                  n_layer=args.layers, n_head=4, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).train()
    model.loss_type = "ForCausalLM"  # the loss it computes; unset, transformers 5 warns
    ids = torch.randint(0, 50_257, (args.batch, args.tokens),
                        generator=torch.Generator().manual_seed(1))
    if apply:
        fusedce.hf.apply(model)
    return model, ids


def step(model, ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach()


def _status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def probe(args, apply):
    """In this fresh process: the peak RSS of one step above the RSS before it."""
    model, ids = build(args, apply)
    step(model, ids)  # warm-up: allocator, worker threads
    model.zero_grad(set_to_none=True)
    gc.collect()
    import fusedce

    fusedce.empty_cache()
    with open("/proc/self/clear_refs", "w") as f:  # VmHWM back to VmRSS
        f.write("5")
    base = _status_bytes("VmRSS")
    step(model, ids)
    return _status_bytes("VmHWM") - base


def memory(args, apply):
    cmd = [sys.executable, "-m", "bench.hf", "--probe", "fusedce" if apply else "unpatched",
           "--batch", str(args.batch), "--tokens", str(args.tokens), "--hidden",
           str(args.hidden), "--layers", str(args.layers)]
    # every large buffer a fresh mapping, counted in the peak whatever ran before
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_bytes"]


def timing(args):
    plain, ids = build(args, False)
    fused = copy.deepcopy(plain)
    import fusedce.hf

    fusedce.hf.apply(fused)
    step(plain, ids), step(fused, ids)
    times = {"unpatched": [], "fusedce": []}
    for i in range(args.repeats):
        order = [("unpatched", plain), ("fusedce", fused)][:: 1 if i % 2 == 0 else -1]
        for name, model in order:
            t0 = time.perf_counter()
            step(model, ids)
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.hf",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--probe", choices=["unpatched", "fusedce"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        print(json.dumps({"extra_bytes": probe(args, args.probe == "fusedce")}))
        return
    mem = {name: memory(args, name == "fusedce") for name in ("unpatched", "fusedce")}
    secs = timing(args)
    mib = 1 << 20
    print(f"GPT-2 (V 50,257, hidden {args.hidden}, {args.layers} layers), batch "
          f"{args.batch} x {args.tokens}, fp32, {torch.get_num_threads()} threads")
    print(f"peak extra memory: unpatched {mem['unpatched'] / mib:.1f} MiB, fusedce.hf "
          f"{mem['fusedce'] / mib:.1f} MiB ({mem['fusedce'] / mem['unpatched']:.3f})")
    print(f"step time (median of {args.repeats}): unpatched {secs['unpatched'] * 1e3:.1f} ms, "
          f"fusedce.hf {secs['fusedce'] * 1e3:.1f} ms "
          f"({secs['fusedce'] / secs['unpatched']:.3f})")


if __name__ == "__main__":
    main()
