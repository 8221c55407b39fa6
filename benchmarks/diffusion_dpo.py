"""Diffusion-DPO on Tango-style models: the way Tango 2's script trains against mmpref's defaults, on CPU.

Both run through mmpref's engine and diffusion adapter, on 10 s clips in groups of 1 winner + K=3 losers, with the
same loss (dpo, beta 2000, v-prediction, w(t) = 1), batch and steps; only the settings that the comparison is about
differ:

* ``tango2`` (Tango 2's script): ``model.cache=false`` (every step reads the WAVs and recomputes the log-mel, the
  VAE posterior and the T5 encoding), ``model.grouped_forward=false`` (one UNet call per winner/loser pair, so the
  winner is re-encoded and re-denoised K times), a full float32 copy of the UNet as the reference.
* ``mmpref_lora``: cached latents and text encodings (built once before the run and reused, as across epochs and
  runs), the group denoised in one UNet call of 1+K members, LoRA on the UNet's attention projections with the
  adapter-disabled policy as the reference (one copy of the weights). Note: it trains the adapter, not every weight.
* ``mmpref_bf16``: cached and grouped, full fine-tuning like ``tango2``, reference a frozen bfloat16 copy.
* ``mmpref_fp32`` (ablation; full run, tiny preset only): cached and grouped with the same float32 reference as
  ``tango2``, to separate what caching + grouping buy from what the lighter reference buys.
* ``mmpref_lora_gc``: ``mmpref_lora`` with gradient checkpointing in the UNet (recomputes activations in the
  backward pass: less memory, about one more forward of compute).
* ``mmpref_lora_amp`` / ``mmpref_bf16_amp`` (GPU only): the two (b) variants with bf16 autocast
  (``run.mixed_precision=bf16``), the setting a GPU user would turn on; Tango 2's script trained in float32.

The floor (``--floor``): a diffusion-DPO step over groups of 1+K cannot cost less than a plain denoising training
step over the same 1+K latents plus one no-grad reference forward over them. ``floor`` jobs time exactly that (the
adapter's own inputs, the policy's MSE as the loss, clipping and AdamW, no DPO and no engine) for the
``mmpref_fp32`` and ``mmpref_lora`` settings, and ``DPO step / floor`` is reported beside them. A second floor job
runs the reference forward after the policy's instead of before it (mmpref's order), to show what that order costs
in peak memory.

Presets: ``tiny`` (mmpref's test preset) and ``mid``, the tiny layout scaled up by overriding the preset's config
(wider UNet with 3 levels and 2 layers per block, a larger T5 encoder and VAE), far smaller than ``tango`` (866M
UNet), so that it runs on a CPU in seconds per step. Each run is its own subprocess: peak memory is the process's
peak RSS minus its RSS once libraries are imported (models, optimizer, activations, data; not imports).

    python benchmarks/diffusion_dpo.py            # full run (about 10 minutes on a busy 2-core machine)
    python benchmarks/diffusion_dpo.py --quick    # smoke run: tiny preset, 2 s clips, few steps
    python benchmarks/diffusion_dpo.py --device cuda --presets tiny mid tango   # on a GPU; peaks = GPU memory

Writes ``benchmarks/results/diffusion_dpo[_gpu][_quick].json`` (after every run, so a cut-off run keeps what it
measured; a failed run is recorded under ``failures`` and the others go on). On a GPU the ``tango`` preset (the
real architecture, random weights) can run too, and peak memory is ``torch.cuda.max_memory_allocated`` over the
whole run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))  # benchmarks/ is not a package
from common import (  # noqa: E402
    StepClock,
    engine_step_clock,
    machine_info,
    memory_report,
    rss_bytes,
    spawn,
    versions,
)

from mmpref.io import write_json_atomic  # noqa: E402

BASELINE = "tango2"
GPU_ONLY = {"mmpref_lora_amp", "mmpref_bf16_amp"}  # bf16 autocast: slow on CPUs without bf16 matrix units
VARIANTS: dict[str, dict[str, Any]] = {
    "tango2": {"cache": False, "grouped_forward": False, "reference": {"mode": "copy", "dtype": None}, "lora": False},
    "mmpref_lora": {"cache": True, "grouped_forward": True, "reference": {"mode": "lora"}, "lora": True},
    "mmpref_bf16": {
        "cache": True,
        "grouped_forward": True,
        "reference": {"mode": "copy", "dtype": "bfloat16"},
        "lora": False,
    },
    "mmpref_fp32": {
        "cache": True,
        "grouped_forward": True,
        "reference": {"mode": "copy", "dtype": None},
        "lora": False,
    },
    "mmpref_lora_gc": {
        "cache": True,
        "grouped_forward": True,
        "reference": {"mode": "lora"},
        "lora": True,
        "gradient_checkpointing": True,
    },
    "mmpref_fp32_gc": {
        "cache": True,
        "grouped_forward": True,
        "reference": {"mode": "copy", "dtype": None},
        "lora": False,
        "gradient_checkpointing": True,
    },
    "mmpref_lora_amp": {
        "cache": True,
        "grouped_forward": True,
        "reference": {"mode": "lora"},
        "lora": True,
        "mixed_precision": "bf16",
    },
    "mmpref_bf16_amp": {
        "cache": True,
        "grouped_forward": True,
        "reference": {"mode": "copy", "dtype": "bfloat16"},
        "lora": False,
        "mixed_precision": "bf16",
    },
}
LABELS = {
    "tango2": "(a) Tango 2 way: recompute mel+VAE+T5, per-pair UNet calls, fp32 reference copy",
    "mmpref_lora": "(b) mmpref: cached, grouped, LoRA reference",
    "mmpref_bf16": "(b) mmpref: cached, grouped, bf16 reference copy",
    "mmpref_fp32": "ablation: cached, grouped, fp32 reference copy",
    "mmpref_lora_gc": "(b) mmpref: cached, grouped, LoRA reference, gradient checkpointing",
    "mmpref_fp32_gc": "ablation: cached, grouped, fp32 reference copy, gradient checkpointing",
    "mmpref_lora_amp": "(b) mmpref: cached, grouped, LoRA reference, bf16 autocast",
    "mmpref_bf16_amp": "(b) mmpref: cached, grouped, bf16 reference copy, bf16 autocast",
}


def mid_preset() -> dict[str, Any]:
    """The ``tiny`` preset's config, scaled up: a mid-size model that still trains on a CPU at 10 s clips.

    As in ``tiny``, no self-attention at the full-resolution UNet level (at 10 s that is 250 x 16 tokens).
    """
    from mmpref.models.tango.presets import preset_config

    cfg = preset_config("tiny")
    cfg["unet"].update(
        block_out_channels=[64, 128, 256],
        down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        layers_per_block=2,
        attention_head_dim=[2, 4, 8],
        cross_attention_dim=256,
        norm_num_groups=16,
    )
    cfg["vae"].update(block_out_channels=[32, 64, 128], layers_per_block=2, norm_num_groups=16)
    cfg["text_encoder"].update(d_model=256, d_kv=32, d_ff=1024, num_layers=6, num_heads=8)
    return cfg


@dataclass
class Settings:
    presets: list[str] = field(default_factory=lambda: ["tiny", "mid"])
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    ablation_presets: list[str] = field(default_factory=lambda: ["tiny"])  # where mmpref_fp32 runs
    duration_s: float = 10.0
    num_losers: int = 3
    batch_size: dict[str, int] = field(default_factory=lambda: {"tiny": 2, "mid": 1})  # groups per step
    steps: dict[str, int] = field(default_factory=lambda: {"tiny": 4, "mid": 3})
    warmup: int = 1
    beta: float = 2000.0
    lr: float = 1e-5
    lora_lr: float = 1e-4
    lora_r: int = 8
    seed: int = 0
    threads: int = 1  # torch threads per run (0: torch's default)
    device: str = "cpu"  # or "cuda": run.cpu=false, peaks measured on the GPU
    cudnn_benchmark: bool = False  # GPU: let cuDNN time its convolution algorithms (same for every variant)


QUICK = dict(
    presets=["tiny"],
    variants=["tango2", "mmpref_lora", "mmpref_bf16"],
    duration_s=2.0,
    batch_size={"tiny": 2},
    steps={"tiny": 3},
)
# On a GPU a step takes milliseconds to a second: more steps, more warm-up (cuDNN autotuning, allocator growth),
# the real architecture as a third preset, and the bf16-autocast variants.
GPU = dict(
    presets=["tiny", "mid", "tango"],
    variants=[*VARIANTS],
    ablation_presets=["tiny", "mid", "tango"],
    batch_size={"tiny": 2, "mid": 2, "tango": 1},
    steps={"tiny": 23, "mid": 13, "tango": 8},
    warmup=3,
    threads=0,
    device="cuda",
)


def preset_config_for(name: str) -> dict[str, Any]:
    from mmpref.models.tango.presets import preset_config

    return mid_preset() if name == "mid" else preset_config(name)


# ----- assets -------------------------------------------------------------------------------------------------------
def build_assets(work: Path, s: Settings) -> dict[str, Any]:
    """Per preset: a saved pipeline (random weights) and a preference set of 10 s tones (1 winner + K losers)."""
    import torch

    from mmpref.models.tango import TangoPipeline, presets
    from mmpref.models.tango.tokenizer import build_tiny_tokenizer
    from mmpref.toy.tones import make_tiny_preference_set

    groups = max(s.batch_size[p] * s.steps[p] for p in s.presets)
    data = make_tiny_preference_set(work / "data", n=groups, k=s.num_losers, duration_s=s.duration_s)
    out: dict[str, Any] = {"data": str(data), "groups": groups, "presets": {}}
    for name in s.presets:
        cfg = preset_config_for(name)
        tok = build_tiny_tokenizer()  # the real T5 vocabulary would only make the embedding table larger
        cfg["text_encoder"]["vocab_size"] = len(tok)
        torch.manual_seed(s.seed)
        pipe = TangoPipeline(
            text_encoder=presets.build_text_encoder(cfg["text_encoder"]),
            tokenizer=tok,
            unet=presets.build_unet(cfg["unet"]),
            vae=presets.build_vae(cfg["vae"]),
            vocoder=presets.build_vocoder(cfg["vocoder"], True),
            scheduler=presets.build_scheduler(cfg["scheduler"]),
        )
        path = work / f"pipeline-{name}"
        pipe.save_pretrained(path)
        count = lambda m: sum(p.numel() for p in m.parameters())
        out["presets"][name] = {
            "path": str(path),
            "parameters": {"unet": count(pipe.unet), "vae": count(pipe.vae), "text_encoder": count(pipe.text_encoder)},
            "latent_shape": list(pipe.latent_shape(s.duration_s)),
            "unet_config": {k: cfg["unet"][k] for k in ("block_out_channels", "layers_per_block", "down_block_types")},
        }
    return out


def train_config(preset: dict, variant: str, data: str, s: Settings, preset_name: str, out: Path) -> Any:
    from mmpref.config import config_from_dict

    v = VARIANTS[variant]
    raw = {
        "modality": "diffusion",
        "model": {
            "pipeline": preset["path"],
            "prediction_type": "v_prediction",
            "weighting": "none",
            "cfg_dropout": 0.1,
            "cache": v["cache"],
            "grouped_forward": v["grouped_forward"],
            "gradient_checkpointing": v.get("gradient_checkpointing", False),
        },
        "data": {"path": data, "duration_s": s.duration_s, "cache_dir": str(out.parent / f"cache-{preset_name}")},
        "reference": v["reference"],
        "lora": {"enabled": v["lora"], "r": s.lora_r, "alpha": 2 * s.lora_r},
        "loss": {"dpo": {"beta": s.beta}},
        "optim": {
            "lr": s.lora_lr if v["lora"] else s.lr,
            "scheduler": "constant",
            "warmup_steps": 0,
            "max_grad_norm": 1.0,
            "weight_decay": 0.0,
        },
        "run": {
            "batch_size": s.batch_size[preset_name],
            "max_steps": s.steps[preset_name],
            "cpu": s.device == "cpu",
            "mixed_precision": v.get("mixed_precision", "no"),
            "output_dir": str(out),
            "log_every": 1,
            "save_every": 10**9,
            "resume": False,
            "seed": s.seed,
            "num_workers": 0,
        },
    }
    return config_from_dict(raw, source="benchmarks/diffusion_dpo.py")


def flop_projection(cfg: dict[str, Any], duration_s: float, k: int, prompt_tokens: int = 24) -> dict[str, float]:
    """Forward FLOPs of each part, counted on the meta device (nothing is computed), and the (a)/(b) work ratio.

    Per group of 1 winner + K losers, counting a backward pass as twice the forward:
    (a) K pairs, each: 2 UNet members forward+backward, 2 reference forwards, 2 VAE encodes, 1 T5 encode;
    (b) 1+K UNet members forward+backward and 1+K reference forwards (VAE and T5 cached). This is the ceiling of
    what caching and grouping can buy when compute-bound, whatever the hardware.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from mmpref.models.tango import presets

    frames = round(duration_s * 100)  # 16 kHz, hop 160
    frames += -frames % 4
    text = dict(cfg["text_encoder"], vocab_size=cfg["text_encoder"]["vocab_size"] or 1024, dropout_rate=0.0)

    def count(fn: Any) -> float:
        with FlopCounterMode(display=False) as counter:
            fn()
        return float(counter.get_total_flops())

    with torch.device("meta"), torch.no_grad():
        unet, vae = presets.build_unet(cfg["unet"]), presets.build_vae(cfg["vae"])
        t5 = presets.build_text_encoder(text)
        latent = torch.randn(1, 8, frames // 4, 16)
        hidden = torch.randn(1, prompt_tokens, text["d_model"])
        u = count(lambda: unet(latent, torch.tensor([500]), encoder_hidden_states=hidden))
        v = count(lambda: vae.encode(torch.randn(1, 1, frames, 64)))
        t = count(lambda: t5(input_ids=torch.zeros(1, prompt_tokens, dtype=torch.long)))
    a = k * (2 * 3 * u + 2 * u + 2 * v + t)
    b = (1 + k) * (3 * u + u)
    return {
        "unet_forward_gflop_per_member": u / 1e9,
        "vae_encode_gflop_per_clip": v / 1e9,
        "t5_gflop_per_prompt": t / 1e9,
        "a_gflop_per_group": a / 1e9,
        "b_gflop_per_group": b / 1e9,
        "a_over_b": a / b,
    }


def flop_projections(s: Settings) -> dict[str, dict[str, float]]:
    """The projection for the measured presets and for the real ``tango`` architecture (too big to run here)."""
    names = ("tiny", "mid", "tango")
    return {name: flop_projection(preset_config_for(name), s.duration_s, s.num_losers) for name in names}


# ----- one run per subprocess ---------------------------------------------------------------------------------------
def worker(job: str, preset_name: str, variant: str, assets_file: str, settings_json: str, out: str) -> None:
    """``job``: ``cache`` (build the latent/text cache once) or ``train``; prints one JSON line."""
    s = Settings(**json.loads(settings_json))
    import diffusers  # noqa: F401
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401

    from mmpref.adapters.diffusion import DiffusionAdapter
    from mmpref.training import engine

    if s.threads:
        torch.set_num_threads(s.threads)
    if s.device == "cuda":
        torch.backends.cudnn.benchmark = s.cudnn_benchmark
        torch.cuda.init()  # so that the peak counters cover the whole run
        torch.cuda.reset_peak_memory_stats()
    assets = json.loads(Path(assets_file).read_text())
    cfg = train_config(assets["presets"][preset_name], variant, assets["data"], s, preset_name, Path(out))
    base = rss_bytes()
    started = time.perf_counter()
    if job == "cache":
        from accelerate import Accelerator

        DiffusionAdapter(cfg).setup(Accelerator(cpu=s.device == "cpu"))
        res: dict[str, Any] = {"cache_build_s": time.perf_counter() - started}
    elif job.startswith("floor"):
        res = {**floor_steps(cfg, s, preset_name, reference_first=job == "floor"), "final_loss": None}
    else:
        clock = StepClock()
        with engine_step_clock(clock):
            result = engine.train(cfg)
        res = {**clock.summary(s.warmup), "final_loss": result.metrics.get("loss")}
    res.update(memory_report(base), wall_s=time.perf_counter() - started, torch_threads=torch.get_num_threads())
    print(json.dumps(res))


def floor_steps(cfg: Any, s: Settings, preset_name: str, reference_first: bool) -> dict[str, float]:
    """The floor of one DPO step: denoising MSE of every group member as the loss (backward, clipping, AdamW) plus
    a no-grad reference forward over the same inputs, on the adapter's own batches, noise and timesteps."""
    import torch
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from mmpref.adapters.diffusion import DiffusionAdapter, _mse

    accelerator = Accelerator(cpu=s.device == "cpu")
    adapter = DiffusionAdapter(cfg)
    adapter.setup(accelerator)
    policy = adapter.policy.to(accelerator.device).train()
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.optim.lr)
    loader = DataLoader(adapter.train_dataset, batch_size=s.batch_size[preset_name], shuffle=True,
                        collate_fn=adapter.collate)
    clock = StepClock()
    batches = iter(loader)
    for _ in range(s.steps[preset_name]):
        batch = next(batches)
        cols = list(range(adapter._group_size(batch)))
        draws = adapter._draw(batch, len(cols), training=True)
        inputs = adapter.unet_inputs(batch, cols, draws)
        if reference_first:
            with torch.no_grad(), adapter._reference() as ref:
                _mse(ref, *inputs)
        loss = _mse(policy, *inputs).mean()
        if not reference_first:
            with torch.no_grad(), adapter._reference() as ref:
                _mse(ref, *inputs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        clock.tick()
    return clock.summary(s.warmup)


def run(job: str, preset: str, variant: str, assets_file: Path, s: Settings, work: Path) -> dict[str, Any]:
    """One job in its own subprocess; its output folder (the final checkpoint: ~10 GB for ``tango`` with full
    fine-tuning) is removed afterwards so that the runs of a preset do not fill the disk."""
    out = work / f"{preset}-{variant}"
    try:
        return spawn(__file__, [*worker_args(job, preset, variant, assets_file, s), str(out)], ROOT)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def worker_args(job: str, preset: str, variant: str, assets_file: Path, s: Settings) -> list[str]:
    return [
        "--worker",
        job,
        preset,
        variant,
        str(assets_file),
        json.dumps(asdict(s)),
    ]


# ----- report -------------------------------------------------------------------------------------------------------
def peak_mib(r: dict) -> float:
    """The peak that matters: GPU memory on a GPU run, else the process's RSS increase."""
    return r.get("peak_gpu_allocated_mib", r["peak_rss_delta_mib"])


def ratios(results: dict[str, dict[str, dict]]) -> dict[str, dict[str, dict]]:
    out: dict[str, dict[str, dict]] = {}
    for preset, runs in results.items():
        if BASELINE not in runs:  # the baseline failed: no ratios for this preset
            continue
        a = runs[BASELINE]
        for variant, r in runs.items():
            if variant == BASELINE:
                continue
            speed = r["steps_per_s"] / a["steps_per_s"]
            cpu = a["cpu_s_per_step"] / r["cpu_s_per_step"]
            mem = peak_mib(r) / peak_mib(a)
            out.setdefault(preset, {})[variant] = {
                "throughput_ratio": round(speed, 3),
                "cpu_time_ratio": round(cpu, 3),
                "peak_memory_ratio": round(mem, 3),
                # on a CPU both the wall-clock and the CPU-time ratio must reach 3x (the machine is shared); on a
                # GPU the process's CPU time is mostly spent waiting for kernels, so wall-clock alone counts
                "meets_target": bool(
                    min(speed, cpu if "peak_gpu_allocated_mib" not in r else speed) >= 3.0 and mem <= 0.6
                ),
            }
    return out


def table(report: dict) -> str:
    lines = [
        "| preset | variant | s/step (wall) | CPU s/step | peak MiB | speed vs (a): wall / CPU | memory vs (a) |",
        "|---|---|---|---|---|---|---|",
    ]
    for preset, runs in report["results"].items():
        for variant, r in runs.items():
            c = report["ratios"].get(preset, {}).get(variant)
            speed = f"{c['throughput_ratio']:.2f}x / {c['cpu_time_ratio']:.2f}x" if c else "1 / 1"
            mem = f"{c['peak_memory_ratio']:.2f}x" if c else "1"
            lines.append(
                f"| {preset} | {variant} | {r['s_per_step']:.2f} | {r['cpu_s_per_step']:.2f} | "
                f"{peak_mib(r):.0f} | {speed} | {mem} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny preset, 2 s clips, few steps (smoke test)")
    ap.add_argument("--presets", nargs="+", choices=["tiny", "mid", "tango"], help="tango: GPU only (866M UNet)")
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS))
    ap.add_argument("--threads", type=int, help="torch threads per run (0: torch's default; default 1 on CPU)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: GPU settings (see GPU above)")
    ap.add_argument("--cudnn-benchmark", action="store_true", help="GPU: cuDNN autotuning for every variant")
    ap.add_argument("--floor", action="store_true",
                    help="also time the floor (denoising step + no-grad reference forward) of mmpref_fp32 / _lora")
    ap.add_argument("--out", help="result JSON (default benchmarks/results/diffusion_dpo[_quick].json)")
    ap.add_argument("--worker", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(*args.worker)

    gpu = args.device == "cuda"
    s = Settings(**(GPU if gpu else {}))
    if args.quick:
        s = Settings(**{**asdict(s), **QUICK})
    s.presets = args.presets or s.presets
    s.variants = [v for v in args.variants or s.variants if gpu or v not in GPU_ONLY]
    s.threads = s.threads if args.threads is None else args.threads
    s.cudnn_benchmark = args.cudnn_benchmark
    if BASELINE not in s.variants:
        s.variants.insert(0, BASELINE)
    if "tango" in s.presets and not gpu:
        ap.error("the tango preset (866M UNet at 10 s clips) needs --device cuda")
    suffix = ("_gpu" if gpu else "") + ("_quick" if args.quick else "")
    out = Path(args.out or HERE / "results" / f"diffusion_dpo{suffix}.json")
    os.environ["HF_HUB_OFFLINE"] = "1"
    started, load0 = time.perf_counter(), os.getloadavg()[0]
    flops = flop_projections(s)
    results: dict[str, dict[str, dict]] = {}
    caches: dict[str, dict] = {}
    failures: dict[str, dict[str, str]] = {}
    floors: dict[str, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="mmpref-bench-diffusion-") as tmp:
        work = Path(tmp)
        assets = build_assets(work, s)
        assets_file = work / "assets.json"
        assets_file.write_text(json.dumps(assets))
        for preset in s.presets:
            print(
                f"{preset}: {assets['presets'][preset]['parameters']}, latent "
                f"{assets['presets'][preset]['latent_shape']}",
                flush=True,
            )
            caches[preset] = run("cache", preset, "mmpref_bf16", assets_file, s, work)
            for variant in s.variants:
                if variant in ("mmpref_fp32", "mmpref_fp32_gc") and preset not in s.ablation_presets:
                    continue
                try:
                    r = run("train", preset, variant, assets_file, s, work)
                except RuntimeError as err:  # recorded, and the other variants still run
                    failures.setdefault(preset, {})[variant] = str(err)[-2000:]
                    print(f"  {variant:>15}: FAILED (see 'failures' in the JSON)", flush=True)
                    continue
                results.setdefault(preset, {})[variant] = r
                print(
                    f"  {variant:>15}: {r['s_per_step']:.3f} s/step, peak {peak_mib(r):.0f} MiB",
                    flush=True,
                )
                report = make_report(args, s, assets, caches, results, flops, started, load0)
                report["failures"], report["floor"] = failures, floors
                write_json_atomic(out, report, indent=2)  # after every run: a cut-off run keeps what it measured
            for variant in ("mmpref_fp32", "mmpref_lora") if args.floor else ():
                if variant not in results.get(preset, {}):
                    continue
                dpo = results[preset][variant]
                first, after = (run(job, preset, variant, assets_file, s, work) for job in ("floor", "floor_after"))
                floors.setdefault(preset, {})[variant] = {
                    "floor": first, "floor_reference_after_policy": after,
                    "dpo_over_floor_wall": round(dpo["s_per_step"] / first["s_per_step"], 3),
                    "dpo_over_floor_cpu": round(dpo["cpu_s_per_step"] / first["cpu_s_per_step"], 3),
                    "peak_reference_after_over_first": round(peak_mib(after) / peak_mib(first), 3),
                    "target_max": 1.15,
                }
                f = floors[preset][variant]
                print(f"  {variant:>15}: DPO step / floor {f['dpo_over_floor_wall']:.2f}x wall, "
                      f"{f['dpo_over_floor_cpu']:.2f}x CPU; floor peak {peak_mib(first):.0f} MiB (reference first), "
                      f"{peak_mib(after):.0f} MiB (reference after the policy)", flush=True)
                report["floor"] = floors
                write_json_atomic(out, report, indent=2)
    print(table(report))
    for name, f in flops.items():
        print(f"{name}: (a)/(b) forward+backward FLOPs per group = {f['a_over_b']:.2f}")
    print(f"wrote {out}")


def make_report(
    args: argparse.Namespace,
    s: Settings,
    assets: dict[str, Any],
    caches: dict[str, dict],
    results: dict[str, dict[str, dict]],
    flops: dict[str, dict[str, float]],
    started: float,
    load0: float,
) -> dict[str, Any]:
    return {
        "benchmark": "diffusion_dpo",
        "quick": args.quick,
        "machine": machine_info(),
        "versions": versions(),
        "settings": asdict(s),
        "variants": {v: {**VARIANTS[v], "label": LABELS[v]} for v in s.variants},
        "models": {name: {k: v for k, v in p.items() if k != "path"} for name, p in assets["presets"].items()},
        "cache_build": caches,
        "results": results,
        "ratios": ratios(results),
        "flop_projection": flops,
        "targets": {"throughput_ratio_min": 3.0, "peak_memory_ratio_max": 0.6},
        "load_average_1m": {"start": load0, "end": os.getloadavg()[0]},
        "total_wall_s": round(time.perf_counter() - started, 1),
        "command": " ".join(["python benchmarks/diffusion_dpo.py", *sys.argv[1:]]),
    }


if __name__ == "__main__":
    main()
