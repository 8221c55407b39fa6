"""TangoPipeline: Tango / Tango 2 text-to-audio from stock diffusers and transformers parts.

text (T5 encoder) -> UNet2DConditionModel denoises VAE latents (B, 8, frames/4, n_mels/4) with classifier-free
guidance -> AutoencoderKL decodes a log-mel (B, frames, 64) -> SpeechT5HifiGan vocoder -> 16 kHz wave.

A pipeline without a trained vocoder (``vocoder=None`` or ``"griffin_lim"``) turns log-mels into waves with
:class:`~mmpref.audio.GriffinLimVocoder` (no weights; crude but always available).

Saved in diffusers' own layout: every part in its own subfolder with its own ``save_pretrained`` (safetensors), and
``model_index.json`` naming each part's library and class, as diffusers writes it, so diffusers' and transformers'
loaders read the parts (``UNet2DConditionModel.from_pretrained(folder, subfolder="unet")``). mmpref's own settings
(the :class:`~mmpref.audio.MelConfig`, and the Griffin-Lim settings when that is the vocoder) sit under its
``_mmpref`` key, which diffusers ignores. Folders written before (a ``pipeline.json`` instead) still load.
"""

from __future__ import annotations

import inspect
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from mmpref.audio import GRIFFIN_LIM, GriffinLimVocoder, LogMel, MelConfig, samples_for
from mmpref.io import write_json_atomic
from mmpref.models.attention import DEFAULT_SDPA_BACKENDS, attention_kernels
from mmpref.models.tango import presets
from mmpref.models.tango.tokenizer import resolve_tokenizer

PIPELINE_FILE = "pipeline.json"  # the layout before model_index.json; still read
MODEL_INDEX = "model_index.json"
COMPONENTS = ("text_encoder", "tokenizer", "unet", "vae", "vocoder", "scheduler")
# the only classes pipeline.json may name (no arbitrary imports from a config file)
_LOADABLE = {
    ("transformers", "T5EncoderModel"),
    ("transformers", "AutoTokenizer"),
    ("transformers", "SpeechT5HifiGan"),
    ("diffusers", "UNet2DConditionModel"),
    ("diffusers", "AutoencoderKL"),
    ("diffusers", "DDPMScheduler"),
    ("diffusers", "DDIMScheduler"),
}
_GRIFFIN_LIM_SPEC = ("mmpref", "GriffinLimVocoder")  # pipeline.json's name for the weight-free vocoder
OUTPUT_TYPES = ("wave", "mel", "latent")


class TangoPipeline:
    """Holds the parts; see the module docstring. All inference methods run under ``torch.no_grad``.

    ``vocoder``: a neural vocoder (``SpeechT5HifiGan``), a :class:`~mmpref.audio.GriffinLimVocoder`, the string
    ``"griffin_lim"`` (a default one), or None (no vocoder saved; :meth:`mel_to_wave` falls back to a default
    Griffin-Lim).
    """

    def __init__(self, text_encoder, tokenizer, unet, vae, vocoder, scheduler, mel_config: MelConfig | None = None):
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.unet = unet
        self.vae = vae
        self.scheduler = scheduler
        self.mel_config = mel_config or _mel_config_of(vocoder)
        self.vocoder = _resolve_vocoder(vocoder, self.mel_config)
        self.log_mel = LogMel(self.mel_config)
        for m in self._modules().values():
            m.eval()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_preset(cls, name: str, seed: int = 0, tokenizer: Any = None) -> TangoPipeline:
        """Random weights from a preset (``tiny`` or ``tango``); ``tokenizer``: a tokenizer or a local path
        (needed for ``tango``: FLAN-T5's tokenizer from your checkpoint). Downloads nothing."""
        cfg = presets.preset_config(name)
        tok = resolve_tokenizer(tokenizer if tokenizer is not None else cfg["tokenizer"])
        if cfg["text_encoder"]["vocab_size"] is None:
            cfg["text_encoder"]["vocab_size"] = len(tok)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            parts = {
                "text_encoder": presets.build_text_encoder(cfg["text_encoder"]),
                "unet": presets.build_unet(cfg["unet"]),
                "vae": presets.build_vae(cfg["vae"]),
                "vocoder": presets.build_vocoder(cfg["vocoder"], cfg.get("vocoder_torch_init", False)),
            }
        return cls(tokenizer=tok, scheduler=presets.build_scheduler(cfg["scheduler"]), **parts)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, torch_dtype: torch.dtype | None = None,
                        **overrides: Any) -> TangoPipeline:
        """Load a folder written by :meth:`save_pretrained`; ``overrides`` replace parts (e.g. ``unet=...``;
        ``tokenizer`` may be a tokenizer or a local folder). A pipeline must end up with a tokenizer."""
        path = Path(path)
        meta = _read_index(path)
        if "tokenizer" in overrides:
            overrides["tokenizer"] = resolve_tokenizer(overrides["tokenizer"])
        parts = {}
        mel_config = MelConfig.from_dict(meta["mel_config"])
        for name in COMPONENTS:
            spec = meta["components"].get(name)
            if name in overrides and overrides[name] is not None:
                parts[name] = overrides.pop(name)
            elif spec is not None and tuple(spec) == _GRIFFIN_LIM_SPEC:
                try:
                    parts[name] = GriffinLimVocoder.from_dict(meta.get("griffin_lim", {}), mel_config)
                except (TypeError, ValueError) as e:
                    raise ValueError(f"{path / PIPELINE_FILE}: bad 'griffin_lim' settings: {e}") from e
            elif spec is not None:
                parts[name] = _load_component(path / name, tuple(spec), torch_dtype)
            else:
                parts[name] = None
            overrides.pop(name, None)
        if overrides:
            raise TypeError(f"unknown TangoPipeline parts: {sorted(overrides)}")
        if parts["tokenizer"] is None:
            raise ValueError(f"{path}: the pipeline has no tokenizer (Tango's checkpoints ship none); pass "
                             "tokenizer=<a local FLAN-T5 tokenizer folder> (model.tokenizer in a config, --tokenizer "
                             "for mmpref generate)")
        return cls(**parts, mel_config=mel_config)

    @classmethod
    def from_tango_checkpoint(cls, path_or_dir: str | os.PathLike, **kwargs: Any) -> TangoPipeline:
        """Load a public Tango / Tango 2 checkpoint; see :func:`mmpref.models.tango.convert.load_tango_checkpoint`."""
        from mmpref.models.tango.convert import load_tango_checkpoint

        return load_tango_checkpoint(cls, path_or_dir, **kwargs)

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """Write diffusers' layout (see the module docstring); refuses a pipeline without a tokenizer, which
        could not encode a prompt once loaded."""
        if self.tokenizer is None:
            raise ValueError("TangoPipeline.save_pretrained: the pipeline has no tokenizer, so the saved folder "
                             "could not encode prompts; set one first (e.g. tokenizer=<local FLAN-T5 folder> when "
                             "loading a Tango checkpoint)")
        import diffusers

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        index: dict[str, Any] = {"_class_name": type(self).__name__, "_diffusers_version": diffusers.__version__}
        own: dict[str, Any] = {"mel_config": self.mel_config.to_dict()}
        for name in COMPONENTS:
            part = getattr(self, name)
            if part is None or isinstance(part, GriffinLimVocoder):  # settings only: nothing in a subfolder
                index[name] = [None, None]  # diffusers' way of saying "no such part"
                if part is not None:
                    own["griffin_lim"], own["vocoder"] = part.to_dict(), GRIFFIN_LIM
                continue
            part.save_pretrained(path / name)
            lib = "diffusers" if type(part).__module__.startswith("diffusers") else "transformers"
            # AutoTokenizer: loads with any transformers version (the concrete class name changed in v5)
            index[name] = [lib, "AutoTokenizer" if name == "tokenizer" else type(part).__name__]
        index["_mmpref"] = own
        (path / PIPELINE_FILE).unlink(missing_ok=True)  # a folder re-saved in place keeps one index
        write_json_atomic(path / MODEL_INDEX, index, indent=2)  # written last: its presence marks a complete folder
        return path

    # ------------------------------------------------------------------ placement
    def _modules(self) -> dict[str, torch.nn.Module]:
        names = ("text_encoder", "unet", "vae", "vocoder", "log_mel")
        return {n: getattr(self, n) for n in names if isinstance(getattr(self, n), torch.nn.Module)}

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> TangoPipeline:
        """Move every model (``dtype`` applies to the networks, not to the float64 mel filters)."""
        for name, m in self._modules().items():
            m.to(device=device, dtype=None if name == "log_mel" else dtype)
        return self

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def latent_factor(self) -> int:
        """VAE downsampling factor of time and frequency (4 for Tango)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def latent_shape(self, duration_s: float) -> tuple[int, int, int]:
        """``(C, T', F')`` of one latent for ``duration_s`` seconds: ``ceil(ceil(samples / hop) / 4)`` frames."""
        frames = math.ceil(samples_for(duration_s, self.mel_config) / self.mel_config.hop_length)
        f = self.latent_factor
        return self.unet.config.in_channels, math.ceil(frames / f), self.mel_config.n_mels // f

    # ------------------------------------------------------------------ encoders / decoders
    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """T5 last hidden state ``(B, L, D)`` and the int attention mask ``(B, L)`` (padding to the longest)."""
        if self.tokenizer is None:
            raise RuntimeError("this TangoPipeline has no tokenizer: pass tokenizer=<local FLAN-T5 path>")
        tok = self.tokenizer(list(prompts), padding=True, truncation=True,
                             max_length=self.tokenizer.model_max_length, return_tensors="pt")
        ids = tok["input_ids"].to(self.text_encoder.device)
        mask = tok["attention_mask"].to(self.text_encoder.device)
        hidden = self.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        return hidden, mask

    def unet_condition(self, hidden: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """:meth:`encode_text`'s output as the UNet's keyword arguments (one family may pack several streams)."""
        return {"encoder_hidden_states": hidden, "encoder_attention_mask": mask}

    @torch.no_grad()
    def encode_mel(self, mel: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """VAE posterior ``(mean, std)`` of a log-mel ``(B, frames, n_mels)``, both times ``scaling_factor``.

        Frames are padded at the end to a multiple of the latent factor with the log-mel of silence
        (``log 1e-5``: what zero-padding the wave, as Tango does, produces), so ``T'`` = ``ceil(frames / 4)``.
        """
        f = self.latent_factor
        if mel.shape[-1] % f:
            raise ValueError(f"n_mels={mel.shape[-1]} must be divisible by the VAE factor {f}")
        pad = -mel.shape[1] % f
        if pad:
            mel = F.pad(mel, (0, 0, 0, pad), value=self.mel_config.silence)
        x = mel.unsqueeze(1).to(device=self.vae.device, dtype=self.vae.dtype)
        dist = self.vae.encode(x).latent_dist
        s = self.vae.config.scaling_factor
        return dist.mean * s, dist.std * s

    @torch.no_grad()
    def encode_audio(self, wave: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``wave (B, T)`` at ``mel_config.sample_rate`` -> scaled posterior ``(mean, std)``.

        The mel keeps ``T // hop`` frames (Tango drops the trailing centre frame: 10.24 s -> 1024 -> 256 latents).
        """
        wave = torch.as_tensor(wave)
        mel = self.log_mel(wave.to(self.log_mel.basis.device))
        return self.encode_mel(mel[:, : max(1, wave.shape[-1] // self.mel_config.hop_length)])

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents ``(B, 8, T', F')`` -> log-mel ``(B, 4 T', 4 F')``."""
        z = latents.to(device=self.vae.device, dtype=self.vae.dtype) / self.vae.config.scaling_factor
        return self.vae.decode(z).sample.squeeze(1)

    @torch.no_grad()
    def mel_to_wave(self, mel: torch.Tensor) -> torch.Tensor:
        """Log-mel ``(B, frames, n_mels)`` -> float32 wave ``(B, frames * hop)``.

        AudioLDM's HiFi-GAN emits ``frames * hop + 32`` samples (its transposed-conv padding); the tail is cut.
        Without a neural vocoder, Griffin-Lim runs on the mel's device (``vocoder=None``: default settings).
        """
        vocoder = self.vocoder if self.vocoder is not None else GriffinLimVocoder(self.mel_config)
        if isinstance(vocoder, GriffinLimVocoder):
            return vocoder(mel)
        wave = vocoder(mel.to(device=vocoder.device, dtype=vocoder.dtype)).float()
        return wave[:, : mel.shape[1] * self.mel_config.hop_length]

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def __call__(
        self,
        prompts: str | list[str],
        duration_s: float = 10.0,
        num_inference_steps: int = 100,
        guidance_scale: float = 3.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        seed: int | None = None,
        batch_size: int | None = None,
        num_samples_per_prompt: int = 1,
        progress: bool = False,
        output_type: Literal["wave", "mel", "latent"] = "wave",
        desc: str = "tango",
        attention_backends: Sequence[str] = DEFAULT_SDPA_BACKENDS,
    ) -> np.ndarray | torch.Tensor:
        """Generate ``N = len(prompts) * num_samples_per_prompt`` samples (prompt-major order).

        ``output_type`` says where to stop (diffusers-style):

        * ``"wave"`` (default): float32 numpy audio ``(N, duration_s * sr)``;
        * ``"mel"``: the VAE's log-mels, a CPU float32 tensor ``(N, 4 T', n_mels)`` (``T'`` latent frames: not
          cropped to the duration, exactly :meth:`decode_latents` of the latents);
        * ``"latent"``: the scaled latents, a CPU float32 tensor ``(N, C, T', F')`` (:meth:`latent_shape`).

        Randomness is per sample: sample ``i`` uses its own CPU generator, seeded from ``(seed, i)``, for its
        initial noise and for every DDPM step, so results depend on neither ``batch_size`` nor the device's RNG.
        ``generator`` may instead be one generator (per-sample seeds are drawn from it) or a list of N.
        ``desc`` labels the progress bar. ``attention_backends``: the attention kernels the UNet may use, as in
        training (:mod:`mmpref.models.attention`; cuDNN is left out by default).
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if not (math.isfinite(duration_s) and duration_s > 0):
            raise ValueError(f"duration_s must be > 0 seconds, got {duration_s}")
        if num_inference_steps < 1 or num_samples_per_prompt < 1:
            raise ValueError("num_inference_steps and num_samples_per_prompt must be >= 1")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        prompts = [p for p in prompts for _ in range(num_samples_per_prompt)]
        gens = _sample_generators(len(prompts), generator, seed)
        bs = batch_size or len(prompts)
        bar = tqdm(total=len(prompts) * num_inference_steps, disable=not progress, desc=desc, unit="step")
        out = []
        for start in range(0, len(prompts), bs):
            sl = slice(start, start + bs)
            with attention_kernels(attention_backends):
                latents = self._denoise(prompts[sl], gens[sl], duration_s, num_inference_steps, guidance_scale, bar)
            out.append(self._finish(latents, output_type, duration_s))
        bar.close()
        if output_type == "wave":
            return np.concatenate(out, axis=0).astype(np.float32)
        return torch.cat(out)

    def _finish(self, latents: torch.Tensor, output_type: str, duration_s: float) -> np.ndarray | torch.Tensor:
        """One batch of denoised latents -> the requested output (CPU)."""
        if output_type == "latent":
            return latents.float().cpu()
        mel = self.decode_latents(latents)
        if output_type == "mel":
            return mel.float().cpu()
        wave = self.mel_to_wave(mel)
        return _fit_length(wave, samples_for(duration_s, self.mel_config)).cpu().numpy()

    def _condition(self, prompts: list[str], cfg: bool) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, mask = self.encode_text(prompts)
        if cfg:  # unconditional first, as Tango does
            uh, um = self.encode_text([""] * len(prompts))
            length = max(hidden.shape[1], uh.shape[1])
            hidden = torch.cat([_pad_to(uh, length), _pad_to(hidden, length)])
            mask = torch.cat([_pad_to(um, length), _pad_to(mask, length)])
        return hidden.to(self.unet.dtype), mask

    def _denoise(self, prompts: list[str], gens: list[torch.Generator], duration_s: float, steps: int,
                 guidance_scale: float, bar: tqdm) -> torch.Tensor:
        """Latents ``(N, C, T', F')`` of ``prompts`` after ``steps`` scheduler steps, sample i driven by ``gens[i]``
        alone; classifier-free guidance (an empty-prompt pass) when ``guidance_scale > 1``."""
        cfg = guidance_scale > 1.0
        hidden, mask = self._condition(prompts, cfg)
        hidden, mask = hidden.to(self.device), mask.to(self.device)
        shape = self.latent_shape(duration_s)
        noise = torch.stack([torch.randn(shape, generator=g) for g in gens])  # CPU, float32: device-independent
        latents = noise.to(self.device, self.dtype) * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(steps, device=self.device)
        extra = {"generator": gens} if "generator" in inspect.signature(self.scheduler.step).parameters else {}
        for t in self.scheduler.timesteps:
            x = torch.cat([latents] * 2) if cfg else latents
            x = self.scheduler.scale_model_input(x, t)
            pred = self.unet(x, t, **self.unet_condition(hidden, mask)).sample
            if cfg:
                uncond, cond = pred.chunk(2)
                pred = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(pred, t, latents, **extra).prev_sample
            bar.update(len(prompts))
        return latents


def _pad_to(x: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad dim 1 (sequence) to ``length``; padded positions are masked out of cross-attention."""
    pad = length - x.shape[1]
    if pad == 0:
        return x
    return F.pad(x, (0, 0, 0, pad) if x.dim() == 3 else (0, pad))


def _fit_length(wave: torch.Tensor, n: int) -> torch.Tensor:
    return wave[:, :n] if wave.shape[1] >= n else F.pad(wave, (0, n - wave.shape[1]))


def _mel_config_of(vocoder: Any) -> MelConfig:
    """The mel settings a vocoder was built for (a neural vocoder's config names its rate and mel bins)."""
    if isinstance(vocoder, GriffinLimVocoder):
        return vocoder.mel_config
    if vocoder is None or isinstance(vocoder, str):
        return MelConfig()
    return MelConfig(sample_rate=vocoder.config.sampling_rate, n_mels=vocoder.config.model_in_dim)


def _resolve_vocoder(vocoder: Any, mel_config: MelConfig) -> Any:
    """``"griffin_lim"`` -> a default :class:`GriffinLimVocoder`; anything else is kept as given."""
    if isinstance(vocoder, str):
        if vocoder != GRIFFIN_LIM:
            raise ValueError(f"vocoder: the only vocoder given by name is {GRIFFIN_LIM!r}, got {vocoder!r}")
        return GriffinLimVocoder(mel_config)
    return vocoder


def _sample_generators(n: int, generator: torch.Generator | list[torch.Generator] | None,
                       seed: int | None) -> list[torch.Generator]:
    if isinstance(generator, list):
        if len(generator) != n:
            raise ValueError(f"got {len(generator)} generators for {n} samples")
        return generator
    if seed is None:
        # one generator (or the global RNG) -> per-sample seeds
        seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    states = np.random.SeedSequence(seed).spawn(n)  # child i depends only on (seed, i)
    return [torch.Generator().manual_seed(int(s.generate_state(1, np.uint64)[0])) for s in states]


def _read_index(path: Path) -> dict[str, Any]:
    """``{"mel_config", "components", "griffin_lim"?}`` from ``model_index.json`` or an older ``pipeline.json``."""
    index_file, old_file = path / MODEL_INDEX, path / PIPELINE_FILE
    if index_file.is_file():
        index = json.loads(index_file.read_text())
        if index.get("_class_name") != "TangoPipeline":
            raise ValueError(f"{path} holds a diffusers {index.get('_class_name')} (model_index.json), not a "
                             "TangoPipeline; mmpref.models.pipelines.pipeline_from_pretrained loads each supported "
                             "family (TangoPipeline, AudioLDM2Pipeline) with its own class")
        own = index.get("_mmpref", {})
        components = {n: (None if index.get(n) in (None, [None, None]) else tuple(index[n])) for n in COMPONENTS}
        if own.get("vocoder") == GRIFFIN_LIM:
            components["vocoder"] = _GRIFFIN_LIM_SPEC
        return {"mel_config": own.get("mel_config", {}), "components": components,
                "griffin_lim": own.get("griffin_lim", {})}
    try:
        return json.loads(old_file.read_text())
    except OSError as e:
        raise FileNotFoundError(f"{path} is not a TangoPipeline folder (no {MODEL_INDEX} or {PIPELINE_FILE}); save "
                                "one with TangoPipeline.save_pretrained") from e


def _load_component(path: Path, spec: tuple[str, str], torch_dtype: torch.dtype | None) -> Any:
    lib, cls_name = spec
    if path.name == "tokenizer" and lib == "transformers":  # whichever tokenizer class: AutoTokenizer reads it
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    if spec not in _LOADABLE:
        raise ValueError(f"{path}: the pipeline index names an unsupported class {spec}")
    module = __import__(lib, fromlist=[cls_name])
    cls = getattr(module, cls_name)
    if cls_name == "AutoTokenizer" or cls_name.endswith("Scheduler"):
        return cls.from_pretrained(path)
    if lib == "transformers":
        return cls.from_pretrained(path, dtype=torch_dtype) if torch_dtype else cls.from_pretrained(path)
    return cls.from_pretrained(path, torch_dtype=torch_dtype)
