"""mmpref's per-step online DPO against TRL's OnlineDPOTrainer: the same tiny Llama, the same reward model, the same
generation settings, each side in its own subprocess (clean peak memory).

Per optimizer step both sides take B prompts, sample 2 completions per prompt from the current policy
(``max_new_tokens``, temperature, no top-p), score them with the reward model (a Llama sequence classifier with
one output), make (best, worst) pairs and take a DPO step against a frozen copy of the starting policy.

* throughput: prompts per second over the steps after a warm-up (wall clock and process CPU time), stamped at the
  end of every optimizer step (mmpref: a hook on the engine's per-step log; TRL: a ``TrainerCallback``);
* peak memory: peak RSS minus the RSS once the libraries are imported.

Settings are equal on both sides: float32, no gradient checkpointing, torch AdamW, constant LR, clipping at 1.0,
no checkpoints inside the timed steps, no EOS penalty, one torch thread (``--threads``).

    python benchmarks/online_dpo.py            # about 2 minutes on a quiet 2-core machine
    python benchmarks/online_dpo.py --quick    # a smoke run

Needs TRL (``pip install -e .[bench]``); writes ``benchmarks/results/online_dpo[_quick].json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))  # noqa: E402  (benchmarks/ is not a package)
from common import StepClock, engine_step_clock, machine_info, memory_report, rss_bytes, spawn, versions  # noqa: E402

from mmpref.io import write_json_atomic  # noqa: E402

SIDES = ("mmpref", "trl")


@dataclass
class Settings:
    batch_size: int = 8  # prompts per optimizer step (2 completions each)
    steps: int = 20
    warmup: int = 1
    hidden_size: int = 128
    intermediate_size: int = 344
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vocab_size: int = 4096
    prompt_tokens: tuple[int, int] = (24, 40)
    max_new_tokens: int = 32
    temperature: float = 0.9
    lr: float = 1e-5
    beta: float = 0.1
    seed: int = 0
    threads: int = 1


QUICK = dict(batch_size=4, steps=3, hidden_size=64, intermediate_size=128, vocab_size=1024, max_new_tokens=16)


def build_assets(work: Path, s: Settings) -> dict[str, Any]:
    """A tokenizer, a random Llama (policy start), a random one-output Llama classifier (reward model), prompts."""
    import torch
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    from mmpref.toy.llm import tiny_llama_config, train_tokenizer

    rng = random.Random(s.seed)
    lexicon = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 8))) for _ in range(2000)]
    tok = train_tokenizer([" ".join(rng.choices(lexicon, k=200)) for _ in range(300)], vocab_size=s.vocab_size)
    prompts = []
    for _ in range(s.batch_size * s.steps):
        n = rng.randint(*s.prompt_tokens)
        prompts.append({"prompt": " ".join(rng.choices(lexicon, k=max(1, n // 2))) + ":"})
    data = work / "prompts.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    kw = dict(hidden_size=s.hidden_size, intermediate_size=s.intermediate_size, num_hidden_layers=s.layers,
              num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, max_position_embeddings=512)
    torch.manual_seed(s.seed)
    policy = LlamaForCausalLM(tiny_llama_config(len(tok), **kw))
    policy.save_pretrained(work / "model")
    tok.save_pretrained(work / "model")
    torch.manual_seed(s.seed + 1)
    rm = LlamaForSequenceClassification(tiny_llama_config(len(tok), num_labels=1, **kw))
    rm.save_pretrained(work / "reward")
    tok.save_pretrained(work / "reward")
    stats = {"parameters": sum(p.numel() for p in policy.parameters()), "vocab_size": len(tok),
             "prompts": len(prompts)}
    return {"paths": {"model": str(work / "model"), "reward": str(work / "reward"), "prompts": str(data)},
            "stats": stats}


def _import_common() -> None:
    import accelerate  # noqa: F401
    import datasets  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401


def run_mmpref(paths: dict, s: Settings, out: Path) -> dict[str, Any]:
    import mmpref.training.engine as engine
    from mmpref.config import config_from_dict

    raw = {
        "modality": "llm",
        "model": {"path": paths["model"], "torch_dtype": "float32"},
        "data": {"max_length": 512},
        "reference": {"mode": "copy"},
        "loss": {"dpo": {"beta": s.beta}},
        "online": {"prompts": paths["prompts"], "schedule": "step", "samples": 2, "builder": "best_vs_worst",
                   "judge": {"kind": "reward_model", "path": paths["reward"], "batch_size": 2 * s.batch_size},
                   "generation": {"max_new_tokens": s.max_new_tokens, "temperature": s.temperature}},
        "optim": {"lr": s.lr, "scheduler": "constant", "warmup_steps": 0, "max_grad_norm": 1.0, "weight_decay": 0.0},
        "run": {"batch_size": s.batch_size, "max_steps": s.steps, "cpu": True, "output_dir": str(out),
                "log_every": 1, "save_every": 10**9, "seed": s.seed},
    }
    clock = StepClock()
    with engine_step_clock(clock):
        engine.train(config_from_dict(raw, source="benchmarks/online_dpo.py"))
    return prompts_per_s(clock, s)


def run_trl(paths: dict, s: Settings, out: Path) -> dict[str, Any]:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    clock = StepClock()

    class StepTimer(TrainerCallback):
        def on_step_end(self, *a, **k):
            clock.tick()

    load = lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32, attn_implementation="sdpa")
    tok = AutoTokenizer.from_pretrained(paths["model"])
    args = OnlineDPOConfig(
        output_dir=str(out), per_device_train_batch_size=s.batch_size, max_steps=s.steps, learning_rate=s.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
        logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, bf16=False, fp16=False,
        gradient_checkpointing=False, max_new_tokens=s.max_new_tokens, temperature=s.temperature, beta=s.beta,
        loss_type="sigmoid", seed=s.seed, dataloader_num_workers=0, disable_tqdm=True, max_length=512,
    )
    trainer = OnlineDPOTrainer(
        model=load(paths["model"]), ref_model=load(paths["model"]),
        reward_funcs=AutoModelForSequenceClassification.from_pretrained(paths["reward"], dtype=torch.float32),
        args=args, train_dataset=load_dataset("json", data_files=paths["prompts"], split="train"),
        processing_class=tok, reward_processing_classes=tok, callbacks=[StepTimer()],
    )
    clock.reset()
    trainer.train()
    return prompts_per_s(clock, s)


def prompts_per_s(clock: StepClock, s: Settings) -> dict[str, float]:
    out = clock.summary(s.warmup)
    out.update(prompts_per_s=out["steps_per_s"] * s.batch_size,
               prompts_per_cpu_s=s.batch_size / out["cpu_s_per_step"])
    return out


def worker(job: str, assets_file: str, settings_json: str, out: str) -> None:
    s = Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(settings_json).items()})
    import torch

    _import_common()
    if job == "trl":
        import trl  # noqa: F401
    else:
        import mmpref.training  # noqa: F401
    torch.set_num_threads(s.threads or torch.get_num_threads())
    paths = json.loads(Path(assets_file).read_text())["paths"]
    base = rss_bytes()
    started = time.perf_counter()
    res = {"mmpref": run_mmpref, "trl": run_trl}[job](paths, s, Path(out))
    res.update(memory_report(base), wall_s=time.perf_counter() - started, torch_threads=torch.get_num_threads())
    print(json.dumps(res))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2, help="runs per side, alternating; the fastest is reported")
    ap.add_argument("--out")
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(*args.worker)
    s = Settings(**(QUICK if args.quick else {}), threads=args.threads)
    out = Path(args.out or HERE / "results" / f"online_dpo{'_quick' if args.quick else ''}.json")
    started, load0 = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="mmpref-bench-online-") as tmp:
        work = Path(tmp)
        os.environ["HF_HUB_OFFLINE"] = "1"
        assets = build_assets(work, s)
        assets_file = work / "assets.json"
        assets_file.write_text(json.dumps(assets))
        print(f"model and prompts: {assets['stats']}", flush=True)
        runs: dict[str, list[dict]] = {side: [] for side in SIDES}
        order = [side for k in range(args.repeats) for side in (SIDES if k % 2 == 0 else SIDES[::-1])]
        for i, side in enumerate(order):  # alternating sides: drifting machine load hits both alike
            argv_ = ["--worker", side, str(assets_file), json.dumps(asdict(s)), str(work / f"{side}{i}")]
            r = spawn(__file__, argv_, ROOT)
            runs[side].append(r)
            print(f"{side:>6}: {r['prompts_per_s']:.2f} prompts/s ({r['prompts_per_cpu_s']:.2f} per CPU s), "
                  f"peak +{r['peak_rss_delta_mib']:.0f} MiB", flush=True)
        # each side's fastest run (the least disturbed by other load); memory of that run
        results = {side: max(rs, key=lambda r: r["prompts_per_s"]) for side, rs in runs.items()}
    m, t = results["mmpref"], results["trl"]
    ratios = {"throughput_ratio": round(m["prompts_per_s"] / t["prompts_per_s"], 3),
              "cpu_throughput_ratio": round(m["prompts_per_cpu_s"] / t["prompts_per_cpu_s"], 3),
              "peak_memory_ratio": round(m["peak_rss_delta_mib"] / t["peak_rss_delta_mib"], 3)}
    ratios["meets_target"] = bool(min(ratios["throughput_ratio"], ratios["cpu_throughput_ratio"]) >= 1.5
                                  and ratios["peak_memory_ratio"] <= 0.8)
    report = {"benchmark": "online_dpo", "quick": args.quick, "machine": machine_info(), "versions": versions("trl"),
              "settings": asdict(s), "data": assets["stats"], "results": results, "all_runs": runs, "ratios": ratios,
              "targets": {"throughput_ratio_min": 1.5, "peak_memory_ratio_max": 0.8},
              "total_wall_s": round(time.perf_counter() - started, 1),
              "load_average_1m": {"start": load0, "end": os.getloadavg()[0]},
              "command": "python benchmarks/online_dpo.py" + (" --quick" if args.quick else "")}
    write_json_atomic(out, report, indent=2)
    print(json.dumps(ratios))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
