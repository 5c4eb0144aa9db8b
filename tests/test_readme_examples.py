"""Runs every ```python block of README.md, in order, in one namespace."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_there_are_examples():
    assert len(BLOCKS) >= 5


def test_examples_run():
    pytest.importorskip("lightning")
    namespace: dict = {"__name__": "readme_examples"}
    for index, block in enumerate(BLOCKS):
        code = compile(block, f"{README.name}[block {index}]", "exec")
        exec(code, namespace)
