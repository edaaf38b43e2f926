"""PaCoRe's test-time scaling: accuracy against the number of parallel rollouts (1, 2, 4, 8, 16).

For each K the same held-out records are answered three ways from one model: PaCoRe([K]) (K parallel
responses, then the synthesis), majority@K (voting over K samples) and pass@K (any of K right, the
ceiling both draw on). One plot shows the three curves per reasoning family.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from step3vl.rl.rollout import SamplingParams


def scaling_curve(engine: Any, records: list[dict[str, Any]], dataset_dir: str | Path, ks: Sequence[int],
                  params: SamplingParams, *, seed: int = 0, progress: bool = False) -> dict[str, dict[str, list[float]]]:
    """``{family: {"k": ks, "pacore": [...], "majority": [...], "pass": [...]}}`` (accuracies in [0, 1])."""
    from step3vl.eval.suite import is_correct, to_prompt
    from step3vl.pacore.inference import majority_vote, pacore_generate
    from step3vl.progress import track
    from step3vl.rl.rewards import score

    prompts = [to_prompt(r, dataset_dir) for r in records]
    fams = sorted({r["task"] for r in records})
    out = {f: {"k": [float(k) for k in ks], "pacore": [], "majority": [], "pass": []} for f in fams}
    for k in track(list(ks), f"pacore scaling {list(ks)}", enabled=progress, unit="K"):
        sp = replace(params, seed=None if params.seed is None else params.seed + 7 * k)
        res = pacore_generate(engine, prompts, [k], sp, seed=seed)
        samples = engine.generate(prompts, k, replace(sp, seed=None if sp.seed is None else sp.seed + 1))
        for fam in fams:
            idx = [i for i, r in enumerate(records) if r["task"] == fam]
            ok = lambda r, c: is_correct(r, score(c.text, r))  # noqa: E731
            out[fam]["pacore"].append(sum(ok(records[i], res[i].completion) for i in idx) / len(idx))
            out[fam]["majority"].append(sum(ok(records[i], samples[i][majority_vote([c.text for c in samples[i]])])
                                            for i in idx) / len(idx))
            out[fam]["pass"].append(sum(any(ok(records[i], c) for c in samples[i]) for i in idx) / len(idx))
    return out


def plot_scaling(curves: dict[str, dict[str, list[float]]], path: str | Path, title: str = "PaCoRe scaling") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.8), squeeze=False)
    for ax, (fam, c) in zip(axes[0], curves.items()):
        for key, style in (("pacore", "-o"), ("majority", "--s"), ("pass", ":^")):
            ax.plot(c["k"], [100 * v for v in c[key]], style, label=key if key != "pass" else "pass@K")
        ax.set_xscale("log", base=2)
        ax.set_xticks(c["k"], [str(int(k)) for k in c["k"]])
        ax.set_xlabel("parallel rollouts K")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"{title}: {fam}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
