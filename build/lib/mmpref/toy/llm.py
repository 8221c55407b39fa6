"""Tiny causal LMs and locally trained tokenizers for tests, examples and benchmarks (no downloads).

A tokenizer is trained with the ``tokenizers`` library on the caller's texts (byte-level BPE, so any text
round-trips), wrapped in a ``PreTrainedTokenizerFast`` with a small chat template; the model is a randomly
initialised ``LlamaForCausalLM`` built from a config.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tokenizers.processors import TemplateProcessing
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]

# A prompt rendered with add_generation_prompt=True is a prefix of prompt + assistant reply.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``texts``; BOS is prepended, pad/eos/unk are set."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama_config(vocab_size: int, **overrides) -> LlamaConfig:
    """A small Llama config (about 0.1M parameters by default); ``overrides`` scale it up (e.g. benchmarks)."""
    kw = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    kw.update(overrides)
    return LlamaConfig(**kw)


def build_tiny_llama(
    path: str | Path, texts: Iterable[str], vocab_size: int = 512, seed: int = 0, **config_overrides
) -> Path:
    """Train a tokenizer on ``texts``, build a random tiny Llama, save both to ``path`` and return it."""
    path = Path(path)
    tokenizer = train_tokenizer(texts, vocab_size)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_llama_config(len(tokenizer), **config_overrides))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


GOOD_WORDS = ["cat", "dog", "owl", "fox", "bee", "elk", "ant", "cow", "yak", "emu", "hen", "pig"]
BAD_WORDS = ["saw", "axe", "nut", "bolt", "pipe", "drill", "file", "vise", "wire", "tape", "glue", "rake"]
TOPICS = ["tell", "name", "list", "give", "write", "show", "pick", "say"]


def synthetic_preferences(n: int, seed: int = 0, losers: int = 1) -> list[dict]:
    """Preference rows with a learnable rule: winners name animals, losers name tools (prompts are noise).

    Rows are ``{"prompt", "chosen", "rejected"}`` (``rejected`` a list when ``losers > 1``). Each completion is
    2-4 random words, so held-out rows are new word combinations of the same rule.
    """
    import random

    rng = random.Random(seed)
    words = lambda pool: " ".join(rng.choice(pool) for _ in range(rng.randint(2, 4)))
    rows = []
    for _ in range(n):
        prompt = f"{rng.choice(TOPICS)} {rng.choice(TOPICS)} {words(GOOD_WORDS + BAD_WORDS)}:"
        rejected = [" " + words(BAD_WORDS) for _ in range(losers)]
        rows.append(
            {"prompt": prompt, "chosen": " " + words(GOOD_WORDS), "rejected": rejected if losers > 1 else rejected[0]}
        )
    return rows


# ----- ready-made assets: `toy:llm`, `toy:prefs`, `toy:heldout` in a config ----------------------------------------
TOY_PREFIX = "toy:"
_TOY_FILES = {"llm": "model", "prefs": "prefs.jsonl", "heldout": "heldout.jsonl", "captions": "captions.txt"}
# captions for the tiny Tango recipes: what the tone preference set (mmpref.toy.tones) asks for
_CAPTIONS = [f"a {rhythm} {pitch} pitched beep" for rhythm in ("steady", "pulsing", "fast beeping")
             for pitch in ("low", "middle", "high", "very high")]


def resolve_toy(value: str) -> str:
    """``toy:llm`` / ``toy:prefs`` / ``toy:heldout`` -> the path of a tiny Llama / its 512 training preference pairs /
    128 held-out pairs (:func:`synthetic_preferences`); ``toy:captions`` -> 12 tone captions (one per line) for the
    tiny Tango recipes; built once under the cache root; anything else unchanged.
    They make the tiny recipes (``configs/*_tiny.yaml``) run anywhere, with nothing downloaded."""
    if not isinstance(value, str) or not value.startswith(TOY_PREFIX):
        return value
    name = value[len(TOY_PREFIX):]
    if name not in _TOY_FILES:
        from mmpref.errors import ConfigError

        raise ConfigError(f"{value!r}: unknown toy asset; choose one of {', '.join('toy:' + n for n in _TOY_FILES)}")
    return str(toy_assets() / _TOY_FILES[name])


def toy_assets() -> Path:
    """The folder of the toy assets (model, prefs.jsonl, heldout.jsonl), written atomically on first use."""
    import json

    from mmpref.io import atomic_dir, cache_root

    root = cache_root() / "toy" / "v2"
    if not (root / "captions.txt").exists():
        with atomic_dir(root, replace=False) as tmp:  # another process may build the same: the first wins
            train, heldout = synthetic_preferences(512, seed=0), synthetic_preferences(128, seed=1)
            for name, rows in (("prefs.jsonl", train), ("heldout.jsonl", heldout)):
                (tmp / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
            (tmp / "captions.txt").write_text("".join(c + "\n" for c in _CAPTIONS))
            texts = [r["prompt"] + r["chosen"] + r["rejected"] for r in train]
            build_tiny_llama(tmp / "model", texts, vocab_size=400, hidden_size=64, intermediate_size=128)
    return root
