"""``make bench``: run every registered benchmark in this process, write bench/results.json and
regenerate BENCHMARKS.md from it.

    python bench/run.py                 # everything (what `make bench` runs)
    python bench/run.py --only mfu      # one entry, printed, results.json untouched
    python bench/run.py --quick         # fewer repetitions, for developing an entry
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script (`python bench/run.py`): make the repository root importable for `bench.*`
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from typing import Any  # noqa: E402

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results.json"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", default=[], help="run only this entry (repeatable)")
    p.add_argument("--quick", action="store_true", help="fewer repetitions; results are not written")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: usable cores)")
    p.add_argument("--out", type=Path, default=None,
                   help="results file (default: bench/results.json for a full run, none otherwise)")
    p.add_argument("--list", action="store_true", help="list the registered entries and exit")
    args = p.parse_args(argv)

    import torch

    from bench import registry
    from bench.context import Context
    from bench.machine import QUIET_SHARE, CpuSnapshot, machine_info, usable_cores

    entries = registry.discover()
    if args.list:
        for e in entries.values():
            print(f"{e.name:20s} {e.title}")
        return 0
    unknown = [n for n in args.only if n not in entries]
    if unknown:
        p.error(f"unknown entr{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)} (have: {', '.join(entries)})")
    chosen = [e for e in entries.values() if not args.only or e.name in args.only]
    full = not args.only and not args.quick
    out = args.out or (RESULTS if full else None)

    threads = args.threads or usable_cores()
    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("transformers", "accelerate", "step3vl"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    results: dict[str, Any] = {
        "schema": 1,
        "generated_at": datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat(),
        "quick": args.quick,
        "machine": machine_info(threads),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "quiet_share": QUIET_SHARE,
        "entries": {},
    }
    t_all, failed, snap = time.perf_counter(), [], CpuSnapshot.take()
    with tempfile.TemporaryDirectory(prefix="step3vl-bench-") as tmp:
        ctx = Context(Path(tmp), quick=args.quick)
        t = time.perf_counter()
        ctx.data  # noqa: B018  shared data prep, timed on its own
        results["data_prep_seconds"] = round(time.perf_counter() - t, 1)
        print(f"data prep: {results['data_prep_seconds']} s", flush=True)
        for e in chosen:
            print(f"== {e.name}: {e.title}", flush=True)
            t = time.perf_counter()
            try:
                res = e.fn(ctx).to_dict()
            except Exception:  # one broken entry must not hide the others' numbers
                traceback.print_exc()
                failed.append(e.name)
                res = {"error": traceback.format_exc(limit=3)}
            res.update(title=e.title, seconds=round(time.perf_counter() - t, 1))
            results["entries"][e.name] = res
            for k, f in res.get("figures", {}).items():
                print(f"   {k:32s} {f['median']:12.4g} {f['unit']}  (n={f['n']}, {f['min']:.4g}…{f['max']:.4g})")
            for k, r in res.get("ratios", {}).items():
                print(f"   {k:32s} {r['value']:12.4g}  (pairs {r['min']:.3g}…{r['max']:.3g}, target {r['target']})")
            print(f"   ({res['seconds']} s)", flush=True)
    results["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    results["seconds"] = round(time.perf_counter() - t_all, 1)
    results["others_cpu_share"] = round(CpuSnapshot.take().others_share_since(snap), 3)
    print(f"total {results['seconds']} s", flush=True)
    if out is not None:
        out.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {out}")
        if out == RESULTS:
            from bench import render

            render.write(RESULTS, render.MARKDOWN)
            print(f"wrote {render.MARKDOWN}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
