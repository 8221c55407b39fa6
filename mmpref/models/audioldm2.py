"""AudioLDM 2 as a second policy family behind :class:`~mmpref.models.tango.TangoPipeline`'s interface.

diffusers' ``AudioLDM2Pipeline`` holds the parts: CLAP's text branch and a T5 encoder read the prompt, a projection
model and GPT-2 turn both into 8 "generated" embeddings, and its ``AudioLDM2UNet2DConditionModel`` cross-attends to
two streams at once (the GPT-2 embeddings and T5's hidden states). The VAE, the log-mel convention (16 kHz, 64 mels,
hop 160) and the HiFi-GAN vocoder are AudioLDM's, as in Tango, so everything below the text encoders is inherited.

What the diffusion adapter needs is one text condition per prompt ``(hidden (L, D), mask (L,))`` that it can cache,
pad and blank for classifier-free guidance. :class:`AudioLDM2Family` packs the two streams into one: the 8 GPT-2
vectors first, then T5's tokens, each zero-padded on the feature axis to the wider of the two; the mask covers both.
:meth:`AudioLDM2Family.unet_condition` unpacks it into the UNet's own keyword arguments. The prompt encoding itself
is diffusers' (``AudioLDM2Pipeline.encode_prompt``), not a copy of it.

Saved and loaded in diffusers' own layout (``AudioLDM2Pipeline.save_pretrained`` / ``from_pretrained``), so a
trained policy is an ordinary AudioLDM 2 folder.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmpref.models.tango.pipeline import TangoPipeline

PRESET = "audioldm2-tiny"
TEXT_MODULES = ("text_encoder", "text_encoder_2", "projection_model", "language_model")


class AudioLDM2Family(TangoPipeline):
    """An ``AudioLDM2Pipeline`` seen through TangoPipeline's methods (see the module docstring).

    ``text_encoder`` is an ``nn.ModuleDict`` of the four text-side modules (so moving, freezing and fingerprinting it
    covers all of them); ``tokenizer`` is the T5 tokenizer and ``clap_tokenizer`` CLAP's.
    """

    def __init__(self, hf: Any):
        self._hf = hf
        self.clap_tokenizer = hf.tokenizer
        self.feature_extractor = hf.feature_extractor
        super().__init__(text_encoder=nn.ModuleDict({n: getattr(hf, n) for n in TEXT_MODULES}),
                         tokenizer=hf.tokenizer_2, unet=hf.unet, vae=hf.vae, vocoder=hf.vocoder,
                         scheduler=hf.scheduler)
        lm, t5 = hf.language_model.config, hf.text_encoder_2.config
        self.generated_tokens = int(getattr(lm, "max_new_tokens", None) or 8)  # what encode_prompt generates
        self._dims = (lm.hidden_size, t5.d_model)

    # ------------------------------------------------------------------ construction and saving
    @classmethod
    def from_preset(cls, name: str = PRESET, seed: int = 0, tokenizer: Any = None) -> AudioLDM2Family:
        """Random weights at the tiny size (CPU tests); downloads nothing. ``tokenizer`` is not used."""
        if name != PRESET:
            raise ValueError(f"unknown AudioLDM 2 preset {name!r}; choose {PRESET!r}")
        return cls(build_tiny_audioldm2(seed))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, torch_dtype: torch.dtype | None = None,
                        **overrides: Any) -> AudioLDM2Family:
        """An ``AudioLDM2Pipeline`` folder (diffusers' layout); ``overrides`` replace parts (``unet=...``).
        AudioLDM 2 folders ship their tokenizers: a ``tokenizer=`` override must be None."""
        from diffusers import AudioLDM2Pipeline

        if overrides.pop("tokenizer", None) is not None:
            raise ValueError(f"{path}: an AudioLDM2Pipeline folder ships its own tokenizers; leave the tokenizer "
                             "option (model.tokenizer / --tokenizer) unset")
        kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
        return cls(AudioLDM2Pipeline.from_pretrained(os.fspath(path), **kwargs, **overrides))

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """diffusers' ``AudioLDM2Pipeline.save_pretrained`` of the current parts (the trained UNet and scheduler)."""
        self.as_diffusers().save_pretrained(os.fspath(path))
        return Path(path)

    def as_diffusers(self) -> Any:
        """A diffusers ``AudioLDM2Pipeline`` sharing this object's current parts."""
        from diffusers import AudioLDM2Pipeline

        return AudioLDM2Pipeline(tokenizer=self.clap_tokenizer, tokenizer_2=self.tokenizer,
                                 feature_extractor=self.feature_extractor, unet=self.unet, vae=self.vae,
                                 vocoder=self.vocoder, scheduler=self.scheduler,
                                 **{n: self.text_encoder[n] for n in TEXT_MODULES})

    # ------------------------------------------------------------------ the text condition
    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed ``(B, 8 + L, D)`` condition and its int mask ``(B, 8 + L)``: GPT-2's generated embeddings, then
        T5's hidden states (see the module docstring)."""
        # One prompt at a time: in a batch, T5's padding sits inside the sequence GPT-2 continues (before the
        # projection's end token), so the generated embeddings would depend on the other prompts in the batch, and
        # a cached encoding would differ from the same prompt encoded during sampling.
        rows = [self._encode_one(p) for p in prompts]
        n = max(h.shape[0] for h, _ in rows)
        hidden = torch.stack([torch.nn.functional.pad(h, (0, 0, 0, n - h.shape[0])) for h, _ in rows])
        return hidden, torch.stack([torch.nn.functional.pad(m, (0, n - m.shape[0])) for _, m in rows])

    def _encode_one(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.text_encoder["text_encoder_2"].device
        with warnings.catch_warnings():  # diffusers' GPT-2 loop passes past_key_values, which transformers 5 renames
            warnings.filterwarnings("ignore", message=".*past_key_values.*", category=FutureWarning)
            t5, t5_mask, generated = self._hf.encode_prompt([prompt], device, 1, False)
        width = max(self._dims)
        hidden = torch.cat([_widen(generated[0], width), _widen(t5[0].to(generated.dtype), width)])
        return hidden, torch.cat([torch.ones(generated.shape[1], dtype=t5_mask.dtype, device=t5_mask.device),
                                  t5_mask[0]])

    def unet_condition(self, hidden: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """The packed condition as ``AudioLDM2UNet2DConditionModel``'s two cross-attention inputs."""
        g, (d_lm, d_t5) = self.generated_tokens, self._dims
        return {"encoder_hidden_states": hidden[:, :g, :d_lm], "encoder_hidden_states_1": hidden[:, g:, :d_t5],
                "encoder_attention_mask_1": mask[:, g:]}


def _widen(x: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad the feature axis to ``width``."""
    return torch.nn.functional.pad(x, (0, width - x.shape[-1]))


# ----------------------------------------------------------------------------------------------- the tiny preset
def build_tiny_audioldm2(seed: int = 0) -> Any:
    """A randomly initialised ``AudioLDM2Pipeline`` with every part at toy size, built from configs: the real
    classes (ClapModel, T5EncoderModel, AudioLDM2ProjectionModel, GPT2, AudioLDM2UNet2DConditionModel, AutoencoderKL,
    SpeechT5HifiGan) and locally trained tokenizers of the real kinds (byte-level BPE for CLAP's RoBERTa tokenizer,
    unigram for T5), so the folder saves and loads with diffusers' and transformers' own loaders."""
    from diffusers import AudioLDM2Pipeline, AudioLDM2ProjectionModel, AudioLDM2UNet2DConditionModel, DDIMScheduler
    from transformers import (
        ClapAudioConfig,
        ClapConfig,
        ClapFeatureExtractor,
        ClapModel,
        ClapTextConfig,
        GPT2Config,
        GPT2LMHeadModel,
    )

    from mmpref.models.tango import presets

    clap_tok, t5_tok = _tiny_tokenizers()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text = ClapTextConfig(vocab_size=len(clap_tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                              intermediate_size=32, projection_dim=16, max_position_embeddings=80,
                              pad_token_id=clap_tok.pad_token_id, bos_token_id=clap_tok.bos_token_id,
                              eos_token_id=clap_tok.eos_token_id)
        audio = ClapAudioConfig(spec_size=64, window_size=4, num_mel_bins=64, intermediate_size=32, depths=[1, 1],
                                num_attention_heads=[2, 2], num_hidden_layers=2, hidden_size=32, projection_dim=16,
                                patch_size=2, patch_stride=2, patch_embed_input_channels=4)
        clap = ClapModel(ClapConfig(text_config=text.to_dict(), audio_config=audio.to_dict(), projection_dim=16))
        t5_cfg = {**presets.preset_config("tiny")["text_encoder"], "vocab_size": len(t5_tok)}
        t5 = presets.build_text_encoder(t5_cfg)
        gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_head=2, n_layer=1, vocab_size=len(t5_tok), n_positions=128,
                                          bos_token_id=t5_tok.eos_token_id, eos_token_id=t5_tok.eos_token_id,
                                          max_new_tokens=8))
        projection = AudioLDM2ProjectionModel(text_encoder_dim=16, text_encoder_1_dim=t5_cfg["d_model"],
                                              langauge_model_dim=16)  # diffusers' spelling
        unet = AudioLDM2UNet2DConditionModel(
            sample_size=(64, 16), in_channels=8, out_channels=8, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=2,
            # per block: a self-attention transformer, then one per stream (GPT-2 width, T5 width), as AudioLDM 2 does
            cross_attention_dim=([None, 16, t5_cfg["d_model"]], [None, 16, t5_cfg["d_model"]]))
        tiny = presets.preset_config("tiny")
        vae = presets.build_vae(tiny["vae"])
        vocoder = presets.build_vocoder(tiny["vocoder"], tiny.get("vocoder_torch_init", False))
    scheduler = DDIMScheduler(beta_start=0.0015, beta_end=0.0195, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")  # AudioLDM 2's
    return AudioLDM2Pipeline(vae=vae, text_encoder=clap, text_encoder_2=t5, projection_model=projection,
                             language_model=gpt2, tokenizer=clap_tok, tokenizer_2=t5_tok,
                             feature_extractor=ClapFeatureExtractor(), unet=unet, scheduler=scheduler, vocoder=vocoder)


def _tiny_tokenizers() -> tuple[Any, Any]:
    """CLAP's (RoBERTa: byte-level BPE, ``<s> ... </s>``) and T5's (unigram, ``... </s>``) tokenizers, trained on
    the tiny Tango tokenizer's caption words; both reload unchanged with their transformers classes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import RobertaTokenizerFast, T5TokenizerFast

    from mmpref.models.tango.tokenizer import caption_corpus

    corpus = caption_corpus()
    corpus = corpus + [c.capitalize() for c in corpus]  # T5 does not lowercase
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    clap = RobertaTokenizerFast(tokenizer_object=bpe, model_max_length=32)
    uni = Tokenizer(models.Unigram())
    uni.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    uni.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    uni.train_from_iterator(corpus, trainers.UnigramTrainer(
        vocab_size=512, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False))
    uni.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    t5 = T5TokenizerFast(tokenizer_object=uni, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0,
                         model_max_length=64)
    return clap, t5


__all__ = ["PRESET", "AudioLDM2Family", "build_tiny_audioldm2"]
