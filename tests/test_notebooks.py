"""The notebooks execute without error (nbclient, the venv's python3 kernel) on the quickstart's artifacts,
found through DREAMTUNE_DATA / DREAMTUNE_RUN / DREAMTUNE_EVAL, and show what they promise.

    pytest tests/test_notebooks.py     # runs the quickstart first unless another test module already did
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from _quickstart_fixture import quickstart_out  # noqa: F401  (a pytest fixture)

nbformat = pytest.importorskip("nbformat", reason="pip install 'dreamtune[notebooks]'")
nbclient = pytest.importorskip("nbclient", reason="pip install 'dreamtune[notebooks]'")

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def execute(name: str) -> list:
    """Run a notebook from its own directory (as `jupyter` would); return its code cells' outputs."""
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbclient.NotebookClient(nb, timeout=180, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return [cell.outputs for cell in nb.cells if cell.cell_type == "code"]


def _text(outputs) -> str:
    parts = []
    for cell in outputs:
        for o in cell:
            parts.append(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


def _images(outputs) -> int:
    return sum("image/png" in o.get("data", {}) for cell in outputs for o in cell)


@pytest.mark.slow
def test_explore_data(quickstart_out, monkeypatch):
    out = quickstart_out["out"]
    monkeypatch.setenv("DREAMTUNE_DATA", str(out / "data"))
    outputs = execute("explore_data.ipynb")
    text = _text(outputs)
    assert str((out / "data").resolve()) in text
    rows = json.loads((out / "data" / "manifest.json").read_text())["rows"]
    assert f"'train': {rows['train']}, 'val': {rows['val']}" in text  # row counts per split
    assert "Answer:" in text  # a few rows
    assert "max_length" in text and _images(outputs) == 1  # the token-length histogram


@pytest.mark.slow
def test_analyze_results(quickstart_out, monkeypatch):
    out = quickstart_out["out"]
    monkeypatch.setenv("DREAMTUNE_RUN", str(out / "tuned"))
    monkeypatch.setenv("DREAMTUNE_EVAL", str(out / "eval"))
    outputs = execute("analyze_results.ipynb")
    text = _text(outputs)
    assert "base.json" in text and "tuned.json" in text
    assert f"{quickstart_out['summary']['steps']} steps; final train loss" in text
    assert _images(outputs) == 1  # loss and learning-rate curves
    assert "arithmetic" in text and "Answer:" in text  # accuracy table and examples
