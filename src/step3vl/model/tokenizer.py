"""The locally trained byte-level BPE tokenizer, its special tokens and the chat template.

Nothing here touches the Hugging Face hub: ``build_tokenizer`` trains a BPE with the ``tokenizers``
library on a caller's corpus or on a built-in corpus generated from ``TokenizerConfig.seed``, and
wraps it as a ``transformers.PreTrainedTokenizerFast``. The same config and corpus always give a
byte-identical ``tokenizer.json``.

Special tokens take ids ``0..len(SPECIAL_TOKENS)-1`` in the order of ``SPECIAL_TOKENS``; the image
tokens (``<im_start>``, ``<im_end>``, ``<im_patch>``, ``<patch_start>``, ``<patch_end>``,
``<patch_newline>``) are the ones ``step3vl.model.processor`` writes into the text, spelled as in
Step3-VL; the model replaces each ``<im_patch>`` with a projected patch embedding. ``encode_chat`` renders a conversation with the Qwen-style chat template
and returns the token ids with the assistant-token mask used for SFT loss masking.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from step3vl.config import TokenizerConfig

log = logging.getLogger(__name__)

PAD_TOKEN = "<|endoftext|>"
CHAT_START = "<|im_start|>"
CHAT_END = "<|im_end|>"
IMAGE_TOKEN = "<image>"
IMAGE_START = "<im_start>"
IMAGE_END = "<im_end>"
IMAGE_PATCH = "<im_patch>"
PATCH_START = "<patch_start>"
PATCH_END = "<patch_end>"
PATCH_NEWLINE = "<patch_newline>"
THINK_START = "<think>"
THINK_END = "</think>"

# Order fixes the ids (0..N-1). The image tokens are the ones StepFun's Step3-VL processor (and so
# vLLM's step3_vl) writes; the think markers moved from 8/9 to 10/11 when <im_newline> gave way to
# the three patch tokens. Otherwise never reorder, only append.
SPECIAL_TOKENS: tuple[str, ...] = (
    PAD_TOKEN,
    CHAT_START,
    CHAT_END,
    IMAGE_TOKEN,
    IMAGE_START,
    IMAGE_END,
    IMAGE_PATCH,
    PATCH_START,
    PATCH_END,
    PATCH_NEWLINE,
    THINK_START,
    THINK_END,
)
# As in Qwen3, the think markers are added but not "special", so ``decode(skip_special_tokens=True)``
# keeps them and reward functions can still find the reasoning block.
_NON_SPECIAL = frozenset({THINK_START, THINK_END})
# Image tokens must also be stripped by ``skip_special_tokens``, so transformers has to know them.
_EXTRA_SPECIAL = tuple(t for t in SPECIAL_TOKENS if t not in _NON_SPECIAL and t not in (PAD_TOKEN, CHAT_END))

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set content = message['content'] -%}"
    "{%- else -%}"
    "{%- set content = namespace(text='') -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set content.text = content.text + '" + IMAGE_TOKEN + "' -%}"
    "{%- elif part['type'] == 'text' -%}{%- set content.text = content.text + part['text'] -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set content = content.text -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}"
    "{{- '" + CHAT_START + "assistant\n' -}}"
    "{%- generation -%}{{- content + '" + CHAT_END + "' -}}{%- endgeneration -%}"
    "{{- '\n' -}}"
    "{%- else -%}"
    "{{- '" + CHAT_START + "' + message['role'] + '\n' + content + '" + CHAT_END + "\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '" + CHAT_START + "assistant\n' -}}{%- endif -%}"
)
"""Qwen-style: ``<|im_start|>{role}\\n{content}<|im_end|>\\n``. Assistant content plus its
``<|im_end|>`` sits in a ``{% generation %}`` block (the SFT loss mask); the newline after it does
not, since generation stops at ``<|im_end|>``. Content may be a string or a list of
``{"type": "text", "text": ...}`` / ``{"type": "image"}`` parts (an image part renders as ``<image>``)."""

_DEFAULT_CORPUS_LINES = 20000

_COLOURS = (
    "red green blue yellow orange purple pink brown black white grey gray cyan magenta violet gold silver"
).split()
_SHAPES = (
    "circle square triangle rectangle star diamond hexagon pentagon oval ellipse cross heart arrow line dot "
    "polygon octagon cube sphere cone cylinder pyramid ring arc grid cell block tile bar point"
).split()
_SIZES = "small large big tiny huge little medium tall short long wide narrow thin thick".split()
_POSITIONS = (
    "above below under over beside behind inside outside near between left right top bottom middle center "
    "corner edge next upper lower"
).split()
_OBJECTS = (
    "cat dog bird fish horse cow sheep duck mouse rabbit lion tiger bear elephant monkey apple banana orange "
    "grape lemon cherry pear bread cake cup bowl plate table chair bed lamp door window house tree flower "
    "grass river lake road bridge car bus truck train boat plane bicycle ball book pen pencil clock phone "
    "computer screen box bag hat shoe shirt coat key chart graph table map sign letter word number picture "
    "photo image scene sky cloud sun moon mountain beach field garden park city street room kitchen"
).split()
_VERBS = (
    "is are was were has have had sits stands runs walks flies swims eats holds looks shows contains "
    "points moves turns jumps reads writes draws counts adds subtracts multiplies divides compares sees "
    "finds makes takes gives keeps lies hangs rests plays"
).split()
_ADJECTIVES = (
    "bright dark light heavy empty full round sharp smooth rough old new young happy quiet loud fast slow "
    "clear simple different same equal other first second third last next previous correct wrong"
).split()
_NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety hundred thousand"
).split()
_REASONING = (
    "Let me think step by step. First we count the shapes. Then we add them together. So the answer is "
    "therefore because since however also only each every total sum difference product quotient result "
    "check again carefully look at notice that means we get which gives this that these those there here "
    "and or but not no yes if then so of to for with from by on at as in into onto about"
).split()
_COMMON = (
    "about above across act add after again against age ago agree air all allow almost alone along already "
    "although always among amount angle animal another answer any appear area arm around arrive art ask "
    "attention away baby back bad balance base basic bear beauty become before begin behavior believe best "
    "better beyond bit body bone both bottle boy brain branch break bring brother build burn business busy "
    "buy call camera can capital care carry case catch cause certain chain chance change character charge "
    "child choose class clean climb close clothes coast cold collect college column come common company "
    "complete condition connect consider continue control cook cool copy corner cost could country course "
    "cover create crowd current cut dance danger data date daughter day dead deal death decide deep degree "
    "depend describe desert design detail develop diagram die direction discover distance divide doctor "
    "does done down dream dress drink drive drop dry during early earth east easy eat effect effort egg "
    "either element else energy engine enough enter entire environment especially even evening event ever "
    "evidence exact example except exercise expect experience experiment explain express eye face fact fall "
    "family famous far farm father fear feel feet few fight figure fill film final fine finger finish fire "
    "floor follow food foot force forest form forward free fresh friend front fruit future game general "
    "girl glass good government great green ground group grow guess guide hair half hand happen hard head "
    "health hear heat help high history hold hole home hope hot hour however human hunt idea important "
    "include increase indicate information interest island job join just kind king know land language "
    "large late laugh law lay lead learn least leave leg less level life lift like likely list listen live "
    "local machine main major man many mark market match material matter may mean measure meet member "
    "memory method might mind minute miss model modern moment money month more morning most mother "
    "mouth much music must name nation natural nature necessary need never night noise north nothing "
    "object observe ocean offer office often oil open operation order organize original own page paint "
    "paper part party pass past path pattern pay people perhaps period person place plan plant please "
    "position possible power practice prepare present press pretty problem process produce property "
    "provide public pull purpose push put quarter question quick quite race rain raise range rather reach "
    "ready real reason receive record region remain remember repeat report represent require rest return "
    "rise rock row rule safe sail salt sand save say school science score sea season seat second section "
    "seed seem sell send sense sentence separate serve set several shape share ship shore should side "
    "sight signal silent similar since single sister size skill skin sleep snow soft soil soldier solution "
    "solve some song soon sound south space speak special speed spell spend spring stay step still stone "
    "stop store story strange stream strong student study subject success such sudden suggest summer "
    "supply support sure surface system teach team tell temperature term test than thank the their them "
    "thing think though thought through throw time today together tool total touch toward town track trade "
    "travel true try type uncle understand unit until use usual valley value various very view village "
    "visit voice wait want warm wash watch water wave way wear weather week weight well west what wheel "
    "when where while whole why wild will win wind winter wish within without woman wonder wood work "
    "world would write year yet you young your"
).split()
_INFLECTIONS = ("", "", "", "s", "ed", "ing", "er", "ly")
_QUESTION_HEADS = (
    "What color is the",
    "What colour is the",
    "What shape is the",
    "Where is the",
    "Is there a",
    "Which object is",
    "How big is the",
    "Describe the",
    "What is to the left of the",
    "What is to the right of the",
    "What is above the",
    "What is below the",
)
_PUNCT = (".", ",", "?", "!", ":", ";", "...", " -", " (", ")", "'s", '"', "%", "/", "*", "=", "+", "<", ">")


def _number_in_words(n: int) -> str:
    """0 <= n < 1000 in English words."""
    ones = _NUMBER_WORDS[:20]
    tens = ["", "", *_NUMBER_WORDS[20:28]]
    if n < 20:
        return ones[n]
    if n < 100:
        return tens[n // 10] + ("" if n % 10 == 0 else "-" + ones[n % 10])
    rest = n % 100
    return ones[n // 100] + " hundred" + ("" if rest == 0 else " and " + _number_in_words(rest))


def _plural(word: str) -> str:
    if word.endswith(("s", "x", "ch", "sh")):
        return word + "es"
    if word.endswith("y") and word[-2:-1] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def _default_lines(rng: random.Random) -> Iterable[str]:
    """Text in the style of the synthetic data families: captions, VQA, counting, arithmetic, reasoning."""

    def obj() -> str:
        return rng.choice(_SHAPES + _OBJECTS)

    def caption() -> str:
        a, b = obj(), obj()
        return (
            f"A {rng.choice(_SIZES)} {rng.choice(_COLOURS)} {a} {rng.choice(_VERBS)} {rng.choice(_POSITIONS)} "
            f"the {rng.choice(_ADJECTIVES)} {rng.choice(_COLOURS)} {b}."
        )

    def vqa() -> str:
        return f"{rng.choice(_QUESTION_HEADS)} {obj()}? The {obj()} is {rng.choice(_COLOURS + _POSITIONS)}."

    def counting() -> str:
        n = rng.randint(0, 30)
        thing = _plural(rng.choice(_SHAPES + _OBJECTS))
        return (
            f"How many {rng.choice(_COLOURS)} {thing} are there in the image? "
            f"There are {n} {thing}. Answer: {n} ({_number_in_words(n)})."
        )

    def arithmetic() -> str:
        a, b = rng.randint(0, 999), rng.randint(0, 999)
        op, word, value = rng.choice(
            [("+", "plus", a + b), ("-", "minus", a - b), ("*", "times", a * b), ("/", "divided by", a // max(b, 1))]
        )
        spelled = f"{_number_in_words(a)} {word} {_number_in_words(b)}"
        return f"What is {a} {op} {b}? {spelled} is {value}. So {a} {op} {b} = {value}."

    def reasoning() -> str:
        words = [rng.choice(_REASONING) for _ in range(rng.randint(6, 14))]
        return " ".join(words).capitalize() + rng.choice(_PUNCT)

    def word() -> str:
        w = rng.choice(vocabulary) + rng.choice(_INFLECTIONS)
        return w.capitalize() if rng.random() < 0.15 else w

    def prose() -> str:
        text = " ".join(word() for _ in range(rng.randint(5, 12)))
        return text[0].upper() + text[1:] + rng.choice(_PUNCT)

    def listing() -> str:
        # Words right after a newline, bracket or quote carry no leading space: another BPE variant.
        items = [word() for _ in range(rng.randint(2, 5))]
        return rng.choice(("\n- ", "\n", "(", '"', " (")).join(["", *items]) + rng.choice(_PUNCT)

    def chat() -> str:
        lines: Sequence[Callable[[], str]] = (
            lambda: "system\nYou are a helpful assistant that answers questions about images.",
            lambda: "user\nLook at the image and answer the question.",
            lambda: "assistant\nThe answer is",
            lambda: "Question: " + vqa(),
            lambda: "Caption: " + caption(),
        )
        return rng.choice(lines)()

    vocabulary = _COMMON + _OBJECTS + _SHAPES + _COLOURS + _ADJECTIVES + _VERBS + _SIZES + _POSITIONS
    makers: Sequence[Callable[[], str]] = (
        caption, vqa, counting, arithmetic, reasoning, prose, prose, prose, listing, listing, chat,
    )
    for _ in range(_DEFAULT_CORPUS_LINES):
        yield rng.choice(makers)()


def default_corpus(seed: int) -> list[str]:
    """The built-in training corpus: deterministic in ``seed``, about 1.2 MB of English lines.

    Rich enough for a vocabulary of about 13k entries; larger ones need a real corpus.
    """
    return list(_default_lines(random.Random(seed)))


def build_tokenizer(cfg: TokenizerConfig, corpus: Iterable[str] | None = None) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``corpus`` (default: ``default_corpus(cfg.seed)``).

    The vocabulary holds ``SPECIAL_TOKENS`` (ids 0..N-1), then the 256 byte symbols, then merges up
    to ``cfg.vocab_size`` in total; a corpus too small to support that many merges gives fewer (a
    warning is logged). Digits are always split one per token. Deterministic for the same inputs.
    """
    floor = len(SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
    if cfg.vocab_size < floor:
        raise ValueError(f"tokenizer vocab_size={cfg.vocab_size} is below {floor} (special tokens + 256 bytes)")
    lines = default_corpus(cfg.seed) if corpus is None else corpus

    backend = Tokenizer(models.BPE())
    # No normalizer: any UTF-8 text (non-NFC included) must round-trip exactly.
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    # Untrimmed offsets keep character spans exact, which the assistant mask relies on.
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=2,
        special_tokens=[
            AddedToken(t, special=t not in _NON_SPECIAL, normalized=False, lstrip=False, rstrip=False)
            for t in SPECIAL_TOKENS
        ],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(lines, trainer)
    # The trainer marks every token it is given as special; re-adding an existing token only
    # updates its flags, so the think markers keep their ids and become ordinary added tokens.
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in SPECIAL_TOKENS if t in _NON_SPECIAL])
    if backend.get_vocab_size() < cfg.vocab_size:
        log.warning(
            "tokenizer corpus supports only %d of the requested %d vocabulary entries",
            backend.get_vocab_size(),
            cfg.vocab_size,
        )
    return _wrap(backend)


def _wrap(backend: Tokenizer) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=CHAT_END,
        pad_token=PAD_TOKEN,
        extra_special_tokens=list(_EXTRA_SPECIAL),
        clean_up_tokenization_spaces=False,
        model_input_names=["input_ids", "attention_mask"],
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def save_tokenizer(tok: PreTrainedTokenizerFast, directory: str | Path) -> Path:
    """Write the tokenizer (``tokenizer.json``, config, chat template) to ``directory``; return it."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out))
    return out


def load_tokenizer(directory: str | Path) -> PreTrainedTokenizerFast:
    """Load a tokenizer written by ``save_tokenizer``; local files only, never the hub."""
    path = Path(directory)
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {path}")
    return PreTrainedTokenizerFast.from_pretrained(str(path), local_files_only=True)


def encode_chat(
    tokenizer: PreTrainedTokenizerFast,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = False,
) -> tuple[list[int], list[int]]:
    """Render ``messages`` with the chat template and tokenize.

    Returns ``(input_ids, assistant_mask)``: the mask is 1 on every token of assistant content and
    its closing ``<|im_end|>``, 0 on system/user turns, role headers and the generation prompt.
    transformers marks every token whose character span overlaps a ``{% generation %}`` block, so
    a reply that starts with two or more whitespace characters may share a pre-token with the
    header's newline; if that whitespace run is a merged BPE token, it is marked 1 as a whole.
    """
    out = tokenizer.apply_chat_template(
        [dict(m) for m in messages],
        add_generation_prompt=add_generation_prompt,
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
    )
    input_ids = list(out["input_ids"])
    mask = list(out["assistant_masks"])
    if len(mask) != len(input_ids):
        raise RuntimeError(f"assistant mask has {len(mask)} entries for {len(input_ids)} tokens")
    return input_ids, mask
