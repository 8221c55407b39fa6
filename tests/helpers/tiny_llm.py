"""A tiny Llama, its local tokenizer and a small preference set on disk, as examples/llm_dpo_tiny.py builds them."""

from __future__ import annotations

import json
from pathlib import Path

from mmpref.toy.llm import build_tiny_llama, synthetic_preferences


def write_tiny_llm_assets(root: Path, rows: int = 32, heldout: int = 8) -> dict[str, str]:
    """``model`` (folder), ``prefs`` and ``heldout`` (JSONL) under ``root``; small enough for one-step tests."""
    root.mkdir(parents=True, exist_ok=True)
    train_rows, heldout_rows = synthetic_preferences(rows, seed=0), synthetic_preferences(heldout, seed=1)
    paths = {"prefs": root / "prefs.jsonl", "heldout": root / "heldout.jsonl"}
    for key, data in (("prefs", train_rows), ("heldout", heldout_rows)):
        paths[key].write_text("\n".join(json.dumps(r) for r in data))
    texts = [r["prompt"] + r["chosen"] + r["rejected"] for r in train_rows]
    model = build_tiny_llama(root / "model", texts * 4, vocab_size=300, hidden_size=32, intermediate_size=64)
    return {"model": str(model), **{k: str(v) for k, v in paths.items()}}


def tiny_llm_overrides(assets: dict[str, str], output_dir: Path) -> list[str]:
    """``key=value`` overrides that point any configs/llm_*.yaml at the tiny assets, on CPU in float32."""
    return [
        f"model.path={assets['model']}",
        "model.torch_dtype=float32",
        "model.gradient_checkpointing=false",
        f"data.path={assets['prefs']}",
        "data.max_length=64",
        "data.max_prompt_length=32",
        "run.mixed_precision=no",
        "run.cpu=true",
        "run.batch_size=2",
        "run.grad_accum=1",
        "run.eval_every=null",
        "run.log_every=1",
        "run.resume=false",
        f"run.output_dir={output_dir}",
    ]
