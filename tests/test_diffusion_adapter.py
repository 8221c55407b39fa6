"""DiffusionAdapter: group sharing, grouped == per-pair, Tango 2's formula, cache, LoRA reference, bad audio."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers.fakes import FakeAccelerator

from mmpref.adapters.diffusion import DiffusionAdapter, DiffusionModelConfig, load_pipeline, prepare_wave
from mmpref.audio import save_audio
from mmpref.config import LoraConfig, ReferenceConfig, TrainConfig
from mmpref.data.audio import AudioPreferenceDataConfig, InvalidAudioError
from mmpref.losses import build_loss
from mmpref.toy.tones import make_tiny_preference_set

K = 3


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prefs")
    return {"grouped": make_tiny_preference_set(root / "grouped", n=4, k=K),
            "pairs": make_tiny_preference_set(root / "pairs", n=4, k=1)}


def make(data: Path, cache_dir: Path | None, *, ref: str = "copy", lora: bool = False, setup: bool = True,
         loss: object = None, **model) -> DiffusionAdapter:
    cfg = TrainConfig(
        modality="diffusion",
        model=DiffusionModelConfig(**{"cache": cache_dir is not None, **model}),
        data=AudioPreferenceDataConfig(path=str(data), duration_s=1.0, cache_dir=str(cache_dir or "")),
        reference=ReferenceConfig(mode=ref),
        lora=LoraConfig(enabled=lora),
        loss=loss or {"dpo": {"beta": 2000}},
    )
    adapter = DiffusionAdapter(cfg)
    if setup:
        adapter.setup(FakeAccelerator())
    return adapter


def batch_of(adapter: DiffusionAdapter, n: int = 3) -> dict:
    return adapter.collate([adapter.train_dataset[i] for i in range(n)])


def run_scores(adapter, batch, loss=None, seed=0):
    adapter.generator = torch.Generator().manual_seed(seed)
    loss = loss or build_loss({"dpo": {"beta": 2000}})
    return adapter.scores(adapter.policy, batch, loss), loss


def record_unet_calls(module):
    calls = []
    handle = module.register_forward_pre_hook(lambda m, a, kw: calls.append((a, kw)), with_kwargs=True)
    return calls, handle


@pytest.fixture(scope="module")
def grouped(sets, tmp_path_factory) -> DiffusionAdapter:
    return make(sets["grouped"], tmp_path_factory.mktemp("cache"), cfg_dropout=0.5)


# ----------------------------------------------------------------------------------------------- group sharing
def test_one_unet_call_shares_timestep_noise_and_condition(grouped):
    batch = batch_of(grouped, 4)
    calls, handle = record_unet_calls(grouped.policy)
    adapter = grouped
    adapter.generator = torch.Generator().manual_seed(3)
    draws = adapter._draw(batch, K + 1, training=True)
    assert draws["drop"].any() and not draws["drop"].all(), "seed should drop some groups, not all"
    adapter.generator = torch.Generator().manual_seed(3)
    adapter.scores(adapter.policy, batch, build_loss({"sft": 1.0, "dpo": {"beta": 2000}}))
    handle.remove()
    assert len(calls) == 1, "policy: one UNet call for the whole batch of groups"
    (noisy, t), kw = calls[0]
    g = K + 1
    assert noisy.shape[0] == 4 * g
    t, noisy = t.view(4, g), noisy.view(4, g, *noisy.shape[1:])
    hidden = kw["encoder_hidden_states"].view(4, g, *kw["encoder_hidden_states"].shape[1:])
    mask = kw["encoder_attention_mask"].view(4, g, -1)
    assert (t == t[:, :1]).all() and (t >= 0).all() and (t <= 999).all()
    assert (hidden == hidden[:, :1]).all() and (mask == mask[:, :1]).all()
    # the noise: (x_t - sqrt(ab) x0) / sqrt(1 - ab) is the same for every member of a group
    x0 = batch["mean"] + batch["std"] * draws["eps"]
    ab = adapter.scheduler.alphas_cumprod[t[:, 0]].view(4, 1, 1, 1, 1)
    noise = (noisy - ab.sqrt() * x0) / (1 - ab).sqrt()
    torch.testing.assert_close(noise, noise[:, :1].expand_as(noise), atol=2e-4, rtol=0)
    torch.testing.assert_close(noise[:, 0], draws["noise"], atol=2e-4, rtol=0)
    # dropped groups get the empty prompt's encoding, for winner and losers alike
    empty_h, empty_m = grouped.pipe.encode_text([""])
    n = int(empty_m.sum())
    for b in range(4):
        dropped = bool(draws["drop"][b])
        assert torch.equal(mask[b, :, :n].bool().all(0), torch.ones(n, dtype=torch.bool)) or not dropped
        if dropped:
            torch.testing.assert_close(hidden[b, :, :n], empty_h[0, :n].expand(g, -1, -1), atol=1e-5, rtol=0)
            assert mask[b, :, n:].sum() == 0
        else:
            assert not torch.allclose(hidden[b, 0, :n], empty_h[0, :n])
    assert grouped.step_metrics()["diffusion/cfg_dropped"] == pytest.approx(draws["drop"].float().mean().item())


def test_no_dropout_outside_training(grouped):
    grouped.generator = torch.Generator().manual_seed(3)
    grouped.policy.eval()
    try:
        assert not grouped._draw(batch_of(grouped, 4), K + 1, training=grouped.policy.training)["drop"].any()
    finally:
        grouped.policy.train()


def test_grouped_forward_equals_per_pair(grouped):
    batch = batch_of(grouped, 3)
    calls, handle = record_unet_calls(grouped.policy)
    a, _ = run_scores(grouped, batch, seed=5)
    grouped.mcfg.grouped_forward = False
    try:
        b, _ = run_scores(grouped, batch, seed=5)
    finally:
        grouped.mcfg.grouped_forward = True
        handle.remove()
    assert len(calls) == 1 + K  # one grouped call; then one per (winner, loser) pair
    torch.testing.assert_close(a.policy, b.policy, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a.reference, b.reference, atol=1e-6, rtol=1e-5)


def test_attention_backends_hold_inside_policy_and_reference_passes(grouped):
    """cuDNN attention is off inside both UNet passes by default (H100 graph-rebuild cost), restored afterwards."""
    backends = torch.backends.cuda
    flags = lambda: {"flash": backends.flash_sdp_enabled(), "cudnn": backends.cudnn_sdp_enabled(),
                     "math": backends.math_sdp_enabled(), "efficient": backends.mem_efficient_sdp_enabled()}
    seen = []
    hooks = [m.register_forward_pre_hook(lambda *_: seen.append(flags())) for m in (grouped.policy, grouped.reference)]
    before = flags()
    try:
        run_scores(grouped, batch_of(grouped, 2))
        default = list(seen)
        seen.clear()
        grouped.mcfg.attention_backends = ["cudnn", "math"]
        run_scores(grouped, batch_of(grouped, 2))
    finally:
        grouped.mcfg.attention_backends = ["flash", "efficient", "math"]
        for h in hooks:
            h.remove()
    assert len(default) == 2 and all(f == {"flash": True, "cudnn": False, "math": True, "efficient": True}
                                     for f in default)
    assert len(seen) == 2 and all(f == {"flash": False, "cudnn": True, "math": True, "efficient": False} for f in seen)
    assert flags() == before
    with pytest.raises(ValueError, match=r"model.attention_backends.*'fast'.*flash"):
        DiffusionModelConfig(attention_backends=["fast"])


# ----------------------------------------------------------------------------------------------- Tango 2's formula
def test_gradient_checkpointing_keeps_gradients_and_kernels_in_the_recompute(sets, tmp_path):
    """Checkpointed UNet blocks give the plain run's gradients, and the backward's recomputation of each block runs
    under the chosen attention kernels (cuDNN off), as the forward does."""
    backends = torch.backends.cuda
    grads, cudnn_flags = [], []
    for name, gc in (("plain", False), ("gc", True)):
        adapter = make(sets["grouped"], tmp_path / name, gradient_checkpointing=gc)
        attn = [m for n, m in adapter.policy.named_modules() if n.endswith("attn2")]
        hooks = [m.register_forward_pre_hook(lambda *_, gc=gc: cudnn_flags.append((gc, backends.cudnn_sdp_enabled())))
                 for m in attn]
        try:
            scores, loss = run_scores(adapter, batch_of(adapter, 2))
            loss(scores).loss.backward()
        finally:
            for h in hooks:
                h.remove()
        grads.append(torch.cat([p.grad.flatten() for p in adapter.policy.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-4)
    calls = [on for gc, on in cudnn_flags if gc]
    plain_calls = [on for gc, on in cudnn_flags if not gc]
    assert len(calls) == 2 * len(plain_calls) > 0  # each checkpointed block ran again in the backward
    assert not any(calls) and backends.cudnn_sdp_enabled()


def test_loss_equals_tango2_formula_by_hand(sets, tmp_path):
    beta = 2000.0
    adapter = make(sets["pairs"], tmp_path / "c", weighting="none")
    assert adapter.prediction_type == "v_prediction"
    with torch.no_grad():  # make the policy differ from its reference
        for p in adapter.policy.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    batch = batch_of(adapter, 4)
    scores, loss = run_scores(adapter, batch, seed=11)
    got = loss(scores).loss

    g = torch.Generator().manual_seed(11)  # the adapter's draw order: posterior eps, t, noise, dropout
    b, shape = 4, batch["mean"].shape[2:]
    eps = torch.randn((b, 2, *shape), generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    noise = torch.randn((b, *shape), generator=g)
    x0 = batch["mean"] + batch["std"] * eps
    ab = adapter.scheduler.alphas_cumprod[t].view(b, 1, 1, 1, 1)
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise[:, None]
    v = ab.sqrt() * noise[:, None] - (1 - ab).sqrt() * x0

    def err(unet, j):
        with torch.no_grad():
            pred = unet(xt[:, j], t, encoder_hidden_states=batch["hidden"],
                        encoder_attention_mask=batch["mask"]).sample
        return ((pred - v[:, j]) ** 2).mean(dim=(1, 2, 3))

    e_w, e_l = err(adapter.policy, 0), err(adapter.policy, 1)
    r_w, r_l = err(adapter.reference, 0), err(adapter.reference, 1)
    want = -F.logsigmoid(-0.5 * beta * ((e_w - r_w) - (e_l - r_l))).mean()
    assert abs(want.item() - math.log(2)) > 1e-3, "degenerate check: policy equals reference"
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_timestep_weights(grouped):
    t = torch.arange(0, 1000)
    ab = grouped.scheduler.alphas_cumprod[t]
    snr = ab / (1 - ab)
    m = grouped.mcfg
    try:
        m.weighting = "epsilon"  # v-prediction: ||eps - eps^||^2 = alpha_bar ||v - v^||^2
        torch.testing.assert_close(grouped.timestep_weight(t), ab.float(), rtol=1e-5, atol=1e-7)
        m.weighting, m.snr_gamma = "min_snr", 5.0
        torch.testing.assert_close(grouped.timestep_weight(t), (snr.clamp(max=5.0) / (snr + 1)).float(),
                                   rtol=1e-5, atol=1e-7)
        m.weighting = "none"
        assert torch.equal(grouped.timestep_weight(t), torch.ones(1000))
    finally:
        m.weighting = "none"


def test_sft_phase_scores_winners_only(grouped):
    batch = batch_of(grouped, 2)
    calls, handle = record_unet_calls(grouped.policy)
    scores, loss = run_scores(grouped, batch, loss=build_loss({"sft": 1.0}))
    handle.remove()
    assert scores.policy.shape == (2, 1) and scores.reference is None
    assert calls[0][0][0].shape[0] == 2  # the losers are not denoised in an SFT phase
    mse = grouped.step_metrics()["diffusion/mse_policy_chosen"]
    assert loss(scores).loss.item() == pytest.approx(0.5 * mse, rel=1e-5)


def test_epsilon_prediction_target(sets, tmp_path, caplog):
    with caplog.at_level("WARNING", logger="mmpref.adapters.diffusion"):
        adapter = make(sets["pairs"], tmp_path / "c", prediction_type="epsilon")
    assert adapter.scheduler.config.prediction_type == "epsilon"
    # the checkpoint said v_prediction: the override is announced, and online samples read the UNet the same way
    assert "overrides the checkpoint's scheduler (v_prediction)" in caplog.text
    assert adapter.pipe.scheduler.config.prediction_type == "epsilon"
    assert type(adapter.pipe.scheduler) is type(load_pipeline(adapter.mcfg).scheduler)
    calls, handle = record_unet_calls(adapter.policy)
    batch = batch_of(adapter, 2)
    scores, _ = run_scores(adapter, batch, seed=2)
    handle.remove()
    (noisy, t), kw = calls[0]
    g = torch.Generator().manual_seed(2)
    shape = batch["mean"].shape[2:]
    torch.randn((2, 2, *shape), generator=g), torch.randint(0, 1000, (2,), generator=g)
    noise = torch.randn((2, *shape), generator=g).repeat_interleave(2, 0)
    with torch.no_grad():
        pred = adapter.policy(noisy, t, **kw).sample
    want = -0.5 * ((pred - noise) ** 2).mean(dim=(1, 2, 3)).view(2, 2)
    torch.testing.assert_close(scores.policy.detach(), want, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- cache
def test_cache_round_trip_matches_on_the_fly(sets, grouped):
    fly = make(sets["grouped"], None, cfg_dropout=0.5)
    cached_batch, fly_batch = batch_of(grouped, 3), batch_of(fly, 3)
    assert set(fly_batch) == {"prompts", "wave", "tags"} and fly_batch["tags"] == cached_batch["tags"]
    # same posterior
    mean, std = fly.pipe.encode_audio(fly_batch["wave"].flatten(0, 1))
    torch.testing.assert_close(cached_batch["mean"].flatten(0, 1), mean, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(cached_batch["std"].flatten(0, 1), std, atol=1e-6, rtol=1e-5)
    # same sampled latents (and so the same scores) for the same seed, dropout included
    calls_c, hc = record_unet_calls(grouped.policy)
    calls_f, hf = record_unet_calls(fly.policy)
    a, _ = run_scores(grouped, cached_batch, seed=3)
    b, _ = run_scores(fly, fly_batch, seed=3)
    hc.remove(), hf.remove()
    torch.testing.assert_close(calls_c[0][0][0], calls_f[0][0][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.policy, b.policy, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a.reference, b.reference, atol=1e-5, rtol=1e-4)


def test_cached_steps_do_no_mel_vae_or_text_work(grouped, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("frozen encoder called during a cached step")

    for name in ("encode_audio", "encode_mel", "encode_text"):
        monkeypatch.setattr(grouped.pipe, name, boom)
    monkeypatch.setattr(grouped.pipe.log_mel, "forward", boom)
    run_scores(grouped, batch_of(grouped, 4), seed=3)  # seed 3 drops some prompts


def test_cache_reused_then_invalidated_by_any_input(sets, tmp_path, monkeypatch):
    data = tmp_path / "set"
    src = sets["pairs"].parent
    import shutil

    shutil.copytree(src, data)
    cache = tmp_path / "cache"
    built = []
    orig = DiffusionAdapter.build_cache
    monkeypatch.setattr(DiffusionAdapter, "build_cache", lambda self, *a, **k: (built.append(1), orig(self, *a, **k)))

    def setup_with(change=None, **model):
        adapter = make(data / "prefs.jsonl", cache, setup=False, **model)
        if change:
            change(adapter)
        n = len(built)
        adapter.setup(FakeAccelerator())
        return len(built) - n

    assert setup_with() == 1
    assert setup_with() == 0  # reused across runs
    first = sorted(p.name for p in cache.iterdir())

    def bump(module):
        with torch.no_grad():
            next(module.parameters()).add_(1e-3)

    assert setup_with(lambda a: bump(a.pipe.vae)) == 1
    assert setup_with() == 1  # back to the original weights: rebuilt again (one cache per data set)
    assert setup_with(lambda a: bump(a.pipe.text_encoder)) == 1
    assert setup_with() == 1
    assert setup_with(lambda a: setattr(a.dcfg, "duration_s", 0.9)) == 1  # audio setting
    assert setup_with(lambda a: setattr(a.pipe, "mel_config", replace(a.pipe.mel_config, f_max=7000.0))) == 1
    assert setup_with() == 1
    assert setup_with() == 0
    rows = (data / "prefs.jsonl").read_text().splitlines()
    first_row = json.loads(rows[0])
    first_row["prompt"] = "a steady high pitched beep"
    (data / "prefs.jsonl").write_text("\n".join([json.dumps(first_row)] + rows[1:]) + "\n")
    assert setup_with() == 1  # data file
    wav = data / json.loads(rows[1])["chosen"]
    save_audio(wav, 0.3 * np.sin(np.arange(16000) / 5.0), 16000)
    assert setup_with() == 1  # an audio file
    assert setup_with() == 0
    assert sorted(p.name for p in cache.iterdir()) == first  # one cache, replaced in place


def test_empty_prompt_cached_and_shards_round_trip(sets, tmp_path):
    adapter = make(sets["grouped"], tmp_path / "c", cache_shard_size=3)
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert "" in meta["prompts"] and len(meta["latent_shards"]) == math.ceil(len(meta["clips"]) / 3)
    waves = [prepare_wave(adapter.index.read(c, 16000), 16000) for c in range(len(adapter.index.clips))]
    mean, _ = adapter.pipe.encode_audio(torch.stack(waves))
    rows = {k: i for i, k in enumerate(meta["clips"])}
    for c, clip in enumerate(adapter.index.clips):
        torch.testing.assert_close(adapter._dataset.inner.latents.row(rows[clip.key], "mean"), mean[c],
                                   atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------------------- references
def test_lora_reference_equals_frozen_copy_at_step_zero(sets, tmp_path):
    copy_ref = make(sets["grouped"], tmp_path / "c", ref="copy", lora=True)
    lora_ref = make(sets["grouped"], tmp_path / "c", ref="lora", lora=True)
    assert lora_ref.reference is None
    batch = batch_of(copy_ref, 3)
    a, _ = run_scores(copy_ref, batch, seed=1)
    b, _ = run_scores(lora_ref, batch, seed=1)
    torch.testing.assert_close(a.reference, b.reference, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(a.policy, b.policy, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(b.policy, b.reference, atol=1e-6, rtol=1e-5)  # LoRA's B starts at zero
    # after an update the policy moves, the LoRA-disabled reference does not
    trainable = [p for p in lora_ref.policy.parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n, p in lora_ref.policy.named_parameters() if p.requires_grad)
    with torch.no_grad():
        for p in trainable:
            p.add_(0.05 * torch.randn_like(p))
    c, _ = run_scores(lora_ref, batch, seed=1)
    torch.testing.assert_close(c.reference, a.reference, atol=1e-6, rtol=1e-5)
    assert not torch.allclose(c.policy, a.policy, atol=1e-6)
    assert lora_ref.policy.training  # adapters re-enabled, still training
    out = tmp_path / "saved"
    lora_ref.save_pretrained(lora_ref.policy, str(out))
    assert list((out / "unet_lora").glob("*.safetensors"))


def test_bf16_reference_and_none(sets, tmp_path):
    adapter = make(sets["pairs"], tmp_path / "c", setup=False)
    adapter.cfg.reference.dtype = "bfloat16"
    ref = adapter._build_reference()
    assert next(ref.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"reference.mode=none, but loss \(phase 'train', loss 'dpo'\) needs a "
                                         r"reference model"):
        make(sets["pairs"], tmp_path / "c", ref="none")  # refused before any model is built
    none = make(sets["pairs"], tmp_path / "c", ref="none", loss="slic")
    assert none.reference is None
    scores, _ = run_scores(none, batch_of(none, 2), loss=build_loss("slic"))
    assert scores.reference is None
    with pytest.raises(ValueError, match="cached: not available for diffusion"):
        make(sets["pairs"], tmp_path / "c", ref="cached", setup=False)
    # no phase needs a reference: nothing is copied, whatever reference.mode says
    assert make(sets["pairs"], tmp_path / "c", ref="copy", loss="slic", setup=False).reference is None


@pytest.mark.parametrize("loss, why", [("kto", "unpaired"), ({"slic": 1.0, "kl": 0.1}, "KL samples"),
                                       ("simpo", "completion lengths")])
def test_objectives_the_adapter_cannot_serve_are_refused_when_it_is_built(sets, tmp_path, loss, why):
    from mmpref.config import PhaseConfig

    cfg = make(sets["pairs"], tmp_path / "c", setup=False).cfg
    cfg.loss, cfg.phases = None, [PhaseConfig("sft", {"sft": 1.0}, epochs=1), PhaseConfig("second", loss)]
    with pytest.raises(ValueError, match=rf"phases.1.loss \(phase 'second', loss .*\): the diffusion adapter cannot "
                                         rf"serve it: .*{why}"):
        DiffusionAdapter(cfg)


def test_save_pretrained_full_pipeline(grouped, tmp_path):
    from mmpref.models.tango import TangoPipeline

    grouped.save_pretrained(grouped.policy, str(tmp_path / "out"))
    loaded = TangoPipeline.from_pretrained(tmp_path / "out")
    for (n, p), q in zip(grouped.policy.state_dict().items(), loaded.unet.state_dict().values()):
        assert torch.equal(p, q), n


def test_lora_final_is_a_whole_pipeline_with_the_adapter_fused(sets, tmp_path):
    """A LoRA run's final/ loads as a TangoPipeline whose UNet predicts exactly what the LoRA policy predicts, and
    mmpref generate samples from it; the adapter alone is there too, and the policy keeps its adapter."""
    from mmpref.generate import main as generate
    from mmpref.models.tango import TangoPipeline

    adapter = make(sets["grouped"], tmp_path / "c", ref="lora", lora=True)
    with torch.no_grad():  # a trained-looking adapter: non-zero LoRA B matrices
        for n, p in adapter.policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    adapter.save_pretrained(adapter.policy, str(tmp_path / "final"))
    loaded = TangoPipeline.from_pretrained(tmp_path / "final")
    assert not any("lora" in k for k in loaded.unet.state_dict()) and (tmp_path / "final" / "unet_lora").is_dir()
    x = torch.randn(2, *adapter.pipe.latent_shape(1.0))
    t, h = torch.tensor([10, 500]), torch.randn(2, 3, loaded.unet.config.cross_attention_dim)
    with torch.no_grad():
        want = adapter.policy(x, t, encoder_hidden_states=h).sample
        got = loaded.unet(x, t, encoder_hidden_states=h).sample
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert any("lora" in n for n, _ in adapter.policy.named_parameters())  # the policy keeps training with it
    assert generate(["--model", str(tmp_path / "final"), "--prompt", "a dog barks", "--out", str(tmp_path / "wav"),
                     "--steps", "2", "--duration", "0.5"]) == 0
    assert len(list((tmp_path / "wav").glob("*.wav"))) == 1


# ----------------------------------------------------------------------------------------------- bad audio
def _bad_set(root: Path) -> tuple[Path, dict[str, str]]:
    path = make_tiny_preference_set(root, n=6, k=1)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    (root / rows[0]["chosen"]).unlink()
    (root / rows[1]["rejected"]).write_bytes(b"RIFF not really a wave file")
    save_audio(root / rows[2]["chosen"], np.zeros(16000, dtype=np.float32), 16000)
    save_audio(root / rows[3]["rejected"], 0.3 * np.ones(4000, dtype=np.float32), 16000)
    bad = {rows[0]["chosen"]: "missing", rows[1]["rejected"]: "corrupt", rows[2]["chosen"]: "silent",
           rows[3]["rejected"]: "wrong length"}
    return path, bad


@pytest.mark.parametrize("cached", [True, False])
def test_bad_audio_reported_with_paths(tmp_path, cached):
    path, bad = _bad_set(tmp_path / "set")
    cache = tmp_path / "cache" if cached else None
    with pytest.raises(InvalidAudioError) as err:
        make(path, cache)
    msg = str(err.value)
    assert "4 of 12 audio files are invalid" in msg
    assert len(err.value.issues) == 4
    for rel, reason in bad.items():
        line = next(part for part in msg.split("; ") if str(tmp_path / "set" / rel) + ":" in part)
        assert reason in line
    adapter = make(path, cache)if False else None  # noqa: F841
    cfg_skip = make(path, cache, setup=False)
    cfg_skip.dcfg.skip_invalid = True
    cfg_skip.setup(FakeAccelerator())
    assert len(cfg_skip.train_dataset) == 2
    batch_of(cfg_skip, 2)


def test_every_grouped_loss_trains_or_is_refused_with_its_reason(grouped):
    """Losses whose inputs exist for diffusion (log-ratios, log-likelihood surrogates) give a finite loss and a
    gradient on the UNet; those needing token counts or KL samples are refused by name."""
    from mmpref.losses import available_losses, loss_spec

    batch = batch_of(grouped, 2)
    served = []
    for name in available_losses():
        spec = loss_spec(name)
        if spec.data == "unpaired" or name == "kl":
            continue
        loss = build_loss({"dpo": {"beta": 2000}, name: 1.0} if spec.additive else {name: 1.0})
        why = grouped.cannot_serve(loss)
        if why is not None:
            assert "completion lengths" in why or "KL samples" in why, (name, why)
            assert loss.needs_lengths or loss.needs_kl, name
            continue
        grouped.policy.zero_grad()
        scores, _ = run_scores(grouped, batch, loss=loss)
        out = loss(scores)
        out.loss.backward()
        grads = [p.grad for p in grouped.policy.parameters() if p.grad is not None]
        assert torch.isfinite(out.loss) and grads and any(g.abs().sum() > 0 for g in grads), name
        served.append(name)
    assert {"dpo", "aot", "aot_unpaired", "discopop", "bco_pair", "logic", "hinge", "sppo"} <= set(served)
    assert not {"sigmoid_norm", "simpo", "ipo"} & set(served)  # token counts (ipo's default form="mean")


def test_strategy_column_reaches_per_strategy_metrics(tmp_path):
    """Audio-Alpaca's `strategy` is kept per group and `mmpref train` logs reward accuracy and margin per strategy,
    equal to the same metrics computed over that strategy's groups by hand."""
    from mmpref.config import load_config
    from mmpref.losses import tagged_metrics
    from mmpref.training import train

    path = make_tiny_preference_set(tmp_path / "set", n=8, k=1)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for i, r in enumerate(rows):
        r["strategy"] = "concept" if i % 2 else "temporal"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    adapter = make(path, tmp_path / "cache")
    batch = batch_of(adapter, 4)
    assert batch["tags"] == ["temporal", "concept", "temporal", "concept"]
    rewards = torch.tensor([[0.5, 0.1], [0.0, 0.3], [0.2, 0.2], [1.0, -1.0]])
    got = tagged_metrics(rewards, batch["tags"])
    assert got["rewards/accuracies/temporal"].item() == pytest.approx((1 + 0.5) / 2)
    assert got["rewards/margins/concept"].item() == pytest.approx((-0.3 + 2.0) / 2)
    cfg = load_config(str(Path(__file__).parents[1] / "configs" / "tango2_dpo_tiny.yaml"),
                      [f"data.path={path}", f"data.cache_dir={tmp_path / 'c2'}", f"run.output_dir={tmp_path / 'run'}",
                       "phases=[{name: dpo, loss: {dpo: {beta: 200}}, epochs: 1}]", "run.log_every=1"])
    res = train(cfg)
    logged = [json.loads(line) for line in Path(res.metrics_file).read_text().splitlines()]
    assert all("rewards/accuracies/concept" in r and "rewards/margins/temporal" in r for r in logged if "loss" in r)
