"""Where models, tokenizers and datasets come from: local paths or hub ids, and one-line errors when loading fails.

Every ``from_pretrained`` / ``load_dataset`` that reads a path from a config runs inside :func:`loading`, which
turns the loaders' exceptions (chained connection errors, "set weights_only=False", "trust_remote_code") into one
:class:`~mmpref.errors.SourceError` that names the config key and what to do.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from mmpref.errors import MmprefError, SourceError

_OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def looks_local(value: str) -> bool:
    """A value is a hub id only if it looks like one (``name`` or ``org/name``); anything else is a local path."""
    return value.startswith(("/", ".", "~")) or value.count("/") > 1 or os.path.exists(os.path.expanduser(value))


def check_source(value: str, key: str, what: str) -> None:
    """Fail early, naming ``key``, when ``value`` is meant as a local path but does not exist.

    Without this, a typo reaches the hub client and comes back as an unrelated "Repo id must be in the form ..."
    error.
    """
    if not value:
        raise SourceError(f"{key}: required; expected {what}. Set it with {key}=PATH")
    if looks_local(value) and not os.path.exists(os.path.expanduser(value)):
        raise SourceError(f"{key}: {value!r} does not exist; expected {what}. Set it with {key}=PATH")


def hub_offline() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in _OFFLINE_VARS)


@contextlib.contextmanager
def loading(key: str, value: str, what: str, trust_key: str | None = None) -> Iterator[None]:
    """Run a loader for the config value ``key: value``; any failure becomes one :class:`SourceError` line."""
    try:
        yield
    except MmprefError:
        raise
    except Exception as e:  # the loaders raise many types (OSError, ValueError, hub and requests errors)
        raise SourceError(f"{key}: {value!r}: {explain_load_error(e, value, what, trust_key)}") from e


def explain_load_error(err: BaseException, value: str, what: str, trust_key: str | None = None) -> str:
    chain = _chain(err)
    text = " ".join(str(e) for e in chain)
    names = {type(e).__name__ for e in chain}
    if "trust_remote_code" in text:
        key = trust_key or "trust_remote_code"
        return (f"the checkpoint needs its own Python code to load, which mmpref runs only with {key}=true "
                "(read that code first: it runs with your permissions)")
    if "weights_only" in text or "UnpicklingError" in names:
        return ("holds a pickle checkpoint that does not load as plain tensors; mmpref does not unpickle "
                "arbitrary objects (they can run code): convert it to safetensors where you trust it "
                "(from_pretrained + save_pretrained(safe_serialization=True))")
    if not looks_local(value):
        if hub_offline() or {"LocalEntryNotFoundError", "OfflineModeIsEnabled"} & names:
            return (f"not a local folder, and hub downloads are off ({'/'.join(_OFFLINE_VARS[:1])}=1) with no "
                    f"cached copy; give the path of a local folder (e.g. ./{value}) holding {what}")
        if {"ConnectionError", "ConnectTimeout", "ReadTimeout", "ConnectError", "NameResolutionError"} & names:
            return f"not a local folder, and the hub could not be reached; give the path of a local folder ({what})"
        if {"RepositoryNotFoundError", "RevisionNotFoundError", "GatedRepoError"} & names:
            return f"not a local folder, and the hub has no such (public) repository; expected {what}"
    first = str(chain[-1] if len(chain) > 1 and not str(err) else err).strip().splitlines()
    return f"cannot be loaded as {what}: {type(err).__name__}: {first[0] if first else ''}".rstrip(": ")


def _chain(err: BaseException) -> list[BaseException]:
    out, seen = [], set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        out.append(e)
        e = e.__cause__ or e.__context__
    return out
