"""Sampling throughput of the audio demo's tiny pipeline at several batch sizes, in one run.

Why: the demo's evaluation draws 64 captions x 8 samples from every model (and the synth and the online rounds draw
more); on a 2-core CPU the UNet of 0.25 M parameters is dominated by per-operator overhead, so the batch size may
matter more than the arithmetic. The samples do not depend on the batch size (each is seeded by its index), which
the script checks while it times.

    python benchmarks/demo_sampling.py [--pipeline DIR] [--prompts 64] [--batch-sizes 16 64 128]
        # DIR: a demo pipeline folder (e.g. demo_out/seed0/unet_sft/final); default: the demo's untrained layout
        # writes benchmarks/results/demo_sampling_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine_info, timed, versions  # noqa: E402

from mmpref.io import write_json_atomic  # noqa: E402


def untrained_demo_pipeline():
    """The demo's pipeline layout (its UNet channels, VAE, DDIM, Griffin-Lim) with random weights."""
    from diffusers import DDIMScheduler

    from mmpref.audio import GriffinLimVocoder
    from mmpref.demo.pipeline import GRIFFIN_LIM_ITERS, demo_unet, demo_vae
    from mmpref.demo.stages import DemoConfig
    from mmpref.models.tango import TangoPipeline
    from mmpref.yaml_config import RECIPES

    cfg = DemoConfig.load(RECIPES / "demo.yaml")
    pipe = TangoPipeline.from_preset("tiny", seed=1)
    pipe.unet, pipe.vae = demo_unet(1, cfg.unet_channels), demo_vae(1)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.vocoder = GriffinLimVocoder(pipe.mel_config, n_iter=GRIFFIN_LIM_ITERS)
    return pipe, cfg


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pipeline", default=None)
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64, 128])
    p.add_argument("--out", default=str(HERE / "results" / "demo_sampling_cpu.json"))
    args = p.parse_args()

    from mmpref.demo.pipeline import load_demo_pipeline
    from mmpref.demo.stages import DemoConfig, set_threads
    from mmpref.yaml_config import RECIPES

    threads = set_threads()
    if args.pipeline:
        pipe, cfg = load_demo_pipeline(args.pipeline), DemoConfig.load(RECIPES / "demo.yaml")
    else:
        pipe, cfg = untrained_demo_pipeline()
    prompts = [f"a bell rings, then a dog-like bark {i}" for i in range(args.prompts)]

    def sample(batch_size: int) -> torch.Tensor:
        return pipe(prompts, duration_s=cfg.duration_s, num_inference_steps=cfg.generation.steps,
                    guidance_scale=cfg.generation.guidance_scale, seed=0, batch_size=batch_size, output_type="mel")

    sample(args.batch_sizes[0])  # warm-up: first-call allocations and kernel selection
    rows, first = [], None
    for bs in args.batch_sizes:
        mels, wall, cpu = timed(sample, bs)
        first = mels if first is None else first
        rows.append({"batch_size": bs, "seconds": wall, "cpu_seconds": cpu,
                     "samples_per_s": len(prompts) / wall,
                     "max_abs_diff_vs_first": float((mels - first).abs().max())})
    base = rows[0]["seconds"]
    for r in rows:
        r["speedup_vs_first"] = base / r["seconds"]
    result = {"prompts": len(prompts), "steps": cfg.generation.steps, "guidance_scale": cfg.generation.guidance_scale,
              "pipeline": args.pipeline or "untrained demo layout", "torch_threads": threads, "rows": rows,
              "machine": machine_info(), "versions": versions()}
    write_json_atomic(Path(args.out), result)
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
