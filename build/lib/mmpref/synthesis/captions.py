"""Caption parsing: sound events and the temporal relations between them.

AudioCaps-style captions chain event clauses with a small set of connectors ("A man speaks, then a dog barks while
birds chirp"). The parser splits on those connectors (rule-based, deterministic: no model, no randomness) and
derives a time order: ``then``/``followed by``/``before`` put the next event later, ``after`` earlier, and
``while``/``as``/``and``/commas at the same time. The :class:`CaptionParse` is returned as-is so users can inspect
what a perturbation will work on (``parse_caption(text).to_dict()``).

A clause without its own subject ("A car engine revs *then accelerates away*") inherits the subject of the clause
before it, so it can be rendered on its own ("a car engine accelerates away") when perturbations move or drop events.
"""

from __future__ import annotations

import functools
import re
from dataclasses import asdict, dataclass, field

from mmpref.synthesis.words import ARTICLES, DETERMINERS, content_stems, stem

# connector -> relation between the event before it (A) and the event after it (B)
BEFORE, AFTER, SAME = "before", "after", "simultaneous"  # A before B / A after B / A with B
CONNECTORS: dict[str, str] = {
    **dict.fromkeys(["and then", "then", "followed by", "before", "and finally", "finally", "and later", "later",
                     "after that", "afterwards"], BEFORE),
    **dict.fromkeys(["after", "following", "preceded by"], AFTER),
    **dict.fromkeys(["while", "as", "over", "during", "along with"], SAME),
    "and": SAME,
    ",": SAME,
}
TEMPORAL_CONNECTORS = frozenset(c for c in CONNECTORS if c not in ("and", ","))

# ", and then" / ", then" / ", and" count as the word connector; longest alternatives first
_WORDS = "|".join(c.replace(" ", r"\s+") for c in sorted(CONNECTORS, key=len, reverse=True) if c != ",")
_SPLIT = re.compile(rf"\s*,\s*(?:{_WORDS})?\s+|\s+({_WORDS})\s+", re.IGNORECASE)
# "after X, Y" = X then Y; "while X, Y" = X while Y; "first X, then Y": "first" only marks the start
_LEADING = re.compile(r"^(after|while|as)\s+([^,]+),\s*(.+)$", re.IGNORECASE)
_FIRST = re.compile(r"^first\s*,?\s+", re.IGNORECASE)
@dataclass(frozen=True)
class Event:
    """One sound event: ``text`` as written in the caption, ``subject`` inherited from the clause before (if any)."""

    text: str
    subject: str | None = None

    @property
    def standalone(self) -> str:
        """The clause with its inherited subject, so it reads on its own ("a car engine accelerates away")."""
        return f"{self.subject} {self.text}" if self.subject else self.text

    @property
    def concepts(self) -> frozenset[str]:
        """Content-word stems of the clause (with its subject): what 'keeps a concept' is measured on."""
        return content_stems(self.standalone)


@dataclass(frozen=True)
class CaptionParse:
    """Events in caption order, the connector before each event (``""`` for the first) and the time order.

    ``order`` lists groups of event indices, earliest first; events in one group overlap in time.
    """

    caption: str
    events: tuple[Event, ...]
    connectors: tuple[str, ...]
    order: tuple[tuple[int, ...], ...] = field(default=())

    @property
    def has_order(self) -> bool:
        """True when some event happens before another (a sequential caption)."""
        return len(self.order) > 1

    @property
    def is_temporal(self) -> bool:
        """True when the caption uses a temporal word (Tango 2's strategy 3 applies to these captions)."""
        return any(c in TEMPORAL_CONNECTORS for c in self.connectors)

    @property
    def relations(self) -> list[tuple[int, str, int]]:
        """``(i, relation, i + 1)`` for each pair of neighbouring events."""
        return [(i - 1, CONNECTORS[c], i) for i, c in enumerate(self.connectors) if i > 0]

    def to_dict(self) -> dict:
        return {**asdict(self), "relations": self.relations, "has_order": self.has_order}


def soundless_events(parse: CaptionParse) -> list[str]:
    """Events that name nothing that sounds: only articles, stop words and adverbs ("the the the", "slowly").

    A caption made of such events is not a caption the perturbations can work on: dropping or replacing its
    "events" writes losers like "The the the and a woman sings"."""
    return [e.text for e in parse.events if not {w for w in content_stems(e.standalone) if not _adverb(w)}]


def _adverb(word: str) -> bool:
    return len(word) > 4 and word.endswith("ly")  # quickly, gently; not "fly"


def parse_caption(caption: str, known_nouns: frozenset[str] | None = None) -> CaptionParse:
    """Split ``caption`` into events and connectors; see the module docstring.

    ``known_nouns`` (stems) mark words that start a clause with its own subject ("insects buzz") even without a
    determiner; default: the sound sources of the default concept vocabulary.
    """
    if known_nouns is None:
        known_nouns = _default_nouns()
    text = " ".join(caption.strip().rstrip(".!").split())
    if not text:
        raise ValueError("cannot parse an empty caption")
    text = _FIRST.sub("", text)
    lead = _LEADING.match(text)
    if lead:
        word, first, rest = lead.groups()
        text = f"{first} {'then' if word.lower() == 'after' else 'while'} {rest}"
    parts, connectors, pos = [], [""], 0
    for m in _SPLIT.finditer(text):
        parts.append(text[pos: m.start()])
        connectors.append(_connector_of(m.group(0)))
        pos = m.end()
    parts.append(text[pos:])
    events, merged = _to_events(parts, connectors, known_nouns)
    return CaptionParse(caption, tuple(events), tuple(merged), _time_order(merged))


@functools.cache
def _default_nouns() -> frozenset[str]:
    from mmpref.synthesis.vocabulary import Vocabulary

    return Vocabulary.default().nouns


def _connector_of(separator: str) -> str:
    words = " ".join(re.findall(r"[a-z]+", separator.lower()))
    return words if words else ","


def _to_events(parts: list[str], connectors: list[str], known_nouns: frozenset[str]) -> tuple[list[Event], list[str]]:
    """Events from the split clauses; empty clauses (", and" at the very end) are dropped with their connector."""
    events: list[Event] = []
    kept: list[str] = []
    for part, conn in zip(parts, connectors):
        part = part.strip(" ,;")
        if not part:
            continue
        subject = None
        if events and not _has_subject(part, known_nouns):
            prev = events[-1]
            subject = prev.subject or _subject_of(prev.text, known_nouns)
        events.append(Event(part, subject))
        kept.append(conn if kept else "")
    return events, kept


def _has_subject(clause: str, known_nouns: frozenset[str]) -> bool:
    """A clause has its own subject unless it starts with a verb-like word ('accelerates', 'tweeting')."""
    first = clause.split()[0].lower()
    if first in DETERMINERS or stem(first) in known_nouns:
        return True
    return not (first.endswith("s") or first.endswith("ing") or first.endswith("ed"))


def _subject_of(clause: str, known_nouns: frozenset[str]) -> str | None:
    """The words before the clause's verb: up to the first verb-like word after the first noun-ish word."""
    words = clause.split()
    for i in range(1, len(words)):
        w = words[i].lower()
        if stem(w) in known_nouns and i + 1 < len(words):
            continue
        if w.endswith("s") or w.endswith("ing") or w.endswith("ed"):
            prev = words[i - 1].lower()
            if prev in ARTICLES:  # "a bus" -> 'bus' is the noun, not the verb
                continue
            return " ".join(words[:i]).lower() if words[0].lower() in DETERMINERS else " ".join(words[:i])
    return None


def _time_order(connectors: list[str] | tuple[str, ...]) -> tuple[tuple[int, ...], ...]:
    """Groups of simultaneous events, earliest first, from the chain of pairwise relations."""
    groups: list[list[int]] = [[0]]
    current = 0  # index of the group holding the last event
    for i, conn in enumerate(connectors[1:], start=1):
        rel = CONNECTORS[conn]
        if rel == SAME:
            groups[current].append(i)
        elif rel == BEFORE:
            current += 1
            groups.insert(current, [i])
        else:  # AFTER: event i happened before the previous one
            groups.insert(current, [i])
    return tuple(tuple(g) for g in groups)


def render(events: list[Event] | tuple[Event, ...], connectors: list[str] | tuple[str, ...]) -> str:
    """Join events with connectors into a caption (first letter upper-case, inherited subjects made explicit
    where an event no longer follows the clause it borrowed its subject from)."""
    out, prev = "", None
    for i, (ev, conn) in enumerate(zip(events, connectors)):
        borrowed_from_prev = prev is not None and ev.subject and prev.standalone.lower().startswith(ev.subject.lower())
        text = ev.text if borrowed_from_prev else ev.standalone
        prev = ev
        if i == 0:
            out = text
            continue
        first, _, rest = text.partition(" ")
        if not (first.isupper() and len(first) > 1):  # keep acronyms ("TV"), lower-case a moved first word
            text = f"{first[:1].lower()}{first[1:]} {rest}".strip()
        if conn == ",":
            out += ", " + text
        else:
            out += f" {conn} {text}"
    return out[:1].upper() + out[1:]


__all__ = [
    "AFTER",
    "BEFORE",
    "CONNECTORS",
    "SAME",
    "CaptionParse",
    "Event",
    "content_stems",
    "parse_caption",
    "render",
    "soundless_events",
    "stem",
]
