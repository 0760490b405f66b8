"""The Python examples in the README and docs run and their assertions hold."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

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
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"{path.name}[{index}]", "exec"), {"__name__": "__doc_example__"})
