"""The Python examples in the README and docs run and their assertions hold."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

from leantorch.errors import LeanError

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


CASES = [(path, i, code) for path in DOCS for i, code in enumerate(python_blocks(path))]


def test_the_readme_has_a_runnable_example() -> None:
    assert python_blocks(ROOT / "README.md")


@pytest.mark.parametrize("path,index,code", CASES,
                         ids=[f"{p.name}-{i}" for p, i, _ in CASES])
def test_doc_example_runs(path: Path, index: int, code: str, tmp_path, monkeypatch) -> None:
    missing = missing_imports(code)
    if missing:
        pytest.skip(f"{path.name}[{index}] imports {', '.join(missing)}, not installed here")
    monkeypatch.chdir(tmp_path)
    try:
        exec(compile(code, f"{path.name}[{index}]", "exec"), {"__name__": "__doc_example__"})
    except LeanError as error:
        # leantorch's own "pip install 'leantorch[hf]'" for an optional package not installed
        cause = error.__cause__
        if isinstance(cause, ImportError) and not (cause.name or "leantorch").startswith(
                "leantorch"):
            pytest.skip(f"{path.name}[{index}] needs {cause.name}: {error}")
        raise


def missing_imports(code: str) -> list[str]:
    """The packages outside leantorch that ``code`` imports and this environment lacks."""
    roots = set()
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            roots.add(node.module.split(".")[0])
    missing = []
    for root in sorted(roots - {"leantorch"}):
        try:
            importlib.import_module(root)
        except ImportError:
            missing.append(root)
    return missing


def test_missing_imports_reads_every_import_form() -> None:
    code = ("import os, no_such_pkg_a.sub\nfrom no_such_pkg_b import x\n"
            "from leantorch.nn import Attention\nif True:\n    import no_such_pkg_c as c\n")
    assert missing_imports(code) == ["no_such_pkg_a", "no_such_pkg_b", "no_such_pkg_c"]
