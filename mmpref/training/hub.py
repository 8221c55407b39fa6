"""The model card every run writes beside its final model (``final/README.md``), and ``run.push_to_hub``.

The card says what a reader of the model page needs to reproduce or trust the run: the recipe (every phase's loss,
data and length), the reference, LoRA, the optimizer, the last logged metrics, the mmpref version and the full
config. Cards and uploads go through ``huggingface_hub`` (``ModelCard``, ``HfApi.upload_folder``) as they are.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from mmpref.config import TrainConfig, config_to_dict
from mmpref.errors import ConfigError, MmprefError
from mmpref.sources import looks_local
from mmpref.yaml_config import dump_yaml

from .phases import Phase

_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
_SHOWN_METRICS = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")


class HubError(MmprefError):
    """The upload failed; the message says where the saved model is and how to upload it later."""


def check_push(cfg: TrainConfig) -> None:
    """At launch, not after training: ``run.push_to_hub`` needs a repository name and a token."""
    if not cfg.run.push_to_hub:
        return
    from huggingface_hub import get_token

    if get_token() is None:
        raise ConfigError("run.push_to_hub: no Hugging Face token found: run `hf auth login` or set HF_TOKEN "
                          "(or set run.push_to_hub=false and upload final/ later)")


def _hub_ids(values: list[str | None]) -> list[str]:
    """The values that name Hub repositories (not local paths), in order, once each."""
    return list(dict.fromkeys(v for v in values if v and _HUB_ID.match(v) and not looks_local(v)
                              and not Path(v).exists()))


def _metrics(metrics_file: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The last logged training row and the last evaluation row (``eval/...`` keys), or empty dicts."""
    train: dict[str, Any] = {}
    evaluation: dict[str, Any] = {}
    if metrics_file.exists():
        for line in metrics_file.read_text().splitlines():
            row = json.loads(line)
            if any(k.startswith("eval/") for k in row):
                evaluation = row
            else:
                train = row
    return train, evaluation


def model_card(cfg: TrainConfig, plan: list[Phase], metrics_file: Path, metadata: dict[str, Any]) -> str:
    """The card's text: YAML metadata (``library_name``, ``base_model``, ``datasets``, ``tags``) and the run.

    ``metadata`` comes from the adapter (:meth:`mmpref.adapters.Adapter.card_metadata`): ``library_name``,
    ``base_model``, ``pipeline_tag``, ``tags`` and ``usage`` (a code snippet that loads the model)."""
    from huggingface_hub import ModelCard, ModelCardData

    from mmpref import __version__

    specs = cfg.phases or []
    sections = [p.data if p.data is not None else cfg.data for p in specs] or [cfg.data]
    phase_data = [getattr(d, "path", None) or "(the run's data)" for d in sections]
    losses = [p.loss for p in specs] or [cfg.loss]
    heads = [name for spec in losses for name in (spec if isinstance(spec, dict) else {spec: None})]
    data = ModelCardData(
        library_name=metadata.get("library_name"),
        base_model=_hub_ids([metadata.get("base_model")]) or None,
        datasets=_hub_ids(phase_data) or None,
        pipeline_tag=metadata.get("pipeline_tag"),
        tags=list(dict.fromkeys(["mmpref", *metadata.get("tags", []), *heads])),
    )
    name = cfg.run.hub_model_id or Path(cfg.run.output_dir).name
    rows = [f"| {p.name} | `{json.dumps(loss)}` | `{path}` | {p.end - p.start} |"
            for p, loss, path in zip(plan, losses, phase_data)]
    train, evaluation = _metrics(metrics_file)
    shown = [f"| {k} | {train[k]:.4g} |" for k in _SHOWN_METRICS if isinstance(train.get(k), (int, float))]
    shown += [f"| {k} | {v:.4g} |" for k, v in evaluation.items() if k.startswith("eval/") and
              k[5:] in _SHOWN_METRICS and isinstance(v, (int, float))]
    ref = cfg.reference
    lora = (f"LoRA r={cfg.lora.r}, alpha={cfg.lora.alpha}, dropout={cfg.lora.dropout}, targets "
            f"{cfg.lora.target_modules or 'all linear layers'}" if cfg.lora.enabled else "full fine-tuning")
    body = [
        f"# {name}", "",
        f"Trained with [mmpref](https://pypi.org/project/mmpref/) {__version__} ({cfg.modality} adapter) from "
        f"`{metadata.get('base_model') or 'the model in the config below'}`.", "",
        "## Recipe", "",
        "| phase | loss | data | optimizer steps |", "|---|---|---|---|", *rows, "",
        f"Reference: `{ref.mode}`" + (", taken from the policy at the start of each phase after the first"
                                      if ref.from_phase_start else ", the starting model throughout") + ". "
        f"{lora}. AdamW lr {cfg.optim.lr:g} ({cfg.optim.scheduler}, {cfg.optim.warmup_steps} warmup steps), "
        f"batch {cfg.run.batch_size} x {cfg.run.grad_accum} accumulation per process, seed {cfg.run.seed}.", "",
        "## Last logged metrics", "",
        *(["| metric | value |", "|---|---|", *shown] if shown else ["(none logged)"]), "",
        "## Use", "", "```python", metadata.get("usage", "").format(repo=repr(cfg.run.hub_model_id or "final")),
        "```", "",
        "## Config", "", "```yaml", dump_yaml(config_to_dict(cfg)).strip(), "```", "",
    ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)))


def push(final: Path, cfg: TrainConfig) -> str:
    """Upload ``final`` to ``run.hub_model_id`` (created if missing); returns the commit URL. Any failure leaves
    the local model as it is and says how to upload it later."""
    from huggingface_hub import HfApi

    repo = cfg.run.hub_model_id
    try:
        api = HfApi()
        api.create_repo(repo, private=cfg.run.hub_private, exist_ok=True)
        info = api.upload_folder(repo_id=repo, folder_path=str(final), commit_message="mmpref: upload final model")
    except Exception as e:  # noqa: BLE001 - network, auth, quota: whatever failed, the model is safe on disk
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise HubError(f"run.push_to_hub: uploading {final} to {repo} failed ({type(e).__name__}: {first}); the "
                       f"model is saved there: upload it later with `hf upload {repo} {final}`") from None
    return str(getattr(info, "commit_url", info))
