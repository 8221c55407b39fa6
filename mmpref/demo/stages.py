"""The sound-event demo's stages: corpus -> tiny Tango + CLAP from scratch -> preference sets -> diffusion-DPO ->
evaluation. Each stage writes its outputs under the run folder and a ``<stage>.done.json`` marker (its one-line
summary and its wall time); a rerun skips finished stages, so an interrupted demo resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from mmpref.demo.world import World
from mmpref.errors import RunFolderError
from mmpref.io import write_json_atomic
from mmpref.yaml_config import build, check, load

# ----------------------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class JudgeStageConfig:
    n: int = 300  # world clips the judge trains on (plus as many degraded copies)
    epochs: int = 20
    n_test: int = 100  # clean clips its accuracy is reported on


@dataclass
class CorpusConfig:
    n_train: int = 600  # clips for the VAE, the UNet and CLAP
    n_heldout: int = 48  # evaluation captions (a different world seed: never trained on)
    n_pref_prompts: int = 64  # captions the preference sets are generated for (not in the training corpus)
    n_val: int = 64  # validation captions (own world seed, disjoint from held-out/preference): tune recipes on these


@dataclass
class PartConfig:
    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3


@dataclass
class TextEncoderConfig(PartConfig):
    # world captions sampled as text only (no audio: text costs nothing) to teach the T5 from, besides the training
    # corpus's; never a held-out or validation caption's text. 0: the corpus's captions only.
    captions: int = 0


@dataclass
class GenerationConfig:
    steps: int = 20  # DDIM steps
    guidance_scale: float = 3.0


@dataclass
class SynthStageConfig:
    samples_per_caption: int = 2  # candidates per original caption; CLAP picks the winner
    losers_per_prompt: int = 2  # K
    strategies: list[str] = field(default_factory=lambda: ["resample", "concept", "temporal"])
    max_perturbations: int = 4
    shared_noise: bool = False  # perturbed captions reuse the original's seed (see synthesis GenerationConfig)


@dataclass
class AlignConfig:
    loss: str = "dpo"
    beta: float = 2000.0
    steps: int = 200
    batch_size: int = 8
    lr: float = 1e-4
    sft_weight: float = 0.0  # > 0 adds weight * the winners' summed NLL (a plain weight, not RPO's eta * beta)


@dataclass
class OnlineArmConfig:
    """The online arm: rounds of (sample ``samples`` clips for each of ``prompts_per_round`` preference captions
    from the current policy, rank them with the demo's CLAP (never the judge), the best vs ``losers`` others as one
    group, grouped diffusion-DPO), each round's policy sampling the next. Off unless ``enabled``."""

    enabled: bool = False
    # "samples": the losers are the policy's other samples of the caption (mmpref train's online rounds, builder
    # best_vs_k); "perturbed": each round runs the synth on the current policy (perturbed captions sampled from the
    # original's noise, CLAP-filtered) and DPO from it, the reference being the policy that drew the round
    losers_from: str = "samples"
    rounds: int = 2
    prompts_per_round: int = 120
    samples: int = 4
    losers: int = 3
    epochs_per_round: int = 1  # samples: passes over each round's groups
    # perturbed: optimizer steps per round; null: the offline alignment's steps split evenly over the rounds (the
    # same training compute as the offline arm and the SFT-more control)
    steps_per_round: int | None = None
    beta: float = 2000.0
    lr: float = 5e-5
    batch_size: int = 8
    update_reference: bool = True  # each round's reference is the policy that drew its samples (iterative Tango 2)
    # perturbed only. first_round "offline": round 0 learns from the offline arm's preference set instead of sampling
    # (the base is round 0's policy, so the synth's samples of the base are its own: no sampling cost); "sample":
    # round 0 runs the synth like every later round
    first_round: str = "sample"
    # perturbed only: the captions the sampled rounds draw, prompts_per_round each. "pref": consecutive slices of
    # the preference captions; "fresh": new world captions (their own world seed; no held-out, validation or
    # preference text), so the online arm also learns on captions the offline arm never saw
    captions: str = "pref"

    def __post_init__(self) -> None:
        check(self.losers_from in ("samples", "perturbed"), "losers_from",
              f"must be samples or perturbed; got {self.losers_from!r}")
        check(self.first_round in ("sample", "offline"), "first_round",
              f"must be sample or offline; got {self.first_round!r}")
        check(self.captions in ("pref", "fresh"), "captions", f"must be pref or fresh; got {self.captions!r}")
        if self.losers_from == "samples":
            for key, default in (("first_round", "sample"), ("captions", "pref")):
                check(getattr(self, key) == default, key,
                      "applies to losers_from: perturbed only; remove it or set losers_from: perturbed")


EVAL_SPLITS = ("heldout", "val")


@dataclass
class EvalConfig:
    samples_per_caption: int = 2
    bootstrap: int = 2000
    wav_examples: int = 4
    split: str = "heldout"  # "heldout" (the reported test) or "val" (for tuning; written to eval_val/)
    # CLAP scores the first this many samples of each caption (null: all). The judge reads every sample's log-mel;
    # CLAP needs a wave, and Griffin-Lim for every sample costs more than the judging. CLAP is the reward the arms
    # learn from: a diagnostic here, not part of the target.
    clap_samples: int | None = None

    def __post_init__(self) -> None:
        check(self.split in EVAL_SPLITS, "split", f"must be one of {', '.join(EVAL_SPLITS)}; got {self.split!r}")
        check(self.clap_samples is None or self.clap_samples >= 1, "clap_samples", "must be >= 1 or null")


@dataclass
class RoundsEvalConfig:
    """The per-round curve of the online arm on the validation captions (0 samples: not measured)."""

    samples_per_caption: int = 0


@dataclass
class DemoConfig:
    """Everything the demo does; ``configs/demo.yaml`` (default) and ``configs/demo_quick.yaml`` (``--quick``)."""

    seed: int = 0
    duration_s: float = 2.56
    judge: JudgeStageConfig = field(default_factory=JudgeStageConfig)
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    vae: PartConfig = field(default_factory=lambda: PartConfig(steps=300, batch_size=16, lr=2e-3))
    unet: PartConfig = field(default_factory=lambda: PartConfig(steps=600, batch_size=16, lr=1e-3))
    text_encoder: TextEncoderConfig = field(default_factory=lambda: TextEncoderConfig(steps=0, batch_size=64,
                                                                                      lr=3e-3))
    clap: PartConfig = field(default_factory=lambda: PartConfig(steps=200, batch_size=32, lr=1e-3))
    unet_channels: list[int] = field(default_factory=lambda: [16, 32])  # the preset's [32, 64] is 4x slower
    cfg_dropout: float = 0.1
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    synth: SynthStageConfig = field(default_factory=SynthStageConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    online: OnlineArmConfig = field(default_factory=OnlineArmConfig)
    # the control: the base trained further on the synth's winners with the plain denoising loss, with the offline
    # alignment's steps, batch and optimizer (the gain that more training alone buys)
    sft_more: bool = False
    eval: EvalConfig = field(default_factory=EvalConfig)
    rounds_eval: RoundsEvalConfig = field(default_factory=RoundsEvalConfig)

    def scaled(self, factor: float) -> DemoConfig:
        """Data sizes and training steps times ``factor`` (``--scale``: bigger runs for machines with a GPU)."""
        if factor == 1.0:
            return self
        cfg = DemoConfig.from_dict(asdict(self))

        def mul(x: int) -> int:  # 0 stays 0: a switched-off part (text_encoder steps/captions) stays off
            return max(1, int(round(x * factor))) if x else 0

        for c, names in ((cfg.judge, ("n",)), (cfg.corpus, ("n_train", "n_heldout", "n_pref_prompts", "n_val")),
                         (cfg.vae, ("steps",)), (cfg.unet, ("steps",)), (cfg.text_encoder, ("steps", "captions")),
                         (cfg.clap, ("steps",)), (cfg.align, ("steps",)),
                         (cfg.online, ("prompts_per_round",))):
            for n in names:
                setattr(c, n, mul(getattr(c, n)))
        return cfg

    @classmethod
    def from_dict(cls, raw: dict, source: str = "<dict>") -> DemoConfig:
        return build(cls, raw, source)

    @classmethod
    def load(cls, path: str | os.PathLike, overrides: Sequence[str] = ()) -> DemoConfig:
        """The demo YAML with ``key.sub=value`` overrides (the loader of every mmpref config)."""
        raw, overridden = load(path, overrides)
        return build(cls, raw, str(path), overridden)


# ----------------------------------------------------------------------------------------------------------------
# Stage bookkeeping
# ----------------------------------------------------------------------------------------------------------------


# The config sections each stage's output depends on, upstream stages' included: a marker records their values,
# so a changed config is noticed instead of silently reusing a stale stage.
_BASE = ["seed", "duration_s", "corpus"]
_INIT = _BASE + ["vae", "unet_channels", "text_encoder"]  # the pipeline the UNet starts from
_BASE_MODEL = _INIT + ["unet", "cfg_dropout"]
_SYNTH = _BASE_MODEL + ["clap", "generation", "synth"]
STAGE_INPUTS: dict[str, list[str]] = {
    "judge": ["duration_s", "judge"],
    "1-corpus": _BASE,
    "2a-vae": _BASE + ["vae"],
    "2b-pipeline": _INIT,
    "2c-unet": _BASE_MODEL,
    "2d-clap": _BASE + ["clap"],
    "3-synth": _SYNTH,
    "4-align": _SYNTH + ["align"],
    "4b-sft_more": _SYNTH + ["align", "sft_more"],
    # the perturbed rounds run the synth's settings; their steps default to align.steps split over the rounds
    "4c-online": _SYNTH + ["align", "online"],
    "5-eval": _SYNTH + ["align", "online", "sft_more", "eval"],
    "5-rounds-val": _SYNTH + ["align", "online", "rounds_eval"],
}


class StaleStageError(RunFolderError):
    """A cached stage was made with other settings than the current config."""


THREADS_KEY = "torch_threads"  # in every stage's settings: training's numbers depend on torch's thread count


def stage_settings(cfg: DemoConfig, name: str) -> dict:
    """The config sections a stage reads, and torch's thread count (training's numbers depend on it)."""
    sections = STAGE_INPUTS["5-eval" if name.startswith("5-eval") else name]  # 5-eval-val: the same inputs
    values = asdict(cfg)
    return {**{k: values[k] for k in sections}, THREADS_KEY: torch.get_num_threads()}


def _comparable(current: dict, recorded: Any) -> dict:
    """``current`` as a marker written before the thread count was recorded would hold it (without it)."""
    if isinstance(recorded, dict) and THREADS_KEY not in recorded:
        return {k: v for k, v in current.items() if k != THREADS_KEY}
    return current


def run_stage(out: Path, name: str, fn: Callable[[], dict], log: Callable[[str], None] = print,
              settings: dict | None = None, stage_dir: Path | None = None) -> dict:
    """Run ``fn`` unless ``out/<name>.done.json`` exists; print one summary line; return the stage's summary.

    ``settings`` (see :func:`stage_settings`) are stored in the marker. A cached stage made with other settings is
    an error, not a silent reuse (its outputs and training checkpoints would mix with the new ones), unless
    ``stage_dir`` names the folder that holds this stage's outputs and nothing else: then that folder is wiped and
    the stage runs again. With ``stage_dir``, leftovers of an interrupted run with other settings are wiped too,
    while an interrupted run with the same settings resumes in place. A cached stage whose output folders
    (``final_dir`` / ``final`` / ``path`` in its summary) have vanished runs again.
    """
    marker = out / f"{name}.done.json"
    current = json.loads(json.dumps(settings))  # as it would read back from the marker (tuples -> lists)
    if marker.exists():
        done = json.loads(marker.read_text())
        same = settings is None or done.get("settings") == _comparable(current, done.get("settings"))
        if same and _outputs_exist(done):
            PROGRESS.skipped(name)
            log(f"[{name}] cached ({done['seconds']:.0f} s when run): {done['line']}")
            return done
        if not same and stage_dir is None:
            old = done.get("settings") or {}
            changed = sorted(k for k in current if old.get(k) != current[k]) or ["(unrecorded)"]
            threads = f" (it ran with --threads {old[THREADS_KEY]})" if THREADS_KEY in changed else ""
            raise StaleStageError(
                f"{marker}: stage {name!r} was made with other settings (changed: {', '.join(changed)}){threads}; "
                "rerun with --fresh, or with another --out")
        marker.unlink()
    if stage_dir is not None:
        tag = stage_dir / ".stage_settings.json"
        if not tag.exists() or (old := json.loads(tag.read_text())) != _comparable(current, old):
            shutil.rmtree(stage_dir, ignore_errors=True)
        stage_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(tag, current)
    log(f"[{name}] running ({PROGRESS.started(name)})")
    start = time.perf_counter()
    summary = fn()
    done = {**summary, "seconds": round(time.perf_counter() - start, 1)}
    done.setdefault("line", "")
    if settings is not None:
        done["settings"] = settings
    write_json_atomic(marker, done)
    PROGRESS.finished(name, done["seconds"])
    log(f"[{name}] {done['seconds']:.0f} s: {done['line']}")
    return done


# Seconds each stage of the default audio demo (configs/demo.yaml) took on a 2-core CPU (stage markers of two fresh
# `mmpref demo` runs with the evaluation on the validation captions, the same work, 2026-12-03: 808 s and 752 s
# wall clock, averaged): the ETA's prior, rescaled as stages finish by how fast this machine turns out to be. Nested
# stages (online rounds) are inside their parent's time.
EXPECTED_S = {"judge": 42, "1-corpus": 1, "2a-vae": 40, "2b-pipeline": 16, "2c-unet": 80, "2d-clap": 17,
              "3-synth": 118, "4-align": 97, "4b-sft_more": 26, "4c-online": 197, "5-eval": 108,
              "5-rounds-val": 36}


class Progress:
    """Which stage of how many is running, time elapsed and an estimate of the time left (see :data:`EXPECTED_S`).
    :meth:`plan` names the stages to come (every seed's); a stage outside the plan (a nested one) only shows the
    elapsed time."""

    def __init__(self) -> None:
        self.start, self.todo, self.total = time.perf_counter(), [], 0
        self.expected_done = self.actual_done = 0.0

    def plan(self, names: Sequence[str]) -> None:
        self.__init__()
        self.todo, self.total = list(names), len(names)

    def skipped(self, name: str) -> None:
        """A cached stage: nothing to wait for."""
        if name in self.todo:
            self.todo.remove(name)
            self.total -= 1

    def started(self, name: str) -> str:
        elapsed = time.perf_counter() - self.start
        if name not in self.todo:
            return f"{_minutes(elapsed)} elapsed"
        self.todo.remove(name)
        speed = self.actual_done / self.expected_done if self.expected_done else 1.0
        left = speed * (_expected(name) + sum(_expected(n) for n in self.todo))
        return (f"stage {self.total - len(self.todo)} of {self.total}, {_minutes(elapsed)} elapsed, "
                f"about {_minutes(left)} left")

    def finished(self, name: str, seconds: float) -> None:
        if _expected(name):
            self.expected_done += _expected(name)
            self.actual_done += seconds


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


PROGRESS = Progress()


def _outputs_exist(done: dict) -> bool:
    """The model folders a finished stage points to (in its summary or its ``result``) are still there."""
    places = [done, done.get("result")]
    paths = [d.get(k) for d in places if isinstance(d, dict) for k in ("final_dir", "final", "path")]
    return all(os.path.isdir(p) for p in paths if isinstance(p, str))


def eval_stage_name(split: str) -> str:
    """The evaluation stage's marker name: ``5-eval`` (held-out) or ``5-eval-<split>``."""
    return "5-eval" if split == "heldout" else f"5-eval-{split}"


def _expected(name: str) -> float:
    return EXPECTED_S.get("5-eval" if name.startswith("5-eval") else name, 0)  # 5-eval-val: the same work


def eval_folder(split: str) -> str:
    """Where the evaluation of ``split`` writes its samples and WAVs: ``eval/`` (held-out) or ``eval_<split>/``."""
    return "eval" if split == "heldout" else f"eval_{split}"


def world_for(cfg: DemoConfig, seed: int) -> World:
    return World(seed=seed, duration_s=cfg.duration_s)


def heldout_seed(seed: int) -> int:
    """World seed of the evaluation captions: disjoint from training (seed) and preference (seed + 500) corpora."""
    return 1_000_003 + seed


def pref_seed(seed: int) -> int:
    return 500_009 + seed


def text_seed(seed: int) -> int:
    """World seed of the text-only captions the T5 is taught from (``text_encoder.captions``)."""
    return 3_000_017 + seed


def online_seed(seed: int) -> int:
    """World seed of the online arm's fresh captions (``online.captions: fresh``)."""
    return 4_000_037 + seed


def val_seed(seed: int) -> int:
    """World seed of the validation captions (recipe tuning); their texts are also filtered against the others."""
    return 2_000_029 + seed


def set_threads(threads: int | None = None) -> int:
    """torch's threads for the demo: ``threads``, else one per core, whatever the machine's load.

    Not chosen by the load (it was, until 2026-12-03): training's reductions split by thread count, so the demo's
    numbers depend on it, and a run must not change its numbers because something else was running when it started.
    The stage markers record the count (:func:`stage_settings`). A busy machine runs the default slowly
    (oversubscribed OpenMP threads spin: a VAE step 23 s with 2 threads vs 4 s with 1 on a loaded 2-core box);
    ``--threads 1`` is faster there, with other numbers."""
    torch.set_num_threads(threads or max(1, os.cpu_count() or 1))
    return torch.get_num_threads()


def machine_busy() -> bool:
    """Is the load average at least the number of cores (other work is running)?"""
    return hasattr(os, "getloadavg") and os.getloadavg()[0] >= max(1, os.cpu_count() or 1)
