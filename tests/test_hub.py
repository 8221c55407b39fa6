"""The model card in final/README.md and run.push_to_hub (the Hub itself is faked: no network here)."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import pytest
import yaml
from helpers.toy import toy_config

from mmpref.config import config_from_dict, config_to_dict
from mmpref.errors import ConfigError
from mmpref.training import train
from mmpref.training.hub import HubError


def card_parts(final: Path) -> tuple[dict, str]:
    text = (final / "README.md").read_text()
    _, meta, body = text.split("---\n", 2)
    return yaml.safe_load(meta), body


def test_the_llm_card_names_the_recipe_metrics_and_config(tmp_path):
    from test_phase_data import recipe  # the SFT -> DPO recipe on tiny local assets

    from mmpref.toy.llm import build_tiny_llama, synthetic_preferences

    prefs, instructions = tmp_path / "prefs.jsonl", tmp_path / "instructions.jsonl"
    rows = synthetic_preferences(8, seed=3)
    prefs.write_text("\n".join(json.dumps(r) for r in rows))
    instructions.write_text("\n".join(json.dumps({"prompt": r["prompt"], "completion": r["chosen"]}) for r in rows))
    model = build_tiny_llama(tmp_path / "model", [r["prompt"] + r["chosen"] + r["rejected"] for r in rows] * 4,
                             vocab_size=300, hidden_size=32, intermediate_size=64)
    raw = recipe({"model": str(model), "prefs": str(prefs), "instructions": str(instructions)}, tmp_path / "run")
    cfg = config_from_dict(raw)
    result = train(cfg)
    meta, body = card_parts(Path(result.final_dir))
    # merged LoRA: a plain transformers model; local paths are not Hub ids, so no base_model / datasets entries
    assert meta == {"library_name": "transformers", "pipeline_tag": "text-generation", "tags": ["mmpref", "sft", "dpo"]}
    assert "| sft | `{\"sft\": 1.0}` | `" + str(instructions) + "` | 2 |" in body
    assert "| dpo | `{\"dpo\": {\"beta\": 0.5}}` | `" + str(prefs) + "` | 2 |" in body
    last = json.loads(Path(result.metrics_file).read_text().splitlines()[-1])
    assert f"| loss | {last['loss']:.4g} |" in body
    assert f"| rewards/accuracies | {last['rewards/accuracies']:.4g} |" in body
    assert "Reference: `lora`, taken from the policy at the start of each phase after the first" in body
    assert "AutoModelForCausalLM.from_pretrained('final')" in body
    config_block = body.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert yaml.safe_load(config_block) == yaml.safe_load(yaml.safe_dump(config_to_dict(cfg)))


class FakeHub:
    """Stands in for huggingface_hub.HfApi: records what would be created and uploaded."""

    calls: list[tuple] = []
    fail: Exception | None = None

    def create_repo(self, repo_id, private=None, exist_ok=False):
        FakeHub.calls.append(("create_repo", repo_id, private, exist_ok))

    def upload_folder(self, repo_id, folder_path, commit_message=""):
        if FakeHub.fail is not None:
            raise FakeHub.fail
        FakeHub.calls.append(("upload_folder", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))
        return type("Info", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()


@pytest.fixture
def fake_hub(monkeypatch):
    FakeHub.calls, FakeHub.fail = [], None
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    return FakeHub


def test_push_to_hub_uploads_final_with_its_card(tmp_path, fake_hub, capsys):
    raw = toy_config(tmp_path, run={"push_to_hub": True, "hub_model_id": "me/toy-dpo"})
    result = train(config_from_dict(raw))
    assert fake_hub.calls == [("create_repo", "me/toy-dpo", True, True),
                              ("upload_folder", "me/toy-dpo", ["README.md", "model.safetensors"])]
    assert "https://huggingface.co/me/toy-dpo/commit/abc" in capsys.readouterr().out
    meta, body = card_parts(Path(result.final_dir))
    assert meta["tags"] == ["mmpref", "dpo"] and body.startswith("\n# me/toy-dpo\n")


def test_a_failed_upload_keeps_the_model_and_says_how_to_upload_later(tmp_path, fake_hub):
    fake_hub.fail = OSError("Connection refused\nmore lines")
    raw = toy_config(tmp_path, run={"push_to_hub": True, "hub_model_id": "me/toy-dpo"})
    final = Path(raw["run"]["output_dir"]) / "final"
    with pytest.raises(HubError, match=r"uploading .*final to me/toy-dpo failed \(OSError: Connection refused\); "
                                       r"the model is saved there: upload it later with `hf upload me/toy-dpo "):
        train(config_from_dict(raw))
    assert (final / "model.safetensors").is_file() and (final / "README.md").is_file()


def test_push_to_hub_is_checked_at_launch(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no stored token either
    raw = toy_config(tmp_path, run={"push_to_hub": True, "hub_model_id": "me/toy-dpo"})
    with pytest.raises(ConfigError, match="run.push_to_hub: no Hugging Face token found"):
        train(config_from_dict(raw))
    assert not Path(raw["run"]["output_dir"]).exists()  # refused before anything was written
    with pytest.raises(ConfigError, match="run.hub_model_id: required with push_to_hub"):
        config_from_dict(toy_config(tmp_path, run={"push_to_hub": True}))
