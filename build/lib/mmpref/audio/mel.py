"""Tango / AudioLDM log-mel features.

The convention reproduced here is AudioLDM's ``TacotronSTFT.mel_spectrogram`` (which Tango uses unchanged):

* the wave is reflect-padded by ``n_fft // 2`` on both sides (librosa's ``center=True, pad_mode="reflect"``), so
  ``T`` samples give ``1 + T // hop_length`` frames;
* a periodic Hann window of ``win_length`` (``scipy.signal.get_window("hann", fftbins=True)``), one-sided STFT;
* the **magnitude** ``sqrt(re^2 + im^2)`` (not the power), projected on 64 Slaney-normalised Slaney-scale mel
  filters over 0-8 kHz (librosa's default ``filters.mel``; here built with transformers' ``mel_filter_bank``);
* ``log(clamp(mel, min=1e-5))`` (AudioLDM's ``dynamic_range_compression`` with ``C = 1``).

Tango then crops/pads the frame axis to a fixed length (1024 frames for 10.24 s, i.e. it drops the trailing
centre frame): :func:`frames_for` gives that length for any duration.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from transformers.audio_utils import mel_filter_bank

LOG_FLOOR = 1e-5  # AudioLDM's clip value: log(1e-5) is the log-mel of silence


@dataclass(frozen=True)
class MelConfig:
    """STFT / mel parameters (defaults: Tango and AudioLDM at 16 kHz)."""

    sample_rate: int = 16000
    n_fft: int = 1024
    win_length: int = 1024
    hop_length: int = 160
    n_mels: int = 64
    f_min: float = 0.0
    f_max: float = 8000.0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MelConfig:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})

    @property
    def silence(self) -> float:
        """The log-mel value of silence (the clamp floor)."""
        return math.log(LOG_FLOOR)


def frames_for(duration_s: float, cfg: MelConfig = MelConfig()) -> int:
    """Mel frames Tango uses for ``duration_s`` seconds: ``round(duration * sr / hop)`` (10.24 s -> 1024)."""
    return int(round(duration_s * cfg.sample_rate / cfg.hop_length))


def samples_for(duration_s: float, cfg: MelConfig = MelConfig()) -> int:
    """Wave samples for ``duration_s`` seconds at ``cfg.sample_rate``."""
    return int(round(duration_s * cfg.sample_rate))


def mel_basis(cfg: MelConfig) -> np.ndarray:
    """Slaney mel filters, ``(n_mels, n_fft // 2 + 1)`` float64 (equals ``librosa.filters.mel(htk=False)``)."""
    fb = mel_filter_bank(
        num_frequency_bins=cfg.n_fft // 2 + 1,
        num_mel_filters=cfg.n_mels,
        min_frequency=cfg.f_min,
        max_frequency=cfg.f_max,
        sampling_rate=cfg.sample_rate,
        norm="slaney",
        mel_scale="slaney",
    )
    return fb.T


def normalize_wave(wave: torch.Tensor) -> torch.Tensor:
    """Tango's training-time wave normalisation: remove the mean, peak-normalise to 0.5 (per row)."""
    wave = wave - wave.mean(dim=-1, keepdim=True)
    return 0.5 * wave / (wave.abs().amax(dim=-1, keepdim=True) + 1e-8)


class LogMel(nn.Module):
    """``wave (B, T)`` (or ``(T,)``) at ``cfg.sample_rate`` -> log-mel ``(B, 1 + T // hop, n_mels)``.

    Computes in the input's dtype when it is float32/float64 (float64 matches librosa to ~1e-12); lower precisions
    are upcast to float32.
    """

    def __init__(self, cfg: MelConfig = MelConfig()):
        super().__init__()
        self.cfg = cfg
        # non-persistent: derived from cfg, so never stale in a saved state dict
        self.register_buffer("basis", torch.from_numpy(mel_basis(cfg)), persistent=False)
        self.register_buffer("window", torch.hann_window(cfg.win_length, periodic=True, dtype=torch.float64),
                             persistent=False)

    def forward(self, wave: torch.Tensor) -> torch.Tensor:
        squeeze = wave.dim() == 1
        wave = wave.unsqueeze(0) if squeeze else wave
        if wave.dtype not in (torch.float32, torch.float64):
            wave = wave.float()
        cfg = self.cfg
        spec = torch.stft(
            wave,
            n_fft=cfg.n_fft,
            hop_length=cfg.hop_length,
            win_length=cfg.win_length,
            window=self.window.to(wave.dtype),
            center=True,
            pad_mode="reflect",
            return_complex=True,
        )
        mel = self.basis.to(wave.dtype) @ spec.abs()  # (B, n_mels, frames)
        out = torch.log(torch.clamp(mel, min=LOG_FLOOR)).transpose(1, 2)
        return out[0] if squeeze else out
