"""A tiny audio preference set of synthetic tones (``data.path: tiny:N[:K]`` in a diffusion config): N prompts
asking for a tone of some pitch and rhythm, the matching tone as the winner and K tones of other pitches as losers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from mmpref.audio import save_audio

_TONES = [("low", 220.0), ("middle", 440.0), ("high", 880.0), ("very high", 1760.0)]
_RHYTHMS = [("steady", 0.0), ("pulsing", 4.0), ("fast beeping", 8.0)]


def make_tiny_preference_set(directory: str | os.PathLike, n: int = 16, k: int = 1, duration_s: float = 1.0,
                             sample_rate: int = 16000, seed: int = 0) -> Path:
    """Write ``n`` groups of synthetic tones (WAV) and their preference file; returns the file's path.

    Prompt i asks for a tone of some pitch and rhythm; the winner matches it, each loser has another pitch
    (and sometimes rhythm). ``k == 1``: Audio-Alpaca schema (``prefs.jsonl`` with prompt/chosen/rejected/strategy);
    ``k > 1``: grouped schema. Paths are relative to ``directory``.
    """
    directory = Path(directory)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        pitch, rhythm = i % len(_TONES), (i // len(_TONES)) % len(_RHYTHMS)
        prompt = f"a {_RHYTHMS[rhythm][0]} {_TONES[pitch][0]} pitched beep"
        chosen = f"audio/{i:04d}_w.wav"
        save_audio(directory / chosen, _tone(pitch, rhythm, duration_s, sample_rate, rng), sample_rate)
        rejected = []
        for j in range(k):
            other = (pitch + 1 + j) % len(_TONES)
            name = f"audio/{i:04d}_l{j}.wav"
            save_audio(directory / name, _tone(other, (rhythm + j) % len(_RHYTHMS), duration_s, sample_rate, rng),
                       sample_rate)
            rejected.append(name)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected[0] if k == 1 else rejected,
                     "strategy": "tiny-tones"})
    out = directory / "prefs.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def _tone(pitch: int, rhythm: int, duration_s: float, sr: int, rng: np.random.Generator) -> np.ndarray:
    t = np.arange(int(round(duration_s * sr))) / sr
    wave = np.sin(2 * np.pi * _TONES[pitch][1] * t + rng.uniform(0, 2 * np.pi))
    rate = _RHYTHMS[rhythm][1]
    if rate:
        wave *= (np.sin(2 * np.pi * rate * t) > 0).astype(np.float64)
    return (0.4 * wave + 0.01 * rng.standard_normal(t.shape)).astype(np.float32)
