"""Do counterfactual cells recover a known batch effect? scMEDAL's counterfactuals against the simulator's truth.

For simulated data (`scmedal.data.simulate`, 2,000 cells, 600 genes -> 400 HVGs, 6 donors, the model notebook's
sizes, minibatches of 64, fold-1 training cells), trains the default preset's FE and RE (the library's training
defaults) and the paper preset's (`--epochs`, lr 1e-3), and compares, for three donor pairs i -> j, the true mean
change of every gene when all cells move from donor i to donor j (`data.simulated_log_expression`) with

* the default counterfactual, the mixed-effects FE network's (`get_counterfactual(mode="fe")`), and the paper's
  RE counterfactuals (`mode="full"`, and `mode="decoder"`, the batch swapped in the decoder only);
* the paper FE's counterfactual change: it has no batch input, so moving a cell changes nothing (a zero prediction);
* the FE and RE contrasts: each network's reconstructions of donor j's cells minus donor i's, an observational
  comparison that also carries the donors' different cell-type mixes and conditions.

Scores per pair (`scmedal.metrics.counterfactual_recovery`): Pearson r over genes and R^2 = 1 - |pred - truth|^2 /
|truth|^2 (the share of the true change explained: 0 for the zero prediction, negative for a prediction worse than
no change). `--concentration` sets how different the donors' cell-type mixes are (Dirichlet concentration; the
simulator's default 5 gives similar mixes, 0.5 very different ones, as between patients with their own malignant
cell types).

    python benchmarks/counterfactual_recovery.py [--concentration 5 0.5] [--seeds 0 1] [--epochs 100] [--threads 1]
"""
import argparse

import pandas as pd
import torch

from scmedal import SCMEDAL, data, metrics
from speed import quiet

PAIRS = [("donor0", "donor1"), ("donor2", "donor5"), ("donor3", "donor4")]


def simulated(concentration, seed):
    "The model notebook's simulated data with donors' cell-type mixes drawn at `concentration`, registered."
    adata = data.preprocess(data.simulate(n_cells=2000, n_genes=600, n_batches=6, seed=seed,
                                          composition_concentration=concentration), n_top_genes=400)
    SCMEDAL.setup_anndata(adata, batch_key="batch", labels_key="cell_type", condition_key="condition")
    return adata


def trained(adata, epochs, seed):
    "FE and RE of the default and the paper preset at the model notebook's sizes, trained on fold 1's training cells."
    split = data.kfold_splits(adata, batch_key="batch", labels_key=None)[0]  # some donor x type groups are tiny
    fold = dict(batch_size=64, train_indices=split["train"], val_indices=split["val"], progress_bar=False)
    small = dict(n_hidden=(128, 64), n_latent=16, seed=seed)
    return {"default": SCMEDAL(adata, **small).train(**fold),
            "paper preset": SCMEDAL(adata, preset="paper", **small).train(max_epochs=epochs, lr=1e-3, **fold)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concentration", type=float, nargs="+", default=[5.0, 0.5], help="Dirichlet concentration(s) of the donors' cell-type mixes")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="simulation and training seeds")
    parser.add_argument("--epochs", type=int, default=100, help="epochs of the paper preset (the default preset trains with its own defaults)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    quiet()
    results = []
    for concentration in args.concentration:
        for seed in args.seeds:
            adata = simulated(concentration, seed)
            torch.set_num_threads(args.threads)  # after preprocessing, which may reset them
            result = pd.concat([metrics.counterfactual_recovery(model, adata, PAIRS).assign(method=lambda t, p=preset: f"{p}: " + t.method)
                                for preset, model in trained(adata, args.epochs, seed).items()]).assign(concentration=concentration, seed=seed)
            print(f"\nconcentration {concentration:g}, seed {seed}:\n"
                  + result.pivot(index="pair", columns="method", values=["r", "R2"]).round(2).to_string(), flush=True)
            results.append(result)
    summary = pd.concat(results).groupby(["concentration", "method"])[["r", "R2"]].agg(["mean", "min", "max"])
    print("\nover pairs and seeds:\n" + summary.round(2).to_string())


if __name__ == "__main__":
    main()
