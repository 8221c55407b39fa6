"""Diffusion-DPO for Tango-style text-to-audio latent diffusion (Tango 2), over winner/loser *sets*.

Per group (one prompt, one winner, K losers) a step draws ONE timestep, ONE noise and ONE (possibly dropped-out)
condition, shared by every member, and denoises the whole group in a single UNet call of ``B * (1+K)`` members.
Scores follow the formula sheet: ``lp = -1/2 * w(t) * mse``, ``mse`` the mean over latent elements of
``||target - unet(x_t, t, c)||^2``. With ``w(t) = 1``, v-prediction and ``dpo`` at beta = 2000 this is Tango 2's loss.

Because ``mse`` is a *mean* over latent elements, beta's scale depends on the latent size (duration, VAE factor):
a beta tuned at 10 s clips is not the same objective at 2 s.

What is frozen is computed once (:meth:`DiffusionAdapter.setup`): the VAE posterior ``(mean, std)`` of every clip
(sampled afresh each step) and the text encodings, stored as safetensors shards keyed by a fingerprint of the VAE
and text-encoder weights, the tokenizer, the mel settings and the data; any change rebuilds the cache.
"""

from __future__ import annotations

import copy
import hashlib
import logging
from collections.abc import Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.training_utils import compute_snr
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from mmpref.adapters.base import Adapter, LossRequirements, local_main_process, unwrap
from mmpref.audio import normalize_wave, samples_for
from mmpref.config import Objective, RolloutConfig, TrainConfig
from mmpref.data.audio import (
    AudioIssue,
    AudioPreferenceDataConfig,
    InvalidAudioError,
    PreferenceIndex,
    ShardReader,
    ShardWriter,
    audio_digest,
    audio_stats_fingerprint,
    cache_is_valid,
    default_cache_dir,
    fit_length,
    format_issues,
    load_preference_index,
    read_and_check,
    read_cache_meta,
    write_cache_meta,
)
from mmpref.errors import ConfigError, DataError
from mmpref.io import atomic_dir
from mmpref.losses import Scores
from mmpref.models.attention import DEFAULT_SDPA_BACKENDS, attention_kernels, check_backends
from mmpref.sources import check_source, loading

logger = logging.getLogger(__name__)

WEIGHTINGS = ("none", "epsilon", "min_snr")
PREDICTION_TYPES = ("epsilon", "v_prediction")
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # the UNet's attention projections


@dataclass
class DiffusionModelConfig:
    """The ``model:`` section of a diffusion run.

    pipeline: a :class:`TangoPipeline` or diffusers ``AudioLDM2Pipeline`` folder, or a preset (``tiny``, ``tango``,
        ``audioldm2-tiny``: random weights, for tests and benchmarks). ``tokenizer``: a local FLAN-T5 tokenizer
        folder; for the ``tango`` preset, and for a Tango folder it replaces the folder's tokenizer (or supplies one
        a folder lacks). AudioLDM 2 folders ship their own tokenizers.
    prediction_type: override the scheduler's (``epsilon`` | ``v_prediction``; Tango: v_prediction).
    weighting: ``w(t)`` in ``lp = -1/2 w(t) mse``: ``none`` (w = 1, Tango 2), ``epsilon`` (the epsilon-MSE
        equivalent: ``alpha_bar(t)`` for v-prediction, since ``||eps - eps^||^2 = alpha_bar ||v - v^||^2``; 1 for
        epsilon) or ``min_snr`` (Min-SNR-gamma: ``min(snr, gamma) / snr``, or ``/ (snr + 1)`` for v-prediction).
    cfg_dropout: probability that a group's prompt is replaced by the empty prompt (the same for winner and
        losers). Only while the policy is in training mode.
    reference_offload: keep the frozen reference copy on the CPU and stream it to the device module by module
        (accelerate's ``cpu_offload``). The reference's dtype is ``reference.dtype``, its mode ``reference.mode``.
    cache: precompute latents and text encodings (default). False recomputes mel, VAE and T5 every step.
    grouped_forward: one UNet call per group batch (default). False calls the UNet once per (winner, loser) pair,
        as Tango 2's script does; the numbers are the same, only slower (kept for tests and the benchmark).
    attention_backends: the kernels PyTorch's scaled-dot-product attention may pick (in its own priority order)
        inside the UNet's training and reference passes: any of ``flash``, ``efficient``, ``cudnn``, ``math``.
        cuDNN is left out by default (why: :mod:`mmpref.models.attention`). With gradient checkpointing the
        backward's recomputed forward runs under the same choice.
    """

    pipeline: str = "tiny"
    tokenizer: str | None = None
    preset_seed: int = 0
    prediction_type: str | None = None
    weighting: str = "none"
    snr_gamma: float = 5.0
    cfg_dropout: float = 0.0
    reference_offload: bool = False
    cache: bool = True
    cache_batch_size: int = 8
    cache_shard_size: int = 256
    grouped_forward: bool = True
    gradient_checkpointing: bool = False
    attention_backends: list[str] = field(default_factory=lambda: list(DEFAULT_SDPA_BACKENDS))
    timestep_bins: int = 4

    def __post_init__(self) -> None:
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"model.weighting must be one of {list(WEIGHTINGS)}, got {self.weighting!r}")
        if self.prediction_type not in (None, *PREDICTION_TYPES):
            raise ValueError(f"model.prediction_type must be one of {list(PREDICTION_TYPES)} or null, "
                             f"got {self.prediction_type!r}")
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise ValueError(f"model.cfg_dropout must be in [0, 1), got {self.cfg_dropout!r}")
        if not self.snr_gamma > 0:
            raise ValueError(f"model.snr_gamma must be > 0, got {self.snr_gamma!r}")
        check_backends(self.attention_backends, "model.attention_backends")


def _checkpoint_under(backends: list[str]):
    """diffusers' checkpoint call (non-reentrant), with the backward's recomputation under the same attention kernels
    as the forward: torch's checkpoint does not carry ``sdpa_kernel``'s choice into it."""

    def run(module: nn.Module, *args):
        return checkpoint(module.__call__, *args, use_reentrant=False,
                          context_fn=lambda: (nullcontext(), attention_kernels(backends)))

    return run


# ---------------------------------------------------------------------------------------------- datasets
class _TrainSet(Dataset):
    """The training set handed out by ``train_dataset``; ``setup()`` fills it in.

    The engine may build its DataLoader before ``setup()`` (only ``len`` is read then): until then the length is
    that of the index; ``skip_invalid`` may shrink it in ``setup()``.
    """

    def __init__(self, n: int):
        self.n, self.inner = n, None

    def __len__(self) -> int:
        return self.n if self.inner is None else len(self.inner)

    def __getitem__(self, i: int) -> dict[str, Any]:
        if self.inner is None:
            raise RuntimeError("the diffusion training set is filled by adapter.setup(accelerator)")
        return self.inner[i]


class _CachedGroups(Dataset):
    """Groups as cached tensors: posterior ``(1+K, C, H, W)`` x2 and the prompt's encoding."""

    def __init__(self, groups: list[tuple[int, tuple[int, ...]]], latents: ShardReader, text: ShardReader,
                 tags: list[str | None] | None = None):
        self.groups, self.latents, self.text, self.tags = groups, latents, text, tags

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        prompt, clips = self.groups[i]
        row = {
            "mean": torch.stack([self.latents.row(c, "mean") for c in clips]),
            "std": torch.stack([self.latents.row(c, "std") for c in clips]),
            "hidden": self.text.row(prompt, "hidden"),
            "mask": self.text.row(prompt, "mask"),
        }
        if self.tags:
            row["tag"] = self.tags[i]
        return row


class _AudioGroups(Dataset):
    """Groups as prompts and waves (uncached: mel, VAE and T5 run in every step)."""

    def __init__(self, index: PreferenceIndex, groups: list, sample_rate: int, n_samples: int):
        self.index, self.groups, self.sr, self.n = index, groups, sample_rate, n_samples

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> dict[str, Any]:
        prompt, clips = self.groups[i]
        waves = [prepare_wave(self.index.read(c, self.sr), self.n) for c in clips]
        row = {"prompt": self.index.prompts[prompt], "wave": torch.stack(waves)}
        if self.index.tags:
            row["tag"] = self.index.tag(self.groups[i])
        return row


def prepare_wave(wave: np.ndarray, n_samples: int) -> Tensor:
    """Tango's training-time preprocessing: remove the mean, peak-normalise to 0.5, crop/pad to the clip length."""
    return fit_length(normalize_wave(torch.from_numpy(wave)[None])[0], n_samples)


class _ClipReader(Dataset):
    """Decodes and checks clips for the cache build (parallel in dataloader workers)."""

    def __init__(self, index: PreferenceIndex, clip_ids: list[int], data: AudioPreferenceDataConfig, mel: Any):
        self.index, self.ids, self.data, self.sr = index, clip_ids, data, mel.sample_rate
        self.n = samples_for(data.duration_s, mel)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[int, Tensor | None, str | None, str]:
        wave, reason = read_and_check(self.index, self.ids[i], self.sr, self.data)
        return i, (None if wave is None else prepare_wave(wave, self.n)), reason, audio_digest(wave)


# ---------------------------------------------------------------------------------------------- the adapter
class DiffusionAdapter(Adapter):
    """See the module docstring. Batches hold cached posteriors/encodings, or prompts and waves when uncached."""

    name = "diffusion"
    model_config_class = DiffusionModelConfig
    data_config_class = AudioPreferenceDataConfig
    unsupported_reference_modes = {"cached": "not available for diffusion: reference errors depend on each step's "
                                             "noise and timestep; use copy or lora"}

    def __init__(self, cfg: TrainConfig, objectives: Sequence[Objective] | None = None):
        super().__init__(cfg, objectives)  # checks the objectives, resolves the reference mode
        self.mcfg: DiffusionModelConfig = cfg.model
        self.dcfg: AudioPreferenceDataConfig = cfg.data
        self.online = cfg.online is not None  # the data are the policy's own samples (mmpref.online)
        self.index = load_preference_index(self.dcfg) if not self.online else None
        if self.online and cfg.online.generation.mixture:
            raise ConfigError("online.generation.mixture is token-level (LLM adapter); diffusion samples from the "
                              "policy")
        if self.online and cfg.online.update_reference and self.ref_mode != "copy":
            raise ConfigError("online.update_reference copies the policy into the reference: it needs "
                              "reference.mode=copy")
        if self.index is not None and self.index.num_losers == 0:
            needs = next((o for o in self.objectives if o.loss.uses_losers), None)
            if needs is not None:
                raise ConfigError(f"{needs.label} compares winners with losers, but the data has winners only "
                                  "(data.num_losers=0 or rejected: []); use a winner-only objective such as sft, "
                                  "or data with losers")
        self.pipe = load_pipeline(self.mcfg)
        self.scheduler = _training_scheduler(self.pipe.scheduler, self.mcfg.prediction_type)
        self.pipe.scheduler = _sampling_scheduler(self.pipe.scheduler, self.mcfg.prediction_type)
        self.pipe.text_encoder.requires_grad_(False)
        self.pipe.vae.requires_grad_(False)
        self.reference = self._build_reference()
        self.policy = self._build_policy()
        self.device = torch.device("cpu")
        # None: the global RNG, seeded per process by the engine and saved in its checkpoints (exact resume)
        self.generator: torch.Generator | None = None
        self._dataset = _TrainSet(len(self.index.groups) if self.index is not None else 0)
        self._uncond: tuple[Tensor, Tensor] | None = None
        self._last: dict[str, Tensor] = {}
        self._wave_latent_shape: tuple[int, ...] | None = None

    # ----- models -----------------------------------------------------------------------------------------------
    def cannot_serve(self, loss: LossRequirements) -> str | None:
        if loss.unpaired:
            return "it is unpaired (desirable / undesirable rows); the diffusion adapter serves winner/loser groups"
        if loss.needs_kl:
            return "it needs KL samples from the policy (the kl term), which the diffusion adapter does not draw"
        if loss.needs_lengths:
            return "it needs completion lengths (token counts), which diffusion scores do not have"
        return None

    def _build_reference(self) -> nn.Module | None:
        """A frozen copy of the UNet (``copy``), or None: ``lora`` disables the adapter, ``none`` needs nothing."""
        rcfg = self.cfg.reference
        if self.ref_mode != "copy":
            return None
        ref = load_pipeline(self.mcfg, rcfg.path).unet if rcfg.path else copy.deepcopy(self.pipe.unet)
        dtype = _dtype(rcfg.dtype) or ref.dtype
        if dtype != ref.dtype:  # diffusers warns on every .to(dtype), also a no-op one
            ref = ref.to(dtype=dtype)
        return ref.requires_grad_(False).eval()

    def _build_policy(self) -> nn.Module:
        unet = self.pipe.unet
        if self.mcfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing(_checkpoint_under(self.mcfg.attention_backends))
        lcfg = self.cfg.lora
        if lcfg.enabled:
            from peft import LoraConfig

            if not hasattr(unet, "add_adapter"):
                raise ConfigError(f"lora.enabled: diffusers' {type(unet).__name__} has no PEFT adapter support; "
                                  "train this pipeline's UNet in full (lora.enabled=false)")

            unet.requires_grad_(False)  # only the adapter trains
            unet.add_adapter(LoraConfig(r=lcfg.r, lora_alpha=lcfg.alpha, lora_dropout=lcfg.dropout,
                                        target_modules=lcfg.target_modules or LORA_TARGETS))
        return unet.train()

    @property
    def train_dataset(self) -> Dataset:
        return self._dataset

    def data_fingerprint(self) -> str:
        """The preference file's contents and the grouping (not the audio files: those are checked by the cache)."""
        return self.index.fingerprint if self.index is not None else ""

    def setup(self, accelerator: Any) -> None:
        self.device = accelerator.device
        self.pipe.text_encoder.to(self.device)
        self.pipe.vae.to(self.device)
        self.pipe.log_mel.to(self.device)
        self.policy.to(self.device)
        self._place_reference()
        if self.online:  # T5 and the VAE stay: every round encodes captions and decodes samples for the judge
            hidden, mask = self.pipe.encode_text([""])
            self._uncond = (hidden[0, : int(mask[0].sum())].float().cpu(), mask[0, : int(mask[0].sum())].cpu())
            return
        groups = self._prepare_data(accelerator)
        if self.mcfg.cache:  # nothing below needs T5 or the VAE any more: free the device
            self.pipe.text_encoder.to("cpu")
            self.pipe.vae.to("cpu")
        logger.info("diffusion data: %d groups of 1 winner + %d losers", len(groups), self.index.num_losers)

    def _place_reference(self) -> None:
        if self.reference is None:
            return
        if self.mcfg.reference_offload and self.device.type != "cpu":
            from accelerate import cpu_offload

            cpu_offload(self.reference, execution_device=self.device)
        else:
            self.reference.to(self.device)

    # ----- data and cache ---------------------------------------------------------------------------------------
    def _prepare_data(self, accelerator: Any) -> list:
        if not self.mcfg.cache:
            issues, digests = self._validate_all()
            groups = self._usable_groups(issues, digests)
            self._dataset.inner = _AudioGroups(self.index, groups, self.pipe.mel_config.sample_rate,
                                         samples_for(self.dcfg.duration_s, self.pipe.mel_config))
            return groups
        directory, fp = default_cache_dir(self.dcfg), self.cache_fingerprint()
        with accelerator.main_process_first():  # the main process builds; the others then find it valid
            if not cache_is_valid(directory, fp):
                self.build_cache(directory, fp, num_workers=self.cfg.run.num_workers)
        accelerator.wait_for_everyone()
        meta = read_cache_meta(directory)
        issues = [AudioIssue(k, r) for k, r in meta["issues"]]
        groups = self._usable_groups(issues, dict(zip(meta["clips"], meta["digests"])))
        clip_row = {k: i for i, k in enumerate(meta["clips"])}
        prompt_row = {p: i for i, p in enumerate(meta["prompts"])}
        # group ids -> cache rows
        rows = [(prompt_row[self.index.prompts[p]], tuple(clip_row[self.index.clips[c].key] for c in clips))
                for p, clips in groups]
        latents = ShardReader(directory, meta["latent_shards"], meta["shard_size"])
        text = ShardReader(directory, meta["text_shards"], meta["shard_size"])
        tags = [self.index.tag(g) for g in groups] if self.index.tags else None
        self._dataset.inner = _CachedGroups(rows, latents, text, tags)
        empty = prompt_row[""]
        self._uncond = (text.row(empty, "hidden"), text.row(empty, "mask"))
        return groups

    def _usable_groups(self, issues: list[AudioIssue], digests: dict[str, str]) -> list:
        """The groups to train on: refuses (or, with skip_invalid, drops) groups with an unusable clip, and groups
        whose loser is the winner's audio (the same content under another name: a pair that teaches nothing)."""
        groups = self.index.groups
        clips = self.index.clips
        same = [g for g in groups if digests.get(clips[g[1][0]].key)
                and any(digests.get(clips[c].key) == digests.get(clips[g[1][0]].key) for c in g[1][1:])]
        if same and not self.dcfg.skip_invalid:
            shown = "; ".join(f"{self.index.prompts[p]!r}: {clips[m[0]].key}" for p, m in same[:3])
            raise DataError(f"{self.dcfg.path}: {len(same)} group(s) whose rejected audio is the same as the chosen "
                            f"audio ({shown}{'; ...' if len(same) > 3 else ''}); fix them or set "
                            "data.skip_invalid=true to drop them")
        if same:
            logger.warning("skip_invalid: dropped %d group(s) whose loser equals the winner", len(same))
            drop = {id(g) for g in same}
            groups = [g for g in groups if id(g) not in drop]
        if not issues:
            return groups
        report = format_issues(issues, len(self._used_clips()))
        if not self.dcfg.skip_invalid:
            raise InvalidAudioError(issues, len(self._used_clips()))
        bad = {i.key for i in issues}
        kept = [g for g in groups if not any(self.index.clips[c].key in bad for c in g[1])]
        logger.warning("%s\nskip_invalid: dropped %d of %d groups", report, len(groups) - len(kept), len(groups))
        if not kept:
            raise InvalidAudioError(issues, len(self._used_clips()))
        return kept

    def _used_clips(self) -> list[int]:
        return sorted({c for _, clips in self.index.groups for c in clips})

    def _validate_all(self) -> tuple[list[AudioIssue], dict[str, str]]:
        sr = self.pipe.mel_config.sample_rate
        out, digests = [], {}
        for c in self._used_clips():
            wave, reason = read_and_check(self.index, c, sr, self.dcfg)
            digests[self.index.clips[c].key] = audio_digest(wave)
            if reason:
                out.append(AudioIssue(self.index.clips[c].key, reason))
        return out, digests

    def cache_fingerprint(self) -> str:
        """Changes when anything that determines the cached tensors changes."""
        parts = [
            self.index.fingerprint,
            audio_stats_fingerprint(self.index),
            self.pipe.mel_config.to_dict(),
            [self.dcfg.duration_s, self.dcfg.length_tolerance_s, self.dcfg.silence_threshold],
            module_fingerprint(self.pipe.vae),
            dict(self.pipe.vae.config),
            module_fingerprint(self.pipe.text_encoder),
            _tokenizer_signature(self.pipe.tokenizer),
            *([_tokenizer_signature(self.pipe.clap_tokenizer)] if hasattr(self.pipe, "clap_tokenizer") else []),
            "tango-normalize-v1",  # the wave preprocessing (prepare_wave)
            "digests-v1",  # the cache records each clip's audio digest
        ]
        return hashlib.sha256(repr(parts).encode()).hexdigest()

    @torch.no_grad()
    def build_cache(self, directory: Path, fingerprint: str, num_workers: int = 0) -> None:
        """Encode every used clip (VAE posterior) and prompt (T5, plus the empty prompt) into ``directory``."""
        with atomic_dir(directory) as tmp:  # complete or absent: a killed build is rebuilt, never half-read
            clip_ids = self._used_clips()
            latents = ShardWriter(tmp, "latents", self.mcfg.cache_shard_size)
            issues, digests = self._encode_clips(clip_ids, latents, num_workers)
            prompts = sorted({self.index.prompts[p] for p, _ in self.index.groups} | {""})
            text = ShardWriter(tmp, "text", self.mcfg.cache_shard_size)
            for s in tqdm(range(0, len(prompts), self.mcfg.cache_batch_size), desc="cache: encode captions (T5)",
                          unit="batch", disable=not local_main_process()):
                hidden, mask = self.pipe.encode_text(prompts[s: s + self.mcfg.cache_batch_size])
                for h, m in zip(hidden, mask):
                    n = int(m.sum())
                    text.add(hidden=h[None, :n].float(), mask=m[None, :n])
            text.flush()
            write_cache_meta(tmp, {"fingerprint": fingerprint, "shard_size": self.mcfg.cache_shard_size,
                                   "clips": [self.index.clips[c].key for c in clip_ids], "prompts": prompts,
                                   "issues": [[i.key, i.reason] for i in issues], "digests": digests,
                                   "latent_shards": latents.shards, "text_shards": text.shards})

    def _encode_clips(self, clip_ids: list[int], writer: ShardWriter,
                      num_workers: int) -> tuple[list[AudioIssue], list[str]]:
        """VAE posteriors of ``clip_ids`` into ``writer``; returns the unusable clips and every clip's digest."""
        reader = DataLoader(_ClipReader(self.index, clip_ids, self.dcfg, self.pipe.mel_config),
                            batch_size=self.mcfg.cache_batch_size, num_workers=num_workers, collate_fn=list)
        issues: list[AudioIssue] = []
        digests: list[str] = []
        placeholder = torch.zeros(self.clip_latent_shape())
        for items in tqdm(reader, desc="cache: encode clips (VAE)", unit="batch", disable=not local_main_process()):
            ok = [w for _, w, _, _ in items if w is not None]
            encoded = iter(zip(*self.pipe.encode_audio(torch.stack(ok).to(self.device)))) if ok else iter(())
            for i, _, reason, digest in items:
                digests.append(digest)
                if reason is None:
                    m, s = next(encoded)
                    placeholder = torch.zeros_like(m)
                else:  # a zero row keeps rows aligned with clips; the clip's groups are dropped or refused
                    issues.append(AudioIssue(self.index.clips[clip_ids[i]].key, reason))
                    m = s = placeholder
                writer.add(mean=m[None].float(), std=s[None].float())
        writer.flush()
        return issues, digests

    # ----- batches ----------------------------------------------------------------------------------------------
    def collate(self, rows: list[dict]) -> dict:
        tags = {"tags": [r["tag"] for r in rows]} if "tag" in rows[0] else {}  # per-strategy metrics (engine)
        if "wave" in rows[0]:
            return {"prompts": [r["prompt"] for r in rows], "wave": torch.stack([r["wave"] for r in rows]), **tags}
        hidden, mask = _pad_text([r["hidden"] for r in rows], [r["mask"] for r in rows])
        batch = {"mean": torch.stack([r["mean"] for r in rows]), "std": torch.stack([r["std"] for r in rows]),
                 "hidden": hidden, "mask": mask}
        if "win_prob" in rows[0]:  # soft labels of online SPPO groups
            batch["win_prob"] = torch.stack([torch.as_tensor(r["win_prob"]) for r in rows])
        return {**batch, **tags}

    # ----- scores -----------------------------------------------------------------------------------------------
    def scores(self, policy: nn.Module, batch: dict, loss: LossRequirements) -> Scores:
        """``lp = -1/2 w(t) mse`` of every group member ``(B, 1+K)`` (the winners alone, ``(B, 1)``, when ``loss``
        does not read the losers), and the reference's when ``loss`` needs it; one timestep, noise and condition
        per group. What the adapter cannot serve was refused when it was built (:meth:`cannot_serve`)."""
        need_ref = loss.needs_reference
        members = self._group_size(batch) if loss.uses_losers else 1
        draws = self._draw(batch, members, training=policy.training)
        chunks = [list(range(members))] if self.mcfg.grouped_forward or members == 1 else \
            [[0, k] for k in range(1, members)]  # Tango 2's way: the winner is re-encoded and re-denoised per pair
        pol_cols: dict[int, Tensor] = {}
        ref_cols: dict[int, Tensor] = {}
        for cols in chunks:
            p, r = self._errors(policy, batch, cols, draws, need_ref)
            for j, c in enumerate(cols):  # per pair, the winner's first computation is kept
                pol_cols.setdefault(c, p[:, j])
                if r is not None:
                    ref_cols.setdefault(c, r[:, j])
        pol = torch.stack([pol_cols[c] for c in range(members)], dim=1)
        ref = torch.stack([ref_cols[c] for c in range(members)], dim=1) if need_ref else None
        w = self.timestep_weight(draws["t"])[:, None]
        self._last = {"t": draws["t"], "mse_policy": pol.detach(), "mse_ref": None if ref is None else ref,
                      "dropped": draws["drop"]}
        win_prob = batch.get("win_prob") if members > 1 else None
        return Scores(policy=-0.5 * w * pol, reference=None if ref is None else -0.5 * w * ref,
                      win_prob=None if win_prob is None else win_prob.to(pol.device))

    def _group_size(self, batch: dict) -> int:
        return (batch["mean"] if "mean" in batch else batch["wave"]).shape[1]

    def _draw(self, batch: dict, members: int, training: bool) -> dict[str, Tensor]:
        """All randomness of one step, drawn once per group (posterior samples per member, in a fixed order)."""
        g = self.generator
        b = (batch["mean"] if "mean" in batch else batch["wave"]).shape[0]
        shape = self._latent_shape(batch)
        eps = torch.randn((b, members, *shape), generator=g, device=self.device)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), generator=g, device=self.device)
        noise = torch.randn((b, *shape), generator=g, device=self.device)
        u = torch.rand((b,), generator=g, device=self.device)
        drop = (u < self.mcfg.cfg_dropout) if training else torch.zeros_like(u, dtype=torch.bool)
        return {"eps": eps, "t": t, "noise": noise, "drop": drop}

    def _latent_shape(self, batch: dict) -> tuple[int, ...]:
        if "mean" in batch:
            return tuple(batch["mean"].shape[2:])
        return self.clip_latent_shape()

    def clip_latent_shape(self) -> tuple[int, ...]:
        """``(C, T', F')`` of one clip's latent, as ``encode_audio`` makes it for ``data.duration_s``."""
        if self._wave_latent_shape is None:
            n = samples_for(self.dcfg.duration_s, self.pipe.mel_config)
            mean, _ = self.pipe.encode_audio(torch.zeros(1, n, device=self.pipe.vae.device))
            self._wave_latent_shape = tuple(mean.shape[1:])
        return self._wave_latent_shape

    def _errors(self, policy: nn.Module, batch: dict, cols: list[int], draws: dict,
                need_ref: bool) -> tuple[Tensor, Tensor | None]:
        """Policy (and reference) MSE ``(B, len(cols))`` of the members ``cols`` of every group.

        The reference pass runs first, without gradients, so its activations are freed before the policy's graph
        is built (run after, they would sit on top of it: a higher peak)."""
        inputs = self.unet_inputs(batch, cols, draws)
        b, n = len(draws["t"]), len(cols)
        # the kernel choice also holds for the backward, which autograd records per attention op
        with attention_kernels(self.mcfg.attention_backends):
            ref = None
            if need_ref:
                with torch.no_grad(), self._reference() as model:
                    ref = _mse(model, *inputs).view(b, n)
            pol = _mse(policy, *inputs).view(b, n)
        return pol, ref

    def unet_inputs(self, batch: dict, cols: list[int], draws: dict) -> tuple[Tensor, Tensor, dict, Tensor]:
        """``(noisy latents, t, the UNet's text keyword arguments, target)`` for the members ``cols`` of every group,
        flattened to ``B * len(cols)`` rows: what the policy and the reference denoise (``_mse(model, *inputs)``)."""
        hidden, mask = self._condition(batch, draws["drop"])
        mean, std = self._posterior(batch, cols)
        n = mean.shape[1]
        x0 = (mean + std * draws["eps"][:, cols]).flatten(0, 1)
        t = draws["t"].repeat_interleave(n)
        noise = draws["noise"].repeat_interleave(n, dim=0)
        noisy = self.scheduler.add_noise(x0, noise, t)
        target = noise if self.prediction_type == "epsilon" else self.scheduler.get_velocity(x0, noise, t)
        cond = self.pipe.unet_condition(hidden.repeat_interleave(n, dim=0), mask.repeat_interleave(n, dim=0))
        return noisy, t, cond, target

    @contextmanager
    def _reference(self):
        if self.ref_mode == "lora":
            self.policy.disable_adapters()
            try:
                yield self.policy
            finally:
                self.policy.enable_adapters()
        else:
            yield self.reference

    def _condition(self, batch: dict, drop: Tensor) -> tuple[Tensor, Tensor]:
        """The group's text condition ``(B, L, D)``, ``(B, L)``; dropped groups get the empty prompt's."""
        if "prompts" in batch:  # uncached: Tango's way, blank the text and encode
            prompts = ["" if d else p for p, d in zip(batch["prompts"], drop.tolist())]
            hidden, mask = self.pipe.encode_text(prompts)
            return hidden.to(self.device), mask.to(self.device)
        hidden, mask = batch["hidden"].to(self.device), batch["mask"].to(self.device)
        if drop.any():
            uh, um = self._uncond
            n = max(hidden.shape[1], int(um.sum()))
            uh, um = _pad_len(uh[None, :n], n).to(hidden), _pad_len(um[None, :n], n).to(mask)
            hidden = torch.where(drop[:, None, None], uh, _pad_len(hidden, n))
            mask = torch.where(drop[:, None], um, _pad_len(mask, n))
        return hidden, mask

    def _posterior(self, batch: dict, cols: list[int]) -> tuple[Tensor, Tensor]:
        if "mean" in batch:
            return batch["mean"][:, cols].to(self.device), batch["std"][:, cols].to(self.device)
        wave = batch["wave"][:, cols].to(self.device)
        mean, std = self.pipe.encode_audio(wave.flatten(0, 1))
        return mean.float().unflatten(0, wave.shape[:2]), std.float().unflatten(0, wave.shape[:2])

    @property
    def prediction_type(self) -> str:
        return self.scheduler.config.prediction_type

    def timestep_weight(self, t: Tensor) -> Tensor:
        """``w(t)`` per sample (float32); see :class:`DiffusionModelConfig`."""
        if self.mcfg.weighting == "none":
            return torch.ones(t.shape, device=t.device)
        snr = compute_snr(self.scheduler, t)
        v = self.prediction_type == "v_prediction"
        if self.mcfg.weighting == "epsilon":
            return snr / (snr + 1) if v else torch.ones_like(snr)
        clipped = snr.clamp(max=self.mcfg.snr_gamma)
        return clipped / (snr + 1) if v else clipped / snr

    # ----- metrics and saving -----------------------------------------------------------------------------------
    # ----- online: the policy's own samples (mmpref.online) ---------------------------------------------------------
    @torch.no_grad()
    def sample(self, policy: nn.Module, prompts: Sequence[str], n: int, seeds: Sequence[int],
               rollout: RolloutConfig) -> list[list[Tensor]]:
        """``n`` latents ``(C, T', F')`` per caption from the current policy (the pipeline's own sampler), sample j
        of caption i seeded by ``(seeds[i], j)`` alone; kept as they are, so training never re-encodes them."""
        unet = self.pipe.unet
        self.pipe.unet = unwrap(policy)
        was = self.pipe.unet.training
        self.pipe.unet.eval()
        try:  # one batch; sample j of caption i driven by its own generator, seeded from (seeds[i], j)
            gens = [torch.Generator().manual_seed(int(np.random.SeedSequence([int(seed), j]).generate_state(1)[0]))
                    for seed in seeds for j in range(n)]
            latents = self.pipe(list(prompts), duration_s=self.dcfg.duration_s, num_inference_steps=rollout.steps,
                                guidance_scale=rollout.guidance_scale, generator=gens, num_samples_per_prompt=n,
                                output_type="latent", attention_backends=self.mcfg.attention_backends).float()
            return [list(latents[i * n:(i + 1) * n]) for i in range(len(prompts))]
        finally:
            self.pipe.unet.train(was)
            self.pipe.unet = unet

    @torch.no_grad()
    def judge_inputs(self, rollouts: Sequence[Tensor]) -> list[np.ndarray]:
        """What a judge hears: each latent decoded (VAE, vocoder) to a wave of ``data.duration_s``."""
        n = samples_for(self.dcfg.duration_s, self.pipe.mel_config)
        mel = self.pipe.decode_latents(torch.stack(list(rollouts)).to(self.device))
        return [w[:n] for w in self.pipe.mel_to_wave(mel).float().cpu().numpy()]

    @property
    def rollout_sample_rate(self) -> int:
        return self.pipe.mel_config.sample_rate

    @torch.no_grad()
    def group_row(self, index: int, prompt: str, members: Sequence[Tensor], win_prob: Sequence[float] | None) -> dict:
        """One group in the cached layout: the samples themselves as posterior means (std 0) and the caption's
        T5 encoding, so :meth:`collate` and :meth:`scores` serve it as they serve offline data."""
        hidden, mask = self.pipe.encode_text([prompt])
        n = int(mask[0].sum())
        mean = torch.stack([m.float().cpu() for m in members])
        row = {"mean": mean, "std": torch.zeros_like(mean), "hidden": hidden[0, :n].float().cpu(),
               "mask": mask[0, :n].cpu()}
        if win_prob is not None:
            row["win_prob"] = torch.tensor(list(win_prob), dtype=torch.float32)
        return row

    def rollout_record(self, rollout: Tensor) -> Tensor:
        return rollout.float().cpu()

    def rollout_from_record(self, record: Tensor) -> Tensor:
        return record

    def step_metrics(self) -> dict[str, float]:
        """Winner/loser MSE of policy and reference, overall and per timestep bin; CFG-dropped share."""
        last = self._last
        if not last:
            return {}
        out = {"diffusion/cfg_dropped": last["dropped"].float().mean().item()}
        t = last["t"]
        edges = np.linspace(0, self.scheduler.config.num_train_timesteps, self.mcfg.timestep_bins + 1).astype(int)
        for who in ("policy", "ref"):
            mse = last[f"mse_{who}"]
            if mse is None:
                continue
            for side, cols in (("chosen", slice(0, 1)), ("rejected", slice(1, None))):
                vals = mse[:, cols]
                if vals.numel() == 0:
                    continue
                out[f"diffusion/mse_{who}_{side}"] = vals.mean().item()
                for lo, hi in zip(edges[:-1], edges[1:]):
                    sel = (t >= lo) & (t < hi)
                    if sel.any():
                        out[f"diffusion/mse_{who}_{side}/t{lo}-{hi}"] = vals[sel].mean().item()
        return out

    def card_metadata(self) -> dict[str, Any]:
        meta = {"base_model": self.mcfg.pipeline, "pipeline_tag": "text-to-audio"}
        if hasattr(self.pipe, "as_diffusers"):  # an AudioLDM 2 folder: diffusers loads it as it is
            return {**meta, "tags": ["audioldm2", "diffusion-dpo"],
                    "usage": "from diffusers import AudioLDM2Pipeline\n\npipe = AudioLDM2Pipeline.from_pretrained("
                             "{repo})\naudio = pipe(\"a dog barks, then a car passes\").audios[0]"}
        return {**meta, "tags": ["tango", "diffusion-dpo"],
                "usage": "from mmpref import TangoPipeline\n\npipe = TangoPipeline.from_pretrained({repo})\n"
                         "audio = pipe([\"a dog barks, then a car passes\"])"}

    def save_pretrained(self, policy: nn.Module, path: str) -> None:
        """The whole pipeline in its family's layout, usable as it is by ``mmpref generate`` (and
        ``TangoPipeline.from_pretrained`` / diffusers' ``AudioLDM2Pipeline.from_pretrained``). With
        LoRA the adapter is fused into a copy of the UNet first (the trained policy keeps its adapter), and the
        adapter alone is also saved in ``unet_lora/`` (diffusers' ``save_lora_adapter``), to load onto the base."""
        path = Path(path)
        unet = policy
        if self.cfg.lora.enabled:
            policy.save_lora_adapter(str(path / "unet_lora"))
            unet = copy.deepcopy(policy)
            unet.fuse_lora()
            unet.unload_lora()
        pipe = copy.copy(self.pipe)
        pipe.unet = unet
        pipe.scheduler = self.scheduler
        pipe.save_pretrained(path)


# ---------------------------------------------------------------------------------------------- helpers
def load_pipeline(mcfg: DiffusionModelConfig, path: str | None = None) -> Any:
    from mmpref.models.pipelines import pipeline_from_preset, pipeline_from_pretrained, preset_names

    source = path or mcfg.pipeline
    if source in preset_names():
        return pipeline_from_preset(source, seed=mcfg.preset_seed, tokenizer=mcfg.tokenizer)
    key = "reference.path" if path else "model.pipeline"
    check_source(source, key, f"a TangoPipeline / AudioLDM2Pipeline folder or a preset name "
                              f"({', '.join(preset_names())})")
    with loading(key, source, "a TangoPipeline / AudioLDM2Pipeline folder"):
        return pipeline_from_pretrained(source, tokenizer=mcfg.tokenizer)


def _sampling_scheduler(scheduler: Any, prediction_type: str | None) -> Any:
    """The pipeline's own sampler, reading the UNet's output as training teaches it to predict: without this, an
    overridden ``model.prediction_type`` would train one parameterisation and draw online samples with another."""
    own = scheduler.config.get("prediction_type")
    if not prediction_type or own == prediction_type:
        return scheduler
    logger.warning("model.prediction_type: %s overrides the checkpoint's scheduler (%s): the UNet is trained to "
                   "predict %s from here on, and is saved and sampled that way; set model.prediction_type: null to "
                   "keep the checkpoint's", prediction_type, own, prediction_type)
    return scheduler.__class__.from_config(scheduler.config, prediction_type=prediction_type)


def _training_scheduler(scheduler: Any, prediction_type: str | None) -> Any:
    """A DDPM scheduler for the forward process; ``prediction_type`` overrides the checkpoint's."""
    cls = scheduler.__class__ if isinstance(scheduler, DDPMScheduler | DDIMScheduler) else DDPMScheduler
    overrides = {"prediction_type": prediction_type} if prediction_type else {}
    sched = cls.from_config(scheduler.config, **overrides)
    if sched.config.prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unsupported prediction type {sched.config.prediction_type!r}; "
                         f"choose model.prediction_type from {list(PREDICTION_TYPES)}")
    return sched


def _mse(model: nn.Module, noisy: Tensor, t: Tensor, cond: dict[str, Tensor], target: Tensor) -> Tensor:
    """Mean over latent elements of ``(target - model(x_t, t, c))^2`` per member, in float32."""
    dtype = next(model.parameters()).dtype
    cond = {k: v.to(dtype) if v.is_floating_point() else v for k, v in cond.items()}
    pred = model(noisy.to(dtype), t, **cond).sample
    return (pred.float() - target.float()).pow(2).flatten(1).mean(1)


def _pad_len(x: Tensor, n: int) -> Tensor:
    """Zero-pad the sequence axis (dim -2 for hidden (.., L, D), dim -1 for masks (.., L)) to ``n``."""
    seq = -2 if x.is_floating_point() else -1
    pad = n - x.shape[seq]
    if pad <= 0:
        return x
    return torch.nn.functional.pad(x, (0, 0, 0, pad) if seq == -2 else (0, pad))


def _pad_text(hidden: list[Tensor], mask: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Stack per-prompt encodings, trimmed to the batch's longest prompt (cached rows carry shard padding)."""
    n = max(int(m.sum()) for m in mask)
    return (torch.stack([_pad_len(h[:n], n) for h in hidden]), torch.stack([_pad_len(m[:n], n) for m in mask]))


def _dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    dt = getattr(torch, str(name).replace("torch.", ""), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"reference.dtype: unknown torch dtype {name!r}")
    return dt


def module_fingerprint(module: nn.Module) -> str:
    """sha256 over every parameter and buffer (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _tokenizer_signature(tok: Any) -> list:
    probe = "a dog barks while a car passes, then rain 123"
    return [type(tok).__name__, len(tok), tok.model_max_length, tok(probe)["input_ids"]]


__all__ = ["DiffusionAdapter", "DiffusionModelConfig", "module_fingerprint", "prepare_wave"]
