"""Property-based checks (hypothesis) of scmedal.data: matrix checks, preprocessing, scaling, category encoding and k-fold splits
over random shapes, sparsity, formats and category sets."""
import os
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import sparse

from scmedal import data

SETTINGS = settings(max_examples=int(os.environ.get("SCMEDAL_HYPOTHESIS_EXAMPLES", 25)), deadline=None,
                    derandomize=not os.environ.get("SCMEDAL_HYPOTHESIS_EXAMPLES"),  # CI: the same examples every run
                    suppress_health_check=[HealthCheck.too_slow])
FORMATS = st.sampled_from(["dense", "csr", "csc"])
pytestmark = pytest.mark.filterwarnings("ignore:.*like raw counts")  # random integer matrices registered on purpose


@st.composite
def matrices(draw, *, integer=False, max_side=25):
    "A non-negative finite cells × genes matrix with random shape, sparsity and storage format."
    shape = draw(st.tuples(st.integers(1, max_side), st.integers(1, max_side)))
    values = (st.integers(0, 1000).map(float) if integer
              else st.floats(0, 1e4, allow_nan=False, allow_infinity=False, width=32))
    X = draw(hnp.arrays(np.float32, shape, elements=values))
    X[draw(hnp.arrays(np.bool_, shape))] = 0  # sparsity
    fmt = draw(FORMATS)
    return X if fmt == "dense" else getattr(sparse, f"{fmt}_matrix")(X)


def dense(X): return X.toarray() if sparse.issparse(X) else np.asarray(X)
def like(X, M): return type(X)(M) if sparse.issparse(X) else M


# ---------------------------------------------------------------- check_matrix
@SETTINGS
@given(X=matrices(), counts=st.booleans())
def test_check_matrix_accepts_nonnegative_finite(X, counts):
    if counts: X = like(X, np.floor(dense(X)))
    data.check_matrix(X, counts=counts)


@SETTINGS
@given(X=matrices(), bad=st.sampled_from([np.nan, np.inf, -np.inf, -0.5, -3.0]), where=st.integers(0, 10_000))
def test_check_matrix_refuses_any_bad_entry(X, bad, where):
    M = dense(X).copy()
    M.flat[where % M.size] = bad
    match = "NaN or infinite" if not np.isfinite(bad) else "negative"
    for fmt in (M, sparse.csr_matrix(M), sparse.csc_matrix(M)):
        with pytest.raises(ValueError, match=match): data.check_matrix(fmt)


@SETTINGS
@given(X=matrices(integer=True), where=st.integers(0, 10_000), frac=st.floats(0.01, 0.99))
def test_check_matrix_counts_refuses_fractions(X, where, frac):
    M = dense(X).copy()
    M.flat[where % M.size] += np.float32(frac)
    assume(not np.all(M == np.round(M)))  # float32 rounding could swallow a tiny fraction on a large count
    data.check_matrix(M)  # fine as expression
    with pytest.raises(ValueError, match="non-integer"): data.check_matrix(M, counts=True)


# ---------------------------------------------------------------- preprocess
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(X=matrices(integer=True, max_side=15), target_sum=st.sampled_from([1e2, 1e4]))
def test_preprocess_is_log1p_of_library_normalised_counts(X, target_sum):
    "With every gene kept: X = log1p(target_sum · counts / library size) on the cells and genes that pass the filters."
    M = dense(X)
    assume((M > 0).any())
    adata = ad.AnnData(X.copy())
    before = M.copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = data.preprocess(adata, n_top_genes=10_000, min_genes=1, min_cells=1, target_sum=target_sum)
    np.testing.assert_array_equal(dense(adata.X), before)  # input untouched
    cells, genes = M.sum(1) > 0, (M > 0).sum(0) >= 1
    kept = M[cells][:, genes]
    np.testing.assert_array_equal(dense(out.layers["counts"]), kept)
    expected = np.log1p(target_sum * M[cells] / M[cells].sum(1, keepdims=True))[:, genes]
    np.testing.assert_allclose(dense(out.X), expected, rtol=1e-5, atol=1e-5)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(X=matrices(max_side=15))
def test_preprocess_normalized_keeps_values(X):
    M = dense(X)
    assume((M > 0).any())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = data.preprocess(ad.AnnData(X), n_top_genes=10_000, min_genes=1, min_cells=1, normalized=True)
    cells, genes = M.sum(1) > 0, (M > 0).sum(0) >= 1
    np.testing.assert_array_equal(dense(out.X), M[cells][:, genes])


# ---------------------------------------------------------------- scaling
@st.composite
def train_split(draw, X):
    n = X.shape[0]
    return np.asarray(draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=n, unique=True)))


@SETTINGS
@given(X=matrices(), method=st.sampled_from(["global", "gene"]), data_=st.data())
def test_scaling_fitted_on_train_maps_train_into_unit_interval(X, method, data_):
    train = data_.draw(train_split(X))
    params = data.fit_scaling(X, method=method, indices=train)
    scaled = data.apply_scaling(dense(X)[train], params)
    assert scaled.dtype == np.float32
    assert scaled.min() >= -1e-6 and scaled.max() <= 1 + 1e-6
    if method == "global" and params["max"][0] - params["min"][0] > data.MIN_SPAN:
        assert scaled.min() == pytest.approx(0, abs=1e-6) and scaled.max() == pytest.approx(1, abs=1e-6)
    if method == "gene":
        varying = params["max"] - params["min"] > data.MIN_SPAN
        np.testing.assert_allclose(scaled.max(0)[varying], 1, atol=1e-5)
        np.testing.assert_allclose(scaled.min(0)[varying], 0, atol=1e-5)


@SETTINGS
@given(X=matrices(), method=st.sampled_from(["global", "gene"]), data_=st.data())
def test_fit_scaling_ignores_rows_outside_train_and_row_order(X, method, data_):
    train = data_.draw(train_split(X))
    params = data.fit_scaling(X, method=method, indices=train)
    again = data.fit_scaling(dense(X)[train][::-1], method=method)
    for limit in ("min", "max"): np.testing.assert_allclose(params[limit], again[limit], rtol=1e-6)


@SETTINGS
@given(X=matrices(), new=st.floats(0, 2e4, width=32), method=st.sampled_from(["global", "gene"]))
def test_invert_scaling_undoes_apply_scaling(X, new, method):
    "Round trip for the fitted rows and for values outside the fitted range (constant genes included)."
    params = data.fit_scaling(X, method=method)
    M = np.vstack([dense(X), np.full((1, X.shape[1]), new, np.float32)])
    np.testing.assert_allclose(data.invert_scaling(data.apply_scaling(M, params), params), M, rtol=1e-5, atol=1e-2)


# ---------------------------------------------------------------- category encoding
LABELS = st.one_of(st.text(alphabet="abcdefgXYZ_-0123456789 ", min_size=1, max_size=6), st.integers(-5, 50))


@st.composite
def grouped_obs(draw, *, min_per_group=2, max_groups=5):
    "A column of 2..max_groups distinct labels, each at least `min_per_group` times, in random order; object or categorical."
    labels = draw(st.lists(LABELS, min_size=2, max_size=max_groups, unique_by=str))
    sizes = draw(st.lists(st.integers(min_per_group, min_per_group + 6), min_size=len(labels), max_size=len(labels)))
    values = [label for label, size in zip(labels, sizes) for _ in range(size)]
    values = draw(st.permutations(values))
    if draw(st.booleans()):  # categorical, possibly with an unused category
        cats = list(dict.fromkeys(draw(st.permutations(labels)) + ["unused"]))
        return pd.Categorical(values, categories=cats)
    return pd.Series(values, dtype=object).to_numpy()


def obs_adata(column, **extra):
    n = len(column)
    return ad.AnnData(np.ones((n, 2), np.float32), obs=pd.DataFrame(dict(batch=column, **extra), index=[f"c{i}" for i in range(n)]))


@SETTINGS
@given(column=grouped_obs(), data_=st.data())
def test_category_order_and_codes_stable_under_row_permutation(column, data_):
    adata = obs_adata(column)
    registry = data.setup_anndata(adata, batch_key="batch")
    codes = data.encode(adata, "batch", registry["batch_categories"])
    perm = np.asarray(data_.draw(st.permutations(range(adata.n_obs))))
    shuffled = adata[perm].copy()
    del shuffled.uns["scmedal"]
    assert data.setup_anndata(shuffled, batch_key="batch")["batch_categories"] == registry["batch_categories"]
    np.testing.assert_array_equal(data.encode(shuffled, "batch", registry["batch_categories"]), codes[perm])
    # codes index the registry: decoding gives back the values as strings
    assert [registry["batch_categories"][c] for c in codes] == [str(v) for v in adata.obs["batch"]]
    assert "unused" not in registry["batch_categories"]


@SETTINGS
@given(column=grouped_obs(), unknown=st.text(alphabet="qrs", min_size=1, max_size=3))
def test_encode_unknown_and_missing_values_get_minus_one(column, unknown):
    adata = obs_adata(column)
    categories = data.setup_anndata(adata, batch_key="batch")["batch_categories"]
    new = pd.Series(np.asarray(column, dtype=object)).astype(object)
    new.iloc[0], new.iloc[-1] = unknown, np.nan
    other = obs_adata(new.to_numpy())
    codes = data.encode(other, "batch", categories)
    assert codes[-1] == -1 and codes[0] == (categories.index(unknown) if unknown in categories else -1)
    assert ((codes >= -1) & (codes < len(categories))).all()


# ---------------------------------------------------------------- k-fold splits
@SETTINGS
@given(batches=grouped_obs(min_per_group=5), n_types=st.integers(1, 4), seed=st.integers(0, 2**16), data_=st.data())
def test_kfold_splits_partition_and_cover_batches(batches, n_types, seed, data_):
    n = len(batches)
    types = np.asarray(data_.draw(st.lists(st.integers(0, n_types - 1), min_size=n, max_size=n))).astype(str)
    adata = obs_adata(batches, cell_type=types)
    for labels_key in (None, "cell_type"):
        if labels_key and (adata.obs["batch"].astype(str) + "_" + types).value_counts().max() < 5:
            with pytest.raises(ValueError, match="fewer than 5 cells: stratify by batch alone"):
                data.kfold_splits(adata, batch_key="batch", labels_key=labels_key, seed=seed)
            continue
        splits = data.kfold_splits(adata, batch_key="batch", labels_key=labels_key, seed=seed)
        assert len(splits) == 5
        np.testing.assert_array_equal(np.sort(np.concatenate([s["test"] for s in splits])), np.arange(n))
        np.testing.assert_array_equal(np.sort(np.concatenate([s["val"] for s in splits])), np.arange(n))
        for s in splits:
            np.testing.assert_array_equal(np.sort(np.concatenate([s["train"], s["val"], s["test"]])), np.arange(n))
            if labels_key is None:  # stratified by batch alone: with >= 5 cells each, every batch is in every part
                for part in s.values(): assert adata.obs["batch"].iloc[part].nunique() == adata.obs["batch"].nunique()
    first, again = (data.kfold_splits(adata, batch_key="batch", seed=seed) for _ in range(2))
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(first, again) for k in a)
