"""Audio frontend: soundfile I/O, soxr resampling and the Tango/AudioLDM log-mel."""

from mmpref.audio.io import AudioFileError, load_audio, resample, save_audio
from mmpref.audio.mel import LogMel, MelConfig, frames_for, mel_basis, normalize_wave, samples_for

__all__ = [
    "AudioFileError",
    "LogMel",
    "MelConfig",
    "frames_for",
    "load_audio",
    "mel_basis",
    "normalize_wave",
    "resample",
    "samples_for",
    "save_audio",
]
