"""Training speed, time to a converged model and peak memory of scMEDAL-FE, scMEDAL-RE and scVI on the same cells.

On the AML data (fold 1 of the paper's rotation: 7,038 training, 2,346 validation, 2,347 test cells, 2,916 genes;
from $SCMEDAL_DATA_DIR or the user cache), each model is trained in its own process (so that its peak RSS is its
own), one after the other, and the script prints per model:

* steady-state training speed: cells/s of the training part of an epoch (validation excluded), median over the
  epochs after the first;
* achieved GFLOP/s: 2 x multiply-adds per training cell x cells/s. The multiply-adds are *counted*, not
  estimated: every matrix multiply (aten mm/addmm/bmm/baddbmm) that one training step runs (a minibatch of the
  preset's size for scMEDAL, 512 cells for scVI), forward and backward, is recorded with its shapes (a
  TorchDispatchMode), and m x k x n is summed;
* the matmul ceiling: the same recorded matrix multiplies (same shapes and memory layouts), replayed back to
  back with nothing else in between, in the same process with the same threads (best of several passes, measured
  before and after the training; the higher is used). The ratio achieved / ceiling says how much of the
  machine's matmul speed on these shapes the training loop keeps; the rest goes to elementwise work
  (BatchNorm, SELU, random effects, softmax, likelihood), data loading and framework overhead;
* the time to a converged model: wall seconds of the whole fit (validation included) with early stopping, the
  epochs run and the best validation epoch. FE and RE are trained as a user would, `SCMEDAL.train` with the
  library's defaults (learning rate, minibatch, epochs and step limits, early stopping on the validation
  reconstruction loss of the fold's validation cells); `--lr`, `--patience`, `--max-epochs` override them. scVI
  (minibatch 512, at most 500 epochs: the paper's settings) stops as scvi-tools does by
  default (`early_stopping=True`: validation ELBO on its own 10 % of the training cells, every epoch, patience
  45). scMEDAL keeps the weights of its best validation epoch (its default), scVI the last ones;
* peak RSS of the model's process (data, model, training, scoring);
* a quality check that the stopping rule does not cost quality: batch ASW and cell-type ASW of each latent on
  the fold's test cells (`scmedal.metrics.clustering_scores`), next to the paper's 5-fold means.

Then the same speed figures for FE and RE on simulated data of the same size (`scmedal.data.simulate`: 11,731
cells, the 2,916 most variable of 5,832 genes, 14 batches, preprocessed like the AML data; the AML fold's
training and test sizes), trained for a fixed number of epochs (`--sim-epochs`, no validation), so that the speed
can be checked without the AML file and compared between real and simulated sparsity.

The count is per cell and step, forward and backward; the default FE (encoder, batch-conditional decoder,
adversary stepped twice) and RE (encoder, decoder, latent classifier) each print theirs.

    python benchmarks/speed.py [--threads N] [--lr LR] [--patience P] [--max-epochs E] [--models fe re scvi]
        [--sim-epochs 10] [--quick] [--out speed.json]

`--quick` trains every model for 3 epochs (about 3 minutes): a smoke run of the script, not a measurement.
The machine is shared: compare models only within one run.
"""
import argparse
import collections
import concurrent.futures
import json
import logging
import multiprocessing
import os
import resource
import tempfile
import time
import warnings
from pathlib import Path

import anndata as ad
import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from scmedal import data, datasets, metrics, peers
from scmedal.model import PRESETS, SCMEDAL

SCVI_BATCH_SIZE, SEED, BATCH_KEY, LABELS_KEY = 512, 0, "patient", "cell_type"
NAMES = {"fe": "scMEDAL-FE", "re": "scMEDAL-RE", "scvi": "scVI"}
PAPER_ASW = {"fe": (-0.04, 0.05), "re": (0.69, -0.07), "scvi": (-0.24, 0.03)}  # the paper's AML 5-fold means (Figures 4 and 8): batch, cell-type ASW
aten = torch.ops.aten
MATMULS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}
Layout = collections.namedtuple("Layout", "shape stride dtype")  # of one tensor argument of a recorded matmul


class MatmulRecorder(TorchDispatchMode):
    "Record every matrix multiply run inside the context (forward and backward): the op, its arguments' layouts."
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in MATMULS:
            layout = [Layout(tuple(a.shape), a.stride(), a.dtype) if isinstance(a, torch.Tensor) else a for a in args]
            self.calls.append((func, layout, dict(kwargs or {})))
        return func(*args, **(kwargs or {}))


def multiply_adds(calls):
    "Multiply-adds of recorded matrix multiplies: m·k·n each (times the batch for bmm)."
    total = 0
    for _, layout, _ in calls:
        a, b = [x for x in layout if isinstance(x, Layout)][-2:]  # the two factors are the last two tensors
        total += int(np.prod(a.shape)) * b.shape[-1]
    return total


def _tensor(shape, stride, dtype):
    "A random tensor with the given shape and memory layout (transposed views, broadcast biases included)."
    size = 1 + sum((n - 1) * s for n, s in zip(shape, stride))
    return torch.randn(size).to(dtype).as_strided(shape, stride)


def matmul_ceiling(calls, *, passes=10, repeats=3):
    "GFLOP/s of the recorded matrix multiplies replayed back to back: the best of `passes` passes of `repeats` steps."
    replay = [(func, [_tensor(*x) if isinstance(x, Layout) else x for x in layout], kwargs) for func, layout, kwargs in calls]
    flops = 2 * multiply_adds(calls)
    best = float("inf")
    for _ in range(passes + 1):  # the first pass warms up
        start = time.perf_counter()
        for _ in range(repeats):
            for func, args, kwargs in replay: func(*args, **kwargs)
        best = min(best, (time.perf_counter() - start) / repeats)
    return flops / best / 1e9


def peak_gflops(n=2048):
    "GFLOP/s of one large square float32 matmul: the machine's peak for reference."
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(5): a @ b
    return 2 * n ** 3 * 5 / (time.perf_counter() - start) / 1e9


class EpochClock(L.Callback):
    "Seconds and cells of the training part of every epoch (from the epoch's start to its last training batch)."
    def __init__(self): self.seconds, self.cells = [], []
    def on_train_epoch_start(self, trainer, pl_module): self.start, self.last, self.n = time.perf_counter(), None, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.last, self.n = time.perf_counter(), self.n + len(next(iter(batch.values())))

    def on_train_epoch_end(self, trainer, pl_module):
        if self.last is not None: self.seconds.append(self.last - self.start); self.cells.append(self.n)


# --- the three models: one training step (for the count), a fit, and the test cells' latent -------------------

def minibatch_size(kind, preset):
    "Cells per training step: the scMEDAL preset's, or 512 for scVI (the paper's setting)."
    return SCVI_BATCH_SIZE if kind == "scvi" else PRESETS[preset].batch_size


def scmedal_fit(kind, adata, split, *, max_epochs=None, lr=None, patience=None, callbacks=(), model=None, fast_paths=False,
                preset="default", **trainer_kwargs):
    "A SCMEDAL with the one network `kind` of `preset` (the paper's: with its AML loss weights), trained on the fold with the library's defaults unless set."
    paper = dict(dataset="aml") if preset == "paper" else {}
    model = model or SCMEDAL(adata, models=(kind,), preset=preset, seed=SEED, fast_paths=fast_paths, **paper)
    model.train(max_epochs=max_epochs, lr=lr, batch_size=minibatch_size(kind, preset), train_indices=split["train"],
                val_indices=split.get("val"), patience=patience, progress_bar=False, accelerator="cpu",
                callbacks=list(callbacks), **trainer_kwargs)
    history = model.history[kind]
    val = history["val_recon_loss"] if "val_recon_loss" in history else None
    return model, dict(epochs=len(history), best_epoch=None if val is None else int(val.idxmin()) + 1,
                       val_loss=None if val is None else float(val.min()))


def scvi_fit(adata, split, *, max_epochs, callbacks=(), **trainer_kwargs):
    "scVI with the paper's settings and scvi-tools' default early stopping, on the fold's training cells."
    early = "val" in split
    model = peers.train_scvi(adata, batch_key=BATCH_KEY, train_indices=split["train"], max_epochs=max_epochs,
                             batch_size=SCVI_BATCH_SIZE, early_stopping=early, seed=SEED, accelerator="cpu",
                             callbacks=list(callbacks), **trainer_kwargs)
    elbo = model.history["elbo_validation"]["elbo_validation"] if early else None
    return model, dict(epochs=len(model.history["elbo_train"]), best_epoch=None if elbo is None else int(elbo.idxmin()) + 1,
                       val_loss=None if elbo is None else float(elbo.min()))


def fit(kind, adata, split, args, **kwargs):
    "Train model `kind` ('fe', 're' or 'scvi') on `split`: (model, facts)."
    if kind == "scvi": return scvi_fit(adata, split, max_epochs=args.max_epochs or 500, **kwargs)
    return scmedal_fit(kind, adata, split, max_epochs=args.max_epochs, lr=args.lr, patience=args.patience,
                       fast_paths=args.fast_paths, preset=args.preset, **kwargs)


def latent(kind, model, adata):
    "The latent of every cell of `adata`."
    if kind == "scvi": return peers.scvi_latent(adata, batch_key=BATCH_KEY, model=model)
    return model.get_latent_representation(adata, kind=kind)


def count_step(kind, adata, split, args):
    "The matrix multiplies of one training step on a full minibatch (a separate 1-step fit, no validation)."
    one_step = dict(max_epochs=1, limit_train_batches=1, limit_val_batches=0, num_sanity_val_steps=0)
    with MatmulRecorder() as recorder:
        if kind == "scvi": scvi_fit(adata, {"train": split["train"]}, **one_step)
        else: scmedal_fit(kind, adata, {"train": split["train"]}, lr=args.lr, fast_paths=args.fast_paths, preset=args.preset, **one_step)
    return recorder.calls


def measure(kind, path, name, args):
    "Everything the script reports about one model on data set `name` ('aml' or 'simulated'), measured in this (fresh) process."
    quiet()
    torch.set_num_threads(args.threads)
    adata = ad.read_h5ad(path / f"{name}.h5ad")
    split = dict(np.load(path / f"{name}_split.npz"))
    calls = count_step(kind, adata, split, args)
    macs_per_cell = multiply_adds(calls) / minibatch_size(kind, args.preset)
    ceiling_before = matmul_ceiling(calls)
    clock = EpochClock()
    start = time.perf_counter()
    model, facts = fit(kind, adata, split, args, callbacks=[clock])
    fit_seconds = time.perf_counter() - start
    ceiling_after = matmul_ceiling(calls)
    ceiling = max(ceiling_before, ceiling_after)
    steady = slice(1, None) if len(clock.seconds) > 1 else slice(None)
    cells_per_s = float(np.median(np.array(clock.cells[steady]) / np.array(clock.seconds[steady])))
    test = adata[split["test"]].copy()
    test.obsm["X_latent"] = latent(kind, model, test)
    scores = metrics.clustering_scores(test, use_rep="X_latent", batch_key=BATCH_KEY, labels_key=LABELS_KEY)
    asw = scores[scores.metric == "ASW"].set_index("label")["value"]
    gflops = 2 * macs_per_cell * cells_per_s / 1e9
    return dict(data=name, model=NAMES[kind], threads=torch.get_num_threads(), **facts, fit_s=fit_seconds, s_per_epoch=float(np.median(clock.seconds[steady])),
                cells_per_s=cells_per_s, train_cells=int(np.median(clock.cells)), matmuls_per_step=len(calls),
                mmacs_per_cell=macs_per_cell / 1e6, gflops=gflops, ceiling_gflops=ceiling, ratio=gflops / ceiling,
                ceiling_before=ceiling_before, ceiling_after=ceiling_after,
                peak_rss_mib=peak_rss_mib(),
                batch_asw=float(asw["batch"]), celltype_asw=float(asw["celltype"]))


def peak_rss_mib():
    "Peak resident memory of this process in MiB: Linux's VmHWM (ru_maxrss survives exec: it holds the parent's peak)."
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"): return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def in_own_process(kind, path, name, args):
    "`measure` in a fresh spawned process, so that imports, data and peak RSS are the model's own."
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context, max_tasks_per_child=1) as pool:
        return pool.submit(measure, kind, path, name, args).result()


# --- data, report ---------------------------------------------------------------------------------------------

def data_folder():
    "Where the AML file is ($SCMEDAL_DATA_DIR, then the user cache); None lets `datasets` download and build it there."
    path = datasets.find_dataset("vangalen2019_aml")
    return path.parent if path else None


def registered(adata):
    "Only what the models read (log expression, counts, batch and cell type), registered."
    light = ad.AnnData(X=adata.X, obs=adata.obs[[BATCH_KEY, LABELS_KEY]], var=pd.DataFrame(index=adata.var_names),
                       layers=dict(counts=adata.layers["counts"]))
    data.setup_anndata(light, batch_key=BATCH_KEY, labels_key=LABELS_KEY)
    return light


def aml_fold():
    "The AML data preprocessed as in the paper (exclusions, 2,916 HVGs), registered, and fold 1 of its rotation."
    adata = registered(data.preprocess(datasets.vangalen2019_aml(data_dir=data_folder()), n_top_genes=2916))
    return adata, data.kfold_splits(adata, batch_key=BATCH_KEY, labels_key=LABELS_KEY)[0]


def simulated_like(n_obs, n_vars, n_batches, sizes):
    "Simulated data of the AML fold's size, preprocessed the same way, with training and test cells of the fold's sizes."
    counts = data.simulate(n_cells=n_obs, n_genes=2 * n_vars, n_batches=n_batches, seed=SEED)
    counts.obs[BATCH_KEY] = counts.obs["batch"]
    adata = registered(data.preprocess(counts, n_top_genes=n_vars))
    order = np.random.default_rng(SEED).permutation(adata.n_obs)
    return adata, dict(train=np.sort(order[:sizes["train"]]), test=np.sort(order[sizes["train"]:][:sizes["test"]]))


def write(out, name, adata, split):
    "Write a data set where the model processes read it: (cells, genes, split sizes)."
    adata.write_h5ad(out / f"{name}.h5ad")
    np.savez(out / f"{name}_split.npz", **split)
    return adata.n_obs, adata.n_vars, {k: len(v) for k, v in split.items()}


def table(results):
    "A table of results, one row per model."
    frame = pd.DataFrame(results).set_index("model")
    columns = {"epochs": "epochs", "best_epoch": "best", "fit_s": "fit s", "s_per_epoch": "s/epoch", "cells_per_s": "cells/s",
               "mmacs_per_cell": "MMAC/cell", "gflops": "GFLOP/s", "ceiling_gflops": "ceiling", "ratio": "ratio",
               "peak_rss_mib": "RSS MiB", "batch_asw": "batch ASW", "celltype_asw": "ct ASW"}
    return frame[list(columns)].rename(columns=columns)


def quiet():
    "Silence Lightning's tips and the warnings that every fit repeats."
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*treespec.*|.*does not have many workers.*|.*logging interval.*")


def run(kind, path, name, args):
    "Measure one model on one data set in its own process, and print its line."
    print(f"{NAMES[kind]} ...", flush=True)
    result = in_own_process(kind, path, name, args)
    print(f"  {result['epochs']} epochs (best {result['best_epoch']}) in {result['fit_s']:.0f} s on {result['threads']} thread(s); "
          f"{result['cells_per_s']:.0f} cells/s = {result['gflops']:.1f} GFLOP/s, {result['ratio']:.0%} of its matmul "
          f"ceiling {result['ceiling_gflops']:.1f} (before / after training {result['ceiling_before']:.0f} / "
          f"{result['ceiling_after']:.0f}); peak RSS {result['peak_rss_mib']:.0f} MiB; "
          f"test batch ASW {result['batch_asw']:.3f}, cell-type ASW {result['celltype_asw']:.3f}", flush=True)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads (default: all cores)")
    parser.add_argument("--lr", type=float, help="Adam learning rate of FE and RE (default: each network's; the paper: 1e-4)")
    parser.add_argument("--patience", type=int, help="FE/RE early stopping: epochs without a better validation loss (default: the preset's)")
    parser.add_argument("--max-epochs", type=int, help="upper limit of epochs (default: each scMEDAL network's; 500 for scVI, the paper's)")
    parser.add_argument("--models", nargs="+", choices=list(NAMES), default=list(NAMES))
    parser.add_argument("--sim-epochs", type=int, default=10, help="epochs of FE and RE on the simulated data")
    parser.add_argument("--preset", choices=["default", "paper"], default="default",
                        help="scMEDAL's networks: the library's default, or the paper's (with its AML loss weights; earlier runs)")
    parser.add_argument("--fast-paths", action="store_true", help="train scMEDAL through its opt-in fused nodes (scmedal.fast_paths)")
    parser.add_argument("--quick", action="store_true", help="3 epochs per model: a smoke run of the script")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.quick: args.max_epochs = args.sim_epochs = 3
    quiet()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads; scMEDAL preset {args.preset!r}; FE/RE: lr {args.lr or 'default'}, "
          f"patience {args.patience or 'default'}, epochs {args.max_epochs or 'default'}, batch size {PRESETS[args.preset].batch_size}; "
          f"scVI: batch size {SCVI_BATCH_SIZE}, at most {args.max_epochs or 500} epochs", flush=True)
    print(f"peak of one 2048 x 2048 matmul here: {peak_gflops():.0f} GFLOP/s", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        try: adata, split = aml_fold()
        except FileNotFoundError as e: raise SystemExit(f"speed.py needs the AML data: {e}")
        n_obs, n_vars, sizes = write(Path(tmp), "aml", adata, split)
        print(f"AML: {n_obs:,} cells x {n_vars:,} genes; fold 1: {sizes}", flush=True)
        n_batches = adata.obs[BATCH_KEY].nunique()
        for kind in args.models: results.append(run(kind, Path(tmp), "aml", args))
        sim_args = argparse.Namespace(**{**vars(args), "max_epochs": args.sim_epochs, "patience": None})
        n_obs, n_vars, sizes = write(Path(tmp), "simulated", *simulated_like(n_obs, n_vars, n_batches, sizes))
        print(f"\nsimulated data of the same size: {n_obs:,} cells x {n_vars:,} genes, {n_batches} batches; {sizes}; "
              f"{args.sim_epochs} epochs each", flush=True)
        for kind in [k for k in args.models if k != "scvi"]: results.append(run(kind, Path(tmp), "simulated", sim_args))
    aml = [r for r in results if r["data"] == "aml"]
    with pd.option_context("display.width", 200, "display.max_columns", 20, "display.precision", 3):
        for name in ("aml", "simulated"):
            rows = [r for r in results if r["data"] == name]
            if rows: print(f"\n{name}:\n" + table(rows).to_string(float_format=lambda v: f"{v:.3g}" if abs(v) < 1 else f"{v:.1f}"))
    by = {r["model"]: r for r in aml}
    if {"scMEDAL-FE", "scMEDAL-RE", "scVI"} <= set(by):
        fe_re = by["scMEDAL-FE"]["fit_s"] + by["scMEDAL-RE"]["fit_s"]
        print(f"\nAML: FE + RE fit {fe_re:.0f} s vs scVI fit {by['scVI']['fit_s']:.0f} s: ratio {fe_re / by['scVI']['fit_s']:.2f}")
    print("share of the matmul ceiling: " + "; ".join(f"{r['data']} {r['model']} {r['ratio']:.0%}" for r in results))
    print("paper (5-fold means) batch / cell-type ASW: "
          + ", ".join(f"{NAMES[k]} {b:.2f} / {c:.2f}" for k, (b, c) in PAPER_ASW.items()))
    if args.out: Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
