"""The README's first command installs what the main job imports (scripts/check_install.py checks it for real in
CI, in an environment with the main dependencies only; this test checks the same from the dependency metadata of
the test environment, so a developer sees it without building a second environment)."""

from __future__ import annotations

import importlib.util
import re
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def _check_install_module():
    spec = importlib.util.spec_from_file_location("check_install", ROOT / "scripts" / "check_install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def main_dependency_closure() -> set[str]:
    """Every distribution that ``pip install mmpref`` (no extras) brings in, as installed here."""
    seen: set[str] = set()
    todo = ["mmpref"]
    while todo:
        name = todo.pop()
        if _norm(name) in seen:
            continue
        seen.add(_norm(name))
        try:
            reqs = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for text in reqs:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def test_every_third_party_import_comes_with_the_main_dependencies():
    check = _check_install_module()
    closure = main_dependency_closure()
    owners = metadata.packages_distributions()
    missing = []
    for top, where in check.third_party_imports(ROOT / "mmpref").items():
        if top in check.EXTRAS:
            continue
        dists = {_norm(d) for d in owners.get(top, [])}
        if not dists & closure:
            missing.append(f"{top} ({where}; provided here by {sorted(dists) or 'nothing'})")
    assert not missing, f"imported but not brought in by the main dependencies: {missing}"


def test_the_check_knows_every_extra():
    """Every extra-only module named by the check is declared as an extra in pyproject.toml."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    check = _check_install_module()
    for module, extra in check.EXTRAS.items():
        assert extra in extras, (module, extra)


def test_the_wheel_ships_every_recipe_and_names_resolve_outside_a_checkout(tmp_path, monkeypatch):
    """`pip install mmpref` carries the recipes: `mmpref train llm_dpo_tiny` (or configs/llm_dpo_tiny.yaml, as the
    README writes it) works from any folder."""
    import shutil
    import subprocess
    import sys
    import zipfile

    from mmpref.yaml_config import RECIPES, resolve_config

    # built from a copy: setuptools writes build/ and *.egg-info beside the sources it builds
    src = tmp_path / "src"
    shutil.copytree(ROOT / "mmpref", src / "mmpref", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("mmpref-*.whl")
    shipped = {Path(n).name for n in zipfile.ZipFile(wheel).namelist() if n.startswith("mmpref/recipes/")}
    assert shipped == {p.name for p in (ROOT / "configs").glob("*.yaml")} != set()
    monkeypatch.chdir(tmp_path)  # not a checkout: no configs/ here
    for arg in ("llm_dpo_tiny", "llm_dpo_tiny.yaml", "configs/llm_dpo_tiny.yaml"):
        assert resolve_config(arg) == RECIPES / "llm_dpo_tiny.yaml"
    assert resolve_config("configs/missing.yaml") == Path("configs/missing.yaml")  # reported as missing later
