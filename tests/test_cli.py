"""The ``mmpref`` command: errors name the file and key, ``losses`` lists the core, ``train`` runs LLM and Tango 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.tiny_llm import tiny_llm_overrides, write_tiny_llm_assets

from mmpref.cli import main
from mmpref.losses import available_losses, get_loss

ROOT = Path(__file__).resolve().parents[1]
MMPREF = Path(sys.executable).parent / "mmpref"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def llm_assets(tmp_path_factory) -> dict[str, str]:
    return write_tiny_llm_assets(tmp_path_factory.mktemp("cli-llm"))


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ----- the command itself ---------------------------------------------------------------------------------------------
def test_console_script_without_arguments_prints_usage_and_exits_2():
    proc = subprocess.run([str(MMPREF)], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2
    for command in ("train", "generate", "synth", "demo", "losses"):
        assert f"mmpref {command}" in proc.stdout


def test_unknown_command_exits_2_and_lists_the_commands(capsys):
    assert main(["trian"]) == 2
    err = capsys.readouterr().err
    assert "unknown command 'trian'" in err
    assert "train, generate, synth, demo, losses" in err


def test_help_exits_0(capsys):
    assert main(["--help"]) == 0
    assert "mmpref train CONFIG" in capsys.readouterr().out
    assert main(["train", "--help"]) == 0
    assert main(["train"]) == 2  # no config given


def test_losses_lists_every_loss_with_its_parameters(capsys):
    assert main(["losses"]) == 0
    lines = capsys.readouterr().out.splitlines()
    listed = {line.split()[0]: line for line in lines if line.strip()}
    assert sorted(listed) == sorted(available_losses())
    for name, line in listed.items():
        loss = get_loss(name)
        assert ("reference-free" not in line) == loss.needs_reference, line
        for param, default in loss.params.items():
            assert f"{param}={default}" in line, (name, param)


# ----- train: bad configs fail before any work, naming file and key ---------------------------------------------------
def test_train_unknown_key_in_file_exits_1_naming_file_and_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "configs" / "llm_dpo_tiny.yaml").read_text().replace("lr: 3.0e-3", "lrr: 3.0e-3"))
    assert main(["train", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}: optim.lrr: unknown key" in err
    assert "lr" in err.split("accepts", 1)[1]  # and says what is accepted


def test_train_bad_override_exits_1_naming_key_and_override(capsys):
    config = ROOT / "configs" / "llm_dpo_tiny.yaml"
    assert main(["train", str(config), "run.batch_size=four"]) == 1
    err = capsys.readouterr().err
    assert f"{config}: run.batch_size" in err
    assert "expected int, got 'four'" in err and "override 'run.batch_size=four'" in err


def test_override_words_no_and_off_stay_strings():
    """YAML 1.1 would turn `run.mixed_precision=no` into False; on the command line it means "no"."""
    from mmpref.config import ConfigError, load_config

    cfg = load_config(ROOT / "configs" / "llm_dpo_tiny.yaml", ["run.mixed_precision=no", "run.cpu=true"])
    assert cfg.run.mixed_precision == "no" and cfg.run.cpu is True
    with pytest.raises(ConfigError, match="lora.enabled .*expected bool, got 'yes'"):
        load_config(ROOT / "configs" / "llm_dpo_tiny.yaml", ["lora.enabled=yes"])


def test_train_missing_config_file_exits_1(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 1
    assert "nope.yaml" in capsys.readouterr().err


def test_train_missing_model_path_exits_1_naming_the_key(tmp_path, capsys):
    # mixed_precision=no, cpu: accelerate's state is a per-process singleton that later Accelerators must match
    config = ROOT / "configs" / "llm_dpo.yaml"
    overrides = ["run.mixed_precision=no", "run.cpu=true", f"run.output_dir={tmp_path / 'run'}"]
    code = main(["train", str(config), *overrides])
    assert code == 1
    assert "model.path: '/path/to/your/sft-model' does not exist" in capsys.readouterr().err


# ----- train end to end -----------------------------------------------------------------------------------------------
def test_train_tiny_llm_config_end_to_end(llm_assets, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    overrides = [*tiny_llm_overrides(llm_assets, out), f"data.eval_split={llm_assets['heldout']}", "run.max_steps=3"]
    assert main(["train", str(ROOT / "configs" / "llm_dpo_tiny.yaml"), *overrides]) == 0
    assert f"done: 3 steps; final model in {out / 'final'}" in capsys.readouterr().out
    logged = metrics(out)
    assert [m["step"] for m in logged] == [1, 2, 3] and all(m["phase"] == "train" for m in logged)
    assert logged[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # step 1: policy == reference
    trained = AutoModelForCausalLM.from_pretrained(out / "final")
    start = AutoModelForCausalLM.from_pretrained(llm_assets["model"])
    moved = [n for n, p in trained.state_dict().items() if not torch.equal(p, start.state_dict()[n])]
    assert moved, "three DPO steps should change the weights"


def test_train_tango2_tiny_recipe_switches_phase_and_saves_a_pipeline(tmp_path, monkeypatch, capsys):
    """configs/tango2_dpo_tiny.yaml as shipped, on 8 groups: 2 SFT steps on the winners, then 2 DPO steps."""
    from mmpref.models.tango import TangoPipeline

    monkeypatch.setenv("MMPREF_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "run"
    config = ROOT / "configs" / "tango2_dpo_tiny.yaml"
    assert main(["train", str(config), "data.path=tiny:8:1", f"run.output_dir={out}"]) == 0
    assert "done: 4 steps" in capsys.readouterr().out
    logged = metrics(out)
    assert [(m["step"], m["phase"]) for m in logged] == [(1, "sft"), (2, "sft"), (3, "dpo"), (4, "dpo")]
    # SFT scores winners only (no reward metrics); DPO logs Tango 2's preference metrics
    assert all("rewards/accuracies" not in m for m in logged[:2])
    assert all({"rewards/accuracies", "rewards/margins", "diffusion/mse_policy_rejected"} <= m.keys()
               for m in logged[2:])
    assert logged[0]["lr"] == 0.0 and logged[1]["lr"] == pytest.approx(1e-3 / 2)  # linear warmup over 2 steps
    loaded = TangoPipeline.from_pretrained(out / "final")
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    start = TangoPipeline.from_preset("tiny", seed=0)
    assert any(not torch.equal(p, start.unet.state_dict()[n]) for n, p in loaded.unet.state_dict().items())
    for part in ("vae", "text_encoder", "vocoder"):  # frozen parts are saved unchanged
        for n, p in getattr(loaded, part).state_dict().items():
            assert torch.equal(p, getattr(start, part).state_dict()[n]), (part, n)


def test_help_is_plain_text_and_generate_help_imports_no_models():
    import io
    import subprocess
    import sys
    from contextlib import redirect_stdout

    from mmpref.cli import main

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["--help"]) == 0
    assert "``" not in buf.getvalue() and "mmpref recipes" in buf.getvalue()
    code = ("import sys; from mmpref.generate import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"  # the parser (and --help) needs none of them


def test_recipes_lists_the_packaged_configs(capsys):
    from mmpref.cli import main

    assert main(["recipes"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert "llm_dpo_tiny" in names and "tango2_dpo" in names and len(names) == len(set(names)) >= 20
