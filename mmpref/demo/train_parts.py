"""Training the demo's tiny Tango parts from scratch: the VAE on log-mels and a tiny CLAP.

There is no vocoder to train: the demo's pipelines decode with :class:`mmpref.audio.GriffinLimVocoder`, as
training a HiFi-GAN from scratch would cost more CPU time than the rest of the demo.

The UNet is *not* trained here: it trains through the preference engine (``mmpref.training.train`` with an ``sft``
loss on winner-only data), the same code path as ``mmpref train``. The VAE and CLAP use small plain loops because
their objectives (reconstruction + KL, contrastive text-audio matching) are not preference objectives over an
adapter's scores, which is all the engine computes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mmpref.audio import normalize_wave


def corpus_mels(waves: Sequence[np.ndarray], mel_module: nn.Module, frames: int) -> torch.Tensor:
    """``(N, frames, n_mels)`` log-mels with the adapter's preprocessing (mean removed, peak 0.5, Tango's crop)."""
    out = []
    for start in range(0, len(waves), 64):
        batch = torch.from_numpy(np.stack(waves[start:start + 64])).double()
        out.append(mel_module(normalize_wave(batch))[:, :frames].float())
    return torch.cat(out)


def train_vae(vae: nn.Module, mels: torch.Tensor, steps: int, batch_size: int = 16, lr: float = 2e-3,
              kl_weight: float = 1e-4, seed: int = 0) -> list[float]:
    """Fit an ``AutoencoderKL`` to log-mels ``(N, frames, n_mels)``: L1 reconstruction + ``kl_weight`` * KL.

    Afterwards sets ``scaling_factor`` to ``1 / std`` of the posterior means (as Stable Diffusion does) so the
    UNet sees unit-variance latents. Returns the loss per step.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # start the decoder at the mean log-mel (~ -8): no steps spent learning the offset
        vae.decoder.conv_out.bias.fill_(float(mels.mean()))
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    vae.train()
    losses = []
    bar = tqdm(range(steps), desc="vae", unit="step", leave=False)
    for _ in bar:
        idx = torch.randint(0, len(mels), (batch_size,), generator=gen)
        x = mels[idx].unsqueeze(1)
        dist = vae.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        loss = (recon - x).abs().mean() + kl_weight * dist.kl().mean() / z[0].numel()
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    vae.eval()
    with torch.no_grad():
        means = torch.cat([vae.encode(mels[i:i + 64].unsqueeze(1)).latent_dist.mean for i in range(0, len(mels), 64)])
    vae.register_to_config(scaling_factor=float(1.0 / means.std()))
    return losses


def vae_reconstruction_error(vae: nn.Module, mels: torch.Tensor) -> float:
    """Mean absolute log-mel error of encode (posterior mean) -> decode on held-out mels."""
    with torch.no_grad():
        recon = vae.decode(vae.encode(mels.unsqueeze(1)).latent_dist.mean).sample.squeeze(1)
    return float((recon - mels).abs().mean())


def train_clap(model: nn.Module, processor, captions: Sequence[str], waves: Sequence[np.ndarray], sample_rate: int,
               steps: int, batch_size: int = 32, lr: float = 1e-3, seed: int = 0) -> list[float]:
    """Contrastive training of a transformers ``ClapModel`` (``return_loss=True``) on caption/audio pairs.

    Audio features are computed once with the processor (48 kHz); the batches are random pairs. Returns the loss
    per step.
    """
    from mmpref.audio import resample

    target_sr = processor.feature_extractor.sampling_rate
    audio = [resample(w, sample_rate, target_sr) for w in waves]
    feats = processor(audio=audio, sampling_rate=target_sr, return_tensors="pt")["input_features"]
    text = processor(text=list(captions), padding=True, return_tensors="pt")
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    losses = []
    bar = tqdm(range(steps), desc="clap", unit="step", leave=False)
    for _ in bar:
        idx = torch.randperm(len(feats), generator=gen)[:batch_size]
        out = model(input_ids=text["input_ids"][idx], attention_mask=text["attention_mask"][idx],
                    input_features=feats[idx], return_loss=True)
        opt.zero_grad()
        out.loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(out.loss.item())
        bar.set_postfix(loss=f"{out.loss.item():.3f}")
    model.eval()
    return losses


def clap_retrieval_accuracy(scores: np.ndarray) -> float:
    """Top-1 text->audio retrieval accuracy of a square score matrix (captions x clips, matching diagonal)."""
    return float(np.mean(scores.argmax(axis=1) == np.arange(len(scores))))


def cosine_lr_steps(n_items: int, epochs: float, batch_size: int) -> int:
    return max(1, math.ceil(n_items * epochs / batch_size))


def save_dir_atomic(save, target: Path) -> Path:
    """``save(tmp_dir)`` then rename to ``target`` (replacing a stale one): a folder is either complete or absent."""
    import shutil
    import tempfile

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}-"))
    save(tmp)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target
