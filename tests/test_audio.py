"""Audio frontend: log-mel equals librosa (AudioLDM's convention), its Griffin-Lim inverse, soxr resampling,
soundfile round trips."""

from __future__ import annotations

import os

import librosa
import numpy as np
import pytest
import torch

from mmpref.audio import (
    AudioFileError,
    GriffinLimVocoder,
    LogMel,
    MelConfig,
    frames_for,
    griffin_lim,
    load_audio,
    mel_basis,
    mel_to_magnitude,
    resample,
    save_audio,
)

CFG = MelConfig()


def _librosa_logmel(y: np.ndarray, cfg: MelConfig = CFG) -> np.ndarray:
    """AudioLDM's TacotronSTFT in librosa terms: reflect-centred STFT magnitude, Slaney mels, log(clamp 1e-5)."""
    mag = np.abs(librosa.stft(y, n_fft=cfg.n_fft, hop_length=cfg.hop_length, win_length=cfg.win_length,
                              window="hann", center=True, pad_mode="reflect"))
    fb = librosa.filters.mel(sr=cfg.sample_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels, fmin=cfg.f_min,
                             fmax=cfg.f_max, htk=False, norm="slaney")
    return np.log(np.maximum(fb @ mag, 1e-5)).T  # (frames, n_mels)


def _signal(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(n) / CFG.sample_rate
    y = 0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(n)
    y[: n // 5] = 0.0  # a silent stretch exercises the clamp
    return y


def test_mel_basis_equals_librosa():
    ref = librosa.filters.mel(sr=16000, n_fft=1024, n_mels=64, fmin=0.0, fmax=8000.0, htk=False, norm="slaney")
    np.testing.assert_allclose(mel_basis(CFG), ref, atol=1e-7)


@pytest.mark.parametrize("n", [16000, 16161, 40960])
def test_logmel_equals_librosa_float64(n):
    y = _signal(n)
    out = LogMel(CFG)(torch.from_numpy(y)[None])[0].numpy()
    assert out.shape == (1 + n // CFG.hop_length, CFG.n_mels)
    np.testing.assert_allclose(out, _librosa_logmel(y), atol=1e-5, rtol=0)


def test_logmel_float32_batched():
    ys = np.stack([_signal(16000, s) for s in range(3)]).astype(np.float32)
    out = LogMel(CFG)(torch.from_numpy(ys))
    assert out.dtype == torch.float32 and out.shape == (3, 101, 64)
    for i in range(3):  # float32 STFT: ~1e-4 in log units on the quietest bins
        np.testing.assert_allclose(out[i].numpy(), _librosa_logmel(ys[i].astype(np.float64)), atol=2e-3)
    np.testing.assert_allclose(LogMel(CFG)(torch.from_numpy(ys[1]))[None].numpy(), out[1:2].numpy(), atol=1e-6)


def test_frames_for_matches_tango():
    assert frames_for(10.24, CFG) == 1024 and frames_for(1.0, CFG) == 100 and frames_for(2.56, CFG) == 256
    assert MelConfig.from_dict(CFG.to_dict()) == CFG


@pytest.mark.parametrize("orig,target", [(44100, 16000), (16000, 22050), (48000, 16000)])
def test_resample_equals_librosa_soxr_hq(orig, target):
    y = np.random.default_rng(1).standard_normal((2, 4567)).astype(np.float32) * 0.1
    ref = librosa.resample(y, orig_sr=orig, target_sr=target, res_type="soxr_hq")
    out = resample(y, orig, target)
    assert out.shape == ref.shape
    np.testing.assert_allclose(out, ref, atol=1e-5)
    np.testing.assert_allclose(resample(y[0], orig, target), ref[0], atol=1e-5)


@pytest.mark.parametrize("ext,subtype,atol", [(".wav", None, 1 / 32768), (".wav", "FLOAT", 0.0),
                                              (".flac", None, 1 / 32768)])
def test_lossless_round_trip(tmp_path, ext, subtype, atol):
    y = (_signal(8000) * 0.9).astype(np.float32)
    path = save_audio(tmp_path / f"x{ext}", y, 16000, subtype=subtype)
    np.testing.assert_allclose(load_audio(path), y, atol=atol + 1e-7)
    assert [p.name for p in tmp_path.iterdir()] == [f"x{ext}"]  # no temp file left


def test_ogg_round_trip_and_resampling(tmp_path):
    y = (0.5 * np.sin(2 * np.pi * 440 * np.arange(22050) / 22050)).astype(np.float32)
    path = save_audio(tmp_path / "x.ogg", np.stack([y, y]), 22050)
    back = load_audio(path, sample_rate=22050, mono=False)
    assert back.shape[0] == 2 and abs(back.shape[1] - 22050) < 2000
    n = min(back.shape[1], 22050)
    assert np.corrcoef(back[0, :n], y[:n])[0, 1] > 0.95  # lossy codec
    at16k = load_audio(path)  # mono, resampled
    assert at16k.dtype == np.float32 and at16k.ndim == 1 and abs(at16k.shape[0] - 16000) < 1500


def test_mono_downmix(tmp_path):
    left, right = np.full(100, 0.5, np.float32), np.full(100, -0.25, np.float32)
    path = save_audio(tmp_path / "s.wav", np.stack([left, right]), 16000, subtype="FLOAT")
    np.testing.assert_allclose(load_audio(path), 0.125, atol=1e-7)


def test_errors_name_the_path(tmp_path):
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"not audio at all")
    for p in (bad, tmp_path / "missing.flac"):
        with pytest.raises(AudioFileError, match=os.path.basename(p)):
            load_audio(p)
    with pytest.raises(AudioFileError, match="x.xyz"):
        save_audio(tmp_path / "x.xyz", np.zeros(10), 16000)


# ---------------------------------------------------------------------------------------------- Griffin-Lim


def _tango_logmel(y: np.ndarray) -> torch.Tensor:
    """Log-mel with Tango's crop (``T // hop`` frames), float64."""
    return LogMel(CFG)(torch.from_numpy(y))[: len(y) // CFG.hop_length]


def _event_signal(n: int = 16000, seed: int = 0) -> np.ndarray:
    """A decaying tone, a chirp and a little noise: harmonic and broadband content for the inversion."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / CFG.sample_rate
    return (0.3 * np.sin(2 * np.pi * 440 * t) * np.exp(-3 * t) + 0.2 * np.sin(2 * np.pi * (300 + 900 * t) * t)
            + 0.05 * rng.standard_normal(n))


def test_mel_to_magnitude_is_least_squares():
    logmel = _tango_logmel(_event_signal())
    ref = np.linalg.lstsq(mel_basis(CFG), np.exp(logmel.numpy()).T, rcond=None)[0]  # min-norm least squares
    np.testing.assert_allclose(mel_to_magnitude(logmel, CFG).numpy(), np.maximum(ref, 0), atol=1e-9)


def test_griffin_lim_round_trip_error():
    y = _event_signal()
    logmel = _tango_logmel(y)
    err = {}
    for n_iter in (0, 32):
        wave = griffin_lim(logmel, CFG, n_iter, torch.Generator().manual_seed(0))
        assert wave.shape == (len(y),) and wave.dtype == torch.float64
        err[n_iter] = float((_tango_logmel(wave.numpy()) - logmel).abs().mean())
    # measured: 0.978 with random phases only, 0.0943 after 32 fast iterations (0.104 with momentum 0)
    assert err[32] < 0.12 and err[0] > 0.8
    classic = griffin_lim(logmel, CFG, 32, torch.Generator().manual_seed(0), momentum=0.0)
    assert err[32] < float((_tango_logmel(classic.numpy()) - logmel).abs().mean()) < 0.12


def test_griffin_lim_seeded_and_float32():
    logmel = _tango_logmel(_event_signal(8000))
    a = griffin_lim(logmel, CFG, 8, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, griffin_lim(logmel, CFG, 8, torch.Generator().manual_seed(3)), rtol=0, atol=0)
    assert (a - griffin_lim(logmel, CFG, 8, torch.Generator().manual_seed(4))).abs().max() > 1e-3
    single = griffin_lim(logmel.float(), CFG, 8, torch.Generator().manual_seed(3))
    assert single.dtype == torch.float32
    torch.testing.assert_close(single.double(), a, atol=1e-4, rtol=0)


def test_griffin_lim_in_chunks_equals_the_whole_batch():
    # rows iterate in cache-sized chunks on a CPU; every row's arithmetic is its own, so chunking changes nothing
    mels = torch.stack([_tango_logmel(_event_signal(8000, s)) for s in range(5)]).float()
    gens = lambda: [torch.Generator().manual_seed(2) for _ in range(5)]  # noqa: E731
    whole = griffin_lim(mels, CFG, 6, gens(), rows_per_chunk=5)
    for rows in (None, 1, 2, 3):
        torch.testing.assert_close(griffin_lim(mels, CFG, 6, gens(), rows_per_chunk=rows), whole, rtol=0, atol=0)
    # one generator for the batch: the phases are drawn for the whole batch before any chunk runs
    one = griffin_lim(mels, CFG, 6, torch.Generator().manual_seed(7), rows_per_chunk=5)
    torch.testing.assert_close(griffin_lim(mels, CFG, 6, torch.Generator().manual_seed(7), rows_per_chunk=2), one,
                               rtol=0, atol=0)
    assert (one - whole).abs().max() > 1e-3  # other phases, another wave: the comparison above can fail


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_griffin_lim_equals_the_complex_formulation_bitwise(dtype, monkeypatch):
    # the loop keeps real and imaginary parts apart for speed; the arithmetic must stay the textbook one, exactly
    import importlib

    module = importlib.import_module("mmpref.audio.griffin_lim")  # the package exports the function of that name
    mels = torch.stack([_tango_logmel(_event_signal(8000, s)) for s in range(3)]).to(dtype)
    mels[2, :, :20] = -11.5  # bins at the floor: the magnitude's pseudo-inverse gives exact zeros there
    for momentum in (0.99, 0.0):
        ours = griffin_lim(mels, CFG, 5, torch.Generator().manual_seed(4), momentum=momentum)
        monkeypatch.setattr(module, "_iterate", module._iterate_complex)
        plain = griffin_lim(mels, CFG, 5, torch.Generator().manual_seed(4), momentum=momentum)
        monkeypatch.undo()
        torch.testing.assert_close(ours, plain, rtol=0, atol=0)
        assert (ours - griffin_lim(mels, CFG, 4, torch.Generator().manual_seed(4))).abs().max() > 1e-3


def test_griffin_lim_vocoder_batch_invariant():
    mels = torch.stack([_tango_logmel(_event_signal(8000, s)) for s in range(2)]).float()
    vocoder = GriffinLimVocoder(CFG, n_iter=4, seed=1)
    both = vocoder(mels)
    assert both.shape == (2, 8000) and both.dtype == torch.float32
    # same wave whatever the batch, up to float32 rounding (batched matmuls differ by ~2e-6 on some CPUs)
    torch.testing.assert_close(vocoder(mels[1:]), both[1:], rtol=0, atol=1e-5)
    assert GriffinLimVocoder.from_dict(vocoder.to_dict(), CFG).to_dict() == {"n_iter": 4, "seed": 1, "momentum": 0.99}
    with pytest.raises(ValueError, match="n_mels=64"):
        griffin_lim(torch.zeros(10, 80), CFG)
    with pytest.raises(ValueError, match="unknown settings"):
        GriffinLimVocoder.from_dict({"iters": 3}, CFG)
