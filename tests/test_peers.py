"""Tests of scmedal.peers: PCA fitted on the training cells only, bad input, optional Harmony and scVI left unchanged input."""
import numpy as np
import pytest
from sklearn.decomposition import PCA

from scmedal import data, peers


@pytest.fixture(scope="module")
def adata():
    "300 simulated cells of 3 donors, preprocessed (log expression in X, counts in layers['counts'])."
    return data.preprocess(data.simulate(n_cells=300, n_genes=200, n_batches=3, n_cell_types=3, seed=1), n_top_genes=150)


def test_pca_latent_is_fitted_on_the_training_cells_only(adata):
    train = np.arange(0, adata.n_obs, 2)
    z = peers.pca_latent(adata, train_indices=train, n_components=5)
    changed = adata.copy()
    changed.X = changed.X.toarray()
    changed.X[1::2] *= 3  # the other cells change, the fitted PCA must not
    scaling = data.fit_scaling(adata.X, indices=train)
    z_changed = peers.pca_latent(changed, train_indices=train, scaling=scaling, n_components=5)
    np.testing.assert_allclose(z[train], z_changed[train], atol=1e-4)
    X = data.apply_scaling(adata.X.toarray(), scaling)
    np.testing.assert_allclose(np.abs(z), np.abs(PCA(5, random_state=0).fit(X[train]).transform(X)), atol=1e-4)


def test_harmony_latent(adata):
    pytest.importorskip("harmonypy")
    z = peers.harmony_latent(adata, batch_key="batch", n_components=8)
    assert z.shape == (adata.n_obs, 8) and np.isfinite(z).all()
    with pytest.raises(KeyError, match="'donor' is not a column"): peers.harmony_latent(adata, batch_key="donor")


def test_scvi_needs_counts_and_a_batch_column(adata):
    pytest.importorskip("scvi")
    with pytest.raises(ValueError, match="layer 'raw' is not in adata.layers"): peers.train_scvi(adata, batch_key="batch", layer="raw")
    with pytest.raises(KeyError, match="'donor' is not a column"): peers.train_scvi(adata, batch_key="donor")


def test_scvi_latent_of_every_cell_leaves_adata_unchanged(adata):
    pytest.importorskip("scvi")
    before = adata.copy()
    z = peers.scvi_latent(adata, batch_key="batch", train_indices=np.arange(200), max_epochs=2, batch_size=128,
                          model_kwargs=dict(n_latent=4))
    assert z.shape == (adata.n_obs, 4) and np.isfinite(z).all()
    assert list(adata.obs.columns) == list(before.obs.columns) and set(adata.uns) == set(before.uns)
    assert list(adata.layers) == list(before.layers)
