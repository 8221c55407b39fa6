"""Where an online run's batches come from: the policy's own samples, judged and grouped as the run goes.

:class:`OnlineSource` is what the engine iterates instead of a DataLoader (``batches(policy, first)``); batches come
out in the offline layout (``adapter.collate`` of ``adapter.group_row``), so ``adapter.scores`` never knows whether
a batch is online or offline.

Prompts form one endless stream: epoch ``e`` of the prompts file in an order drawn from ``(seed, e)``. Prompt
position ``q`` of the stream is sampled with its own seed ``(seed, q)``, in a batch of its own N samples, so a
rollout depends only on the prompt, the weights and ``q``: not on the process that draws it, nor on what else is
drawn. Hence a resumed run draws what the uninterrupted one drew, and W processes draw what one process with the
global batch draws.

- ``schedule: step``: micro-batch ``m`` of process ``r`` answers the prompts at positions
  ``m * B * W + r * B + [0, B)`` (B = ``run.batch_size`` prompts, W processes). Records of what was drawn, judged and
  built go to ``rollouts/steps-rank<r>.jsonl``.
- ``schedule: round``: round ``k`` answers positions ``k * P + [0, P)`` (P = ``online.prompts_per_round``), shared out
  over the processes and gathered; the judged rollouts are saved (``rollouts/round-<k>/``, atomically) before the
  round trains, and a resumed run reads them back instead of drawing again. With ``update_reference`` the reference
  becomes the policy at the start of each round after the first (saved as ``rollouts/reference-<k>.safetensors``,
  the latest only). The round's
  groups are then trained on for ``epochs_per_round`` epochs, shuffled per ``(seed, round, epoch)``; each global
  micro-batch of ``B * W`` groups is split between the processes.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mmpref.config import OnlineConfig, TrainConfig
from mmpref.data.tables import load_table
from mmpref.errors import ConfigError, DataError
from mmpref.io import atomic_dir, atomic_file, write_text_atomic
from mmpref.judges import as_preference, build_judge, is_preference_model
from mmpref.online import builders
from mmpref.toy.llm import resolve_toy

READY = "complete"


def read_prompts(path: str, column: str) -> list[Any]:
    """Prompts from a text file (one per line) or a table file with ``column`` (strings or message lists)."""
    path = resolve_toy(path)
    p = Path(path)
    if p.is_file() and p.suffix.lower() in (".txt", ""):
        lines = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            raise DataError(f"online.prompts: {path} has no prompts (one per line)")
        return lines
    table = load_table(path, key="online.prompts", what="a file of prompts (text, JSON/JSONL/CSV/Parquet)")
    if column not in table.data.column_names:
        raise DataError(f"online.prompts: {path} has no column {column!r} (it has {table.data.column_names}); set "
                        "online.prompt_column")
    prompts = table.data[column]
    bad = [i for i, x in enumerate(prompts) if not (isinstance(x, str) and x.strip()) and not isinstance(x, list)]
    if bad:
        raise DataError(f"online.prompts: {path}: {table.labels(bad)}: empty or not a prompt")
    return list(prompts)


def _chunks(positions: list[int], size: int) -> list[list[int]]:
    """``positions`` (ascending) split where ``q // size`` changes: batches fixed by absolute stream position."""
    out: list[list[int]] = []
    for q in positions:
        if out and out[-1][-1] // size == q // size:
            out[-1].append(q)
        else:
            out.append([q])
    return out


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


class OnlineSource:
    """See the module docstring. ``adapter`` provides ``sample``, ``judge_inputs``, ``group_row``, ``collate``
    (and ``set_reference`` / ``reference_state`` for ``update_reference``)."""

    def __init__(self, cfg: TrainConfig, adapter: Any, accelerator: Any, out: Path):
        o: OnlineConfig = cfg.online
        self.o, self.adapter, self.accelerator, self.out = o, adapter, accelerator, Path(out)
        self.seed, self.batch, self.accum = cfg.run.seed, cfg.run.batch_size, cfg.run.grad_accum
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        if cfg.phases:
            raise ConfigError("online: give one `loss:` (an online run has no phases)")
        self.prompts = read_prompts(o.prompts, o.prompt_column)
        self.judge = build_judge(o.judge, accelerator.device, getattr(adapter, "rollout_sample_rate", 16000))
        if is_preference_model(self.judge) and o.builder in ("best_vs_worst", "best_vs_k", "rso"):
            raise ConfigError(f"online.builder={o.builder} ranks samples by reward, but online.judge is a preference "
                              "model; use builder sppo or pair, or a reward model")
        self.prefer = as_preference(self.judge) if o.builder in ("sppo", "pair") else None
        self.groups_per_prompt = builders.groups_per_prompt(o.builder, o.rso.accept)
        # prompts sampled in one batch: consecutive stream positions, aligned to this size (see RolloutConfig)
        self.gen_batch = o.generation.prompts_per_batch
        if o.schedule == "step":
            self.gen_batch = math.gcd(self.gen_batch, self.batch)
        if o.schedule == "step":
            if cfg.run.max_steps is None:
                raise ConfigError("run.max_steps: required with online.schedule=step (each step draws new samples)")
            self.total_steps = cfg.run.max_steps
        else:
            groups = o.prompts_per_round * self.groups_per_prompt
            self.micro_per_epoch = groups // (self.batch * self.world)
            if self.micro_per_epoch == 0:
                raise ConfigError(f"online.prompts_per_round: {o.prompts_per_round} prompts make {groups} groups, "
                                  f"fewer than one batch of run.batch_size x processes = {self.batch * self.world}")
            self.steps_per_round = math.ceil(o.epochs_per_round * self.micro_per_epoch / self.accum)
            self.total_steps = o.rounds * self.steps_per_round
            if cfg.run.max_steps is not None:
                self.total_steps = min(self.total_steps, cfg.run.max_steps)
        self._orders: dict[int, list[int]] = {}
        self._round: tuple[int, list[dict]] | None = None
        self._metrics: dict[str, float] = {}

    # ----- the stream of prompts ------------------------------------------------------------------------------------
    def prompt_index(self, position: int) -> int:
        epoch, i = divmod(position, len(self.prompts))
        if epoch not in self._orders:
            g = torch.Generator().manual_seed(_seed(self.seed, epoch, 7))
            self._orders = {epoch: torch.randperm(len(self.prompts), generator=g).tolist()}
        return self._orders[epoch][i]

    def epoch(self, step: int) -> float:
        """Epochs of the prompts file answered by optimizer step ``step`` (step schedule) or rounds done (round)."""
        if self.o.schedule == "step":
            return step * self.accum * self.batch * self.world / len(self.prompts)
        return step / self.steps_per_round

    # ----- the engine's side ----------------------------------------------------------------------------------------
    def batches(self, policy: Any, first: int) -> Any:
        """Micro-batches ``first, first + 1, ...`` of this process, drawn with ``policy`` as it is when each is
        needed."""
        m = first
        if self.o.schedule == "step":
            self._truncate_step_records(first)
        while True:
            yield self._step_batch(policy, m) if self.o.schedule == "step" else self._round_batch(policy, m)
            m += 1

    def step_metrics(self) -> dict[str, float]:
        return dict(self._metrics)

    # ----- drawing, judging, grouping -------------------------------------------------------------------------------
    def draw(self, policy: Any, positions: list[int]) -> list[dict]:
        """One record per prompt position: its rollouts, their judgement and the groups built from them."""
        started = time.perf_counter()
        o = self.o
        indices = [self.prompt_index(q) for q in positions]
        prompts = [self.prompts[i] for i in indices]
        seeds = [_seed(self.seed, q, 1) for q in positions]
        rollouts = []
        for chunk in _chunks(positions, self.gen_batch):  # the same prompts share a batch, whatever the process
            ks = [positions.index(q) for q in chunk]
            rollouts += self.adapter.sample(policy, [prompts[k] for k in ks], o.samples, [seeds[k] for k in ks],
                                            o.generation)
        heard = [self.adapter.judge_inputs(r) for r in rollouts]
        texts = [p if isinstance(p, str) else str(p[-1].get("content", "")) for p in prompts]
        records = []
        if self.prefer is None:
            flat = self.judge.rewards([t for t in texts for _ in range(o.samples)], [h for hs in heard for h in hs])
            per_prompt = flat.view(len(prompts), o.samples)
        for k, (q, idx, seed) in enumerate(zip(positions, indices, seeds)):
            rec: dict[str, Any] = {"position": q, "prompt_index": idx, "seed": seed}
            if self.prefer is None:
                rewards = per_prompt[k]
                rec["rewards"] = rewards.tolist()
                groups = self._build_from_rewards(rewards, q)
            else:
                groups, rec["win_rates"] = self._build_from_preferences(texts[k], heard[k])
            rec["groups"] = [[members, win] for members, win in groups]
            if heard[k] and isinstance(heard[k][0], str):
                rec["responses"] = heard[k]
            rec["rollouts"] = [self.adapter.rollout_record(r) for r in rollouts[k]]
            records.append(rec)
        self._metrics = {"online/draw_s": time.perf_counter() - started}
        if self.prefer is None:
            chosen = [rec["rewards"][g[0][0]] for rec in records for g in rec["groups"]]
            rejected = [rec["rewards"][m] for rec in records for g in rec["groups"] for m in g[0][1:]]
            self._metrics.update({"online/reward_mean": float(per_prompt.mean()),
                                  "online/reward_chosen": float(np.mean(chosen)),
                                  "online/reward_rejected": float(np.mean(rejected))})
        return records

    def _build_from_rewards(self, rewards: torch.Tensor, position: int) -> list[builders.Group]:
        o = self.o
        if o.builder == "best_vs_worst":
            return builders.best_vs_worst(rewards)
        if o.builder == "best_vs_k":
            return builders.best_vs_k(rewards, o.losers)
        g = torch.Generator().manual_seed(_seed(self.seed, position, 2))
        return builders.pair_up(builders.rso_accept(rewards, o.rso.beta, o.rso.accept, g), rewards)

    def _build_from_preferences(self, prompt: str, heard: list[Any]) -> tuple[list[builders.Group], list[float]]:
        def prefer(a: list[int], b: list[int]) -> torch.Tensor:
            return self.prefer.prefer([prompt] * len(a), [heard[i] for i in a], [heard[j] for j in b])

        if self.o.builder == "pair":
            p = float(prefer([0], [1])[0])
            return builders.labelled_pair(p), [p, 1 - p]
        rates = builders.win_rates(prefer, len(heard))
        return builders.sppo_group(rates), rates.tolist()

    def rows(self, records: list[dict], start: int = 0) -> list[dict]:
        """The groups of ``records`` as dataset rows (``adapter.group_row``), numbered from ``start``."""
        out = []
        for rec in records:
            rollouts = [self.adapter.rollout_from_record(r) for r in rec["rollouts"]]
            prompt = self.prompts[rec["prompt_index"]]
            for members, win in rec["groups"]:
                out.append(self.adapter.group_row(start + len(out), prompt, [rollouts[i] for i in members], win))
        return out

    # ----- schedule: step -------------------------------------------------------------------------------------------
    def _step_batch(self, policy: Any, m: int) -> dict:
        start = m * self.batch * self.world + self.rank * self.batch
        records = self.draw(policy, list(range(start, start + self.batch)))
        self._append_step_records(m, records)
        return self.adapter.collate(self.rows(records))

    def _step_log(self) -> Path:
        return self.out / "rollouts" / f"steps-rank{self.rank}.jsonl"

    def _append_step_records(self, m: int, records: list[dict]) -> None:
        path = self._step_log()
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            for rec in records:
                f.write(json.dumps({"micro_batch": m, **_jsonable(rec)}) + "\n")

    def _truncate_step_records(self, first: int) -> None:
        """A resumed run draws again from micro-batch ``first``: drop what a crashed run logged from there on."""
        path = self._step_log()
        if not path.exists():
            return
        keep = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["micro_batch"] < first:
                    keep.append(line)
            except (ValueError, KeyError):
                continue
        write_text_atomic(path, "".join(line + "\n" for line in keep))

    # ----- schedule: round ------------------------------------------------------------------------------------------
    def _round_batch(self, policy: Any, m: int) -> dict:
        micro_per_round = self.steps_per_round * self.accum
        r, k = divmod(m, micro_per_round)
        if self._round is None or self._round[0] != r:
            self._round = (r, self.rows(self._load_round(policy, r)))
        rows = self._round[1]
        epoch, j = divmod(k, self.micro_per_epoch)
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(_seed(self.seed, r, epoch, 3)))
        start = j * self.batch * self.world + self.rank * self.batch
        return self.adapter.collate([rows[i] for i in order[start: start + self.batch].tolist()])

    def round_dir(self, r: int) -> Path:
        return self.out / "rollouts" / f"round-{r:04d}"

    def reference_file(self, r: int) -> Path:
        return self.out / "rollouts" / f"reference-{r:04d}.safetensors"

    def _load_round(self, policy: Any, r: int) -> list[dict]:
        """Round ``r``'s records: read back if saved, else drawn by every process and saved by the main one."""
        folder = self.round_dir(r)
        acc = self.accelerator
        if self.o.update_reference and r > 0:
            self._move_reference(policy, r)
        if not (folder / READY).exists():
            first = r * self.o.prompts_per_round
            batches = _chunks(list(range(first, first + self.o.prompts_per_round)), self.gen_batch)
            mine = [q for k, chunk in enumerate(batches) if k % self.world == self.rank for q in chunk]
            records = self.draw(policy, mine)
            if self.world > 1:
                from accelerate.utils import gather_object

                records = sorted(gather_object(records), key=lambda rec: rec["position"])
            if acc.is_main_process:
                _save_records(folder, records)
            acc.wait_for_everyone()
        return _load_records(folder)

    def _move_reference(self, policy: Any, r: int) -> None:
        """The reference of round ``r`` is the policy at its start; saved, so that a resumed round finds it."""
        path = self.reference_file(r)
        if path.exists():
            self.adapter.set_reference(state=load_file(str(path)))
            return
        self.adapter.set_reference(policy)
        if self.accelerator.is_main_process:
            with atomic_file(path) as tmp:
                save_file(self.adapter.reference_state(), str(tmp))
            self.reference_file(r - 1).unlink(missing_ok=True)  # only the latest is needed to resume
        self.accelerator.wait_for_everyone()


# ----- records on disk ----------------------------------------------------------------------------------------------
def _jsonable(rec: dict) -> dict:
    """A record for a JSON line: tensor rollouts are left out (they are in the round's safetensors)."""
    return {k: v for k, v in rec.items() if not (k == "rollouts" and v and torch.is_tensor(v[0]))}


def _save_records(folder: Path, records: list[dict]) -> None:
    """``records.jsonl`` (and ``rollouts.safetensors`` for tensor rollouts), then the ``complete`` marker."""
    with atomic_dir(folder) as tmp:
        tensors = {f"{rec['position']}/{j}": r.contiguous() for rec in records
                   for j, r in enumerate(rec["rollouts"]) if torch.is_tensor(r)}
        if tensors:
            save_file(tensors, str(tmp / "rollouts.safetensors"))
        (tmp / "records.jsonl").write_text("".join(json.dumps(_jsonable(rec)) + "\n" for rec in records))
        (tmp / READY).write_text("")


def _load_records(folder: Path) -> list[dict]:
    records = [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]
    tensors = load_file(str(folder / "rollouts.safetensors")) if (folder / "rollouts.safetensors").exists() else {}
    for rec in records:
        if "rollouts" not in rec:
            n = sum(1 for key in tensors if key.split("/")[0] == str(rec["position"]))
            rec["rollouts"] = [tensors[f"{rec['position']}/{j}"] for j in range(n)]
    return records
