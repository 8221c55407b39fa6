"""Audio frontend: soundfile I/O, soxr resampling, the Tango/AudioLDM log-mel and its Griffin-Lim inverse."""

from mmpref.audio.griffin_lim import GRIFFIN_LIM, GriffinLimVocoder, griffin_lim, mel_to_magnitude
from mmpref.audio.io import AudioFileError, load_audio, resample, save_audio
from mmpref.audio.mel import LogMel, MelConfig, frames_for, mel_basis, normalize_wave, samples_for

__all__ = [
    "GRIFFIN_LIM",
    "AudioFileError",
    "GriffinLimVocoder",
    "LogMel",
    "MelConfig",
    "frames_for",
    "griffin_lim",
    "load_audio",
    "mel_basis",
    "mel_to_magnitude",
    "normalize_wave",
    "resample",
    "samples_for",
    "save_audio",
]
