"""Audio file I/O (soundfile) and resampling (soxr). No torchaudio."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from mmpref.io import atomic_file

# extension -> (libsndfile format, default subtype); soundfile's own defaults except where noted
_FORMATS = {
    ".wav": ("WAV", "PCM_16"),
    ".flac": ("FLAC", "PCM_16"),
    ".ogg": ("OGG", "VORBIS"),
    ".mp3": ("MP3", "MPEG_LAYER_III"),
}


class AudioFileError(OSError):
    """An audio file could not be read or written; the message names the path."""


def resample(wave: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Resample ``(T,)`` or channels-first ``(C, T)`` audio with soxr "HQ".

    The output length is ``ceil(T * target_sr / orig_sr)`` (librosa's ``fix=True`` convention), so this equals
    ``librosa.resample(wave, orig_sr=..., target_sr=..., res_type="soxr_hq")``.
    """
    wave = np.asarray(wave)
    if orig_sr == target_sr:
        return wave
    n_out = int(np.ceil(wave.shape[-1] * target_sr / orig_sr))
    out = soxr.resample(wave.T, orig_sr, target_sr, quality="HQ").T  # soxr wants (T, C)
    return _fix_length(np.ascontiguousarray(out), n_out)


def _fix_length(wave: np.ndarray, n: int) -> np.ndarray:
    if wave.shape[-1] >= n:
        return wave[..., :n]
    pad = [(0, 0)] * (wave.ndim - 1) + [(0, n - wave.shape[-1])]
    return np.pad(wave, pad)


def load_audio(path: str | os.PathLike, sample_rate: int = 16000, mono: bool = True) -> np.ndarray:
    """Read an audio file as float32 in [-1, 1]: ``(T,)`` if ``mono`` (channel mean) else ``(C, T)``.

    Resamples to ``sample_rate`` with :func:`resample`. Any format libsndfile reads (WAV, FLAC, OGG, MP3, ...).
    """
    try:
        data, sr = sf.read(os.fspath(path), dtype="float32", always_2d=True)  # (T, C)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / FileNotFoundError
        raise AudioFileError(f"cannot read audio file {os.fspath(path)!r}: {e}") from e
    wave = data.mean(axis=1) if mono else data.T
    return np.ascontiguousarray(resample(wave, sr, sample_rate), dtype=np.float32)


def save_audio(path: str | os.PathLike, wave: np.ndarray, sample_rate: int, subtype: str | None = None) -> Path:
    """Write ``(T,)`` or ``(C, T)`` float audio atomically (temp file in the same folder, then ``os.replace``).

    The format follows the extension (.wav/.flac/.ogg/.mp3); integer subtypes clip to [-1, 1] first.
    """
    path = Path(path)
    fmt, default_subtype = _FORMATS.get(path.suffix.lower(), (None, None))
    if fmt is None:
        raise AudioFileError(f"cannot write audio file {str(path)!r}: unsupported extension {path.suffix!r}")
    subtype = subtype or default_subtype
    wave = np.asarray(wave, dtype=np.float32)
    if subtype.startswith("PCM") or fmt in ("OGG", "MP3"):
        wave = np.clip(wave, -1.0, 1.0)
    data = wave.T if wave.ndim == 2 else wave  # soundfile wants (T, C)
    try:
        with atomic_file(path) as tmp:
            sf.write(tmp, data, sample_rate, format=fmt, subtype=subtype)
    except (OSError, RuntimeError, ValueError, sf.LibsndfileError) as e:
        if isinstance(e, OSError) and e.errno is not None:
            raise  # a full disk or a read-only folder: reported as such
        raise AudioFileError(f"cannot write audio file {str(path)!r}: {e}") from e
    return path
