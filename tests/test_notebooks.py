"""Run every notebook under pytest, one test item per notebook (the same as `nbdev_test`)."""
from pathlib import Path

import pytest
from nbdev.config import get_config
from nbdev.test import test_nb as run_notebook

NBS = Path(__file__).resolve().parents[1] / "nbs"
NOTEBOOKS = sorted(p for p in NBS.rglob("*.ipynb") if not any(part.startswith(("_", ".")) for part in p.relative_to(NBS).parts))


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: str(p.relative_to(NBS)))
def test_notebook(notebook, monkeypatch):
    monkeypatch.chdir(notebook.parent)
    monkeypatch.setenv("IN_TEST", "1")
    flags = get_config().tst_flags.split()
    ok, _ = run_notebook(notebook, skip_flags=flags)
    assert ok, f"{notebook.name} failed"
