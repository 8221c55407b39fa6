"""End-to-end synthesis: tiny Tango + tiny CLAP, outputs, filters from the records, resume after a kill, corrupt
shards, re-filtering without regeneration, the CLI, and loading the output in the diffusion adapter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.fakes import FakeAccelerator
from helpers.synth_outputs import snapshot

import mmpref.audio
import mmpref.synthesis.run as synth_run
from mmpref.audio import load_audio
from mmpref.config import ConfigError
from mmpref.errors import RunFolderError
from mmpref.synthesis import load_synth_config, run_synthesis
from mmpref.synthesis.config import synth_config_from_dict
from mmpref.synthesis.filters import FilterThresholds, filter_decisions

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ROOT / "tests" / "data" / "captions_audiocaps.jsonl"
FAST = ["generation.duration_s=0.5", "generation.steps=2", "generation.resample_steps=[1,2]",
        "generation.guidance_scale=1.0"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory) -> Path:
    """The shipped tiny config through ``mmpref synth`` (8 captions, 2 shards)."""
    from mmpref.cli import main

    out = tmp_path_factory.mktemp("cli") / "synth"
    assert main(["synth", str(ROOT / "configs" / "synth_tiny.yaml"), f"captions={CAPTIONS}", f"output_dir={out}",
                 *FAST]) == 0
    return out


@pytest.fixture(scope="module")
def models():
    from mmpref.models.tango import TangoPipeline
    from mmpref.synthesis.vocabulary import DEFAULT_VOCABULARY
    from mmpref.toy.clap import tiny_clap_scorer

    texts = [p for phrases in DEFAULT_VOCABULARY.values() for p in phrases]  # as `preset:tiny` in a config
    return TangoPipeline.from_preset("tiny"), {"clap": tiny_clap_scorer(0, texts)}


def small_cfg(out: Path, **over):
    raw = {
        "captions": str(CAPTIONS), "max_captions": 5, "output_dir": str(out), "pipeline": "preset:tiny",
        "generation": {"steps": 2, "guidance_scale": 1.0, "duration_s": 0.5, "batch_size": 3, "seed": 7,
                       "samples_per_caption": 2},
        "strategies": ["resample", "concept", "temporal"], "perturb": {"max_perturbations": 1, "seed": 1},
        "scorers": {"clap": {"path": "preset:tiny"}}, "shard_size": 2, "audio_format": "wav",
    }
    for k, v in over.items():
        node = raw
        *parents, last = k.split(".")
        for p in parents:
            node = node[p]
        node[last] = v
    return synth_config_from_dict(raw)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


ORIGINAL_PROCESS_SHARD = synth_run.process_shard


class Killed(Exception):
    """Stands in for SIGKILL: the process stops between two audio files of a shard."""


class Spy:
    """Records which shards process_shard runs; optionally dies part-way through one of them."""

    def __init__(self, monkeypatch, die_in: int | None = None, after_files: int = 2):
        self.calls: list[int] = []
        real = ORIGINAL_PROCESS_SHARD  # not an earlier Spy's wrapper
        saver = mmpref.audio.save_audio

        def wrapped(cfg, shard, *args, **kwargs):
            self.calls.append(shard.index)
            if shard.index != die_in:
                return real(cfg, shard, *args, **kwargs)
            written = []

            def dying_save(path, *a, **k):
                if len(written) == after_files:
                    raise Killed("killed mid-shard")
                written.append(path)
                return saver(path, *a, **k)

            monkeypatch.setattr(mmpref.audio, "save_audio", dying_save)
            try:
                return real(cfg, shard, *args, **kwargs)
            finally:
                monkeypatch.setattr(mmpref.audio, "save_audio", saver)

        monkeypatch.setattr(synth_run, "process_shard", wrapped)


# ---------------------------------------------------------------------------------------------- end to end
def test_tiny_end_to_end_outputs(cli_run):
    out = cli_run
    report = json.loads((out / "report.json").read_text())
    cands = read_jsonl(out / "candidates.jsonl")
    pairs = read_jsonl(out / "pairs.jsonl")
    grouped = read_jsonl(out / "grouped.jsonl")
    settings = json.loads((out / "settings.json").read_text())
    assert report["captions"] == 8 and report["candidates"] == len(cands)
    assert report["pairs"] == len(pairs) > 0 and report["grouped_rows"] == len(grouped)
    assert sum(report["pairs_per_strategy"].values()) == len(pairs)
    assert set(report["pairs_per_strategy"]) <= {"resample", "concept", "temporal"}
    assert settings["scorers"]["tiny_clap"]["path"] == "preset:tiny"
    assert (out / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    by_audio = {c["audio"]: c for c in cands}
    for p in pairs:
        winner, loser = by_audio[p["chosen"]], by_audio[p["rejected"]]
        assert winner["text"] == p["prompt"] and winner["role"] == "original"
        assert p["chosen_scores"]["tiny_clap"] > p["rejected_scores"]["tiny_clap"]  # the original caption wins
        if p["strategy"] == "resample":
            assert loser["text"] == p["prompt"] and loser["steps"] != winner["steps"] or loser["seed"] != winner[
                "seed"]
        else:
            assert loser["text"] == p["rejected_caption"] != p["prompt"] and loser["strategy"] == p["strategy"]
    for row in grouped:
        assert len(row["rejected"]) == 1  # K
    wave = load_audio(out / pairs[0]["chosen"], 16000)
    assert wave.shape == (8000,) and np.abs(wave).max() > 1e-3
    assert (out / pairs[0]["chosen"]).suffix == ".flac"


def test_pairs_are_exactly_the_candidates_passing_the_filters(cli_run):
    """Recompute every decision from candidates.jsonl with the config's thresholds."""
    out = cli_run
    cfg = load_synth_config(ROOT / "configs" / "synth_tiny.yaml", [f"captions={CAPTIONS}", f"output_dir={out}"])
    th = {n: FilterThresholds.of(s) for n, s in cfg.scorers.items()}
    cands = read_jsonl(out / "candidates.jsonl")
    expected = set()
    for i in {c["caption_index"] for c in cands}:
        mine = [c for c in cands if c["caption_index"] == i]
        orig = [c for c in mine if c["role"] == "original"]
        best = max(orig, key=lambda c: c["scores"]["tiny_clap"])
        for c in mine:
            if c is not best and all(filter_decisions(best["scores"], c["scores"], th).values()):
                expected.add((best["audio"], c["audio"], c["strategy"]))
    got = {(p["chosen"], p["rejected"], p["strategy"]) for p in read_jsonl(out / "pairs.jsonl")}
    assert got == expected
    report = json.loads((out / "report.json").read_text())
    assert report["acceptance"]["accepted"] == len(expected)


def test_dataset_on_disk_records_captions_scores_and_settings(cli_run):
    import datasets

    ds = datasets.load_from_disk(str(cli_run / "dataset"))
    for col in ("prompt", "chosen", "rejected", "strategy", "rejected_captions", "chosen_scores", "rejected_scores",
                "chosen_steps", "rejected_steps", "chosen_seed", "rejected_seeds", "guidance_scale", "duration_s"):
        assert col in ds.column_names
    cands = {c["audio"]: c for c in read_jsonl(cli_run / "candidates.jsonl")}
    for row in ds:
        assert row["rejected_captions"] == [cands[a]["text"] for a in row["rejected"]]
        assert row["rejected_scores"] == [cands[a]["scores"] for a in row["rejected"]]
        assert row["chosen_scores"] == cands[row["chosen"]]["scores"]
        assert row["guidance_scale"] == 1.0 and row["duration_s"] == 0.5


# ---------------------------------------------------------------------------------------------- resume
def test_resume_after_kill_equals_uninterrupted_run(tmp_path, models, monkeypatch):
    pipeline, scorers = models
    clean = run_synthesis(small_cfg(tmp_path / "clean"), pipeline, scorers)
    spy = Spy(monkeypatch, die_in=1)
    with pytest.raises(Killed):
        run_synthesis(small_cfg(tmp_path / "killed"), pipeline, scorers)
    assert spy.calls == [0, 1]
    partial = tmp_path / "killed" / "shards" / "shard_00001"
    assert len(list((partial / "audio").iterdir())) == 2 and not (partial / "done.json").exists()

    spy = Spy(monkeypatch)
    resumed = run_synthesis(small_cfg(tmp_path / "killed"), pipeline, scorers)
    assert spy.calls == [1, 2]  # shard 0 was finished: not redone; the partial shard 1 is redone
    assert snapshot(resumed.output_dir) == snapshot(clean.output_dir)
    assert resumed.report["pairs"] == clean.report["pairs"]

    spy = Spy(monkeypatch)
    again = run_synthesis(small_cfg(tmp_path / "killed"), pipeline, scorers)
    assert spy.calls == [] and snapshot(again.output_dir) == snapshot(clean.output_dir)  # idempotent


def test_corrupt_shard_is_detected_and_redone(tmp_path, models, monkeypatch):
    pipeline, scorers = models
    cfg = small_cfg(tmp_path / "run", max_captions=4)
    clean = snapshot(run_synthesis(cfg, pipeline, scorers).output_dir)
    audio = sorted((tmp_path / "run" / "shards" / "shard_00000" / "audio").iterdir())[0]
    audio.write_bytes(audio.read_bytes()[:100])  # truncated file
    records = tmp_path / "run" / "shards" / "shard_00001" / "records.jsonl"
    records.write_text(records.read_text()[:-20])  # torn records
    spy = Spy(monkeypatch)
    assert snapshot(run_synthesis(cfg, pipeline, scorers).output_dir) == clean
    assert spy.calls == [0, 1]


def test_new_thresholds_refilter_without_regenerating(tmp_path, models, monkeypatch):
    pipeline, scorers = models
    first = run_synthesis(small_cfg(tmp_path / "run", max_captions=4), pipeline, scorers)
    scores = [p["rejected_scores"]["clap"] for p in read_jsonl(first.pairs_jsonl)]
    cut = float(np.median(scores))
    spy = Spy(monkeypatch)
    second = run_synthesis(small_cfg(tmp_path / "run", max_captions=4, **{"scorers.clap.beta": cut}),
                           pipeline, scorers)
    assert spy.calls == []
    kept = read_jsonl(second.pairs_jsonl)
    assert len(kept) == sum(s >= cut for s in scores) and all(p["rejected_scores"]["clap"] >= cut for p in kept)
    assert second.report["acceptance"]["pass_rate_per_filter"]["clap.beta"] < 1.0


def test_k_losers_per_group_from_the_same_shards(tmp_path, models, monkeypatch):
    """K is applied at the merge: the K losers with the largest margin on the first scorer."""
    pipeline, scorers = models
    more = {"max_captions": 3, "perturb.max_perturbations": 3}
    run_synthesis(small_cfg(tmp_path / "run", **more), pipeline, scorers)
    spy = Spy(monkeypatch)
    result = run_synthesis(small_cfg(tmp_path / "run", losers_per_prompt=2, **more), pipeline, scorers)
    assert spy.calls == []
    pairs = read_jsonl(result.pairs_jsonl)
    grouped = read_jsonl(result.grouped_jsonl)
    assert grouped and all(len(g["rejected"]) == 2 for g in grouped)
    for g in grouped:
        mine = [p for p in pairs if p["chosen"] == g["chosen"] and p["strategy"] == g["strategy"]]
        margins = sorted((p["chosen_scores"]["clap"] - p["rejected_scores"]["clap"], p["rejected"]) for p in mine)
        assert g["rejected"] == [r for _, r in sorted(margins, key=lambda m: -m[0])[:2]]


def test_llm_perturber_from_config(tmp_path):
    from mmpref.synthesis.perturb import LLMPerturber
    from mmpref.synthesis.vocabulary import Vocabulary
    from mmpref.toy.llm import build_tiny_llama

    path = build_tiny_llama(tmp_path / "llm", ["a dog barks then a man speaks"] * 20, vocab_size=300)
    cfg = small_cfg(tmp_path / "out", **{"perturb.llm": {"path": str(path), "max_new_tokens": 8,
                                                         "num_samples": 2}})
    perturber = synth_run.perturber_for(cfg, Vocabulary.default())
    assert isinstance(perturber, LLMPerturber) and perturber.fallback is not None
    original = "A dog barks then a man speaks"
    parse = synth_run.parse_caption_with(perturber.vocabulary, original)
    out = perturber.perturb(parse, "temporal", 2)
    assert len(out) == 2 and all(p.strategy == "temporal" for p in out)
    # a random tiny LM writes nothing valid, so the rules fill in: temporal perturbations of a 2-event caption
    # change the order of the same events (or add / drop one), never the caption itself
    for p in out:
        assert p.caption.lower() != original.lower()
        events = [e.standalone.lower() for e in synth_run.parse_caption_with(perturber.vocabulary, p.caption).events]
        assert set(events) & {"a dog barks", "a man speaks"}, p.caption


def centroid(texts: list[str], waves: list[np.ndarray], sample_rate: int) -> np.ndarray:
    """A plain callable scorer (ignores the text): the spectral centroid in kHz. (The tiny random pipeline's RMS
    level is the same for every clip to 1e-5, so a loudness filter would keep nothing or everything.)"""
    out = []
    for w in waves:
        mag = np.abs(np.fft.rfft(w))
        out.append(float((np.fft.rfftfreq(len(w), 1 / sample_rate) * mag).sum() / mag.sum() / 1000))
    return np.array(out)


def test_any_callable_is_a_scorer_and_filters_combine(tmp_path, models):
    pipeline, scorers = models
    cfg = small_cfg(tmp_path / "run", max_captions=5,
                    scorers={"clap": {"path": "preset:tiny"}, "cent": {"path": "callable", "delta_min": 0.004}})
    result = run_synthesis(cfg, pipeline, {"clap": scorers["clap"], "cent": centroid})
    settings = json.loads((result.output_dir / "settings.json").read_text())
    assert settings["scorers"]["cent"] == {"callable": "centroid"}
    assert settings["filters"]["cent"]["delta_min"] == 0.004
    cands = read_jsonl(result.output_dir / "candidates.jsonl")
    for c in cands:
        wave = load_audio(result.output_dir / c["audio"], 16000)
        assert c["scores"]["cent"] == pytest.approx(centroid([], [wave], 16000)[0], abs=1e-3)  # 16-bit WAV
    pairs = read_jsonl(result.pairs_jsonl)
    assert pairs, "the filters must keep some pairs for this test to check anything"
    for p in pairs:
        assert p["chosen_scores"]["cent"] - p["rejected_scores"]["cent"] >= 0.004 - 1e-9
        assert p["chosen_scores"]["clap"] > p["rejected_scores"]["clap"]
    rates = result.report["acceptance"]["pass_rate_per_filter"]
    assert set(rates) >= {"cent.delta_min", "clap.alpha", "wins"}
    assert 0 < rates["cent.delta_min"] < 1  # the second scorer's filter rejected some pairs and kept others


def test_changed_generation_settings_refuse_to_mix(tmp_path, models):
    pipeline, scorers = models
    run_synthesis(small_cfg(tmp_path / "run", max_captions=2), pipeline, scorers)
    with pytest.raises(RunFolderError, match=r"different settings \(changed: \['generation'\]\)"):
        run_synthesis(small_cfg(tmp_path / "run", max_captions=2, **{"generation.seed": 8}), pipeline, scorers)
    from mmpref.models.tango import TangoPipeline

    other = TangoPipeline.from_preset("tiny", seed=1)  # same class, other weights
    with pytest.raises(RunFolderError, match=r"changed: \['pipeline'\]"):
        run_synthesis(small_cfg(tmp_path / "run", max_captions=2), other, scorers)
    with pytest.raises(RunFolderError, match=r"changed: \['generation'\]"):
        run_synthesis(small_cfg(tmp_path / "run", max_captions=2, **{"generation.shared_noise": True}), pipeline,
                      scorers)
    # switched off, shared_noise stays out of the fingerprint: runs started before it existed still resume
    assert "shared_noise" not in synth_run.generation_settings(small_cfg(tmp_path / "x"), "p", {})["generation"]


@pytest.mark.parametrize("shared", [True, False])
def test_shared_noise_makes_losers_differ_by_their_caption_only(tmp_path, models, shared):
    """With the UNet's text path cut (cross-attention outputs zeroed) the caption cannot matter, so with shared
    noise every perturbed candidate is the original's audio (up to float rounding); with independent noise none is."""
    import torch

    from mmpref.models.tango import TangoPipeline

    deaf = TangoPipeline.from_preset("tiny")
    with torch.no_grad():
        for name, module in deaf.unet.named_modules():
            if name.endswith("attn2.to_out.0"):
                module.weight.zero_()
                module.bias.zero_()
    cfg = small_cfg(tmp_path / "run", max_captions=3, strategies=["concept", "temporal"],
                    **{"generation.shared_noise": shared, "perturb.max_perturbations": 2})
    run_synthesis(cfg, deaf, models[1])
    cands = read_jsonl(tmp_path / "run" / "candidates.jsonl")
    originals = {c["caption_index"]: c for c in cands if c["role"] == "original"}
    perturbed = [c for c in cands if c["role"] == "perturbed"]
    assert len(originals) == 3 and len(perturbed) >= 6
    for c in perturbed:
        o = originals[c["caption_index"]]
        assert c["text"] != o["text"]
        gap = np.abs(load_audio(tmp_path / "run" / c["audio"]) - load_audio(tmp_path / "run" / o["audio"])).max()
        assert (c["seed"] == o["seed"]) == shared
        # 1e-4: a few 16-bit steps of batch-order float rounding; the random tiny vocoder is quiet (peak ~0.25)
        assert gap < 1e-4 if shared else gap > 1e-3


# ---------------------------------------------------------------------------------------------- config
def test_config_errors_name_file_and_key(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("captions: c.txt\nscorers: {clap: {path: x, alpah: 0.4}}\n")
    with pytest.raises(ConfigError, match=r"s.yaml: scorers.clap.alpah: unknown key"):
        load_synth_config(path)
    path.write_text("captions: c.txt\nscorers: {clap: {path: x}}\nstrategies: [resample]\n")
    with pytest.raises(ConfigError, match=r"s.yaml: generation.samples_per_caption"):
        load_synth_config(path, ["generation.samples_per_caption=1"])
    bad = tmp_path / "caps.jsonl"
    bad.write_text('{"caption": "a dog barks"}\n{"text": "x"}\n')
    with pytest.raises(ValueError, match=r"caps.jsonl: line 2: needs a non-empty string field 'caption'"):
        synth_run.read_captions(bad)


def test_real_config_is_valid():
    cfg = load_synth_config(ROOT / "configs" / "synth_audioalpaca.yaml")
    assert set(cfg.scorers) == {"clap_a", "clap_b"}
    assert (cfg.scorers["clap_a"].alpha, cfg.scorers["clap_b"].delta_max) == (0.45, 0.70)


# ---------------------------------------------------------------------------------------------- training


@pytest.mark.parametrize("name,schema", [("grouped.jsonl", "grouped"), ("pairs.jsonl", "audio_alpaca")])
def test_output_loads_in_the_diffusion_adapter_unchanged(cli_run, tmp_path, name, schema):
    from mmpref.adapters.diffusion import DiffusionAdapter
    from mmpref.config import config_from_dict

    cfg = config_from_dict({
        "modality": "diffusion", "model": {"pipeline": "tiny"}, "loss": {"dpo": {"beta": 2000}},
        "data": {"path": str(cli_run / name), "schema": schema, "duration_s": 0.5,
                 "cache_dir": str(tmp_path / "cache")},
    })
    adapter = DiffusionAdapter(cfg)
    adapter.setup(FakeAccelerator())
    rows = read_jsonl(cli_run / name)
    assert len(adapter.train_dataset) == len(rows)
    batch = adapter.collate([adapter.train_dataset[0]])
    assert batch["mean"].shape[:2] == (1, 2)  # winner + 1 loser per group
    # the cached posteriors are the VAE's encoding of the very files the row names, winner first
    from mmpref.adapters.diffusion import prepare_wave
    from mmpref.audio import samples_for

    pipe, row = adapter.pipe, rows[0]
    loser = row["rejected"][0] if isinstance(row["rejected"], list) else row["rejected"]
    n = samples_for(0.5, pipe.mel_config)
    waves = torch.stack([prepare_wave(load_audio(cli_run / f, 16000), n) for f in (row["chosen"], loser)])
    mean, _ = pipe.encode_audio(waves)
    torch.testing.assert_close(batch["mean"][0], mean.float(), atol=1e-5, rtol=1e-4)


def test_cli_help_and_bad_config(capsys, tmp_path):
    from mmpref.cli import main

    assert main(["synth", "--help"]) == 0
    assert "mmpref synth CONFIG" in capsys.readouterr().out
    (tmp_path / "s.yaml").write_text("captions: missing.txt\nscorers: {c: {path: x}}\nbogus: 1\n")
    assert main(["synth", str(tmp_path / "s.yaml")]) == 1
    assert "bogus: unknown key" in capsys.readouterr().err


def test_saved_output_survives_a_moved_folder(cli_run, tmp_path):
    """Audio paths are relative: a copied output folder still resolves."""
    moved = tmp_path / "moved"
    shutil.copytree(cli_run, moved)
    for p in read_jsonl(moved / "pairs.jsonl"):
        assert (moved / p["chosen"]).is_file() and (moved / p["rejected"]).is_file()
