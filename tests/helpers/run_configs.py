"""Train several configs in ONE (multi-process) launch and record what every process did.

    accelerate launch --multi_gpu --num_processes 2 tests/helpers/run_configs.py PLAN.json

``PLAN.json`` is a list of ``{"config": path, "overrides": [...]}``. One launch for several runs, because starting
two Python processes that import torch, transformers and diffusers costs more than the tiny runs themselves.

For every run, each process writes into the run's ``output_dir``:

* ``scores-rank<i>.jsonl``: one line per ``adapter.scores`` call: the loss the engine passed (``+``-joined term
  names), the shape of the policy scores (``(B, 1)`` for a winners-only SFT step, ``(B, 1+K)`` for DPO), and the
  batch's row ids where the adapter provides them (``idx``);
* ``params-rank<i>.safetensors``: its copy of the trained policy's parameters;
* ``process-rank<i>.json``: its pid and the world size it saw.
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # make `helpers` importable when run as a script

import torch.distributed as dist  # noqa: E402
from accelerate.state import AcceleratorState, PartialState  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

import helpers.toy  # noqa: E402,F401  (registers the "toy" modality)
from mmpref.adapters import get_adapter_class  # noqa: E402
from mmpref.config import load_config  # noqa: E402
from mmpref.training import train  # noqa: E402


def record_scores(adapter_class: type) -> None:
    """Wrap ``adapter_class.scores`` so that each call is logged per process (idempotent)."""
    if getattr(adapter_class.scores, "_recorded", False):
        return
    original = adapter_class.scores

    def scores(self, policy, batch, loss):
        out = original(self, policy, batch, loss)
        rank = PartialState().process_index
        idx = batch.get("idx")
        row = {"loss": loss.name, "shape": list(out.policy.shape), "idx": None if idx is None else idx.tolist()}
        with (Path(self.cfg.run.output_dir) / f"scores-rank{rank}.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        return out

    scores._recorded = True
    adapter_class.scores = scores


def run(config: str, overrides: list[str]) -> None:
    cfg = load_config(config, overrides)
    record_scores(get_adapter_class(cfg.modality))
    result = train(cfg)
    state = PartialState()  # read after train(): a PartialState made first would fix cpu=False (no gloo) for good
    out = Path(result.output_dir)
    info = {"pid": os.getpid(), "num_processes": state.num_processes, "distributed_type": str(state.distributed_type)}
    (out / f"process-rank{state.process_index}.json").write_text(json.dumps(info))
    params = {k: v.detach().cpu().clone() for k, v in result.policy.state_dict().items()}  # clone: unties weights
    save_file(params, str(out / f"params-rank{state.process_index}.safetensors"))


if __name__ == "__main__":
    # train() ends with accelerator.end_training(), which destroys the process group while accelerate's shared state
    # stays "initialised", so a second train() in this process would find no group. Keep the group for all runs.
    AcceleratorState.destroy_process_group = lambda self, group=None: None
    for item in json.loads(Path(sys.argv[1]).read_text()):
        run(item["config"], item.get("overrides", []))
    if dist.is_initialized():
        dist.destroy_process_group()
