"""Griffin-Lim: a weight-free log-mel -> wave inversion for the Tango/AudioLDM log-mel of :mod:`mmpref.audio.mel`.

Undoes :class:`~mmpref.audio.LogMel` step by step: ``exp`` of the log-mel, the pseudo-inverse of the mel filters
(clamped at 0) to get an STFT magnitude, then (fast) Griffin-Lim with ``torch.stft``/``torch.istft`` and the same
window, hop and centring to recover a phase. It is a crude vocoder (phasey, metallic), but it needs no training,
so a pipeline without a neural vocoder (a tiny model trained from scratch, tests) can still produce audio.
"""

from __future__ import annotations

import torch

from mmpref.audio.mel import MelConfig, mel_basis

GRIFFIN_LIM = "griffin_lim"  # the name a TangoPipeline's ``vocoder`` may be given as a string


def mel_to_magnitude(logmel: torch.Tensor, cfg: MelConfig) -> torch.Tensor:
    """Log-mel ``(B, frames, n_mels)`` -> non-negative STFT magnitude ``(B, n_fft // 2 + 1, frames)``.

    Least-squares inverse of the mel projection (``pinv(basis) @ exp(logmel)``), clamped at 0: the mel filters
    overlap, so the pseudo-inverse can go negative where the true magnitude is small.
    """
    if logmel.shape[-1] != cfg.n_mels:
        raise ValueError(f"log-mel has {logmel.shape[-1]} mel bins, the MelConfig says n_mels={cfg.n_mels}")
    inverse = torch.linalg.pinv(torch.from_numpy(mel_basis(cfg)))  # float64: the basis is ill-conditioned
    inverse = inverse.to(device=logmel.device, dtype=logmel.dtype)
    return (inverse @ torch.exp(logmel).transpose(-1, -2)).clamp(min=0)


# On a CPU the iterations run over a few rows at a time. A whole batch's spectra (about 1 MB per row and tensor for a
# 2.56 s clip) do not stay in cache, so each of the loop's elementwise passes goes out to memory; a chunk of rows
# stays in cache. Each row's arithmetic is its own, so the result does not change (bitwise on the CPUs measured);
# 128 demo-length clips: 3.7x faster (benchmarks/griffin_lim.py, docs/benchmarks.md).
CHUNK_ELEMENTS = 2**19  # complex elements per spectrum in one chunk (rows = this // (bins x frames), at least 1)


def griffin_lim(
    logmel: torch.Tensor,
    cfg: MelConfig | None = None,
    n_iter: int = 32,
    generator: torch.Generator | list[torch.Generator] | None = None,
    momentum: float = 0.99,
    rows_per_chunk: int | None = None,
) -> torch.Tensor:
    """Log-mel ``(B, frames, n_mels)`` (or ``(frames, n_mels)``) -> float wave ``(B, frames * hop)``.

    ``cfg`` defaults to Tango's :class:`~mmpref.audio.MelConfig`. ``frames * hop`` samples is the length
    :class:`~mmpref.audio.LogMel` maps back to ``frames`` (Tango keeps ``T // hop`` frames of a ``T``-sample
    clip). Initial phases are uniform random, drawn on the CPU from
    ``generator`` (one for the batch, a list of one per row, or None for torch's global RNG), so results do not
    depend on the device. ``momentum`` is the "fast Griffin-Lim" extrapolation (Perraudin et al. 2013, librosa's
    and torchaudio's default 0.99); 0 gives the classic algorithm. Computes in float64 for float64 input, else
    float32, on ``logmel``'s device. ``rows_per_chunk``: rows iterated together (None: a cache-sized chunk on a
    CPU, the whole batch on an accelerator).
    """
    cfg = cfg or MelConfig()
    squeeze = logmel.dim() == 2
    logmel = logmel.unsqueeze(0) if squeeze else logmel
    if logmel.dim() != 3:
        raise ValueError(f"expected a log-mel (B, frames, n_mels) or (frames, n_mels), got shape {tuple(logmel.shape)}")
    dtype = torch.float64 if logmel.dtype == torch.float64 else torch.float32
    magnitude = mel_to_magnitude(logmel.to(dtype), cfg)  # (B, bins, frames)
    batch, bins, frames = magnitude.shape
    phase = torch.polar(torch.ones_like(magnitude), 2 * torch.pi * _uniform(magnitude.shape, generator, batch)
                        .to(device=magnitude.device, dtype=dtype))
    if rows_per_chunk is None:
        rows_per_chunk = max(1, CHUNK_ELEMENTS // (bins * frames)) if magnitude.device.type == "cpu" else batch
    rows = max(1, int(rows_per_chunk))
    wave = torch.cat([_iterate(magnitude[i:i + rows], phase[i:i + rows], cfg, n_iter, momentum)
                      for i in range(0, batch, rows)])
    return wave[0] if squeeze else wave


def _iterate(magnitude: torch.Tensor, phase: torch.Tensor, cfg: MelConfig, n_iter: int,
             momentum: float) -> torch.Tensor:
    """(Fast) Griffin-Lim on rows of STFT magnitudes from initial phases; the waves.

    Per iteration: ``rebuilt = stft(istft(magnitude * phase))``, ``phase = rebuilt - m / (1 + m) * previous``,
    ``phase /= |phase|`` (clamped at 1e-16). The phase is kept as two real tensors (real and imaginary parts) because
    torch's complex ``abs`` and complex-by-real ``*`` and ``/`` first widen the real operand to complex and run
    unvectorised on the interleaved layout; on contiguous real tensors the same arithmetic (``hypot``; division as
    the multiplication by the reciprocal that complex division does) gives the same bits, faster
    (``benchmarks/griffin_lim.py``; :func:`_iterate_complex` is the plain formulation it is tested against).
    """
    frames = magnitude.shape[-1]
    length = frames * cfg.hop_length
    window = torch.hann_window(cfg.win_length, periodic=True, dtype=magnitude.dtype, device=magnitude.device)
    stft_args = dict(n_fft=cfg.n_fft, hop_length=cfg.hop_length, win_length=cfg.win_length, window=window,
                     center=True)

    def synthesise(re: torch.Tensor, im: torch.Tensor) -> torch.Tensor:
        return torch.istft(torch.complex(magnitude * re, magnitude * im), length=length, **stft_args)

    def analyse(wave: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # frames * hop samples give frames + 1 centred frames: the last one is the frame Tango drops
        spec = torch.view_as_real(torch.stft(wave, pad_mode="reflect", return_complex=True, **stft_args)[..., :frames])
        return spec[..., 0].contiguous(), spec[..., 1].contiguous()

    re, im = (part.contiguous() for part in torch.view_as_real(phase).unbind(-1))
    prev_re, prev_im = torch.zeros_like(re), torch.zeros_like(im)
    weight = momentum / (1 + momentum)
    for _ in range(n_iter):
        rebuilt_re, rebuilt_im = analyse(synthesise(re, im))
        re, im = rebuilt_re - weight * prev_re, rebuilt_im - weight * prev_im
        inverse = 1 / torch.hypot(re, im).clamp_(min=1e-16)
        re.mul_(inverse)
        im.mul_(inverse)
        prev_re, prev_im = rebuilt_re, rebuilt_im
    return synthesise(re, im)


def _iterate_complex(magnitude: torch.Tensor, phase: torch.Tensor, cfg: MelConfig, n_iter: int,
                     momentum: float) -> torch.Tensor:
    """:func:`_iterate` written plainly on complex tensors: the reference it must equal bit for bit (the tests and
    ``benchmarks/griffin_lim.py`` run both)."""
    frames = magnitude.shape[-1]
    args = dict(n_fft=cfg.n_fft, hop_length=cfg.hop_length, win_length=cfg.win_length, center=True,
                window=torch.hann_window(cfg.win_length, periodic=True, dtype=magnitude.dtype, device=magnitude.device))
    previous = torch.zeros_like(phase)
    for _ in range(n_iter):
        wave = torch.istft(magnitude * phase, length=frames * cfg.hop_length, **args)
        rebuilt = torch.stft(wave, pad_mode="reflect", return_complex=True, **args)[..., :frames]
        phase = rebuilt - (momentum / (1 + momentum)) * previous
        phase = phase / phase.abs().clamp(min=1e-16)
        previous = rebuilt
    return torch.istft(magnitude * phase, length=frames * cfg.hop_length, **args)


def _uniform(shape: torch.Size, generator, batch: int) -> torch.Tensor:
    if isinstance(generator, list):
        if len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch} log-mels")
        return torch.stack([torch.rand(shape[1:], generator=g, dtype=torch.float64) for g in generator])
    return torch.rand(shape, generator=generator, dtype=torch.float64)


class GriffinLimVocoder:
    """A vocoder-shaped Griffin-Lim: ``vocoder(logmel (B, frames, n_mels)) -> float32 wave (B, frames * hop)``.

    What :class:`~mmpref.models.tango.TangoPipeline` uses when it has no neural vocoder. Every row starts from the
    same phases (a generator seeded with ``seed``), so a log-mel always gives the same wave whatever else is in its
    batch. No weights: :meth:`to_dict` is all there is to save.
    """

    def __init__(self, mel_config: MelConfig | None = None, n_iter: int = 32, seed: int = 0,
                 momentum: float = 0.99):
        if n_iter < 0:
            raise ValueError(f"GriffinLimVocoder: n_iter must be >= 0, got {n_iter}")
        self.mel_config = mel_config or MelConfig()
        self.n_iter, self.seed, self.momentum = int(n_iter), int(seed), float(momentum)

    def __call__(self, logmel: torch.Tensor) -> torch.Tensor:
        logmel = logmel.unsqueeze(0) if logmel.dim() == 2 else logmel
        generators = [torch.Generator().manual_seed(self.seed) for _ in range(logmel.shape[0])]
        with torch.no_grad():
            wave = griffin_lim(logmel.detach(), self.mel_config, self.n_iter, generators, self.momentum)
        return wave.float()

    def to_dict(self) -> dict:
        """Settings for a pipeline's json index (the mel config is saved there separately)."""
        return {"n_iter": self.n_iter, "seed": self.seed, "momentum": self.momentum}

    @classmethod
    def from_dict(cls, d: dict, mel_config: MelConfig) -> GriffinLimVocoder:
        unknown = set(d) - {"n_iter", "seed", "momentum"}
        if unknown:
            raise ValueError(f"GriffinLimVocoder: unknown settings {sorted(unknown)} (known: n_iter, seed, momentum)")
        return cls(mel_config, **d)

    def __repr__(self) -> str:
        return f"GriffinLimVocoder(n_iter={self.n_iter}, seed={self.seed}, momentum={self.momentum})"
