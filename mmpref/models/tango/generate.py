"""``mmpref generate``: text-to-audio with a saved :class:`TangoPipeline` (or a preset), WAVs written atomically.

    mmpref generate --model DIR --prompt "a dog barks" [--prompt ...] [--prompts-file F] --out DIR \\
        [--steps 100] [--guidance 3.0] [--duration 10.0] [--seed 0] [--num-samples 1] [--batch-size N]

Output: ``{index:05d}_{sample}_{slug}.wav`` per clip and ``generations.jsonl`` (prompt, file, seed, settings).
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

import torch

from mmpref.audio import save_audio


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmpref generate", description="Generate audio with a Tango pipeline.")
    p.add_argument("--model", required=True, help="TangoPipeline folder, or preset:NAME (e.g. preset:tiny)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="text file, one prompt per line (blank lines skipped)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--duration", type=float, default=10.0, help="seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=1, help="samples per prompt")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.add_argument("--progress", action="store_true")
    return p


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        lines = Path(args.prompts_file).read_text(encoding="utf-8").splitlines()
        prompts += [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise SystemExit("mmpref generate: give --prompt or --prompts-file")
    return prompts


def _slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:n] or "empty"


def load_pipeline(model: str, dtype: torch.dtype | None = None):
    from mmpref.models.tango import TangoPipeline

    if model.startswith("preset:"):
        return TangoPipeline.from_preset(model.split(":", 1)[1])
    return TangoPipeline.from_pretrained(model, torch_dtype=dtype)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prompts = _prompts(args)
    dtype = getattr(torch, args.dtype)
    pipe = load_pipeline(args.model, dtype).to(args.device, dtype)
    waves = pipe(prompts, duration_s=args.duration, num_inference_steps=args.steps, guidance_scale=args.guidance,
                 seed=args.seed, batch_size=args.batch_size, num_samples_per_prompt=args.num_samples,
                 progress=args.progress)
    out = Path(args.out)
    records = []
    for i, wave in enumerate(waves):
        p_idx, s_idx = divmod(i, args.num_samples)
        name = f"{p_idx:05d}_{s_idx}_{_slug(prompts[p_idx])}.wav"
        save_audio(out / name, wave, pipe.mel_config.sample_rate)
        records.append({"prompt": prompts[p_idx], "sample": s_idx, "file": name, "seed": args.seed,
                        "steps": args.steps, "guidance": args.guidance, "duration": args.duration,
                        "model": args.model})
    tmp = out / ".generations.jsonl.tmp"
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    os.replace(tmp, out / "generations.jsonl")
    print(f"wrote {len(records)} clips to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
