"""Tango pipeline: tiny preset round trips, seeded and batch-invariant sampling, any duration, conversion."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mmpref.audio import load_audio
from mmpref.models.tango import TangoPipeline, preset_config
from mmpref.models.tango.convert import (
    fold_weight_norm,
    save_tango_checkpoint,
    vae_original_key,
    vocoder_original_key,
)

PROMPTS = ["a dog barks while birds chirp", "rain", "a car engine idles and then a horn honks loudly"]
KW = {"duration_s": 1.0, "num_inference_steps": 3, "guidance_scale": 3.0}


@pytest.fixture(scope="module")
def pipe() -> TangoPipeline:
    return TangoPipeline.from_preset("tiny", seed=0)


def test_tiny_layout(pipe):
    assert pipe.unet.config.in_channels == pipe.unet.config.out_channels == 8
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.d_model
    assert pipe.latent_factor == 4 and pipe.vae.config.latent_channels == 8
    assert math.prod(pipe.vocoder.config.upsample_rates) == pipe.mel_config.hop_length == 160
    assert pipe.unet.config.down_block_types[0] == "DownBlock2D"  # no attention at full resolution
    assert pipe.scheduler.config.prediction_type == "v_prediction"


def test_same_seed_same_audio_and_seeds_differ(pipe):
    a = pipe(PROMPTS[:2], seed=7, **KW)
    assert a.shape == (2, 16000) and a.dtype == np.float32 and np.isfinite(a).all() and a.std() > 0
    np.testing.assert_array_equal(a, pipe(PROMPTS[:2], seed=7, **KW))
    assert np.abs(a - pipe(PROMPTS[:2], seed=8, **KW)).max() > 1e-4


def test_batched_equals_one_by_one(pipe):
    batched = pipe(PROMPTS, seed=3, num_samples_per_prompt=2, **KW)
    single = pipe(PROMPTS, seed=3, num_samples_per_prompt=2, batch_size=1, **KW)
    assert batched.shape == (6, 16000)
    np.testing.assert_allclose(batched, single, atol=1e-5)
    assert np.abs(batched[0] - batched[1]).max() > 1e-4  # samples of one prompt differ


def test_generator_list_and_no_guidance(pipe):
    """A list of generators drives sample i with generator i alone (so a batch equals its samples one by one),
    and guidance 1 (no unconditional pass) gives other audio than guidance 3."""
    gens = lambda: [torch.Generator().manual_seed(10 + i) for i in range(2)]  # noqa: E731
    plain = {**KW, "guidance_scale": 1.0}
    out = pipe(PROMPTS[:2], generator=gens(), **plain)
    for i in range(2):
        alone = pipe([PROMPTS[i]], generator=[gens()[i]], **plain)
        np.testing.assert_allclose(out[i], alone[0], atol=1e-5)
    guided = pipe(PROMPTS[:2], generator=gens(), **KW)
    assert np.abs(out - guided).max() > 1e-4


def test_sampling_restricts_attention_kernels(pipe):
    """cuDNN attention is off while the UNet samples, as in training (H100 graph-rebuild cost); a chosen set holds
    instead; the global flags come back afterwards. On CPU every allowed set gives the same numbers."""
    backends = torch.backends.cuda
    flags = lambda: {"flash": backends.flash_sdp_enabled(), "cudnn": backends.cudnn_sdp_enabled(),
                     "math": backends.math_sdp_enabled(), "efficient": backends.mem_efficient_sdp_enabled()}
    seen = []
    hook = pipe.unet.register_forward_pre_hook(lambda *_: seen.append(flags()))
    before = flags()
    try:
        default = pipe(PROMPTS[:1], seed=1, **KW)
        by_default, seen[:] = list(seen), []
        math_only = pipe(PROMPTS[:1], seed=1, attention_backends=["cudnn", "math"], **KW)
    finally:
        hook.remove()
    assert by_default and all(f == {"flash": True, "cudnn": False, "math": True, "efficient": True} for f in by_default)
    assert seen and all(f == {"flash": False, "cudnn": True, "math": True, "efficient": False} for f in seen)
    assert flags() == before
    np.testing.assert_allclose(default, math_only, atol=1e-5)
    with pytest.raises(ValueError, match=r"attention_backends.*'fast'.*flash"):
        pipe(PROMPTS[:1], attention_backends=["fast"], **KW)


@pytest.mark.parametrize("duration", [1.0, 2.56, 0.37])
def test_any_duration(pipe, duration):
    """The latent has ceil(ceil(samples / hop) / 4) frames (Tango's 10.24 s -> 1024 mel frames -> 256), the wave
    exactly ``duration * sr`` samples, and the wave is the latent decoded and cut to that length."""
    kw = {**KW, "duration_s": duration, "num_inference_steps": 2}
    latent = pipe(["a bird sings"], seed=0, output_type="latent", **kw)
    frames = math.ceil(math.ceil(round(duration * 16000) / 160) / 4)
    assert latent.shape == (1, 8, frames, 16) == (1, *pipe.latent_shape(duration))
    wave = pipe(["a bird sings"], seed=0, **kw)
    assert wave.shape == (1, round(duration * 16000))
    full = pipe.mel_to_wave(pipe.decode_latents(latent)).numpy()
    np.testing.assert_allclose(wave[0], full[0, : wave.shape[1]], atol=1e-6)


def test_encode_audio_shapes_and_scaling(pipe):
    wave = torch.from_numpy(np.random.default_rng(0).uniform(-0.5, 0.5, (2, 40960)).astype(np.float32))
    mean, std = pipe.encode_audio(wave)  # 2.56 s -> 256 frames -> 64 latent frames
    assert mean.shape == std.shape == (2, 8, 64, 16) and (std > 0).all()
    mel = pipe.log_mel(wave)[:, :256]
    dist = pipe.vae.encode(mel.unsqueeze(1)).latent_dist
    torch.testing.assert_close(mean, dist.mean * pipe.vae.config.scaling_factor)
    torch.testing.assert_close(std, dist.std * pipe.vae.config.scaling_factor)
    m2, _ = pipe.encode_mel(mel[:, :254])  # padded with silence to 256
    assert m2.shape == (2, 8, 64, 16)
    decoded = pipe.decode_latents(mean)
    assert decoded.shape == (2, 256, 64)
    assert pipe.mel_to_wave(decoded).shape == (2, 256 * 160)


def test_encode_text_masks_padding(pipe):
    hidden, mask = pipe.encode_text(["a dog barks", "", "rain"])
    assert hidden.shape[:2] == mask.shape and hidden.shape[2] == pipe.text_encoder.config.d_model
    assert mask[1].sum() == 1  # the unconditional prompt is just </s>
    alone, _ = pipe.encode_text(["a dog barks"])
    torch.testing.assert_close(hidden[0, : alone.shape[1]], alone[0], atol=1e-5, rtol=0)


def test_save_load_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "p")
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())  # diffusers' layout
    assert index["_class_name"] == "TangoPipeline" and index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["tokenizer"] == ["transformers", "AutoTokenizer"] and not (tmp_path / "p" / "pipeline.json").exists()
    assert (tmp_path / "p" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    from diffusers import AutoencoderKL, UNet2DConditionModel  # diffusers' own loaders read the parts

    unet = UNet2DConditionModel.from_pretrained(tmp_path / "p", subfolder="unet")
    vae = AutoencoderKL.from_pretrained(tmp_path / "p", subfolder="vae")
    for mine, theirs in ((pipe.unet, unet), (pipe.vae, vae)):
        assert all(torch.equal(a, b) for a, b in zip(mine.state_dict().values(), theirs.state_dict().values()))
    loaded = TangoPipeline.from_pretrained(tmp_path / "p")
    assert loaded.mel_config == pipe.mel_config
    np.testing.assert_array_equal(loaded(PROMPTS[:2], seed=1, **KW), pipe(PROMPTS[:2], seed=1, **KW))
    half = TangoPipeline.from_pretrained(tmp_path / "p", torch_dtype=torch.bfloat16)
    assert half.unet.dtype == half.vae.dtype == torch.bfloat16
    assert TangoPipeline.from_pretrained(tmp_path / "p", unet=pipe.unet).unet is pipe.unet


def test_from_pretrained_errors(pipe, tmp_path):
    with pytest.raises(FileNotFoundError, match="no model_index.json or pipeline.json"):
        TangoPipeline.from_pretrained(tmp_path)
    (tmp_path / "ldm2").mkdir()
    (tmp_path / "ldm2" / "model_index.json").write_text(json.dumps({"_class_name": "AudioLDM2Pipeline"}))
    with pytest.raises(ValueError, match="holds a diffusers AudioLDM2Pipeline.*not a TangoPipeline"):
        TangoPipeline.from_pretrained(tmp_path / "ldm2")
    no_tok = TangoPipeline(pipe.text_encoder, None, pipe.unet, pipe.vae, pipe.vocoder, pipe.scheduler)
    with pytest.raises(ValueError, match="no tokenizer"):
        no_tok.save_pretrained(tmp_path / "x")


def test_old_pipeline_json_folders_load_and_the_tokenizer_can_be_given(pipe, tmp_path):
    """A folder from before model_index.json (pipeline.json, "AutoTokenizer") still loads; a folder whose tokenizer is
    missing (as Tango's conversions used to write) loads with tokenizer= and is refused without it."""
    pipe.save_pretrained(tmp_path / "p")
    (tmp_path / "tok").mkdir()
    pipe.tokenizer.save_pretrained(tmp_path / "tok")
    index = json.loads((tmp_path / "p" / "model_index.json").read_text())
    old = {"_class_name": "TangoPipeline", "mel_config": index["_mmpref"]["mel_config"],
           "components": {n: index[n] for n in ("text_encoder", "unet", "vae", "vocoder", "scheduler")}}
    old["components"]["tokenizer"] = None  # the converted-checkpoint case
    (tmp_path / "p" / "model_index.json").unlink()
    (tmp_path / "p" / "pipeline.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match="no tokenizer.*pass tokenizer="):
        TangoPipeline.from_pretrained(tmp_path / "p")
    loaded = TangoPipeline.from_pretrained(tmp_path / "p", tokenizer=str(tmp_path / "tok"))
    np.testing.assert_array_equal(loaded(PROMPTS[:1], seed=1, **KW), pipe(PROMPTS[:1], seed=1, **KW))
    from mmpref.cli import main

    args = ["generate", "--model", str(tmp_path / "p"), "--prompt", "rain", "--steps", "2", "--duration", "0.5"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 1  # one line: no tokenizer, pass --tokenizer
    assert main([*args, "--out", str(tmp_path / "b"), "--tokenizer", str(tmp_path / "tok")]) == 0


def test_tango_checkpoint_conversion(pipe, tmp_path):
    save_tango_checkpoint(pipe, tmp_path)  # the original layout, by inverting the name map
    vae_sd = torch.load(tmp_path / "pytorch_model_vae.bin", weights_only=True)
    main_sd = torch.load(tmp_path / "pytorch_model_main.bin", weights_only=True)
    for key in ("encoder.down.0.block.0.conv1.weight", "encoder.down.0.downsample.conv.weight",
                "encoder.mid.block_1.norm1.weight", "encoder.norm_out.weight", "decoder.up.0.block.0.conv2.weight",
                "decoder.up.2.upsample.conv.weight", "decoder.mid.attn_1.proj_out.weight", "quant_conv.weight",
                "vocoder.conv_pre.weight", "vocoder.ups.4.weight", "vocoder.resblocks.0.convs2.1.weight"):
        assert key in vae_sd, key
    assert vae_sd["encoder.mid.attn_1.q.weight"].dim() == 4 and "vocoder.mean" not in vae_sd
    assert "decoder.up.2.upsample.conv.weight" in vae_sd and "decoder.up.0.upsample.conv.weight" not in vae_sd
    assert any(k.startswith("unet.down_blocks.1.attentions.0") for k in main_sd)
    loaded = TangoPipeline.from_tango_checkpoint(tmp_path, preset="tiny")
    assert loaded.vae.config.scaling_factor == pipe.vae.config.scaling_factor
    for name in ("unet", "vae", "vocoder", "text_encoder"):
        ref, got = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref), name
    np.testing.assert_array_equal(loaded(PROMPTS[:1], seed=2, **KW), pipe(PROMPTS[:1], seed=2, **KW))

    del vae_sd["decoder.up.1.block.0.conv1.weight"]
    torch.save(vae_sd, tmp_path / "pytorch_model_vae.bin")
    with pytest.raises(KeyError, match="decoder.up.1.block.0.conv1.weight"):
        TangoPipeline.from_tango_checkpoint(tmp_path, preset="tiny")


def test_key_maps():
    assert vae_original_key("decoder.up_blocks.0.resnets.2.conv_shortcut.weight", 3) == \
        "decoder.up.2.block.2.nin_shortcut.weight"
    assert vae_original_key("encoder.mid_block.attentions.0.to_out.0.bias", 3) == "encoder.mid.attn_1.proj_out.bias"
    assert vae_original_key("decoder.mid_block.resnets.1.norm2.weight", 3) == "decoder.mid.block_2.norm2.weight"
    assert vocoder_original_key("upsampler.3.bias") == "vocoder.ups.3.bias" and vocoder_original_key("mean") is None


def test_fold_weight_norm():
    conv = torch.nn.ConvTranspose1d(4, 2, 3)
    legacy = torch.nn.utils.weight_norm(torch.nn.ConvTranspose1d(4, 2, 3))
    legacy.weight_g.data.uniform_(0.5, 2.0)
    legacy(torch.zeros(1, 4, 5))  # recompute .weight from g, v
    sd = fold_weight_norm({f"vocoder.ups.0.{k}": v for k, v in legacy.state_dict().items()})
    torch.testing.assert_close(sd["vocoder.ups.0.weight"], legacy.weight.detach())
    param = torch.nn.utils.parametrizations.weight_norm(conv)
    sd = fold_weight_norm(param.state_dict())
    torch.testing.assert_close(sd["weight"], param.weight.detach())


def test_tango_preset_architecture():
    """The real architecture, built on the meta device (no allocation, no download)."""
    from mmpref.models.tango import presets

    cfg = preset_config("tango")
    with torch.device("meta"):
        unet = presets.build_unet(cfg["unet"])
        vocoder = presets.build_vocoder(cfg["vocoder"])
    n = sum(p.numel() for p in unet.parameters())
    assert 860e6 < n < 870e6, n
    assert unet.config.cross_attention_dim == 1024 and unet.config.upcast_attention
    assert math.prod(vocoder.config.upsample_rates) == 160 and vocoder.config.model_in_dim == 64
    sched = presets.build_scheduler(cfg["scheduler"])
    assert sched.config.prediction_type == "v_prediction" and sched.config.beta_schedule == "scaled_linear"


def test_generate_cli(pipe, tmp_path):
    from mmpref.generate import main

    pipe.save_pretrained(tmp_path / "m")
    (tmp_path / "prompts.txt").write_text("rain falls\n\nthunder\n")
    rc = main(["--model", str(tmp_path / "m"), "--prompt", "a dog barks", "--prompts-file",
               str(tmp_path / "prompts.txt"), "--out", str(tmp_path / "out"), "--steps", "2", "--duration", "0.5",
               "--seed", "4", "--num-samples", "2"])
    assert rc == 0
    records = [json.loads(line) for line in (tmp_path / "out" / "generations.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in records] == ["a dog barks"] * 2 + ["rain falls"] * 2 + ["thunder"] * 2
    wave = load_audio(tmp_path / "out" / records[0]["file"])
    expected = pipe(["a dog barks"], duration_s=0.5, num_inference_steps=2, seed=4, num_samples_per_prompt=2)[0]
    np.testing.assert_allclose(wave, expected, atol=2 / 32768)  # PCM-16 WAV


def _without_neural_vocoder(pipe: TangoPipeline, vocoder) -> TangoPipeline:
    return TangoPipeline(text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=pipe.unet, vae=pipe.vae,
                         vocoder=vocoder, scheduler=pipe.scheduler, mel_config=pipe.mel_config)


def test_output_types_agree(pipe):
    short = {**KW, "duration_s": 0.5}
    latents = pipe(PROMPTS[:2], seed=5, output_type="latent", **short)
    assert isinstance(latents, torch.Tensor) and latents.shape == (2, *pipe.latent_shape(0.5))
    mels = pipe(PROMPTS[:2], seed=5, output_type="mel", batch_size=1, **short)
    assert mels.shape == (2, 4 * latents.shape[2], pipe.mel_config.n_mels)
    torch.testing.assert_close(mels, pipe.decode_latents(latents), rtol=0, atol=1e-5)
    griffin_lim = _without_neural_vocoder(pipe, "griffin_lim")
    waves = griffin_lim(PROMPTS[:2], seed=5, batch_size=1, **short)
    # the same batches of one: Griffin-Lim amplifies float32 rounding, which differs between batch sizes
    per_item = torch.cat([griffin_lim.mel_to_wave(m[None]) for m in mels])
    np.testing.assert_array_equal(waves, per_item[:, :8000].numpy())
    with pytest.raises(ValueError, match="output_type"):
        pipe(PROMPTS[:1], output_type="np", **short)


def test_griffin_lim_vocoder_round_trips(pipe, tmp_path):
    from mmpref.audio import GriffinLimVocoder

    with pytest.raises(ValueError, match="griffin_lim"):
        _without_neural_vocoder(pipe, "hifigan")
    mels = pipe(PROMPTS[:1], seed=2, output_type="mel", **KW)
    expected = GriffinLimVocoder(pipe.mel_config)(mels)  # the default settings
    for vocoder, saved in ((None, None), ("griffin_lim", "griffin_lim")):
        gl = _without_neural_vocoder(pipe, vocoder)
        torch.testing.assert_close(gl.mel_to_wave(mels), expected, rtol=0, atol=0)
        gl.save_pretrained(tmp_path / str(vocoder))
        index = json.loads((tmp_path / str(vocoder) / "model_index.json").read_text())
        assert index["vocoder"] == [None, None] and index["_mmpref"].get("vocoder") == saved
        assert not (tmp_path / str(vocoder) / "vocoder").exists()
        assert TangoPipeline.from_pretrained(tmp_path / str(vocoder)).vocoder.__class__ is gl.vocoder.__class__
    custom = _without_neural_vocoder(pipe, GriffinLimVocoder(pipe.mel_config, n_iter=3, seed=9))
    loaded = TangoPipeline.from_pretrained(custom.save_pretrained(tmp_path / "custom"))
    assert (loaded.vocoder.n_iter, loaded.vocoder.seed) == (3, 9)
    torch.testing.assert_close(loaded.mel_to_wave(mels), custom.mel_to_wave(mels), rtol=0, atol=0)


def test_generate_cli_without_neural_vocoder(pipe, tmp_path):
    from mmpref.generate import main

    _without_neural_vocoder(pipe, None).save_pretrained(tmp_path / "m")
    rc = main(["--model", str(tmp_path / "m"), "--prompt", "a beep, then a bell", "--out", str(tmp_path / "out"),
               "--steps", "2", "--duration", "0.5", "--seed", "1"])
    assert rc == 0
    record = json.loads((tmp_path / "out" / "generations.jsonl").read_text())
    wave = load_audio(tmp_path / "out" / record["file"])
    mel = pipe(["a beep, then a bell"], duration_s=0.5, num_inference_steps=2, seed=1, output_type="mel")
    expected = _without_neural_vocoder(pipe, None).mel_to_wave(mel)[0, :8000].numpy()
    assert wave.shape == (8000,) and np.abs(expected).max() > 1e-3
    # PCM-16 WAV of the Griffin-Lim wave (clipped: a random VAE's log-mels are loud)
    np.testing.assert_allclose(wave, np.clip(expected, -1, 1), atol=2 / 32768)


def test_sampling_timesteps_match_tangos_diffusers():
    """Tango samples with diffusers 0.15.0.dev0 (vendored in its repository), whose DDPM set_timesteps is
    arange(0, n) * (1000 // n), reversed, with no steps_offset."""
    from mmpref.models.tango.presets import build_scheduler, preset_config

    for name in ("tango", "tiny"):
        sched = build_scheduler(preset_config(name)["scheduler"])
        for n in (100, 200, 50):
            sched.set_timesteps(n)
            assert sched.timesteps.tolist() == [i * (1000 // n) for i in range(n)][::-1]


def test_conversion_reads_the_unet_architecture_from_main_config(pipe, tmp_path, monkeypatch):
    """The UNet is built from the config main_config.json names (found beside the checkpoint), not from the preset;
    without a tokenizer the conversion refuses before reading any weights, naming the text encoder to pass."""
    from mmpref.models.tango import presets

    cfg = {k: v for k, v in pipe.unet.config.items() if not k.startswith("_")}
    cfg.update(block_out_channels=[32, 48], attention_head_dim=[2, 3])  # not the tiny preset's UNet
    other = TangoPipeline(pipe.text_encoder, pipe.tokenizer, presets.build_unet(cfg), pipe.vae, pipe.vocoder,
                          pipe.scheduler)
    save_tango_checkpoint(other, tmp_path)
    (tmp_path / "diffusion_model_config.json").write_text(json.dumps(cfg))  # main_config names configs/<this>
    loaded = TangoPipeline.from_tango_checkpoint(tmp_path, preset="tiny")
    assert list(loaded.unet.config.block_out_channels) == [32, 48]
    assert all(torch.equal(a, b) for a, b in zip(other.unet.state_dict().values(), loaded.unet.state_dict().values()))
    (tmp_path / "diffusion_model_config.json").unlink()  # not found: the preset's UNet, which does not fit
    with pytest.raises(ValueError, match="has shape"):
        TangoPipeline.from_tango_checkpoint(tmp_path, preset="tiny")
    monkeypatch.setitem(presets.PRESETS["tiny"], "tokenizer", None)
    with pytest.raises(ValueError, match="ships no tokenizer; pass tokenizer=<a local copy of google/flan-t5-large>"):
        TangoPipeline.from_tango_checkpoint(tmp_path, preset="tiny")
