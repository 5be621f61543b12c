"""The agreement figures of tests/test_distributed.py's cases: each named case run on its
gloo processes (CPU), its largest relative errors over the ranks printed (loss; gradient
relative to the largest reference entry; aux outputs where the case has them).

    python -m bench.distributed_errors shift-1000 triton-shift-1e6 dt-vocab-shift-1e4
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))


def main(argv=None):
    import test_distributed as T  # sets TRITON_INTERPRET without a GPU, as the tests do

    groups = {2: T.CASES_2, 3: T.CASES_3, 4: T.CASES_4}
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="+", help="case ids of tests/test_distributed.py")
    args = parser.parse_args(argv)
    known = {c.id for cases in groups.values() for c in cases}
    unknown = sorted(set(args.cases) - known)
    if unknown:
        parser.error(f"unknown cases: {', '.join(unknown)}")
    for world, cases in groups.items():
        chosen = [c for c in cases if c.id in args.cases]
        if not chosen:
            continue
        results = T._run_group(world, chosen)
        for case in chosen:
            per_rank = [rank[case.id] for rank in results]
            if any("error" in r for r in per_rank):
                print(case.id, "failed:", next(r["error"] for r in per_rank if "error" in r))
                continue
            errs = {k: max(r[k] for r in per_rank) for k in per_rank[0] if k.endswith("_err")}
            print(f"{case.id} ({world} ranks): "
                  + ", ".join(f"{k[:-4]} {v:.1e}" for k, v in errs.items()))


if __name__ == "__main__":
    main()
