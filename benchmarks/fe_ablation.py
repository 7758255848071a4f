"""What each design choice of the default scMEDAL-FE buys: one variant at a time, scored like `quality.py`.

Each variant is the default mixed-effects FE (`SCMEDAL(adata, models=("fe",))`, trained with the library's
defaults on fold 1 of the paper's rotation) with one or two settings changed: the likelihood (the counts'
negative binomial, or the squared error on min-max scaled log expression when no counts are registered), the
latent and hidden widths, and the loss weights (the latent's KL weight, the adversary's weight `w_adv`). The fold's test cells
are scored with scib-metrics' `Benchmarker` (`scmedal.metrics.scib_scores`, unscaled), next to PCA(50) fitted on
the training cells, as in `benchmarks/quality.py`. Every variant is trained in this process one after the other,
so the table compares like with like; on AML (11,731 cells, 2,916 genes, 2 cores) a variant takes 5 to 15 minutes.

    python benchmarks/fe_ablation.py data.h5ad --batch-key patient --labels-key cell_type
        [--variants default gaussian ...] [--seeds 0 1 2] [--threads N] [--out ablation.csv]

The data are preprocessed as by `scmedal fit` (raw counts are kept in `layers["counts"]`).
"""
import argparse
import logging
import time
import warnings

import anndata as ad
import pandas as pd
import torch

from scmedal import data, metrics, peers
from scmedal.cli import prepare
from scmedal.model import SCMEDAL

GAUSSIAN = dict(counts=False, n_latent=50, loss_weights=dict(kl_weight=0.03))  # the default FE before the count likelihood
VARIANTS = {  # name: (what it changes, settings)
    "default": ("negative binomial on the counts, latent 10, KL weight 1, w_adv 10", {}),
    "nb_adv0": ("... without the adversary (w_adv 0)", dict(loss_weights=dict(w_adv=0.0))),
    "nb_adv100": ("... w_adv 100", dict(loss_weights=dict(w_adv=100.0))),
    "nb_latent20": ("... latent 20", dict(n_latent=20)),
    "nb_latent30": ("... latent 30", dict(n_latent=30)),
    "nb_adv3": ("... w_adv 3", dict(loss_weights=dict(w_adv=3.0))),
    "nb_kl0.3": ("... KL weight 0.3", dict(loss_weights=dict(kl_weight=0.3))),
    "nb_hidden256": ("... hidden widths 256, 128 (instead of 512, 132)", dict(n_hidden=(256, 128))),
    "gaussian": ("squared error on scaled log expression, latent 50, KL weight 0.03, w_adv 10", GAUSSIAN),
    "gaussian_adv0": ("... without the adversary (w_adv 0)", GAUSSIAN | dict(loss_weights=dict(kl_weight=0.03, w_adv=0.0))),
    "gaussian_latent10": ("... latent 10", GAUSSIAN | dict(n_latent=10)),
    "gaussian_kl1": ("... KL weight 1", GAUSSIAN | dict(loss_weights=dict(kl_weight=1.0))),
}


def fe_latent(adata, split, *, counts=True, n_latent=None, n_hidden=(512, 132), loss_weights=None, seed=0, batch_key, labels_key):
    "The test cells' latent of one FE variant, trained on the fold with the library's defaults otherwise."
    data.setup_anndata(adata, batch_key=batch_key, labels_key=labels_key, counts_layer="auto" if counts else None)
    model = SCMEDAL(adata, models=("fe",), n_latent=n_latent, n_hidden=n_hidden, seed=seed)
    model.train(train_indices=split["train"], val_indices=split["val"], progress_bar=False,
                loss_weights={"fe": loss_weights} if loss_weights else None)
    return model.get_latent_representation(kind="fe")[split["test"]], len(model.history["fe"])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="an .h5ad file with raw counts")
    parser.add_argument("--batch-key", required=True)
    parser.add_argument("--labels-key", required=True)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="train every variant with each of these seeds")
    parser.add_argument("--threads", type=int, default=2, help="torch threads and scib-metrics' neighbour-search jobs")
    parser.add_argument("--out", help="write the table as CSV here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*|.*treespec.*")
    keys = dict(batch_key=args.batch_key, labels_key=args.labels_key)
    adata = prepare(ad.read_h5ad(args.path), **keys)
    split = data.kfold_splits(adata, **keys)[0]
    test = adata[split["test"]].copy()
    latents = {"PCA": peers.pca_latent(adata, train_indices=split["train"])[split["test"]]}
    rows = {"PCA": dict(change="no correction", epochs=None, minutes=None)}
    for variant in args.variants:
        for seed in args.seeds:
            change, settings = VARIANTS[variant]
            name = variant if args.seeds == [0] else f"{variant} (seed {seed})"
            start = time.perf_counter()
            latents[name], epochs = fe_latent(adata, split, **settings, seed=seed, **keys)
            rows[name] = dict(change=change, epochs=epochs, minutes=round((time.perf_counter() - start) / 60, 1))
            print(f"{name}: {epochs} epochs in {rows[name]['minutes']} min", flush=True)
    scores = metrics.scib_scores(test, latents, **keys, n_jobs=args.threads)
    table = pd.DataFrame(rows).T.join(scores)
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.max_colwidth", 80):
        print(table[["change", "epochs", "minutes", "Batch correction", "Bio conservation", "Total"]].round(3).to_string())
        print("\nevery scib metric (unscaled):\n" + scores.round(3).to_string())
    if args.out: table.to_csv(args.out)


if __name__ == "__main__":
    main()
