"""Counterfactuals on technical batches built from real cells, where the batch effect is known to be technical.

Real cells from one run (by default the control run of Kang 2018, `IMMUNE_CTRL`: 6,548 PBMCs of 8 donors) are
dealt into `--batches` technical batches (`scmedal.data.technical_batches`). Two things make the batches differ, as
in real experiments:

* **their cell-type mix**: each cell type spreads over the batches in its own proportions (Dirichlet draws with
  concentration `--concentration`), so the batches' pooled means differ by composition and the pooled shift is
  confounded;
* **their capture**: each batch keeps every count of gene g with probability `depth_b * e_bg / max_b' e_b'g`
  (binomial thinning, what a lower capture or sequencing depth does to counts), with `e_bg` log-normal
  (sd `--gene-sd`) and depths `--depths` (evenly from 1 down to 0.5): a gene-specific technical effect on top of
  the depth.

The data are then preprocessed like any user's (`scmedal.cli.prepare`: log-normalised, 2,916 HVGs, counts kept),
fold 1 of the paper's rotation is taken, and the default scMEDAL (FE network, library defaults) and scVI (the
paper's settings, `scmedal.peers.train_scvi`, on the training and validation cells) are trained. The check is
`scmedal.metrics.counterfactual_agreement` on the test cells, as in the Kang walkthrough: per cell type with at
least 30 cells and ordered batch pair, the predicted change of the cell type's test cells against the observed
difference of the two batches' means, Pearson r and R² over genes, next to the pooled shift and the split-half
ceiling of r. scMEDAL is scored twice: its default counterfactual (the mean of measured log expression) and the
log of the expected expression (`measured=False`).

    python benchmarks/technical_batches.py [data.h5ad] [--labels-key cell_type] [--subset batch=IMMUNE_CTRL]
        [--batches 3] [--concentration 1] [--gene-sd 0.5] [--depths 1 0.75 0.5] [--seed 0] [--no-scvi] [--threads 2]

Without a path it reads `kang2018_ifnb.h5ad` through `scmedal.datasets.find_dataset` ($SCMEDAL_DATA_DIR or the
user cache). Needs the `[bench]` extra for scVI (`--no-scvi` skips it).
"""
import argparse
import time

import anndata as ad
import numpy as np
import pandas as pd
import torch

from scmedal import datasets, metrics, peers
from scmedal.cli import prepare
from scmedal.data import kfold_splits, technical_batches
from scmedal.model import SCMEDAL
from speed import quiet


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", nargs="?", help="an .h5ad file with raw counts (default: Kang 2018 from the data folder)")
    parser.add_argument("--labels-key", default="cell_type")
    parser.add_argument("--subset", default="batch=IMMUNE_CTRL", help="obs column=value: the cells of one run ('' for all cells)")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--concentration", type=float, default=1.0, help="Dirichlet concentration of each cell type's spread over batches")
    parser.add_argument("--gene-sd", type=float, default=0.5, help="sd of the log capture efficiency per batch and gene")
    parser.add_argument("--depths", type=float, nargs="+", help="each batch's overall capture (default: evenly from 1 down to 0.5)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-scvi", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet()
    path = args.path or datasets.find_dataset("kang2018_ifnb")
    if path is None: parser.error("no data file given and the Kang 2018 file is not in $SCMEDAL_DATA_DIR or the cache")
    raw = ad.read_h5ad(path)
    if args.subset:
        key, value = args.subset.split("=", 1)
        raw = raw[raw.obs[key].astype(str) == value].copy()
    cells = technical_batches(raw, labels_key=args.labels_key, n_batches=args.batches, concentration=args.concentration,
                              gene_sd=args.gene_sd, depths=args.depths, seed=args.seed)
    print(pd.crosstab(cells.obs[args.labels_key], cells.obs.tech_batch).to_string(), "\n")
    adata = prepare(cells, batch_key="tech_batch", labels_key=args.labels_key, normalized=False)
    split = kfold_splits(adata, batch_key="tech_batch", labels_key=args.labels_key)[0]
    start = time.perf_counter()
    model = SCMEDAL(adata, models=("fe",), seed=args.seed).train(train_indices=split["train"], val_indices=split["val"], progress_bar=False)
    print(f"scMEDAL (default FE): {len(model.history['fe'])} epochs in {(time.perf_counter() - start) / 60:.1f} min")
    predict = {"scMEDAL (default)": lambda c, b: model.get_counterfactual(c, transform_batch=b),
               "scMEDAL, expected (measured=False)": lambda c, b: model.get_counterfactual(c, transform_batch=b, measured=False)}
    if not args.no_scvi:
        start = time.perf_counter()
        scvi_model = peers.train_scvi(adata, batch_key="tech_batch", train_indices=np.concatenate([split["train"], split["val"]]), seed=args.seed)
        print(f"scVI: {(time.perf_counter() - start) / 60:.1f} min")
        predict["scVI transform_batch"] = lambda c, b: peers.scvi_counterfactual(c, model=scvi_model, batch_key="tech_batch", transform_batch=b)
    cases = {name: metrics.counterfactual_agreement(adata, f, batch_key="tech_batch", group_key=args.labels_key, cells=split["test"])
             for name, f in predict.items()}
    ours = cases["scMEDAL (default)"]
    print(f"split-half ceiling of r: median {ours.ceiling_r.median():.2f} over {len(ours)} cases\n")
    print(metrics.agreement_summary(cases).round(3).to_string())
    per_case = pd.concat({**cases, "pooled shift (no model)": ours.assign(R2=ours.pooled_R2)}, names=["method", None]).reset_index(level=0)
    print("\nR² per case:\n" + per_case.pivot_table(index=["group", "source", "target"], columns="method", values="R2").round(2).to_string())


if __name__ == "__main__":
    main()
