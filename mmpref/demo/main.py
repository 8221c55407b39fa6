"""``mmpref demo``: the offline end-to-end demo (sound-event world by default, ``--modality text`` for the LLM one).

    mmpref demo [--quick] [--seeds N] [--scale F] [--out DIR] [--config YAML] [--modality audio|text]

Every stage is cached under ``--out`` (default ``demo_out/``); rerunning resumes after the last finished stage.
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict

from mmpref.errors import ConfigError
from mmpref.io import claim_folder, remove_owned
from mmpref.yaml_config import RECIPES, resolve_config

CONFIG_DIR = RECIPES
OWNER = "mmpref demo"
# what the audio demo writes at the top of --out (removed by --fresh; anything else there is left alone)
DEMO_ENTRIES = ("judge", "judge.done.json", "seed[0-9]*", "plots", "report.json", "report.md", ".*.tmp")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmpref demo", description=__doc__.splitlines()[0])
    p.add_argument("--modality", choices=("audio", "text"), default="audio")
    p.add_argument("--quick", action="store_true", help="tiny sizes for CI (a few minutes on a CPU)")
    p.add_argument("--seeds", type=int, default=1, help="run seeds 0..N-1 and report each")
    p.add_argument("--scale", type=float, default=1.0, help="multiply data sizes and training steps")
    p.add_argument("--out", default="demo_out", help="output folder (default demo_out/)")
    p.add_argument("--config", default=None, help="a demo YAML (default configs/demo.yaml or demo_quick.yaml)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: one per core). The numbers depend on it; on a busy machine 1 is "
                        "faster")
    p.add_argument("--fresh", action="store_true",
                   help="start over: delete what an earlier demo wrote in --out (nothing else) instead of resuming")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args, _ = _parser().parse_known_args(argv)
    if args.modality == "text":
        from mmpref.demo import text

        code = text.main(_without_modality(argv))
        return code if isinstance(code, int) else 0
    args = _parser().parse_args(argv)
    if args.seeds < 1 or args.scale <= 0 or (args.threads is not None and args.threads < 1):
        print("mmpref demo: --seeds and --threads must be >= 1 and --scale > 0", file=sys.stderr)
        return 2
    return run_audio_demo(args)


def _written_by_the_demo(entries: list[str]) -> bool:
    """A folder an earlier demo (before owner files) wrote: only its entries, and the text demo's default folder."""
    return all(e == "text" or any(fnmatch.fnmatch(e, p) for p in DEMO_ENTRIES) for e in entries)


def _without_modality(argv: list[str]) -> list[str]:
    """``argv`` minus ``--modality X`` / ``--modality=X`` (the text demo has its own parser)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--modality":
            skip = True
        elif not a.startswith("--modality="):
            out.append(a)
    return out


def run_audio_demo(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from mmpref.demo.pipeline import run_seed, stage_plan
    from mmpref.demo.report import target_words, write_report
    from mmpref.demo.stages import PROGRESS, DemoConfig, machine_busy, set_threads

    threads = set_threads(args.threads)
    config = resolve_config(args.config) if args.config else \
        CONFIG_DIR / ("demo_quick.yaml" if args.quick else "demo.yaml")
    if not config.is_file():
        raise ConfigError(f"--config: {config} does not exist; give a demo YAML or a packaged recipe name")
    cfg = DemoConfig.load(config).scaled(args.scale)
    out = claim_folder(args.out, OWNER, "--out", legacy=_written_by_the_demo)
    if args.fresh:
        kept = remove_owned(out, OWNER, DEMO_ENTRIES)
        if kept:
            print(f"mmpref demo: --fresh left {len(kept)} entries it did not write in {out}: {', '.join(kept[:5])}")
    mode = ("quick" if args.quick else "default") + (f", scale {args.scale:g}" if args.scale != 1 else "")
    print(f"mmpref demo ({mode}): config {config}, output {out}/, {threads} torch thread(s)")
    if machine_busy() and args.threads is None and threads > 1:
        print("mmpref demo: other work is running (load average >= cores): this run will be slow; --threads 1 runs "
              "faster on a busy machine, with other numbers (training's sums split by thread count)")
    results, timings = {}, {}
    PROGRESS.plan(stage_plan(cfg, args.seeds))
    for seed in range(cfg.seed, cfg.seed + args.seeds):
        start = time.perf_counter()
        results[seed] = run_seed(cfg, out, seed)
        timings[f"seed{seed}"] = round(time.perf_counter() - start, 1)
    report = write_report(out, results, asdict(cfg), timings, mode)
    claim = (f"the target, seeds: {target_words(report['target'], args.seeds)}" if report.get("target")
             else report["claim"])
    print(f"report: {out / 'report.md'} ({claim})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
