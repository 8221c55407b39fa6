"""``mmpref generate``: samples from a trained policy, to listen to or read what it learned.

    mmpref generate --model DIR --prompt "a dog barks" [--prompt ...] [--prompts-file F] --out DIR \\
        [--steps 100] [--guidance 3.0] [--duration 10.0] [--seed 0] [--num-samples 1] [--batch-size N]
    mmpref generate --model LLM_DIR --prompts-file prompts.txt --out DIR \\
        [--max-new-tokens 128] [--temperature 1.0] [--top-p 1.0] [--greedy] [--seed 0] [--num-samples 1]

A :class:`TangoPipeline` or diffusers ``AudioLDM2Pipeline`` folder (or ``preset:NAME``) gives audio:
``{index:05d}_{sample}_{slug}.wav`` per clip. A
causal LM folder (any ``AutoModelForCausalLM`` saved with ``save_pretrained``, e.g. ``mmpref train``'s ``final/``)
gives text. Either way ``generations.jsonl`` records each sample (prompt, file or completion, seed, settings).
``--out`` must be new or empty; ``--overwrite`` replaces an earlier generation there (only the files its
``generations.jsonl`` lists are removed), so a folder never holds clips of two runs.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

from mmpref.errors import DataError, RunFolderError, writing_to
from mmpref.io import write_jsonl_atomic
from mmpref.sources import check_source, loading

if TYPE_CHECKING:  # torch and the models load after the arguments parse: `mmpref generate --help` stays instant
    import torch

GENERATIONS = "generations.jsonl"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmpref generate", description="Generate audio (Tango / AudioLDM 2) or text.")
    p.add_argument("--model", required=True, help="TangoPipeline or AudioLDM2Pipeline folder, or preset:NAME "
                   "(e.g. preset:tiny, preset:audioldm2-tiny)")
    p.add_argument("--tokenizer", help="audio: a local FLAN-T5 tokenizer folder, replacing (or supplying) the "
                                       "pipeline's")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="text file, one prompt per line (blank lines skipped)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--steps", type=_at_least(1, int), default=100)
    p.add_argument("--guidance", type=_at_least(0, float), default=3.0)
    p.add_argument("--duration", type=_positive_seconds, default=10.0, help="seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=_at_least(1, int), default=1, help="samples per prompt")
    p.add_argument("--batch-size", type=_at_least(1, int), default=None)
    p.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, cuda:N")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.add_argument("--max-new-tokens", type=_at_least(1, int), default=128, help="text: tokens per completion")
    p.add_argument("--temperature", type=_positive, default=1.0, help="text: sampling temperature")
    p.add_argument("--top-p", type=_probability, default=1.0, help="text: nucleus sampling mass")
    p.add_argument("--greedy", action="store_true", help="text: greedy decoding instead of sampling")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier generation in --out")
    p.add_argument("--progress", action="store_true")
    return p


def _at_least(low: float, kind: type):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got "
                                             f"{text!r}") from None
        if not (math.isfinite(value) and value >= low):
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {text}")
        return value

    return parse


def _positive(text: str, unit: str = "") -> float:
    value = _at_least(0, float)(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0{unit}, got {text}")
    return value


def _probability(text: str) -> float:
    value = _positive(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _positive_seconds(text: str) -> float:
    return _positive(text, " seconds")


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = [p.strip() for p in args.prompt]
    if any(not p for p in prompts):
        raise DataError("--prompt: an empty prompt; give the text to generate")
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise DataError(f"--prompts-file: {path} {'is a folder' if path.is_dir() else 'does not exist'}")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise DataError(f"--prompts-file: {path} is not UTF-8 text ({e.reason}); one prompt per line") from None
        prompts += [line.strip() for line in lines if line.strip()]
        if not any(line.strip() for line in lines):
            raise DataError(f"--prompts-file: {path} has no prompts (one per line)")
    if not prompts:
        raise DataError("give --prompt TEXT or --prompts-file FILE")
    return prompts


def _check_output(out: Path, overwrite: bool) -> None:
    """A new or empty folder; or, with ``overwrite``, one holding an earlier generation."""
    if out.exists() and not out.is_dir():
        raise RunFolderError(f"--out: {out} is a file; give a folder")
    entries = [p for p in out.iterdir() if not p.name.startswith(".")] if out.is_dir() else []
    if not entries:
        return
    earlier = out / GENERATIONS
    if not earlier.exists():
        raise RunFolderError(f"--out: {out} is not empty and holds no earlier generation; give a new or empty folder "
                             "(nothing there is touched)")
    if not overwrite:
        raise RunFolderError(f"--out: {out} holds an earlier generation; add --overwrite to replace it, or give a "
                             "new folder")


def _remove_earlier(out: Path) -> None:
    """The clips an earlier generation listed in its ``generations.jsonl``, and that file (nothing else)."""
    earlier = out / GENERATIONS
    if not earlier.exists():
        return
    for line in earlier.read_text(encoding="utf-8").splitlines():
        try:
            name = json.loads(line)["file"]
        except (ValueError, KeyError, TypeError):
            continue
        if "/" not in name and (out / name).is_file():
            (out / name).unlink()
    earlier.unlink()


def _slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:n] or "empty"


def load_pipeline(model: str, dtype: torch.dtype | None = None, tokenizer: str | None = None):
    from mmpref.models.pipelines import pipeline_from_preset, pipeline_from_pretrained, preset_names

    if model.startswith("preset:"):
        name = model.split(":", 1)[1]
        if name not in preset_names():
            raise DataError(f"--model: unknown preset {name!r}; choose one of {', '.join(preset_names())}")
        return pipeline_from_preset(name, tokenizer=tokenizer)
    check_source(model, "--model", "a TangoPipeline / AudioLDM2Pipeline folder (or preset:NAME)")
    if tokenizer is not None:
        check_source(tokenizer, "--tokenizer", "a tokenizer folder")
    with loading("--model", model, "a TangoPipeline / AudioLDM2Pipeline folder"):
        return pipeline_from_pretrained(model, torch_dtype=dtype, tokenizer=tokenizer)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prompts = _prompts(args)
    out = Path(args.out)
    _check_output(out, args.overwrite)
    import torch

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise DataError(f"--device {args.device}: no CUDA device here; use --device cpu")
    dtype = getattr(torch, args.dtype)
    with writing_to(out):
        if is_text_model(args.model):
            return _generate_text(args, prompts, out, dtype)
        return _generate(args, prompts, out, load_pipeline(args.model, dtype, args.tokenizer).to(args.device, dtype))


def is_text_model(model: str) -> bool:
    """A causal LM folder: a transformers ``config.json`` and no pipeline index."""
    path = Path(model)
    return (path / "config.json").is_file() and not (path / "pipeline.json").exists() \
        and not (path / "model_index.json").exists()  # a pipeline folder (either layout) is not a text model


def _generate_text(args: argparse.Namespace, prompts: list[str], out: Path, dtype: torch.dtype) -> int:
    """Completions of each prompt (``--num-samples`` each; sample j of prompt i seeded by ``(seed, i)``)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mmpref.data.llm import encode_prompt
    from mmpref.models.sampling import generate_completions, sample_completions

    with loading("--model", args.model, "a causal LM folder"):
        tok = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device).eval()
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    records = []
    for i, prompt in enumerate(prompts):
        ids = encode_prompt(tok, prompt)
        if args.greedy:
            completions = generate_completions(model, [ids], pad, tok.eos_token_id, args.max_new_tokens,
                                               do_sample=False) * args.num_samples
        else:
            g = torch.Generator().manual_seed(args.seed * 1_000_003 + i)
            completions = sample_completions(model, ids, args.num_samples, tok.eos_token_id, args.max_new_tokens, g,
                                             temperature=args.temperature, top_p=args.top_p)
        for j, c in enumerate(completions):
            records.append({"prompt": prompt, "sample": j, "completion": tok.decode(c, skip_special_tokens=True),
                            "seed": args.seed, "greedy": args.greedy, "temperature": args.temperature,
                            "top_p": args.top_p, "max_new_tokens": args.max_new_tokens, "model": args.model})
    _remove_earlier(out)
    write_jsonl_atomic(out / GENERATIONS, records)
    print(f"wrote {len(records)} completions to {out / GENERATIONS}")
    return 0


def _generate(args: argparse.Namespace, prompts: list[str], out: Path, pipe) -> int:
    from mmpref.audio import save_audio

    waves = pipe(prompts, duration_s=args.duration, num_inference_steps=args.steps, guidance_scale=args.guidance,
                 seed=args.seed, batch_size=args.batch_size, num_samples_per_prompt=args.num_samples,
                 progress=args.progress)
    _remove_earlier(out)  # only now: a generation that fails leaves the earlier one as it was
    records = []
    for i, wave in enumerate(waves):
        p_idx, s_idx = divmod(i, args.num_samples)
        name = f"{p_idx:05d}_{s_idx}_{_slug(prompts[p_idx])}.wav"
        save_audio(out / name, wave, pipe.mel_config.sample_rate)
        records.append({"prompt": prompts[p_idx], "sample": s_idx, "file": name, "seed": args.seed,
                        "steps": args.steps, "guidance": args.guidance, "duration": args.duration,
                        "model": args.model})
    write_jsonl_atomic(out / GENERATIONS, records)
    print(f"wrote {len(records)} clips to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
