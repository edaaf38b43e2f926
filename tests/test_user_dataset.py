"""A user dataset in the documented format goes through the gate, SFT, RL and eval without code changes.

The dataset is "handwritten" digits: strokes drawn with jitter, one digit per image, asked as
"What digit is written in the image?" with the digit as the verifiable answer.
"""

import json
import random
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from step3vl import config
from step3vl.config import PipelineConfig

ROOT = Path(__file__).resolve().parent.parent

# seven-segment-like stroke paths per digit, in a unit box (x, y)
STROKES = {
    0: [[(0.2, 0.1), (0.8, 0.1), (0.8, 0.9), (0.2, 0.9), (0.2, 0.1)]],
    1: [[(0.5, 0.1), (0.5, 0.9)], [(0.35, 0.25), (0.5, 0.1)]],
    2: [[(0.2, 0.1), (0.8, 0.1), (0.8, 0.5), (0.2, 0.5), (0.2, 0.9), (0.8, 0.9)]],
    3: [[(0.2, 0.1), (0.8, 0.1), (0.8, 0.9), (0.2, 0.9)], [(0.3, 0.5), (0.8, 0.5)]],
    4: [[(0.2, 0.1), (0.2, 0.5), (0.8, 0.5)], [(0.75, 0.1), (0.75, 0.9)]],
    5: [[(0.8, 0.1), (0.2, 0.1), (0.2, 0.5), (0.8, 0.5), (0.8, 0.9), (0.2, 0.9)]],
    6: [[(0.8, 0.1), (0.2, 0.1), (0.2, 0.9), (0.8, 0.9), (0.8, 0.5), (0.2, 0.5)]],
    7: [[(0.2, 0.1), (0.8, 0.1), (0.4, 0.9)]],
    8: [[(0.2, 0.1), (0.8, 0.1), (0.8, 0.9), (0.2, 0.9), (0.2, 0.1)], [(0.2, 0.5), (0.8, 0.5)]],
    9: [[(0.8, 0.5), (0.2, 0.5), (0.2, 0.1), (0.8, 0.1), (0.8, 0.9), (0.2, 0.9)]],
}


def handwritten_digit(d: int, rng: random.Random, size: int = 64) -> Image.Image:
    img = Image.new("L", (size, size), 255)
    draw = ImageDraw.Draw(img)
    for path in STROKES[d]:
        pts = [((x + rng.uniform(-0.05, 0.05)) * size, (y + rng.uniform(-0.05, 0.05)) * size) for x, y in path]
        draw.line(pts, fill=rng.randint(0, 60), width=rng.randint(4, 7), joint="curve")
    return img


def write_user_dataset(root: Path, split: str, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True)
    with (root / "part-0.jsonl").open("w") as f:
        for i in range(n):
            d = rng.randrange(10)
            name = f"images/{split}-{i}.png"
            handwritten_digit(d, rng).save(root / name)
            f.write(json.dumps({
                "id": f"hw-{split}-{i}", "task": "handwritten_digit", "split": split, "images": [name],
                "messages": [{"role": "user", "content": "<image>\nWhat digit is written in the image?"},
                             {"role": "assistant", "content": f"<think>it looks like {d}</think>{d}"}],
                "answer": str(d), "reward": "math_numeric",
            }) + "\n")
    return root


@pytest.mark.slow
def test_user_dataset_through_gate_sft_rl_and_eval(tmp_path):
    from step3vl.data.gate import validate_dataset
    from step3vl.stages import data, evaluate
    from step3vl.stages.rl import run_rl
    from step3vl.stages.train import run_training

    train = write_user_dataset(tmp_path / "hw-train", "train", 120, 1)
    held = write_user_dataset(tmp_path / "hw-eval", "eval", 30, 2)
    assert validate_dataset(train, require_answer=True).passed
    cfg = config.load(PipelineConfig, ROOT / "tests/conf/micro.yaml", [
        f"data.sets.hw_sft={{purpose: sft, path: {train}}}",
        f"data.sets.hw_rl={{purpose: rl, path: {train}}}",
        f"data.sets.hw_eval={{purpose: eval, split: eval, path: {held}}}",
        "sft.phases=[{data: hw_sft, steps: 3, lr_start: 1.0e-3, lr_end: 5.0e-4}]",
        "sft.eval_data=hw_eval",
        "rlvr.data=hw_rl", "rlvr.iterations=1", "rlvr.prompts_per_iteration=4", "rlvr.rollouts=2",
    ])
    prep = data.run(cfg, tmp_path / "data", progress=False)
    assert prep.manifest["sets"]["hw_sft"]["gate"]["passed"]
    assert prep.manifest["sets"]["hw_sft"]["rows_per_task"] == {"handwritten_digit": 120}
    sft = run_training("sft", cfg, prep.out_dir, str(tmp_path / "sft"), progress=False)
    assert sft.result.step == 3
    rl = run_rl("rlvr", cfg, prep.out_dir, sft.model_uri, str(tmp_path / "rlvr"), progress=False)
    assert rl.result.iteration == 1 and "handwritten_digit/reward_mean" in rl.result.history[0]
    ev = evaluate.run(cfg, prep.out_dir, rl.model_uri, tmp_path / "eval", dataset="hw_eval", progress=False)
    # every eval record of the user set, or the config's per-family cap when it sets one
    assert ev.metrics["greedy/handwritten_digit/n"] == min(30, cfg.eval.per_family or 30)
    assert "handwritten_digit" in ev.report.read_text()
