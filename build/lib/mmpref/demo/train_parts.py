"""Training the demo's tiny Tango parts from scratch: the VAE on log-mels, the T5 text encoder on the captions, and a
tiny CLAP.

There is no vocoder to train: the demo's pipelines decode with :class:`mmpref.audio.GriffinLimVocoder`, as
training a HiFi-GAN from scratch would cost more CPU time than the rest of the demo.

The UNet is *not* trained here: it trains through the preference engine (``mmpref.training.train`` with an ``sft``
loss on winner-only data), the same code path as ``mmpref train``. The VAE, T5 and CLAP use a small plain loop
(:func:`fit`) because their objectives (reconstruction + KL, caption slots, contrastive text-audio matching) are not
preference objectives over an adapter's scores, which is all the engine computes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from mmpref.audio import normalize_wave


def fit(params: list[nn.Parameter], loss_fn, steps: int, lr: float, weight_decay: float, desc: str) -> list[float]:
    """The parts' shared loop: AdamW, one-cycle schedule, gradient clipping at 1; ``loss_fn()`` gives one batch's
    loss. Returns the loss per step."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    losses = []
    bar = tqdm(range(steps), desc=desc, unit="step", leave=False)
    for _ in bar:
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return losses


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
    vae.train()

    def batch_loss() -> torch.Tensor:
        idx = torch.randint(0, len(mels), (batch_size,), generator=gen)
        x = mels[idx].unsqueeze(1)
        dist = vae.encode(x).latent_dist
        z = dist.mean + dist.std * torch.randn(dist.mean.shape, generator=gen)
        recon = vae.decode(z).sample
        return (recon - x).abs().mean() + kl_weight * dist.kl().mean() / z[0].numel()

    losses = fit(list(vae.parameters()), batch_loss, steps, lr, 0.0, "vae")
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
    model.train()

    def batch_loss() -> torch.Tensor:
        idx = torch.randperm(len(feats), generator=gen)[:batch_size]
        return model(input_ids=text["input_ids"][idx], attention_mask=text["attention_mask"][idx],
                     input_features=feats[idx], return_loss=True).loss

    losses = fit(list(model.parameters()), batch_loss, steps, lr, 0.01, "clap")
    model.eval()
    return losses


def scene_slots(order: Sequence[Sequence[str]], events: Sequence[str], max_steps: int = 3) -> list[int]:
    """Per event of the world: 0 if absent, else ``1 + the index of its step`` (what a caption says about it)."""
    step = {e: i + 1 for i, s in enumerate(order[:max_steps]) for e in s}
    return [step.get(e, 0) for e in events]


def train_text_encoder(encoder: nn.Module, tokenizer, captions: Sequence[str], slots: Sequence[Sequence[int]],
                       heldout: tuple[Sequence[str], Sequence[Sequence[int]]], steps: int, batch_size: int = 64,
                       lr: float = 3e-3, seed: int = 0) -> tuple[list[float], float]:
    """Teach a tiny T5 encoder what the world's captions say, as a pretrained FLAN-T5 knows what words mean.

    Why: a frozen *random* T5 gives each paraphrase ("a low drone", "a hum") an unrelated embedding, so the UNet has
    to learn every paraphrase from a few clips, and a preference learned on one paraphrase does not carry to
    another. Objective: from the mean-pooled hidden states (the same states the UNet cross-attends to), predict
    each event's slot (absent / step 1..3) with a linear head that is thrown away afterwards. The caller passes
    training text only (the demo: the corpus's captions plus text-only world captions, never a held-out or
    validation caption's text). Returns the loss per step and the share of ``heldout`` captions
    ``(captions, slots)`` whose slots are all predicted right.
    """
    n_events, n_slots = len(slots[0]), max(max(s) for s in slots) + 1
    head = nn.Linear(encoder.config.d_model, n_events * n_slots)
    tok = tokenizer(list(captions), padding=True, return_tensors="pt")
    target = torch.tensor([list(s) for s in slots])

    def slot_logits(input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden = encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return head(pooled).view(-1, n_events, n_slots)

    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        head.reset_parameters()
    encoder.train()

    def batch_loss() -> torch.Tensor:
        idx = torch.randint(0, len(target), (batch_size,), generator=gen)
        logits = slot_logits(tok["input_ids"][idx], tok["attention_mask"][idx])
        return nn.functional.cross_entropy(logits.reshape(-1, n_slots), target[idx].reshape(-1))

    losses = fit(list(encoder.parameters()) + list(head.parameters()), batch_loss, steps, lr, 0.01, "text encoder")
    encoder.eval()
    val = tokenizer(list(heldout[0]), padding=True, return_tensors="pt")
    with torch.no_grad():
        right = slot_logits(val["input_ids"], val["attention_mask"]).argmax(-1) == torch.tensor(heldout[1])
    return losses, float(right.all(-1).float().mean())


def clap_retrieval_accuracy(scores: np.ndarray) -> float:
    """Top-1 text->audio retrieval accuracy of a square score matrix (captions x clips, matching diagonal)."""
    return float(np.mean(scores.argmax(axis=1) == np.arange(len(scores))))
