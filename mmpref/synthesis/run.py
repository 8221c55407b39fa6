"""``mmpref synth``: captions -> perturbed captions -> Tango audio -> CLAP scores -> filtered preference sets.

Work is split into shards of ``shard_size`` captions. A shard folder ``shards/shard_NNNNN/`` holds its audio, a
``records.jsonl`` (every candidate with its caption, strategy, seed, steps and scores) and, written last, a
``done.json`` with the settings fingerprint, the records' sha256 and every audio file's size. A shard counts as
finished only when all of those check out; anything else (a kill mid-shard, a truncated file) is deleted and
redone. Filters and K are applied at the merge, from the recorded scores, so changing thresholds re-merges without
regenerating audio. Processes (``accelerate launch``) take shards round-robin; the main process merges.

Outputs in ``output_dir``: ``dataset/`` (datasets ``save_to_disk``), ``grouped.jsonl`` (prompt, chosen,
rejected[K], strategy, ...), ``pairs.jsonl`` (Audio-Alpaca: prompt, chosen, rejected, strategy), ``candidates.jsonl``,
``settings.json``, ``report.json`` and ``scores.png``. Audio paths are relative to ``output_dir``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from mmpref.errors import DataError, RunFolderError, SourceError, writing_to
from mmpref.io import write_jsonl_atomic, write_text_atomic
from mmpref.sources import check_source
from mmpref.synthesis.config import SynthConfig, load_synth_config
from mmpref.synthesis.perturb import PERTURBATION_STRATEGIES, Perturbation, Perturber, RuleBasedPerturber
from mmpref.synthesis.shards import (
    DONE,
    MANIFEST,
    RECORDS,
    Shard,
    file_sha,
    plan_shards,
    settings_hash,
    shard_is_complete,
)

FORMAT_VERSION = 1

__all__ = ["SynthConfig", "SynthResult", "load_synth_config", "main", "read_captions", "run_synthesis"]


@dataclass
class SynthResult:
    """Where a run's outputs are (see the module docstring) and its report (as in ``report.json``)."""

    output_dir: Path
    dataset_dir: Path
    grouped_jsonl: Path
    pairs_jsonl: Path
    report: dict = field(default_factory=dict)
    report_json: Path | None = None
    histogram_png: Path | None = None


# ---------------------------------------------------------------------------------------------- inputs
def read_captions(path: str | os.PathLike) -> list[str]:
    """Captions from a text file (one per line, blank lines skipped) or jsonl (``caption`` field)."""
    return [c for _, c in read_caption_lines(path)]


def read_caption_lines(path: str | os.PathLike) -> list[tuple[int, str]]:
    """``(line number, caption)`` pairs of :func:`read_captions` (1-based lines, for error messages)."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"captions: {path} {'is a folder' if path.is_dir() else 'does not exist'}; give a text "
                          "file (one caption per line) or a .jsonl file with a 'caption' field")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"captions: cannot read {path}: {e}") from None
    if path.suffix.lower() != ".jsonl":
        return [(n, ln.strip()) for n, ln in enumerate(lines, start=1) if ln.strip()]
    out = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise DataError(f"{path}: line {n}: not valid JSON ({e})") from None
        cap = row.get("caption") if isinstance(row, dict) else None
        if not isinstance(cap, str) or not cap.strip():
            raise DataError(f"{path}: line {n}: needs a non-empty string field 'caption'")
        out.append((n, cap.strip()))
    return out


def check_captions(path: str | os.PathLike, lines: list[tuple[int, str]], parse_fn) -> None:
    """Refuse captions that name no sound event: their perturbations would be nonsense ("The the the and ...")."""
    from mmpref.synthesis.captions import soundless_events

    bad = [(n, c) for n, c in lines if soundless_events(parse_fn(c))]
    if bad:
        shown = "; ".join(f"line {n}: {c!r}" for n, c in bad[:3])
        raise DataError(f"captions {path}: {len(bad)} caption(s) name no sound event ({shown}"
                        f"{'; ...' if len(bad) > 3 else ''}); fix or remove them")


def generation_settings(cfg: SynthConfig, pipeline_id: str, scorer_ids: dict[str, dict]) -> dict:
    """Everything that changes a shard's audio or scores (not the filters or K: those apply at the merge)."""
    generation = asdict(cfg.generation)
    if not generation["shared_noise"]:  # added later: off, a run started before it existed still resumes
        del generation["shared_noise"]
    return {
        "version": FORMAT_VERSION,
        "pipeline": pipeline_id,
        "generation": generation,
        "strategies": list(cfg.strategies),
        "perturb": asdict(cfg.perturb),
        "scorers": scorer_ids,
        "audio_format": cfg.audio_format,
        "shard_size": cfg.shard_size,
        "mixed_precision": cfg.mixed_precision,
    }


# ---------------------------------------------------------------------------------------------- shards
def _seed(base: int, caption_index: int, role: int, j: int) -> int:
    """A per-candidate seed depending only on (base seed, caption, role, candidate): shard/process independent."""
    return int(np.random.SeedSequence([base, caption_index, role, j]).generate_state(1, np.uint64)[0] >> 1)


def build_candidates(cfg: SynthConfig, index: int, caption: str, perturber: Perturber,
                     parse_fn) -> list[dict]:
    """The original-caption samples and the perturbed captions of one caption (no audio yet)."""
    g = cfg.generation
    n_orig = g.samples_per_caption if "resample" in cfg.strategies else 1
    out = []
    for j in range(n_orig):
        steps = g.resample_steps[j % len(g.resample_steps)] if g.resample_steps else g.steps
        out.append({"id": f"c{index:06d}_o{j}", "role": "original", "text": caption, "strategy": "resample",
                    "operation": "sample", "detail": "", "steps": steps, "seed": _seed(g.seed, index, 0, j)})
    parse = parse_fn(caption)
    seen = {caption.lower()}
    perturbations: list[Perturbation] = []
    for strategy in PERTURBATION_STRATEGIES:
        if strategy in cfg.strategies:
            for p in perturber.perturb(parse, strategy, cfg.perturb.max_perturbations):
                if p.caption.lower() not in seen:
                    seen.add(p.caption.lower())
                    perturbations.append(p)
    for k, p in enumerate(perturbations):
        seed = _seed(g.seed, index, 0, 0) if g.shared_noise else _seed(g.seed, index, 1, k)
        out.append({"id": f"c{index:06d}_p{k}", "role": "perturbed", "text": p.caption, "strategy": p.strategy,
                    "operation": p.operation, "detail": p.detail, "steps": g.steps, "seed": seed})
    for c in out:
        c.update(caption_index=index, prompt=caption)
    return out


class _Models:
    """The pipeline and scorers, loaded on first use (a finished run merges without loading any model)."""

    def __init__(self, cfg: SynthConfig, pipeline, scorers, device):
        self.cfg, self._pipeline, self._scorers, self.device = cfg, pipeline, scorers, device

    @property
    def pipeline(self):
        if self._pipeline is None:
            self._pipeline = load_pipeline(self.cfg)
            dtype = {"no": None, "fp16": "float16", "bf16": "bfloat16"}[self.cfg.mixed_precision]
            import torch

            if dtype:
                self._pipeline.to(self.device, getattr(torch, dtype))
            elif str(self.device) != "cpu":
                self._pipeline.to(self.device)
        return self._pipeline

    @property
    def scorers(self) -> dict:
        if self._scorers is None:
            self._scorers = load_scorers(self.cfg, self.device)
        return self._scorers


def load_pipeline(cfg: SynthConfig):
    from mmpref.models.pipelines import pipeline_from_preset, pipeline_from_pretrained

    if cfg.pipeline.startswith("preset:"):
        return pipeline_from_preset(cfg.pipeline.split(":", 1)[1], tokenizer=cfg.tokenizer)
    return pipeline_from_pretrained(cfg.pipeline, tokenizer=cfg.tokenizer)


def load_scorers(cfg: SynthConfig, device) -> dict:
    from mmpref.scoring import ClapScorer
    from mmpref.synthesis.vocabulary import DEFAULT_VOCABULARY
    from mmpref.toy.clap import tiny_clap_scorer

    out = {}
    for name, sc in cfg.scorers.items():
        if sc.path.startswith("preset:tiny"):
            seed = int(sc.path.split(":")[2]) if sc.path.count(":") == 2 else 0
            texts = [p for phrases in DEFAULT_VOCABULARY.values() for p in phrases]  # its tokenizer's corpus
            out[name] = tiny_clap_scorer(seed, texts, device=device, crop=sc.crop, batch_size=sc.batch_size)
        else:
            out[name] = ClapScorer(sc.path, device=device, crop=sc.crop, batch_size=sc.batch_size)
    return out


def _generate(pipeline, cfg: SynthConfig, cands: list[dict]) -> dict[str, np.ndarray]:
    """Audio for every candidate, batched per step count; each sample seeded by its own generator."""
    import torch

    g = cfg.generation
    waves: dict[str, np.ndarray] = {}
    by_steps: dict[int, list[dict]] = {}
    for c in cands:
        by_steps.setdefault(c["steps"], []).append(c)
    # a shard of a real config takes minutes: show it clip by clip, under the shard bar
    bar = tqdm(total=len(cands), desc="  clips of this shard", unit="clip", leave=False)
    for steps, group in sorted(by_steps.items()):
        for s in range(0, len(group), g.batch_size):
            batch = group[s: s + g.batch_size]
            gens = [torch.Generator().manual_seed(c["seed"]) for c in batch]
            audio = pipeline([c["text"] for c in batch], duration_s=g.duration_s, num_inference_steps=steps,
                             guidance_scale=g.guidance_scale, generator=gens, batch_size=len(batch))
            waves.update({c["id"]: a for c, a in zip(batch, audio)})
            bar.update(len(batch))
    bar.close()
    return waves


def process_shard(cfg: SynthConfig, shard: Shard, captions: list[str], shard_dir: Path, models: _Models,
                  perturber: Perturber, parse_fn) -> None:
    """Generate, score and record one shard; ``done.json`` is written last (atomically)."""
    from mmpref.audio import save_audio

    t0 = time.perf_counter()
    if shard_dir.exists():
        shutil.rmtree(shard_dir)  # a partial or stale shard: start it over
    shard_dir.mkdir(parents=True)
    cands = [c for i in range(shard.start, shard.end)
             for c in build_candidates(cfg, i, captions[i], perturber, parse_fn)]
    pipeline = models.pipeline
    waves = _generate(pipeline, cfg, cands)
    sr = pipeline.mel_config.sample_rate
    for name, scorer in models.scorers.items():
        scores = np.asarray(scorer([c["prompt"] for c in cands], [waves[c["id"]] for c in cands], sr),
                            dtype=np.float64).reshape(-1)
        if scores.shape != (len(cands),):
            raise DataError(f"scorer {name!r} returned {scores.size} scores for {len(cands)} clips; it must return "
                            "one number per clip")
        bad = np.flatnonzero(~np.isfinite(scores))
        if bad.size:
            c = cands[bad[0]]
            raise DataError(f"scorer {name!r} returned {scores[bad[0]]} for the clip of {c['text']!r} (caption "
                            f"{c['prompt']!r}; {bad.size} non-finite score(s) in {shard.name}); a scorer must "
                            "return finite numbers")
        for c, v in zip(cands, scores):
            c.setdefault("scores", {})[name] = float(v)
    sizes = {}
    for c in cands:
        rel = f"audio/{c['id']}.{cfg.audio_format}"
        save_audio(shard_dir / rel, waves[c["id"]], sr)
        sizes[rel] = (shard_dir / rel).stat().st_size
        c["audio"] = f"shards/{shard.name}/{rel}"
        c["sample_rate"] = sr
    write_jsonl_atomic(shard_dir / RECORDS, cands, sort_keys=True)
    done = {"fingerprint": shard.fingerprint, "records_sha256": file_sha(shard_dir / RECORDS),
            "audio_sizes": sizes, "captions": shard.end - shard.start, "candidates": len(cands),
            "elapsed_s": time.perf_counter() - t0}
    write_text_atomic(shard_dir / DONE, json.dumps(done, indent=1))


# ---------------------------------------------------------------------------------------------- entry point
def run_synthesis(cfg: SynthConfig, pipeline=None, scorers: dict | None = None,
                  perturber: Perturber | None = None) -> SynthResult:
    """Run (or resume) a synthesis; see the module docstring. ``pipeline``/``scorers`` given as objects replace
    the config's paths (their identity for the fingerprint is their ``describe()`` / class name)."""
    cfg.validate()
    out = Path(cfg.output_dir)
    with writing_to(out):
        return _run_synthesis(cfg, out, pipeline, scorers, perturber)


def _run_synthesis(cfg: SynthConfig, out: Path, pipeline, scorers, perturber) -> SynthResult:
    from mmpref.scoring import describe_scorer
    from mmpref.scoring.clap import weights_fingerprint
    from mmpref.synthesis.merge import finish_publish
    from mmpref.synthesis.vocabulary import Vocabulary

    state = _process_state(cfg)
    _check_sources(cfg, pipeline, scorers)
    lines = read_caption_lines(cfg.captions)[: cfg.max_captions]
    if not lines:
        raise DataError(f"captions: {cfg.captions} has no captions")
    captions = [c for _, c in lines]
    if scorers is not None and set(scorers) != set(cfg.scorers):
        raise ValueError(f"scorers given {sorted(scorers)} must match the config's scorers {sorted(cfg.scorers)} "
                         "(the config holds their filter thresholds)")
    vocabulary = Vocabulary.load(cfg.perturb.vocabulary)
    check_captions(cfg.captions, lines, lambda c: parse_caption_with(vocabulary, c))
    perturber = perturber or perturber_for(cfg, vocabulary)
    pipeline_id = cfg.pipeline if pipeline is None else f"in-memory {type(pipeline).__name__} " + \
        weights_fingerprint(*pipeline._modules().values())
    if pipeline is not None and hasattr(pipeline.vocoder, "to_dict"):  # Griffin-Lim: settings, not weights
        pipeline_id += f" vocoder {pipeline.vocoder.to_dict()}"
    scorer_ids = ({n: describe_scorer(s) for n, s in scorers.items()} if scorers is not None
                  else {n: {"path": s.path, "crop": s.crop} for n, s in cfg.scorers.items()})
    settings = generation_settings(cfg, pipeline_id, scorer_ids)
    settings["perturber"] = type(perturber).__name__
    shards = plan_shards(captions, cfg.shard_size, settings_hash(settings))
    if state.is_main_process:
        finish_publish(out)  # a merge killed while publishing: complete it (or drop its unfinished staging)
    state.wait_for_everyone()
    _check_manifest(out, settings, shards, state)

    device = cfg.device or str(state.device)
    models = _Models(cfg, pipeline, scorers, device)
    t0 = time.perf_counter()
    mine = [s for s in shards if s.index % state.num_processes == state.process_index]
    done_now = []
    todo = [s for s in mine if not shard_is_complete(out / "shards" / s.name, s)]
    with _all_ranks_fail_together(state, out, "generation"):
        for shard in tqdm(todo, desc=f"synth shards (rank {state.process_index})", unit="shard",
                          disable=not todo, position=state.process_index):
            process_shard(cfg, shard, captions, out / "shards" / shard.name, models, perturber,
                          lambda c: parse_caption_with(vocabulary, c))
            done_now.append(shard.index)
        write_text_atomic(out / "progress" / f"rank{state.process_index}.json",
                          json.dumps({"rank": state.process_index, "world": state.num_processes, "shards": done_now,
                                      "wall_s": time.perf_counter() - t0}))
    with _all_ranks_fail_together(state, out, "merge"):
        if state.is_main_process:
            from mmpref.synthesis.merge import merge

            merge(cfg, out, shards, settings, scorer_ids, perturber, wall_s=time.perf_counter() - t0)
    report = json.loads((out / "report.json").read_text())
    return SynthResult(out, out / "dataset", out / "grouped.jsonl", out / "pairs.jsonl", report,
                       out / "report.json", out / "scores.png")


def _check_sources(cfg: SynthConfig, pipeline, scorers) -> None:
    """Every path the run will load exists, before any audio is generated."""
    if pipeline is None and not cfg.pipeline.startswith("preset:"):
        check_source(cfg.pipeline, "pipeline", "a TangoPipeline / AudioLDM2Pipeline folder or preset:NAME")
    if scorers is None:
        for name, sc in cfg.scorers.items():
            if not sc.path.startswith("preset:"):
                check_source(sc.path, f"scorers.{name}.path", "a CLAP checkpoint folder or preset:tiny")


@contextmanager
def _all_ranks_fail_together(state, out: Path, stage: str):
    """Run the block, then meet at a barrier; if any rank failed, every rank raises (instead of the others
    waiting forever at the next barrier). A failing rank leaves a note in ``progress/``."""
    note = out / "progress" / f"failed_{stage}_rank{state.process_index}.txt"
    try:
        yield
    except BaseException as err:
        write_text_atomic(note, f"{type(err).__name__}: {err}")
        if state.num_processes > 1:
            state.wait_for_everyone()
        raise
    state.wait_for_everyone()
    failed = sorted((out / "progress").glob(f"failed_{stage}_rank*.txt"))
    if failed:
        raise RuntimeError(f"synthesis {stage} failed on another process: {failed[0].read_text()} "
                           f"(see {failed[0]}); run the same command again to resume")


@dataclass
class _SingleProcess:
    """The one-process stand-in for accelerate's PartialState: a plain ``run_synthesis`` call must not pin the
    global accelerate state (a later ``Accelerator(cpu=True)`` in the same process would be refused)."""

    device: str
    process_index: int = 0
    num_processes: int = 1
    is_main_process: bool = True

    def wait_for_everyone(self) -> None:
        pass


def _process_state(cfg: SynthConfig):
    """accelerate's PartialState under a distributed launcher (WORLD_SIZE > 1), else :class:`_SingleProcess`."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import PartialState

        return PartialState(cpu=_use_cpu(cfg))
    return _SingleProcess("cpu" if _use_cpu(cfg) else "cuda")


def _use_cpu(cfg: SynthConfig) -> bool:
    """CPU processes (gloo) when asked (device=cpu, ACCELERATE_USE_CPU=1) or when there is no GPU: PartialState
    only forms a multi-process CPU group when told ``cpu=True``."""
    import torch
    from accelerate.utils import parse_flag_from_env

    return cfg.device == "cpu" or parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available()


def parse_caption_with(vocabulary, caption: str):
    from mmpref.synthesis.captions import parse_caption

    return parse_caption(caption, vocabulary.nouns)


def perturber_for(cfg: SynthConfig, vocabulary) -> Perturber:
    """The config's perturber: the rules, or a local LLM validated against the parse (rules as its fallback)."""
    llm = cfg.perturb.llm
    if llm is None:
        return RuleBasedPerturber(vocabulary, cfg.perturb.seed)
    from mmpref.synthesis.perturb import DEFAULT_LLM_PROMPT, LLMPerturber

    return LLMPerturber(llm.path, llm.prompt or DEFAULT_LLM_PROMPT, llm.max_new_tokens, llm.temperature,
                        llm.num_samples, cfg.perturb.seed, "rules" if llm.fallback_to_rules else None, vocabulary)


def _check_manifest(out: Path, settings: dict, shards: list[Shard], state) -> None:
    """Refuse to mix runs: an existing manifest must describe the same settings and captions."""
    manifest = {"settings": settings, "settings_sha256": settings_hash(settings),
                "shards": [asdict(s) for s in shards]}
    path = out / MANIFEST
    foreign = [p.name for p in out.iterdir() if not p.name.startswith(".")] if out.is_dir() else []
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"output_dir: {out} is a file; give a folder for the synthesis run")
    if foreign and not path.exists():
        raise RunFolderError(f"output_dir: {out} is not empty ({', '.join(sorted(foreign)[:3])}"
                             f"{', ...' if len(foreign) > 3 else ''}) and holds no synthesis run; give a new or "
                             "empty folder (nothing there is touched)")
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = None
        if old is not None and old.get("settings_sha256") != manifest["settings_sha256"]:
            changed = sorted(k for k in settings if old.get("settings", {}).get(k) != settings[k])
            raise RunFolderError(f"output_dir: {out} holds a synthesis run with different settings (changed: "
                                 f"{changed}); use a new output_dir, or move the old one away")
    state.wait_for_everyone()
    if state.is_main_process:
        write_text_atomic(path, json.dumps(manifest, indent=1, default=str))
        shutil.rmtree(out / "progress", ignore_errors=True)  # per-rank notes of the previous invocation
    state.wait_for_everyone()


def main(argv: Sequence[str] | None = None) -> int:
    """``mmpref synth CONFIG [key=value ...]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: mmpref synth CONFIG [key=value ...]\n\n"
              "Generate a synthetic audio preference set (configs/synth_*.yaml): perturb captions, generate audio\n"
              "with a Tango pipeline, rank with CLAP, filter. Resumes in output_dir; multi-process:\n"
              "accelerate launch -m mmpref.cli synth CONFIG")
        return 0 if argv else 2
    result = run_synthesis(load_synth_config(argv[0], argv[1:]))
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    r = result.report
    print(f"done: {r['pairs']} pairs ({r['pairs_per_strategy']}), {r['grouped_rows']} grouped rows; "
          f"acceptance {r['acceptance']['rate']:.1%}; {r['throughput']['captions_per_s']:.2f} captions/s\n"
          f"dataset: {result.dataset_dir}\ngrouped: {result.grouped_jsonl}\npairs: {result.pairs_jsonl}\n"
          f"report: {result.report_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
