"""Reliability of scmedal: bad input fails clearly and leaves the AnnData alone, save/load and seeds reproduce, training
resumes exactly, atomic saves, unseen batches, dense/sparse/backed matrices and mismatched genes."""
import logging
import os
import random
import warnings

import anndata as ad
import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import sparse

from scmedal import data
from scmedal.model import SCMEDAL

logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
pytestmark = [pytest.mark.filterwarnings("ignore:.*does not have many workers.*"),
              pytest.mark.filterwarnings("ignore:.*treespec.*"),
              pytest.mark.filterwarnings("ignore:n_top_genes")]
SMALL = dict(n_hidden=(32, 16), n_latent=8)
QUICK = dict(max_epochs=2, batch_size=128, progress_bar=False)


@pytest.fixture(scope="module", autouse=True)
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny networks train far faster on one thread when other processes share the cores. Set before every test:
    scanpy's first numba call resets torch's OpenMP thread count."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def counts():
    "Raw simulated counts: 3 donors, 400 cells, 150 genes (CSR)."
    return data.simulate(n_cells=400, n_genes=150, n_batches=3, seed=0)


@pytest.fixture(scope="module")
def adata(counts):
    "Preprocessed and registered; tests that change it work on a copy."
    out = data.preprocess(counts, n_top_genes=100)
    data.setup_anndata(out, batch_key="batch", labels_key="cell_type")
    torch.set_num_threads(1)  # again, after numba (see `one_thread`), before the `model` fixture trains
    return out


@pytest.fixture(scope="module")
def model(adata):
    "FE + RE, seed 0, two epochs."
    return SCMEDAL(adata, **SMALL).train(**QUICK)


# ---------------------------------------------------------------- helpers
def dense(X):
    "A dense float copy of an in-memory or backed matrix."
    X = X.to_memory() if hasattr(X, "to_memory") else X
    return np.asarray(X.toarray() if sparse.issparse(X) else X, dtype=np.float64)


def snapshot(adata):
    "What a function that does not document writes must leave alone: X, obs, var, and the keys of obsm/uns/layers/varm."
    return dict(X=dense(adata.X), X_type=type(adata.X), obs=adata.obs.copy(), var=adata.var.copy(),
                layers={k: dense(v) for k, v in adata.layers.items()}, obsm=set(adata.obsm), uns=set(adata.uns),
                varm=set(adata.varm), registry=repr(adata.uns.get("scmedal")))


def assert_unchanged(adata, before, *, writes=()):
    "`adata` is as in `before`, except for the uns keys in `writes`."
    after = snapshot(adata)
    assert after["X_type"] is before["X_type"]
    np.testing.assert_array_equal(after["X"], before["X"])
    pd.testing.assert_frame_equal(after["obs"], before["obs"])
    pd.testing.assert_frame_equal(after["var"], before["var"])
    assert after["layers"].keys() == before["layers"].keys()
    for k in before["layers"]: np.testing.assert_array_equal(after["layers"][k], before["layers"][k])
    assert (after["obsm"], after["varm"]) == (before["obsm"], before["varm"])
    assert after["uns"] == before["uns"] | set(writes)
    if "scmedal" not in writes: assert after["registry"] == before["registry"]


def as_format(X, fmt):
    "X as 'dense', 'csr' or 'csc'."
    return dense(X).astype(np.float32) if fmt == "dense" else getattr(sparse, f"{fmt}_matrix")(X, dtype=np.float32)


def set_value(adata, value, *, layer=None):
    "Put `value` into the first stored entry of X (or a layer), whatever the format."
    X = adata.X if layer is None else adata.layers[layer]
    if sparse.issparse(X): X.data[0] = value
    else: X[0, 0] = value


def set_obs_nan(adata, key):
    adata.obs.loc[adata.obs_names[0], key] = np.nan


def raises_cleanly(fn, adata, exc, match, *, writes=()):
    "`fn()` raises `exc` matching `match`, and `adata` is unchanged."
    before = snapshot(adata)
    with pytest.raises(exc, match=match): fn()
    assert_unchanged(adata, before, writes=writes)


def bad_copy(adata, fmt="csr"):
    "An unregistered copy with X in the given format."
    out = adata.copy()
    del out.uns["scmedal"]
    out.X = as_format(out.X, fmt)
    return out


# ---------------------------------------------------------------- bad input: setup_anndata
X_PROBLEMS = [(np.nan, "contains 1 NaN or infinite"), (np.inf, "contains 1 NaN or infinite"), (-np.inf, "contains 1 NaN or infinite"),
              (-1.0, r"contains negative values \(min -1\)")]


@pytest.mark.parametrize("fmt", ["dense", "csr", "csc"])
@pytest.mark.parametrize("value,match", X_PROBLEMS)
def test_setup_anndata_refuses_bad_values(adata, fmt, value, match):
    bad = bad_copy(adata, fmt)
    set_value(bad, value)
    raises_cleanly(lambda: data.setup_anndata(bad, batch_key="batch"), bad, ValueError, f"^X {match}")
    assert "scmedal" not in bad.uns


def drop_batch_cells(a, keep):
    "All cells of donor2 but `keep` of them removed."
    cells = np.flatnonzero(a.obs.batch == "donor2")
    return a[np.setdiff1d(np.arange(a.n_obs), cells[keep:])].copy()


OBS_PROBLEMS = {  # name: (change to the copy, setup_anndata kwargs, error, message)
    "missing batch_key": (None, dict(batch_key="donor"), KeyError, "'donor' is not a column of adata.obs"),
    "missing labels_key": (None, dict(batch_key="batch", labels_key="celltype"), KeyError, "'celltype' is not a column"),
    "missing condition_key": (None, dict(batch_key="batch", condition_key="disease"), KeyError, "'disease' is not a column"),
    "NaN batch": (lambda a: set_obs_nan(a, "batch"), dict(batch_key="batch"), ValueError, r"obs\['batch'\] has 1 missing \(NaN\)"),
    "NaN label": (lambda a: set_obs_nan(a, "cell_type"), dict(batch_key="batch", labels_key="cell_type"), ValueError,
                  r"obs\['cell_type'\] has 1 missing \(NaN\)"),
    "one batch": (lambda a: a.obs.__setitem__("batch", "b0"), dict(batch_key="batch"), ValueError, r"only one batch \('b0'\)"),
    "missing layer": (None, dict(batch_key="batch", layer="raw"), KeyError, "layer 'raw' is not in adata.layers"),
    "NaN in layer": (lambda a: set_value(a, np.nan, layer="counts"), dict(batch_key="batch", layer="counts"), ValueError,
                     r"layers\['counts'\] contains 1 NaN"),
}


@pytest.mark.parametrize("problem", list(OBS_PROBLEMS))
def test_setup_anndata_refuses_bad_obs(adata, problem):
    change, kwargs, exc, match = OBS_PROBLEMS[problem]
    bad = bad_copy(adata)
    if change: change(bad)
    raises_cleanly(lambda: data.setup_anndata(bad, **kwargs), bad, exc, match)


@pytest.mark.parametrize("shape_change,match", [
    (lambda a: a[:0].copy(), r"X is empty: shape \(0, 100\)"),
    (lambda a: a[:, :0].copy(), r"X is empty: shape \(400, 0\)"),
    (lambda a: drop_batch_cells(a, 1), r"fewer than 2 cells .*'donor2': 1"),
])
def test_setup_anndata_refuses_degenerate_shapes(adata, shape_change, match):
    bad = shape_change(bad_copy(adata))
    raises_cleanly(lambda: data.setup_anndata(bad, batch_key="batch"), bad, ValueError, match)


@pytest.mark.parametrize("fmt", ["dense", "csr", "csc"])
def test_setup_anndata_writes_only_its_registry(adata, fmt):
    good = bad_copy(adata, fmt)
    before = snapshot(good)
    registry = data.setup_anndata(good, batch_key="batch", labels_key="cell_type", layer="counts")
    assert_unchanged(good, before, writes=["scmedal"])
    assert good.uns["scmedal"] == registry and registry["batch_categories"] == ["donor0", "donor1", "donor2"]


# ---------------------------------------------------------------- bad input: preprocess
@pytest.mark.parametrize("fmt", ["dense", "csr", "csc"])
@pytest.mark.parametrize("value,match", X_PROBLEMS + [(0.5, "holds non-integer values.*normalized=True")])
def test_preprocess_refuses_bad_counts(counts, fmt, value, match):
    bad = counts.copy()
    bad.X = as_format(bad.X, fmt)
    set_value(bad, value)
    raises_cleanly(lambda: data.preprocess(bad, n_top_genes=50), bad, ValueError, f"^X {match}")


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(layer="raw"), KeyError, "layer 'raw' is not in adata.layers"),
    (dict(normalized=True, layer="neg"), ValueError, r"layers\['neg'\] contains negative"),
])
def test_preprocess_bad_layers(counts, kwargs, exc, match):
    bad = counts.copy()
    bad.layers["neg"] = -bad.X
    raises_cleanly(lambda: data.preprocess(bad, n_top_genes=50, **kwargs), bad, exc, match)


@pytest.mark.parametrize("cut,match", [(np.s_[:0], r"shape \(0, 150\)"), (np.s_[:, :0], r"shape \(400, 0\)")])
def test_preprocess_refuses_empty(counts, cut, match):
    bad = counts[cut].copy()
    raises_cleanly(lambda: data.preprocess(bad), bad, ValueError, "X is empty: " + match)


@pytest.mark.parametrize("fmt", ["dense", "csr", "csc"])
def test_preprocess_formats_agree_and_leave_input_alone(counts, fmt):
    source = counts.copy()
    source.X = as_format(source.X, fmt)
    before = snapshot(source)
    out = data.preprocess(source, n_top_genes=60)
    assert_unchanged(source, before)
    reference = data.preprocess(counts, n_top_genes=60)
    assert list(out.var_names) == list(reference.var_names)
    np.testing.assert_allclose(dense(out.X), dense(reference.X), rtol=1e-6)
    np.testing.assert_array_equal(dense(out.layers["counts"]), dense(reference.layers["counts"]))


def test_preprocess_layer_and_normalized_paths(counts):
    "Counts in a layer are read from it; already log-normalised data pass with normalized=True and are not renormalised."
    moved = counts.copy()
    moved.layers["raw"], moved.X = moved.X.copy(), sparse.csr_matrix(moved.shape, dtype=np.float32)
    before = snapshot(moved)
    via_layer = data.preprocess(moved, n_top_genes=60, layer="raw")
    assert_unchanged(moved, before)
    np.testing.assert_allclose(dense(via_layer.X), dense(data.preprocess(counts, n_top_genes=60).X), rtol=1e-6)
    logged = data.preprocess(counts, n_top_genes=80)
    before = snapshot(logged)
    with pytest.raises(ValueError, match="normalized=True"): data.preprocess(logged, n_top_genes=60)
    again = data.preprocess(logged, n_top_genes=60, normalized=True)
    assert_unchanged(logged, before)
    np.testing.assert_array_equal(dense(again.X), dense(logged[:, again.var_names].X))
    assert "counts" in again.layers and again.uns["scmedal_preprocess"]["normalized"]


def test_preprocess_inplace_writes_documented_keys(counts):
    target = counts.copy()
    assert data.preprocess(target, n_top_genes=60, inplace=True) is None
    assert target.n_vars == 60 and {"counts"} <= set(target.layers) and "scmedal_preprocess" in target.uns


# ---------------------------------------------------------------- bad input: splits, DataModule
@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(batch_key="donor"), KeyError, "'donor' is not a column"),
    (dict(batch_key="batch", labels_key="celltype"), KeyError, "'celltype' is not a column"),
    (dict(batch_key="batch", n_splits=200), ValueError, "need at least 200 per batch"),
])
def test_kfold_splits_bad_input(adata, kwargs, exc, match):
    raises_cleanly(lambda: data.kfold_splits(adata, **kwargs), adata, exc, match)


def test_kfold_splits_refuses_nan_batch(adata):
    bad = adata.copy()
    set_obs_nan(bad, "batch")
    raises_cleanly(lambda: data.kfold_splits(bad, batch_key="batch"), bad, ValueError, "1 missing")


@pytest.mark.parametrize("fmt", ["dense", "csr", "csc"])
def test_datamodule_formats_agree_and_leave_input_alone(adata, fmt):
    copy = adata.copy()
    copy.X = as_format(copy.X, fmt)
    before = snapshot(copy)
    batches = [next(iter(data.SCMEDALDataModule(a, scaling="gene", batch_size=64).train_dataloader())) for a in (copy, adata)]
    for key in batches[0]: torch.testing.assert_close(batches[0][key], batches[1][key])
    assert_unchanged(copy, before)


def test_datamodule_unregistered_and_bad_scaling(adata):
    bare = bad_copy(adata)
    raises_cleanly(lambda: data.SCMEDALDataModule(bare), bare, KeyError, "setup_anndata")
    raises_cleanly(lambda: data.SCMEDALDataModule(adata, scaling="zscore"), adata, ValueError, "'global' or 'gene'")
    raises_cleanly(lambda: data.SCMEDALDataModule(adata, train_indices=[]), adata, ValueError, "train_indices selects no cells")


# ---------------------------------------------------------------- backed AnnData
@pytest.fixture(scope="module")
def backed_path(adata, tmp_path_factory):
    "The registered AnnData on disk, genes in reverse order plus 5 extra genes."
    extra = ad.AnnData(sparse.random(adata.n_obs, 5, density=0.3, format="csr", dtype=np.float32, random_state=0),
                       obs=adata.obs[[]], var=pd.DataFrame(index=[f"extra{i}" for i in range(5)]))
    on_disk = ad.concat([adata[:, ::-1], extra], axis=1, merge="first")
    on_disk.obs = adata.obs.copy()
    path = tmp_path_factory.mktemp("backed") / "cells.h5ad"
    on_disk.write_h5ad(path)
    return path


@pytest.fixture
def backed(backed_path):
    out = ad.read_h5ad(backed_path, backed="r")
    yield out
    out.file.close()


def test_backed_setup_and_datamodule(adata, backed):
    before = snapshot(backed)
    registry = data.setup_anndata(backed, batch_key="batch", labels_key="cell_type")
    assert_unchanged(backed, before, writes=["scmedal"])
    assert registry == {**adata.uns["scmedal"], "counts_layer": None}  # concatenating with the extra genes dropped the counts layer
    in_memory = backed.to_memory()
    dm_disk, dm_memory = data.SCMEDALDataModule(backed, scaling="gene"), data.SCMEDALDataModule(in_memory, scaling="gene")
    for limit in ("min", "max"): np.testing.assert_array_equal(dm_disk.scaling[limit], dm_memory.scaling[limit])
    for a, b in zip(dm_disk.train_dataloader(), dm_memory.train_dataloader()):
        for key in a: torch.testing.assert_close(a[key], b[key])


def test_backed_checks(backed):
    data.check_matrix(backed.X)
    assert data.fit_scaling(backed.X)["max"] == pytest.approx(dense(backed.X).max())


@pytest.mark.parametrize("method,kwargs", [("get_latent_representation", dict(kind="fe")),
                                           ("get_latent_representation", dict(kind="re")),
                                           ("get_reconstruction", dict(kind="re")),
                                           ("get_counterfactual", dict(transform_batch="donor1", measured=False))])  # no counts layer on disk
def test_backed_inference_matches_memory(model, adata, backed, method, kwargs):
    before = snapshot(backed)
    np.testing.assert_allclose(getattr(model, method)(backed, **kwargs), getattr(model, method)(adata, **kwargs), rtol=1e-5, atol=1e-6)
    assert_unchanged(backed, before)


def test_training_on_backed_data(adata, backed):
    data.setup_anndata(backed, batch_key="batch")
    in_memory = backed.to_memory()
    on_disk = SCMEDAL(backed, models=("fe",), **SMALL).train(**dict(QUICK, max_epochs=1))
    reference = SCMEDAL(in_memory, models=("fe",), **SMALL).train(**dict(QUICK, max_epochs=1))
    np.testing.assert_array_equal(on_disk.get_latent_representation(), reference.get_latent_representation())
    np.testing.assert_array_equal(on_disk.get_latent_representation(in_memory), reference.get_latent_representation())


# ---------------------------------------------------------------- genes at inference and at load
def reordered(a): return a[:, a.var_names[::-1]].copy()


def with_extra_genes(a):
    extra = ad.AnnData(np.ones((a.n_obs, 3), np.float32), obs=a.obs[[]], var=pd.DataFrame(index=["x1", "x2", "x3"]),
                       layers=dict(counts=np.ones((a.n_obs, 3), np.float32)))  # with counts, so the layer survives the concat
    out = ad.concat([extra, a], axis=1, merge="first")
    out.obs = a.obs.copy()
    return out


def as_dense(a):
    out = a.copy()
    out.X = dense(a.X)
    return out


def as_csc(a):
    out = a.copy()
    out.X = sparse.csc_matrix(a.X)
    return out


INFERENCE = {"latent fe": ("get_latent_representation", dict(kind="fe")),
             "latent re": ("get_latent_representation", dict(kind="re")),
             "reconstruction fe": ("get_reconstruction", dict(kind="fe")),
             "reconstruction re": ("get_reconstruction", dict(kind="re")),
             "counterfactual": ("get_counterfactual", dict(transform_batch="donor2")),
             "counterfactual decoder": ("get_counterfactual", dict(transform_batch="donor0", mode="decoder"))}


@pytest.mark.parametrize("variant", [reordered, with_extra_genes, as_dense, as_csc], ids=lambda f: f.__name__)
@pytest.mark.parametrize("call", list(INFERENCE))
def test_inference_gene_order_extra_genes_and_formats(model, adata, variant, call):
    method, kwargs = INFERENCE[call]
    other = variant(adata)
    before = snapshot(other)
    np.testing.assert_allclose(getattr(model, method)(other, **kwargs), getattr(model, method)(**kwargs), rtol=1e-5, atol=1e-6)
    assert_unchanged(other, before)


def missing_genes(a): return a[:, 3:].copy()
def no_genes(a): return a[:, :0].copy()
def doubled_gene(a):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # anndata warns about the non-unique names we want here
        out = ad.concat([a, a[:, [1]]], axis=1, merge="first")
    out.obs = a.obs.copy()
    return out


@pytest.mark.parametrize("variant,match", [(missing_genes, r"lacks 3 of the model's 100 genes, e.g. \['{0}', '{1}', '{2}'\]"),
                                           (no_genes, "lacks 100 of the model's 100 genes"),
                                           (doubled_gene, r"duplicated gene names the model uses, e.g. \['{1}'\]")],
                         ids=["missing", "none", "duplicated"])
@pytest.mark.parametrize("call", ["latent fe", "reconstruction re", "counterfactual", "load"])
def test_incompatible_genes_are_refused(model, adata, variant, match, call, tmp_path):
    other = variant(adata)
    match = match.format(*adata.var_names[:3])
    if call == "load":
        model.save(tmp_path)
        fn = lambda: SCMEDAL.load(tmp_path, other)
    else:
        method, kwargs = INFERENCE[call]
        fn = lambda: getattr(model, method)(other, **kwargs)
    raises_cleanly(fn, other, ValueError, match)


INFERENCE_PROBLEMS = {  # name: (change, error, message)
    "NaN": (lambda a: set_value(a, np.nan), ValueError, "X contains 1 NaN or infinite"),
    "inf": (lambda a: set_value(a, np.inf), ValueError, "X contains 1 NaN or infinite"),
    "negative": (lambda a: set_value(a, -2.0), ValueError, r"X contains negative values \(min -2\)"),
    "no batch column": (lambda a: a.obs.drop(columns="batch", inplace=True), KeyError, "'batch' \\(the model's batch_key\\)"),
}


@pytest.mark.parametrize("problem", list(INFERENCE_PROBLEMS))
@pytest.mark.parametrize("call", ["latent fe", "latent re", "counterfactual"])
def test_inference_refuses_bad_data(model, adata, problem, call):
    change, exc, match = INFERENCE_PROBLEMS[problem]
    bad = adata[:50].copy()
    change(bad)
    method, kwargs = INFERENCE[call]
    raises_cleanly(lambda: getattr(model, method)(bad, **kwargs), bad, exc, match)


def test_inference_refuses_zero_cells(model, adata):
    empty = adata[:0].copy()
    raises_cleanly(lambda: model.get_latent_representation(empty), empty, ValueError, r"X is empty: shape \(0, 100\)")


def test_inference_does_not_need_labels(model, adata):
    unlabelled = adata.copy()
    del unlabelled.obs["cell_type"]
    np.testing.assert_array_equal(model.get_latent_representation(unlabelled, kind="re"), model.get_latent_representation(kind="re"))


def test_untrained_model_refuses_inference(adata):
    with pytest.raises(RuntimeError, match="not trained yet"): SCMEDAL(adata, **SMALL).get_latent_representation()


# ---------------------------------------------------------------- training leaves the AnnData alone
def test_training_and_inference_leave_adata_alone(adata):
    target = adata.copy()
    before = snapshot(target)
    m = SCMEDAL(target, **SMALL).train(**dict(QUICK, max_epochs=1), train_indices=np.arange(300), val_indices=np.arange(300, 400))
    for method, kwargs in INFERENCE.values(): getattr(m, method)(**kwargs)
    m.get_random_effects()
    assert_unchanged(target, before)


# ---------------------------------------------------------------- persistence
OUTPUTS = {**INFERENCE, "counterfactual samples": ("get_counterfactual", dict(transform_batch="donor1", mode="full", n_samples=2))}


def outputs(m, adata):
    torch.manual_seed(0)  # posterior samples
    return {name: getattr(m, method)(adata, **kwargs) for name, (method, kwargs) in OUTPUTS.items()}


def assert_same_outputs(a, b):
    for name in a: np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]), err_msg=name)


@pytest.mark.parametrize("with_adata", [True, False])
def test_save_load_roundtrip(model, adata, tmp_path, with_adata):
    model.save(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["model.pt"]
    before = snapshot(adata)
    loaded = SCMEDAL.load(tmp_path, adata if with_adata else None)
    assert_unchanged(adata, before)
    assert_same_outputs(outputs(loaded, adata), outputs(model, adata))
    pd.testing.assert_frame_equal(loaded.get_random_effects(), model.get_random_effects())
    for kind in model.history: pd.testing.assert_frame_equal(loaded.history[kind], model.history[kind])
    assert (loaded.registry, loaded.var_names, repr(loaded)) == (model.registry, model.var_names, repr(model))
    if not with_adata:
        with pytest.raises(ValueError, match="loaded without data"): loaded.get_latent_representation()
        with pytest.raises(ValueError, match="loaded without data"): loaded.train(max_epochs=1)


def test_save_does_not_overwrite_by_default(model, tmp_path):
    model.save(tmp_path)
    with pytest.raises(FileExistsError, match="overwrite=True"): model.save(tmp_path)
    model.save(tmp_path, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["model.pt"]


@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
def test_failed_save_leaves_nothing_behind(model, adata, tmp_path, monkeypatch, existing):
    "A save that fails inside torch.save leaves no temporary file, and a model saved before stays intact."
    if existing: model.save(tmp_path)
    old = (tmp_path / "model.pt").read_bytes() if existing else None

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"half a model")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"): model.save(tmp_path, overwrite=True)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == (["model.pt"] if existing else [])
    if existing:
        assert (tmp_path / "model.pt").read_bytes() == old
        np.testing.assert_array_equal(SCMEDAL.load(tmp_path, adata).get_latent_representation(), model.get_latent_representation())


def test_failed_rename_leaves_no_temp_file(model, tmp_path, monkeypatch):
    def failing_replace(src, dst): raise PermissionError("read-only target")
    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(PermissionError): model.save(tmp_path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- determinism and resuming
def test_same_seed_same_model_other_seed_other_model(model, adata):
    again = SCMEDAL(adata, **SMALL).train(**QUICK)
    for kind in ("fe", "re"):
        np.testing.assert_array_equal(again.get_latent_representation(kind=kind), model.get_latent_representation(kind=kind))
    other = SCMEDAL(adata, **SMALL, seed=1).train(**QUICK)
    for kind in ("fe", "re"):
        assert not np.allclose(other.get_latent_representation(kind=kind), model.get_latent_representation(kind=kind))


def assert_same_weights(a, b):
    for kind in a.modules:
        sa, sb = a.modules[kind].state_dict(), b.modules[kind].state_dict()
        assert sa.keys() == sb.keys()
        for name in sa: torch.testing.assert_close(sa[name], sb[name], rtol=0, atol=0, msg=f"{kind}.{name}")


@pytest.mark.parametrize("through_disk", [False, True], ids=["in memory", "save-load"])
def test_resume_equals_uninterrupted(model, adata, tmp_path, through_disk):
    "1 epoch, then 1 resumed epoch == 2 epochs in one go (the `model` fixture), bit for bit on CPU."
    first = SCMEDAL(adata, **SMALL).train(**dict(QUICK, max_epochs=1))
    if through_disk:
        first.save(tmp_path)
        first = SCMEDAL.load(tmp_path, adata)
    resumed = first.train(**dict(QUICK, max_epochs=1), resume=True)
    assert_same_weights(resumed, model)
    assert_same_outputs(outputs(resumed, adata), outputs(model, adata))
    for kind in ("fe", "re"):
        assert list(resumed.history[kind].index) == [0, 1]
        pd.testing.assert_frame_equal(resumed.history[kind], model.history[kind])


def test_resume_needs_training_state(adata, model, tmp_path):
    with pytest.raises(ValueError, match="nothing to resume"): SCMEDAL(adata, **SMALL).train(**QUICK, resume=True)
    model.save(tmp_path, training_state=False)
    with pytest.raises(ValueError, match="nothing to resume"): SCMEDAL.load(tmp_path, adata).train(**QUICK, resume=True)


def test_training_again_trains_in_training_mode(model, adata, tmp_path):
    "A trained or loaded model is in eval mode; training it again must switch BatchNorm and the random effects back to training."
    modes = []

    class Spy(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, i):
            modes.append(all(m.training for m in pl_module.module.modules()))

    model.save(tmp_path)
    SCMEDAL.load(tmp_path, adata).train(**dict(QUICK, max_epochs=1), callbacks=[Spy()])
    assert modes and all(modes)


def test_retraining_without_resume_is_not_a_resume(model, adata):
    "Documented difference: train() again restarts optimisers and shuffling from the current weights."
    first = SCMEDAL(adata, **SMALL).train(**dict(QUICK, max_epochs=1)).train(**dict(QUICK, max_epochs=1))
    assert list(first.history["fe"].index) == [0]
    assert not np.allclose(first.get_latent_representation(), model.get_latent_representation())


# ---------------------------------------------------------------- unseen batches
def with_batch(a, batch, n=60):
    out = a[:n].copy()
    out.obs["batch"] = batch
    return out


@pytest.mark.parametrize("batch", ["donor_new", np.nan], ids=["new batch", "missing batch"])
def test_unseen_batch_fixed_effects_unaffected(model, adata, batch):
    "FE's latent does not read the batch: the same latent, no warning; its decoder does (an average batch, with a warning)."
    new = with_batch(adata, batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(model.get_latent_representation(new, kind="fe"), model.get_latent_representation(adata[:60], kind="fe"))
    with pytest.warns(UserWarning, match="batches not seen in training"): model.get_reconstruction(new, kind="fe")


@pytest.mark.parametrize("batch,named", [("donor_new", "donor_new"), (np.nan, "nan")], ids=["new batch", "missing batch"])
@pytest.mark.parametrize("method", ["get_latent_representation", "get_reconstruction"])
def test_unseen_batch_random_effects_at_prior_mean(model, adata, batch, named, method):
    new = with_batch(adata, batch)
    before = snapshot(new)
    with pytest.warns(UserWarning, match=f"batches not seen in training: \\['{named}'\\].*prior mean"):
        out = getattr(model, method)(new, kind="re")
    assert_unchanged(new, before)
    module = model.modules["re"]
    x = torch.from_numpy(data.apply_scaling(dense(new.X), model.scaling))
    unknown = torch.full((new.n_obs,), -1)
    with torch.no_grad():
        expected = module.encode(x, unknown) if method == "get_latent_representation" else data.invert_scaling(module(x, unknown)["x_hat"].numpy(), model.scaling)
    np.testing.assert_allclose(out, np.asarray(expected), rtol=1e-5, atol=1e-6)
    assert not np.allclose(out, getattr(model, method)(adata[:60], kind="re"))


def test_unseen_batch_mixed_with_seen(model, adata):
    "Cells of known batches get the same results whether or not unseen-batch cells come along."
    mixed = adata.copy()
    mixed.obs["batch"] = mixed.obs["batch"].astype(str)
    mixed.obs.iloc[:40, mixed.obs.columns.get_loc("batch")] = "donor_new"
    with pytest.warns(UserWarning, match="donor_new"): z = model.get_latent_representation(mixed, kind="re")
    np.testing.assert_array_equal(z[40:], model.get_latent_representation(kind="re")[40:])


def test_counterfactual_to_unseen_batch_refused(model, adata):
    new = with_batch(adata, "donor_new")
    for target in ("donor_new", "donor9", 3):
        raises_cleanly(lambda: model.get_counterfactual(new, transform_batch=target), new, ValueError,
                       f"cannot make counterfactuals to batch {target!r}: it had no training cells")


def test_counterfactual_from_unseen_batch(model, adata):
    "Full mode re-encodes with the target batch, so the source batch is never read; decoder mode warns."
    new = with_batch(adata, "donor_new")
    np.testing.assert_array_equal(model.get_counterfactual(new, transform_batch="donor1"),
                                  model.get_counterfactual(adata[:60], transform_batch="donor1"))
    with pytest.warns(UserWarning, match="donor_new"): model.get_counterfactual(new, transform_batch="donor1", mode="decoder")


# ---------------------------------------------------------------- the inputs users really have (issue 13)
@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint16])
@pytest.mark.parametrize("fmt", ["dense", "csr"])
def test_integer_counts_run_end_to_end(counts, dtype, fmt):
    "10x counts as integers go through preprocess, setup_anndata and training; the input keeps its integers."
    raw = counts.copy()
    raw.X = as_format(counts.X.toarray().astype(dtype), fmt)
    before = snapshot(raw)
    adata = data.preprocess(raw, n_top_genes=100)
    assert_unchanged(raw, before)
    data.setup_anndata(adata, batch_key="batch")
    z = SCMEDAL(adata, models=("fe",), **SMALL).train(max_epochs=1, batch_size=128, progress_bar=False).get_latent_representation()
    assert np.isfinite(z).all()


def test_registering_integer_counts_warns(counts):
    with pytest.warns(UserWarning, match="whole numbers, like raw counts"): data.setup_anndata(counts.copy(), batch_key="batch")


@pytest.mark.parametrize("values,shown", [([1, "1"], "1 and '1'"), ([True, "True"], "True and 'True'"), ([2.0, "2.0"], "2.0 and '2.0'")])
@pytest.mark.parametrize("key", ["batch_key", "labels_key", "condition_key"])
def test_columns_mixing_types_that_print_alike_are_refused(adata, values, shown, key):
    bad = bad_copy(adata)
    bad.obs["mixed"] = pd.Series(values * (bad.n_obs // 2), index=bad.obs_names, dtype=object)
    kwargs = {"batch_key": "batch", key: "mixed"}
    raises_cleanly(lambda: data.setup_anndata(bad, **kwargs), bad, ValueError, f"mixes values that read the same as text, {shown}")


def test_float64_beyond_float32_is_refused(adata):
    bad = bad_copy(adata, "dense")
    bad.X = bad.X.astype(np.float64)
    bad.X[0, 0] = 1e300
    raises_cleanly(lambda: data.setup_anndata(bad, batch_key="batch"), bad, ValueError, "beyond float32's range")


def test_boolean_mask_equals_positions(adata):
    positions = np.arange(0, adata.n_obs, 2)
    mask = np.zeros(adata.n_obs, bool); mask[positions] = True
    quick = dict(max_epochs=1, batch_size=128, progress_bar=False)
    by_mask = SCMEDAL(adata, models=("re",), **SMALL).train(train_indices=mask, **quick)
    by_name = SCMEDAL(adata, models=("re",), **SMALL).train(train_indices=adata.obs_names[positions], **quick)
    by_position = SCMEDAL(adata, models=("re",), **SMALL).train(train_indices=positions, **quick)
    for other in (by_mask, by_name): assert_same_weights(other, by_position)
    raises_cleanly(lambda: SCMEDAL(adata, models=("re",), **SMALL).train(train_indices=mask[:2], **quick), adata, ValueError,
                   "train_indices is a boolean mask of 2 values for 400 cells")


@pytest.mark.parametrize("n_train,batch_size", [(257, 128), (129, 128), (2, 128)])
def test_last_minibatch_of_one_cell_trains(adata, n_train, batch_size):
    model = SCMEDAL(adata, models=("fe", "re"), **SMALL).train(train_indices=np.arange(n_train), max_epochs=2,
                                                               batch_size=batch_size, progress_bar=False)
    assert np.isfinite(model.get_latent_representation(kind="re")).all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_epochs=0), "max_epochs must be an integer >= 1, got 0"), (dict(max_epochs=-1), "max_epochs.*got -1"),
    (dict(max_epochs=2.5), "max_epochs.*got 2.5"), (dict(max_epochs=True), "max_epochs.*got True"),
    (dict(batch_size=1), "batch_size must be an integer >= 2"), (dict(lr=0), "lr must be a finite number > 0"),
    (dict(lr=float("inf")), "lr must be"), (dict(patience=0, early_stopping=True, val_indices=np.arange(300, 400)), "patience must be"),
    (dict(train_indices=[0.5, 1.5]), "integer positions, a boolean mask or obs names"),
    (dict(train_indices=[0, 0, 1]), "train_indices repeats 1 cells"), (dict(train_indices=[400]), "outside 0..399"),
    (dict(train_indices=np.arange(10), val_indices=np.arange(5, 20)), "share 5 cells"),
    (dict(loss_weights={"aec": {"w_recon": 1}}), "does not have: \\['aec'\\]")])
def test_train_refuses_bad_options(adata, kwargs, match):
    model = SCMEDAL(adata, models=("fe", "re"), **SMALL)
    raises_cleanly(lambda: model.train(progress_bar=False, **{"max_epochs": 1, **kwargs}), adata, ValueError, match)
    assert not model.is_trained


@pytest.mark.parametrize("kwargs,match", [
    (dict(models=()), "at least one"), (dict(models=("fe", "fe")), "twice"),
    (dict(n_latent=0), "n_latent must be an integer >= 1, got 0"), (dict(n_hidden=()), "n_hidden must hold"),
    (dict(n_hidden=(32, 0)), "each of n_hidden must be"), (dict(dataset="foo", preset="paper"), "dataset must be None or one of"),
    (dict(dataset="aml"), "use it with preset='paper'"), (dict(preset="fast"), "preset must be one of"),
    (dict(scaling="zscore"), "scaling must be one of"), (dict(seed=-1), "seed must be an integer >= 0"),
    (dict(module_kwargs={"ae": {}}), "models that are not built: \\['ae'\\]")])
def test_constructor_refuses_bad_options(adata, kwargs, match):
    raises_cleanly(lambda: SCMEDAL(adata, **{**SMALL, **kwargs}), adata, ValueError, match)


def test_divergence_is_reported_during_training(adata):
    model = SCMEDAL(adata, models=("re",), **SMALL)
    with torch.no_grad(): next(model.modules["re"].parameters()).fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="training of 're' diverged in epoch 0"):
        model.train(max_epochs=3, batch_size=128, progress_bar=False)
    assert not model.is_trained


def test_batch_without_training_cells(adata):
    train = np.flatnonzero(adata.obs.batch != "donor2")
    with pytest.warns(UserWarning, match="batches with no training cells: \\['donor2'\\]"):
        model = SCMEDAL(adata, **SMALL).train(train_indices=train, val_indices=np.flatnonzero(adata.obs.batch == "donor2"),
                                                max_epochs=1, batch_size=128, progress_bar=False)
    raises_cleanly(lambda: model.get_counterfactual(transform_batch="donor2"), adata, ValueError, "'donor2': it had no training cells")
    cells = adata[adata.obs.batch == "donor2"].copy()
    with pytest.warns(UserWarning, match="not seen in training: \\['donor2'\\]"): z = model.get_latent_representation(cells, kind="re")
    new = cells.copy(); new.obs["batch"] = "donor_new"
    with pytest.warns(UserWarning): np.testing.assert_array_equal(z, model.get_latent_representation(new, kind="re"))  # as unseen


@pytest.mark.parametrize("n_samples", [1, -1, 2.5, True])
def test_counterfactual_samples_need_two_draws(model, adata, n_samples):
    raises_cleanly(lambda: model.get_counterfactual(transform_batch="donor1", n_samples=n_samples), adata, ValueError, "n_samples")


def test_counterfactual_sampling_is_reproducible(model):
    first, second = (model.get_counterfactual(transform_batch="donor1", mode="full", n_samples=3) for _ in range(2))
    for a, b in zip(first, second): np.testing.assert_array_equal(a, b)
    assert np.isfinite(first[1]).all() and (first[1] > 0).any()


def random_states():
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


@pytest.mark.parametrize("step", ["construct", "train", "sample"])
def test_global_random_state_is_left_alone(model, adata, step, monkeypatch):
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    torch.manual_seed(11); np.random.seed(11); random.seed(11)
    before = random_states()
    if step == "construct": SCMEDAL(adata, **SMALL, seed=5)
    if step == "train": SCMEDAL(adata, models=("fe",), **SMALL, seed=5).train(max_epochs=1, batch_size=128, progress_bar=False)
    if step == "sample": model.get_counterfactual(transform_batch="donor1", mode="full", n_samples=2)
    after = random_states()
    assert torch.equal(before[0], after[0]) and np.array_equal(before[1], after[1]) and before[2] == after[2]
    assert "PL_GLOBAL_SEED" not in os.environ


class CodeThatRuns:
    def __reduce__(self): return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize("content", [b"", b"\x00" * 64, os.urandom(512), "pickle", "foreign", "no format"],
                         ids=["empty", "zeros", "random bytes", "pickle with code", "foreign dict", "no format"])
def test_load_refuses_what_is_not_a_model(tmp_path, content):
    file = tmp_path / "model.pt"
    if content == "pickle": torch.save(dict(format=("scmedal-model", 2), init_params=CodeThatRuns()), file)
    elif content == "foreign": torch.save(torch.nn.Linear(2, 2), file)
    elif content == "no format": torch.save(dict(init_params={}, weights={}), file)
    else: file.write_bytes(content)
    with pytest.raises(ValueError, match="cannot read|not a scmedal model file"): SCMEDAL.load(tmp_path)


def test_model_file_opens_with_weights_only(model, tmp_path):
    model.save(tmp_path)
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    assert state["format"] == ("scmedal-model", 2)
    torch.save(dict(state, format=("scmedal-model", 99)), tmp_path / "model.pt")
    with pytest.raises(ValueError, match="format 99; this scmedal reads format 2"): SCMEDAL.load(tmp_path)


def test_paths_with_tilde(model, adata, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    model.save("~/models/m")
    assert (tmp_path / "models" / "m" / "model.pt").is_file() and not os.path.exists("~")
    assert_same_outputs(outputs(SCMEDAL.load("~/models/m", adata), adata), outputs(model, adata))


def test_simulate_refuses_bad_sizes():
    for kwargs, match in [(dict(n_cells=0), "n_cells must be an integer >= 1"), (dict(n_genes=-5), "n_genes"),
                          (dict(n_batches=1), "n_batches must be an integer >= 2"), (dict(dispersion=0), "dispersion must be")]:
        with pytest.raises(ValueError, match=match): data.simulate(**kwargs)


def test_fast_paths_train_the_same_model(adata):
    "The fused training nodes (scmedal.fast_paths) and the plain formulas give the same network, up to float rounding."
    z = {fast: SCMEDAL(adata, models=("re",), **SMALL, fast_paths=fast).train(max_epochs=2, batch_size=128, progress_bar=False)
         .get_latent_representation(kind="re") for fast in (True, False)}
    np.testing.assert_allclose(z[True], z[False], atol=1e-4)
