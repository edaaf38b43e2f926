"""``make bench``: run every registered benchmark in this process, write bench/results.json and
regenerate BENCHMARKS.md from it.

    python bench/run.py                 # everything (what `make bench` runs)
    python bench/run.py --only mfu      # one entry, printed, results.json untouched
    python bench/run.py --quick         # fewer repetitions, for developing an entry
    python bench/run.py --only pacore --update   # re-measure entries into bench/results.json
    python bench/run.py --merge a.json b.json    # entries of --only … --out runs into results.json

``--update`` keeps every other entry of results.json as its run measured it, records when and under
what load the re-measured ones ran, and regenerates BENCHMARKS.md; a full ``make bench`` on a quiet
machine is still the reference.
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
    p.add_argument("--update", action="store_true",
                   help="with --only: replace those entries in bench/results.json, keep the others")
    p.add_argument("--merge", nargs="+", type=Path, default=[],
                   help="merge the entries of these results files (--only … --out runs) into bench/results.json "
                        "as --update would, without running anything")
    args = p.parse_args(argv)
    if args.merge:
        from bench import registry, render

        order, merged = list(registry.discover()), json.loads(RESULTS.read_text())
        for f in args.merge:
            new = json.loads(f.read_text())
            if new.get("quick"):
                p.error(f"{f} is from a --quick run")
            merged = _merged(merged, new, order)
        RESULTS.write_text(json.dumps(merged, indent=1) + "\n")
        render.write(RESULTS, render.MARKDOWN)
        print(f"wrote {RESULTS} and {render.MARKDOWN}")
        return 0
    if args.update and (not args.only or args.quick or args.out):
        p.error("--update needs --only and goes without --quick and --out")

    import torch

    from bench import registry
    from bench.context import Context
    from bench.machine import QUIET_SHARE, CpuSnapshot, machine_info, usable_cores

    entries = registry.discover()
    if args.list:
        for e in entries.values():
            print(f"{e.name:24s} {e.title}{'  (opt-in)' if e.opt_in else ''}")
        return 0
    unknown = [n for n in args.only if n not in entries]
    if unknown:
        p.error(f"unknown entr{'y' if len(unknown) == 1 else 'ies'} {', '.join(unknown)} (have: {', '.join(entries)})")
    chosen = [e for e in entries.values() if e.name in args.only or (not args.only and not e.opt_in)]
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
            t, la, snap_e = time.perf_counter(), os.getloadavg()[0], CpuSnapshot.take()
            try:
                res = e.fn(ctx).to_dict()
            except Exception:  # one broken entry must not hide the others' numbers
                traceback.print_exc()
                failed.append(e.name)
                res = {"error": traceback.format_exc(limit=3)}
            res.update(title=e.title, seconds=round(time.perf_counter() - t, 1), load_average=round(la, 2),
                       others_cpu_share=round(CpuSnapshot.take().others_share_since(snap_e), 3))
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
    if args.update:
        results = _merged(json.loads(RESULTS.read_text()), results, list(entries))
        out = RESULTS
    elif out == RESULTS and RESULTS.is_file():
        # a full run does not run the opt-in entries: keep their last results, with when they were measured
        previous = json.loads(RESULTS.read_text())
        kept = {n: previous["entries"][n] for n, e in entries.items() if e.opt_in and n in previous.get("entries", {})}
        if kept:
            carried = {**kept, **results["entries"]}
            results["entries"] = {n: carried[n] for n in entries if n in carried}
            results["carried_over"] = {n: next((u["at"] for u in reversed(previous.get("updates", []))
                                                if n in u["entries"]), previous.get("generated_at"))
                                       for n in kept}
    if out is not None:
        out.write_text(json.dumps(results, indent=1) + "\n")
        print(f"wrote {out}")
        if out == RESULTS:
            from bench import render

            render.write(RESULTS, render.MARKDOWN)
            print(f"wrote {render.MARKDOWN}")
    return 1 if failed else 0


def _merged(old: dict[str, Any], new: dict[str, Any], order: list[str]) -> dict[str, Any]:
    """``old`` with the entries of ``new`` replaced (registry order), and a note of the update."""
    entries = {**old["entries"], **new["entries"]}
    old["entries"] = {n: entries[n] for n in order if n in entries}
    old.setdefault("updates", []).append({
        "at": new["generated_at"], "entries": list(new["entries"]), "seconds": new["seconds"],
        "load_average_start": new["load_average_start"], "load_average_end": new["load_average_end"],
        "others_cpu_share": new["others_cpu_share"], "machine": new["machine"]})
    return old


if __name__ == "__main__":
    sys.exit(main())
