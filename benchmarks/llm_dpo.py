"""mmpref against TRL's DPOTrainer on the same tiny-but-not-trivial Llama, the same data and the same batch.

For each reference mode (a separate frozen copy, the LoRA-disabled policy, reference log-probs precomputed once),
both trainers run the same number of DPO steps, each in its own subprocess so that peak memory is clean:

* throughput: pairs per second over the steps after a warm-up, from wall-clock and CPU-time stamps at the end of
  every step (mmpref: a hook on the engine's per-step log call; TRL: a ``TrainerCallback``). What users run:
  ``mmpref.training.train`` and ``DPOTrainer.train``.
* peak memory: the process's peak RSS (``ru_maxrss``) minus its RSS once the libraries are imported, so it counts
  models, optimizer state, activations, the reference pass and (cached mode) the precompute pass, not imports.
* a check that both compute the same DPO loss on the first batch, with a reference that differs from the policy
  (otherwise the loss is log 2 whatever the code does).
* the floor: with reference log-probs precomputed, a DPO step does the work of an SFT step over the same chosen and
  rejected tokens (one forward and backward over both); mmpref's ``sft`` loss with no reference on the same data
  and batches is that step, and ``DPO(cached) step / SFT step`` says how close DPO gets to it.

Settings are equal on both sides: float32, no gradient checkpointing (TRL defaults to it, and to bf16 autocast),
torch AdamW, constant LR, gradient clipping at 1.0, no dataloader workers, no checkpoints inside the timed steps.
One torch thread per run by default (``--threads``): see docs/benchmarks.md for why.

    python benchmarks/llm_dpo.py                      # full run (about 5 minutes on a busy 2-core machine)
    python benchmarks/llm_dpo.py --preset realistic   # 32k vocabulary, 512-token sequences, ~40M parameters
    python benchmarks/llm_dpo.py --quick              # a smoke run: smaller model, fewer steps

Needs TRL (``pip install -e .[bench]``); writes ``benchmarks/results/llm_dpo[_quick].json``.
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

MODES = ("copy", "lora", "cached")
SIDES = ("mmpref", "trl")
MODE_LABELS = {"copy": "separate-ref", "lora": "LoRA-ref (peft)", "cached": "precomputed-ref"}


@dataclass
class Settings:
    """One benchmark configuration; ``--quick`` shrinks it."""

    batch_size: int = 4  # preference pairs per step
    steps: int = 6  # optimizer steps per run
    warmup: int = 1  # steps excluded from the throughput
    hidden_size: int = 256
    intermediate_size: int = 688
    layers: int = 4
    heads: int = 8
    kv_heads: int = 4
    vocab_size: int = 8192
    max_length: int = 256  # prompt + completion tokens
    prompt_tokens: tuple[int, int] = (70, 110)  # uniform range, incl. BOS
    completion_tokens: tuple[int, int] = (100, 140)  # uniform range, incl. EOS
    lr: float = 1e-5
    lora_lr: float = 1e-4
    lora_r: int = 8
    beta: float = 0.1
    seed: int = 0
    threads: int = 0  # torch threads; 0 = torch's default


# what users run, shrunk to what this CPU can time: a Llama-shaped model with a 32k vocabulary (the LM head's share
# of the work is then that of real models) and 512-token sequences; the tokenizer's own vocabulary is smaller, the
# model's embedding and head have vocab_size rows all the same
REALISTIC = dict(
    batch_size=2,
    steps=4,
    warmup=1,
    hidden_size=512,
    intermediate_size=1376,
    layers=8,
    heads=8,
    kv_heads=4,
    vocab_size=32000,
    max_length=512,
    prompt_tokens=(180, 220),
    completion_tokens=(240, 280),
)
QUICK = dict(
    batch_size=4,
    steps=4,
    warmup=1,
    hidden_size=128,
    intermediate_size=344,
    layers=2,
    vocab_size=2048,
    prompt_tokens=(40, 60),
    completion_tokens=(50, 70),
)


# ----- assets: tokenizer, model, data (built once, shared by every run) -------------------------------------------
def build_assets(work: Path, s: Settings) -> dict[str, Any]:
    """A locally trained tokenizer, a random Llama (the policy's start), a second one (a distinct reference for the
    loss check) and a JSONL preference set whose token lengths are controlled exactly."""
    import torch
    from transformers import LlamaForCausalLM

    from mmpref.toy.llm import tiny_llama_config, train_tokenizer

    rng = random.Random(s.seed)
    lexicon = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(3, 8))) for _ in range(3000)]
    corpus = [" ".join(rng.choices(lexicon, k=200)) for _ in range(400)]
    tok = train_tokenizer(corpus, vocab_size=s.vocab_size)
    cost = {w: len(tok(" " + w, add_special_tokens=False)["input_ids"]) for w in lexicon}

    def text(lo_hi: tuple[int, int], used: int) -> str:
        """Words until the token budget drawn from ``lo_hi`` would be exceeded (``used`` tokens already spent)."""
        budget, words = rng.randint(*lo_hi) - used, []
        while True:
            w = rng.choice(lexicon)
            if cost[w] > budget:
                return " " + " ".join(words)
            words.append(w)
            budget -= cost[w]

    n_rows = s.batch_size * s.steps
    rows = [
        {
            "prompt": text(s.prompt_tokens, 2).lstrip() + ":",
            "chosen": text(s.completion_tokens, 1),
            "rejected": text(s.completion_tokens, 1),
        }
        for _ in range(n_rows)
    ]
    data = work / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = tiny_llama_config(
        max(len(tok), s.vocab_size),
        hidden_size=s.hidden_size,
        intermediate_size=s.intermediate_size,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        max_position_embeddings=2 * s.max_length,
    )
    paths = {"data": str(data)}
    for name, seed in (("model", s.seed), ("reference", s.seed + 1)):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        model.save_pretrained(work / name)
        tok.save_pretrained(work / name)
        paths[name] = str(work / name)
    lengths = [
        (len(tok(r["prompt"])["input_ids"]), len(tok(c, add_special_tokens=False)["input_ids"]) + 1)
        for r in rows
        for c in (r["chosen"], r["rejected"])
    ]
    prompt_mean = sum(p for p, _ in lengths) / len(lengths)
    comp_mean = sum(c for _, c in lengths) / len(lengths)
    stats = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "vocab_size": max(len(tok), s.vocab_size),
        "tokenizer_vocab_size": len(tok),
        "rows": n_rows,
        "mean_prompt_tokens": round(prompt_mean, 1),
        "mean_completion_tokens": round(comp_mean, 1),
        "max_sequence_tokens": max(p + c for p, c in lengths),
        "prompt_share": round(prompt_mean / (prompt_mean + comp_mean), 3),
        # padded positions per batch of batch_size pairs (2 * batch_size sequences padded to the longest), as
        # consecutive rows; the dataloader shuffles, which draws batches from the same lengths
        "padding_share": round(_padding_share([p + c for p, c in lengths], 2 * s.batch_size), 3),
    }
    return {"paths": paths, "stats": stats}


def _padding_share(lengths: list[int], batch: int) -> float:
    groups = [lengths[i:i + batch] for i in range(0, len(lengths), batch)]
    padded = sum(len(g) * max(g) for g in groups)
    return 1 - sum(lengths) / padded


# ----- one measured run per subprocess ------------------------------------------------------------------------------
def _import_common() -> None:
    """The libraries both sides use, imported before the memory baseline is taken."""
    import accelerate  # noqa: F401
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401


def run_mmpref(mode: str, paths: dict, s: Settings, out: Path) -> dict[str, Any]:
    """A DPO run in reference ``mode``, or (``mode="sft"``) the floor: the ``sft`` loss, no reference."""
    import mmpref.training.engine as engine
    from mmpref.config import config_from_dict

    sft = mode == "sft"
    raw = {
        "modality": "llm",
        "model": {"path": paths["model"], "torch_dtype": "float32"},
        "data": {"path": paths["data"], "max_length": s.max_length},
        "reference": {"mode": "none" if sft else mode},
        "lora": {"enabled": mode == "lora", "r": s.lora_r, "alpha": 2 * s.lora_r},
        "loss": {"sft": 1.0} if sft else {"dpo": {"beta": s.beta}},
        "optim": {
            "lr": s.lora_lr if mode == "lora" else s.lr,
            "scheduler": "constant",
            "warmup_steps": 0,
            "max_grad_norm": 1.0,
            "weight_decay": 0.0,
        },
        "run": {
            "batch_size": s.batch_size,
            "max_steps": s.steps,
            "cpu": True,
            "output_dir": str(out),
            "log_every": 1,
            "save_every": 10**9,
            "resume": False,
            "seed": s.seed,
        },
    }
    clock = StepClock()
    with engine_step_clock(clock):
        result = engine.train(config_from_dict(raw, source="benchmarks/llm_dpo.py"))
    logs = [json.loads(line) for line in Path(result.metrics_file).read_text().splitlines()]
    return {**pairs_per_s(clock, s), "losses": [r["loss"] for r in logs if "loss" in r]}


def pairs_per_s(clock: StepClock, s: Settings) -> dict[str, float]:
    out = clock.summary(s.warmup)
    out.update(pairs_per_s=out["steps_per_s"] * s.batch_size, pairs_per_cpu_s=s.batch_size / out["cpu_s_per_step"])
    return out


def _trl_trainer(
    mode: str, paths: dict, s: Settings, out: Path, reference: str | None = None, callbacks: list | None = None
) -> Any:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    load = lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32, attn_implementation="sdpa")
    args = DPOConfig(
        output_dir=str(out),
        per_device_train_batch_size=s.batch_size,
        max_steps=s.steps,
        learning_rate=s.lora_lr if mode == "lora" else s.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        max_length=s.max_length,
        beta=s.beta,
        loss_type="sigmoid",
        precompute_ref_log_probs=mode == "cached",
        seed=s.seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    ref_path = reference or (paths["model"] if mode == "copy" else None)
    return DPOTrainer(
        model=load(paths["model"]),
        ref_model=load(ref_path) if ref_path else None,
        args=args,
        train_dataset=load_dataset("json", data_files=paths["data"], split="train"),
        processing_class=AutoTokenizer.from_pretrained(paths["model"]),
        peft_config=LoraConfig(r=s.lora_r, lora_alpha=2 * s.lora_r, target_modules="all-linear", task_type="CAUSAL_LM")
        if mode == "lora"
        else None,
        callbacks=callbacks,
    )


def run_trl(mode: str, paths: dict, s: Settings, out: Path) -> dict[str, Any]:
    from transformers import TrainerCallback

    clock = StepClock()

    class StepTimer(TrainerCallback):
        def on_step_end(self, *a, **k):
            clock.tick()

    trainer = _trl_trainer(mode, paths, s, out, callbacks=[StepTimer()])
    clock.reset()
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    return {**pairs_per_s(clock, s), "losses": losses}


def check_first_batch(paths: dict, s: Settings, out: Path) -> dict[str, Any]:
    """Both libraries' DPO loss on the first ``batch_size`` rows, with a reference distinct from the policy."""
    import torch

    from mmpref.adapters.llm import LLMAdapter
    from mmpref.config import config_from_dict
    from mmpref.losses import build_loss

    raw = {
        "modality": "llm",
        "model": {"path": paths["model"]},
        "data": {"path": paths["data"], "max_length": s.max_length},
        "reference": {"mode": "copy", "path": paths["reference"]},
        "loss": {"dpo": {"beta": s.beta}},
        "run": {"cpu": True, "output_dir": str(out / "mmpref")},
    }
    cfg = config_from_dict(raw, source="benchmarks/llm_dpo.py")
    adapter = LLMAdapter(cfg)
    loss = build_loss(cfg.loss)
    with torch.no_grad():
        batch = adapter.collate([adapter.train_dataset[i] for i in range(s.batch_size)])
        scores = adapter.scores(adapter.policy, batch, loss)
        ours = loss(scores).loss.item()
        trainer = _trl_trainer("copy", paths, s, out / "trl", reference=paths["reference"])
        rows = [trainer.train_dataset[i] for i in range(s.batch_size)]
        trl_batch = trainer.data_collator(rows)
        theirs = trainer.compute_loss(trainer.model, trl_batch).item()
    same_tokens = all(
        r["prompt_ids"] + r[k] == adapter.train_dataset[i]["prompt_ids"] + adapter.train_dataset[i]["completion_ids"][j]
        for i, r in enumerate(rows)
        for j, k in enumerate(("chosen_ids", "rejected_ids"))
    )
    return {
        "mmpref_loss": ours,
        "trl_loss": theirs,
        "abs_diff": abs(ours - theirs),
        "same_token_ids": same_tokens,
        "policy_logps_chosen_mean": scores.policy[:, 0].mean().item(),
        "reference_logps_chosen_mean": scores.reference[:, 0].mean().item(),
    }


def worker(job: str, mode: str, assets_file: str, settings_json: str, out: str) -> None:
    """Entry point of one subprocess: prints one JSON line (the last line of stdout)."""
    s = Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(settings_json).items()})
    import torch

    _import_common()
    if job == "trl":
        import trl  # noqa: F401
    else:
        import mmpref.training  # noqa: F401
    if s.threads:
        torch.set_num_threads(s.threads)
    paths = json.loads(Path(assets_file).read_text())["paths"]
    base = rss_bytes()
    started = time.perf_counter()
    run = {"mmpref": run_mmpref, "trl": run_trl}.get(job)
    res = run(mode, paths, s, Path(out)) if run else check_first_batch(paths, s, Path(out))
    res.update(memory_report(base), wall_s=time.perf_counter() - started, torch_threads=torch.get_num_threads())
    print(json.dumps(res))


def run(job: str, mode: str, assets_file: Path, s: Settings, work: Path) -> dict[str, Any]:
    argv = ["--worker", job, mode, str(assets_file), json.dumps(asdict(s)), str(work / f"{job}-{mode}")]
    return spawn(__file__, argv, ROOT)


# ----- the report ---------------------------------------------------------------------------------------------------
def compare(results: dict[str, dict[str, dict]], target_speed: float = 1.3) -> dict[str, dict]:
    """mmpref / TRL per mode: throughput by wall clock and by process CPU time, and peak memory."""
    out = {}
    for mode, sides in results.items():
        m, t = sides["mmpref"], sides["trl"]
        speed = m["pairs_per_s"] / t["pairs_per_s"]
        cpu_speed = m["pairs_per_cpu_s"] / t["pairs_per_cpu_s"]
        mem = m["peak_rss_delta_mib"] / t["peak_rss_delta_mib"]
        out[mode] = {
            "throughput_ratio": round(speed, 3),
            "cpu_throughput_ratio": round(cpu_speed, 3),
            "peak_memory_ratio": round(mem, 3),
            "meets_target": bool(min(speed, cpu_speed) >= target_speed and mem <= 1.0),
        }
    return out


def table(report: dict) -> str:
    head = (
        "| reference | mmpref pairs/s | TRL pairs/s | speed ratio (wall / CPU time) | mmpref peak MiB | TRL peak MiB |"
    )
    lines = [head + " memory ratio |", "|---|---|---|---|---|---|---|"]
    for mode, r in report["results"].items():
        m, t, c = r["mmpref"], r["trl"], report["ratios"][mode]
        lines.append(
            f"| {MODE_LABELS[mode]} | {m['pairs_per_s']:.2f} | {t['pairs_per_s']:.2f} | "
            f"{c['throughput_ratio']:.2f}x / {c['cpu_throughput_ratio']:.2f}x | {m['peak_rss_delta_mib']:.0f} | "
            f"{t['peak_rss_delta_mib']:.0f} | {c['peak_memory_ratio']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smaller model and fewer steps (smoke test)")
    ap.add_argument("--preset", choices=("small", "realistic"), default="small",
                    help="small: 7M parameters, 8k vocabulary, 256 tokens; realistic: 32k vocabulary, 512 tokens")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--steps", type=int, help="optimizer steps per run (default from the preset)")
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run (0: torch's default; see docs)")
    ap.add_argument("--out", help="result JSON (default benchmarks/results/llm_dpo[_quick].json)")
    ap.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(*args.worker)

    s = Settings(**(QUICK if args.quick else REALISTIC if args.preset == "realistic" else {}), threads=args.threads)
    s.steps = args.steps or s.steps
    s.batch_size = args.batch_size or s.batch_size
    suffix = "_quick" if args.quick else "_realistic" if args.preset == "realistic" else ""
    out = Path(args.out or HERE / "results" / f"llm_dpo{suffix}.json")
    started, load0 = time.perf_counter(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="mmpref-bench-llm-") as tmp:
        work = Path(tmp)
        os.environ["HF_HUB_OFFLINE"] = "1"
        assets = build_assets(work, s)
        assets_file = work / "assets.json"
        assets_file.write_text(json.dumps(assets))
        print(f"model and data: {assets['stats']}", flush=True)
        check = run("check", "copy", assets_file, s, work)
        print(f"first-batch loss: mmpref {check['mmpref_loss']:.6f}, TRL {check['trl_loss']:.6f}", flush=True)
        results: dict[str, dict[str, dict]] = {}
        for i, mode in enumerate(args.modes):
            for side in SIDES if i % 2 == 0 else SIDES[::-1]:  # alternate who runs first: load drifts
                r = run(side, mode, assets_file, s, work)
                results.setdefault(mode, {})[side] = r
                print(
                    f"{MODE_LABELS[mode]:>16} {side:>6}: {r['pairs_per_s']:.2f} pairs/s, "
                    f"peak +{r['peak_rss_delta_mib']:.0f} MiB",
                    flush=True,
                )
        floor = run("mmpref", "sft", assets_file, s, work) if "cached" in results else None
        if floor:
            print(f"{'SFT floor':>16} mmpref: {floor['pairs_per_s']:.2f} pairs/s", flush=True)
    report = {
        "benchmark": "llm_dpo",
        "quick": args.quick,
        "machine": machine_info(),
        "versions": versions("trl"),
        "settings": asdict(s),
        "data": assets["stats"],
        "first_batch_loss_check": check,
        "results": results,
        "ratios": compare(results),
        "floor": None if floor is None else {
            "sft": floor,
            # step-time ratio = throughput ratio inverted; target <= 1.1
            "dpo_cached_over_sft_wall": round(floor["pairs_per_s"] / results["cached"]["mmpref"]["pairs_per_s"], 3),
            "dpo_cached_over_sft_cpu": round(floor["pairs_per_cpu_s"] / results["cached"]["mmpref"]["pairs_per_cpu_s"],
                                             3),
            "target_max": 1.1,
        },
        "targets": {"throughput_ratio_min": 1.3, "peak_memory_ratio_max": 1.0},
        "total_wall_s": round(time.perf_counter() - started, 1),
        "load_average_1m": {"start": load0, "end": os.getloadavg()[0]},
        "command": "python benchmarks/llm_dpo.py" + (" --quick" if args.quick else "") +
                   (" --preset realistic" if args.preset == "realistic" else ""),
    }
    write_json_atomic(out, report, indent=2)
    print(table(report))
    if floor:
        f = report["floor"]
        print(f"DPO(cached) step / SFT step: {f['dpo_cached_over_sft_wall']:.2f}x wall, "
              f"{f['dpo_cached_over_sft_cpu']:.2f}x CPU time (target <= 1.1x)")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
