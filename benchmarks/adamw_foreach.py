"""The engine's AdamW step on the audio demo's UNet: torch's per-tensor loop (its CPU default) vs foreach, in one run.

Why: a profile of the audio demo's training stages put ~7% of each step in ``_single_tensor_adam``: the UNet has
208 small tensors and torch loops over them in Python on a CPU (it picks foreach only for CUDA tensors). The engine
now asks for foreach; the updates must not change (checked here after every timed block, and in
tests/test_engine.py).

    python benchmarks/adamw_foreach.py [--steps 200] [--repeats 3]
        # writes benchmarks/results/adamw_foreach_cpu.json
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


def main() -> None:
    import torch

    from mmpref.config import OptimConfig
    from mmpref.demo.pipeline import demo_unet
    from mmpref.demo.stages import DemoConfig, set_threads
    from mmpref.training.engine import _adamw
    from mmpref.yaml_config import RECIPES

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(HERE / "results" / "adamw_foreach_cpu.json"))
    args = p.parse_args()

    threads = set_threads()
    cfg = DemoConfig.load(RECIPES / "demo.yaml")
    models = {mode: demo_unet(1, cfg.unet_channels) for mode in ("per-tensor", "foreach")}
    optims = {}
    for mode, model in models.items():
        opt = _adamw(model, OptimConfig(lr=cfg.align.lr, weight_decay=0.01))
        for group in opt.param_groups:
            group["foreach"] = mode == "foreach"
        optims[mode] = opt
    gen = torch.Generator().manual_seed(0)
    grads = [[torch.randn(p.shape, generator=gen) for p in models["foreach"].parameters()] for _ in range(8)]

    def steps(mode: str) -> None:
        for i in range(args.steps):
            for p, g in zip(models[mode].parameters(), grads[i % len(grads)]):
                p.grad = g
            optims[mode].step()

    results = []
    for _ in range(args.repeats):
        for mode in models:
            _, wall, cpu = timed(steps, mode)
            results.append({"mode": mode, "seconds": wall, "cpu_seconds": cpu, "ms_per_step": 1e3 * wall / args.steps})
        same = all(torch.equal(a, b) for a, b in zip(models["per-tensor"].parameters(),
                                                     models["foreach"].parameters()))
        results[-1]["bitwise_equal_to_per_tensor"] = results[-2]["bitwise_equal_to_per_tensor"] = same
    per = [r["seconds"] for r in results if r["mode"] == "per-tensor"]
    fe = [r["seconds"] for r in results if r["mode"] == "foreach"]
    result = {"steps": args.steps, "tensors": len(grads[0]), "torch_threads": threads, "runs": results,
              "speedup_foreach": sum(per) / sum(fe), "machine": machine_info(), "versions": versions()}
    write_json_atomic(Path(args.out), result)
    print(json.dumps({"speedup_foreach": result["speedup_foreach"], "runs": results}, indent=1))


if __name__ == "__main__":
    main()
