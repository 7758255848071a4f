"""Training speed of scMEDAL-FE and scMEDAL-RE next to the machine's matrix-multiply ceiling.

Prints, for the AML data (from $SCMEDAL_DATA_DIR or ../shared/data, if present) and for simulated data of the
same size: cells/s per epoch for FE and RE, the achieved GFLOP/s (multiply-adds of the model's dense layers,
forward + backward), the ceiling (plain `torch.matmul` chains of the same shapes, forward + backward) and the
ratio, plus the peak RSS of the process.

    python benchmarks/train_speed.py [--epochs 3] [--batch-size 512] [--threads N]
"""
import argparse
import logging
import os
import resource
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch

from scmedal import data, datasets
from scmedal.model import SCMEDAL


def dense_macs_per_cell(n_genes, n_hidden, n_latent, n_batches, kind):
    "Multiply-adds per cell of one forward pass through the dense layers of a model (the matmul work)."
    widths = [n_genes, *n_hidden, n_latent]
    enc = sum(a * b for a, b in zip(widths[:-1], widths[1:]))
    macs = 2 * enc  # encoder + decoder (tied or untied: same shapes)
    if kind == "fe":  # adversary on all activations, run twice (adversary step, autoencoder step)
        adv = [sum(widths[1:]), *n_hidden, n_batches]
        macs += 2 * sum(a * b for a, b in zip(adv[:-1], adv[1:]))
    return macs


def matmul_ceiling(n_genes, n_hidden, n_latent, batch_size, repeats=20):
    "GFLOP/s of forward + backward through a chain of bare matmuls with the autoencoder's shapes."
    widths = [n_genes, *n_hidden, n_latent, *reversed(n_hidden), n_genes]
    weights = [torch.randn(a, b, requires_grad=True) * 0.01 for a, b in zip(widths[:-1], widths[1:])]
    weights = [w.detach().requires_grad_() for w in weights]
    x = torch.rand(batch_size, n_genes)

    def step():
        h = x
        for w in weights: h = h @ w
        h.sum().backward()

    step()
    start = time.perf_counter()
    for _ in range(repeats): step()
    seconds = (time.perf_counter() - start) / repeats
    macs = batch_size * sum(a * b for a, b in zip(widths[:-1], widths[1:]))
    return 3 * 2 * macs / seconds / 1e9  # forward + two backward matmuls per layer; 2 FLOPs per multiply-add


def time_training(adata, kind, epochs, batch_size):
    "Seconds per epoch (median over epochs after the first) of one model kind on all cells of `adata`."
    model = SCMEDAL(adata, models=(kind,))
    times = []

    class Clock(L.Callback):
        def on_train_epoch_start(self, *_): self.t = time.perf_counter()
        def on_train_epoch_end(self, *_): times.append(time.perf_counter() - self.t)

    model.train(max_epochs=epochs, batch_size=batch_size, progress_bar=False, accelerator="cpu", callbacks=[Clock()])
    return float(np.median(times[1:] if len(times) > 1 else times))


def report(name, adata, epochs, batch_size, ceiling):
    "Print one table block for a dataset."
    reg = data.setup_anndata(adata, batch_key="batch")
    n_batches = len(reg["batch_categories"])
    print(f"\n{name}: {adata.n_obs} cells x {adata.n_vars} genes, {n_batches} batches")
    print(f"{'model':6} {'s/epoch':>8} {'cells/s':>9} {'GFLOP/s':>8} {'ceiling':>8} {'ratio':>6}")
    for kind in ("fe", "re"):
        seconds = time_training(adata, kind, epochs, batch_size)
        flops = 3 * 2 * dense_macs_per_cell(adata.n_vars, (512, 132), 50, n_batches, kind) * adata.n_obs / seconds / 1e9
        print(f"{kind:6} {seconds:8.2f} {adata.n_obs / seconds:9.0f} {flops:8.1f} {ceiling:8.1f} {flops / ceiling:6.2f}")


def main():
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*treespec.*")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads: torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch size {args.batch_size}")
    ceiling = matmul_ceiling(2916, (512, 132), 50, args.batch_size)
    print(f"matmul ceiling (forward + backward, autoencoder shapes): {ceiling:.1f} GFLOP/s")

    folder = Path(os.environ.get("SCMEDAL_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
    n_cells = 7000
    try:
        aml = data.preprocess(datasets.vangalen2019_aml(data_dir=folder))
        aml.obs["batch"] = aml.obs["patient"]
        train = data.kfold_splits(aml, batch_key="batch", labels_key="cell_type")[0]["train"]
        aml = aml[train].copy()
        n_cells = aml.n_obs
        report("AML (van Galen 2019, fold-1 training cells)", aml, args.epochs, args.batch_size, ceiling)
    except FileNotFoundError as e:
        print(f"\nAML data not found ({e}); simulated data only")
    sim = data.preprocess(data.simulate(n_cells=n_cells, n_genes=4000, n_batches=14, seed=0), n_top_genes=2916)
    report("simulated, same size", sim, args.epochs, args.batch_size, ceiling)
    print(f"\npeak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
