"""`mmpref demo --modality text`: the demo's idea on a language model, end to end on a CPU in a few minutes.

A prompt asks for a list of items in an order (``"list: red, cat, seven =>"`` or ``"list in reverse: ..."``); the
gold answer lists them in that order (``" red, cat, seven"``). A tiny Llama with a locally trained tokenizer is
trained from scratch by SFT on a few hundred demonstrations (the ``sft`` loss through :func:`mmpref.training.train`;
the step count is the best on validation prompts, more overfits), so it still omits, replaces and reorders items on
prompts it has not seen. Preference pairs put the gold answer above a perturbed one (omission,
replacement, reordering: the caption perturbations of the audio demo), and the SFT model is aligned with DPO, or any
loss of the core (``--loss``; unpaired kto/bco read the pairs as desirable/undesirable rows), through the same
engine. Greedy generations on held-out prompts are scored before and after alignment (exact match, order accuracy,
item recall) with bootstrap confidence intervals, and written to ``report.md`` / ``report.json``.

A compute-matched control continues SFT on the gold answers for as many steps as the alignment took, so the report
shows whether the preference loss beats simply training longer (``eval.control`` in the config). The online arms
(``eval.online``; the ``online_arms`` section, each an ``mmpref train`` config with an ``online:`` part) train the
SFT model on its own samples for prompts that have no gold answer (``task.online_prompts``; demonstrations are the
scarce part, a judge scores an answer to any prompt; 0 uses the SFT prompts): online DPO, RSO and SPPO judged by the
task's rule (:func:`rule_reward`), and RSO judged by a reward model the demo trains on perturbed-answer pairs
(:mod:`mmpref.demo.text_reward`) and the library loads with ``from_pretrained``.
Every model is scored on validation prompts (for choosing settings) and on held-out prompts (the report's verdict).

Stages (data, model, sft, align, control, reward model, online arms, eval) are cached in the output directory under
a fingerprint of everything they depend on, so a rerun skips finished stages and an interrupted training resumes
from its checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmpref.errors import ConfigError
from mmpref.io import atomic_dir, claim_folder, read_jsonl, write_jsonl_atomic, write_text_atomic
from mmpref.stats import bootstrap_ci, paired_difference
from mmpref.yaml_config import RECIPES, apply_overrides, read_yaml, resolve_config, set_dotted

DEFAULT_CONFIG = RECIPES / "demo_text.yaml"
DATA_VERSION = 2  # 2: the online arms' prompts (online.jsonl); stages cached by an earlier version rerun
PERTURBATIONS = ("omission", "replacement", "reordering")
METRICS = ("exact_match", "order_accuracy", "item_recall")


# ----- the task -----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Example:
    """One prompt and its gold answer (the items in the order the prompt asks for)."""

    prompt: str
    gold: tuple[str, ...]

    @property
    def answer(self) -> str:
        return format_answer(self.gold)


def format_answer(items: Sequence[str]) -> str:
    """``["red", "cat"] -> " red, cat"`` (the leading space separates it from the prompt's ``=>``)."""
    return " " + ", ".join(items)


def parse_answer(text: str) -> list[str]:
    """The items of a generated answer: comma-separated words, blanks dropped."""
    return [w.strip() for w in text.split(",") if w.strip()]


def make_examples(task: dict[str, Any], n: int, rng: random.Random) -> list[Example]:
    """``n`` random prompts of ``min_items..max_items`` distinct items, a ``reverse_fraction`` of them reversed."""
    examples = []
    for _ in range(n):
        items = rng.sample(task["items"], rng.randint(task["min_items"], task["max_items"]))
        reverse = rng.random() < task["reverse_fraction"]
        head = "list in reverse:" if reverse else "list:"
        prompt = f"{head}{format_answer(items)} =>"
        examples.append(Example(prompt, tuple(reversed(items)) if reverse else tuple(items)))
    return examples


def perturb(items: Sequence[str], kind: str, vocabulary: Sequence[str], rng: random.Random) -> list[str]:
    """A wrong answer: one item omitted, one replaced by an item not in the list, or two items swapped."""
    out = list(items)
    i = rng.randrange(len(out))
    if kind == "omission":
        del out[i]
    elif kind == "replacement":
        out[i] = rng.choice([v for v in vocabulary if v not in items])
    elif kind == "reordering":
        j = rng.choice([j for j in range(len(out)) if j != i])
        out[i], out[j] = out[j], out[i]
    else:
        raise ValueError(f"unknown perturbation {kind!r}; known: {PERTURBATIONS}")
    return out


def preference_pairs(examples: Sequence[Example], task: dict[str, Any], rng: random.Random) -> list[dict]:
    """``pairs_per_prompt`` rows ``{prompt, chosen, rejected, perturbation}`` per example (distinct perturbations)."""
    kinds = list(task["perturbations"])
    rows = []
    for ex in examples:
        for kind in rng.sample(kinds, min(task["pairs_per_prompt"], len(kinds))):
            wrong = perturb(ex.gold, kind, task["items"], rng)
            rows.append({"prompt": ex.prompt, "chosen": ex.answer, "rejected": format_answer(wrong),
                         "perturbation": kind})
    return rows


# ----- the online arm's judge ----------------------------------------------------------------------------------------
def gold_of(prompt: str) -> list[str]:
    """The answer a prompt asks for: its items, reversed for ``list in reverse:``."""
    head, _, rest = prompt.partition(":")
    items = parse_answer(rest.rsplit("=>", 1)[0])
    return items[::-1] if head.strip() == "list in reverse" else items


def rule_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """The task's rule as a reward (an ``online.judge`` of kind ``callable``): exact match + order accuracy + item
    recall of the parsed answer, minus the share of named items the prompt did not list."""
    out = []
    for prompt, response in zip(prompts, responses):
        gold, pred = gold_of(prompt), parse_answer(response)
        s = score_answer(pred, gold)
        extra = sum(p not in gold for p in pred) / len(gold)
        out.append(s["exact_match"] + s["order_accuracy"] + s["item_recall"] - extra)
    return out


REWARD_MODEL = "demo:reward_model"  # an online arm's `judge.path` that the demo fills with its trained reward model


def _uses_reward_model(arm: dict) -> bool:
    return (arm.get("online") or {}).get("judge", {}).get("path") == REWARD_MODEL


def _with_reward_model(arm: dict, path: str | None) -> dict:
    """The arm's config with the demo's reward model folder as its judge (when it asks for it)."""
    if not _uses_reward_model(arm):
        return arm
    arm = copy.deepcopy(arm)
    arm["online"]["judge"]["path"] = path
    return arm


def _judge_name(arm: dict) -> str:
    judge = (arm.get("online") or {}).get("judge", {})
    if judge.get("path") == REWARD_MODEL:
        name = "the reward model"
    elif str(judge.get("path", "")).endswith(":rule_reward"):
        name = "the task's rule"
    else:
        name = str(judge.get("path"))
    return name + (" (Bradley-Terry preferences)" if arm["online"].get("builder") in ("sppo", "pair") else "")


def reward_model_stage(rcfg: dict, task: dict, sft_dir: str, data_dir: Path, out: Path,
                       seed: int) -> tuple[dict, str]:
    """The reward model (:mod:`mmpref.demo.text_reward`) trained on the world's preference pairs for the training
    prompts: ``draws`` rounds of every perturbation of every prompt (the world's rule labels as many pairs as asked;
    the offline arm keeps its fixed set). Its pair accuracy on pairs of the validation prompts (made here, with
    their own generator) says how well it judges."""
    from mmpref.demo.text_reward import train_reward_model

    every = {**task, "pairs_per_prompt": len(task["perturbations"])}
    train = [Example(r["prompt"], tuple(gold_of(r["prompt"]))) for r in read_jsonl(data_dir / "sft.jsonl")]
    rng = random.Random(f"{seed}-reward-train")
    pairs = [p for _ in range(rcfg["draws"]) for p in preference_pairs(train, every, rng)]
    vals = [Example(r["prompt"], tuple(r["gold"])) for r in read_jsonl(data_dir / "val.jsonl")]
    val_pairs = preference_pairs(vals, every, random.Random(f"{seed}-reward-val"))
    result = train_reward_model(sft_dir, pairs, val_pairs, out, rcfg["steps"], rcfg["batch_size"], rcfg["lr"], seed)
    by_kind = result["val_accuracy_by_perturbation"]
    return {**result, "pairs": len(pairs), "path": str(out)}, (
        f"{result['steps']} Bradley-Terry steps on {len(pairs)} pairs, pair accuracy train "
        f"{result['train_accuracy']:.3f}, validation {result['val_accuracy']:.3f} "
        f"({', '.join(f'{k} {v:.2f}' for k, v in by_kind.items())})")


# ----- scoring ------------------------------------------------------------------------------------------------------
def score_answer(predicted: Sequence[str], gold: Sequence[str]) -> dict[str, float]:
    """Exact match; order accuracy (fraction of gold item pairs in the right relative order, a missing item fails
    its pairs, as the audio judge's ``order_correct``); item recall (fraction of gold items present)."""
    pos = {}
    for k, item in enumerate(predicted):
        pos.setdefault(item, k)  # first mention counts
    pairs = [(a, b) for i, a in enumerate(gold) for b in gold[i + 1:]]
    right = sum(a in pos and b in pos and pos[a] < pos[b] for a, b in pairs)
    return {
        "exact_match": float(list(predicted) == list(gold)),
        "order_accuracy": right / len(pairs) if pairs else float(gold[0] in pos),
        "item_recall": sum(g in pos for g in gold) / len(gold),
    }


def summarise(per_item: Sequence[dict[str, float]], n_boot: int, seed: int) -> dict[str, dict[str, float]]:
    """``{metric: {mean, lo, hi, n}}`` over items (:func:`mmpref.stats.bootstrap_ci`)."""
    return {m: bootstrap_ci([r[m] for r in per_item], n_boot, seed) for m in METRICS}


def compare(before: Sequence[dict], after: Sequence[dict], n_boot: int, seed: int) -> dict[str, dict]:
    """After minus before per metric, with a paired bootstrap interval (the same prompts resampled for both)."""
    return {m: paired_difference([a[m] for a in after], [b[m] for b in before], n_boot, seed) for m in METRICS}


# ----- stages -------------------------------------------------------------------------------------------------------
def fingerprint(*parts: Any) -> str:
    return hashlib.blake2b(json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()


def run_cached(out: Path, name: str, key: str, fn: Callable[[], tuple[Any, str]]) -> Any:
    """Run a stage (its outputs under ``out/<name>``) unless it finished with the same fingerprint ``key``; a stage
    with another fingerprint is wiped and rerun (the demo's shared :func:`~mmpref.demo.stages.run_stage`)."""
    from mmpref.demo.stages import run_stage

    def make() -> dict:
        result, line = fn()
        return {"result": result, "line": line}

    return run_stage(out, name, make, settings={"fingerprint": key}, stage_dir=out / name)["result"]


def build_data(cfg: dict, seed: int, out: Path) -> tuple[dict, str]:
    """SFT rows (gold answers), preference pairs on the same prompts, and held-out eval prompts."""
    task = cfg["task"]
    rng = random.Random(seed)
    train = make_examples(task, task["train_prompts"], rng)
    seen = {ex.prompt for ex in train}
    evals: list[Example] = []
    while len(evals) < task["eval_prompts"]:  # held out: no eval prompt occurs in training
        evals += [ex for ex in make_examples(task, task["eval_prompts"], rng) if ex.prompt not in seen]
        seen |= {ex.prompt for ex in evals}
    evals = evals[: task["eval_prompts"]]
    vals: list[Example] = []  # for choosing settings; its own generator, so the other sets stay as they were
    vrng, seen = random.Random(f"{seed}-val"), seen | {ex.prompt for ex in evals}
    while len(vals) < task["val_prompts"]:
        vals += [ex for ex in make_examples(task, task["val_prompts"], vrng) if ex.prompt not in seen]
        seen |= {ex.prompt for ex in vals}
    vals = vals[: task["val_prompts"]]
    # prompts without answers for the online arms (the judge scores any answer; demonstrations are the scarce part);
    # their own generator, disjoint from the held-out and validation prompts; none: the arms use the SFT prompts
    pool: list[Example] = []
    prng, seen = random.Random(f"{seed}-online"), seen | {ex.prompt for ex in vals}
    while len(pool) < task.get("online_prompts", 0):
        pool += [ex for ex in make_examples(task, task["online_prompts"], prng) if ex.prompt not in seen]
        seen |= {ex.prompt for ex in pool}
    pool = pool[: task.get("online_prompts", 0)]
    pairs = preference_pairs(train, task, rng)
    # the SFT run reads the same pair layout (its loss only uses the winner); one row per prompt
    write_jsonl_atomic(out / "sft.jsonl", [{"prompt": e.prompt, "chosen": e.answer, "rejected": format_answer(
        perturb(e.gold, "omission", task["items"], rng))} for e in train])
    write_jsonl_atomic(out / "prefs.jsonl", pairs)
    write_jsonl_atomic(out / "eval.jsonl", [{"prompt": e.prompt, "gold": list(e.gold)} for e in evals])
    write_jsonl_atomic(out / "val.jsonl", [{"prompt": e.prompt, "gold": list(e.gold)} for e in vals])
    write_jsonl_atomic(out / "online.jsonl", [{"prompt": e.prompt} for e in pool] if pool else
                       [{"prompt": e.prompt} for e in train])
    counts = {k: sum(r["perturbation"] == k for r in pairs) for k in task["perturbations"]}
    return {"train_prompts": len(train), "pairs": len(pairs), "eval_prompts": len(evals), "val_prompts": len(vals),
            "online_prompts": len(pool) or len(train), "online_pool": bool(pool), "perturbations": counts}, (
        f"{len(train)} SFT prompts, {len(pairs)} preference pairs {counts}, {len(vals)} validation and "
        f"{len(evals)} held-out prompts, {len(pool) or len(train)} prompts for the online arms")


def build_model(cfg: dict, seed: int, data_dir: Path, out: Path) -> tuple[dict, str]:
    """A locally trained tokenizer and a randomly initialised tiny Llama (no downloads)."""
    from mmpref.toy.llm import build_tiny_llama

    texts = [r["prompt"] + r["chosen"] + r["rejected"] for r in read_jsonl(data_dir / "prefs.jsonl")]
    texts += [r["prompt"] + format_answer(r["gold"]) for r in read_jsonl(data_dir / "eval.jsonl")]
    model_kw = dict(cfg["model"])
    vocab = model_kw.pop("vocab_size")
    with atomic_dir(out) as tmp:
        build_tiny_llama(tmp, texts, vocab_size=vocab, seed=seed, **model_kw)
    n_params = _count_parameters(out)
    return {"path": str(out), "parameters": n_params}, f"tiny Llama with {n_params / 1e3:.0f}k parameters"


def _count_parameters(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys())


def run_training(raw: dict, model_path: str, data_path: Path, out: Path, seed: int) -> tuple[dict, str]:
    """One ``mmpref train`` run of the raw config with the demo's paths filled in; returns where ``final`` is."""
    from mmpref.config import config_from_dict
    from mmpref.training import train

    raw = copy.deepcopy(raw)
    raw["model"]["path"] = model_path
    if "online" in raw:  # the policy's own samples for the online arms' prompts
        raw["online"]["prompts"] = str(data_path)
    else:
        raw["data"]["path"] = str(data_path)
    raw["run"].update(output_dir=str(out), seed=seed)
    cfg = config_from_dict(raw, source="configs/demo_text.yaml")
    result = train(cfg)
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    curve = read_jsonl(Path(result.metrics_file))
    shown = {k: round(v, 4) for k, v in metrics.items() if k in _SHOWN_METRICS}
    return {"final": result.final_dir, "steps": result.step, "metrics": metrics, "curve": curve}, (
        f"{result.step} steps, {shown}")


_SHOWN_METRICS = ("loss", "rewards/accuracies", "rewards/margins")


def evaluate(model_dir: str, examples: Sequence[dict], ecfg: dict) -> tuple[dict, str]:
    """Greedy generations (:func:`mmpref.models.sampling.generate_completions`) for every held-out prompt, parsed
    and scored."""
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mmpref.models.sampling import generate_completions

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = []
    bs = ecfg["batch_size"]
    for s in tqdm(range(0, len(examples), bs), desc="generate", leave=False):
        batch = examples[s:s + bs]
        prompts = [tok(ex["prompt"])["input_ids"] for ex in batch]  # BOS + prompt, as the training data
        completions = generate_completions(model, prompts, tok.pad_token_id, tok.eos_token_id,
                                           ecfg["max_new_tokens"], do_sample=False)
        for ex, ids in zip(batch, completions):
            text = tok.decode(ids, skip_special_tokens=True)
            pred = parse_answer(text)
            rows.append({"prompt": ex["prompt"], "gold": ex["gold"], "output": text,
                         **score_answer(pred, ex["gold"])})
    means = {m: float(np.mean([r[m] for r in rows])) for m in METRICS}
    return {"rows": rows, "means": means}, " ".join(f"{k}={v:.3f}" for k, v in means.items())


# ----- report -------------------------------------------------------------------------------------------------------
def build_report(info: dict, rows: dict[str, list[dict]], n_boot: int, seed: int) -> dict:
    """Per-model metric summaries and error counts; paired differences of every trained arm against the SFT model
    and the compute-matched SFT control, and of every online arm against offline DPO (:func:`comparisons`); a
    verdict per difference, which online arms beat the control, and a few example generations."""
    diffs = {f"{arm}-{base}": compare(rows[base], rows[arm], n_boot, seed) for arm, base in comparisons(list(rows))}
    online = [n for n in rows if n not in OFFLINE_MODELS]
    return {
        **info,
        "models": {name: summarise(r, n_boot, seed) for name, r in rows.items()},
        "difference": diffs,
        "verdict": verdict(diffs["aligned-sft"]),
        "verdicts": {name: verdict(d) for name, d in diffs.items()},
        "beat_control": [n for n in online if f"{n}-sft_control" in diffs and beats(diffs[f"{n}-sft_control"])],
        "errors": {name: error_counts(r) for name, r in rows.items()},
        "examples": [{"prompt": group[0]["prompt"], "gold": format_answer(group[0]["gold"]).strip(),
                      **{name: row["output"].strip() for name, row in zip(rows, group)}}
                     for group in list(zip(*rows.values()))[:8]],
    }


OFFLINE_MODELS = ("sft", "sft_control", "aligned")  # every other model is an online arm


def comparisons(models: Sequence[str]) -> list[tuple[str, str]]:
    """(arm, base) pairs the report shows: offline DPO against SFT and the control; each online arm against SFT,
    the control and offline DPO (online arms are not compared with each other)."""
    bases = [m for m in OFFLINE_MODELS if m in models]
    out = [("aligned", b) for b in bases if b != "aligned" and "aligned" in models]
    return out + [(m, b) for m in models if m not in OFFLINE_MODELS for b in bases]


def beats(diff: dict) -> bool:
    """Better on some metric beyond the 95% interval and worse on none."""
    return any(diff[m]["significant"] and diff[m]["mean"] > 0 for m in METRICS) and not any(
        diff[m]["significant"] and diff[m]["mean"] < 0 for m in METRICS)


def error_counts(rows: Sequence[dict]) -> dict[str, int]:
    """How many answers are exact, miss an item, name an unlisted item, or only misorder."""
    out = {"exact": 0, "missing_item": 0, "extra_item": 0, "order_only": 0}
    for r in rows:
        pred, gold = parse_answer(r["output"]), r["gold"]
        if r["exact_match"]:
            out["exact"] += 1
            continue
        out["missing_item"] += any(g not in pred for g in gold)
        out["extra_item"] += any(p not in gold for p in pred)
        out["order_only"] += sorted(pred) == sorted(gold)
    return out


MODEL_TITLES = {"sft": "SFT", "sft_control": "SFT control", "aligned": "offline DPO", "online_dpo": "online DPO",
                "rso": "RSO", "sppo": "SPPO", "rso_rm": "RSO (reward model)"}


def title(name: str) -> str:
    return MODEL_TITLES.get(name, name)


def render_markdown(r: dict) -> str:
    def cell(s: dict, sign: str = "") -> str:
        return f"{s['mean']:{sign}.3f} [{s['lo']:{sign}.3f}, {s['hi']:{sign}.3f}]"

    names = list(r["models"])
    control = "sft_control" in names
    lines = [
        "# mmpref text demo: ordered lists, SFT vs offline and online alignment",
        "",
        f"Loss `{r['loss']}`, seed {r['seed']}{' (--quick)' if r['quick'] else ''}; tiny Llama "
        f"({r['model']['parameters'] / 1e3:.0f}k parameters) trained from scratch: {r['sft_steps']} SFT steps on "
        f"{r['data']['train_prompts']} demonstrations, then "
        f"{r['align_steps']} `{r['loss']}` steps on {r['data']['pairs']} preference pairs "
        f"(perturbations {r['data']['perturbations']}).",
        f"Greedy generations on {r['data']['eval_prompts']} held-out prompts; 95% bootstrap intervals "
        f"({r['bootstrap']} resamples; differences are paired bootstraps over prompts)."
        + (f" `SFT control` continues SFT on the gold answers for the same {r['align_steps']} steps as the alignment:"
           " the gain that more training alone buys." if control else ""),
    ]
    prompts = (f"{r['data']['online_prompts']} prompts without gold answers" if r["data"].get("online_pool")
               else "the SFT prompts")
    for name, steps in (r.get("online_steps") or {}).items():
        lines.append(f"- {title(name)}: {steps} steps from the SFT model on its own samples for {prompts}, "
                     f"judged by {r['online_judges'].get(name, '?')} (no preference pairs).")
    if r.get("reward_model"):
        rm = r["reward_model"]
        lines.append(f"- The reward model: the SFT model with a one-output score head, {rm['steps']} Bradley-Terry "
                     f"steps on {rm.get('pairs', '?')} pairs of the training prompts; pair accuracy "
                     f"{rm['train_accuracy']:.3f} on them, "
                     f"{rm['val_accuracy']:.3f} on pairs of the validation prompts.")
    lines += ["", "| metric | " + " | ".join(title(n) for n in names) + " |", "|---" * (1 + len(names)) + "|"]
    for m in METRICS:
        lines.append(f"| {m} | " + " | ".join(cell(r["models"][n][m]) for n in names) + " |")
    lines += ["", "Paired differences (`*`: the 95% interval excludes 0):", "",
              "| difference | " + " | ".join(METRICS) + " | verdict |", "|---" * (2 + len(METRICS)) + "|"]
    for name, d in r["difference"].items():
        arm, base = name.split("-", 1)
        lines.append(f"| {title(arm)} - {title(base)} | " + " | ".join(
            f"{cell(d[m], '+')}{' *' if d[m]['significant'] else ''}" for m in METRICS)
            + f" | {r['verdicts'][name]} |")
    if control:
        beat = r.get("beat_control") or []
        lines += ["", "Online arms above the SFT control (better on a metric, worse on none): "
                  + (", ".join(title(n) for n in beat) if beat else "none") + "."]
    if "validation" in r:
        v = r["validation"]
        lines += ["", f"Validation prompts ({r['data'].get('val_prompts', '?')}; settings are chosen on these): means, "
                      "then paired differences:", "",
                  "| metric | " + " | ".join(title(n) for n in v["models"]) + " |",
                  "|---" * (1 + len(v["models"])) + "|"]
        for m in METRICS:
            lines.append(f"| {m} | " + " | ".join(f"{v['models'][n][m]['mean']:.3f}" for n in v["models"]) + " |")
        lines += ["", "| difference | " + " | ".join(METRICS) + " |", "|---" * (1 + len(METRICS)) + "|"]
        for name, d in v["difference"].items():
            arm, base = name.split("-", 1)
            lines.append(f"| {title(arm)} - {title(base)} | " + " | ".join(
                f"{d[m]['mean']:+.3f}{' *' if d[m]['significant'] else ''}" for m in METRICS) + " |")
    lines += ["", "Error counts (answers):", "", "| model | exact | missing item | extra item | order only |",
              "|---|---|---|---|---|"]
    for name in names:
        e = r["errors"][name]
        lines.append(f"| {title(name)} | {e['exact']} | {e['missing_item']} | {e['extra_item']} "
                     f"| {e['order_only']} |")
    lines += ["", "Examples:", "", "| prompt | gold | " + " | ".join(title(n) for n in names) + " |",
              "|---" * (2 + len(names)) + "|"]
    lines += [f"| `{x['prompt']}` | {x['gold']} | " + " | ".join(x[n] for n in names) + " |" for x in r["examples"]]
    lines += ["", f"Wall time {r['wall_s']:.0f} s. Command: `{r['command']}`", ""]
    return "\n".join(lines)


def verdict(diff: dict) -> str:
    better = [m for m in METRICS if diff[m]["significant"] and diff[m]["mean"] > 0]
    worse = [m for m in METRICS if diff[m]["significant"] and diff[m]["mean"] < 0]
    if better and not worse:
        return f"alignment improved {', '.join(better)} beyond the 95% interval."
    if worse and not better:
        return f"alignment made {', '.join(worse)} worse beyond the 95% interval."
    if better and worse:
        return f"mixed: better {', '.join(better)}, worse {', '.join(worse)} (beyond the 95% interval)."
    return "no difference beyond the 95% interval."


# ----- configuration and entry point --------------------------------------------------------------------------------
def load_demo_config(path: Path, quick: bool, loss: str, settings: Sequence[str] = ()) -> dict:
    """The demo YAML with the ``quick`` section (when ``quick``) and ``key.sub=value`` ``settings`` applied, and
    ``align.loss`` set to ``loss`` with its ``loss_params`` (registry defaults otherwise). Read with the loader of
    every mmpref config; a setting must name an existing key."""
    from mmpref.losses import available_losses

    cfg = read_yaml(path)
    for key in ("task", "model", "eval", "sft", "align"):
        if not isinstance(cfg.get(key), dict):
            raise ConfigError(f"{path}: section `{key}` is missing or not a mapping")
    for dotted, value in ((cfg.get("quick") or {}).items() if quick else ()):
        set_dotted(cfg, dotted, value, str(path), must_exist=True, label=f"quick.{dotted}")
    apply_overrides(cfg, settings, str(path), must_exist=True)
    if loss not in available_losses():
        raise ConfigError(f"--loss {loss!r}: unknown; available: {', '.join(available_losses())}")
    cfg["align"]["loss"] = {loss: dict((cfg.get("loss_params") or {}).get(loss) or {})}
    return cfg


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mmpref demo --modality text", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo_out/text", help="output directory (stages are cached here)")
    p.add_argument("--loss", default="dpo", help="alignment loss (any name in `mmpref losses`; default dpo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="a smaller run (under a minute) for tests and CI")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the demo config, e.g. --set sft.run.max_steps=300 (repeatable)")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="demo config (default configs/demo_text.yaml)")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    """All stages; returns the report dict (also written to ``report.json`` / ``report.md``)."""
    t0 = time.perf_counter()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    cfg = load_demo_config(resolve_config(args.config), args.quick, args.loss, args.set)
    out = claim_folder(args.out, "mmpref demo --modality text", "--out", legacy=_written_by_the_text_demo)
    seed = args.seed
    key_data = fingerprint(cfg["task"], seed, DATA_VERSION)
    data = run_cached(out, "data", key_data, lambda: build_data(cfg, seed, out / "data"))
    key_model = fingerprint(key_data, cfg["model"])
    model = run_cached(out, "model", key_model, lambda: build_model(cfg, seed, out / "data", out / "model" / "init"))
    key_sft = fingerprint(key_model, cfg["sft"])
    sft = run_cached(out, "sft", key_sft, lambda: run_training(cfg["sft"], model["path"], out / "data" / "sft.jsonl",
                                                               out / "sft", seed))
    key_align = fingerprint(key_sft, cfg["align"])
    align = run_cached(out, "align", key_align, lambda: run_training(cfg["align"], sft["final"],
                                                                     out / "data" / "prefs.jsonl", out / "align", seed))
    examples = read_jsonl(out / "data" / "eval.jsonl")
    models = {"sft": (key_sft, sft["final"]), "aligned": (key_align, align["final"])}
    if cfg["eval"].get("control", False):
        control_cfg = copy.deepcopy(cfg["sft"])
        control_cfg["run"]["max_steps"] = align["steps"]  # compute-matched: as many steps as the alignment
        key_control = fingerprint(key_sft, control_cfg)
        control = run_cached(out, "sft_control", key_control, lambda: run_training(
            control_cfg, sft["final"], out / "data" / "sft.jsonl", out / "sft_control", seed))
        models = {"sft": models["sft"], "sft_control": (key_control, control["final"]), "aligned": models["aligned"]}
    online_steps, rm = {}, None
    if cfg["eval"].get("online", False):  # the SFT model on its own samples, judged each step or round
        arms = cfg.get("online_arms") or {}
        key_rm = None
        if any(_uses_reward_model(a) for a in arms.values()):
            rcfg = cfg["reward_model"]
            key_rm = fingerprint(key_sft, rcfg)
            rm = run_cached(out, "reward_model", key_rm, lambda: reward_model_stage(
                rcfg, cfg["task"], sft["final"], out / "data", out / "reward_model", seed))
        for name, arm in arms.items():
            key_arm = fingerprint(key_sft, arm, key_rm if _uses_reward_model(arm) else None)
            arm = _with_reward_model(arm, rm["path"] if rm else None)
            result = run_cached(out, name, key_arm, lambda arm=arm, name=name: run_training(
                arm, sft["final"], out / "data" / "online.jsonl", out / name, seed))
            models[name], online_steps[name] = (key_arm, result["final"]), result["steps"]
    rows, val_rows = ({name: run_cached(out, f"{split}_{name}", fingerprint(key, cfg["eval"]),
                                        lambda path=path, ex=ex: evaluate(path, ex, cfg["eval"]))["rows"]
                       for name, (key, path) in models.items()}
                      for split, ex in (("eval", examples), ("val", read_jsonl(out / "data" / "val.jsonl"))))
    info = {"loss": args.loss, "seed": seed, "quick": args.quick, "data": data, "model": model,
            "sft_steps": sft["steps"], "align_steps": align["steps"], "online_steps": online_steps,
            "online_judges": {n: _judge_name(a) for n, a in (cfg.get("online_arms") or {}).items()
                              if n in online_steps}, "reward_model": rm,
            "bootstrap": cfg["eval"]["bootstrap"], "align_metrics": align["metrics"],
            "command": "mmpref demo --modality text " + " ".join(args.argv)}
    report = build_report(info, rows, cfg["eval"]["bootstrap"], seed)
    report["validation"] = build_report({}, val_rows, cfg["eval"]["bootstrap"], seed)
    report["wall_s"] = time.perf_counter() - t0
    write_text_atomic(out / "report.json", json.dumps(report, indent=2))
    write_text_atomic(out / "report.md", render_markdown(report))
    print(f"[report] {report['verdict']} -> {out / 'report.md'}")
    return report


TEXT_DEMO_ENTRIES = ("data", "model", "sft", "align", "sft_control", "online", "online_dpo", "rso", "sppo",
                     "rso_rm", "reward_model", "eval_*", "val_*", "*.done.json",
                     "report.json", "report.md")


def _written_by_the_text_demo(entries: list[str]) -> bool:
    import fnmatch

    return all(any(fnmatch.fnmatch(e, p) for p in TEXT_DEMO_ENTRIES) for e in entries)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``mmpref demo --modality text`` (``mmpref.demo.main`` dispatches here)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.argv = argv
    import torch

    threads = torch.get_num_threads()
    # a ~100k-parameter model gains nothing from intra-op threads, and on a busy 2-core machine spinning OpenMP
    # threads made each step >10x slower (measured); one thread keeps the demo's time predictable
    torch.set_num_threads(1)
    try:
        run(args)
    finally:
        torch.set_num_threads(threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
