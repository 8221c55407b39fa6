"""CLAP text-audio scores with transformers' ``ClapModel`` / ``ClapProcessor`` (any local checkpoint).

score = cosine of the L2-normalised text and audio embeddings, no scaling or clipping (Tango 2's CLAP score).
The number depends on preprocessing, so it is pinned and recorded (:meth:`ClapScorer.describe`): audio is
resampled to the feature extractor's rate (48 kHz for LAION CLAP) with soxr, clips longer than the extractor's
window (10 s) are cropped *deterministically* here (``crop``: start or center) so the extractor's random
truncation never runs, and shorter clips use the extractor's own padding (repeat-pad for LAION CLAP).
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from mmpref.audio import resample

CROPS = ("start", "center")


@runtime_checkable
class Scorer(Protocol):
    """Anything that scores ``(text_i, wave_i)`` pairs: higher means the audio matches the text better."""

    def __call__(self, texts: list[str], waves: list[np.ndarray], sample_rate: int) -> np.ndarray: ...


def describe_scorer(scorer: Any) -> dict:
    """What produced a score: the scorer's own ``describe()`` or, for a plain callable, its name."""
    if hasattr(scorer, "describe"):
        return scorer.describe()
    return {"callable": getattr(scorer, "__qualname__", type(scorer).__qualname__)}


class ClapScorer:
    """CLAP scores from a checkpoint folder (or an in-memory ``model`` + ``processor``)."""

    def __init__(self, path: str | os.PathLike | None = None, *, model: Any = None, processor: Any = None,
                 device: str | torch.device = "cpu", crop: str = "center", batch_size: int = 16,
                 name: str | None = None):
        from transformers import ClapModel, ClapProcessor

        if crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
        if path is None and (model is None or processor is None):
            raise ValueError("ClapScorer needs a checkpoint path, or both model= and processor=")
        if path is not None and not Path(path).is_dir():
            raise FileNotFoundError(f"CLAP checkpoint {os.fspath(path)!r} is not a folder (save one with "
                                    "ClapModel/ClapProcessor.save_pretrained, or mmpref.toy.clap.make_tiny_clap)")
        self.model = (model or ClapModel.from_pretrained(os.fspath(path))).to(device).eval()
        self.processor = processor or ClapProcessor.from_pretrained(os.fspath(path))
        self.device, self.crop, self.batch_size = torch.device(device), crop, batch_size
        self.name = name or (os.fspath(path) if path is not None else "in-memory")

    @property
    def sample_rate(self) -> int:
        return int(self.processor.feature_extractor.sampling_rate)

    @property
    def max_samples(self) -> int:
        return int(self.processor.feature_extractor.nb_max_samples)

    def describe(self) -> dict:
        """The checkpoint and every preprocessing choice that changes the score."""
        fe = self.processor.feature_extractor
        return {
            "type": "clap",
            "checkpoint": self.name,
            "sample_rate": self.sample_rate,
            "resampler": "soxr HQ",
            "max_length_s": self.max_samples / self.sample_rate,
            "crop": self.crop,
            "padding": fe.padding,
            "truncation": fe.truncation,
            "fusion": bool(getattr(self.model.config.audio_config, "enable_fusion", False)),
            "loudness_normalization": "none",
            "similarity": "cosine of L2-normalised embeddings",
            "weights": self.weights_fingerprint,
        }

    @functools.cached_property
    def weights_fingerprint(self) -> str:
        """Names, shapes and sums of the weights: tells two in-memory models apart in the records."""
        return weights_fingerprint(self.model)

    def prepare(self, wave: np.ndarray, sample_rate: int) -> np.ndarray:
        """Mono float32 at the CLAP rate, deterministically cropped to the extractor's window."""
        wave = np.asarray(wave, dtype=np.float32)
        if wave.ndim == 2:
            wave = wave.mean(axis=0)
        wave = resample(wave, sample_rate, self.sample_rate).astype(np.float32)
        n = self.max_samples
        if wave.shape[-1] > n:
            start = 0 if self.crop == "start" else (wave.shape[-1] - n) // 2
            wave = wave[start: start + n]
        return wave

    @torch.no_grad()
    def embed_text(self, texts: Sequence[str]) -> torch.Tensor:
        tok = self.processor.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        out = self.model.get_text_features(input_ids=tok["input_ids"].to(self.device),
                                           attention_mask=tok["attention_mask"].to(self.device))
        return F.normalize(_pooled(out).float(), dim=-1)

    @torch.no_grad()
    def embed_audio(self, waves: Sequence[np.ndarray], sample_rate: int) -> torch.Tensor:
        prepared = [self.prepare(w, sample_rate) for w in waves]
        feats = self.processor.feature_extractor(prepared, sampling_rate=self.sample_rate, return_tensors="pt")
        kwargs = {"input_features": feats["input_features"].to(self.device, self.model.dtype)}
        if "is_longer" in feats:
            kwargs["is_longer"] = feats["is_longer"].to(self.device)
        return F.normalize(_pooled(self.model.get_audio_features(**kwargs)).float(), dim=-1)

    def score(self, texts: list[str], waves: list[np.ndarray], sample_rate: int) -> np.ndarray:
        """Cosine similarity of ``texts[i]`` and ``waves[i]`` (float64 array of ``len(texts)``)."""
        if len(texts) != len(waves):
            raise ValueError(f"got {len(texts)} texts for {len(waves)} waves")
        out = []
        for s in range(0, len(texts), self.batch_size):
            t = self.embed_text(texts[s: s + self.batch_size])
            a = self.embed_audio(waves[s: s + self.batch_size], sample_rate)
            out.append((t * a).sum(-1).double().cpu().numpy())
        return np.concatenate(out) if out else np.zeros(0)

    __call__ = score


def weights_fingerprint(*modules: torch.nn.Module) -> str:
    """A cheap identity of in-memory weights (names, shapes, float64 sums): enough to notice that a model passed
    in is not the one a run started with."""
    h = hashlib.sha256()
    with torch.no_grad():
        for m in modules:
            for name, t in m.state_dict().items():
                h.update(f"{name}{tuple(t.shape)}{t.double().sum().item():.12e}".encode())
    return h.hexdigest()[:16]


def _pooled(out: Any) -> torch.Tensor:
    """transformers 5 returns a model output (``pooler_output`` = the projected embedding); 4.x a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


# ---------------------------------------------------------------------------------------------- tiny CLAP
