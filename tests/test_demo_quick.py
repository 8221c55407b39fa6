"""The sound-event demo: winner-only (K=0) diffusion data, bootstrap CIs, ``mmpref demo --quick`` end to end."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.fakes import FakeAccelerator

from mmpref.adapters.diffusion import DiffusionAdapter, DiffusionModelConfig
from mmpref.config import ReferenceConfig, TrainConfig
from mmpref.data.audio import AudioPreferenceDataConfig, load_preference_index
from mmpref.demo.report import per_caption, summarise_eval
from mmpref.losses import build_loss
from mmpref.stats import bootstrap_ci
from mmpref.toy.tones import make_tiny_preference_set


def _winner_only_set(root: Path) -> Path:
    """The tiny tone set rewritten with ``rejected: []`` (what the demo's corpus stage writes)."""
    src = make_tiny_preference_set(root, n=3, k=1)
    rows = [json.loads(line) for line in src.read_text().splitlines()]
    out = root / "winners.jsonl"
    out.write_text("".join(json.dumps({"prompt": r["prompt"], "chosen": r["chosen"], "rejected": []}) + "\n"
                           for r in rows))
    return out


def test_winner_only_rows_make_single_member_groups(tmp_path):
    path = _winner_only_set(tmp_path)
    index = load_preference_index(AudioPreferenceDataConfig(path=str(path), schema="grouped", num_losers=0))
    assert [len(members) for _, members in index.groups] == [1, 1, 1]
    assert index.num_losers == 0
    # num_losers=0 on data *with* losers keeps the winners only
    pairs = make_tiny_preference_set(tmp_path / "pairs", n=2, k=1)
    index = load_preference_index(AudioPreferenceDataConfig(path=str(pairs), num_losers=0))
    assert [len(m) for _, m in index.groups] == [1, 1]


def test_sft_on_winner_only_data_is_half_the_winner_mse_and_dpo_is_refused(tmp_path):
    path = _winner_only_set(tmp_path)
    cfg = TrainConfig(modality="diffusion", model=DiffusionModelConfig(),
                      data=AudioPreferenceDataConfig(path=str(path), schema="grouped", num_losers=0, duration_s=1.0,
                                                     cache_dir=str(tmp_path / "cache")),
                      reference=ReferenceConfig(mode="none"), loss={"sft": 1.0})
    adapter = DiffusionAdapter(cfg)
    sft = build_loss({"sft": 1.0})
    adapter.setup(FakeAccelerator())
    batch = adapter.collate([adapter.train_dataset[i] for i in range(3)])
    assert batch["mean"].shape[1] == 1
    adapter.generator = torch.Generator().manual_seed(0)
    scores = adapter.scores(adapter.policy, batch, sft)
    mse = adapter.step_metrics()["diffusion/mse_policy_chosen"]
    assert scores.policy.shape == (3, 1)
    assert sft(scores).loss.item() == pytest.approx(0.5 * mse, rel=1e-5)
    from mmpref.config import PhaseConfig

    cfg.loss, cfg.phases = None, [PhaseConfig("sft", {"sft": 1.0}, epochs=1), PhaseConfig("dpo", "dpo")]
    cfg.reference = ReferenceConfig(mode="copy")
    with pytest.raises(ValueError, match=r"phases.1.loss \(phase 'dpo', loss 'dpo'\) compares winners with losers, "
                                         r"but the data has winners only"):
        DiffusionAdapter(cfg)  # refused when built, not at the first step of the second phase


def test_bootstrap_ci_brackets_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    small, large = rng.normal(0.5, 0.1, 20), rng.normal(0.5, 0.1, 2000)
    a, b = bootstrap_ci(small, 1000, 0), bootstrap_ci(large, 1000, 0)
    assert a["lo"] < a["mean"] < a["hi"] and a["mean"] == pytest.approx(small.mean())
    assert (b["hi"] - b["lo"]) < (a["hi"] - a["lo"]) / 5
    # the 95% interval of a mean is about +-1.96 standard errors
    assert b["hi"] - b["lo"] == pytest.approx(2 * 1.96 * large.std() / math.sqrt(2000), rel=0.15)


def test_order_accuracy_ignores_single_event_captions_and_deltas_are_paired():
    def row(order, recall, events):
        return {"order_correct": order, "event_recall": recall, "event_precision": 1.0, "exact_match": 0.0,
                "clap": 0.1, "events": events}

    base = [row(1.0, 1.0, 1), row(0.0, 0.5, 2), row(0.0, 0.5, 3)]
    aligned = [row(1.0, 1.0, 1), row(1.0, 1.0, 2), row(0.5, 1.0, 3)]
    assert np.isnan(per_caption(base, 1, "order_accuracy")[0])
    s = summarise_eval({"base": base, "aligned": aligned}, 1, 200, 0)
    assert s["models"]["base"]["order_accuracy"]["mean"] == 0.0
    assert s["models"]["aligned"]["order_accuracy"]["mean"] == 0.75
    assert s["delta"]["order_accuracy"]["mean"] == 0.75
    assert s["delta"]["event_recall"]["mean"] == pytest.approx(1 / 3)


def test_every_arm_is_compared_with_base_control_and_earlier_arms_and_the_target_needs_both():
    from mmpref.demo.report import _seed_headline, comparisons, meets_target, target_words

    assert comparisons(["base", "aligned"]) == [("aligned", "base")]
    assert comparisons(["base", "aligned", "sft_more", "online"]) == [
        ("aligned", "base"), ("aligned", "sft_more"), ("online", "base"), ("online", "sft_more"),
        ("online", "aligned")]

    def row(recall, precision):
        return {"order_correct": 0.0, "event_recall": recall, "event_precision": precision, "exact_match": 0.0,
                "clap": 0.1, "events": 2}

    n = 40  # captions; the online arm recalls more on every one, the control a little more than base
    rows = {"base": [row(0.4, 0.8)] * n, "sft_more": [row(0.45, 0.8)] * n, "aligned": [row(0.4, 0.8)] * n,
            "online": [row(0.7, 0.8)] * n}
    s = summarise_eval(rows, 1, 200, 0)
    assert s["differences"]["online-sft_more"]["event_recall"]["mean"] == pytest.approx(0.25)
    assert s["delta"] is s["differences"]["aligned-base"]
    assert meets_target(s, "online") and not meets_target(s, "aligned")
    seed_report = {"eval": s, "verdict": "v", "target_met": {"aligned": False, "online": True}}
    assert _seed_headline(seed_report) == "online beats base and SFT-more (the target); aligned not"
    assert _seed_headline({**seed_report, "target_met": {"aligned": False, "online": False}}).startswith("no arm")
    assert target_words({"aligned": 0, "online": 2}, 3) == "aligned 0 of 3, online 2 of 3"
    rows["online"] = [row(0.7, 0.5)] * n  # the same recall bought with precision: not the target
    assert not meets_target(summarise_eval(rows, 1, 200, 0), "online")
    del rows["sft_more"]  # without the control the bar cannot be met
    assert not meets_target(summarise_eval(rows, 1, 200, 0), "online")


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    from mmpref.demo.main import main

    assert main(["--quick", "--out", str(tmp_path)]) == 0
    for name in ("report.md", "report.json", "plots/training_curves.png", "plots/before_after.png",
                 "plots/clap_hist.png", "seed0/eval/wav/base/00.wav", "seed0/eval/wav/aligned/00.wav",
                 "seed0/eval/wav/online/00.wav", "seed0/eval/wav/sft_more/00.wav", "seed0/online/dpo-1/config.yaml",
                 "plots/online_rounds.png",
                 "seed0/sft_more/config.yaml", "seed0/dpo/config.yaml", "seed0/synth/grouped.jsonl"):
        assert (tmp_path / name).is_file(), name
    report = json.loads((tmp_path / "report.json").read_text())
    ev = report["seeds"]["0"]["eval"]
    assert sorted(ev["differences"]) == sorted(["aligned-base", "aligned-sft_more", "online-base",
                                                "online-sft_more", "online-aligned"])
    rounds = report["seeds"]["0"]["online_rounds"]
    assert [r["round"] for r in rounds] == [0, 1] and all(r["groups"] > 0 for r in rounds)
    val = report["seeds"]["0"]["rounds_val"]  # the base and each round's policy on the validation captions
    assert [r["round"] for r in val] == [0, 1, 2]
    assert all(0 <= r[m] <= 1 for r in val for m in ("event_recall", "order_accuracy"))
    samples = json.loads((tmp_path / "seed0" / "eval" / "samples.json").read_text())
    for model in ("base", "aligned", "online", "sft_more"):
        for metric, ci in ev["models"][model].items():
            assert all(math.isfinite(ci[k]) for k in ("mean", "lo", "hi")), (model, metric)
            assert ci["lo"] - 1e-9 <= ci["mean"] <= ci["hi"] + 1e-9
        recall = np.mean([r["event_recall"] for r in samples[model]])
        assert ev["models"][model]["event_recall"]["mean"] == pytest.approx(recall)
    md = (tmp_path / "report.md").read_text()
    assert f"{ev['models']['base']['event_recall']['mean']:.3f}" in md
    assert f"round 2: recall {val[2]['event_recall']:.3f}" in md
    # a second run resumes from the markers and reproduces the report's numbers
    assert main(["--quick", "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "report.json").read_text())["seeds"]["0"]["eval"] == ev
    _round_0_is_the_offline_arms_prefix(tmp_path)


def _round_0_is_the_offline_arms_prefix(out: Path):
    """The quick run's round 0 (first_round: offline) took the offline arm's checkpoint at its last step instead of
    training: training it, as a round of its own, gives the same weights bit for bit."""
    from safetensors.torch import load_file

    import mmpref.demo.pipeline as pipeline
    from mmpref.demo.main import CONFIG_DIR
    from mmpref.demo.stages import DemoConfig

    run, cfg = out / "seed0", DemoConfig.load(CONFIG_DIR / "demo_quick.yaml")
    round0 = json.loads((run / "online" / "round-0.done.json").read_text())
    assert "the offline arm's first 5" in round0["line"] and round0["steps"] == 5
    base = json.loads((run / "2c-unet.done.json").read_text())["final_dir"]
    raw = pipeline._round_run(cfg, run, 0, 0, base, str(run / "synth" / "grouped.jsonl"))
    raw["run"]["output_dir"] = str(out / "round0-trained")
    trained = pipeline._train_from_dict(raw, out / "round0-trained.yaml")
    weights = "unet/diffusion_pytorch_model.safetensors"
    ours, theirs = load_file(f"{round0['final_dir']}/{weights}"), load_file(f"{trained.final_dir}/{weights}")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert not torch.equal(ours["conv_in.weight"], load_file(f"{base}/{weights}")["conv_in.weight"])  # it trained


def test_modality_text_dispatches_to_the_text_demo_without_the_flag(monkeypatch):
    import mmpref.demo.text as text
    from mmpref.demo.main import main

    seen = []
    monkeypatch.setattr(text, "main", lambda argv: seen.append(list(argv)) or 0)
    assert main(["--modality", "text", "--quick", "--out", "text"]) == 0
    assert main(["--modality=text"]) == 0
    assert seen == [["--quick", "--out", "text"], []]


def test_bad_demo_config_key_is_named(tmp_path):
    from mmpref.demo.stages import DemoConfig

    bad = tmp_path / "demo.yaml"
    bad.write_text("vae: {stepz: 3}\n")
    with pytest.raises(ValueError, match=r"demo.yaml.*vae\.stepz"):
        DemoConfig.load(bad)


def test_validation_captions_are_deterministic_and_disjoint_from_heldout_and_preference(tmp_path):
    from mmpref.demo.pipeline import _write_captions, write_val_captions
    from mmpref.demo.stages import DemoConfig, heldout_seed, pref_seed, world_for

    cfg = DemoConfig.from_dict({"corpus": {"n_heldout": 30, "n_pref_prompts": 30, "n_val": 40}})
    for name, world_seed in (("heldout", heldout_seed(0)), ("pref", pref_seed(0))):
        w = world_for(cfg, world_seed)
        _write_captions(tmp_path, name, [w.sample_scene(w.rng(i)) for i in range(30)])
    first = write_val_captions(cfg, tmp_path, 0).read_text()
    val = [json.loads(line)["caption"] for line in first.splitlines()]
    caps = tmp_path / "captions"
    others = {c for name in ("heldout", "pref") for c in (caps / f"{name}.txt").read_text().splitlines()}
    assert len(val) == 40 and len(set(val)) == 40 and not set(val) & others
    assert write_val_captions(cfg, tmp_path, 0).read_text() == first


def test_text_only_captions_for_the_t5_skip_heldout_and_validation_texts(tmp_path):
    """The T5's extra captions never include a held-out or validation caption's text, come with their ground-truth
    order, and are the same for the same seed."""
    from mmpref.demo.pipeline import _text_only_captions, _write_captions, write_val_captions
    from mmpref.demo.stages import DemoConfig, heldout_seed, text_seed, world_for

    cfg = DemoConfig.from_dict({"corpus": {"n_heldout": 200, "n_val": 200}, "text_encoder": {"captions": 600}})
    w = world_for(cfg, heldout_seed(0))
    _write_captions(tmp_path, "heldout", [w.sample_scene(w.rng(i)) for i in range(200)])
    _write_captions(tmp_path, "pref", [])
    write_val_captions(cfg, tmp_path, 0)
    unseen = {json.loads(line)["caption"] for name in ("heldout", "val")
              for line in (tmp_path / "captions" / f"{name}.jsonl").read_text().splitlines()}
    texts = _text_only_captions(cfg, tmp_path, 0)
    world = world_for(cfg, text_seed(0))
    drawn = [world.sample_scene(world.rng(i)) for i in range(600)]
    assert texts == [(s.caption, s.order) for s in drawn if s.caption not in unseen]
    assert 0 < len(texts) < 600  # the world repeats captions: some drawn ones were held-out/validation texts
    assert not {c for c, _ in texts} & unseen
    assert _text_only_captions(cfg, tmp_path, 0) == texts


def _caption_sets(tmp_path: Path, cfg) -> None:
    from mmpref.demo.pipeline import _write_captions, write_val_captions
    from mmpref.demo.stages import heldout_seed, pref_seed, world_for

    for name, world_seed, n in (("heldout", heldout_seed(0), cfg.corpus.n_heldout),
                                ("pref", pref_seed(0), cfg.corpus.n_pref_prompts)):
        w = world_for(cfg, world_seed)
        _write_captions(tmp_path, name, [w.sample_scene(w.rng(i)) for i in range(n)])
    write_val_captions(cfg, tmp_path, 0)


def test_online_round_captions_slice_the_preference_set_or_are_fresh_and_disjoint(tmp_path):
    from mmpref.demo.pipeline import _round_captions
    from mmpref.demo.stages import DemoConfig

    sizes = {"n_heldout": 100, "n_pref_prompts": 100, "n_val": 100}
    cfg = DemoConfig.from_dict({"corpus": sizes, "online": {"enabled": True, "losers_from": "perturbed", "rounds": 3,
                                                            "prompts_per_round": 30}})
    _caption_sets(tmp_path, cfg)
    pref = (tmp_path / "captions" / "pref.txt").read_text().splitlines()
    assert _round_captions(cfg, tmp_path, 0, tmp_path) == [pref[0:30], pref[30:60], pref[60:90]]
    def online(**changes):
        return replace(cfg, online=replace(cfg.online, **changes))

    assert _round_captions(online(first_round="offline"), tmp_path, 0, tmp_path) == [pref[0:30], pref[30:60]]
    with pytest.raises(ValueError, match="n_pref_prompts is 100.*online.captions: fresh"):
        _round_captions(online(rounds=4), tmp_path, 0, tmp_path)

    fresh = online(rounds=4, captions="fresh")
    rounds = _round_captions(fresh, tmp_path, 0, tmp_path)
    texts = [c for r in rounds for c in r]
    others = {json.loads(line)["caption"] for name in ("heldout", "val", "pref")
              for line in (tmp_path / "captions" / f"{name}.jsonl").read_text().splitlines()}
    assert [len(r) for r in rounds] == [30] * 4 and not set(texts) & others
    assert len(set(texts)) > 60  # new captions, not a few repeated
    written = [json.loads(line)["caption"] for line in (tmp_path / "fresh.jsonl").read_text().splitlines()]
    assert written == texts and _round_captions(fresh, tmp_path, 0, tmp_path) == rounds


def test_online_first_round_offline_trains_on_the_offline_set_then_samples_from_each_new_policy(tmp_path,
                                                                                                   monkeypatch):
    """Round 0 learns from the offline synth (no sampling); every later round samples from the policy the round
    before it made, and trains from that policy on what it sampled."""
    from types import SimpleNamespace

    import mmpref.demo.pipeline as pipeline
    from mmpref.demo.stages import DemoConfig

    cfg = DemoConfig.from_dict({"corpus": {"n_heldout": 20, "n_pref_prompts": 20, "n_val": 20},
                                "align": {"steps": 90},
                                "online": {"enabled": True, "losers_from": "perturbed", "rounds": 3,
                                           "prompts_per_round": 5, "first_round": "offline", "captions": "fresh"}})
    _caption_sets(tmp_path, cfg)
    sampled, trained = [], []

    def synthesise(cfg, run, seed, policy, captions, out):
        sampled.append((policy, captions.read_text().splitlines()))
        return {"grouped_jsonl": f"{out}.jsonl", "groups": 4, "winner_clap": 0.5, "clap": 0.4}

    def train(raw, path):
        trained.append((raw["model"]["pipeline"], raw["data"]["path"], raw["run"]["max_steps"]))
        return SimpleNamespace(final_dir=f"policy-{len(trained)}", step=raw["run"]["max_steps"])

    monkeypatch.setattr(pipeline, "synthesise", synthesise)
    monkeypatch.setattr(pipeline, "_train_from_dict", train)
    offline = {"grouped_jsonl": "offline.jsonl", "groups": 7, "winner_clap": 0.6, "clap": 0.5}
    done = pipeline.online_stage(cfg, tmp_path, 0, "base", offline)

    fresh = [json.loads(line)["caption"] for line in (tmp_path / "online" / "fresh.jsonl").read_text().splitlines()]
    assert trained == [("base", "offline.jsonl", 30), ("policy-1", str(tmp_path / "online" / "synth-1.jsonl"), 30),
                       ("policy-2", str(tmp_path / "online" / "synth-2.jsonl"), 30)]
    assert sampled == [("policy-1", fresh[:5]), ("policy-2", fresh[5:])]
    assert done["final_dir"] == "policy-3" and [r["groups"] for r in done["rounds"]] == [7, 4, 4]


def test_scale_multiplies_sizes_and_steps_and_keeps_switched_off_parts_off():
    from mmpref.demo.stages import DemoConfig

    cfg = DemoConfig.from_dict({"corpus": {"n_train": 100}, "unet": {"steps": 30},
                                "text_encoder": {"steps": 10, "captions": 0}, "align": {"steps": 7}})
    big = cfg.scaled(2.5)
    assert (big.corpus.n_train, big.unet.steps, big.align.steps) == (250, 75, 18)
    assert (big.text_encoder.steps, big.text_encoder.captions) == (25, 0)  # no text-only captions stays none
    assert cfg.scaled(0.01).unet.steps == 1 and cfg.scaled(1.0) is cfg
    assert big.synth == cfg.synth and big.eval == cfg.eval  # per-caption settings are not sizes


def test_eval_split_must_be_heldout_or_val():
    from mmpref.demo.stages import DemoConfig

    assert DemoConfig.from_dict({"eval": {"split": "val"}}).eval.split == "val"
    with pytest.raises(ValueError, match="eval.split"):
        DemoConfig.from_dict({"eval": {"split": "test"}})


def test_cached_stage_with_other_settings_is_refused_not_reused(tmp_path):
    from mmpref.demo.stages import StaleStageError, run_stage

    calls = []

    def stage():
        calls.append(1)
        return {"line": "made", "value": len(calls)}

    first = run_stage(tmp_path, "3-synth", stage, log=lambda _: None, settings={"synth": {"k": 1}, "seed": 0})
    again = run_stage(tmp_path, "3-synth", stage, log=lambda _: None, settings={"synth": {"k": 1}, "seed": 0})
    assert len(calls) == 1 and again["value"] == first["value"] == 1
    with pytest.raises(StaleStageError, match=r"3-synth.*changed: synth\).*--fresh"):
        run_stage(tmp_path, "3-synth", stage, log=lambda _: None, settings={"synth": {"k": 3}, "seed": 0})
    assert len(calls) == 1


def test_the_thread_count_is_fixed_and_recorded_not_chosen_by_the_load(tmp_path, monkeypatch):
    """Training's numbers depend on torch's thread count: the demo uses one per core even on a busy machine, every
    stage marker records the count, and a marker made with another count is stale (one written before the count was
    recorded still counts as made with the current one)."""
    import os

    from mmpref.demo.stages import DemoConfig, StaleStageError, run_stage, set_threads, stage_settings

    before = torch.get_num_threads()
    monkeypatch.setattr(os, "getloadavg", lambda: (99.0, 99.0, 99.0))
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    try:
        assert set_threads() == 3 and set_threads(1) == 1
        settings = stage_settings(DemoConfig(), "4-align")
        assert settings["torch_threads"] == 1 and set(settings) == {"corpus", "duration_s", "seed", "vae", "unet",
                                                                   "unet_channels", "text_encoder", "clap",
                                                                   "cfg_dropout", "generation", "synth", "align",
                                                                   "torch_threads"}
        stage = lambda: {"line": "made"}  # noqa: E731
        run_stage(tmp_path, "4-align", stage, log=lambda _: None, settings={"align": 1, "torch_threads": 1})
        with pytest.raises(StaleStageError, match=r"changed: torch_threads\) \(it ran with --threads 1\)"):
            run_stage(tmp_path, "4-align", stage, log=lambda _: None, settings={"align": 1, "torch_threads": 2})
        marker = tmp_path / "4-align.done.json"
        marker.write_text(json.dumps({**json.loads(marker.read_text()), "settings": {"align": 1}, "line": "old"}))
        assert run_stage(tmp_path, "4-align", stage, log=lambda _: None,
                         settings={"align": 1, "torch_threads": 2})["line"] == "old"
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("stage", ["4c-online", "5-rounds-val"])
@pytest.mark.parametrize("override", [{"synth": {"losers_per_prompt": 4}}, {"align": {"steps": 100}},
                                      {"online": {"rounds": 3}}, {"clap": {"steps": 10}}])
def test_the_online_arms_markers_record_every_section_it_reads(stage, override):
    """The perturbed rounds run the synth (``synth``) for ``align.steps / rounds`` steps by default: a change to
    either must re-run the arm, not reuse it."""
    from mmpref.demo.stages import DemoConfig, stage_settings

    assert stage_settings(DemoConfig.from_dict({}), stage) != stage_settings(DemoConfig.from_dict(override), stage)


def test_cached_stage_whose_model_folder_vanished_runs_again(tmp_path):
    from mmpref.demo.stages import run_stage

    calls = []

    def stage():
        calls.append(1)
        (tmp_path / "final").mkdir(exist_ok=True)
        return {"line": "trained", "final_dir": str(tmp_path / "final")}

    run_stage(tmp_path, "4-align", stage, log=lambda _: None, settings={"align": 1})
    run_stage(tmp_path, "4-align", stage, log=lambda _: None, settings={"align": 1})
    assert len(calls) == 1
    (tmp_path / "final").rmdir()
    run_stage(tmp_path, "4-align", stage, log=lambda _: None, settings={"align": 1})
    assert len(calls) == 2 and (tmp_path / "final").is_dir()


def test_progress_counts_stages_and_rescales_the_eta_by_the_measured_speed():
    from mmpref.demo.stages import EXPECTED_S, Progress, _minutes

    p = Progress()
    p.plan(["3-synth", "4-align", "5-eval"])
    p.skipped("3-synth")  # cached: neither counted nor waited for
    first = p.started("4-align")
    assert first.startswith("stage 1 of 2,") and first.endswith(
        f"about {_minutes(EXPECTED_S['4-align'] + EXPECTED_S['5-eval'])} left")
    p.finished("4-align", 2 * EXPECTED_S["4-align"])  # this machine runs at half the reference speed
    assert p.started("5-eval").endswith(f"about {_minutes(2 * EXPECTED_S['5-eval'])} left")
    assert p.started("round-0").endswith("elapsed")  # a nested stage outside the plan
    assert _minutes(125) == "2m05s"
    # tuning on validation captions: the plan names that evaluation stage, and it costs what the held-out one does
    from dataclasses import replace

    from mmpref.demo.pipeline import stage_plan
    from mmpref.demo.stages import DemoConfig
    from mmpref.yaml_config import RECIPES

    cfg = DemoConfig.load(RECIPES / "demo.yaml")
    val = replace(cfg, eval=replace(cfg.eval, split="val"))
    assert "5-eval" in stage_plan(cfg, 1) and "5-eval-val" in stage_plan(val, 1) and "5-eval" not in stage_plan(val, 1)
    p.plan(["5-eval-val"])
    assert p.started("5-eval-val").endswith(f"about {_minutes(EXPECTED_S['5-eval'])} left")


def test_clap_hears_the_first_samples_of_each_caption_and_the_judge_all():
    """eval.clap_samples: only the first k samples of each caption go through Griffin-Lim and CLAP; their scores land
    on the right rows, the others hold None, and a caption's CLAP is the mean of its scored samples."""
    from types import SimpleNamespace

    from mmpref.demo.pipeline import judged_samples
    from mmpref.demo.stages import DemoConfig

    mels = torch.randn(3 * 4, 6, 2, generator=torch.Generator().manual_seed(0))
    heard = []

    class Pipe:  # generates `mels` (sample i of caption c is row 4c + i); its vocoder flattens them
        def __call__(self, prompts, **kw):
            return mels

        def mel_to_wave(self, m):
            heard.append(len(m))
            return m.flatten(1)

    pipe = Pipe()
    judge = SimpleNamespace(score=lambda _, scene, logmel: {
        "event_recall": float(logmel.mean() > 0), "event_precision": 1.0, "order_correct": 0.0, "exact_match": 0.0})
    clap = SimpleNamespace(score=lambda prompts, waves, sr: np.array([float(w.sum()) for w in waves]))
    scenes = [SimpleNamespace(caption=f"caption {i}", events=[1]) for i in range(3)]
    rows, waves = judged_samples(pipe, judge, clap, scenes, 4, 0, DemoConfig(), "eval", clap_samples=2)
    assert heard == [6] and len(waves) == 6
    assert [r["clap"] is not None for r in rows] == [True, True, False, False] * 3
    for i, r in enumerate(rows):
        assert r["event_recall"] == float(mels[i].mean() > 0) and r["caption"] == f"caption {i // 4}"
        if i % 4 < 2:
            assert r["clap"] == pytest.approx(float(mels[i].sum()))
    expected = [(float(mels[4 * c].sum()) + float(mels[4 * c + 1].sum())) / 2 for c in range(3)]
    np.testing.assert_allclose(per_caption(rows, 4, "clap"), expected, rtol=1e-6)
    assert summarise_eval({"base": rows, "aligned": rows}, 4, 100, 0)["clap_samples_per_caption"] == 2
