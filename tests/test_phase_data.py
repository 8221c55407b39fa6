"""Phases with their own data and a reference taken from the previous phase (OpenBezoar: SFT on instruction data,
then DPO on preferences against the SFT model), LoRA folding, merged output, resume across the switch."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from mmpref.adapters.llm import LLMAdapter
from mmpref.adapters.lora import fold_lora, merged_weights
from mmpref.config import config_from_dict
from mmpref.errors import ConfigError
from mmpref.toy.llm import build_tiny_llama, synthetic_preferences
from mmpref.training import TrainingError, train


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("phases")
    prefs = synthetic_preferences(8, seed=3)
    instructions = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in synthetic_preferences(12, seed=4)]
    chats = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
             for r in instructions]
    texts = [r["prompt"] + r["chosen"] + r["rejected"] for r in prefs] + [r["completion"] for r in instructions]
    out = {"model": str(build_tiny_llama(root / "model", texts * 4, vocab_size=300, hidden_size=32,
                                         intermediate_size=64)), "root": str(root)}
    for name, rows in (("prefs", prefs), ("instructions", instructions), ("chats", chats)):
        out[name] = str(root / f"{name}.jsonl")
        Path(out[name]).write_text("\n".join(json.dumps(r) for r in rows))
    return out


def recipe(assets, out: Path, ref_mode: str = "lora", lora: bool = True, from_phase_start: bool = True,
           **run) -> dict:
    """SFT for one epoch of the instruction file (3 steps of 4 rows), then DPO on the preferences (2 steps)."""
    return {
        "modality": "llm",
        "model": {"path": assets["model"], "torch_dtype": "float32", "gradient_checkpointing": False},
        "data": {"path": assets["prefs"], "max_length": 64},
        "phases": [
            {"name": "sft", "loss": {"sft": 1.0}, "epochs": 1, "data": {"path": assets["instructions"]}},
            {"name": "dpo", "loss": {"dpo": {"beta": 0.5}}, "epochs": 1},
        ],
        "reference": {"mode": ref_mode, "from_phase_start": from_phase_start},
        "lora": {"enabled": lora, "r": 4, "alpha": 8},
        "optim": {"lr": 3e-2 if lora else 3e-3},
        "run": {"batch_size": 4, "cpu": True, "mixed_precision": "no", "log_every": 1, "merge_lora": lora,
                "output_dir": str(out), "seed": 0, **run},
    }


def logged(result) -> list[dict]:
    return [json.loads(line) for line in Path(result.metrics_file).read_text().splitlines()]


@pytest.mark.parametrize("ref_mode,lora", [("lora", True), ("copy", True), ("copy", False)])
def test_dpo_after_sft_compares_against_the_sft_model(assets, tmp_path, ref_mode, lora):
    result = train(config_from_dict(recipe(assets, tmp_path / "run", ref_mode, lora)))
    rows = logged(result)
    assert [r["phase"] for r in rows] == ["sft"] * 3 + ["dpo"] * 2  # 12 instruction rows, then 8 preference rows
    first_dpo = rows[3]
    # before its first update the DPO policy is the reference: every implicit reward is 0, the loss -log s(0)
    assert first_dpo["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert first_dpo["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)
    assert first_dpo["rewards/rejected"] == pytest.approx(0.0, abs=1e-5)
    assert rows[4]["loss"] != pytest.approx(math.log(2), abs=1e-4)  # and it moves from there
    # the saved model is one plain transformers checkpoint (LoRA merged) that computes what the policy computes
    plain = AutoModelForCausalLM.from_pretrained(result.final_dir)
    assert not any("lora" in n for n, _ in plain.named_parameters())
    ids = torch.tensor([[1, 20, 31, 42, 53, 64, 75]])
    policy = result.policy.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, policy(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
    if ref_mode == "copy":  # the frozen copy's weights are kept for resuming, and are the run's own files
        assert (Path(result.output_dir) / "reference" / "phase1-dpo.safetensors").is_file()
        again = recipe(assets, tmp_path / "run", ref_mode, lora, overwrite=True, max_steps=1)
        train(config_from_dict(again))  # overwrite removes what the first run wrote, reference/ included
        assert not (Path(result.output_dir) / "reference").exists()


def test_without_from_phase_start_the_reference_stays_the_starting_model(assets, tmp_path):
    rows = logged(train(config_from_dict(recipe(assets, tmp_path / "run", from_phase_start=False))))
    assert rows[3]["phase"] == "dpo"
    assert abs(rows[3]["rewards/chosen"]) > 1e-3  # the SFT phase moved the policy away from its start


def test_resume_inside_the_dpo_phase_restores_the_copied_reference(assets, tmp_path, monkeypatch):
    whole = logged(train(config_from_dict(recipe(assets, tmp_path / "whole", "copy", False))))
    calls = {"n": 0}
    scores = LLMAdapter.scores

    def crash_at_step_5(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated crash")
        return scores(self, *args, **kwargs)

    cfg = recipe(assets, tmp_path / "crash", "copy", False, save_every=1)
    monkeypatch.setattr(LLMAdapter, "scores", crash_at_step_5)
    with pytest.raises(TrainingError, match="step 5"):
        train(config_from_dict(copy.deepcopy(cfg)))
    monkeypatch.setattr(LLMAdapter, "scores", scores)
    resumed = logged(train(config_from_dict(cfg)))  # from checkpoint 4: one DPO step in, the reference from disk
    assert [r["step"] for r in resumed] == [r["step"] for r in whole]
    assert resumed[-1]["loss"] == pytest.approx(whole[-1]["loss"], abs=1e-6)
    assert resumed[-1]["rewards/chosen"] == pytest.approx(whole[-1]["rewards/chosen"], abs=1e-6)


def test_fold_lora_keeps_the_function_and_makes_it_the_disabled_model(assets):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(assets["model"]),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():  # a trained adapter: B is no longer zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.eval()
    ids = torch.tensor([[1, 5, 9, 14, 22, 30]])
    with torch.no_grad():
        before = model(input_ids=ids).logits
        expected = merged_weights(model)
        reference = copy.deepcopy(model).merge_and_unload()  # peft's own merge, as an independent check
        for k, v in reference.state_dict().items():
            torch.testing.assert_close(expected[k], v, atol=1e-6, rtol=0)
        assert fold_lora(model, seed=7) == 7 * 2  # 7 linear layers per block, 2 blocks
        torch.testing.assert_close(model(input_ids=ids).logits, before, atol=1e-5, rtol=1e-5)
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=ids).logits, before, atol=1e-5, rtol=1e-5)
    a = {n: p.clone() for n, p in model.named_parameters() if "lora_A" in n}
    other = get_peft_model(AutoModelForCausalLM.from_pretrained(assets["model"]),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    fold_lora(other, seed=7)
    for n, p in other.named_parameters():  # the same fresh A on every process that folds with the same seed
        if "lora_A" in n:
            torch.testing.assert_close(p, a[n], atol=0, rtol=0)
        if "lora_B" in n:
            assert not p.any()


def test_instruction_rows_in_both_layouts(assets):
    cfg = config_from_dict(recipe(assets, Path(assets["root"]) / "unused"))
    cfg.phases[0].data.path = assets["chats"]
    adapter = LLMAdapter(cfg)
    sft_rows, dpo_rows = adapter.phase_train_datasets
    assert len(sft_rows) == 12 and len(dpo_rows) == 8
    tok, row = adapter.tokenizer, sft_rows[0]
    first = json.loads(Path(assets["chats"]).read_text().splitlines()[0])["messages"]
    whole = tok.apply_chat_template(first, tokenize=False)  # prompt + reply as the template renders them
    assert tok.decode(row["prompt_ids"] + row["completion_ids"][0]) == whole
    assert len(row["completion_ids"]) == 1  # a winner and no losers


def test_phase_data_errors_name_the_phase(assets, tmp_path):
    bad = recipe(assets, tmp_path / "a")
    bad["phases"][0]["data"]["pathh"] = "x"
    with pytest.raises(ConfigError, match=r"phases\.0\.data\.pathh: unknown key"):
        config_from_dict(bad)
    swapped = recipe(assets, tmp_path / "b")
    swapped["phases"][1]["data"] = {"path": assets["instructions"]}
    with pytest.raises(ConfigError, match=r"phases\.1\.loss \(phase 'dpo', loss 'dpo'\): phases\.1\.data\.path .* "
                                          "without losers"):
        LLMAdapter(config_from_dict(swapped))
    cached = recipe(assets, tmp_path / "c", ref_mode="cached", lora=False)
    with pytest.raises(ConfigError, match="from_phase_start .*mode=cached computes it once"):
        LLMAdapter(config_from_dict(cached))


def test_the_diffusion_adapter_refuses_phase_data_before_loading(tmp_path):
    from mmpref.adapters.diffusion import DiffusionAdapter

    cfg = config_from_dict({
        "modality": "diffusion", "model": {"pipeline": str(tmp_path / "nowhere")}, "data": {"path": "x.jsonl"},
        "phases": [{"name": "sft", "loss": {"sft": 1.0}, "epochs": 1, "data": {"path": "y.jsonl"}},
                   {"name": "dpo", "loss": {"dpo": {"beta": 2000}}}],
        "run": {"output_dir": str(tmp_path / "run")}})
    with pytest.raises(ConfigError, match=r"phases\.0\.data: the diffusion adapter trains every phase on the run's"):
        DiffusionAdapter(cfg)


@pytest.mark.parametrize("ref_mode", ["copy", "lora"])
def test_diffusion_dpo_after_sft_compares_against_the_sft_unet(tmp_path, ref_mode):
    """The same on the Tango side (tiny recipe, LoRA on the UNet): the first DPO step's policy is its reference."""
    from mmpref.config import load_config

    overrides = [f"run.output_dir={tmp_path / 'run'}", "reference.from_phase_start=true", f"reference.mode={ref_mode}",
                 "lora.enabled=true", "lora.r=4", "lora.alpha=8", "optim.lr=3e-2", "phases.0.epochs=null",
                 "phases.0.max_steps=3", "phases.1.epochs=null", "phases.1.max_steps=2", "data.path=tiny:8:1"]
    rows = logged(train(load_config("configs/tango2_dpo_tiny.yaml", overrides)))
    assert [r["phase"] for r in rows] == ["sft"] * 3 + ["dpo"] * 2
    assert rows[3]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # merged copy vs adapter: float round-off only
    assert rows[3]["rewards/chosen"] == pytest.approx(0.0, abs=1e-2)  # beta 200 times an MSE difference of ~1e-6


def test_from_phase_start_without_any_reference_is_a_no_op(assets, tmp_path):
    raw = recipe(assets, tmp_path / "run", ref_mode="copy", lora=False)
    raw["phases"][1] = {"name": "sft_again", "loss": {"sft": 1.0}, "epochs": 1}  # no phase needs a reference
    rows = logged(train(config_from_dict(raw)))
    assert [r["phase"] for r in rows] == ["sft"] * 3 + ["sft_again"] * 2
    assert not (tmp_path / "run" / "reference").exists()
