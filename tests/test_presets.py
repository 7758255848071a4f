"""The presets: the default builds the mixed-effects FE network and trains with early stopping that cannot fire too
early; the paper preset builds and trains the paper's networks."""
import logging

import lightning as L
import numpy as np
import pytest
import torch

from scmedal import data
from scmedal.mixed_effects import MixedEffectsAutoencoder
from scmedal.fixed_effects import FixedEffectsModule
from scmedal.model import PRESETS, SCMEDAL

logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
pytestmark = [pytest.mark.filterwarnings("ignore:.*does not have many workers.*"), pytest.mark.filterwarnings("ignore:.*treespec.*")]
SMALL = dict(n_hidden=(32, 16), n_latent=8)


@pytest.fixture(scope="module")
def adata():
    out = data.preprocess(data.simulate(n_cells=400, n_genes=150, n_batches=3, seed=0), n_top_genes=100)
    data.setup_anndata(out, batch_key="batch", labels_key="cell_type")
    torch.set_num_threads(1)
    return out


def test_presets_build_their_networks(adata):
    assert isinstance(SCMEDAL(adata, **SMALL).modules["fe"], MixedEffectsAutoencoder)
    assert isinstance(SCMEDAL(adata, preset="paper", **SMALL).modules["fe"], FixedEffectsModule)
    assert PRESETS["paper"].counterfactual_mode == "full" and PRESETS["default"].counterfactual_mode == "fe"


def test_default_training_stops_early_but_not_before_min_steps(adata):
    "FE's 2,000 minibatch steps at 300 training cells in minibatches of 256 (2 per epoch) are 1,000 epochs: the floor."
    model = SCMEDAL(adata, models=("fe",), **SMALL)
    epochs, least = model._epochs("fe", None, n_train=300, batch_size=256)
    assert least == 1000 and epochs == 2000  # up to 4,000 steps
    model.train(train_indices=range(300), val_indices=range(300, 400), max_epochs=30, progress_bar=False)
    assert len(model.history["fe"]) == 30  # early stopping is on (validation cells given) but cannot fire yet


class ValLosses(L.Callback):
    def __init__(self): self.losses, self.weights = [], []
    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking: self.losses.append(float(trainer.callback_metrics["val_recon_loss"]))


def test_best_weights_are_kept(adata):
    "With early stopping, the model ends with the weights of its best validation epoch."
    seen = ValLosses()
    model = SCMEDAL(adata, models=("fe",), **SMALL).train(train_indices=range(300), val_indices=range(300, 400), max_epochs=6,
                                                          lr=3e-2, callbacks=[seen], progress_bar=False)
    module = model.modules["fe"]
    with torch.no_grad():
        batch = next(iter(data.SCMEDALDataModule(adata, train_indices=range(300), val_indices=range(300, 400),
                                                 scaling=model.scaling, batch_size=100).loader("val")))
        loss = float(module.loss(batch).terms["recon_loss"])
    assert loss == pytest.approx(min(seen.losses), rel=1e-4)


def test_default_counterfactual_is_the_fe_networks(adata):
    model = SCMEDAL(adata, **SMALL).train(max_epochs=2, progress_bar=False)
    np.testing.assert_allclose(model.get_counterfactual(transform_batch="donor1"),
                               model.get_counterfactual(transform_batch="donor1", mode="fe"))
    own = (adata.obs.batch == "donor1").to_numpy()
    expected = model.get_counterfactual(transform_batch="donor1", measured=False)  # the log of the expected expression
    np.testing.assert_allclose(expected[own], model.get_reconstruction(kind="fe", measured=False)[own], atol=1e-5)
    assert (model.get_counterfactual(transform_batch="donor1") <= expected + 1e-4).all()  # measured (the default): below it, by Jensen
    with pytest.raises(ValueError, match="no posterior to sample"): model.get_counterfactual(transform_batch="donor1", n_samples=2)


def test_paper_preset_keeps_the_papers_training(adata):
    model = SCMEDAL(adata, preset="paper", models=("fe",), **SMALL)
    assert model._epochs("fe", None, n_train=300, batch_size=512) == (500, 0)
    model.train(max_epochs=2, progress_bar=False)
    assert {"adv_acc", "recon_loss", "adv_loss"} <= set(model.history["fe"].columns)
    with pytest.raises(ValueError, match="FE is the paper's"): model.get_counterfactual(transform_batch="donor1", mode="fe")


def test_same_seed_same_model_on_two_threads():
    "The count likelihood's gradients add up in a fixed order, so two threads still give the same model twice."
    adata = data.preprocess(data.simulate(n_cells=2000, n_genes=600, n_batches=6, seed=0), n_top_genes=400)  # smaller data hid it
    data.setup_anndata(adata, batch_key="batch")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        z = lambda: SCMEDAL(adata, models=("fe",), n_hidden=(128, 64), seed=0).train(max_epochs=2, batch_size=256, progress_bar=False).get_latent_representation()
        np.testing.assert_array_equal(z(), z())
    finally: torch.set_num_threads(threads)
