"""Bad input through the ``mmpref`` command: one line naming the file / line / key and what to do, a non-zero exit,
no traceback, and nothing lost.

Each case below sets up a sandbox folder and returns the command line (or, for inputs the command line cannot
express, such as a scorer returning NaN, a call that raises). The runner checks, for every case:

* the exit status (1 for bad input; 2 for argument errors);
* exactly one ``mmpref <command>: ...`` line on stderr, holding every expected fragment;
* no traceback anywhere in the output;
* every file in the sandbox outside the case's own output is byte-for-byte unchanged (``own`` names the paths a
  failing command may leave behind; by default none).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers.tiny_llm import tiny_llm_overrides, write_tiny_llm_assets

from mmpref.cli import main
from mmpref.errors import describe

ROOT = Path(__file__).resolve().parents[1]
LLM_TINY = str(ROOT / "configs" / "llm_dpo_tiny.yaml")
TANGO_TINY = str(ROOT / "configs" / "tango2_dpo_tiny.yaml")
SYNTH_TINY = str(ROOT / "configs" / "synth_tiny.yaml")
CAPTIONS = ROOT / "tests" / "data" / "captions_audiocaps.jsonl"
FAST_SYNTH = ["generation.duration_s=0.5", "generation.steps=2", "generation.resample_steps=[1,2]",
              "generation.guidance_scale=1.0", "max_captions=4"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclass
class Case:
    id: str
    setup: Callable[[Path, dict], list[str] | Callable[[], object]]
    expect: list[str]
    rc: int = 1
    own: list[str] = field(default_factory=list)  # sandbox paths the failing command may write


CASES: list[Case] = []


def case(id: str, *expect: str, rc: int = 1, own: tuple[str, ...] = ()):
    def register(fn):
        CASES.append(Case(id, fn, list(expect), rc, list(own)))
        return fn

    return register


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, str]:
    return write_tiny_llm_assets(tmp_path_factory.mktemp("bad-inputs-llm"))


def llm(a: dict, ws: Path, *extra: str, data: Path | str | None = None) -> list[str]:
    """``mmpref train`` of the tiny LLM config into ``ws/run``, 2 steps."""
    over = [o for o in tiny_llm_overrides(a, ws / "run") if not o.startswith("data.path=")]
    return ["train", LLM_TINY, *over, f"data.path={data or a['prefs']}", "data.eval_split=null", "run.max_steps=2",
            *extra]


def rows(a: dict, n: int = 8) -> list[dict]:
    return [json.loads(line) for line in Path(a["prefs"]).read_text().splitlines()[:n]]


def write_jsonl(path: Path, data: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    return path


# ----- configs -------------------------------------------------------------------------------------------------------
@case("config-missing", "nope.yaml", "does not exist")
def _(ws, a):
    return ["train", str(ws / "nope.yaml")]


@case("config-is-a-folder", "is a folder")
def _(ws, a):
    return ["train", str(ws)]


@case("config-invalid-yaml", "bad.yaml: line 4: invalid YAML")
def _(ws, a):
    (ws / "bad.yaml").write_text("modality: llm\ntrain:\n  batch_size: [4\n")
    return ["train", str(ws / "bad.yaml")]


@case("config-top-level-list", "bad.yaml: the top level must be a mapping")
def _(ws, a):
    (ws / "bad.yaml").write_text("- a\n- b\n")
    return ["train", str(ws / "bad.yaml")]


@case("config-unknown-key", "llm_dpo_tiny.yaml: optim.lrr (from override 'optim.lrr=1e-5'): unknown key")
def _(ws, a):
    return llm(a, ws, "optim.lrr=1e-5")


@case("override-without-equals", "override 'optim.lr' must look like key.sub=value")
def _(ws, a):
    return llm(a, ws, "optim.lr")


@case("override-list-index-out-of-range", "phases.3", "the list has")
def _(ws, a):
    return ["train", TANGO_TINY, "phases.3.epochs=1"]


@pytest.mark.parametrize("key, value, fragment", [
    ("optim.lr", "0", "must be a positive number"),
    ("optim.lr", "-1e-5", "must be a positive number"),
    ("optim.lr", ".nan", "must be a positive number"),
    ("optim.scheduler", "cosinee", "must be one of linear, cosine, constant"),
    ("optim.betas", "[0.9]", "must be two numbers in [0, 1)"),
    ("optim.warmup_steps", "-1", "must be >= 0"),
    ("optim.max_grad_norm", "0", "must be > 0 or null"),
    ("run.save_every", "0", "must be >= 1"),
    ("run.log_every", "0", "must be >= 1"),
    ("run.batch_size", "0", "must be >= 1"),
    ("run.grad_accum", "0", "must be >= 1"),
    ("run.keep_checkpoints", "0", "must be >= 1"),
    ("run.epochs", "0", "must be > 0"),
    ("run.max_steps", "0", "must be >= 1 or null"),
    ("run.mixed_precision", "fp8", "must be one of no, bf16, fp16"),
    ("run.eval_every", "0", "must be >= 1 or null"),
    ("reference.mode", "copyy", "must be one of copy, lora, cached, none"),
    ("lora.r", "0", "must be >= 1"),
    ("data.max_length", "abc", "expected int, got 'abc'"),
])
def test_bad_config_values_name_the_key_before_any_work(key, value, fragment, tmp_path, assets, capsys):
    """Numbers that crash in the loop or in torch (save_every=0, lr<0) or train to no effect (lr=0) are refused
    when the config is read, naming the key and the override."""
    argv = llm(assets, tmp_path, f"{key}={value}")
    before = snapshot(tmp_path)
    assert main(argv) == 1
    line = one_line(capsys, "train")
    assert f"llm_dpo_tiny.yaml: {key}" in line and f"(from override '{key}={value}')" in line and fragment in line
    assert snapshot(tmp_path) == before


def test_numbers_as_python_writes_them_parse_everywhere(tmp_path):
    """`optim.lr=1e-5` (the example in `mmpref train --help`) is a float in overrides and files, for every config."""
    from mmpref.config import load_config
    from mmpref.demo.stages import DemoConfig
    from mmpref.synthesis import load_synth_config

    cfg = load_config(LLM_TINY, ["optim.lr=1e-5", "optim.eps=1E-8", "run.mixed_precision=no"])
    assert cfg.optim.lr == 1e-5 and cfg.optim.eps == 1e-8 and cfg.run.mixed_precision == "no"
    (tmp_path / "f.yaml").write_text("defaults: [" + LLM_TINY + "]\noptim: {lr: 2e-5, weight_decay: 1e-2}\n")
    cfg = load_config(tmp_path / "f.yaml")
    assert cfg.optim.lr == 2e-5 and cfg.optim.weight_decay == 0.01
    synth = load_synth_config(SYNTH_TINY, ["scorers.tiny_clap.delta_min=1e-3", "mixed_precision=no"])
    assert synth.scorers["tiny_clap"].delta_min == 1e-3 and synth.mixed_precision == "no"
    demo = DemoConfig.load(ROOT / "configs" / "demo_quick.yaml", ["align.lr=5e-5", "vae.lr=1e-3"])
    assert demo.align.lr == 5e-5 and demo.vae.lr == 1e-3
    (tmp_path / "d.yaml").write_text("vae: {steps: 10}\n")
    partial = DemoConfig.load(tmp_path / "d.yaml")  # a partial section keeps its default's other values
    assert (partial.vae.steps, partial.vae.batch_size, partial.vae.lr) == (10, 16, 2e-3)


# ----- LLM data ------------------------------------------------------------------------------------------------------
@case("data-empty-file", "empty.jsonl: the file is empty")
def _(ws, a):
    (ws / "empty.jsonl").write_text("")
    return llm(a, ws, data=ws / "empty.jsonl")


@case("data-blank-lines-only", "blank.jsonl: the file is empty")
def _(ws, a):
    (ws / "blank.jsonl").write_text("\n  \n\n")
    return llm(a, ws, data=ws / "blank.jsonl")


@case("data-malformed-jsonl-line", "bad.jsonl: line 3: not valid JSON")
def _(ws, a):
    lines = Path(a["prefs"]).read_text().splitlines()[:6]
    lines[2] = lines[2][:-5]  # cut the closing quote and brace
    (ws / "bad.jsonl").write_text("\n".join(lines) + "\n")
    return llm(a, ws, data=ws / "bad.jsonl")


@case("data-line-not-an-object", "bad.jsonl: line 2: a JSON list, expected an object")
def _(ws, a):
    data = rows(a, 4)
    (ws / "bad.jsonl").write_text(json.dumps(data[0]) + "\n" + json.dumps(["x"]) + "\n" + json.dumps(data[1]) + "\n")
    return llm(a, ws, data=ws / "bad.jsonl")


@case("data-missing-column", "cols.jsonl [train]: missing column(s) ['rejected']", "rejected_column")
def _(ws, a):
    return llm(a, ws, data=write_jsonl(ws / "cols.jsonl", [{"prompt": "a", "chosen": "b"}] * 3))


@case("data-chosen-equals-rejected", "same.jsonl [train]: 2 of 8 rows invalid", "chosen == rejected (line 3, line 6)",
      "data.skip_invalid=true")
def _(ws, a):
    data = rows(a)
    for i in (2, 5):
        data[i]["rejected"] = data[i]["chosen"]
    return llm(a, ws, data=write_jsonl(ws / "same.jsonl", data))


@case("data-prompt-not-a-string", "num.jsonl [train]: 1 of 8 rows invalid", "non-string prompt (line 4)")
def _(ws, a):
    data = rows(a)
    data[3]["prompt"] = 7
    return llm(a, ws, data=write_jsonl(ws / "num.jsonl", data))


@case("data-all-rows-invalid", "all.jsonl [train]: 3 of 3 rows invalid", "no valid row is left")
def _(ws, a):
    return llm(a, ws, "data.skip_invalid=true", data=write_jsonl(ws / "all.jsonl", [{"prompt": "", "chosen": "a",
                                                                                      "rejected": "b"}] * 3))


@case("data-identical-after-truncation", "trunc.jsonl [train]", "chosen and rejected identical once cut to "
      "max_length=16 tokens (raise data.max_length) (line 1, line 2")
def _(ws, a):
    data = [{"prompt": r["prompt"], "chosen": r["chosen"] + " and the same long tail" * 8,
             "rejected": r["chosen"] + " and the same long tail" * 8 + " but a different end"} for r in rows(a, 4)]
    return llm(a, ws, "data.max_length=16", "data.max_prompt_length=8", data=write_jsonl(ws / "trunc.jsonl", data))


@case("data-path-missing", "data.path: ", "nope.jsonl' does not exist", "data.path=PATH")
def _(ws, a):
    return llm(a, ws, data=ws / "nope.jsonl")


@case("data-unknown-extension", "prefs.txt: cannot tell the format from the extension '.txt'", "data.format")
def _(ws, a):
    shutil.copy(a["prefs"], ws / "prefs.txt")
    return llm(a, ws, data=ws / "prefs.txt")


@case("data-format-unknown", "data.format must be one of auto, json, jsonl, parquet, csv; got 'xml'")
def _(ws, a):
    return llm(a, ws, "data.format=xml")


@case("data-garbage-parquet", "junk.parquet: not a readable Parquet file")
def _(ws, a):
    (ws / "junk.parquet").write_bytes(b"this is not parquet at all" * 10)
    return llm(a, ws, data=ws / "junk.parquet")


@case("data-eval-split-missing", "data.eval_split: ", "heldout.jsonl' does not exist")
def _(ws, a):
    return llm(a, ws, f"data.eval_split={ws / 'sub' / 'heldout.jsonl'}")


# ----- LLM models ----------------------------------------------------------------------------------------------------
@case("model-typo-looks-like-hub-id", "model.path: 'tiny-llamaa': not a local folder, and hub downloads are off")
def _(ws, a):
    return llm(a, ws, "model.path=tiny-llamaa")


@case("model-local-path-missing", "model.path: ", "/nope' does not exist", "model.path=PATH")
def _(ws, a):
    return llm(a, ws, f"model.path={ws / 'nope'}")


@case("model-folder-without-a-model", "model.path: ", "cannot be loaded as a tokenizer")
def _(ws, a):
    (ws / "empty_model").mkdir()
    (ws / "empty_model" / "README.md").write_text("nothing here")
    return llm(a, ws, f"model.path={ws / 'empty_model'}")


@case("model-needs-custom-code", "model.path: ", "needs its own Python code", "model.trust_remote_code=true")
def _(ws, a):
    model = ws / "custom"
    shutil.copytree(a["model"], model)
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "evil_llama"  # a type transformers does not know: only the folder's code could load it
    config["auto_map"] = {"AutoConfig": "modeling_evil.EvilConfig",
                          "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (model / "config.json").write_text(json.dumps(config))
    (model / "modeling_evil.py").write_text(f"open({str(ws / 'PWNED')!r}, 'w').write('x')\n")
    return llm(a, ws, f"model.path={model}")


class _Payload:
    """Unpickling this writes a file: proof that a pickle ran code."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@case("model-pickle-with-code", "model.path: ", "holds a pickle checkpoint", "safetensors")
def _(ws, a):
    model = ws / "pickled"
    shutil.copytree(a["model"], model)
    (model / "model.safetensors").unlink()
    with open(model / "pytorch_model.bin", "wb") as f:
        pickle.dump({"weights": _Payload(str(ws / "PWNED"))}, f)
    return llm(a, ws, f"model.path={model}")


# ----- run folders ---------------------------------------------------------------------------------------------------
@case("output-dir-is-a-file", "run.output_dir: ", "run is a file")
def _(ws, a):
    (ws / "run").write_text("my notes")
    return llm(a, ws)


@case("output-dir-holds-other-files", "run.output_dir: ", "is not empty (2 entries: notes.txt, thesis.tex) and "
      "holds no mmpref run", "nothing there is touched")
def _(ws, a):
    (ws / "run").mkdir()
    (ws / "run" / "notes.txt").write_text("mine")
    (ws / "run" / "thesis.tex").write_text("mine too")
    return llm(a, ws)


def finished_run(a: dict, ws: Path, *extra: str, data: Path | None = None) -> None:
    assert main(llm(a, ws, *extra, data=data)) == 0


@case("rerun-finished-without-resume", "holds an earlier run", "run.overwrite=true", "run.resume=true")
def _(ws, a):
    finished_run(a, ws)
    return llm(a, ws)  # the tiny overrides say run.resume=false


@case("resume-with-changed-lr", "holds a run with another config (optim.lr: 0.003 -> 1e-05)", "run.overwrite=true")
def _(ws, a):
    finished_run(a, ws)
    return llm(a, ws, "run.resume=true", "optim.lr=1e-5")


@case("resume-with-changed-batch-size", "(run.batch_size: 2 -> 4)")
def _(ws, a):
    finished_run(a, ws)
    return llm(a, ws, "run.resume=true", "run.batch_size=4")


@case("resume-with-changed-data", "holds a run trained on other data")
def _(ws, a):
    data = ws / "prefs.jsonl"
    shutil.copy(a["prefs"], data)
    finished_run(a, ws, data=data)
    lines = data.read_text().splitlines()
    data.write_text("\n".join(lines[1:]) + "\n")  # one row fewer
    os.utime(data, ns=(10**18, 10**18))
    return llm(a, ws, "run.resume=true", data=data)


@case("bad-data-into-a-finished-run", "chosen == rejected")
def _(ws, a):
    finished_run(a, ws, "run.resume=true")
    data = rows(a)
    data[0]["rejected"] = data[0]["chosen"]
    return llm(a, ws, "run.overwrite=true", data=write_jsonl(ws / "bad.jsonl", data))  # run/ must stay as it was


def _resumable(a: dict, ws: Path) -> list[str]:
    """A run of 4 steps with checkpoints at 2 and 4; returns the command that resumes it (2 more steps)."""
    assert main(llm(a, ws, "run.resume=true", "run.max_steps=4", "run.save_every=2",
                    "run.keep_checkpoints=3")) == 0
    return llm(a, ws, "run.resume=true", "run.max_steps=4", "run.save_every=2", "run.keep_checkpoints=3")


@case("all-checkpoints-broken", "no intact checkpoint to resume from", "checkpoint-00000004 (model.safetensors:",
      "checkpoint-00000002 (optimizer.bin:", "run.overwrite=true")
def _(ws, a):
    argv = _resumable(a, ws)
    run = ws / "run"
    truncate(run / "checkpoint-00000004" / "model.safetensors")
    truncate(run / "checkpoint-00000002" / "optimizer.bin")
    return argv


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


# ----- generate ------------------------------------------------------------------------------------------------------
@case("generate-duration-zero", "--duration: must be > 0 seconds, got 0", rc=2)
def _(ws, a):
    return ["generate", "--model", "preset:tiny", "--prompt", "a dog", "--duration", "0", "--out", str(ws / "o")]


@case("generate-steps-zero", "--steps: must be >= 1, got 0", rc=2)
def _(ws, a):
    return ["generate", "--model", "preset:tiny", "--prompt", "a dog", "--steps", "0", "--out", str(ws / "o")]


@case("generate-no-prompt", "give --prompt TEXT or --prompts-file FILE")
def _(ws, a):
    return ["generate", "--model", "preset:tiny", "--out", str(ws / "o")]


@case("generate-prompts-file-missing", "--prompts-file: ", "p.txt does not exist")
def _(ws, a):
    return ["generate", "--model", "preset:tiny", "--prompts-file", str(ws / "p.txt"), "--out", str(ws / "o")]


@case("generate-model-missing", "--model: ", "nope' does not exist")
def _(ws, a):
    return ["generate", "--model", str(ws / "nope"), "--prompt", "a dog", "--out", str(ws / "o")]


@case("generate-model-not-a-pipeline", "--model: ", "cannot be loaded as a TangoPipeline / AudioLDM2Pipeline folder")
def _(ws, a):
    (ws / "m").mkdir()
    return ["generate", "--model", str(ws / "m"), "--prompt", "a dog", "--out", str(ws / "o")]


@case("generate-unknown-preset", "--model: unknown preset 'huge'")
def _(ws, a):
    return ["generate", "--model", "preset:huge", "--prompt", "a dog", "--out", str(ws / "o")]


@case("generate-out-holds-other-files", "--out: ", "is not empty and holds no earlier generation")
def _(ws, a):
    (ws / "o").mkdir()
    (ws / "o" / "song.wav").write_bytes(b"RIFF")
    return ["generate", "--model", "preset:tiny", "--prompt", "a dog", "--steps", "1", "--duration", "0.2",
            "--out", str(ws / "o")]


@case("generate-out-holds-a-generation", "--out: ", "holds an earlier generation; add --overwrite")
def _(ws, a):
    argv = ["generate", "--model", "preset:tiny", "--prompt", "a dog", "--steps", "1", "--duration", "0.2",
            "--out", str(ws / "o")]
    assert main(argv) == 0
    return argv


# ----- audio data ----------------------------------------------------------------------------------------------------
def tones(ws: Path, n: int = 6) -> Path:
    from mmpref.toy.tones import make_tiny_preference_set

    return make_tiny_preference_set(ws / "tones", n=n, k=1)


def tango(ws: Path, data: Path, *extra: str) -> list[str]:
    return ["train", TANGO_TINY, f"data.path={data}", f"run.output_dir={ws / 'run'}",
            f"data.cache_dir={ws / 'cache'}", *extra]


@case("audio-loser-is-the-winner-file", "prefs.jsonl: 1 row(s) whose rejected audio is the chosen file itself (line 2)",
      "data.skip_invalid=true")
def _(ws, a):
    data = tones(ws)
    lines = [json.loads(x) for x in data.read_text().splitlines()]
    lines[1]["rejected"] = lines[1]["chosen"]
    write_jsonl(data, lines)
    return tango(ws, data)


@case("audio-loser-is-a-copy-of-the-winner", "1 group(s) whose rejected audio is the same as the chosen audio",
      own=("cache",))
def _(ws, a):
    data = tones(ws)
    lines = [json.loads(x) for x in data.read_text().splitlines()]
    shutil.copy(data.parent / lines[2]["chosen"], data.parent / "audio" / "copy.wav")
    lines[2]["rejected"] = "audio/copy.wav"
    write_jsonl(data, lines)
    return tango(ws, data)


@case("audio-malformed-jsonl-line", "prefs.jsonl: line 4: not valid JSON")
def _(ws, a):
    data = tones(ws)
    lines = data.read_text().splitlines()
    lines[3] = lines[3].replace('"chosen"', "chosen")
    data.write_text("\n".join(lines) + "\n")
    return tango(ws, data)


@case("audio-empty-file", "prefs.jsonl: the file is empty")
def _(ws, a):
    data = tones(ws)
    data.write_text("")
    return tango(ws, data)


@case("audio-missing-files", "2 of 12 audio files are invalid (2 missing)", "data.skip_invalid=true", own=("cache",))
def _(ws, a):
    data = tones(ws)
    for name in ("0001_w.wav", "0003_l0.wav"):
        (data.parent / "audio" / name).unlink()
    return tango(ws, data)


# ----- synth ---------------------------------------------------------------------------------------------------------
def synth(ws: Path, captions: Path, *extra: str) -> list[str]:
    return ["synth", SYNTH_TINY, f"captions={captions}", f"output_dir={ws / 'synth'}", *FAST_SYNTH, *extra]


@case("synth-caption-without-a-sound-event", "caps.txt: 2 caption(s) name no sound event (line 2: 'the the the'; "
      "line 4: 'quickly and slowly')", "fix or remove them")
def _(ws, a):
    (ws / "caps.txt").write_text("A dog barks\nthe the the\nRain falls on a roof\nquickly and slowly\n")
    return synth(ws, ws / "caps.txt")


@case("synth-captions-missing", "captions: ", "caps.txt does not exist")
def _(ws, a):
    return synth(ws, ws / "caps.txt")


@case("synth-captions-malformed-jsonl", "caps.jsonl: line 2: not valid JSON")
def _(ws, a):
    (ws / "caps.jsonl").write_text('{"caption": "a dog barks"}\n{"caption": "rain\n')
    return synth(ws, ws / "caps.jsonl")


@case("synth-scorer-path-missing", "scorers.tiny_clap.path: ", "clap' does not exist")
def _(ws, a):
    return synth(ws, CAPTIONS, f"scorers.tiny_clap.path={ws / 'clap'}")


@case("synth-output-dir-holds-other-files", "output_dir: ", "is not empty (mine.txt) and holds no synthesis run")
def _(ws, a):
    (ws / "synth").mkdir()
    (ws / "synth" / "mine.txt").write_text("mine")
    return synth(ws, CAPTIONS)


@case("synth-nothing-survives-the-filters", "0 pairs survived the filters", "'delta_min': 1.5", "nothing was "
      "written", own=("synth/shards", "synth/manifest.json", "synth/progress"))
def _(ws, a):
    return synth(ws, CAPTIONS, "scorers.tiny_clap.delta_min=1.5")


@case("synth-scorer-returns-nan", "scorer 'clap' returned nan for the clip of", "a scorer must return finite "
      "numbers", own=("synth/shards", "synth/manifest.json", "synth/progress"))
def _(ws, a):
    from mmpref.models.tango import TangoPipeline
    from mmpref.synthesis import run_synthesis
    from mmpref.synthesis.config import synth_config_from_dict

    raw = yaml.safe_load(Path(SYNTH_TINY).read_text())
    raw.update(captions=str(CAPTIONS), output_dir=str(ws / "synth"), max_captions=2,
               scorers={"clap": {"path": "callable"}})
    raw["generation"].update(duration_s=0.5, steps=2, resample_steps=[1, 2])

    def nan_scorer(texts, waves, sr):
        out = np.ones(len(waves))
        out[1] = np.nan
        return out

    return lambda: run_synthesis(synth_config_from_dict(raw), TangoPipeline.from_preset("tiny"), {"clap": nan_scorer})


# ----- demo ----------------------------------------------------------------------------------------------------------
@case("demo-config-missing", "--config: ", "nope.yaml does not exist")
def _(ws, a):
    return ["demo", "--config", str(ws / "nope.yaml"), "--out", str(ws / "d")]


@case("demo-fresh-on-a-folder-it-did-not-make", "--out: ", "is not empty (notes.txt, src) and was not made by mmpref "
      "demo", "nothing there is touched")
def _(ws, a):
    (ws / "notes.txt").write_text("mine")
    (ws / "src").mkdir()
    (ws / "src" / "code.py").write_text("print(1)")
    return ["demo", "--quick", "--fresh", "--out", str(ws)]


@case("demo-text-out-holds-other-files", "--out: ", "is not empty (notes.txt) and was not made by mmpref demo "
      "--modality text")
def _(ws, a):
    (ws / "t").mkdir()
    (ws / "t" / "notes.txt").write_text("mine")
    return ["demo", "--modality", "text", "--quick", "--out", str(ws / "t")]


# ----- operating-system errors ---------------------------------------------------------------------------------------
def _os_error(code: int):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    return fail


@case("disk-full-while-checkpointing", "no space left on ", "(writing ", "run)", own=("run",))
def _(ws, a):
    import mmpref.training.checkpoint as checkpoint

    argv = llm(a, ws)
    checkpoint.save_file = _os_error(errno.ENOSPC)  # restored by the runner
    return argv


@case("read-only-output", "cannot write ", "read-only file system", own=("run",))
def _(ws, a):
    import mmpref.training.checkpoint as checkpoint

    argv = llm(a, ws)
    checkpoint.save_file = _os_error(errno.EROFS)
    return argv


# ----- the runner ----------------------------------------------------------------------------------------------------
def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def one_line(capsys, command: str) -> str:
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.startswith(f"mmpref {command}: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_bad_input_gets_one_clean_line_and_loses_nothing(c: Case, tmp_path, assets, capsys, monkeypatch):
    import mmpref.training.checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "save_file", checkpoint.save_file)  # cases may replace it; undone after
    ws = tmp_path / "ws"
    ws.mkdir()
    target = c.setup(ws, assets)
    capsys.readouterr()
    before = snapshot(ws)
    if callable(target):
        try:
            target()
            rc, command = 0, "api"
        except Exception as e:  # noqa: BLE001 - what the command line prints for it
            print(f"mmpref api: {describe(e)}", file=__import__("sys").stderr)
            rc, command = 1, "api"
    else:
        try:
            rc = main(target)
        except SystemExit as e:  # argparse errors
            rc = e.code
        command = target[0]
    assert rc == c.rc
    if c.rc == 2:
        _, err = capsys.readouterr()
        assert "Traceback" not in err and all(x in err for x in c.expect), err
    else:
        line = one_line(capsys, command)
        for fragment in c.expect:
            assert fragment in line, line
    after = snapshot(ws)
    own = tuple(c.own)
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k) and not k.startswith(own)}
    assert not changed, f"files changed outside the run's own: {sorted(changed)[:5]}"
    assert not (ws / "PWNED").exists(), "untrusted code ran"


def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, assets, capsys):
    """A truncated file in the newest checkpoint: warn naming it, resume from the older one, finish the run with
    the same weights as an uninterrupted run."""
    import torch
    from safetensors.torch import load_file

    whole = tmp_path / "whole"
    whole.mkdir()
    assert main(llm(assets, whole, "run.max_steps=4", "run.save_every=2")) == 0
    ws = tmp_path / "ws"
    ws.mkdir()
    argv = _resumable(assets, ws)
    truncate(ws / "run" / "checkpoint-00000004" / "model.safetensors")
    capsys.readouterr()
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "mmpref: warning: skipping broken checkpoint(s) checkpoint-00000004 (model.safetensors:" in captured.err
    assert "resuming from checkpoint-00000002" in captured.err and "resumed from " in captured.out
    got, want = (load_file(str(d / "run" / "final" / "model.safetensors")) for d in (ws, whole))
    for name, value in want.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=0)


def test_a_crafted_pickle_in_a_checkpoint_never_runs(tmp_path, assets, capsys):
    """A checkpoint folder is data: accelerate's custom-state pickle is not loaded at all, and its RNG pickle only
    as plain tensors. Even with the manifest rewritten to match the payload, nothing executes."""
    from mmpref.training import checkpoint

    argv = _resumable(assets, tmp_path)
    ckpt = tmp_path / "run" / "checkpoint-00000004"
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl"):
        with open(ckpt / name, "wb") as f:
            pickle.dump({"x": _Payload(str(tmp_path / "PWNED"))}, f)
    marker = json.loads((ckpt / checkpoint.MARKER).read_text())
    marker["files"] = checkpoint._manifest(ckpt)  # an attacker controls the whole folder
    (ckpt / checkpoint.MARKER).write_text(json.dumps(marker))
    main(argv)
    capsys.readouterr()
    assert not (tmp_path / "PWNED").exists()


def test_partial_metrics_line_does_not_stop_a_resume(tmp_path, assets):
    argv = _resumable(assets, tmp_path)
    metrics = tmp_path / "run" / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 5, "loss": 0.')  # a kill mid-write
    assert main(argv) == 0
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3, 4]


def test_train_on_synth_dataset_folder(tmp_path, capsys):
    """`mmpref train data.path=<synth output>/dataset` reads the save_to_disk folder and finds its audio."""
    assert main(synth(tmp_path, CAPTIONS)) == 0
    assert main(["train", TANGO_TINY, f"data.path={tmp_path / 'synth' / 'dataset'}", "data.num_losers=1",
                 f"run.output_dir={tmp_path / 'run'}", f"data.cache_dir={tmp_path / 'cache'}", "data.duration_s=0.5",
                 "run.max_steps=2", "phases.0.max_steps=1", "phases.0.epochs=null"]) == 0
    assert "done: 2 steps" in capsys.readouterr().out


def test_demo_fresh_deletes_only_what_the_demo_wrote(tmp_path):
    """--fresh on a demo's own folder removes its stages and reports, and keeps a file the user put there."""
    from mmpref.demo.main import DEMO_ENTRIES, OWNER
    from mmpref.io import claim_folder, remove_owned

    out = claim_folder(tmp_path / "d", OWNER, "--out")
    for name in ("judge", "seed0", "plots"):
        (out / name).mkdir()
        (out / name / "x").write_text("demo")
    (out / "report.md").write_text("demo")
    (out / "my_notes.txt").write_text("user")
    kept = remove_owned(out, OWNER, DEMO_ENTRIES)
    assert kept == ["my_notes.txt"] and (out / "my_notes.txt").read_text() == "user"
    assert sorted(p.name for p in out.iterdir()) == [".mmpref-owner.json", "my_notes.txt"]
