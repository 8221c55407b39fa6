"""The README's Usage commands stay true: every `mmpref` command there parses and its config builds, with the
placeholders (`...`, /models/..., /data/...) read as what they stand for. The tiny recipes among them also run end to
end in tests/test_examples.py; the real-checkpoint ones cannot run here (no hub, no GPU)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def usage_commands() -> list[list[str]]:
    """The commands in the bash blocks of the README's "Usage" section (continuations joined, comments cut)."""
    text = (ROOT / "README.md").read_text()
    usage = text[text.index("## Usage"):text.index("\n## ", text.index("## Usage") + 1)]
    out = []
    for block in re.findall(r"```bash\n(.*?)```", usage, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].strip()
            if line:
                out.append(shlex.split(line))
    return out


def as_mmpref(argv: list[str]) -> list[str] | None:
    """The mmpref arguments of a command line (`mmpref X ...`, `accelerate launch ... -m mmpref.cli X ...`)."""
    if argv[0] == "mmpref":
        return argv[1:]
    if argv[:2] == ["accelerate", "launch"] and "mmpref.cli" in argv:
        return argv[argv.index("mmpref.cli") + 1:]
    return None


def stand_in(arg: str) -> str | None:
    """Placeholders the reader fills in: dropped (`...`), or kept as given (paths are checked when a run starts)."""
    return None if arg == "..." or arg.endswith("=...") else arg


COMMANDS = usage_commands()


def test_usage_section_has_the_commands_this_test_knows():
    kinds = sorted({(as_mmpref(c) or [c[0]])[0] for c in COMMANDS})
    assert kinds == ["generate", "python", "synth", "train"], kinds


@pytest.mark.parametrize("argv", [c for c in COMMANDS if as_mmpref(c)], ids=lambda c: " ".join(c)[:60])
def test_usage_command_parses_and_its_config_builds(argv):
    args = [a for a in map(stand_in, as_mmpref(argv)) if a is not None]
    command, rest = args[0], args[1:]
    if command == "train":
        from mmpref.config import load_config

        cfg = load_config(rest[0], rest[1:])
        assert cfg.modality in ("llm", "diffusion")
    elif command == "synth":
        from mmpref.synthesis.config import load_synth_config

        load_synth_config(rest[0], rest[1:])
    elif command == "generate":
        from mmpref.generate import build_parser

        ns = build_parser().parse_args(rest)
        assert ns.out and (ns.prompt or ns.prompts_file)


def test_the_conversion_one_liner_names_real_api():
    (line,) = [c for c in COMMANDS if c[0] == "python"]
    from mmpref import TangoPipeline

    assert "from_tango_checkpoint" in line[-1] and hasattr(TangoPipeline, "from_tango_checkpoint")
    assert "tokenizer=" in line[-1]  # Tango's checkpoints ship no tokenizer: the conversion refuses without one
    assert hasattr(TangoPipeline, "save_pretrained")
