"Extra checks of scmedal.fixed_effects and scmedal.random_effects: step order, round trips, options, bad input."
import logging
import warnings

import numpy as np
import pytest
import torch

from scmedal.fixed_effects import (FE_BN_MOMENTUM, KERAS_BN_MOMENTUM, AdversarialTrainingPlan, FixedEffectsModule,
                                   TrainingPlan, classification_terms, quiet_trainer)
from scmedal.model import training_plan
from scmedal.random_effects import RandomEffects, RandomEffectsModule, gaussian_kl

logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
G, B, C = 40, 3, 4
SMALL = dict(n_hidden=(16, 8), n_latent=4)


def minibatch(n=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.rand(n, G, generator=g), batch_index=torch.randint(B, (n,), generator=g),
                label=torch.randint(-1, C, (n,), generator=g))


def loader(n_batches=2):
    return torch.utils.data.DataLoader([minibatch(seed=i) for i in range(n_batches)], batch_size=None)


def fit(plan, n_batches=2, val=False):
    trainer = quiet_trainer(max_epochs=1, num_sanity_val_steps=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(plan, loader(n_batches), loader(1) if val else None)
    return trainer


def fe_module(kind):
    return FixedEffectsModule(G, B, C if kind.endswith("c") else None, adversarial=kind.startswith("fe"), **SMALL)


@pytest.mark.parametrize("kind", ["ae", "aec", "fe", "fec"])
def test_fixed_effects_shapes_and_gradients(kind):
    m = fe_module(kind)
    assert m.kind == kind
    out = m(minibatch()["x"])
    assert out["x_hat"].shape == (24, G) and out["z"].shape == (24, 4)
    m.loss(minibatch()).total_loss.backward()
    assert all(p.grad is not None for p in m.parameters())
    expected = KERAS_BN_MOMENTUM if kind.startswith("ae") else FE_BN_MOMENTUM
    assert m.encoder.norms[0].momentum == pytest.approx(expected)


def test_adversarial_module_needs_batches():
    with pytest.raises(ValueError, match="n_batches"): FixedEffectsModule(G, None)


def test_adversarial_step_order():
    "The adversary steps first on a fixed encoder; the autoencoder then steps against the updated adversary."
    m = fe_module("fe")
    calls = []
    m.adversary.register_forward_hook(lambda mod, i, o: calls.append(
        (m.adversary.layers[0].weight.detach().clone(), m.encoder.linears[0].weight.detach().clone())))
    fit(AdversarialTrainingPlan(m), n_batches=1)
    (adv_1, enc_1), (adv_2, enc_2) = calls
    assert not torch.equal(adv_1, adv_2)  # the adversary stepped before the generator pass
    assert torch.equal(adv_2, m.adversary.layers[0].weight)  # ...and not in the autoencoder step
    assert torch.equal(enc_1, enc_2)  # the adversary step did not touch the encoder
    assert not torch.equal(enc_2, m.encoder.linears[0].weight)  # the autoencoder step did


def test_global_step_counts_optimiser_steps():
    assert fit(AdversarialTrainingPlan(fe_module("fec")), n_batches=3).global_step == 6
    assert fit(TrainingPlan(fe_module("aec")), n_batches=3).global_step == 3
    assert fit(TrainingPlan(RandomEffectsModule(G, B, **SMALL)), n_batches=3).global_step == 3


def test_validation_changes_nothing():
    m = fe_module("fec")
    plan = AdversarialTrainingPlan(m)
    fit(plan, n_batches=1)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    trainer = quiet_trainer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        metrics = trainer.validate(plan, loader(2), verbose=False)[0]
    assert {"val_total_loss", "val_adv_acc", "val_class_acc"} <= set(metrics)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_paper_weights_are_used():
    assert training_plan("fe", fe_module("fe"), preset="paper", dataset="hh").loss_weights == dict(w_recon=600.0, w_gen=1.0)
    assert training_plan("re", RandomEffectsModule(G, B, **SMALL), preset="paper", dataset="asd").loss_weights["w_latent_batch"] == 0.4


@pytest.mark.parametrize("make", [lambda: fe_module("fec"), lambda: RandomEffectsModule(G, B, **SMALL)])
def test_state_dict_round_trip(make):
    m, fresh = make(), make()
    fit(TrainingPlan(m) if m.kind in ("ae", "aec", "re") else AdversarialTrainingPlan(m), n_batches=1)
    fresh.load_state_dict(m.state_dict())
    m.eval(), fresh.eval()
    x, b = minibatch()["x"], minibatch()["batch_index"]
    with torch.no_grad():
        args = (x,) if isinstance(m, FixedEffectsModule) else (x, b)
        assert torch.equal(m(*args)["x_hat"], fresh(*args)["x_hat"])
    if isinstance(fresh, FixedEffectsModule):  # tying survives loading
        assert fresh.decoder.encoder_linears[0].weight is fresh.encoder.linears[0].weight


def test_classification_terms_without_known_labels_is_finite():
    logits = torch.randn(5, 3, requires_grad=True)
    ce, acc = classification_terms(logits, torch.full((5,), -1))
    ce.backward()
    assert ce.item() == 0 and acc.item() == 0 and torch.isfinite(logits.grad).all()


def test_random_effects_options():
    layer = RandomEffects(B, 6, kl_estimator="analytic").train()
    layer(torch.tensor([0, 1]))
    assert torch.allclose(layer.kl, gaussian_kl(layer.mu, layer.sigma, 0.25))
    with pytest.raises(ValueError, match="kl_estimator"): RandomEffects(B, 6, kl_estimator="exact")


def test_random_effects_module_options():
    torch.manual_seed(0)
    m = RandomEffectsModule(G, B, recon_classifier=True, **SMALL)
    out = m.loss(minibatch(), w_recon_batch=0.5)
    assert {"recon_batch_loss", "latent_batch_loss", "kl_loss"} <= set(out.terms) and "recon_batch_acc" in out.metrics
    single = RandomEffectsModule(G, B, double_selu=False, **SMALL)
    single.load_state_dict(m.state_dict(), strict=False)
    m.eval(), single.eval()
    x, b = minibatch()["x"], minibatch()["batch_index"]
    with torch.no_grad(): assert not torch.allclose(m.reconstruct(x, b), single.reconstruct(x, b))


def test_counterfactual_batch_forms():
    m = RandomEffectsModule(G, B, **SMALL).eval()
    x, b = minibatch()["x"], minibatch()["batch_index"]
    with torch.no_grad():
        by_int = m.counterfactual(x, b, 2)
        assert torch.equal(by_int, m.counterfactual(x, b, np.int64(2)))
        assert torch.equal(by_int, m.counterfactual(x, b, torch.full_like(b, 2)))
        assert torch.equal(m.counterfactual(x, b, b, decoder_only=True), m.reconstruct(x, b))


def test_random_effects_layer_table():
    m = RandomEffectsModule(G, B, **SMALL)
    names = [n for n, _ in m.named_random_effects()]
    assert len(names) == 10 and names[0] == "encoder.blocks.0.gamma" and names[-1] == "decoder.blocks.2.beta"
    assert all(layer.sigma.shape == layer.mu.shape == (B, layer.mu.shape[1]) for _, layer in m.named_random_effects())
