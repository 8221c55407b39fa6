"""One Tango-size UNet step on a GPU in float32, bfloat16 weights and bf16 autocast, with cuDNN autotuning off/on.

Why: in ``diffusion_dpo.py --device cuda`` the bf16 reference copy and bf16 autocast were *slower* than float32 on an
H100. This isolates the UNet (no adapter, no engine) to see whether the convolutions' algorithm choice is the cause.

    python benchmarks/unet_precision.py     # needs a GPU; writes benchmarks/results/unet_precision_gpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine_info, versions  # noqa: E402

from mmpref.io import write_json_atomic  # noqa: E402


def time_call(fn, iters: int, warmup: int = 3) -> float:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


def measure(unet, mode: str, members: int, frames: int, iters: int) -> dict[str, float]:
    import torch

    dev = "cuda"
    weights = torch.bfloat16 if mode == "bf16_weights" else torch.float32
    unet.to(weights)
    x = torch.randn(members, 8, frames, 16, device=dev, dtype=weights)
    h = torch.randn(members, 24, unet.config.cross_attention_dim, device=dev, dtype=weights)
    t = torch.randint(0, 1000, (members,), device=dev)
    amp = torch.autocast("cuda", torch.bfloat16, enabled=mode == "bf16_autocast")

    def forward() -> None:
        with torch.no_grad(), amp:
            unet(x, t, encoder_hidden_states=h)

    def train_step() -> None:
        with amp:
            out = unet(x, t, encoder_hidden_states=h).sample
        out.float().square().mean().backward()

    res = {"forward_s": time_call(forward, iters)}
    if mode != "bf16_weights":  # bf16 weights are the frozen reference: forward only
        res["forward_backward_s"] = time_call(train_step, iters)
        unet.zero_grad(set_to_none=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--members", type=int, default=4, help="UNet batch (1 winner + K=3 losers)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--out", default=str(HERE / "results" / "unet_precision_gpu.json"))
    args = ap.parse_args()
    import torch

    from mmpref.models.tango import presets

    torch.manual_seed(0)
    unet = presets.build_unet(presets.preset_config("tango")["unet"]).cuda()
    frames = 250  # 10 s clip: 1000 mel frames / 4
    results = {}
    for cudnn_benchmark in (False, True):
        torch.backends.cudnn.benchmark = cudnn_benchmark
        for mode in ("fp32", "bf16_weights", "bf16_autocast"):
            key = f"{mode}/cudnn_benchmark={cudnn_benchmark}"
            results[key] = measure(unet, mode, args.members, frames, args.iters)
            print(key, {k: round(v * 1000, 1) for k, v in results[key].items()}, "ms", flush=True)
    report = {
        "benchmark": "unet_precision",
        "machine": machine_info(),
        "versions": versions(),
        "settings": {
            **vars(args),
            "frames": frames,
            "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
            "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        },
        "results_s": results,
    }
    write_json_atomic(Path(args.out), report, indent=2)
    print(json.dumps(report["settings"]))


if __name__ == "__main__":
    main()
