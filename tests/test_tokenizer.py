"""The locally trained tokenizer: determinism, special tokens, digits, round-trips, chat template, save/load."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from step3vl.config import TokenizerConfig
from step3vl.model.tokenizer import (
    CHAT_END,
    CHAT_TEMPLATE,
    IMAGE_PATCH,
    PATCH_END,
    PATCH_NEWLINE,
    PATCH_START,
    SPECIAL_TOKENS,
    THINK_END,
    THINK_START,
    build_tokenizer,
    encode_chat,
    load_tokenizer,
    save_tokenizer,
)

CFG = TokenizerConfig(vocab_size=512, seed=0)

CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "<image>\nHow many circles are there?"},
    {"role": "assistant", "content": "<think>I see 2 red and 3 blue circles: 2 + 3 = 5.</think>There are 5 circles."},
    {"role": "user", "content": "And squares?"},
    {"role": "assistant", "content": "None."},
]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer(CFG)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _run(script: str, **env: str) -> str:
    src = Path(__file__).resolve().parents[1] / "src"
    full_env = {**os.environ, "PYTHONPATH": str(src), **env}
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], env=full_env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


# --------------------------------------------------------------------------- build


def test_a_streamed_corpus_trains_the_same_tokenizer_as_a_list():
    """Data prep streams its corpus (every training text) into the trainer instead of listing it in memory."""
    from step3vl.model.tokenizer import default_corpus

    lines = list(default_corpus(0))
    consumed = []

    def stream():
        for line in lines:
            consumed.append(line)
            yield line

    streamed = build_tokenizer(CFG, corpus=stream()).backend_tokenizer.to_str()
    assert len(consumed) == len(lines)  # read once, through
    assert streamed == build_tokenizer(CFG, corpus=lines).backend_tokenizer.to_str()


def test_two_builds_write_identical_files(tok, tmp_path):
    save_tokenizer(tok, tmp_path / "a")
    save_tokenizer(build_tokenizer(CFG), tmp_path / "b")
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert "tokenizer.json" in names
    assert names == sorted(p.name for p in (tmp_path / "b").iterdir())
    for name in names:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_build_is_identical_in_another_process(tok, tmp_path):
    save_tokenizer(tok, tmp_path / "here")
    there = _run(
        f"""
        import hashlib
        from step3vl.config import TokenizerConfig
        from step3vl.model.tokenizer import build_tokenizer, save_tokenizer
        cfg = TokenizerConfig(vocab_size={CFG.vocab_size}, seed={CFG.seed})
        out = save_tokenizer(build_tokenizer(cfg), {str(tmp_path / "there")!r})
        print(hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest())
        """,
        PYTHONHASHSEED="12345",
    )
    assert there == _sha(tmp_path / "here" / "tokenizer.json")


def test_seed_changes_the_default_corpus():
    a = build_tokenizer(TokenizerConfig(vocab_size=512, seed=0)).backend_tokenizer.to_str()
    b = build_tokenizer(TokenizerConfig(vocab_size=512, seed=1)).backend_tokenizer.to_str()
    assert a != b


@pytest.mark.parametrize("vocab_size", [512, 4096])
def test_default_corpus_fills_the_requested_vocab(vocab_size):
    assert len(build_tokenizer(TokenizerConfig(vocab_size=vocab_size))) == vocab_size


def test_small_corpus_gives_fewer_tokens_and_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="step3vl.model.tokenizer"):
        t = build_tokenizer(TokenizerConfig(vocab_size=2000), corpus=["a tiny corpus", "a tiny corpus again"])
    assert len(SPECIAL_TOKENS) + 256 <= len(t) < 2000
    assert "supports only" in caplog.text


def test_vocab_below_bytes_plus_specials_is_refused():
    with pytest.raises(ValueError, match="256 bytes"):
        build_tokenizer(TokenizerConfig(vocab_size=100))


# --------------------------------------------------------------------------- tokens


def test_special_tokens_are_single_stable_ids(tok):
    other = build_tokenizer(TokenizerConfig(vocab_size=1024, seed=3), corpus=["the cat sat on the mat"] * 10)
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        for t in (tok, other):
            assert t.convert_tokens_to_ids(token) == expected_id
            assert t.encode(token) == [expected_id]
            assert t.encode(f"x {token}y").count(expected_id) == 1
    assert (tok.eos_token, tok.eos_token_id) == (CHAT_END, SPECIAL_TOKENS.index(CHAT_END))
    assert (tok.pad_token, tok.pad_token_id) == ("<|endoftext|>", 0)


def test_special_token_ids_follow_step3_layout(tok):
    assert SPECIAL_TOKENS == (
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
        "<image>",
        "<im_start>",
        "<im_end>",
        "<im_patch>",
        "<patch_start>",
        "<patch_end>",
        "<patch_newline>",
        "<think>",
        "</think>",
    )
    assert (PATCH_START, PATCH_END, PATCH_NEWLINE) == ("<patch_start>", "<patch_end>", "<patch_newline>")
    assert tok.convert_tokens_to_ids([PATCH_START, PATCH_END, PATCH_NEWLINE, THINK_START, THINK_END]) == [
        7, 8, 9, 10, 11,
    ]
    assert "<im_newline>" not in tok.get_vocab()


def test_image_tokens_are_never_merged_with_text(tok):
    patch, start, end, newline = tok.convert_tokens_to_ids([IMAGE_PATCH, PATCH_START, PATCH_END, PATCH_NEWLINE])
    ids = tok.encode("a" + PATCH_START + IMAGE_PATCH * 3 + PATCH_END + PATCH_NEWLINE + "b")
    assert ids.count(patch) == 3
    assert ids[1:7] == [start, patch, patch, patch, end, newline]


def test_skip_special_tokens_keeps_think_markers(tok):
    ids = tok.encode(
        f"{THINK_START}2 + 2{THINK_END}4{PATCH_START}{IMAGE_PATCH}{PATCH_END}{PATCH_NEWLINE}"
        f"<im_start>{IMAGE_PATCH}<im_end>{CHAT_END}"
    )
    assert tok.decode(ids, skip_special_tokens=True) == f"{THINK_START}2 + 2{THINK_END}4"


def test_digits_are_split_individually(tok):
    assert tok.convert_ids_to_tokens(tok.encode("12345")) == ["1", "2", "3", "4", "5"]
    tokens = tok.convert_ids_to_tokens(tok.encode("In 2024, 365 + 1 = 366."))
    digit_tokens = [t for t in tokens if any(ch.isdigit() for ch in t)]
    assert digit_tokens == list("20243651366")


def test_any_text_round_trips(tok):
    samples = [
        "",
        "plain ascii text.",
        "  leading and trailing spaces  ",
        "tabs\tand\r\nwindows newlines\n\n\n",
        "héllo wörld, naïve café",
        "e\u0301 (combining accent, not NFC)",
        "日本語のテキスト and 中文",
        "emoji 🙂👩‍👩‍👧 flags 🇫🇷",
        "math ∑ x² ≤ ∞, arrows → ⇒",
        "\x00\x01 control \x7f chars",
        "<image> literal special <think>x</think>",
    ]
    rng = random.Random(0)
    ranges = [(0x20, 0x7E), (0xA0, 0xD7FF), (0xE000, 0x10FFFF)]  # no surrogates: not encodable
    for _ in range(50):
        samples.append("".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(1, 30))))
    for s in samples:
        assert tok.decode(tok.encode(s)) == s, repr(s)


# --------------------------------------------------------------------------- chat


def test_chat_template_renders_qwen_style(tok):
    assert tok.chat_template == CHAT_TEMPLATE
    rendered = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert rendered == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nHow many circles are there?<|im_end|>\n"
        "<|im_start|>assistant\n<think>I see 2 red and 3 blue circles: 2 + 3 = 5.</think>"
        "There are 5 circles.<|im_end|>\n"
        "<|im_start|>user\nAnd squares?<|im_end|>\n"
        "<|im_start|>assistant\nNone.<|im_end|>\n"
    )
    prompt = tok.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("How many circles are there?<|im_end|>\n<|im_start|>assistant\n")


def test_chat_template_accepts_content_parts(tok):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    assert tok.apply_chat_template(messages, tokenize=False) == "<|im_start|>user\n<image>What is it?<|im_end|>\n"


def _runs(ids: list[int], mask: list[int]) -> list[list[int]]:
    """Maximal runs of consecutive token ids where ``mask`` is 1."""
    runs: list[list[int]] = []
    for i, (token, m) in enumerate(zip(ids, mask)):
        if m:
            if i == 0 or not mask[i - 1]:
                runs.append([])
            runs[-1].append(token)
    return runs


def test_assistant_mask_covers_exactly_assistant_content(tok):
    ids, mask = encode_chat(tok, CONVERSATION)
    assert len(ids) == len(mask)
    assert set(mask) == {0, 1}
    assert ids == tok.encode(tok.apply_chat_template(CONVERSATION, tokenize=False))
    replies = [m["content"] for m in CONVERSATION if m["role"] == "assistant"]
    assert [tok.decode(r) for r in _runs(ids, mask)] == [r + CHAT_END for r in replies]
    unmasked = tok.decode([t for t, m in zip(ids, mask) if not m])
    assert unmasked == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nHow many circles are there?<|im_end|>\n"
        "<|im_start|>assistant\n\n"
        "<|im_start|>user\nAnd squares?<|im_end|>\n"
        "<|im_start|>assistant\n\n"
    )


def test_generation_prompt_has_no_assistant_tokens(tok):
    ids, mask = encode_chat(tok, CONVERSATION[:2], add_generation_prompt=True)
    assert not any(mask)
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")


def test_empty_assistant_reply_masks_only_its_end_token(tok):
    ids, mask = encode_chat(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}])
    assert [t for t, m in zip(ids, mask) if m] == [tok.eos_token_id]


# --------------------------------------------------------------------------- save / load


def test_save_load_round_trip(tok, tmp_path):
    save_tokenizer(tok, tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert len(loaded) == len(tok)
    assert loaded.chat_template == CHAT_TEMPLATE
    assert (loaded.eos_token, loaded.pad_token) == (tok.eos_token, tok.pad_token)
    assert loaded.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    assert encode_chat(loaded, CONVERSATION) == encode_chat(tok, CONVERSATION)
    assert not loaded.added_tokens_decoder[SPECIAL_TOKENS.index(THINK_START)].special


def test_load_works_offline_in_a_fresh_process(tok, tmp_path):
    save_tokenizer(tok, tmp_path / "tok")
    out = _run(
        f"""
        import json
        from step3vl.model.tokenizer import encode_chat, load_tokenizer
        t = load_tokenizer({str(tmp_path / "tok")!r})
        print(json.dumps(encode_chat(t, {CONVERSATION!r})))
        """,
        HF_HUB_OFFLINE="1",
        # Any attempt to reach a hub would fail loudly rather than be served from a cache.
        HF_ENDPOINT="http://127.0.0.1:9",
        HF_HOME=str(tmp_path / "hf_home"),
    )
    assert json.loads(out) == [list(x) for x in encode_chat(tok, CONVERSATION)]


def test_load_missing_directory_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "nothing")
