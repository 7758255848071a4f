"""Quality of scMEDAL next to its peers on any .h5ad, with the paper's protocol, each trained as a user would.

For each fold of the paper's five-fold rotation that is asked for: preprocess (unless the data are already
log-normalised); train scMEDAL's networks (`--models`, default FE and RE) on the fold's training cells exactly as
a user would, `SCMEDAL(adata, models=...)` then `train(train_indices=..., val_indices=...)` and nothing else, so
that every setting is the library's default; fit PCA(50) on the min-max scaled training cells; run the peers of
`scmedal.peers` that are installed (Harmony; scVI with the paper's settings on the raw counts, stopping early as
scvi-tools does; scANVI from that scVI with the training cells' types, scvi-tools' defaults); then score the
fold's test cells:

* scib-metrics' benchmark (`scmedal.metrics.scib_scores`: its `Benchmarker` with the default metrics, unscaled),
  its aggregates (batch correction, bio conservation, total) printed next to the paper's clustering scores of
  every latent against batch and cell type (1/DB, CH, ASW), then every scib metric;
* the mixed-effects classifier for the condition: a random forest on every latent alone and with RE
  (laid out like the paper's Table 1).

With `--folds 5` every table shows the mean [95 % CI] over folds. The peers and scib-metrics come with
`pip install "scmedal[bench]"`; what is not installed is skipped with a line saying so.

    python benchmarks/quality.py data.h5ad --batch-key donor --labels-key cell_type [--condition-key disease]
        [--models fe re] [--folds 1] [--threads N] [--out results/]
        [--epochs N] [--lr X] [--patience N] [--batch-size N] [--dataset aml] [--preset NAME] [--seed N] [--scvi-epochs N]
        [--paper-fe]
    python benchmarks/quality.py data.h5ad --batch-key donor --condition-key disease --heldout-batches [--folds 5]

The options of the last line move a run away from the defaults and apply only when given: `--epochs`, `--lr`,
`--batch-size` and `--patience` (early stopping on the validation cells) go to `SCMEDAL.train`; `--dataset` and
`--preset` (offered when `SCMEDAL` has presets) to `SCMEDAL`; `--seed` to `SCMEDAL` and the peers;
`--scvi-epochs` caps the epochs of scVI and scANVI. `--paper-fe` adds the paper preset's FE to the same tables.

`--heldout-batches` asks the paper's MEC question more strictly. The paper's folds test on cells of donors seen in
training, so a classifier on FE + RE partly recognises donors. Here whole batches are held out
(`scmedal.data.heldout_batch_splits`, stratified by the condition, three folds; `--folds 5` runs all three): scMEDAL
trains on the other batches, the held-out batches' random effects stay at the prior, and the MEC is trained on the
training cells and scored on the held-out batches' cells, for PCA, FE, and each with RE.
"""
import argparse
import inspect
import logging
import time
import warnings
from pathlib import Path

import anndata as ad
import pandas as pd
import torch

from scmedal import data, metrics, peers
from scmedal.cli import prepare
from scmedal.model import KINDS, SCMEDAL

PEERS = {"X_pca": "PCA", "X_harmony": "Harmony", "X_scvi": "scVI", "X_scanvi": "scANVI"}
NAMES = PEERS | {"X_ae": "AE", "X_aec": "AEC", "X_fe": "scMEDAL-FE", "X_fec": "scMEDAL-FEC", "X_re": "scMEDAL-RE",
                 "X_fe_paper": "scMEDAL-FE (paper preset)"}
AGGREGATES = ["Batch correction", "Bio conservation", "Total"]
HAS_PRESETS = "preset" in inspect.signature(SCMEDAL.__init__).parameters


def given(**options):
    "The options that were given (not None)."
    return {name: value for name, value in options.items() if value is not None}


def train_scmedal(adata, split, args):
    "scMEDAL's networks trained on the fold as a user would: the library's defaults, except the options given."
    model = SCMEDAL(adata, models=tuple(args.models),
                    **given(dataset=args.dataset, seed=args.seed, preset=getattr(args, "preset", None)))
    stopping = dict(early_stopping=True, patience=args.patience) if args.patience is not None else {}
    model.train(train_indices=split["train"], val_indices=split["val"], progress_bar=False,
                **given(max_epochs=args.epochs, lr=args.lr, batch_size=args.batch_size), **stopping)
    return model


def paper_fe_latent(adata, split, args):
    "The paper preset's FE as the issue measured it: lr 1e-3, early stopping on the validation cells with patience 10."
    model = SCMEDAL(adata, preset="paper", models=("fe",), **given(dataset=args.dataset, seed=args.seed))
    model.train(train_indices=split["train"], val_indices=split["val"], lr=1e-3, early_stopping=True, patience=10, progress_bar=False)
    return model.get_latent_representation(kind="fe")


def peer_latents(adata, split, args, scaling):
    "Latents of the peers that can be run (`scmedal.peers`); a line for each one skipped."
    reg, seed, epochs, trained = adata.uns["scmedal"], given(seed=args.seed), given(max_epochs=args.scvi_epochs), {}
    batch_key, labels_key = reg["batch_key"], reg["labels_key"]

    def scvi():
        trained["scvi"] = peers.train_scvi(adata, batch_key=batch_key, train_indices=split["train"], **epochs, **seed)
        return peers.scvi_latent(adata, batch_key=batch_key, model=trained["scvi"])

    runs = {"X_harmony": lambda: peers.harmony_latent(adata, batch_key=batch_key, scaling=scaling, **seed),
            "X_scvi": scvi,
            "X_scanvi": lambda: peers.scanvi_latent(adata, batch_key=batch_key, labels_key=labels_key, train_indices=split["train"],
                                                    scvi_model=trained.get("scvi"), **epochs, **seed)}
    if labels_key is None: runs.pop("X_scanvi"); print("  scANVI skipped: no --labels-key")
    latents = {}
    for key, run in runs.items():
        start = time.time()
        try: latents[key] = run()
        except ImportError as e: print(f"  {NAMES[key]} skipped: not installed ({e.name})"); continue
        except ValueError as e: print(f"  {NAMES[key]} skipped: {e}"); continue
        print(f"  {NAMES[key]} in {time.time() - start:.0f} s", flush=True)
    return latents


def scib_table(test, reps, reg, args):
    "scib-metrics' unscaled scores of every latent on the test cells (tidy: embedding, metric, value), or None."
    if reg["labels_key"] is None: print("  scib-metrics skipped: no --labels-key"); return None
    start = time.time()
    try: wide = metrics.scib_scores(test, reps, batch_key=reg["batch_key"], labels_key=reg["labels_key"], n_jobs=args.threads or 1)
    except ImportError as e: print(f"  scib-metrics skipped: not installed ({e.name})"); return None
    print(f"  scib-metrics in {time.time() - start:.0f} s", flush=True)
    return wide.reset_index().melt(id_vars="embedding", var_name="metric")


def mec_table(adata, split, reps, reg):
    "The mixed-effects classifier of the condition from every latent alone and with RE, or None without a condition."
    if not reg["condition_key"]: return None
    alone = [r for r in reps if r != "X_re"]
    features = alone + ([(r, "X_re") for r in alone] if "X_re" in reps else [])
    return metrics.mec_score(adata, target_key=reg["condition_key"], use_rep=features, train_indices=split["train"],
                             test_indices=split["test"])


def run_fold(adata, split, args):
    "Train and score one fold: the paper's clustering scores, scib-metrics' scores and the MEC, as tidy tables (or None)."
    reg = adata.uns["scmedal"]
    for key in NAMES: adata.obsm.pop(key, None)  # no latent of an earlier fold is scored again
    start = time.time()
    model = train_scmedal(adata, split, args)
    epochs = {kind: len(history) for kind, history in model.history.items()}
    print(f"  scMEDAL {', '.join(model.modules)} trained for {epochs} epochs in {time.time() - start:.0f} s", flush=True)
    for kind in model.modules: adata.obsm[f"X_{kind}"] = model.get_latent_representation(kind=kind)
    if args.paper_fe:
        start = time.time()
        adata.obsm["X_fe_paper"] = paper_fe_latent(adata, split, args)
        print(f"  scMEDAL-FE (paper preset) in {time.time() - start:.0f} s", flush=True)
    scaling = data.fit_scaling(adata.X, indices=split["train"])
    adata.obsm["X_pca"] = peers.pca_latent(adata, train_indices=split["train"], scaling=scaling, **given(seed=args.seed))
    adata.obsm.update(peer_latents(adata, split, args, scaling))
    reps = [key for key in PEERS if key in adata.obsm] + [f"X_{kind}" for kind in model.modules] + ["X_fe_paper"] * args.paper_fe
    test = adata[split["test"]]
    scores = metrics.clustering_scores(test, use_rep=reps, batch_key=reg["batch_key"], labels_key=reg["labels_key"])
    return scores, scib_table(test, reps, reg, args), mec_table(adata, split, reps, reg)


def heldout_fold(adata, split, args):
    "The MEC on batches never seen in training: PCA and scMEDAL's latents, each with RE (held-out batches' random effects at the prior)."
    for key in NAMES: adata.obsm.pop(key, None)
    start = time.time()
    with warnings.catch_warnings():  # the held-out batches have no training cells: expected here
        warnings.filterwarnings("ignore", message=".*(no training cells|not seen in training).*")
        model = train_scmedal(adata, split, args)
        for kind in model.modules: adata.obsm[f"X_{kind}"] = model.get_latent_representation(kind=kind)
    print(f"  scMEDAL {', '.join(model.modules)} trained in {time.time() - start:.0f} s", flush=True)
    scaling = data.fit_scaling(adata.X, indices=split["train"])
    adata.obsm["X_pca"] = peers.pca_latent(adata, train_indices=split["train"], scaling=scaling, **given(seed=args.seed))
    return mec_table(adata, split, ["X_pca"] + [f"X_{kind}" for kind in model.modules], adata.uns["scmedal"])


def _renamed(frame, column):
    "Replace obsm keys by method names, '+'-joined feature sets included."
    rename = lambda v: " + ".join(NAMES.get(k, k) for k in v.split("+"))
    return frame.assign(**{column: frame[column].map(rename)})


def summary(folds, rows, *, columns=("label", "metric"), decimals=2):
    "The fold's values, or mean [95 % CI] over folds, laid out like the paper's tables."
    columns = [columns] if isinstance(columns, str) else list(columns)
    tidy = pd.concat(folds, ignore_index=True) if len(folds) == 1 else metrics.aggregate_folds(folds, by=[rows, *columns])
    return metrics.paper_table(_renamed(tidy, rows), rows=rows, columns=columns, decimals=decimals)


def parse_args(argv):
    "The command line; the options that change scMEDAL's training default to None (not given)."
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="an .h5ad file (raw counts or log-normalised)")
    parser.add_argument("--batch-key", required=True, help="obs column with the batches (random-effect grouping)")
    parser.add_argument("--labels-key", help="obs column with cell types (needed for scANVI and scib-metrics)")
    parser.add_argument("--condition-key", help="obs column with a sample-level target for the MEC, e.g. disease")
    parser.add_argument("--models", nargs="+", choices=list(KINDS), default=["fe", "re"], help="scMEDAL networks to train")
    parser.add_argument("--folds", type=int, choices=[1, 5], default=1, help="fold 1 only, or all five")
    parser.add_argument("--n-top-genes", type=int, default=2916)
    parser.add_argument("--threads", type=int, help="torch threads and scib-metrics' neighbour-search jobs")
    parser.add_argument("--out", help="folder to write scores.csv, scib.csv and mec.csv into")
    parser.add_argument("--epochs", type=int, help="SCMEDAL.train(max_epochs=...)")
    parser.add_argument("--lr", type=float, help="SCMEDAL.train(lr=...)")
    parser.add_argument("--patience", type=int, help="SCMEDAL.train(early_stopping=True, patience=...) on the validation cells")
    parser.add_argument("--batch-size", type=int, help="SCMEDAL.train(batch_size=...)")
    parser.add_argument("--dataset", choices=["aml", "asd", "hh"], help="SCMEDAL(dataset=...): the paper's tuned loss weights")
    if HAS_PRESETS: parser.add_argument("--preset", help="SCMEDAL(preset=...)")
    parser.add_argument("--seed", type=int, help="SCMEDAL(seed=...) and the peers' seed")
    parser.add_argument("--scvi-epochs", type=int, help="most epochs of scVI and of scANVI")
    parser.add_argument("--paper-fe", action="store_true", help="also the paper preset's FE (lr 1e-3, early stopping, patience 10)")
    parser.add_argument("--heldout-batches", action="store_true",
                        help="instead of the paper's folds: the MEC on whole batches held out of training (needs --condition-key)")
    return parser.parse_args(argv)


def report(scores, scibs, mecs, args):
    "Print the tables: scib aggregates next to the paper's scores, every scib metric, the MEC."
    folds = "fold 1" if args.folds == 1 else f"mean [95 % CI] over {args.folds} folds"
    decimals = 3 if args.folds == 1 else 2
    with pd.option_context("display.width", 250, "display.max_columns", 30):
        scib = "scib-metrics aggregates (unscaled; higher = batches more mixed / cell types better kept) next to " if scibs else ""
        print(f"\nTest cells ({folds}); batch = {args.batch_key}, celltype = {args.labels_key}: {scib}the paper's clustering scores")
        aggregates = [pd.concat([s[s.metric.isin(AGGREGATES)].assign(label="scib"), c]) for s, c in zip(scibs, scores)] if scibs else scores
        print(summary(aggregates, "embedding", decimals=decimals).to_string())
        if scibs:
            print(f"\nscib-metrics, every metric (unscaled; {folds})")
            print(summary(scibs, "embedding", columns="metric", decimals=decimals).to_string())
        if mecs:
            mec = [m.assign(value=100 * m["value"]) for m in mecs]
            print(f"\nMixed-effects classifier (random forest), test accuracy % for '{args.condition_key}' ({folds})")
            print(summary(mec, "features", columns="metric").to_string())
        else: print("\nMEC skipped: no --condition-key")


def main_heldout(adata, args):
    "The MEC with whole batches held out (`scmedal.data.heldout_batch_splits`, stratified by the condition): fold 1, or all three."
    if not args.condition_key: raise SystemExit("--heldout-batches scores the MEC: give --condition-key")
    splits = data.heldout_batch_splits(adata, batch_key=args.batch_key, stratify_key=args.condition_key)
    if args.threads: torch.set_num_threads(args.threads)
    folds = splits[:1] if args.folds == 1 else splits
    mecs = []
    for k, split in enumerate(folds, 1):
        held = sorted(adata.obs[args.batch_key].iloc[split["test"]].astype(str).unique())
        print(f"held-out fold {k}: {len(split['train'])} train / {len(split['val'])} val cells; test: every cell of {held}", flush=True)
        mecs.append(heldout_fold(adata, split, args))
    mec = [m.assign(value=100 * m["value"]) for m in mecs]
    which = "fold 1" if len(folds) == 1 else f"mean [95 % CI] over {len(folds)} folds"
    print(f"\nMixed-effects classifier (random forest), test accuracy % for '{args.condition_key}' on batches held out of training ({which})")
    with pd.option_context("display.width", 250): print(summary(mec, "features", columns="metric").to_string())
    if args.out:
        out = Path(args.out); out.mkdir(parents=True, exist_ok=True)
        pd.concat([t.assign(fold=k) for k, t in enumerate(mecs, 1)]).to_csv(out / "mec_heldout.csv", index=False)


def main(argv=None):
    args = parse_args(argv)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*|.*treespec.*")

    adata = prepare(ad.read_h5ad(args.path), batch_key=args.batch_key, labels_key=args.labels_key,
                    condition_key=args.condition_key, n_top_genes=args.n_top_genes)
    if args.heldout_batches: return main_heldout(adata, args)
    splits = data.kfold_splits(adata, batch_key=args.batch_key, labels_key=args.labels_key)
    if args.threads: torch.set_num_threads(args.threads)  # after preprocessing: scanpy's numba kernels reset torch's threads
    options = given(epochs=args.epochs, lr=args.lr, patience=args.patience, batch_size=args.batch_size, dataset=args.dataset,
                    preset=getattr(args, "preset", None), seed=args.seed)
    print(f"scMEDAL {args.models}, options: {options or 'none (the library defaults)'}")
    scores, scibs, mecs = [], [], []
    for k in range(args.folds):
        print(f"fold {k + 1}: {len(splits[k]['train'])} train / {len(splits[k]['val'])} val / {len(splits[k]['test'])} test cells", flush=True)
        fold_scores, fold_scib, fold_mec = run_fold(adata, splits[k], args)
        scores.append(fold_scores)
        scibs += [fold_scib] if fold_scib is not None else []
        mecs += [fold_mec] if fold_mec is not None else []
    report(scores, scibs, mecs, args)
    if args.out:
        out = Path(args.out); out.mkdir(parents=True, exist_ok=True)
        for name, tables in (("scores", scores), ("scib", scibs), ("mec", mecs)):
            if tables: pd.concat([t.assign(fold=k) for k, t in enumerate(tables, 1)]).to_csv(out / f"{name}.csv", index=False)


if __name__ == "__main__":
    main()
