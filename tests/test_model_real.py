"""The SCMEDAL API end to end on the real van Galen 2019 AML data (skipped when ../shared/data is absent)."""
import numpy as np
import pytest

import scmedal
from scmedal import data, datasets, metrics


@pytest.fixture(scope="module")
def aml_model(data_dir):
    "FE + RE at the paper's sizes on the AML data, a few epochs on fold-1 training cells."
    adata = data.preprocess(datasets.vangalen2019_aml(data_dir=data_dir))
    scmedal.SCMEDAL.setup_anndata(adata, batch_key="patient", labels_key="cell_type", condition_key="condition")
    split = data.kfold_splits(adata, batch_key="patient", labels_key="cell_type")[0]
    model = scmedal.SCMEDAL(adata, preset="paper", dataset="aml").train(max_epochs=3, lr=1e-3, train_indices=split["train"],
                                                        val_indices=split["val"], progress_bar=False)
    return adata, split, model


def test_aml_latents_counterfactuals_and_random_effects(aml_model):
    adata, split, model = aml_model
    z_fe, z_re = (model.get_latent_representation(kind=k) for k in ("fe", "re"))
    assert z_fe.shape == z_re.shape == (adata.n_obs, 50)
    assert np.isfinite(z_fe).all() and np.isfinite(z_re).all()
    assert set(model.history) == {"fe", "re"} and len(model.history["re"]) == 3
    assert model.history["re"]["recon_loss"].iloc[-1] < model.history["re"]["recon_loss"].iloc[0]  # (val needs BN running stats: slow at Keras momentum)
    cf = model.get_counterfactual(adata[:500], transform_batch="BM3")
    assert cf.shape == (500, 2916) and np.isfinite(cf).all()
    table = model.get_random_effects()
    assert set(table.batch) == set(adata.obs["patient"])
    assert set(table[table.layer == "decoder.blocks.2"].unit) == set(adata.var_names)


def test_aml_re_latent_separates_patients_more_than_fe(aml_model):
    adata, split, model = aml_model
    test = adata[split["test"]].copy()
    for kind in ("fe", "re"): test.obsm[f"X_scmedal_{kind}"] = model.get_latent_representation(test, kind=kind)
    scores = metrics.clustering_scores(test, use_rep=["X_scmedal_fe", "X_scmedal_re"], batch_key="patient", labels_key="cell_type")
    asw = scores[(scores.label == "batch") & (scores.metric == "ASW")].set_index("embedding").value
    assert asw["X_scmedal_re"] > asw["X_scmedal_fe"]


def test_preprocess_keeps_torch_thread_count(data_dir):
    "scanpy's normalize_total (numba, OpenMP) resets torch's threads on these data; preprocess must restore them."
    import torch
    raw, before = datasets.vangalen2019_aml(data_dir=data_dir), torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        data.preprocess(raw, n_top_genes=500)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
