"""The import contract (pyproject.toml, checked by import-linter): layers benchmarks | scripts -> pipelines ->
evaluators -> training -> shards -> attacks | model_zoo -> sources -> common, no import circles inside a package, a
parameters file checked without torch, and a CLI that answers `--help` without importing the heavy libraries."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("benchmarks", "scripts", "pipelines", "evaluators", "training", "shards", "attacks", "model_zoo", "sources",
            "common")


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "lint-imports"), "pyproject.toml"], cwd=root,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root)}, capture_output=True, text=True)


def test_the_import_contract_holds():
    run = _lint_imports(REPO)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "2 kept, 0 broken" in run.stdout


def test_the_contract_fails_on_an_upward_import_and_on_a_circle(tmp_path):
    for package in PACKAGES:
        shutil.copytree(REPO / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    with (tmp_path / "sources" / "reading.py").open("a") as f:
        f.write("\n\ndef _upward():\n    import pipelines.stages  # noqa\n")  # a function-level import counts too
    with (tmp_path / "attacks" / "precision.py").open("a") as f:
        f.write("\n\ndef _circle():\n    from attacks.aoa import AoA  # noqa\n")  # aoa -> precision -> aoa
    with (tmp_path / "common" / "files.py").open("a") as f:
        f.write("\n\ndef _script():\n    import benchmarks.bench_eval  # noqa\n")  # scripts sit on top
    run = _lint_imports(tmp_path)
    assert run.returncode != 0
    assert "sources is not allowed to import pipelines" in run.stdout
    assert "common is not allowed to import benchmarks" in run.stdout
    assert "No cycles are allowed in attacks" in run.stdout


def test_the_cli_answers_help_and_version_without_torch_timm_or_prefect():
    code = """
import sys
from pipelines.cli import main
for argv in (["--help"], ["generate", "--help"], ["zoo", "--help"], ["--version"]):
    try:
        main(argv)
    except SystemExit as e:
        assert e.code == 0, (argv, e.code)
print(sorted(m for m in ("torch", "timm", "prefect", "pydantic", "numpy", "dvc") if m in sys.modules))
"""
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "usage: damagenet" in run.stdout and "--attack" in run.stdout
    assert run.stdout.strip().splitlines()[-1] == "[]"


def test_every_profile_is_checked_and_typed_without_torch():
    """The parameters, every nested section typed, load without torch (the CLI answers a bad file in a second), and
    each section comes back as its own type from ``require``."""
    code = """
import sys
from pathlib import Path
from pipelines import config
from pipelines.params import load_params
for path in ["params.yaml", *sorted(map(str, Path("profiles").glob("*.yaml")))]:
    params = load_params(path)
    for name, section in config.DOWNSTREAM.items():
        if getattr(params, name) is not None:
            assert type(params.require(section)) is section
    for model in (params.zoo.models if params.zoo else []):
        assert model.recipe is None or type(model.recipe).__name__ == "Recipe"
print(sorted(m for m in ("torch", "timm", "prefect") if m in sys.modules))
"""
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"
