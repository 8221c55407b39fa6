"""The config loader: YAML -> typed dataclasses; every error names the file and the dotted key."""

from pathlib import Path

import pytest
import yaml
from helpers.toy import ToyDataConfig, ToyModelConfig, toy_config

from mmpref.config import ConfigError, TrainConfig, load_config, save_config


def write(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture
def cfg_file(tmp_path: Path) -> Path:
    return write(tmp_path / "run.yaml", toy_config(tmp_path))


def test_loads_typed_sections(cfg_file: Path):
    cfg = load_config(cfg_file)
    assert isinstance(cfg, TrainConfig)
    assert isinstance(cfg.model, ToyModelConfig) and isinstance(cfg.data, ToyDataConfig)
    assert cfg.data.rows == 16 and cfg.run.batch_size == 4 and cfg.run.cpu is True
    assert cfg.loss == {"dpo": {"beta": 0.5}} and cfg.phases == []
    assert cfg.reference.mode == "copy" and cfg.optim.betas == [0.9, 0.999]  # defaults fill in


def test_overrides_are_yaml_values(cfg_file: Path):
    cfg = load_config(
        cfg_file,
        ["run.epochs=3", "optim.betas=[0.8, 0.9]", "run.max_steps=null", "model.noise=0.5", "loss={ipo: 1.0}"],
    )
    assert cfg.run.epochs == 3.0 and isinstance(cfg.run.epochs, float)  # int accepted for float
    assert cfg.optim.betas == [0.8, 0.9] and cfg.run.max_steps is None and cfg.model.noise == 0.5
    assert cfg.loss == {"ipo": 1.0}


def test_phase_override_by_index(tmp_path: Path):
    phases = [{"name": "sft", "loss": "sft", "epochs": 1}, {"name": "dpo", "loss": {"dpo": {"beta": 0.1}}}]
    raw = toy_config(tmp_path, phases=phases)
    cfg = load_config(write(tmp_path / "p.yaml", raw), ["phases.0.epochs=2", "phases.1.loss.dpo.beta=0.3"])
    assert cfg.phases[0].epochs == 2.0 and cfg.phases[0].name == "sft"
    assert cfg.phases[1].loss == {"dpo": {"beta": 0.3}}


@pytest.mark.parametrize(
    "section, value, key",
    [
        ("run", {"batchsize": 4}, "run.batchsize"),  # unknown key
        ("run", {"batch_size": "four"}, "run.batch_size"),  # wrong type
        ("run", {"batch_size": True}, "run.batch_size"),  # bool is not an int
        ("run", {"cpu": 1}, "run.cpu"),  # int is not a bool
        ("optim", {"betas": 0.9}, "optim.betas"),  # not a list
        ("optim", {"betas": [0.9, "x"]}, "optim.betas.1"),
        ("model", {"dimm": 3}, "model.dimm"),  # adapter-typed section
        ("data", {"rows": 1.5}, "data.rows"),
        ("reference", {"dtype": 3}, "reference.dtype"),  # Optional[str]
        ("lora", "yes", "lora"),
    ],
)
def test_errors_name_file_and_key(tmp_path: Path, section, value, key):
    raw = toy_config(tmp_path)
    raw[section] = {**raw.get(section, {}), **value} if isinstance(value, dict) else value
    path = write(tmp_path / "bad.yaml", raw)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert f"{path}: {key}" in str(e.value)


def test_unknown_top_level_key_and_modality(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"bad\.yaml: trian"):
        load_config(write(tmp_path / "bad.yaml", {**toy_config(tmp_path), "trian": {}}))
    with pytest.raises(ConfigError, match="modality.*unknown modality 'nope'"):
        load_config(write(tmp_path / "bad.yaml", {**toy_config(tmp_path), "modality": "nope"}))


def test_override_errors_say_which_override(cfg_file: Path):
    with pytest.raises(ConfigError, match=r"run\.nope \(from override 'run\.nope=1'\)"):
        load_config(cfg_file, ["run.nope=1"])
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        load_config(cfg_file, ["run.epochs"])


def test_loss_or_phases_exactly_one(tmp_path: Path):
    both = {**toy_config(tmp_path), "phases": [{"name": "a", "loss": "dpo"}]}
    with pytest.raises(ConfigError, match="exactly one of `loss`"):
        load_config(write(tmp_path / "b.yaml", both))
    neither = {k: v for k, v in toy_config(tmp_path).items() if k != "loss"}
    with pytest.raises(ConfigError, match="exactly one of `loss`"):
        load_config(write(tmp_path / "n.yaml", neither))


def test_loss_specs_are_checked_early(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"b\.yaml: loss: .*unknown parameter"):
        load_config(write(tmp_path / "b.yaml", toy_config(tmp_path, loss={"dpo": {"betta": 1}})))
    phases = [{"name": "a", "loss": "sft", "epochs": 1}, {"name": "b", "loss": "nosuchloss"}]
    with pytest.raises(ConfigError, match=r"phases\.1\.loss: .*nosuchloss"):
        load_config(write(tmp_path / "p.yaml", toy_config(tmp_path, phases=phases)))
    open_middle = [{"name": "a", "loss": "sft"}, {"name": "b", "loss": "dpo", "epochs": 1}]
    with pytest.raises(ConfigError, match=r"phases\.0.*only the last phase"):
        load_config(write(tmp_path / "o.yaml", toy_config(tmp_path, phases=open_middle)))
    with pytest.raises(ConfigError, match=r"phases\.0: `name`|phases\.0\.name: required"):
        load_config(write(tmp_path / "m.yaml", toy_config(tmp_path, phases=[{"loss": "dpo"}])))


def test_defaults_includes_merge(tmp_path: Path):
    write(tmp_path / "base.yaml", toy_config(tmp_path))
    child = {"defaults": ["base.yaml"], "run": {"batch_size": 2}, "loss": {"ipo": 1.0}}
    cfg = load_config(write(tmp_path / "child.yaml", child))
    assert cfg.run.batch_size == 2 and cfg.run.cpu is True  # merged, child wins
    assert cfg.loss == {"ipo": 1.0, "dpo": {"beta": 0.5}}  # mappings merge deeply
    write(tmp_path / "loop.yaml", {"defaults": "loop.yaml"})
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "loop.yaml")


def test_save_config_round_trips(cfg_file: Path, tmp_path: Path):
    cfg = load_config(cfg_file, ["model.noise=0.25", "run.report_to=[tensorboard]"])
    save_config(cfg, tmp_path / "out" / "config.yaml")
    assert load_config(tmp_path / "out" / "config.yaml") == cfg


def test_bad_yaml_names_file(tmp_path: Path):
    (tmp_path / "x.yaml").write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match=r"x\.yaml: line 2: invalid YAML"):
        load_config(tmp_path / "x.yaml")


def test_missing_local_sources_name_their_key(tmp_path: Path):
    from mmpref.sources import check_source

    with pytest.raises(FileNotFoundError, match=r"model.path: '/nope/model' does not exist.*model.path=PATH"):
        check_source("/nope/model", "model.path", "a model folder")
    with pytest.raises(FileNotFoundError, match="data.path: 'runs/x/prefs.jsonl'"):
        check_source("runs/x/prefs.jsonl", "data.path", "a file")  # two slashes: a path, not a hub id
    check_source("org/name", "model.path", "a hub id")  # looks like a hub id: left to the hub client
    check_source(str(tmp_path), "model.path", "a folder")


def test_the_old_train_section_is_read_as_run(tmp_path: Path, capsys):
    """Configs from before the rename (`train:` also named the train() function) still load, with a notice."""
    raw = toy_config(tmp_path)
    raw["train"] = raw.pop("run")
    cfg = load_config(write(tmp_path / "old.yaml", raw), ["train.batch_size=2"])
    assert cfg.run.batch_size == 2 and cfg.run.cpu is True
    assert "the `train:` section is now called `run:`" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=r"run.batch_size \(from override 'train.batch_size=x'\)"):
        load_config(write(tmp_path / "old.yaml", raw), ["train.batch_size=x"])
