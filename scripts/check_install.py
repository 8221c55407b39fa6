#!/usr/bin/env python3
"""Does this environment run mmpref's main job? Checks that every module of the package imports and that every
third-party module the package imports anywhere (also inside functions) is installed, except those that belong to
an optional extra (listed below, each imported only where that feature is used).

Run it in an environment made by ``bash scripts/setup.sh`` (main dependencies only, no extras): CI does, before it
installs the test extras, so a module that only the test extras bring in (scipy via librosa, once) fails here
instead of on a user's fresh install. Exit status 1 lists what is missing.

    .venv/bin/python scripts/check_install.py
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
import sys
import traceback
from pathlib import Path

# third-party modules that only an optional extra provides -> the extra (pyproject.toml [project.optional-dependencies])
EXTRAS = {"sklearn": "udm", "xformers": "xformers", "trl": "bench"}
# package modules that need an extra to import at all (none today: extras are imported where they are used)
MODULES_NEEDING_EXTRAS: dict[str, str] = {}


def third_party_imports(package_dir: Path) -> dict[str, str]:
    """Top-level names of every non-stdlib, non-mmpref import in the package -> the first file importing it."""
    found: dict[str, str] = {}
    for path in sorted(package_dir.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("mmpref", "__future__"):
                    found.setdefault(top, str(path.relative_to(package_dir.parent)))
    return found


def main() -> int:
    import mmpref

    package_dir = Path(mmpref.__file__).parent
    problems = []
    for top, where in sorted(third_party_imports(package_dir).items()):
        if top in EXTRAS:
            continue
        try:
            importlib.import_module(top)
        except Exception as e:  # noqa: BLE001
            problems.append(f"{top} (imported in {where}): {type(e).__name__}: {e}")
    for info in pkgutil.walk_packages([str(package_dir)], prefix="mmpref."):
        if info.name in MODULES_NEEDING_EXTRAS:
            continue
        try:
            importlib.import_module(info.name)
        except Exception:  # noqa: BLE001
            problems.append(f"{info.name}: {traceback.format_exc(limit=1).strip().splitlines()[-1]}")
    if problems:
        print("mmpref's main dependencies do not cover what it imports:\n  " + "\n  ".join(problems))
        return 1
    print(f"ok: every mmpref module imports with the main dependencies ({sys.prefix})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
