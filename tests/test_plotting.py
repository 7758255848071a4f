"""Tests of scmedal.genomap (the layout: one-to-one, reuse, locality) and scmedal.plotting (figures and `save=`, AnnData
left untouched by the UMAP panel, the explorer's static fallback)."""
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure
from scipy import sparse

from scmedal import genomap as gm
from scmedal import plotting as pl


def module_data(n_cells=200, n_modules=5, genes_per_module=12, noise=0.7, seed=0):
    "Cells × genes with co-expressed gene modules (each driven by one hidden factor), and each gene's module."
    rng = np.random.default_rng(seed)
    module = np.repeat(np.arange(n_modules), genes_per_module)
    factors = rng.normal(size=(n_cells, n_modules))
    return factors[:, module] + noise * rng.normal(size=(n_cells, len(module))), module


@pytest.fixture(scope="module")
def modules():
    return module_data()


@pytest.fixture(scope="module")
def layout(modules):
    X, module = modules
    return gm.fit_genomap(X, gene_names=[f"g{i}" for i in range(X.shape[1])])


@pytest.fixture(scope="module")
def panels(modules):
    "Fixed panels, counterfactuals for three batches (differing only at genes 3 and 17) and obs of the 200 cells."
    X, _ = modules
    rng = np.random.default_rng(1)
    fixed = {"input": X, "FE": X + 0.1 * rng.normal(size=X.shape), "RE": X + 0.1 * rng.normal(size=X.shape)}
    counterfactuals = {}
    for b, shift in zip(["b0", "b1", "b2"], [-2.0, 0.0, 2.0]):
        cf = X.copy()
        cf[:, [3, 17]] += shift
        counterfactuals[b] = cf
    obs = pd.DataFrame({"cell_type": np.repeat(["t0", "t1"], len(X) // 2)}, index=[f"c{i}" for i in range(len(X))])
    return fixed, counterfactuals, obs


def assert_figure_saved(fig, path):
    assert isinstance(fig, Figure)
    assert path.is_file() and path.stat().st_size > 1000


# --- genomap layout (scmedal.genomap) -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_genes, side", [(4, 2), (5, 3), (60, 8), (64, 8), (2916, 54), (3000, 55)])
def test_default_grid_is_the_smallest_square(n_genes, side):
    assert gm.default_grid_shape(n_genes) == (side, side)


def test_gene_distance_is_correlation_distance_and_constant_genes_are_uncorrelated():
    X = np.random.default_rng(0).normal(size=(40, 5))
    X[:, 2] = 3.0
    D = gm.gene_distance(sparse.csr_matrix(X))
    with np.errstate(invalid="ignore", divide="ignore"): expected = 1 - np.nan_to_num(np.corrcoef(X.T), nan=0.0)
    np.fill_diagonal(expected, 0.0)
    np.testing.assert_allclose(D, expected, atol=1e-10)
    assert np.all(D[2, [0, 1, 3, 4]] == 1.0)


def test_pixel_distance_is_two_dimensional_and_radial_is_the_original():
    D = gm.pixel_distance((4, 5))
    assert D.shape == (20, 20) and D[0, 19] == pytest.approx(np.hypot(3, 4))
    radial = gm.pixel_distance((5, 5), metric="radial")
    assert radial[0, 24] == 0.0 and radial[12, 0] == pytest.approx(np.sqrt(8))
    with pytest.raises(ValueError, match="metric"): gm.pixel_distance((3, 3), metric="manhattan")


def test_each_gene_gets_exactly_one_pixel(layout, modules):
    X, _ = modules
    assert layout.grid_shape == (8, 8)
    assert len(layout.pixel) == X.shape[1] == len(np.unique(layout.pixel))
    assert layout.pixel.min() >= 0 and layout.pixel.max() < 64
    assert np.isfinite(layout.gw_loss)


@pytest.mark.parametrize("options", [dict(pixel_metric="radial"), dict(init="product"), dict(locality=None),
                                     dict(grid_shape=(6, 11))])
def test_assignment_is_one_to_one_for_every_option(modules, options):
    X, _ = modules
    layout = gm.fit_genomap(X[:, :50], max_iter=3, **options)
    rows, cols = layout.grid_shape
    assert len(np.unique(layout.pixel)) == 50 and layout.pixel.max() < rows * cols


def test_images_have_the_grid_shape_and_blank_unused_pixels(layout, modules):
    X, _ = modules
    images = layout.transform(X)
    assert images.shape == (200, 8, 8)
    assert np.isnan(images).sum(axis=(1, 2)).tolist() == [64 - 60] * 200
    assert layout.transform(X[0]).shape == (1, 8, 8)
    np.testing.assert_array_equal(layout.transform(sparse.csr_matrix(X[:3])), images[:3])
    with pytest.raises(ValueError, match="60"): layout.transform(X[:, :10])


def test_one_layout_is_reused_for_every_matrix(layout, modules):
    X, _ = modules
    pixel_before = layout.pixel.copy()
    other = np.random.default_rng(5).normal(size=(7, 60))
    for matrix in (X, other):
        images = layout.transform(matrix).reshape(len(matrix), -1)
        np.testing.assert_array_equal(images[:, layout.pixel], matrix)
    np.testing.assert_array_equal(layout.pixel, pixel_before)
    rows, cols = layout.positions.T
    np.testing.assert_array_equal(layout.transform(other)[:, rows, cols], other)


def test_strongly_correlated_genes_land_closer_than_random_pairs(layout, modules):
    X, _ = modules
    corr = np.corrcoef(X.T)
    upper = np.triu_indices(60, 1)
    top = np.argsort(-corr[upper])[:100]
    random_pairs = np.random.default_rng(0).choice(len(upper[0]), 500, replace=False)
    grid = np.linalg.norm(layout.positions[:, None] - layout.positions[None], axis=-1)[upper]
    assert grid[top].mean() < 0.6 * grid[random_pairs].mean()


def test_fit_is_deterministic(modules):
    X, _ = modules
    first, second = gm.fit_genomap(X, seed=3), gm.fit_genomap(X, seed=3)
    np.testing.assert_array_equal(first.pixel, second.pixel)


def test_fit_rejects_bad_input(modules):
    X, _ = modules
    with pytest.raises(ValueError, match="fewer pixels"): gm.fit_genomap(X, grid_shape=(5, 5))
    with pytest.raises(ValueError, match="gene names"): gm.fit_genomap(X, gene_names=["a", "b"])
    with pytest.raises(ValueError, match="init"): gm.fit_genomap(X, init="random")
    with pytest.raises(ValueError, match="at least 4"): gm.fit_genomap(X[:, :3])


def test_plotting_re_exports_the_layout():
    assert pl.fit_genomap is gm.fit_genomap and pl.GenomapLayout is gm.GenomapLayout
    assert {"fit_genomap", "GenomapLayout"} <= set(pl.__all__)


# --- genomap figure and explorer ----------------------------------------------------------------------------

@pytest.mark.parametrize("cells", [None, 0, np.arange(10), np.arange(200) < 50])
def test_genomap_figure_has_one_image_per_panel_and_is_saved(layout, panels, tmp_path, cells):
    fixed, counterfactuals, _ = panels
    fig = pl.plot_genomaps(layout, fixed, counterfactuals=counterfactuals, cells=cells, top_k=4, save=tmp_path / "g.png")
    assert_figure_saved(fig, tmp_path / "g.png")
    assert sum(len(ax.images) for ax in fig.axes) == 6
    assert [t.get_text() for t in fig.axes[3].texts] == ["1", "2", "3", "4"]


def test_genomap_key_lists_the_genes_that_vary_across_counterfactuals(layout, panels):
    fixed, counterfactuals, _ = panels
    fig = pl.plot_genomaps(layout, fixed, counterfactuals=counterfactuals, top_k=2, gene_names=[f"x{i}" for i in range(60)])
    assert sorted(t.get_text() for t in fig.legends[0].get_texts()) == ["x17", "x3"]


def test_genomap_figure_rejects_an_empty_selection(layout, panels):
    fixed, _, _ = panels
    with pytest.raises(ValueError, match="no cell"): pl.plot_genomaps(layout, fixed, cells=np.zeros(200, bool))


def test_explorer_falls_back_to_a_static_figure_outside_a_kernel(layout, panels, tmp_path):
    fixed, counterfactuals, obs = panels
    shown = pl.genomap_explorer(layout, fixed, obs, counterfactuals=counterfactuals, group="t1", target="b2")
    assert isinstance(shown, Figure)  # pytest runs no Jupyter kernel
    shown.savefig(tmp_path / "explorer.png")
    bars = [t.get_text() for t in shown.axes[3].get_yticklabels()]
    assert {bars[0].split(". ")[1], bars[1].split(". ")[1]} == {"g3", "g17"}


def test_explorer_is_static_without_ipywidgets_even_in_a_kernel(layout, panels, monkeypatch):
    fixed, counterfactuals, obs = panels
    monkeypatch.setattr(pl, "_live_kernel", lambda: True)
    monkeypatch.setitem(sys.modules, "ipywidgets", None)  # makes `import ipywidgets` fail
    assert isinstance(pl.genomap_explorer(layout, fixed, obs, counterfactuals=counterfactuals), Figure)


def test_explorer_widgets_redraw_on_change(layout, panels):
    ipywidgets = pytest.importorskip("ipywidgets")
    fixed, counterfactuals, obs = panels
    explorer = pl.genomap_explorer(layout, fixed, obs, counterfactuals=counterfactuals, cell=3, static=False)
    assert isinstance(explorer, ipywidgets.VBox)
    (choice, index, target), picture = explorer.children[0].children, explorer.children[1]
    assert choice.value == -1 and index.value == 3
    first = bytes(picture.value)
    target.value = "b2"
    assert bytes(picture.value)[:4] == b"\x89PNG" and bytes(picture.value) != first


def test_explorer_checks_obs_length(layout, panels):
    fixed, counterfactuals, obs = panels
    with pytest.raises(ValueError, match="one row per cell"):
        pl.genomap_explorer(layout, fixed, obs.iloc[:10], counterfactuals=counterfactuals, static=True)


# --- UMAP panel -----------------------------------------------------------------------------------------------

def small_adata(n=150, seed=0):
    rng = np.random.default_rng(seed)
    batch = np.repeat(["b0", "b1", "b2"], n // 3)
    obs = pd.DataFrame(dict(batch=batch, cell_type=np.tile(["t0", "t1"], n // 2), score=rng.random(n)),
                       index=[f"c{i}" for i in range(n)]).astype({"batch": "category", "cell_type": "category"})
    adata = ad.AnnData(sparse.csr_matrix(rng.poisson(1.0, (n, 20)).astype(np.float32)), obs=obs)
    adata.obsm["X_pca"] = rng.normal(size=(n, 10))
    adata.obsm["X_scmedal_fe"] = rng.normal(size=(n, 6))
    adata.uns["note"] = "kept"
    return adata


def assert_unchanged_except(adata, before, new_obsm_keys):
    assert set(adata.obsm) == set(before.obsm) | set(new_obsm_keys)
    for key in before.obsm: np.testing.assert_array_equal(adata.obsm[key], before.obsm[key])
    assert adata.obs.equals(before.obs) and adata.var.equals(before.var)
    assert set(adata.uns) == set(before.uns) and not adata.obsp and not adata.layers
    assert (adata.X != before.X).nnz == 0


def test_umap_panel_writes_only_the_documented_keys(tmp_path):
    adata = small_adata()
    before = adata.copy()
    fig = pl.umap_panel(adata, use_rep=["X_pca", "X_scmedal_fe"], color=["batch", "cell_type", "score"], store=True,
                        save=tmp_path / "umap.png")
    assert_figure_saved(fig, tmp_path / "umap.png")
    assert_unchanged_except(adata, before, {"X_umap_pca", "X_umap_scmedal_fe"})
    assert adata.obsm["X_umap_pca"].shape == (150, 2)
    assert [ax.get_title() for ax in fig.axes[:3]] == ["batch", "cell_type", "score"]


def fake_umap(X, **kwargs):
    return np.asarray(X)[:, :2] * 1.0


def test_umap_panel_stores_nothing_unless_asked_and_reuses_stored_coordinates(monkeypatch):
    monkeypatch.setattr(pl, "_umap_coords", fake_umap)
    adata = small_adata()
    before = adata.copy()
    pl.umap_panel(adata, use_rep="X_pca", color="batch")
    assert_unchanged_except(adata, before, set())
    adata.obsm["X_umap_pca"] = np.zeros((150, 2))
    monkeypatch.setattr(pl, "_umap_coords", lambda X, **kw: pytest.fail("stored coordinates were not reused"))
    fig = pl.umap_panel(adata, use_rep="X_pca", color="batch")
    np.testing.assert_array_equal(fig.axes[0].collections[0].get_offsets(), 0.0)


def test_umap_panel_handles_many_batches_and_missing_keys(monkeypatch):
    monkeypatch.setattr(pl, "_umap_coords", fake_umap)
    adata = small_adata()
    adata.obs["donor"] = pd.Categorical([f"d{i % 31}" for i in range(adata.n_obs)])
    fig = pl.umap_panel(adata, use_rep="X_pca", color="donor")
    assert len(fig.axes[0].get_legend().get_texts()) == 31
    assert len(set(map(tuple, fig.axes[0].collections[0].get_facecolors().round(6)))) == 31
    with pytest.raises(KeyError, match="tissue"): pl.umap_panel(adata, use_rep="X_pca", color="tissue")
    with pytest.raises(KeyError, match="X_nope"): pl.umap_panel(adata, use_rep="X_nope", color="batch")



def test_embedding_panel_draws_stored_coordinates_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(pl, "_umap_coords", lambda X, **kw: pytest.fail("embedding_panel must not run UMAP"))
    adata = small_adata()
    before = adata.copy()
    fig = pl.embedding_panel(adata, basis=["X_pca", "X_scmedal_fe"], color=["batch", "score"], components=(2, 0),
                             save=tmp_path / "pca.png")
    assert_figure_saved(fig, tmp_path / "pca.png")
    assert_unchanged_except(adata, before, set())
    order = np.random.default_rng(0).permutation(adata.n_obs)
    np.testing.assert_array_equal(fig.axes[0].collections[0].get_offsets(), adata.obsm["X_pca"][order][:, [2, 0]])
    assert fig.axes[0].get_ylabel() == "X_pca (3, 1)"
    with pytest.raises(ValueError, match="X_scmedal_fe has 6 columns"): pl.embedding_panel(adata, basis="X_scmedal_fe", components=(0, 6))
    with pytest.raises(ValueError, match="two columns"): pl.embedding_panel(adata, components=(0, 1, 2))
    with pytest.raises(KeyError, match="tissue"): pl.embedding_panel(adata, color="tissue")

# --- random effects, counterfactual shifts, training curves ----------------------------------------------------

@pytest.fixture
def re_table():
    rng = np.random.default_rng(0)
    rows = [dict(batch=f"b{b}", layer=layer, parameter=p, unit=u, mean=rng.normal(), sd=0.1 + rng.random())
            for layer in ("enc_0", "out") for p in ("gamma", "beta") for b in range(4) for u in range(50)]
    return pd.DataFrame(rows)


def test_random_effects_heatmap_shows_batches_by_top_units(re_table, tmp_path):
    fig = pl.random_effects_heatmap(re_table, layer="out", parameter="beta", max_units=20, save=tmp_path / "re.svg")
    assert_figure_saved(fig, tmp_path / "re.svg")
    images = [im for ax in fig.axes for im in ax.images]
    assert [im.get_array().shape for im in images] == [(4, 20), (4, 20)]
    part = re_table.query("layer == 'out' and parameter == 'beta'")
    spread = part.pivot(index="batch", columns="unit", values="mean").var()
    assert [int(t.get_text()) for t in fig.axes[1].get_xticklabels()] == list(spread.sort_values(ascending=False).index[:20])


def test_random_effects_heatmap_input_checks_and_own_axes(re_table):
    with pytest.raises(ValueError, match="several layers"): pl.random_effects_heatmap(re_table)
    with pytest.raises(ValueError, match="no rows"): pl.random_effects_heatmap(re_table, layer="out", parameter="alpha")
    fig = pl._new_figure((4, 3))
    ax = fig.subplots()
    assert pl.random_effects_heatmap(re_table, layer="enc_0", show_sd=False, max_units=None, ax=ax) is fig
    assert ax.images[0].get_array().shape == (4, 50)
    with pytest.raises(ValueError, match="2 axes"): pl.random_effects_heatmap(re_table, layer="enc_0", ax=ax)


def test_counterfactual_shifts_from_a_dict_or_an_array(panels):
    fixed, counterfactuals, _ = panels
    shifts = pl.counterfactual_shifts(counterfactuals, fixed["input"])
    assert shifts.shape == (3, 60) and list(shifts.index) == ["b0", "b1", "b2"]
    np.testing.assert_allclose(shifts[3], [-2.0, 0.0, 2.0])
    assert np.abs(shifts.drop(columns=[3, 17]).to_numpy()).max() < 1e-12
    as_array = pl.counterfactual_shifts(np.stack(list(counterfactuals.values())), fixed["input"][0], cells=0,
                                        batch_names=["b0", "b1", "b2"])
    np.testing.assert_allclose(as_array.to_numpy(), shifts.to_numpy(), atol=1e-12)


def test_counterfactual_shift_heatmap_puts_the_shifted_genes_first(panels, tmp_path):
    fixed, counterfactuals, _ = panels
    fig = pl.counterfactual_shift_heatmap(counterfactuals, fixed["input"], gene_names=[f"g{i}" for i in range(60)],
                                          top_n=5, save=tmp_path / "shift.pdf")
    assert_figure_saved(fig, tmp_path / "shift.pdf")
    labels = [t.get_text() for t in fig.axes[0].get_xticklabels()]
    assert len(labels) == 5 and set(labels[:2]) == {"g3", "g17"}


def test_training_curves_one_panel_per_term_and_chance_level(tmp_path):
    epochs = np.arange(20)
    history = pd.DataFrame({"epoch": epochs, "train_recon_loss": 1 / (1 + epochs), "val_recon_loss": 1.1 / (1 + epochs),
                            "train_adv_acc": np.linspace(0.9, 0.3, 20), "train_adv_loss": np.linspace(0.5, 1.1, 20),
                            "lr": np.full(20, 1e-4), "note": ["x"] * 20})
    fig = pl.plot_history(history, n_batches=4, save=tmp_path / "history.png")
    assert_figure_saved(fig, tmp_path / "history.png")
    titles = [ax.get_title() for ax in fig.axes if ax.axison]
    assert titles == ["recon loss", "adv loss", "lr", "adv acc"]
    acc = fig.axes[3]
    assert acc.get_ylim() == (0, 1.02) and acc.lines[-1].get_ydata()[0] == pytest.approx(0.25)
    assert len(fig.axes[0].lines) == 2
    with pytest.raises(ValueError, match="numeric"): pl.plot_history(pd.DataFrame({"note": ["a"]}))
