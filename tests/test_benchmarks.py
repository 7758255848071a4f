"""Tests of the benchmark scripts' protocols on small simulated data (a few epochs: the plumbing, not the numbers)."""
import importlib.util
from pathlib import Path

import pandas as pd
import pytest

from scmedal import data


def load_script(name):
    "A script of benchmarks/ as a module."
    path = Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_heldout_batches_scores_the_mec_on_batches_never_trained_on(tmp_path, capsys):
    path = tmp_path / "sim.h5ad"
    data.simulate(n_cells=600, n_genes=200, n_batches=6, seed=0).write_h5ad(path)
    load_script("quality").main([str(path), "--batch-key", "batch", "--condition-key", "condition", "--heldout-batches",
                                 "--n-top-genes", "100", "--epochs", "2", "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert "on batches held out of training (fold 1)" in printed
    mec = pd.read_csv(tmp_path / "out" / "mec_heldout.csv")
    assert {"X_pca", "X_fe", "X_fe+X_re", "X_pca+X_re", "chance"} <= set(mec.features)
    assert (mec.n_test > 0).all() and set(mec.fold) == {1}


def test_heldout_batches_needs_a_condition(tmp_path):
    path = tmp_path / "sim.h5ad"
    data.simulate(n_cells=300, n_genes=100, n_batches=6, seed=0).write_h5ad(path)
    with pytest.raises(SystemExit, match="condition-key"):
        load_script("quality").main([str(path), "--batch-key", "batch", "--heldout-batches", "--n-top-genes", "50"])
