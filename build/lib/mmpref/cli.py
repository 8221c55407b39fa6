"""The ``mmpref`` command: one entry point, one subcommand per job.

    mmpref train CONFIG [key=value ...]     train with any adapter and loss (a YAML file or a recipe name)
    mmpref generate --model DIR ...         samples of a trained policy: WAVs (Tango) or text (causal LM)
    mmpref synth CONFIG [key=value ...]     synthetic audio preference sets (perturb, generate, CLAP-rank)
    mmpref demo [--quick] [--modality text] the offline end-to-end demo
    mmpref losses [--logic [--table]]       list the losses in the core (--logic: as Boolean structures)
    mmpref recipes                          list the packaged recipes; mmpref train NAME runs one

Errors are one line naming the file, line or key and what to do (exit status 1); add --debug (or set
MMPREF_DEBUG=1) to see the traceback.

Each subcommand lives next to the code it drives and is imported only when used, so ``mmpref losses`` does not
import diffusers and ``mmpref train`` does not import the synthesis code.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Sequence

from mmpref.errors import debug_enabled, describe

# subcommand -> (module with a ``main(argv) -> int | None``, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("mmpref.cli", "train a policy from a YAML config: mmpref train CONFIG [key=value ...]"),
    "generate": ("mmpref.generate", "samples from a trained policy: audio (Tango pipeline) or text (causal LM)"),
    "synth": ("mmpref.synthesis.run", "generate a synthetic audio preference dataset"),
    "demo": ("mmpref.demo.main", "run the offline demo (sound-event world or --modality text)"),
    "losses": ("mmpref.cli", "list the available losses and their parameters"),
    "recipes": ("mmpref.cli", "list the packaged recipes (mmpref train NAME runs one)"),
}


def train_main(argv: Sequence[str]) -> int:
    if not argv or argv[0] in {"-h", "--help"}:
        print("usage: mmpref train CONFIG [key=value ...]\n\n"
              "Train with the config's adapter and loss; key=value overrides any config key (e.g. optim.lr=1e-5,\n"
              "run.output_dir=runs/x, phases.1.loss.dpo.beta=0.2). Resumes from the newest checkpoint in\n"
              "run.output_dir unless run.resume=false. Multi-process: accelerate launch -m mmpref.cli train ...")
        return 0 if argv else 2
    from mmpref.config import load_config
    from mmpref.training import train

    result = train(load_config(argv[0], list(argv[1:])))
    print(f"done: {result.step} steps; final model in {result.final_dir}; metrics in {result.metrics_file}")
    return 0


def recipes_main(argv: Sequence[str]) -> int:
    from mmpref.yaml_config import RECIPES, recipes

    if argv:
        print("usage: mmpref recipes\n\nThe recipes shipped with mmpref; `mmpref train NAME [key=value ...]` runs one "
              f"(files in {RECIPES}).")
        return 0 if argv[0] in {"-h", "--help"} else 2
    for name, about in recipes().items():
        print(f"{name:24s} {about}")
    return 0


def losses_main(argv: Sequence[str]) -> int:
    if argv and argv[0] in {"-h", "--help"}:
        print("usage: mmpref losses [--logic [--table]]\n\n  (no option)      each loss, its parameters and formula"
              "\n  --logic          each registered pair loss as a Boolean preference structure, and their order"
              "\n  --logic --table  the table of every pair structure that prefers the winner (docs/losses.md)")
        return 0
    if argv and argv[0] == "--logic":
        from mmpref.losses import landscape

        print(landscape.landscape_markdown() if "--table" in argv else landscape.describe_registered())
        return 0
    if argv:
        print(f"mmpref losses: unknown option {argv[0]!r}; see mmpref losses --help", file=sys.stderr)
        return 2
    from mmpref.losses import available_losses, get_loss

    for name in available_losses():
        loss = get_loss(name)
        doc = (loss.spec.fn.__doc__ or "").strip().splitlines()
        params = ", ".join(f"{k}={v}" for k, v in loss.params.items())
        ref = "reference" if loss.needs_reference else "reference-free"
        print(f"{name:9s} {ref:14s} {params:40s} {doc[0] if doc else ''}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or debug_enabled()
    args = [a for a in args if a != "--debug"]
    if not args or args[0] in {"-h", "--help"}:
        print(__doc__.strip())
        return 0 if args else 2
    if args[0] == "--version":
        from mmpref import __version__

        print(f"mmpref {__version__}")
        return 0
    name, rest = args[0], args[1:]
    _configure_logging(debug)
    if name not in COMMANDS:
        print(f"mmpref: unknown command {name!r}; choose one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        return _run(name, rest)
    except KeyboardInterrupt:
        print(f"mmpref {name}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (`mmpref losses | head`): stop quietly, as Unix tools do
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush does not fail again
        return 141
    except SystemExit:
        raise
    except Exception as err:  # every error becomes one line (the traceback only when asked for)
        _close_progress_bars()
        if debug:
            raise
        print(f"mmpref {name}: {describe(err)}", file=sys.stderr)
        return 1


class _Format(logging.Formatter):
    """``mmpref: message`` for information, ``mmpref: warning: message`` for warnings and worse."""

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        return f"mmpref: {level}{record.getMessage()}"


class _Stderr(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time (a handler made once would keep a replaced stream)."""

    @property
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:  # noqa: ANN001
        pass


def _configure_logging(debug: bool) -> None:
    """The package's own log lines (progress notes, warnings) go to stderr; other libraries keep their settings."""
    log = logging.getLogger("mmpref")
    if not any(isinstance(h.formatter, _Format) for h in log.handlers):
        handler = _Stderr()
        handler.setFormatter(_Format())
        log.addHandler(handler)
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    log.propagate = False  # once: not again through a root handler someone else configured


def _close_progress_bars() -> None:
    """Finish the lines of progress bars the error interrupted, so the message starts a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _run(name: str, rest: list[str]) -> int:
    if name == "train":
        return train_main(rest)
    if name == "losses":
        return losses_main(rest)
    if name == "recipes":
        return recipes_main(rest)
    code = importlib.import_module(COMMANDS[name][0]).main(rest)
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
