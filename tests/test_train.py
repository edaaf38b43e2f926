"""The one training loop: schedule, data order, packing isolation, every parameter trains, exact resume."""

import random
from pathlib import Path

import pytest
import torch
from sigkill import at_once, killed_and_rerun, published, stage_cmd, uninterrupted

from step3vl.config import PhaseConfig, TrainConfig
from step3vl.data.pack import PackedDataset
from step3vl.model.loading import new_model
from step3vl.model.processor import ImageProcessor
from step3vl.model.tokenizer import load_tokenizer
from step3vl.train.loop import RowSampler, forward_loss_sum, lr_at


def test_lr_schedule_warmup_then_cosine_per_phase():
    cfg = TrainConfig(warmup_steps=2, phases=(PhaseConfig(steps=5, lr_start=1.0, lr_end=0.5),
                                               PhaseConfig(steps=3, lr_start=0.4, lr_end=0.1)))
    steps = [5, 3]
    assert lr_at(cfg, 0, steps) == pytest.approx(0.5)  # warm-up: 1.0 * 1/2
    assert lr_at(cfg, 1, steps) == pytest.approx(min(1.0, 0.5 + 0.25 * (1 + 0.7071067811865476)))
    assert lr_at(cfg, 4, steps) == pytest.approx(0.5)  # end of phase 1
    assert lr_at(cfg, 5, steps) == pytest.approx(0.4)  # start of phase 2
    assert lr_at(cfg, 6, steps) == pytest.approx(0.25)  # midpoint of a 3-step cosine
    assert lr_at(cfg, 7, steps) == pytest.approx(0.1)


def test_steps_derived_from_tokens():
    cfg = TrainConfig(batch_size=4, seq_len=8)
    assert cfg.steps_for(PhaseConfig(tokens=320)) == 10
    assert cfg.steps_for(PhaseConfig(steps=3, tokens=320)) == 3


@pytest.fixture(scope="module")
def packed(micro_cfg, micro_data):
    proc = ImageProcessor(micro_cfg.model.vision)
    return PackedDataset(micro_data.packed("pretrain_broad"), proc), load_tokenizer(micro_data.tokenizer_dir)


def test_sampler_is_deterministic_and_resumable(packed):
    ds, _ = packed
    a, b = RowSampler(ds, 3), RowSampler(ds, 3)
    first = a.take(5)
    assert first == b.take(5)
    state = a.state_dict()
    rest = a.take(len(ds) + 7)  # crosses an epoch boundary
    c = RowSampler(ds, 3)
    c.load_state_dict(state)
    assert c.take(len(ds) + 7) == rest
    # one epoch visits every row exactly once
    d = RowSampler(ds, 4)
    assert sorted(d.take(len(ds))) == sorted((s, r) for s in range(ds.n_shards) for r in range(ds.shard_rows[s]))
    assert RowSampler(ds, 5).take(len(ds)) != RowSampler(ds, 4).take(len(ds))


def test_packed_samples_do_not_see_each_other(micro_cfg, packed):
    """A sample's logits are the same alone and packed behind other samples (mask + positions)."""
    ds, tok = packed
    torch.manual_seed(0)
    model = new_model(micro_cfg.model, tok, 0).eval()
    t = ds.shard(0)
    row = next(r for r in range(ds.shard_rows[0]) if int(t["segment_ids"][r].max()) >= 3)
    b = ds.batch([(0, row)])
    seg = b.segment_ids[0]
    last = int(seg.max())
    idx = (seg == last).nonzero().squeeze(-1)
    with torch.no_grad():
        packed_logits = model(b.input_ids, images=b if b.has_images else None, attention_mask=b.attention_mask(),
                              position_ids=b.position_ids).logits[0, idx]
        # the same sample alone: its own tokens, positions from 0, its own images
        alone = ds.batch([(0, row)])
        keep = seg == last
        ids = alone.input_ids[:, keep]
        pos = alone.position_ids[:, keep]
        n_img_before = int((b.input_ids[0, : int(idx[0])] == model.image_token_id).sum())
        per_view = (micro_cfg.model.vision.image_size // micro_cfg.model.vision.patch_size // 4) ** 2
        views = alone.view_order[n_img_before // per_view: n_img_before // per_view + int((ids == model.image_token_id).sum()) // per_view]

        class Imgs:
            global_pixels = alone.global_pixels
            crop_pixels = alone.crop_pixels
            view_order = views

        solo = model(ids, images=Imgs if views else None, position_ids=pos).logits[0]
    assert torch.allclose(packed_logits, solo, atol=1e-4), (packed_logits - solo).abs().max()


def test_one_step_changes_every_trainable_parameter(micro_cfg, packed):
    ds, tok = packed
    torch.manual_seed(0)
    model = new_model(micro_cfg.model, tok, 0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    refs = [(0, r) for r in range(min(8, ds.shard_rows[0]))]
    b = ds.batch(refs)
    assert b.has_images, "the step must include images so the vision encoder trains"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = forward_loss_sum(model, b, "fp32") / b.n_loss_tokens
    loss.backward()
    opt.step()
    unchanged = [n for n, p in model.named_parameters() if p.requires_grad and torch.equal(p, before[n])]
    assert not unchanged, f"parameters that did not change: {unchanged}"
    assert any(n.startswith("vision_model.") for n in before)


def test_batch_and_training_forward_follow_the_device(micro_cfg, packed):
    """A batch moved to another device (here "meta": shapes without data, no GPU needed) builds its attention mask
    there, and the training forward's pieces run there: the vision tower and projector, the decoder under the
    packed mask, the LM head. A tensor made on the CPU inside any of them fails this. (The embedding's image-slot
    count and the loss's target selection read values, which meta tensors do not have.)"""
    ds, tok = packed
    b = ds.batch([(0, r) for r in range(min(4, ds.shard_rows[0]))])
    assert b.has_images
    m = b.to("meta")
    moved = ("input_ids", "labels", "position_ids", "segment_ids", "global_pixels", "crop_pixels")
    assert all(getattr(m, f).device.type == "meta" and getattr(m, f).shape == getattr(b, f).shape for f in moved)
    assert m.view_order == b.view_order and b.input_ids.device.type == "cpu"  # the original stays where it was
    mask = m.attention_mask()["full_attention"]
    assert mask.device.type == "meta" and mask.shape == b.attention_mask()["full_attention"].shape

    model = new_model(micro_cfg.model, tok, 0).to("meta")
    feats = model.encode_images(m)
    assert feats.device.type == "meta" and feats.shape[0] == int((b.input_ids == model.image_token_id).sum())
    h = model.model(inputs_embeds=model.model.embed_tokens(m.input_ids), attention_mask=m.attention_mask(),
                    position_ids=m.position_ids).last_hidden_state
    logits = model.lm_head(h)
    assert logits.device.type == "meta" and logits.shape == (*b.input_ids.shape, micro_cfg.model.text.vocab_size)
    logits.float().sum().backward()
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in model.model.layers.parameters())


@pytest.mark.slow
def test_sigkill_and_resume_is_bit_identical(micro_data, tmp_path):
    """Kill pre-training at a random step (3 trials); the rerun ends with the uninterrupted weights."""
    every = ("--set", "pretrain.checkpoint_every=1")
    rng = random.Random(1234)
    kill_at = {f"trial {t}": rng.randint(1, 8) for t in range(3)}  # steps 1..8 of 10

    def trial(name: str) -> str:
        out = tmp_path / name.replace(" ", "")
        return killed_and_rerun(stage_cmd("pretrain", micro_data.out_dir, out, *every),
                                lambda: published(out / "checkpoints") >= kill_at[name],
                                f"{kill_at[name]} checkpoints", timeout=180)

    ref = stage_cmd("pretrain", micro_data.out_dir, tmp_path / "ref")
    got = at_once({"reference": lambda: uninterrupted(ref)} | {n: (lambda n=n: trial(n)) for n in kill_at})
    want = got.pop("reference")
    for name, d in got.items():
        assert d == want, f"{name}: killed after {kill_at[name]} checkpoints"


def test_checkpoint_and_model_files_are_the_sizes_model_info_plans_with(micro_cfg, micro_data, tmp_path):
    """``model info``'s storage rows size a cluster's temp space (the TrainJob's /tmp): a stage's model file is
    4 bytes a parameter, a checkpoint 12 (AdamW's two moments), as written here."""
    from step3vl.checkpoint import latest_valid_checkpoint
    from step3vl.model.info import model_info
    from step3vl.stages.train import run_training

    out = run_training("pretrain", micro_cfg, micro_data.out_dir, str(tmp_path / "pretrain"), progress=False)
    plan = {k: v * 2**30 for k, v in model_info(micro_cfg.model).storage.items()}
    model_file = (tmp_path / "pretrain" / "model" / "model.safetensors").stat().st_size
    ckpt = Path(latest_valid_checkpoint(str(tmp_path / "pretrain" / "checkpoints")))
    ckpt_size = sum((ckpt / f).stat().st_size for f in ("model.safetensors", "train_state.safetensors"))
    assert out.model_uri.endswith("/model")
    assert model_file == pytest.approx(plan["model_file_gib"], rel=0.01)
    assert ckpt_size == pytest.approx(plan["checkpoint_gib"], rel=0.01)


def test_stage_logs_to_mlflow_and_registers_its_model(micro_cfg, micro_data, tmp_path, monkeypatch):
    import mlflow

    from step3vl import tracking
    from step3vl.registry import resolve_model_uri
    from step3vl.stages.train import run_training

    monkeypatch.setenv("STEP3VL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    try:
        with tracking.stage_run("sft", micro_cfg.tracking, config=micro_cfg) as run:
            out = run_training("sft", micro_cfg, micro_data.out_dir, str(tmp_path / "sft"), progress=False,
                               register=True)
        with tracking.stage_run("sft", micro_cfg.tracking, config=micro_cfg):
            # the default (what the pipeline does) registers nothing: the register stage adds the one version
            plain = run_training("sft", micro_cfg, micro_data.out_dir, str(tmp_path / "sft2"), progress=False)
        assert "registered_version" not in plain.metrics
        client = mlflow.MlflowClient()
        hist = client.get_metric_history(run.info.run_id, "sft/loss")
        assert len(hist) == 8 and hist[-1].value < hist[0].value
        for key in ("sft/lr", "sft/grad_norm", "sft/tokens_per_s", "sft/samples_per_s"):
            assert client.get_metric_history(run.info.run_id, key), key
        assert "loss_curve.png" in {a.path for a in client.list_artifacts(run.info.run_id)}
        mv = client.get_model_version(micro_cfg.tracking.registered_model, str(int(out.metrics["registered_version"])))
        assert mv.tags["step3vl.stage"] == "sft" and mv.source == out.model_uri
        assert resolve_model_uri(f"models:/{micro_cfg.tracking.registered_model}/{mv.version}") == out.model_uri
    finally:
        mlflow.set_tracking_uri(None)
