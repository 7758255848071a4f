"""Tests of scmedal.metrics: agreement with direct scikit-learn computations, known answers, bad input."""
import copy
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from sklearn.dummy import DummyClassifier
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, calinski_harabasz_score, davies_bouldin_score,
                             silhouette_score)
from sklearn.preprocessing import StandardScaler

from scmedal import data, datasets, metrics
from scmedal.datasets import onek1k_subset


def make_adata(n_per=40, seed=0):
    "2 batches × 3 cell types; `X_mixed` has batches on top of each other, `X_separated` shifts batch b1 far away."
    rng = np.random.default_rng(seed)
    batch = np.repeat(["b0", "b1"], 3 * n_per)
    cell_type = np.tile(np.repeat(["t0", "t1", "t2"], n_per), 2)
    centre = 10.0 * np.eye(8)[np.unique(cell_type, return_inverse=True)[1]]
    shift = 20.0 * np.eye(8)[-1] * (batch == "b1")[:, None]
    obs = pd.DataFrame(dict(batch=batch, cell_type=cell_type, condition=np.where(batch == "b0", "healthy", "disease")),
                       index=[f"c{i}" for i in range(len(batch))]).astype("category")
    noise = lambda: rng.normal(size=(len(batch), 8))
    return ad.AnnData(obs=obs, obsm=dict(X_mixed=centre + noise(), X_separated=centre + shift + noise(),
                                         X_noise=noise(), X_batch=shift + noise()))


@pytest.fixture
def adata():
    return make_adata()


# --- clustering scores ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_sample", [None, 100])
def test_clustering_scores_equal_sklearn_on_the_same_cells(adata, n_sample):
    scores = metrics.clustering_scores(adata, use_rep="X_separated", n_sample=n_sample, seed=7).set_index(["label", "metric"]).value
    idx = metrics.subsample_indices(adata.n_obs, n_sample=n_sample, seed=7)
    Z = adata.obsm["X_separated"][idx]
    for label, key in [("batch", "batch"), ("celltype", "cell_type")]:
        y = adata.obs[key].to_numpy()[idx]
        assert scores[label, "ASW"] == pytest.approx(silhouette_score(Z, y), abs=1e-12)
        assert scores[label, "1/DB"] == pytest.approx(1 / davies_bouldin_score(Z, y), abs=1e-12)
        assert scores[label, "CH"] == pytest.approx(calinski_harabasz_score(Z, y), rel=1e-12)


def test_several_embeddings_share_one_subsample(adata):
    both = metrics.clustering_scores(adata, use_rep=["X_mixed", "X_separated"], n_sample=100, seed=1)
    alone = metrics.clustering_scores(adata, use_rep="X_separated", n_sample=100, seed=1)
    pd.testing.assert_frame_equal(both.query("embedding == 'X_separated'").reset_index(drop=True), alone)
    assert set(both.columns) == {"embedding", "label", "label_key", "metric", "value", "n_cells"}
    assert (both.n_cells == 100).all()


def test_subsample_indices_are_seeded_and_without_replacement():
    a = metrics.subsample_indices(10_500, seed=3)
    assert len(a) == 10_000 == len(np.unique(a))
    np.testing.assert_array_equal(a, metrics.subsample_indices(10_500, seed=3))
    assert not np.array_equal(a, metrics.subsample_indices(10_500, seed=4))


def test_paper_table_layout(adata):
    table = metrics.paper_table(metrics.clustering_scores(adata, use_rep=["X_separated", "X_mixed"]))
    assert list(table.index) == ["X_separated", "X_mixed"]
    assert list(table.columns) == ["batch 1/DB", "batch CH", "batch ASW", "celltype 1/DB", "celltype CH", "celltype ASW"]


# --- fold aggregation ----------------------------------------------------------------------------------------

def test_aggregate_folds_by_hand():
    values = [0.62, 0.70, 0.71, 0.66, 0.75]
    folds = [pd.DataFrame(dict(embedding=["RE"], metric=["ASW"], value=[v], n_cells=[100 + k])) for k, v in enumerate(values)]
    row = metrics.aggregate_folds(folds).iloc[0]
    mean, sd = sum(values) / 5, np.sqrt(sum((v - sum(values) / 5) ** 2 for v in values) / 4)
    half = 2.7764451051977987 * sd / np.sqrt(5)
    assert (row.embedding, row.metric, row.n) == ("RE", "ASW", 5)
    assert row["mean"] == pytest.approx(mean) and row.sd == pytest.approx(sd) and row["sem"] == pytest.approx(sd / np.sqrt(5))
    assert (row.ci_low, row.ci_high) == (pytest.approx(mean - half), pytest.approx(mean + half))
    stacked = pd.concat([f.assign(fold=k) for k, f in enumerate(folds)])
    pd.testing.assert_frame_equal(metrics.aggregate_folds(stacked), metrics.aggregate_folds(folds))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3), min_size=2, max_size=10))
def test_mean_ci_matches_scipy_interval(values):
    s = metrics.mean_ci(values)
    assert s["ci_low"] <= s["mean"] <= s["ci_high"]
    if s["sd"] > 0:
        low, high = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
        assert (s["ci_low"], s["ci_high"]) == (pytest.approx(low), pytest.approx(high))


def test_format_ci():
    assert metrics.format_ci(0.6912, 0.671, 0.7149) == "0.69 [0.67,0.71]"
    assert metrics.format_ci(-0.024, -0.031, -0.018) == "-0.02 [-0.03,-0.02]"
    assert metrics.format_ci(0.5, np.nan, np.nan) == "0.50"


# --- MEC ------------------------------------------------------------------------------------------------------

def test_mec_equals_direct_sklearn(adata):
    train, test = np.arange(0, 240, 2), np.arange(1, 240, 2)
    got = metrics.mec_score(adata, target_key="condition", use_rep=[("X_noise", "X_batch")],
                            train_indices=train, test_indices=test).set_index(["features", "metric"]).value
    X, y = np.hstack([adata.obsm["X_noise"], adata.obsm["X_batch"]]), adata.obs.condition.astype(str).to_numpy()
    scaler = StandardScaler().fit(X[train])
    pred = RandomForestClassifier(n_estimators=100, random_state=42).fit(scaler.transform(X[train]), y[train]).predict(scaler.transform(X[test]))
    chance = DummyClassifier(strategy="stratified", random_state=42).fit(X[train], y[train]).predict(X[test])
    assert got["X_noise+X_batch", "accuracy"] == accuracy_score(y[test], pred)
    assert got["X_noise+X_batch", "balanced_accuracy"] == balanced_accuracy_score(y[test], pred)
    assert got["chance", "accuracy"] == accuracy_score(y[test], chance)


def test_mec_default_split_is_stratified_and_seeded(adata):
    a = metrics.mec_score(adata, target_key="condition", use_rep="X_noise", n_estimators=10)
    b = metrics.mec_score(adata, target_key="condition", use_rep="X_noise", n_estimators=10)
    pd.testing.assert_frame_equal(a, b)
    assert (a.n_train.iloc[0], a.n_test.iloc[0]) == (192, 48)


def test_mec_accepts_boolean_masks(adata):
    mask = np.arange(adata.n_obs) % 3 == 0
    by_mask = metrics.mec_score(adata, target_key="condition", use_rep="X_batch", n_estimators=10, train_indices=~mask, test_indices=mask)
    by_pos = metrics.mec_score(adata, target_key="condition", use_rep="X_batch", n_estimators=10,
                               train_indices=np.flatnonzero(~mask), test_indices=np.flatnonzero(mask))
    pd.testing.assert_frame_equal(by_mask, by_pos)


def test_mec_needs_both_indices(adata):
    with pytest.raises(ValueError, match="test_indices"):
        metrics.mec_score(adata, target_key="condition", use_rep="X_noise", train_indices=np.arange(10))


# --- scib-metrics -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sim():
    "240 preprocessed simulated cells of 3 donors and 3 cell types, with a PCA and a donor-only embedding."
    cells = data.preprocess(data.simulate(n_cells=240, n_genes=300, n_batches=3, n_cell_types=3, seed=0), n_top_genes=200)
    cells.obsm["X_pca"] = sc.pp.pca(cells.X, n_comps=10, random_state=0)
    cells.obsm["X_donor"] = pd.get_dummies(cells.obs.batch).to_numpy(float) + np.random.default_rng(0).normal(scale=0.1, size=(cells.n_obs, 3))
    return cells


def test_scib_scores_need_scib_metrics(adata, monkeypatch):
    monkeypatch.setitem(sys.modules, "scib_metrics", None)  # as if not installed
    with pytest.raises(ImportError, match=r'pip install "scmedal\[bench\]"'):
        metrics.scib_scores(adata, "X_mixed", batch_key="batch", labels_key="cell_type", pre_integrated="X_separated")


def test_default_reference_is_the_benchmarkers_pca(sim):
    theirs = ad.AnnData(sim.X.copy())
    sc.tl.pca(theirs, svd_solver="arpack", mask_var=None)  # what `Benchmarker.prepare` runs when given no reference
    np.testing.assert_array_equal(metrics._uncorrected(sim, None), theirs.obsm["X_pca"])


def test_scib_scores_are_unscaled_and_independent_of_the_other_embeddings(sim):
    pytest.importorskip("scib_metrics")
    before = copy.deepcopy(sim)
    both = metrics.scib_scores(sim, ["X_pca", "X_donor"], batch_key="batch", labels_key="cell_type")
    alone = metrics.scib_scores(sim, {"PCA": sim.obsm["X_pca"]}, batch_key="batch", labels_key="cell_type")
    assert list(both.index) == ["X_pca", "X_donor"] and list(alone.index) == ["PCA"]
    assert list(both.columns[-3:]) == ["Batch correction", "Bio conservation", "Total"] and len(both.columns) == 13
    pd.testing.assert_series_equal(both.loc["X_pca"], alone.loc["PCA"], check_names=False)  # min-max scaling would differ
    batch = ["BRAS", "iLISI", "KBET", "Graph connectivity", "PCR comparison"]
    np.testing.assert_allclose(both["Batch correction"], both[batch].mean(axis=1), rtol=1e-6)
    bio = ["Isolated labels", "KMeans NMI", "KMeans ARI", "Silhouette label", "cLISI"]
    np.testing.assert_allclose(both["Bio conservation"], both[bio].mean(axis=1), rtol=1e-6)
    np.testing.assert_allclose(both["Total"], 0.4 * both["Batch correction"] + 0.6 * both["Bio conservation"], rtol=1e-6)
    assert both.loc["X_pca", "Batch correction"] > both.loc["X_donor", "Batch correction"]
    assert sim.obsm.keys() == before.obsm.keys() and sim.uns.keys() == before.uns.keys()
    pd.testing.assert_frame_equal(sim.obs, before.obs)


# --- bad input and side effects ------------------------------------------------------------------------------

CALLS = {
    "clustering_scores": lambda a, **kw: metrics.clustering_scores(a, **{"use_rep": "X_mixed", **kw}),
    "scib_scores": lambda a, **kw: metrics.scib_scores(a, kw.pop("use_rep", "X_mixed"), **{"batch_key": "batch", "labels_key": "cell_type", **kw}),
    "mec_score": lambda a, **kw: metrics.mec_score(a, **{"use_rep": "X_mixed", "target_key": kw.pop("batch_key", "condition"), **kw}),
}


@pytest.mark.parametrize("name", CALLS)
def test_missing_use_rep_names_the_key(adata, name):
    with pytest.raises(KeyError, match="X_scvi"):
        CALLS[name](adata, use_rep="X_scvi")


@pytest.mark.parametrize("name", CALLS)
def test_missing_obs_column_names_the_key(adata, name):
    with pytest.raises(KeyError, match="donor_id"):
        CALLS[name](adata, batch_key="donor_id")


@pytest.mark.parametrize("name", CALLS)
def test_single_label_is_refused(adata, name):
    adata.obs["one"] = "x"
    with pytest.raises(ValueError, match="'one'.*single value"):
        CALLS[name](adata, batch_key="one")


def test_missing_labels_are_refused(adata):
    adata.obs["batch"] = adata.obs.batch.astype(object)
    adata.obs.iloc[0, adata.obs.columns.get_loc("batch")] = np.nan
    with pytest.raises(ValueError, match="batch"):
        metrics.clustering_scores(adata, use_rep="X_mixed")


def test_inputs_are_not_modified(adata):
    before = copy.deepcopy(adata)
    metrics.clustering_scores(adata, use_rep=["X_mixed", "X_separated"], n_sample=100)
    metrics.mec_score(adata, target_key="condition", use_rep=("X_noise", ("X_noise", "X_batch")), n_estimators=10)
    pd.testing.assert_frame_equal(adata.obs, before.obs)
    assert adata.obsm.keys() == before.obsm.keys() and not adata.uns and not adata.obsp
    for key in before.obsm: np.testing.assert_array_equal(adata.obsm[key], before.obsm[key])


# --- real data (skipped when the data files are absent) ------------------------------------------------------

def test_onek1k_cell_types_cluster_more_than_donors():
    path = datasets.find_dataset("onek1k_subset")  # $SCMEDAL_DATA_DIR, then the user cache; never downloads
    if path is None: pytest.skip(f"OneK1K subset not found in {[str(p) for p in datasets.data_dirs()]}")
    adata = onek1k_subset(data_dir=path.parent, verify=False)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    sc.pp.pca(adata, n_comps=30, random_state=0)
    asw = metrics.clustering_scores(adata, use_rep="X_pca", batch_key="donor", n_sample=3000).query("metric == 'ASW'")
    asw = asw.set_index("label").value
    assert asw["celltype"] > 0.1 > asw["batch"]
