"""A toy adapter: a linear scorer over fixed per-row features, registered as modality ``toy``.

Small enough for CPU engine tests, but it exercises everything the engine must get right: a frozen reference,
grouped and unpaired layouts, randomness from the global RNG (``noise``), per-process metrics, and failures
(``$TOY_FAIL_AT_CALL`` simulates a crash: an environment variable, so that the resumed run's config equals the
crashed one's; ``nan_at_call`` a diverged model). Every ``scores`` call is recorded in
``<output_dir>/toy-calls-rank<i>.jsonl`` so tests can see what each process did.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from mmpref.adapters import Adapter, register_adapter
from mmpref.losses import Scores


@dataclass
class ToyModelConfig:
    dim: int = 4
    noise: float = 0.0  # std of Gaussian jitter on the policy scores (global RNG)
    nan_at_call: int | None = None  # policy scores become NaN from this call on (the loss core rejects them)
    inf_at_call: int | None = None  # finite but huge scores from this call on: the DPO loss itself overflows to inf


@dataclass
class ToyDataConfig:
    rows: int = 32
    losers: int = 1
    eval_rows: int = 0


class ToyPolicy(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).squeeze(-1)


def _rows(n: int, losers: int, dim: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1 + losers, dim, generator=g)
    x[:, 0, 0] += 1.0  # winners lean along the first feature: there is something to learn
    return [{"idx": i, "x": x[i]} for i in range(n)]


class ToyAdapter(Adapter):
    name = "toy"
    model_config_class = ToyModelConfig
    data_config_class = ToyDataConfig

    def __init__(self, cfg: Any, objectives: Any = None):
        super().__init__(cfg, objectives)
        m, d = cfg.model, cfg.data
        self.policy = ToyPolicy(m.dim)
        self.reference = copy.deepcopy(self.policy).requires_grad_(False)
        self._train = _rows(d.rows, d.losers, m.dim, seed=1234)
        self._eval = _rows(d.eval_rows, d.losers, m.dim, seed=99) if d.eval_rows else None
        self.calls = 0
        self.rank = 0
        self.out = Path(cfg.run.output_dir)

    @property
    def train_dataset(self) -> list[dict]:
        return self._train

    @property
    def eval_dataset(self) -> list[dict] | None:
        return self._eval

    def collate(self, rows: list[dict]) -> dict:
        return {"idx": torch.tensor([r["idx"] for r in rows]), "x": torch.stack([r["x"] for r in rows])}

    def setup(self, accelerator: Any) -> None:
        self.rank = accelerator.process_index
        self.reference.to(accelerator.device)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"toy-rank{self.rank}.pid").write_text(str(os.getpid()))

    def scores(self, policy: nn.Module, batch: dict, loss: Any) -> Scores:
        self.calls += 1
        m = self.cfg.model
        if os.environ.get("TOY_FAIL_AT_CALL") == str(self.calls):  # 1-based, per process
            raise RuntimeError(f"simulated crash at call {self.calls}")
        x, idx = batch["x"], batch["idx"]
        labels = None
        if loss.unpaired:  # even rows are desirable completions (the winner), odd rows undesirable (a loser)
            labels = idx % 2 == 0
            x = torch.where(labels[:, None], x[:, 0], x[:, 1])
        lp = policy(x)
        if m.noise:
            lp = lp + m.noise * torch.randn_like(lp)
        if m.nan_at_call is not None and self.calls >= m.nan_at_call:
            lp = lp * float("nan")
        if m.inf_at_call is not None and self.calls >= m.inf_at_call and lp.dim() == 2:
            lp = lp * 0 + torch.tensor([-3e38] + [3e38] * (lp.shape[1] - 1))  # margin -inf; keeps the graph
        with torch.no_grad():
            ref = self.reference(x) if loss.needs_reference else None
        lengths = torch.full_like(lp, 3.0) if loss.needs_lengths else None
        with (self.out / f"toy-calls-rank{self.rank}.jsonl").open("a") as f:
            f.write(json.dumps({"call": self.calls, "loss": _loss_name(loss), "idx": idx.tolist()}) + "\n")
        return Scores(policy=lp, reference=ref, lengths=lengths, labels=labels)

    def step_metrics(self) -> dict[str, float]:
        return {"toy/rank": float(self.rank)}

    def save_pretrained(self, policy: nn.Module, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        save_file({k: v.contiguous() for k, v in policy.state_dict().items()}, os.path.join(path, "model.safetensors"))


def _loss_name(loss: Any) -> str:
    return getattr(loss, "name", type(loss).__name__)


register_adapter("toy", lambda: ToyAdapter)


def toy_config(tmp_path: Path, **sections: Any) -> dict:
    """A plain config dict for the toy adapter; ``sections`` update the defaults one level deep."""
    raw: dict = {
        "modality": "toy",
        "model": {"dim": 4},
        "data": {"rows": 16},
        "loss": {"dpo": {"beta": 0.5}},
        "optim": {"lr": 0.05, "warmup_steps": 1},
        "run": {"output_dir": str(tmp_path / "run"), "batch_size": 4, "cpu": True, "log_every": 1, "save_every": 2},
    }
    for key, value in sections.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and isinstance(raw.get(key), dict) else value
    if "phases" in sections:
        raw.pop("loss")
    return raw
