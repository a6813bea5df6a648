"""The layer contracts of pyproject.toml (import-linter), checked on the package as it installs.

``methods/``, ``integrations/`` and ``evaluations/`` install as subpackages of ``kvpress_like`` from their own
top-level folders, which import-linter cannot see in the checkout; the test lays the package out as it
installs (sources only) and lints that copy.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SUBPACKAGES = ("methods", "integrations", "evaluations")


@pytest.fixture
def installed_layout(tmp_path) -> Path:
    sources = shutil.ignore_patterns("__pycache__", "results", "*.json", "*.md", "*.png", "*.yaml")
    package = tmp_path / "kvpress_like"
    shutil.copytree(ROOT / "kvpress_like", package, ignore=sources)
    for name in SUBPACKAGES:
        shutil.copytree(ROOT / name, package / name, ignore=sources)
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def _lint(layout: Path) -> subprocess.CompletedProcess:
    code = "import sys; from importlinter.cli import lint_imports; sys.exit(lint_imports(config_filename='pyproject.toml'))"
    return subprocess.run([sys.executable, "-c", code], cwd=layout, capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(layout), "PATH": "/usr/bin:/bin"})


def test_dependencies_go_one_way(installed_layout):
    result = _lint(installed_layout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken." in result.stdout


@pytest.mark.parametrize(
    "module,line,contract",
    [
        ("cache.py", "from kvpress_like.integrations.transformers import cache_kwargs", "The core imports none"),
        ("registry.py", "from kvpress_like import methods", "The core imports none"),
        ("methods/knorm.py", "import kvpress_like.integrations.context", "Layers"),
    ],
)
def test_an_upward_import_breaks_the_contract(installed_layout, module, line, contract):
    path = installed_layout / "kvpress_like" / module
    path.write_text(path.read_text() + f"\n{line}\n")
    result = _lint(installed_layout)
    assert result.returncode != 0
    assert contract in result.stdout and "BROKEN" in result.stdout
