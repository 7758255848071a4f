"""How long scMEDAL-FE and -RE need to train, and what stopping early costs: the evidence for the stopping rule.

Trains one network (`--kind fe` or `re`) on fold 1 of the AML data for a fixed number of epochs (no early
stopping) and records after every epoch the training and validation reconstruction loss and the batch and
cell-type ASW of the test cells' latent (`scmedal.metrics.clustering_scores`, the paper's scores). Then it
replays Lightning's early-stopping rule (`SCMEDAL.train(early_stopping=True, patience=p)`: stop once the
validation reconstruction loss has not improved for p epochs) on the recorded losses and prints, for several p,
the epoch it stops after, the seconds to get there, the loss it keeps, and the test ASW there, next to the end of
the run. The probes run in inference mode between epochs and change nothing in the training.

    python benchmarks/convergence.py --kind re [--lr 1e-3] [--epochs 200] [--threads N] [--out re.csv]

Measured on a shared 2-core CPU with one thread (see `speed.py` for the time to a converged model next to scVI).
"""
import argparse
import os
import time

import lightning as L
import numpy as np
import pandas as pd
import torch

from scmedal import metrics
from scmedal.model import SCMEDAL
from speed import BATCH_KEY, LABELS_KEY, SEED, aml_fold, quiet, scmedal_fit

PATIENCES = (5, 10, 20, 30, 45)


class TestProbe(L.Callback):
    "After every training epoch: the logged losses, the elapsed seconds and the test cells' batch / cell-type ASW."
    def __init__(self, model, test):
        self.model, self.test, self.rows = model, test, []

    def on_train_start(self, trainer, pl_module): self.seconds, self.resumed = 0.0, time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self.seconds += time.perf_counter() - self.resumed  # training and validation time, the probes' excluded
        row = dict(epoch=trainer.current_epoch + 1, seconds=self.seconds,
                   **{k: float(trainer.callback_metrics[k]) for k in ("recon_loss", "val_recon_loss")})
        module = pl_module.module
        self.model.is_trained = True  # read the latent of the weights so far; the fit goes on
        self.test.obsm["X_latent"] = self.model.get_latent_representation(self.test, kind=module.kind)
        module.train()
        scores = metrics.clustering_scores(self.test, use_rep="X_latent", batch_key=BATCH_KEY, labels_key=LABELS_KEY)
        asw = scores[scores.metric == "ASW"].set_index("label")["value"]
        self.rows.append(row | dict(batch_asw=asw["batch"], celltype_asw=asw["celltype"]))
        self.resumed = time.perf_counter()


def stopping_epoch(val_loss, patience):
    "The epoch after which Lightning's EarlyStopping (mode min, min_delta 0) stops, or None."
    best, wait = np.inf, 0
    for epoch, value in val_loss.items():
        if value < best: best, wait = value, 0
        else:
            wait += 1
            if wait >= patience: return epoch
    return None


def stopping_table(history):
    "For each patience: where it stops, after how long, the best validation loss and the test ASW there."
    rows = []
    for patience in PATIENCES:
        stop = stopping_epoch(history["val_recon_loss"], patience)
        at = history.loc[stop if stop is not None else history.index[-1]]
        rows.append(dict(patience=patience, stops_after=stop or f"> {history.index[-1]}", seconds=at.seconds,
                         best_val_recon=history.loc[:at.name, "val_recon_loss"].min(), batch_asw=at.batch_asw,
                         celltype_asw=at.celltype_asw))
    end = history.iloc[-1]
    rows.append(dict(patience="none", stops_after=int(end.name), seconds=end.seconds,
                     best_val_recon=history["val_recon_loss"].min(), batch_asw=end.batch_asw, celltype_asw=end.celltype_asw))
    return pd.DataFrame(rows).set_index("patience")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=["fe", "re"], required=True)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--out", help="write the per-epoch history as CSV here")
    args = parser.parse_args(argv)
    quiet()
    adata, split = aml_fold()
    torch.set_num_threads(args.threads)  # after preprocessing: scanpy's numba kernels reset torch's threads
    model = SCMEDAL(adata, models=(args.kind,), dataset="aml", seed=SEED)
    probe = TestProbe(model, adata[split["test"]].copy())
    print(f"{args.kind.upper()} on AML fold 1, lr {args.lr:g}, {args.epochs} epochs, {args.threads} thread(s)", flush=True)
    scmedal_fit(args.kind, adata, split, max_epochs=args.epochs, lr=args.lr, callbacks=[probe], model=model)
    history = pd.DataFrame(probe.rows).set_index("epoch")
    if args.out: history.to_csv(args.out)
    shown = sorted({1, 2, 5, *range(10, args.epochs + 1, 10)} & set(history.index))
    with pd.option_context("display.width", 200, "display.precision", 4):
        print("\nper epoch (test ASW of the latent after that epoch):\n" + history.loc[shown].to_string())
        print("\nearly stopping on the validation reconstruction loss, replayed:\n" + stopping_table(history).to_string())


if __name__ == "__main__":
    main()
