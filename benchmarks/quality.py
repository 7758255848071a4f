"""Quality of scMEDAL next to its baselines on any .h5ad, with the paper's protocol.

For each fold of the paper's five-fold rotation that is asked for: preprocess (unless the data
are already log-normalised), train the AE, scMEDAL-FE and scMEDAL-RE on the fold's training cells, fit
PCA(50) on the min-max scaled training cells, then score the fold's test cells:

* clustering scores of every latent against batch and cell type: 1/DB, CH, ASW (laid out like the paper's AML scores);
* the mixed-effects classifier for the condition: a random forest on FE, FE + RE, PCA, PCA + RE, and chance
  (laid out like the paper's Table 1).

scVI and Harmony (`scmedal.peers`) are added when they are importable (`pip install "scmedal[bench]"`); scVI is
given the raw counts (the paper fed it min-max scaled log data) and stops early as scvi-tools does by
default. With `--folds 5` every table shows the mean [95 % CI] over folds.

    python benchmarks/quality.py data.h5ad --batch-key donor --labels-key cell_type [--condition-key disease]
        [--epochs 500] [--lr 1e-4] [--patience N] [--folds 1] [--dataset aml] [--threads N] [--out results/]

On a CPU, use a 10x larger learning rate with early stopping, `--lr 1e-3 --patience 10`: on AML, FE and RE then
stop after tens to a couple of hundred epochs with the scores of longer training (`benchmarks/convergence.py`),
where at 1e-4 RE is still far from converged after 200 epochs.
"""
import argparse
import logging
import time
import warnings
from pathlib import Path

import anndata as ad
import pandas as pd
import torch

from scmedal import data, metrics, peers
from scmedal.cli import prepare
from scmedal.model import SCMEDAL

NAMES = {"X_pca": "PCA", "X_ae": "AE", "X_fe": "scMEDAL-FE", "X_re": "scMEDAL-RE", "X_scvi": "scVI", "X_harmony": "Harmony"}


def optional_baselines(adata, split, args, scaling):
    "Latents of the peer methods that can be imported (`scmedal.peers`); a line for each one skipped."
    batch_key, latents = adata.uns["scmedal"]["batch_key"], {}
    runs = {"X_scvi": lambda: peers.scvi_latent(adata, batch_key=batch_key, train_indices=split["train"], max_epochs=args.epochs,
                                                batch_size=args.batch_size, seed=args.seed),
            "X_harmony": lambda: peers.harmony_latent(adata, batch_key=batch_key, scaling=scaling, seed=args.seed)}
    for key, run in runs.items():
        start = time.time()
        try: latents[key] = run()
        except ImportError as e: print(f"  {NAMES[key]} skipped: not installed ({e.name})"); continue
        except ValueError as e: print(f"  {NAMES[key]} skipped: {e}"); continue
        print(f"  {NAMES[key]} in {time.time() - start:.0f} s", flush=True)
    return latents


def run_fold(adata, split, args):
    "Train and score one fold: (clustering scores, MEC) as tidy tables."
    reg = adata.uns["scmedal"]
    start = time.time()
    model = SCMEDAL(adata, models=("ae", "fe", "re"), dataset=args.dataset, seed=args.seed)
    model.train(max_epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, train_indices=split["train"],
                val_indices=split["val"], early_stopping=args.patience is not None, patience=args.patience or 0,
                progress_bar=False)
    epochs = {kind: len(history) for kind, history in model.history.items()}
    print(f"  AE, FE, RE trained for {epochs} epochs in {time.time() - start:.0f} s", flush=True)
    for kind in ("ae", "fe", "re"): adata.obsm[f"X_{kind}"] = model.get_latent_representation(kind=kind)
    adata.obsm["X_pca"] = peers.pca_latent(adata, train_indices=split["train"], scaling=model.scaling, seed=args.seed)
    adata.obsm.update(optional_baselines(adata, split, args, model.scaling))
    reps = [k for k in NAMES if k in adata.obsm]
    scores = metrics.clustering_scores(adata[split["test"]], use_rep=reps, batch_key=reg["batch_key"], labels_key=reg["labels_key"])
    if not reg["condition_key"]: return scores, None
    alone = [r for r in reps if r != "X_re"]
    features = alone + [(r, "X_re") for r in alone]
    mec = metrics.mec_score(adata, target_key=reg["condition_key"], use_rep=features, train_indices=split["train"],
                            test_indices=split["test"])
    return scores, mec


def _renamed(frame, column):
    "Replace obsm keys by method names, '+'-joined feature sets included."
    rename = lambda v: " + ".join(NAMES.get(k, k) for k in v.split("+"))
    return frame.assign(**{column: frame[column].map(rename)})


def summary(folds, rows, *, columns=("label", "metric"), decimals=2):
    "The fold's values, or mean [95 % CI] over folds, laid out like the paper's tables."
    columns = [columns] if isinstance(columns, str) else list(columns)
    tidy = pd.concat(folds, ignore_index=True) if len(folds) == 1 else metrics.aggregate_folds(folds, by=[rows, *columns])
    return metrics.paper_table(_renamed(tidy, rows), rows=rows, columns=columns, decimals=decimals)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="an .h5ad file (raw counts or log-normalised)")
    parser.add_argument("--batch-key", required=True, help="obs column with the batches (random-effect grouping)")
    parser.add_argument("--labels-key", help="obs column with cell types")
    parser.add_argument("--condition-key", help="obs column with a sample-level target for the MEC, e.g. disease")
    parser.add_argument("--epochs", type=int, default=500, help="epochs per network (the paper: 500)")
    parser.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (the paper: 1e-4)")
    parser.add_argument("--patience", type=int, help="stop AE/FE/RE when the validation reconstruction loss has not "
                        "improved for this many epochs (default: train every epoch, as the paper)")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--folds", type=int, choices=[1, 5], default=1, help="fold 1 only, or all five")
    parser.add_argument("--dataset", choices=["aml", "asd", "hh"], help="the paper's tuned loss weights for this dataset")
    parser.add_argument("--n-top-genes", type=int, default=2916)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch threads; 1 is much faster on a CPU shared with other jobs")
    parser.add_argument("--out", help="folder to write scores.csv and mec.csv into")
    args = parser.parse_args(argv)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*|.*treespec.*")

    adata = prepare(ad.read_h5ad(args.path), batch_key=args.batch_key, labels_key=args.labels_key,
                    condition_key=args.condition_key, n_top_genes=args.n_top_genes)
    splits = data.kfold_splits(adata, batch_key=args.batch_key, labels_key=args.labels_key)
    if args.threads: torch.set_num_threads(args.threads)  # after preprocessing: scanpy's numba kernels reset torch's threads
    scores, mecs = [], []
    for k in range(args.folds):
        print(f"fold {k + 1}: {len(splits[k]['train'])} train / {len(splits[k]['val'])} val / {len(splits[k]['test'])} test cells", flush=True)
        fold_scores, fold_mec = run_fold(adata, splits[k], args)
        scores.append(fold_scores); mecs += [fold_mec] if fold_mec is not None else []

    folds = "fold 1" if args.folds == 1 else f"mean [95 % CI] over {args.folds} folds"
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(f"\nClustering scores, test cells ({folds}); batch = {args.batch_key}, celltype = {args.labels_key}")
        print(summary(scores, "embedding", decimals=3 if args.folds == 1 else 2).to_string())
        if mecs:
            mec = [m.assign(value=100 * m["value"]) for m in mecs]
            print(f"\nMixed-effects classifier (random forest), test accuracy % for '{args.condition_key}' ({folds})")
            print(summary(mec, "features", columns="metric").to_string())
        else: print("\nMEC skipped: no --condition-key")
    if args.out:
        out = Path(args.out); out.mkdir(parents=True, exist_ok=True)
        pd.concat([s.assign(fold=k) for k, s in enumerate(scores, 1)]).to_csv(out / "scores.csv", index=False)
        if mecs: pd.concat([m.assign(fold=k) for k, m in enumerate(mecs, 1)]).to_csv(out / "mec.csv", index=False)


if __name__ == "__main__":
    main()
