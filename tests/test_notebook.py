"""The tutorial notebook runs top to bottom, and is stored with its outputs.

The notebook is executed with nbclient on the `python3` kernel (ipykernel), with the worktree on
`PYTHONPATH` so that a clone without `pip install -e .` works too; any failing cell fails the test
(the notebook asserts its own parity checks).
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "tutorial.ipynb"


def test_tutorial_is_stored_with_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code_cells
    assert [cell.execution_count for cell in code_cells] == list(range(1, len(code_cells) + 1))
    assert not [
        output for cell in code_cells for output in cell.outputs if output.output_type == "error"
    ]
    images = [o for c in code_cells for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2
    assert notebook.metadata.kernelspec.name == "python3"


def test_tutorial_runs_top_to_bottom(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=240,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()
