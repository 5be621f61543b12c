"""``python -m bench``: fusedce's cross-entropy against its peers over a sweep of token counts.

At V = 50,257 for each dtype (fp32, bf16) and pass (forward; forward+backward) it times every
case of ``bench.ce`` (interleaved, medians, ratios within the run), measures its peak memory
(a fresh subprocess per case on the CPU) and writes into ``--out`` (default ``bench/out/``,
untracked; ``--out bench/results`` replaces the figures the README cites, on purpose only):

- ``ce_<device>.csv``: every row;
- ``ce_<device>.md``: the headline table (largest token count) and the full one, with the
  machine, dtype and shape beside each figure;
- ``ce_<device>.png``: time and peak memory against tokens (on a GPU also the fraction of the
  measured copy bandwidth).

``--quick`` is a smaller sweep; ``--linear`` adds the fused linear + cross-entropy case of
``bench.linear`` (when that module exists) to the Markdown report.
"""

import argparse
import csv
import datetime
import json
import os
import sys

import torch

from bench.output import DEFAULT_OUT, check_out_dir, device, missing_extras, positive_int


def _parse_args(argv):
    from bench.ce import CASES, PASSES

    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default=None,
                   help="comma-separated token counts (default: 256,512,1024,2048; "
                        "--quick: 512,2048)")
    p.add_argument("--vocab", type=int, default=50_257,
                   help="vocabulary size, the logits' width (default: %(default)s)")
    p.add_argument("--dtypes", default="fp32,bf16",
                   help="comma-separated logits dtypes (default: %(default)s)")
    p.add_argument("--passes", default=",".join(PASSES),
                   help="comma-separated passes (default: %(default)s)")
    p.add_argument("--cases", default=",".join(CASES),
                   help="comma-separated cases; unavailable peers are skipped "
                        "(default: %(default)s)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed rounds (default: 5; --quick: 3)")
    p.add_argument("--warmup", type=positive_int, default=1,
                   help="untimed rounds first, at least 1: torch.compile compiles in the "
                        "first (default: %(default)s)")
    p.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available()
                   else "cpu", help="cpu or cuda[:N] (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--quick", action="store_true",
                   help="tokens 512,2048 and 3 repeats (unless given)")
    p.add_argument("--memory", choices=("all", "largest", "none"), default="largest",
                   help="token counts whose peak memory is measured (default: %(default)s)")
    p.add_argument("--linear", action="store_true",
                   help="also run bench.linear (fused linear + cross-entropy), if present")
    p.add_argument("--logits", default=None, metavar="MEAN,STD",
                   help="the logits' normal distribution (default: 0,2; a pretrained "
                        "GPT-2's are near -60,3)")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                   help="folder for ce_<device>.{csv,md,png}, made if need be (default: "
                        "bench/out/ beside this file, untracked; --out bench/results "
                        "replaces the README's figures)")
    p.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.memory_probe:  # before any work: where the results go, what draws them
        problem = check_out_dir(args.out)
        if problem:
            p.error(problem)
        missing = missing_extras()
        if missing:
            p.error(f"needs {' and '.join(missing)}, not installed: "
                    f"pip install {' '.join(missing)} (or: pip install -e \".[bench]\")")
    if args.tokens is None:
        args.tokens = "512,2048" if args.quick else "256,512,1024,2048"
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    return args


def _set_logits(args):
    if args.logits:  # read by bench.ce.make_inputs, here and in the memory probes
        mean, std = (float(v) for v in args.logits.split(","))
        os.environ["FUSEDCE_BENCH_LOGITS"] = f"{mean},{std}"


def _set_threads(args):
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["FUSEDCE_BENCH_THREADS"] = str(args.threads)  # for the memory probes
    elif os.environ.get("FUSEDCE_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["FUSEDCE_BENCH_THREADS"]))


COLUMNS = ["device", "dtype", "tokens", "vocab", "pass", "case", "time_ms", "speedup_vs_eager",
           "speedup_vs_compile", "model_bytes", "gbps", "pct_of_copy", "extra_mib",
           "extra_pct_of_logits", "served_by"]

HEADS = {"time_ms": "time (ms)", "speedup_vs_eager": "x eager", "speedup_vs_compile":
         "x compile", "gbps": "GB/s (byte model)", "pct_of_copy": "% of copy",
         "extra_mib": "peak above inputs+grad (MiB)",
         "extra_pct_of_logits": "... % of logits", "served_by": "served by"}


def _fmt(v):
    return "" if v is None else str(v)


def markdown_table(rows, cols):
    lines = ["| " + " | ".join(HEADS.get(c, c) for c in cols) + " |",
             "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def headline(rows):
    """The rows at the largest token count, ordered dtype, pass, case."""
    if not rows:
        return []
    n = max(r["tokens"] for r in rows)
    return [r for r in rows if r["tokens"] == n]


def write_markdown(path, rows, meta, skipped, linear_md=None):
    cols = ["dtype", "tokens", "vocab", "pass", "case", "time_ms", "speedup_vs_eager",
            "speedup_vs_compile", "gbps", "pct_of_copy", "extra_mib", "extra_pct_of_logits"]
    if all(r["pct_of_copy"] is None for r in rows):
        cols.remove("pct_of_copy")
    if any(r.get("served_by") for r in rows):  # fusedce rows that are PyTorch's loss
        cols.insert(cols.index("case") + 1, "served_by")
    out = [f"# Cross-entropy benchmark: {meta['device']}", "",
           f"- machine: {meta['device']}; torch {meta['torch']}; {meta['date']}",
           f"- command: `{meta['command']}`",
           f"- load average (1 min) at the start and the end: {meta['load']} (other work on "
           "the machine slows every case; the ratios are within one run)",
           f"- copy bandwidth (logits-sized `copy_`, fp32): {meta['copy_gbps']} GB/s",
           "- times: medians of interleaved runs in one process; `x eager` / `x compile`: "
           "how many times faster than that peer in the same run",
           "- memory: peak above the inputs and the gradient the step produces, one fresh "
           "subprocess per case (CPU) or `max_memory_allocated` (CUDA)",
           "- logits ~ N({}, {}), targets uniform".format(*meta["logits"]), ""]
    if skipped:
        out += ["Not run: " + "; ".join(f"{c}: {why}" for c, why in sorted(skipped.items())), ""]
    out += ["## At the largest token count", "", markdown_table(headline(rows), cols), "",
            "## All sizes", "", markdown_table(rows, cols), ""]
    if linear_md:
        out += ["## Fused linear + cross-entropy (`bench.linear`)", "", linear_md, ""]
    with open(path, "w") as f:
        f.write("\n".join(out))


def write_plot(path, rows, meta):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cuda = any(r["pct_of_copy"] is not None for r in rows) and "cuda" in meta["device_kind"]
    panels = [("time_ms", "fwd_bwd", "forward+backward time (ms)"),
              ("time_ms", "fwd", "forward time (ms)"),
              ("extra_mib", "fwd_bwd", "fwd+bwd peak above inputs+grad (MiB)")]
    if cuda:
        panels.append(("pct_of_copy", "fwd_bwd", "fwd+bwd % of copy bandwidth"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4))
    styles = {"fp32": "-", "bf16": "--"}
    cases = sorted({r["case"] for r in rows})
    colors = {c: f"C{i}" for i, c in enumerate(cases)}
    for ax, (key, pass_, title) in zip(axes, panels):
        for dtype in sorted({r["dtype"] for r in rows}):
            for case in cases:
                pts = sorted((r["tokens"], r[key]) for r in rows
                             if r["case"] == case and r["dtype"] == dtype
                             and r["pass"] == pass_ and r[key] is not None)
                if pts:
                    ax.plot([p[0] for p in pts], [max(p[1], 1e-3) if key == "extra_mib"
                                                  else p[1] for p in pts],
                            styles.get(dtype, ":"), marker="o", color=colors[case],
                            label=f"{case} {dtype}")
        ax.set_xscale("log", base=2)
        if key != "pct_of_copy":
            ax.set_yscale("log")
        ax.set_xlabel(f"tokens (V = {rows[0]['vocab']:,})")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    if axes[0].get_legend_handles_labels()[0]:  # (a pass not run leaves a panel empty)
        axes[0].legend(fontsize=7)
    fig.suptitle(f"Cross-entropy, {meta['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _memory_probe(spec):
    from bench.ce import Unavailable, memory_probe

    case, pass_, tokens, vocab, dtype = json.loads(spec)
    try:
        extra = memory_probe(case, pass_, tokens, vocab, dtype)
    except Unavailable as e:
        print(f"Unavailable: {e}", file=sys.stderr)
        sys.exit(3)
    print(json.dumps({"extra_bytes": extra}))


def main(argv=None):
    args = _parse_args(argv)
    _set_threads(args)
    _set_logits(args)
    if args.memory_probe:
        return _memory_probe(args.memory_probe)

    from tqdm import tqdm

    from bench.ce import copy_bandwidth, device_name, logits_distribution, run_case_set

    tokens = [int(n) for n in args.tokens.split(",")]
    dtypes = args.dtypes.split(",")
    passes = args.passes.split(",")
    cases = args.cases.split(",")
    device = args.device
    load_start = _loadavg()
    copy_bps = copy_bandwidth(max(tokens), args.vocab, "fp32", device)
    rows, skipped = [], {}
    combos = [(n, d, p) for d in dtypes for p in passes for n in tokens]
    for n, dtype, pass_ in tqdm(combos, desc="bench", unit="set"):
        memory = args.memory == "all" or (args.memory == "largest" and n == max(tokens))
        got, why = run_case_set(n, dtype, pass_, cases, args.vocab, device, args.repeats,
                                args.warmup, memory, copy_bps)
        rows += got
        skipped.update(why)
    kind = torch.device(device).type
    meta = {"device": device_name(device), "device_kind": kind, "torch": torch.__version__,
            "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "command": "python -m bench " + " ".join(sys.argv[1:] if argv is None else argv),
            "copy_gbps": round(copy_bps / 1e9, 1), "load": f"{load_start} -> {_loadavg()}",
            "logits": logits_distribution()}
    linear_md = None
    if args.linear:
        linear_md = _run_linear(device, args)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"ce_{kind}")
    with open(stem + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    write_markdown(stem + ".md", rows, meta, skipped, linear_md)
    write_plot(stem + ".png", rows, meta)
    cols = ["dtype", "tokens", "pass", "case", "time_ms", "speedup_vs_eager",
            "speedup_vs_compile", "gbps", "extra_mib", "extra_pct_of_logits"]
    print(markdown_table(headline(rows), cols))
    if skipped:
        print("not run: " + "; ".join(f"{c}: {why}" for c, why in sorted(skipped.items())))
    print(f"wrote {stem}.csv, {stem}.md, {stem}.png")


def _loadavg():
    try:
        return round(os.getloadavg()[0], 1)
    except (OSError, AttributeError):
        return None


def _run_linear(device, args):
    try:
        from bench import linear
    except ImportError:
        print("--linear: bench/linear.py is not there; skipped", file=sys.stderr)
        return None
    n = 2048 if args.quick else 8192
    rows = linear.run(tokens=n, vocab=args.vocab, device=device, repeats=args.repeats,
                      memory=args.memory != "none")
    return linear.format_table(rows)


if __name__ == "__main__":
    main()
