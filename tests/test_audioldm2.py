"""AudioLDM 2 as a second policy family: the packed condition equals diffusers' own, sampling equals diffusers'
pipeline, folders round-trip through diffusers' loaders, and train / generate / synth run on it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.fakes import FakeAccelerator

from mmpref.adapters.diffusion import DiffusionAdapter, DiffusionModelConfig
from mmpref.config import LoraConfig, ReferenceConfig, TrainConfig
from mmpref.data.audio import AudioPreferenceDataConfig
from mmpref.errors import ConfigError
from mmpref.losses import build_loss
from mmpref.models.audioldm2 import AudioLDM2Family
from mmpref.models.pipelines import pipeline_from_pretrained
from mmpref.toy.tones import make_tiny_preference_set

ROOT = Path(__file__).parents[1]
PROMPTS = ["a dog barks while birds chirp", "rain", "a car engine idles and then a horn honks loudly"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipe() -> AudioLDM2Family:
    return AudioLDM2Family.from_preset(seed=0)


def _diffusers_condition(pipe, prompt: str) -> dict:
    """diffusers' own encode_prompt, as AudioLDM2Pipeline.__call__ hands it to the UNet."""
    t5, mask, generated = pipe.as_diffusers().encode_prompt([prompt], "cpu", 1, False)
    return {"encoder_hidden_states": generated, "encoder_hidden_states_1": t5, "encoder_attention_mask_1": mask}


def test_packed_condition_gives_diffusers_unet_output(pipe):
    """Packed and batched (prompts of different lengths, so padding): every row's UNet output equals the one from
    diffusers' unpacked condition of that prompt alone."""
    hidden, mask = pipe.encode_text(PROMPTS)
    assert hidden.shape[1] == pipe.generated_tokens + int(mask[:, pipe.generated_tokens:].sum(1).max())
    x = torch.randn(len(PROMPTS), *pipe.latent_shape(1.0), generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 500, 990])
    ours = pipe.unet(x, t, **pipe.unet_condition(hidden, mask)).sample
    for i, prompt in enumerate(PROMPTS):
        theirs = pipe.unet(x[i:i + 1], t[i:i + 1], **_diffusers_condition(pipe, prompt)).sample
        torch.testing.assert_close(ours[i:i + 1], theirs, atol=1e-5, rtol=1e-5)
    # the condition reaches the UNet through both streams: blanking either one changes the output
    cond = pipe.unet_condition(hidden, mask)
    for key in ("encoder_hidden_states", "encoder_hidden_states_1"):
        blank = {**cond, key: torch.zeros_like(cond[key])}
        assert not torch.allclose(pipe.unet(x, t, **blank).sample, ours, atol=1e-4)


def test_sampling_matches_diffusers_pipeline(pipe):
    """Same initial noise, DDIM, no guidance: our sampler's latents equal AudioLDM2Pipeline's."""
    shape = pipe.latent_shape(1.0)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(7))
    ours = pipe(["a dog barks"], duration_s=1.0, num_inference_steps=4, guidance_scale=1.0,
                generator=[torch.Generator().manual_seed(7)], output_type="latent")
    theirs = pipe.as_diffusers()("a dog barks", audio_length_in_s=1.0, num_inference_steps=4, guidance_scale=1.0,
                                 latents=noise[None] * pipe.scheduler.init_noise_sigma, output_type="latent").audios
    torch.testing.assert_close(ours, theirs.float(), atol=1e-5, rtol=1e-4)


def test_folder_round_trips_through_diffusers(pipe, tmp_path):
    from diffusers import AudioLDM2Pipeline

    pipe.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "model_index.json").read_text())["_class_name"] == "AudioLDM2Pipeline"
    theirs = AudioLDM2Pipeline.from_pretrained(tmp_path / "m")  # diffusers' own loader reads mmpref's folder
    for name, p in pipe.unet.state_dict().items():
        assert torch.equal(p, theirs.unet.state_dict()[name]), name
    again = pipeline_from_pretrained(tmp_path / "m")
    assert isinstance(again, AudioLDM2Family)
    assert again.tokenizer(PROMPTS[0])["input_ids"] == pipe.tokenizer(PROMPTS[0])["input_ids"]
    assert again.clap_tokenizer(PROMPTS[0])["input_ids"] == pipe.clap_tokenizer(PROMPTS[0])["input_ids"]
    kw = {"duration_s": 1.0, "num_inference_steps": 3, "guidance_scale": 3.0, "seed": 1}
    # every weight is bitwise equal (above); the waves may differ in the last float bit, since which SIMD kernel
    # runs can depend on where a loaded tensor sits in memory (seen on one CPU: 6e-8 on values near 0.3)
    np.testing.assert_allclose(again(PROMPTS[:2], **kw), pipe(PROMPTS[:2], **kw), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="ships its own tokenizers"):
        pipeline_from_pretrained(tmp_path / "m", tokenizer="tiny")


def test_other_diffusers_pipelines_are_named_and_refused(tmp_path, capsys):
    (tmp_path / "sa").mkdir()
    (tmp_path / "sa" / "model_index.json").write_text(json.dumps({"_class_name": "StableAudioPipeline"}))
    with pytest.raises(ValueError, match="StableAudioPipeline.*does not support"):
        pipeline_from_pretrained(tmp_path / "sa")
    from mmpref.cli import main as cli

    rc = cli(["generate", "--model", str(tmp_path / "sa"), "--prompt", "x", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "StableAudioPipeline" in err[0], err


# ----------------------------------------------------------------------------------------------- the adapter
@pytest.fixture(scope="module")
def prefs(tmp_path_factory) -> Path:
    return make_tiny_preference_set(tmp_path_factory.mktemp("prefs") / "p", n=4, k=2)


def _adapter(prefs: Path, cache_dir: Path | None, lora: bool = False) -> DiffusionAdapter:
    cfg = TrainConfig(
        modality="diffusion",
        model=DiffusionModelConfig(pipeline="audioldm2-tiny", cache=cache_dir is not None),
        data=AudioPreferenceDataConfig(path=str(prefs), duration_s=1.0, cache_dir=str(cache_dir or "")),
        reference=ReferenceConfig(mode="copy"), lora=LoraConfig(enabled=lora), loss={"dpo": {"beta": 100}})
    adapter = DiffusionAdapter(cfg)
    adapter.setup(FakeAccelerator())
    return adapter


def test_adapter_scores_are_the_naive_denoising_errors(prefs, tmp_path):
    """Cached and uncached batches give the same scores, and both equal -1/2 MSE computed by hand from diffusers'
    own prompt encoding, the VAE posterior and the UNet, for every group member."""
    loss = build_loss({"dpo": {"beta": 100}})
    cached, uncached = _adapter(prefs, tmp_path / "cache"), _adapter(prefs, None)
    out = {}
    for name, a in (("cached", cached), ("uncached", uncached)):
        batch = a.collate([a.train_dataset[i] for i in range(3)])
        a.generator = torch.Generator().manual_seed(3)
        out[name] = a.scores(a.policy, batch, loss)
    torch.testing.assert_close(out["cached"].policy, out["uncached"].policy, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out["cached"].policy, out["cached"].reference)  # the reference is a copy

    a = uncached  # replay the draws by hand
    batch = a.collate([a.train_dataset[i] for i in range(3)])
    a.generator = torch.Generator().manual_seed(3)
    draws = a._draw(batch, 3, training=True)
    for g, prompt in enumerate(batch["prompts"]):
        cond = _diffusers_condition(a.pipe, prompt)
        mean, std = a.pipe.encode_audio(batch["wave"][g])
        x0 = mean + std * draws["eps"][g]
        t = draws["t"][g].repeat(3)
        noisy = a.scheduler.add_noise(x0, draws["noise"][g].expand_as(x0), t)
        target = draws["noise"][g].expand_as(x0)  # AudioLDM 2 predicts epsilon
        with torch.no_grad():
            pred = a.policy(noisy, t, **{k: v.repeat(3, *[1] * (v.dim() - 1)) for k, v in cond.items()}).sample
        naive = -0.5 * (pred - target).pow(2).flatten(1).mean(1)
        torch.testing.assert_close(out["uncached"].policy[g], naive, atol=1e-5, rtol=1e-4)


def test_lora_is_refused_with_the_reason(prefs):
    with pytest.raises(ConfigError, match="AudioLDM2UNet2DConditionModel has no PEFT adapter support"):
        _adapter(prefs, None, lora=True)


def test_train_generate_synth_on_audioldm2(tmp_path, monkeypatch, capsys):
    """`mmpref train` (DPO from the first step) -> final/ is an AudioLDM 2 folder diffusers loads, with a trained UNet;
    the first DPO loss is log 2 (policy = reference); `mmpref generate` and `mmpref synth` sample from it."""
    from diffusers import AudioLDM2Pipeline

    from mmpref.cli import main

    monkeypatch.setenv("MMPREF_CACHE_DIR", str(tmp_path / "cache"))
    run = tmp_path / "run"
    assert main(["train", str(ROOT / "configs" / "audioldm2_dpo_tiny.yaml"), "data.path=tiny:12:1",
                 "optim.warmup_steps=0", "phases=[{name: dpo, loss: {dpo: {beta: 200}}, epochs: 1}]",
                 f"run.output_dir={run}"]) == 0
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-5) and losses[-1] != pytest.approx(math.log(2), abs=1e-3)
    trained = AudioLDM2Pipeline.from_pretrained(run / "final")
    assert trained.scheduler.config.prediction_type == "epsilon"  # the recipe keeps the checkpoint's
    base = AudioLDM2Family.from_preset(seed=0)
    assert any(not torch.equal(p, base.unet.state_dict()[n]) for n, p in trained.unet.state_dict().items())
    assert "AudioLDM2Pipeline.from_pretrained" in (run / "final" / "README.md").read_text()

    assert main(["generate", "--model", str(run / "final"), "--prompt", "a dog barks", "--steps", "2",
                 "--duration", "0.5", "--out", str(tmp_path / "gen")]) == 0
    assert len(list((tmp_path / "gen").glob("*.wav"))) == 1

    synth = tmp_path / "synth.yaml"
    synth.write_text((ROOT / "configs" / "synth_tiny.yaml").read_text())
    assert main(["synth", str(synth), f"pipeline={run / 'final'}", "max_captions=2",
                 f"output_dir={tmp_path / 'syn'}"]) == 0
    report = json.loads((tmp_path / "syn" / "report.json").read_text())
    assert report["captions"] == 2 and report["candidates"] > 2 * 2  # originals plus perturbed captions' clips
