"""The concept vocabulary: sound events grouped by category, used to replace an event with a related one.

A vocabulary is ``{category: [event phrase, ...]}``. An event of a caption belongs to the category of the phrase it
shares the most content words with ("a dog barking loudly" ~ "a dog barks" -> ``animals``); a replacement is another
phrase of the same category that shares none of them ("a cat meows"), so the perturbed caption names a *related but
different* sound. Users can supply their own as YAML or JSON (``perturb.vocabulary: path``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import yaml

from mmpref.synthesis.words import STOPWORDS, content_stems, stem

DEFAULT_VOCABULARY: dict[str, list[str]] = {
    "animals": [
        "a dog barks", "a cat meows", "birds chirp", "a rooster crows", "a cow moos", "sheep bleat", "a horse neighs",
        "ducks quack", "frogs croak", "insects buzz", "a pig oinks", "an owl hoots", "pigeons coo", "a goat bleats",
    ],
    "people": [
        "a man speaks", "a woman speaks", "a baby cries", "a child laughs", "a crowd cheers", "people applaud",
        "a man coughs", "a woman sings", "someone whistles", "applause erupts", "a girl screams", "a person sneezes",
        "people talk",
    ],
    "vehicles": [
        "a car engine revs", "a train passes", "a motorcycle accelerates", "a bus idles", "a truck honks its horn",
        "an airplane flies overhead", "a helicopter hovers", "a motorboat engine runs", "a siren wails",
        "a vehicle drives by", "a car horn honks",
    ],
    "nature": [
        "wind blows", "rain falls", "thunder rumbles", "water flows in a stream", "waves crash on the shore",
        "leaves rustle", "a fire crackles", "water drips", "water splashes",
    ],
    "domestic": [
        "a door slams", "someone knocks on a door", "a clock ticks", "a phone rings", "someone types on a keyboard",
        "dishes clatter", "a toilet flushes", "food sizzles in a pan", "a vacuum cleaner hums", "footsteps approach",
        "glass shatters", "a bell rings", "an alarm beeps",
    ],
    "tools": [
        "a drill whirs", "a hammer pounds", "a saw cuts wood", "an engine idles", "a machine hums", "a lawn mower runs",
        "a chainsaw buzzes", "metal clanks",
    ],
    "music": [
        "a guitar plays", "a piano plays", "drums beat", "music plays", "a violin plays", "a trumpet blares",
    ],
}


@dataclass(frozen=True)
class Vocabulary:
    """Categories of event phrases, with the content-word stems of each phrase precomputed."""

    categories: dict[str, tuple[str, ...]]

    @classmethod
    def default(cls) -> Vocabulary:
        return cls({k: tuple(v) for k, v in DEFAULT_VOCABULARY.items()})

    @classmethod
    def load(cls, source: str | os.PathLike | dict | list | None) -> Vocabulary:
        """``None`` -> the default; a dict ``{category: [phrases]}``; a flat list of phrases (one category); or a
        YAML/JSON file holding either (errors name the file)."""
        if source is None:
            return cls.default()
        if isinstance(source, list):
            source = {"all": source}
        if isinstance(source, dict):
            raw, where = source, "<dict>"
        else:
            where = os.fspath(source)
            try:
                text = Path(source).read_text()
            except OSError as e:
                raise ValueError(f"perturb.vocabulary: cannot read {where}: {e}") from None
            raw = json.loads(text) if where.endswith(".json") else yaml.safe_load(text)
            raw = {"all": raw} if isinstance(raw, list) else raw
        if not isinstance(raw, dict) or not raw:
            raise ValueError(f"perturb.vocabulary {where}: expected a mapping {{category: [event phrases]}}")
        cats = {}
        for name, phrases in raw.items():
            if not isinstance(phrases, list) or not phrases or not all(isinstance(p, str) and p for p in phrases):
                raise ValueError(f"perturb.vocabulary {where}: category {name!r} must be a non-empty list of strings")
            cats[str(name)] = tuple(phrases)
        return cls(cats)

    @property
    def phrases(self) -> list[tuple[str, str]]:
        """``(category, phrase)`` in a fixed order."""
        return [(c, p) for c in sorted(self.categories) for p in self.categories[c]]

    @property
    def nouns(self) -> frozenset[str]:
        """Stems of the first content word of each phrase (its sound source): words that start a clause."""
        return frozenset(s for _, p in self.phrases for s in list(_ordered_stems(p))[:1])

    def category_of(self, concepts: frozenset[str]) -> str | None:
        """The category whose phrase shares the most content stems with ``concepts`` (ties: first in order)."""
        best, best_overlap = None, 0
        for cat, phrase in self.phrases:
            overlap = len(concepts & content_stems(phrase))
            if overlap > best_overlap:
                best, best_overlap = cat, overlap
        return best

    def related(self, concepts: frozenset[str]) -> list[str]:
        """Phrases of the same category sharing no content stem with ``concepts`` (all phrases if no category)."""
        cat = self.category_of(concepts)
        pool = self.categories[cat] if cat else [p for _, p in self.phrases]
        return [p for p in pool if not (content_stems(p) & concepts)]

    def unrelated(self, concepts: frozenset[str]) -> list[str]:
        """Phrases sharing no content stem with ``concepts`` (candidates for an added event)."""
        return [p for _, p in self.phrases if not (content_stems(p) & concepts)]


def _ordered_stems(phrase: str) -> list[str]:
    return [stem(w) for w in phrase.lower().split() if w not in STOPWORDS]
