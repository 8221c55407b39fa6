"""Caption perturbations for Tango 2's strategies 2 (concept) and 3 (temporal).

Every perturbation keeps some of the original events and changes others, so the audio generated from it is a
*plausible but wrong* answer to the original caption (the loser). Operations:

* ``omit``: drop one event (needs >= 2 events, so something is kept);
* ``replace``: swap one event for a related but different one from the concept vocabulary (same category,
  no shared content word: "a dog barks" -> "a cat meows");
* ``add``: add an event from the vocabulary that the caption does not mention;
* ``swap``: exchange the two events of a temporal relation ("A then B" -> "B then A");
* ``invert``: flip a before/after relation ("A before B" -> "A after B", "A then B" -> "A after B");
* ``serialize``: turn an overlap into a sequence ("A while B" -> "A, then B").

``concept`` uses omit/replace/add; ``temporal`` (captions with a temporal word) uses swap/invert/serialize and
adds or removes one event, as Tango 2's GPT-4 prompts did. The choice is deterministic given ``seed`` and the
caption (a hash, not Python's randomised ``hash``), so shards and processes reproduce it independently.

:class:`LLMPerturber` asks any local transformers causal LM instead and keeps only outputs that pass
:func:`validate_perturbation` against the parse.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Protocol

from mmpref.synthesis.captions import (
    AFTER,
    BEFORE,
    CONNECTORS,
    SAME,
    TEMPORAL_CONNECTORS,
    CaptionParse,
    Event,
    content_stems,
    parse_caption,
    render,
)
from mmpref.synthesis.vocabulary import Vocabulary

STRATEGIES = ("resample", "concept", "temporal")
PERTURBATION_STRATEGIES = ("concept", "temporal")
OPERATIONS = {"concept": ("omit", "replace", "add"), "temporal": ("swap", "invert", "serialize", "add", "omit")}

__all__ = [
    "LLMPerturber",
    "Perturbation",
    "Perturber",
    "RuleBasedPerturber",
    "parse_caption",
    "validate_perturbation",
]


@dataclass(frozen=True)
class Perturbation:
    """A perturbed caption and how it was made (recorded with every loser)."""

    caption: str
    strategy: str  # concept | temporal
    operation: str  # omit | replace | add | swap | invert | serialize | llm
    detail: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


class Perturber(Protocol):
    """Anything that turns a parse into up to ``n`` perturbations for a strategy (rule-based, an LLM, ...)."""

    def perturb(self, parse: CaptionParse, strategy: str, n: int) -> list[Perturbation]: ...


def caption_rng(seed: int, *parts: str) -> random.Random:
    """A ``random.Random`` that depends only on ``seed`` and ``parts`` (stable across processes and runs)."""
    digest = hashlib.sha256("\x1f".join([str(seed), *parts]).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


# ---------------------------------------------------------------------------------------------- operations
def omit(parse: CaptionParse, i: int) -> str:
    """The caption without event ``i`` (the connector before it goes too; for i = 0 the next one's)."""
    events = [e for j, e in enumerate(parse.events) if j != i]
    conns = [c for j, c in enumerate(parse.connectors) if j != (i if i > 0 else 1)]
    return render(events, ["", *conns[1:]])


def replace(parse: CaptionParse, i: int, phrase: str) -> str:
    events = list(parse.events)
    events[i] = Event(phrase)
    _detach_followers(events, parse, i)
    return render(events, parse.connectors)


def add(parse: CaptionParse, phrase: str, connector: str, at_start: bool = False) -> str:
    """Add ``phrase`` at the end (``A <connector> phrase``) or at the start (``phrase <connector> A``)."""
    if at_start:
        return render([Event(phrase), *parse.events], ["", connector, *parse.connectors[1:]])
    return render([*parse.events, Event(phrase)], [*parse.connectors, connector])


def swap(parse: CaptionParse, i: int, connector: str | None = None) -> str:
    """Exchange events ``i`` and ``i + 1``, keeping (or replacing) the connector between them."""
    events = list(parse.events)
    events[i], events[i + 1] = events[i + 1], events[i]
    conns = list(parse.connectors)
    if connector is not None:
        conns[i + 1] = connector
    return render(events, conns)


def with_connector(parse: CaptionParse, i: int, connector: str) -> str:
    """The caption with the connector before event ``i`` replaced."""
    conns = list(parse.connectors)
    conns[i] = connector
    events = list(parse.events)
    events[i] = Event(events[i].standalone)  # "starts after idles" -> "starts after an engine idles"
    return render(events, conns)


def _detach_followers(events: list[Event], parse: CaptionParse, i: int) -> None:
    """Events that borrowed their subject from event ``i`` keep it explicitly once ``i`` is replaced."""
    for j in range(i + 1, len(events)):
        if parse.events[j].subject is None:
            break
        events[j] = Event(parse.events[j].standalone)


# ---------------------------------------------------------------------------------------------- rule-based
class RuleBasedPerturber:
    """The default perturber: enumerate every applicable operation, then pick ``n`` round-robin by operation."""

    def __init__(self, vocabulary: Vocabulary | None = None, seed: int = 0):
        self.vocabulary = vocabulary or Vocabulary.default()
        self.seed = seed

    def parse(self, caption: str) -> CaptionParse:
        return parse_caption(caption, self.vocabulary.nouns)

    def candidates(self, parse: CaptionParse, strategy: str) -> dict[str, list[Perturbation]]:
        """Every perturbation of ``strategy`` applicable to ``parse``, by operation (deterministic order)."""
        if strategy == "concept":
            return self._concept(parse)
        if strategy == "temporal":
            return self._temporal(parse) if parse.is_temporal else {}
        raise ValueError(f"unknown perturbation strategy {strategy!r}; choose one of {PERTURBATION_STRATEGIES}")

    def perturb(self, parse: CaptionParse, strategy: str, n: int) -> list[Perturbation]:
        rng = caption_rng(self.seed, strategy, parse.caption)
        by_op = self.candidates(parse, strategy)
        for items in by_op.values():
            rng.shuffle(items)
        ops = sorted(by_op)
        rng.shuffle(ops)
        out: list[Perturbation] = []
        seen = {_normal(parse.caption)}
        while len(out) < n and any(by_op[o] for o in ops):
            for op in ops:
                while by_op[op]:
                    p = by_op[op].pop()
                    if _normal(p.caption) not in seen:
                        seen.add(_normal(p.caption))
                        out.append(p)
                        break
                if len(out) == n:
                    break
        return out

    def _concept(self, parse: CaptionParse) -> dict[str, list[Perturbation]]:
        make = _maker("concept")
        ops: dict[str, list[Perturbation]] = {"add": []}
        concepts = frozenset().union(*(e.concepts for e in parse.events))
        for phrase in self.vocabulary.unrelated(concepts):
            ops["add"].append(make(add(parse, phrase, "and"), "add", phrase))
        if len(parse.events) >= 2:  # with one event, omit/replace would keep nothing of the original
            ops["omit"] = [make(omit(parse, i), "omit", e.standalone) for i, e in enumerate(parse.events)]
            ops["replace"] = [
                make(replace(parse, i, phrase), "replace", f"{e.standalone} -> {phrase}")
                for i, e in enumerate(parse.events)
                for phrase in self.vocabulary.related(e.concepts)
                if not content_stems(phrase) & concepts  # a new sound, not one the caption already has
            ]
        return ops

    def _temporal(self, parse: CaptionParse) -> dict[str, list[Perturbation]]:
        make = _maker("temporal")
        ops: dict[str, list[Perturbation]] = {"swap": [], "invert": [], "serialize": []}
        for i in range(1, len(parse.events)):
            conn = parse.connectors[i]
            if conn not in TEMPORAL_CONNECTORS:
                continue
            rel = CONNECTORS[conn]
            if rel in (BEFORE, AFTER):
                ops["swap"].append(make(swap(parse, i - 1), "swap", f"events {i - 1},{i} around {conn!r}"))
                flipped = "after" if rel == BEFORE else "before"
                ops["invert"].append(make(with_connector(parse, i, flipped), "invert", f"{conn!r} -> {flipped!r}"))
            elif rel == SAME:
                ops["serialize"].append(make(with_connector(parse, i, "then"), "serialize", f"{conn!r} -> 'then'"))
                ops["swap"].append(make(swap(parse, i - 1, "followed by"), "swap", f"events {i - 1},{i} in sequence"))
        concepts = frozenset().union(*(e.concepts for e in parse.events))
        extra = self.vocabulary.unrelated(concepts)
        ops["add"] = [make(add(parse, p, "then"), "add", f"then {p}") for p in extra]
        ops["add"] += [make(add(parse, p, "followed by", at_start=True), "add", f"{p} first") for p in extra]
        if len(parse.events) >= 2:
            ops["omit"] = [make(omit(parse, i), "omit", e.standalone) for i, e in enumerate(parse.events)]
        return {k: v for k, v in ops.items() if v}


def _maker(strategy: str) -> Callable[[str, str, str], Perturbation]:
    return lambda caption, op, detail: Perturbation(caption, strategy, op, detail)


def _normal(caption: str) -> str:
    return " ".join(re.findall(r"[a-z]+", caption.lower()))


# ---------------------------------------------------------------------------------------------- validation
_ALLOWED = re.compile(r"^[A-Za-z][A-Za-z ,'\-]*$")


def validate_perturbation(parse: CaptionParse, text: str, strategy: str,
                          known_nouns: frozenset[str] | None = None) -> str | None:
    """Why ``text`` is not a usable perturbation of ``parse`` for ``strategy``, or None if it is.

    Usable: one plain caption line of reasonable length, different from the original, sharing at least one
    content word with it (keeps some concepts), and changing the concepts or (for ``temporal``) the time order.
    """
    text = text.strip().rstrip(".")
    words = text.split()
    if not words:
        return "empty"
    if not _ALLOWED.match(text):
        return "not a plain caption (unexpected characters)"
    if len(words) < 2 or len(words) > 3 * len(parse.caption.split()) + 5:
        return f"implausible length ({len(words)} words)"
    if _normal(text) == _normal(parse.caption):
        return "identical to the original"
    original = content_stems(parse.caption)
    new = content_stems(text)
    if not (original & new):
        return "keeps none of the original concepts"
    if strategy == "temporal":
        other = parse_caption(text, known_nouns)
        if not other.is_temporal and not parse.is_temporal:
            return "no temporal relation"
        if _timeline(other) == _timeline(parse):
            return "same events in the same order"
        return None
    if new == original:
        return "same concepts as the original"
    return None


def _timeline(parse: CaptionParse) -> tuple[frozenset[str], ...]:
    """The content words happening at each time step: equal timelines describe the same scene."""
    return tuple(frozenset().union(*(parse.events[i].concepts for i in step)) for step in parse.order)


# ---------------------------------------------------------------------------------------------- LLM
DEFAULT_LLM_PROMPT = (
    "Rewrite this audio caption so that it describes a different but related sound scene. Strategy: {strategy} "
    "({instruction}). Keep some of the original sound events. Answer with one caption per line.\n"
    "Caption: {caption}\n"
)
_INSTRUCTIONS = {
    "concept": "drop an event or replace it with a related but different sound",
    "temporal": "change the order of the events, or add or remove one event",
}


class LLMPerturber:
    """Perturbations written by a local transformers causal LM, validated against the parse.

    ``prompt`` is a format string with ``{caption}``, ``{strategy}`` and ``{instruction}``; it is sent through the
    tokenizer's chat template when it has one. Sampling is seeded per caption. Outputs that fail
    :func:`validate_perturbation` are dropped and counted in :attr:`rejections` (reason -> count); when fewer than
    ``n`` remain, ``fallback`` (default: the rule-based perturber) fills up, or nothing if ``fallback=None``.
    """

    def __init__(self, model_path: str, prompt: str = DEFAULT_LLM_PROMPT, max_new_tokens: int = 48,
                 temperature: float = 0.9, num_samples: int = 8, seed: int = 0,
                 fallback: Perturber | None | str = "rules", vocabulary: Vocabulary | None = None,
                 model=None, tokenizer=None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.model = model or AutoModelForCausalLM.from_pretrained(model_path).eval()
        self.tokenizer = tokenizer or AutoTokenizer.from_pretrained(model_path)
        self.model_path, self.prompt = model_path, prompt
        self.max_new_tokens, self.temperature, self.num_samples, self.seed = (max_new_tokens, temperature,
                                                                               num_samples, seed)
        self.vocabulary = vocabulary or Vocabulary.default()
        self.fallback = RuleBasedPerturber(self.vocabulary, seed) if fallback == "rules" else fallback
        self.rejections: Counter[str] = Counter()

    def perturb(self, parse: CaptionParse, strategy: str, n: int) -> list[Perturbation]:
        if strategy == "temporal" and not parse.is_temporal:
            return []
        out, seen = [], {_normal(parse.caption)}
        for line in self.generate(parse, strategy):
            text = _clean_line(line)
            reason = validate_perturbation(parse, text, strategy, self.vocabulary.nouns)
            if reason is None and _normal(text) in seen:
                reason = "duplicate"
            if reason is not None:
                self.rejections[reason] += 1
                continue
            seen.add(_normal(text))
            out.append(Perturbation(text, strategy, "llm", self.model_path))
            if len(out) == n:
                return out
        if self.fallback is not None:
            for p in self.fallback.perturb(parse, strategy, n + len(out)):
                if len(out) < n and _normal(p.caption) not in seen:
                    seen.add(_normal(p.caption))
                    out.append(p)
        return out

    def generate(self, parse: CaptionParse, strategy: str) -> list[str]:
        """Raw text lines sampled from the model (seeded by the caption)."""
        import torch

        text = self.prompt.format(caption=parse.caption, strategy=strategy, instruction=_INSTRUCTIONS[strategy])
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                      add_generation_prompt=True)
        enc = self.tokenizer(text, return_tensors="pt")
        seed = caption_rng(self.seed, "llm", strategy, parse.caption).getrandbits(63)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            ids = self.model.generate(**enc, do_sample=True, temperature=self.temperature, top_p=0.95,
                                      max_new_tokens=self.max_new_tokens, num_return_sequences=self.num_samples,
                                      pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        new = ids[:, enc["input_ids"].shape[1]:]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return [line for t in texts for line in t.splitlines() if line.strip()]


def _clean_line(line: str) -> str:
    """Strip list bullets, numbering and quotes a chat model tends to add."""
    line = re.sub(r"^\s*(?:[-*\u2022]|\d+[.)])\s*", "", line.strip())
    return line.strip().strip("\"'").strip()
