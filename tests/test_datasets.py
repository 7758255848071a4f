"""Checks on the real data files (skipped when ../shared/data is absent)."""
import numpy as np
import pytest

from scmedal import data, datasets


@pytest.fixture(scope="module")
def aml(data_dir):
    return datasets.vangalen2019_aml(data_dir=data_dir)


def test_aml_paper_exclusions_leave_14_patients(aml, data_dir):
    full = datasets.vangalen2019_aml(data_dir=data_dir, paper_exclusions=False)
    assert full.shape == (12811, 21726)
    assert full.obs["patient"].nunique() == 18
    assert aml.obs["patient"].nunique() == 14
    assert aml.n_obs == 12811 - 1080
    assert not set(datasets.PAPER_EXCLUDED_PATIENTS) & set(aml.obs["patient"])
    assert set(aml.obs["condition"]) == {"AML", "healthy"}


def test_aml_preprocessing_keeps_2916_hvgs_and_counts(aml):
    pre = data.preprocess(aml)
    assert pre.n_vars == 2916
    assert pre.layers["counts"].shape == pre.shape
    assert np.all(pre.layers["counts"].data == np.round(pre.layers["counts"].data))
    assert pre.X.max() < 12  # log1p of counts per 10k
    registry = data.setup_anndata(pre, batch_key="patient", labels_key="cell_type", condition_key="condition")
    assert len(registry["batch_categories"]) == 14
    assert len(registry["label_categories"]) == 21


def test_aml_splits_keep_every_patient_in_every_part(aml):
    splits = data.kfold_splits(aml, batch_key="patient", labels_key="cell_type")
    for split in splits:
        for part in split.values():
            assert aml.obs["patient"].iloc[part].nunique() == 14
    sizes = [len(splits[0][k]) for k in ("train", "val", "test")]
    assert abs(sizes[0] / aml.n_obs - 0.6) < 0.01 and abs(sizes[2] / aml.n_obs - 0.2) < 0.01


def test_kang_and_onek1k_shapes(data_dir):
    kang = datasets.kang2018_ifnb(data_dir=data_dir)
    assert kang.shape == (13999, 14053)
    assert kang.obs["cell_type"].nunique() == 13
    assert kang.obs.loc[kang.obs["condition"] == "stim", "donor"].isna().all()
    onek = datasets.onek1k_subset(data_dir=data_dir)
    assert onek.shape == (7811, 1000)
    assert onek.obs["donor"].nunique() == 40
    pre = data.preprocess(onek, n_top_genes=500)
    assert pre.n_vars == 500


def test_environment_variable_is_searched(data_dir, monkeypatch):
    monkeypatch.setenv("SCMEDAL_DATA_DIR", str(data_dir))
    assert datasets.dataset_path("onek1k_subset") == data_dir / "onek1k_yazar2022_subset.h5ad"
