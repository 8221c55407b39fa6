"""Train the toy adapter from a YAML config: ``accelerate launch ... tests/helpers/run_toy.py CONFIG [key=value ...]``.

After training, every process writes ``params-rank<i>.json`` (its copy of the policy's parameters), so a test can
check that processes stayed in sync and that more than one actually ran.
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # make `helpers` importable when run as a script

from accelerate import PartialState  # noqa: E402

import helpers.toy  # noqa: E402,F401  (registers the "toy" modality)
from mmpref.config import load_config  # noqa: E402
from mmpref.training import train  # noqa: E402

if __name__ == "__main__":
    cfg = load_config(sys.argv[1], sys.argv[2:])
    result = train(cfg)
    rank = PartialState().process_index
    params = {k: v.detach().cpu().flatten().tolist() for k, v in result.policy.state_dict().items()}
    (Path(result.output_dir) / f"params-rank{rank}.json").write_text(json.dumps(params))
