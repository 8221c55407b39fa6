"""An offline sound-event world: synthetic scenes, their audio, captions and the caption parser.

Ten sound events (:data:`EVENT_NAMES`) are synthesised from seeded numpy noise and oscillators, with random pitch,
duration, loudness and position. A :class:`Scene` holds 1-3 distinct events arranged in *steps*: steps follow each
other without overlap; the events of one step overlap ("a hum while clicks play": one sustained background event
plus one foreground event). Captions name the events with several synonyms and temporal templates, and
:func:`parse_caption` inverts them (it also reads perturbed captions: omitted, replaced or reordered events).

Caption grammar understood by the parser (case-insensitive, punctuation other than commas ignored):

* sequence, left to right: ``then``, ``and then``, ``followed by``, ``before``, ``and finally``, ``finally``,
  ``after that``, ``later``, ``and``, ``,`` (a leading ``after X, Y`` also means X then Y);
* sequence, right to left: ``after``, ``following``, ``preceded by`` (``a beep after a bell`` = bell, then beep);
* overlap: ``while``, ``as``, ``over``, ``during``, ``with``, ``along with`` (a leading ``while X, Y`` too).

Overlap binds tighter than sequence; a left-to-right connector appends a step at the end, a right-to-left one
inserts the new step just before the previous one.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# --------------------------------------------------------------------------------------------------------------
# Event vocabulary
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EventSpec:
    """One sound event: its caption phrases, the words that identify it, and its duration range (seconds)."""

    name: str
    phrases: tuple[str, ...]  # first one is the canonical phrase (e.g. a perturber's replacement text)
    keywords: tuple[str, ...]  # regex word stems; unique to this event
    duration: tuple[float, float]
    sustained: bool = False  # may be the background of a "while" step


EVENTS: dict[str, EventSpec] = {
    e.name: e
    for e in (
        EventSpec("beep", ("a beep", "a short beep", "a beep sounds", "an electronic beep", "a short tone"),
                  (r"beep\w*", r"tones?"), (0.2, 0.5)),
        EventSpec("chirp", ("a bird chirps", "a chirp", "a chirping bird", "a quick chirp", "a bird tweets"),
                  (r"chirp\w*", r"birds?", r"tweet\w*"), (0.25, 0.5)),
        EventSpec("knock", ("a knock", "someone knocks", "knocking on a door", "tapping on wood", "a few knocks"),
                  (r"knock\w*", r"tap\w*", r"door", r"wood"), (0.3, 0.6)),
        EventSpec("hum", ("a low hum", "a hum", "an engine hums", "a humming motor", "a low drone"),
                  (r"hum\w*", r"drone\w*", r"engines?", r"motors?"), (0.6, 1.2), sustained=True),
        EventSpec("noise", ("a burst of noise", "a hiss", "a burst of static", "white noise", "hissing static"),
                  (r"noise\w*", r"hiss\w*", r"static"), (0.2, 0.5)),
        EventSpec("clicks", ("clicks play", "a series of clicks", "clicking", "a clock ticks", "rapid ticking"),
                  (r"click\w*", r"tick\w*", r"clocks?"), (0.35, 0.8)),
        EventSpec("bell", ("a bell rings", "a bell", "a bell chimes", "the ringing of a bell", "a chime"),
                  (r"bells?", r"chim\w*", r"ring\w*"), (0.5, 1.0)),
        EventSpec("siren", ("a siren wails", "a siren", "a wailing siren", "an alarm wails", "a distant siren"),
                  (r"sirens?", r"wail\w*", r"alarms?"), (0.6, 1.2), sustained=True),
        EventSpec("whistle", ("someone whistles", "a whistle", "a high whistle", "whistling", "a shrill whistle"),
                  (r"whistl\w*",), (0.3, 0.7)),
        EventSpec("bark", ("a dog barks", "a bark", "barking", "a dog-like bark", "a dog yelps"),
                  (r"bark\w*", r"dogs?", r"yelp\w*"), (0.25, 0.6)),
    )
}
EVENT_NAMES: tuple[str, ...] = tuple(EVENTS)


def event_phrase(name: str) -> str:
    """The canonical caption phrase of an event (``"bell" -> "a bell rings"``)."""
    return EVENTS[name].phrases[0]


# --------------------------------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scene:
    """Ground truth of a clip.

    ``order`` is the sequence of steps; the events of one step overlap (sorted by name inside the step).
    ``events`` is ``order`` flattened; ``onsets`` / ``durations`` (seconds) align with ``events`` and are empty
    for a scene parsed from a caption.
    """

    events: tuple[str, ...]
    order: tuple[tuple[str, ...], ...]
    caption: str = ""
    onsets: tuple[float, ...] = ()
    durations: tuple[float, ...] = ()

    @classmethod
    def from_order(cls, order: Sequence[Sequence[str]], **kw) -> Scene:
        steps = tuple(tuple(sorted(s)) for s in order if len(s))
        return cls(events=tuple(e for s in steps for e in s), order=steps, **kw)

    def step_of(self, event: str) -> int:
        return next(i for i, s in enumerate(self.order) if event in s)

    def relation(self, a: str, b: str) -> str:
        """``"before"``, ``"after"`` or ``"with"``: when ``a`` happens relative to ``b``."""
        i, j = self.step_of(a), self.step_of(b)
        return "with" if i == j else ("before" if i < j else "after")

    def to_dict(self) -> dict:
        return {"events": list(self.events), "order": [list(s) for s in self.order], "caption": self.caption,
                "onsets": list(self.onsets), "durations": list(self.durations)}

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        return cls(events=tuple(d["events"]), order=tuple(tuple(s) for s in d["order"]),
                   caption=d.get("caption", ""), onsets=tuple(d.get("onsets", ())),
                   durations=tuple(d.get("durations", ())))


# --------------------------------------------------------------------------------------------------------------
# Captions: templates and the parser
# --------------------------------------------------------------------------------------------------------------

_WHILE_TEMPLATES = ("{fg} while {bg}", "{fg} as {bg}", "{bg} while {fg}", "{fg} over {bg}",
                    "{bg} as {fg}", "while {bg}, {fg}")
_TEMPLATES: dict[int, tuple[str, ...]] = {
    1: ("{0}", "the sound of {0}", "a recording of {0}", "{0} can be heard"),
    2: ("{0}, then {1}", "{0}, followed by {1}", "{0} before {1}", "{1} after {0}", "after {0}, {1}",
        "{0} and then {1}", "first {0}, then {1}", "{0}, and later {1}"),
    3: ("{0}, then {1}, then {2}", "{0}, followed by {1} and then {2}", "{0}, {1}, and finally {2}",
        "first {0}, then {1}, and finally {2}", "{0} before {1}, then {2}", "{0}, then {2} after {1}",
        "{0}, {1} and then {2}"),
}

# connector -> kind; longest alternatives first so "and then" wins over "and"
_CONNECTORS: tuple[tuple[str, str], ...] = (
    ("and then", "seq"), ("and finally", "seq"), ("and later", "seq"), ("followed by", "seq"),
    ("after that", "seq"), ("afterwards", "seq"), ("then", "seq"), ("before", "seq"), ("finally", "seq"),
    ("later", "seq"), ("next", "seq"), ("preceded by", "rev"), ("following", "rev"), ("after", "rev"),
    ("along with", "sim"), ("while", "sim"), ("as", "sim"), ("over", "sim"), ("during", "sim"), ("with", "sim"),
    ("and", "seq"), (",", "seq"),
)
_CONNECTOR_RE = re.compile(
    r"\s*(?:" + "|".join(r"\b" + re.escape(c) + r"\b" if c[0].isalpha() else re.escape(c)
                         for c, _ in _CONNECTORS) + r")\s*")
_CONNECTOR_KIND = dict(_CONNECTORS)
_KEYWORD_RE = [(name, re.compile(r"\b(?:" + "|".join(spec.keywords) + r")\b")) for name, spec in EVENTS.items()]


def _events_in(text: str) -> list[str]:
    """Events named in a caption fragment, in textual order."""
    hits = [(m.start(), name) for name, rx in _KEYWORD_RE for m in rx.finditer(text)]
    out: list[str] = []
    for _, name in sorted(hits):
        if name not in out:
            out.append(name)
    return out


def _tokenise(caption: str) -> list[tuple[str, str]]:
    """``[(kind, fragment), ...]``: each non-empty fragment with the connector that joins it to the previous one.

    Runs of connectors (``", then"``) take their first non-``seq`` kind. A leading ``while X, Y`` joins X and Y
    (``sim``); a leading ``after X, Y`` is X then Y.
    """
    text = re.sub(r"[^a-z,\s-]", " ", caption.lower())
    pieces, conns = _CONNECTOR_RE.split(text), _CONNECTOR_RE.findall(text)
    out: list[tuple[str, str]] = []
    acc: list[str] = []
    lead: str | None = None
    for i, frag in enumerate(pieces):
        if i > 0:
            acc.append(_CONNECTOR_KIND[conns[i - 1].strip() or ","])
        if not frag.strip():
            continue
        kind = next((k for k in acc if k != "seq"), "seq")
        if not out:
            lead, kind = kind, "seq"
        elif lead is not None:
            kind = "sim" if lead == "sim" and kind == "seq" else kind
            lead = None
        out.append((kind, frag))
        acc = []
    return out


def parse_caption(caption: str) -> Scene:
    """Ground-truth events and order named by a caption (the inverse of :meth:`World.caption`).

    Unknown words are ignored; an event named twice counts once (at its first mention).
    """
    steps: list[list[str]] = []
    cur = -1
    seen: set[str] = set()
    for kind, frag in _tokenise(caption):
        for k, name in enumerate(_events_in(frag)):
            if name in seen:
                continue
            seen.add(name)
            kind_k = kind if k == 0 else "seq"  # several events in one fragment: listed in order
            if kind_k == "sim" and cur >= 0:
                steps[cur].append(name)
            elif kind_k == "rev" and cur >= 0:
                steps.insert(cur, [name])
            else:
                steps.append([name])
                cur = len(steps) - 1
    return Scene.from_order(steps, caption=caption)


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


# --------------------------------------------------------------------------------------------------------------
# Event synthesis (all at unit-ish peak; loudness is applied by the mixer)
# --------------------------------------------------------------------------------------------------------------


def _env(n: int, sr: int, attack: float, release: float) -> np.ndarray:
    """Linear attack/release envelope of ``n`` samples."""
    env = np.ones(n)
    a, r = min(n // 2, int(attack * sr)), min(n // 2, int(release * sr))
    if a:
        env[:a] = np.linspace(0.0, 1.0, a)
    if r:
        env[n - r:] = np.minimum(env[n - r:], np.linspace(1.0, 0.0, r))
    return env


def _osc(freq: np.ndarray | float, n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    """Sine with a (possibly time-varying) frequency and a random start phase."""
    f = np.broadcast_to(np.asarray(freq, dtype=np.float64), (n,))
    return np.sin(2 * np.pi * np.cumsum(f) / sr + rng.uniform(0, 2 * np.pi))


def _count(n: int, sr: int, spacing: float, lo: int, hi: int) -> int:
    """How many sub-sounds ``spacing`` seconds apart fill ``n`` samples (so an event has no long silent tail)."""
    return int(np.clip(round(n / sr / spacing), lo, hi))


def _place(n: int, count: int, length: int) -> list[int]:
    """Start samples of ``count`` equally spaced sub-sounds of ``length`` samples inside ``n`` samples."""
    if count == 1:
        return [0]
    step = (n - length) / (count - 1)
    return [int(i * step) for i in range(count)]


def _beep(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    f = rng.uniform(700, 1300)
    return (_osc(f, n, sr, rng) + 0.15 * _osc(2 * f, n, sr, rng)) * _env(n, sr, 0.01, 0.01)


def _chirp(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    out = np.zeros(n)
    count = _count(n, sr, 0.15, 2, 4)
    sub = min(n // count, int(rng.uniform(0.06, 0.1) * sr))
    f0, ratio = rng.uniform(2000, 3000), rng.uniform(1.5, 2.0)
    for start in _place(n, count, sub):
        f = f0 * ratio ** np.linspace(0, 1, sub)
        out[start:start + sub] += _osc(f, sub, sr, rng) * np.hanning(sub)
    return out


def _knock(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    out = np.zeros(n)
    count = _count(n, sr, 0.13, 2, 5)
    sub = min(n // count, int(0.08 * sr))
    f, tau = rng.uniform(150, 350), rng.uniform(0.015, 0.03)
    t = np.arange(sub) / sr
    for start in _place(n, count, sub):
        thud = np.sin(2 * np.pi * f * t) * np.exp(-t / tau)
        crack = rng.standard_normal(sub) * np.exp(-t / 0.003) * 0.5
        out[start:start + sub] += thud + crack
    return out


def _hum(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    f0, t = rng.uniform(90, 160), np.arange(n) / sr
    wave = sum(_osc(k * f0, n, sr, rng) / k for k in range(1, 9))
    am = 1 + 0.05 * np.sin(2 * np.pi * rng.uniform(2, 5) * t)
    return wave * am * _env(n, sr, 0.05, 0.05) / 2.0


def _noise(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal(n) * 0.3 * _env(n, sr, 0.01, 0.02)


def _clicks(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    out, rate = np.zeros(n), rng.uniform(8, 20)
    width = int(0.003 * sr)
    click = np.diff(rng.standard_normal(width + 1)) * np.exp(-np.arange(width) / (0.0008 * sr))  # high-passed
    for start in np.arange(0, n - width, sr / rate).astype(int):
        out[start:start + width] += click
    return out


def _bell(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    f0, tau, t = rng.uniform(500, 900), rng.uniform(0.25, 0.5), np.arange(n) / sr
    partials = ((1.0, 1.0), (2.0, 0.6), (2.76, 0.5), (5.4, 0.3), (8.93, 0.2))
    wave = sum(a * _osc(r * f0, n, sr, rng) * np.exp(-t * math.sqrt(r) / tau) for r, a in partials if r * f0 < 7500)
    return wave * _env(n, sr, 0.002, 0.05) / 2.0


def _siren(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(n) / sr
    f = rng.uniform(800, 1200) + rng.uniform(200, 400) * np.sin(2 * np.pi * rng.uniform(1.5, 3.0) * t)
    return (_osc(f, n, sr, rng) + 0.2 * _osc(3 * f, n, sr, rng)) * _env(n, sr, 0.05, 0.05)


def _whistle(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(n) / sr
    f = rng.uniform(2200, 3200) * (1 + 0.02 * np.sin(2 * np.pi * rng.uniform(5, 7) * t) + rng.uniform(-0.05, 0.05) * t)
    return _osc(f, n, sr, rng) * _env(n, sr, 0.03, 0.03)


def _bark(n: int, sr: int, rng: np.random.Generator) -> np.ndarray:
    out = np.zeros(n)
    count = _count(n, sr, 0.25, 1, 3)
    sub = min(n // count, int(rng.uniform(0.1, 0.15) * sr))
    f0 = rng.uniform(400, 600)
    t = np.arange(sub) / sr
    formant = rng.uniform(1000, 1500)
    for start in _place(n, count, sub):
        f = f0 * (1 - 0.3 * t / t[-1])
        voice = sum(_osc(k * f, sub, sr, rng) * math.exp(-((k * f0 - formant) / 800) ** 2) for k in range(1, 13))
        burst = voice + 0.2 * rng.standard_normal(sub)
        out[start:start + sub] += burst * np.exp(-t / 0.05) * _env(sub, sr, 0.005, 0.01)
    return out


SYNTHS: dict[str, Callable[[int, int, np.random.Generator], np.ndarray]] = {
    "beep": _beep, "chirp": _chirp, "knock": _knock, "hum": _hum, "noise": _noise, "clicks": _clicks,
    "bell": _bell, "siren": _siren, "whistle": _whistle, "bark": _bark,
}


# --------------------------------------------------------------------------------------------------------------
# The world
# --------------------------------------------------------------------------------------------------------------


@dataclass
class World:
    """Samples scenes, renders them to audio and captions them; all randomness comes from the given generator.

    ``duration_s`` is the clip length (default 2.56 s = 256 Tango mel frames). ``p_events`` are the probabilities
    of 1, 2, 3 events; ``p_while`` is the probability that a multi-event scene overlaps two events.
    """

    seed: int = 0
    duration_s: float = 2.56
    sample_rate: int = 16000
    events: tuple[str, ...] = EVENT_NAMES
    p_events: tuple[float, ...] = (0.2, 0.4, 0.4)
    p_while: float = 0.25
    margin_s: float = 0.1  # silence kept at both ends of the clip
    gap_s: float = 0.06  # minimum silence between sequential steps
    _layouts: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        unknown = set(self.events) - set(EVENTS)
        if unknown:
            raise ValueError(f"unknown events {sorted(unknown)}; known: {EVENT_NAMES}")
        if len(self.p_events) > len(self.events) or not math.isclose(sum(self.p_events), 1.0):
            raise ValueError("p_events must sum to 1 and have at most len(events) entries")
        if self.duration_s < 0.5:
            raise ValueError(f"duration_s={self.duration_s} is too short for any event (>= 0.5 s)")

    @property
    def vocabulary(self) -> tuple[str, ...]:
        """Event names this world uses (a perturber's replacement vocabulary)."""
        return self.events

    @property
    def num_samples(self) -> int:
        return int(round(self.duration_s * self.sample_rate))

    def rng(self, index: int = 0) -> np.random.Generator:
        """The generator of item ``index`` under this world's seed (independent of how many items are drawn)."""
        return np.random.default_rng([self.seed, index])

    # -- scenes ------------------------------------------------------------------------------------------------

    def _sample_order(self, rng: np.random.Generator) -> list[list[str]]:
        n = int(rng.choice(len(self.p_events), p=self.p_events)) + 1
        names = [str(e) for e in rng.permutation(self.events)]
        sustained = [e for e in names if EVENTS[e].sustained]
        if n >= 2 and sustained and rng.random() < self.p_while:
            bg = sustained[0]
            fg = next(e for e in names if e != bg and not EVENTS[e].sustained)
            rest = [e for e in names if e not in (bg, fg) and not EVENTS[e].sustained][: n - 2]
            steps = [[bg, fg]] + [[e] for e in rest]
            rng.shuffle(steps)
            return steps
        return [[e] for e in names[:n]]

    def _layout(self, order: list[list[str]], rng: np.random.Generator) -> dict[str, tuple[float, float]]:
        """``{event: (onset, duration)}``: each step gets an equal slot; events stay inside their slot."""
        usable = self.duration_s - 2 * self.margin_s
        slot = usable / len(order)
        out: dict[str, tuple[float, float]] = {}
        for i, step in enumerate(order):
            lo, room = self.margin_s + i * slot + self.gap_s / 2, slot - self.gap_s
            if len(step) == 1:
                out[step[0]] = self._place_event(step[0], lo, room, rng)
            else:
                bg = next(e for e in step if EVENTS[e].sustained)
                fg = next(e for e in step if e != bg)
                b_on, b_dur = self._place_event(bg, lo, room, rng, stretch=True)
                # the foreground sits inside the background (at most 70% of it)
                out[bg] = (b_on, b_dur)
                out[fg] = self._place_event(fg, b_on + 0.1 * b_dur, 0.8 * b_dur, rng, cap=0.7 * b_dur)
        return out

    def _place_event(self, name: str, lo: float, room: float, rng: np.random.Generator,
                     stretch: bool = False, cap: float | None = None) -> tuple[float, float]:
        d_lo, d_hi = EVENTS[name].duration
        if stretch:  # a "while" background is long enough to hold another event
            d_lo, d_hi = max(d_lo, 0.8), max(d_hi, 1.4)
        dur = min(rng.uniform(d_lo, d_hi), room, cap if cap is not None else room)
        return round(lo + rng.uniform(0, room - dur), 4), round(dur, 4)

    def sample_scene(self, rng: np.random.Generator) -> Scene:
        """A random scene (events, order, onsets) with a random caption."""
        order = self._sample_order(rng)
        layout = self._layout(order, rng)
        scene = Scene.from_order(order)
        onsets = tuple(layout[e][0] for e in scene.events)
        durations = tuple(layout[e][1] for e in scene.events)
        scene = Scene(scene.events, scene.order, onsets=onsets, durations=durations)
        return Scene(scene.events, scene.order, self.caption(scene, rng), onsets, durations)

    def caption(self, scene: Scene, rng: np.random.Generator) -> str:
        """A random natural-language caption naming the scene's events in order (see the module docstring)."""
        parts = []
        for step in scene.order:
            phrases = {e: str(rng.choice(EVENTS[e].phrases)) for e in step}
            if len(step) == 1:
                parts.append(phrases[step[0]])
            else:
                bg = next(e for e in step if EVENTS[e].sustained)
                fg = next(e for e in step if e != bg)
                parts.append(str(rng.choice(_WHILE_TEMPLATES)).format(bg=phrases[bg], fg=phrases[fg]))
        template = str(rng.choice(_TEMPLATES[len(parts)]))
        if template != "{0}":  # a leading "while X, Y" inside a longer sentence would be ambiguous
            parts = [_flip_while(p) if p.startswith("while ") else p for p in parts]
        return _capitalise(template.format(*parts))

    @staticmethod
    def parse_caption(caption: str) -> Scene:
        """Ground truth named by a caption: see :func:`parse_caption`."""
        return parse_caption(caption)

    # -- audio -------------------------------------------------------------------------------------------------

    def render(self, scene: Scene, rng: np.random.Generator) -> np.ndarray:
        """The scene's audio: ``(num_samples,)`` float32 at ``sample_rate``, peak in [0.25, 0.9]."""
        if not scene.onsets:
            scene = self._with_layout(scene, rng)
        sr, n = self.sample_rate, self.num_samples
        mix = np.zeros(n)
        for name, onset, dur in zip(scene.events, scene.onsets, scene.durations):
            start = int(round(onset * sr))
            length = max(1, min(int(round(dur * sr)), n - start))
            sound = SYNTHS[name](length, sr, rng)
            sound = sound / (np.abs(sound).max() + 1e-9)
            gain_db = rng.uniform(-9, 0) - (4.0 if self._is_background(scene, name) else 0.0)
            mix[start:start + length] += sound * 10 ** (gain_db / 20)
        mix = mix / (np.abs(mix).max() + 1e-9) * rng.uniform(0.25, 0.9)
        floor = 10 ** (rng.uniform(-75, -60) / 20)  # faint background noise so silence is not digital zero
        return (mix + floor * rng.standard_normal(n)).astype(np.float32)

    def _is_background(self, scene: Scene, name: str) -> bool:
        step = scene.order[scene.step_of(name)]
        return len(step) > 1 and EVENTS[name].sustained

    def _with_layout(self, scene: Scene, rng: np.random.Generator) -> Scene:
        """Fill in onsets/durations for a parsed scene (e.g. to render a caption's ground truth)."""
        order = [list(s) for s in scene.order]
        for step in order:  # a parsed "while" step needs a sustained background; keep the first sustained one
            if len(step) > 1 and not any(EVENTS[e].sustained for e in step):
                raise ValueError(f"cannot render overlapping step {step}: none of them is sustained")
        layout = self._layout(order, rng)
        return Scene(scene.events, scene.order, scene.caption, tuple(layout[e][0] for e in scene.events),
                     tuple(layout[e][1] for e in scene.events))

    # -- corpora -----------------------------------------------------------------------------------------------

    def sample(self, index: int) -> tuple[str, np.ndarray, Scene]:
        """Item ``index`` of this world's corpus: ``(caption, wave, scene)``."""
        rng = self.rng(index)
        scene = self.sample_scene(rng)
        return scene.caption, self.render(scene, rng), scene

    def make_corpus(self, n: int, seed: int | None = None, out_dir: str | Path | None = None,
                    start: int = 0) -> list[tuple[str, np.ndarray, Scene]]:
        """``n`` items ``(caption, wave, scene)``; item ``i`` depends only on ``(seed, start + i)``.

        With ``out_dir``, also writes ``clip_XXXXXX.wav`` files and a ``metadata.jsonl`` (``file_name``, ``caption``
        and the scene), the layout datasets' ``audiofolder`` loader reads.
        """
        world = self if seed is None or seed == self.seed else self.with_seed(seed)
        items = [world.sample(start + i) for i in range(n)]
        if out_dir is not None:
            world.write_corpus(items, out_dir, start)
        return items

    def with_seed(self, seed: int) -> World:
        return World(seed, self.duration_s, self.sample_rate, self.events, self.p_events, self.p_while,
                     self.margin_s, self.gap_s)

    def write_corpus(self, items: Sequence[tuple[str, np.ndarray, Scene]], out_dir: str | Path,
                     start: int = 0) -> Path:
        from mmpref.audio import save_audio  # deferred: only needed when writing files

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "metadata.jsonl", "w") as f:
            for i, (caption, wave, scene) in enumerate(items):
                name = f"clip_{start + i:06d}.wav"
                save_audio(out / name, wave, self.sample_rate)
                f.write(json.dumps({"file_name": name, "caption": caption, **scene.to_dict()}) + "\n")
        return out


def _flip_while(part: str) -> str:
    """``"while X, Y"`` -> ``"Y while X"`` (used inside multi-step captions)."""
    x, y = part[len("while "):].split(", ", 1)
    return f"{y} while {x}"
