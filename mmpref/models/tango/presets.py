"""Serialisable configs of the Tango parts, and builders that turn them into stock modules.

``tango`` is the published architecture (see docs: Tango / Tango 2 share it); ``tiny`` keeps the same layout
(8 latent channels, x4 VAE, 64-mel HiFi-GAN with AudioLDM's upsample rates, cross-attention UNet, v-prediction
DDPM) at a size that runs in milliseconds per UNet step on a CPU.
"""

from __future__ import annotations

import copy
from typing import Any

from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from torch import nn
from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig, T5Config, T5EncoderModel

# Stable Diffusion 2.1's schedule, which Tango trains and samples with (DDPM, 1000 steps, v-prediction).
SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "v_prediction",
    "clip_sample": False,
    # Stable Diffusion 2.1's scheduler config says steps_offset 1, but Tango samples with its vendored diffusers
    # (0.15.0.dev0), whose DDPMScheduler.set_timesteps ignores steps_offset: 100 steps visit 990, 980, ..., 0. Later
    # diffusers add the offset under "leading" spacing (991, ..., 1); 0 here reproduces Tango's timesteps.
    "steps_offset": 0,
    "timestep_spacing": "leading",
}

# AudioLDM's HiFi-GAN (16 kHz, 64 mels, hop 160 = 5*4*2*2*2); its weights come without weight norm.
_VOCODER = {
    "model_in_dim": 64,
    "sampling_rate": 16000,
    "upsample_initial_channel": 1024,
    "upsample_rates": [5, 4, 2, 2, 2],
    "upsample_kernel_sizes": [16, 16, 8, 4, 4],
    "resblock_kernel_sizes": [3, 7, 11],
    "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]],
    "leaky_relu_slope": 0.1,
    "normalize_before": False,
}

_TANGO: dict[str, Any] = {
    # Tango's configs/diffusion_model_config.json (866M parameters)
    "unet": {
        "sample_size": [256, 16],
        "in_channels": 8,
        "out_channels": 8,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [320, 640, 1280, 1280],
        "layers_per_block": 2,
        "attention_head_dim": [5, 10, 20, 20],  # diffusers' legacy name: these are head counts
        "cross_attention_dim": 1024,
        "use_linear_projection": True,
        "upcast_attention": True,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "norm_num_groups": 32,
    },
    # AudioLDM's first-stage model (ch 128, ch_mult 1,2,4, 2 res blocks, z 8); scale from audioldm-s-full
    "vae": {
        "in_channels": 1,
        "out_channels": 1,
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
        "block_out_channels": [128, 256, 512],
        "layers_per_block": 2,
        "latent_channels": 8,
        "norm_num_groups": 32,
        "sample_size": 256,
        "scaling_factor": 0.9227914214134216,
    },
    "vocoder": _VOCODER,
    # google/flan-t5-large, encoder only
    "text_encoder": {
        "vocab_size": 32128,
        "d_model": 1024,
        "d_kv": 64,
        "d_ff": 2816,
        "num_layers": 24,
        "num_heads": 16,
        "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128,
        "dropout_rate": 0.1,
        "layer_norm_epsilon": 1e-6,
        "feed_forward_proj": "gated-gelu",
        "tie_word_embeddings": False,
    },
    "scheduler": {"_class_name": "DDPMScheduler", **SCHEDULER},
    "tokenizer": None,  # FLAN-T5's tokenizer: pass the user's local checkpoint path
}

_TINY: dict[str, Any] = {
    "unet": {
        "sample_size": [64, 16],
        "in_channels": 8,
        "out_channels": 8,
        # no attention at full resolution: self-attention over T/4 * 16 tokens would dominate the step time
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "attention_head_dim": [2, 2],
        "cross_attention_dim": 32,
        "use_linear_projection": True,
        "upcast_attention": True,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "norm_num_groups": 8,
    },
    "vae": {
        **_TANGO["vae"],
        "block_out_channels": [8, 16, 16],
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "scaling_factor": 0.5,
    },
    "vocoder": {
        **_VOCODER,
        "upsample_initial_channel": 64,
        "resblock_kernel_sizes": [3],
        "resblock_dilation_sizes": [[1, 3]],
    },
    "text_encoder": {
        "vocab_size": None,  # filled from the tiny tokenizer
        "d_model": 32,
        "d_kv": 8,
        "d_ff": 64,
        "num_layers": 2,
        "num_heads": 4,
        "relative_attention_num_buckets": 8,
        "relative_attention_max_distance": 32,
        "dropout_rate": 0.0,
        "layer_norm_epsilon": 1e-6,
        "feed_forward_proj": "gated-gelu",
        "tie_word_embeddings": False,
    },
    "scheduler": {"_class_name": "DDPMScheduler", **SCHEDULER},
    "tokenizer": "tiny",
    # transformers inits HiFi-GAN convs with N(0, 0.01): a random one then outputs ~1e-9; PyTorch's default conv
    # init keeps random-weight audio audible (std ~0.07), which the demo and the tests rely on
    "vocoder_torch_init": True,
}

PRESETS = {"tango": _TANGO, "tiny": _TINY}


def preset_config(name: str) -> dict[str, Any]:
    """A deep copy of a preset's component configs (plain dicts)."""
    if name not in PRESETS:
        raise ValueError(f"unknown Tango preset {name!r}; choose from {sorted(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def build_unet(cfg: dict) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_config(cfg)


def build_vae(cfg: dict) -> AutoencoderKL:
    return AutoencoderKL.from_config(cfg)


def build_vocoder(cfg: dict, torch_init: bool = False) -> SpeechT5HifiGan:
    vocoder = SpeechT5HifiGan(SpeechT5HifiGanConfig(**cfg))
    if torch_init:
        for m in vocoder.modules():
            if isinstance(m, nn.Conv1d | nn.ConvTranspose1d):
                m.reset_parameters()
    return vocoder


def build_text_encoder(cfg: dict) -> T5EncoderModel:
    return T5EncoderModel(T5Config(**cfg, is_encoder_decoder=False, use_cache=False))


def build_scheduler(cfg: dict) -> DDPMScheduler | DDIMScheduler:
    cfg = dict(cfg)
    cls = {"DDPMScheduler": DDPMScheduler, "DDIMScheduler": DDIMScheduler}[cfg.pop("_class_name", "DDPMScheduler")]
    return cls.from_config(cfg)
