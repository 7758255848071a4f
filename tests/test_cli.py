"""The `scmedal` command line (issue 13): runs without labels, one-line errors, early failures, complete-or-absent
outputs, a guarded `counterfactual`, an honest `--normalized auto`, and options validated as they are read."""
import errno
import inspect
import os
import shutil
import signal
import subprocess
import sys
import time

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import torch

from scmedal import cli, data

pytestmark = [pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
              pytest.mark.filterwarnings("ignore:.*treespec.*"),
              pytest.mark.filterwarnings("ignore:n_top_genes")]
FIT = ["--batch-key", "batch", "--epochs", "1", "--n-top-genes", "100", "--quiet"]


@pytest.fixture(autouse=True)
def one_thread():
    "Tiny networks train fastest on one thread when other processes share the cores (scanpy's numba may reset it)."
    torch.set_num_threads(1)


@pytest.fixture(scope="module", autouse=True)
def quick_umap():
    "UMAP's first call compiles numba kernels for ~20 s; the notebook draws the real figure, these tests a stand-in file."
    patch = pytest.MonkeyPatch()
    patch.setattr(cli.pl, "umap_panel", lambda adata, *, save, **kwargs: save.write_bytes(b"umap"))
    yield
    patch.undo()


@pytest.fixture(scope="module")
def counts(tmp_path_factory):
    "Simulated raw counts in an .h5ad file: 300 cells, 150 genes, 3 batches."
    path = tmp_path_factory.mktemp("input") / "counts.h5ad"
    data.simulate(n_cells=300, n_genes=150, n_batches=3, seed=0).write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def run_dir(counts, tmp_path_factory):
    "The output folder of a finished `fit` without labels and condition."
    out = tmp_path_factory.mktemp("run") / "out"
    assert cli.main(["fit", str(counts), *FIT, "--out", str(out)]) == 0
    return out


def error(capsys, *argv, code=2):
    "Run `scmedal argv` in this process; check it failed with one line `scmedal <command>: error: ...`, return the message."
    assert cli.main([str(a) for a in argv]) == code
    err = capsys.readouterr().err
    prefix = f"scmedal {argv[0]}: error: " if argv else "scmedal: error: "
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith(prefix), err
    return err[len(prefix):].strip()


def leftovers(folder):
    "Hidden temporary outputs (`.name.tmp-*`, `.name.old-*`) left in `folder`."
    return [p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name]


# 1. runs without labels or condition

def test_fit_without_labels_writes_the_report(run_dir):
    report = (run_dir / "report.md").read_text()
    assert "no labels given" in report and "no condition given" in report
    assert "not run: no labels or condition were given" in report
    scores = pd.read_csv(run_dir / "metrics.csv")
    assert set(scores.table) == {"clustering"} and set(scores.label) == {"batch"}  # no cell-type scores against the batch
    for name in ("adata.h5ad", "counterfactuals.h5ad", "model/model.pt", "history.csv", "umap.png", "genomaps.png"):
        assert (run_dir / name).stat().st_size > 0, name
    assert leftovers(run_dir.parent) == []


def test_overwrite_replaces_a_run_with_labels_and_no_condition(run_dir, counts, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(run_dir, out)
    assert "pass --overwrite" in error(capsys, "fit", counts, *FIT, "--labels-key", "cell_type", "--out", out)
    assert cli.main(["fit", str(counts), *FIT, "--labels-key", "cell_type", "--out", str(out), "--overwrite"]) == 0
    report = (out / "report.md").read_text()
    assert "labels `cell_type`; no condition given" in report and "cell_type  X_scmedal_fe" in report
    assert sorted(os.listdir(tmp_path)) == ["out"]


# 2. one-line errors, never a traceback

@pytest.mark.parametrize("exc, message", [
    (PermissionError(errno.EACCES, "Permission denied", "/x/y"), "permission denied: /x/y"),
    (FileExistsError(errno.EEXIST, "File exists", "/x/y"), "file exists: /x/y"),
    (OSError("Unable to open file"), "Unable to open file"),
    (KeyError("'donor' is not a column of obs"), "'donor' is not a column of obs"),
    (KeyError("target_key"), "KeyError: target_key (rerun with --debug for the traceback)"),
    (ValueError("bad\nvalue"), "bad value"),
    (ZeroDivisionError("division by zero"), "ZeroDivisionError: division by zero (rerun with --debug for the traceback)"),
])
def test_error_messages_are_one_clean_line(exc, message):
    assert cli._message(exc) == message


def test_any_exception_is_one_line_and_debug_reraises(counts, monkeypatch, capsys):
    def fail(args): raise PermissionError(errno.EACCES, "Permission denied", "/x/y")
    monkeypatch.setattr(cli, "_fit", fail)
    assert error(capsys, "fit", counts, "--batch-key", "batch") == "permission denied: /x/y"
    with pytest.raises(PermissionError): cli.main(["fit", str(counts), "--batch-key", "batch", "--debug"])
    monkeypatch.setenv("SCMEDAL_DEBUG", "1")
    with pytest.raises(PermissionError): cli.main(["fit", str(counts), "--batch-key", "batch"])


def test_keyboard_interrupt_is_one_line_and_exit_130(counts, monkeypatch, capsys):
    def interrupt(args): raise KeyboardInterrupt
    monkeypatch.setattr(cli, "_fit", interrupt)
    assert cli.main(["fit", str(counts), "--batch-key", "batch"]) == 130
    assert capsys.readouterr().err == "scmedal fit: interrupted\n"


def test_no_traceback_reaches_stderr_of_the_console_script(counts, tmp_path):
    cut = tmp_path / "cut.h5ad"
    cut.write_bytes(counts.read_bytes()[:20_000])
    result = subprocess.run([sys.executable, "-c", "import sys; from scmedal.cli import main; sys.exit(main())",
                             "fit", str(cut), "--batch-key", "batch"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"scmedal fit: error: cannot read {cut}: damaged or truncated")


# 3. bad input fails before training

@pytest.mark.parametrize("content, message", [
    (None, "no such file: {path}"),
    (b"cell,gene\n1,2\n", "{path} is not an .h5ad file"),
    (bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8)), "{path} is not an .h5ad file"),
    ("truncated", "cannot read {path}: damaged or truncated .h5ad file"),
    ("folder", "is a folder, not an .h5ad file: {path}"),
])
def test_unreadable_input_is_one_line_naming_the_file(content, message, counts, tmp_path, capsys):
    path = tmp_path / "in.h5ad"
    if content == "truncated": path.write_bytes(counts.read_bytes()[:20_000])
    elif content == "folder": path.mkdir()
    elif content is not None: path.write_bytes(content)
    assert message.format(path=path) in error(capsys, "fit", path, *FIT, "--out", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unwritable_out_fails_before_reading_the_input(counts, tmp_path, monkeypatch, capsys):
    (tmp_path / "file.txt").write_text("a file")
    monkeypatch.setattr(cli, "_read_h5ad", lambda path: pytest.fail("read the input before checking --out"))
    message = error(capsys, "fit", counts, *FIT, "--out", tmp_path / "file.txt" / "run")
    assert message == f"cannot create the output inside a file: {tmp_path / 'file.txt'}"
    assert "exists and is not a folder" in error(capsys, "fit", counts, *FIT, "--out", tmp_path / "file.txt")


def test_unknown_obs_key_fails_before_training(counts, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli, "SCMEDAL", lambda *a, **k: pytest.fail("trained despite a bad key"))
    assert error(capsys, "fit", counts, "--batch-key", "donor", "--out", tmp_path / "o").startswith("'donor' is not a column")
    assert "different columns" in error(capsys, "fit", counts, *FIT, "--labels-key", "batch", "--out", tmp_path / "o")


# 4. outputs complete or absent

def test_run_has_an_overwrite_keyword():
    assert inspect.signature(cli.run).parameters["overwrite"].default is False


def test_failed_run_leaves_no_output_and_no_temporary_folder(counts, tmp_path, monkeypatch, capsys):
    seen = []
    def full_disk(folder, *args):
        seen.extend(os.listdir(tmp_path))
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "umap.png"))
    monkeypatch.setattr(cli, "_figures", full_disk)
    assert error(capsys, "fit", counts, *FIT, "--out", tmp_path / "out").startswith("no space left on device: ")
    assert len(seen) == 1 and seen[0].startswith(".out.tmp-")  # it wrote beside --out, in a hidden folder
    assert os.listdir(tmp_path) == []


def test_interrupted_overwrite_keeps_the_old_output(counts, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    out.mkdir(); (out / "report.md").write_text("old")
    def interrupt(*args): raise KeyboardInterrupt
    monkeypatch.setattr(cli, "_figures", interrupt)
    assert cli.main(["fit", str(counts), *FIT, "--out", str(out), "--overwrite"]) == 130
    assert capsys.readouterr().err.endswith("scmedal fit: interrupted\n")
    assert os.listdir(tmp_path) == ["out"] and os.listdir(out) == ["report.md"] and (out / "report.md").read_text() == "old"


def test_sigterm_cleans_up_like_ctrl_c(counts, tmp_path, monkeypatch, capsys):
    def terminate(*args):
        signal.raise_signal(signal.SIGTERM)
        time.sleep(10)  # the handler interrupts this
    monkeypatch.setattr(cli, "_figures", terminate)
    assert cli.main(["fit", str(counts), *FIT, "--out", str(tmp_path / "out")]) == 130
    assert os.listdir(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed again


def test_existing_outputs_are_refused_without_overwrite(run_dir, counts, tmp_path, capsys):
    before = sorted(os.listdir(run_dir))
    assert "pass --overwrite" in error(capsys, "fit", counts, *FIT, "--out", run_dir)
    assert "holds the input" in error(capsys, "fit", run_dir / "adata.h5ad", *FIT, "--out", run_dir, "--overwrite")
    other = tmp_path / "mine"
    other.mkdir(); (other / "notes.txt").write_text("keep me")
    assert "not a scmedal output" in error(capsys, "fit", counts, *FIT, "--out", other, "--overwrite")
    assert sorted(os.listdir(run_dir)) == before and os.listdir(other) == ["notes.txt"]


def test_demo_writes_a_complete_folder_and_refuses_to_overwrite_it(tmp_path, capsys):
    demo = ["demo", "--cells", "100", "--epochs", "1", "--quiet", "--out", tmp_path / "demo"]
    assert cli.main([str(a) for a in demo]) == 0
    assert (tmp_path / "demo" / "report.md").is_file() and os.listdir(tmp_path) == ["demo"]
    assert "pass --overwrite" in error(capsys, *demo)


# 5. counterfactual

def test_counterfactual_writes_atomically_and_guards_its_output(run_dir, tmp_path, capsys):
    model, adata, out = run_dir / "model", run_dir / "adata.h5ad", tmp_path / "cf.h5ad"
    assert cli.main(["counterfactual", str(model), str(adata), "--to-batch", "donor1", "--out", str(out)]) == 0
    assert ad.read_h5ad(out).n_obs == 300 and os.listdir(tmp_path) == ["cf.h5ad"]
    assert "pass --overwrite" in error(capsys, "counterfactual", model, adata, "--to-batch", "donor2", "--out", out)
    assert cli.main(["counterfactual", str(model), str(adata), "--to-batch", "donor2", "--out", str(out), "--overwrite"]) == 0
    assert ad.read_h5ad(out).uns["scmedal_counterfactual"]["to_batch"] == "donor2"
    assert "is the input" in error(capsys, "counterfactual", model, adata, "--to-batch", "donor2", "--out", adata, "--overwrite")
    assert "nobody" in error(capsys, "counterfactual", model, adata, "--to-batch", "nobody", "--out", tmp_path / "x.h5ad")
    assert os.listdir(tmp_path) == ["cf.h5ad"]


def test_counterfactual_refuses_raw_counts(run_dir, counts, tmp_path, capsys):
    message = error(capsys, "counterfactual", run_dir / "model", counts, "--to-batch", "donor1", "--out", tmp_path / "cf.h5ad")
    assert "raw counts" in message and "log-normalised" in message and "scmedal.data.preprocess" in message


def test_counterfactual_failed_write_leaves_nothing(run_dir, tmp_path, monkeypatch, capsys):
    def half_write(self, path, *args, **kwargs):
        path.write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(ad.AnnData, "write_h5ad", half_write)
    error(capsys, "counterfactual", run_dir / "model", run_dir / "adata.h5ad", "--to-batch", "donor1", "--out", tmp_path / "cf.h5ad")
    assert os.listdir(tmp_path) == []


# 6. --normalized auto says what the data is, or refuses to guess

@pytest.fixture(scope="module")
def sim():
    return data.simulate(n_cells=300, n_genes=150, n_batches=3, seed=0)


def normalised(adata, target_sum, log=True):
    out = adata.copy()
    sc.pp.normalize_total(out, target_sum=target_sum)
    if log: sc.pp.log1p(out)
    return out


@pytest.mark.parametrize("make, expected", [
    (lambda a: a, False),
    (lambda a: normalised(a, 1e4), True),
    (lambda a: normalised(a, 1e6), True),
    (lambda a: normalised(a, 1e6, log=False), "normalised but not log-transformed"),
    (lambda a: ad.AnnData(np.log1p(a.X)), "log1p of counts without library-size normalisation"),
    (lambda a: ad.AnnData(a.X.toarray() + 0.01), "constant offset"),
    (lambda a: ad.AnnData(normalised(a, 1e4, log=False).X[:, :100]), "too large for log-normalised data"),
    (lambda a: ad.AnnData(normalised(a, 1e4).X * 3.5), "cannot tell whether X"),
    (lambda a: ad.AnnData(a.X.toarray() - 2.5), "negative values"),
    (lambda a: ad.AnnData(np.eye(10, dtype=np.float32) * 0.5), "cannot tell raw counts from log-normalised"),
])
def test_guess_of_the_scale(make, expected, sim):
    adata = make(sim)
    if isinstance(expected, bool): assert cli.looks_normalized(adata) is expected
    else:
        with pytest.raises(ValueError, match=expected) as raised: cli.looks_normalized(adata)
        assert "--normalized yes or no" in str(raised.value)


def test_normalized_yes_or_no_skips_the_guess(sim):
    logged = ad.AnnData(np.log1p(sim.X), obs=sim.obs)
    with pytest.raises(ValueError, match="log1p of counts"): cli.prepare(logged, batch_key="batch", n_top_genes=50)
    assert cli.prepare(logged, batch_key="batch", normalized=True, n_top_genes=50).uns["scmedal"]["batch_key"] == "batch"


def test_fit_reports_a_bad_scale_in_one_line(sim, tmp_path, capsys):
    path = tmp_path / "cpm.h5ad"
    normalised(sim, 1e6, log=False).write_h5ad(path)
    assert "normalised but not log-transformed" in error(capsys, "fit", path, *FIT, "--out", tmp_path / "o")


# 7. options validated as they are read

@pytest.mark.parametrize("argv, option", [
    (["fit", "x.h5ad", "--batch-key", "b", "--epochs", "0"], "--epochs"),
    (["fit", "x.h5ad", "--batch-key", "b", "--epochs", "-1"], "--epochs"),
    (["fit", "x.h5ad", "--batch-key", "b", "--epochs", "2.5"], "--epochs"),
    (["fit", "x.h5ad", "--batch-key", "b", "--n-top-genes", "0"], "--n-top-genes"),
    (["fit", "x.h5ad", "--batch-key", "b", "--normalized", "maybe"], "--normalized"),
    (["demo", "--cells", "50"], "--cells"),
    (["demo", "--epochs", "ten"], "--epochs"),
    (["fit", "x.h5ad"], "--batch-key"),
])
def test_options_are_validated_by_argparse(argv, option, capsys):
    message = error(capsys, *argv)
    assert option in message and message.endswith(f"(see scmedal {argv[0]} --help)")
