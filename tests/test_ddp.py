"""Training on 2 CPU processes with Lightning's `strategy="ddp"` (gloo): the same kind of result as one process."""
import json
import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent('''
    import json, logging, os, sys, warnings
    warnings.filterwarnings("ignore"); logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    from sklearn.metrics import silhouette_score
    from scmedal import data
    from scmedal.model import SCMEDAL

    def main():
        adata = data.preprocess(data.simulate(n_cells=1200, n_genes=400, n_batches=4, seed=0), n_top_genes=300)
        SCMEDAL.setup_anndata(adata, batch_key="batch")
        model = SCMEDAL(adata, n_hidden=(64, 32), n_latent=8, seed=0).train(
            max_epochs=30, lr=1e-3, batch_size=64, accelerator="cpu", devices=2, strategy="ddp", progress_bar=False)
        asw = {k: float(silhouette_score(model.get_latent_representation(kind=k), adata.obs.batch)) for k in ("fe", "re")}
        epochs = {k: len(h) for k, h in model.history.items()}
        rank = os.environ.get("LOCAL_RANK", "0")  # one file per rank: two processes' prints can interleave on one line
        with open(f"result_{rank}.json", "w") as f: json.dump(dict(asw=asw, epochs=epochs), f)

    if __name__ == "__main__": main()
''')


def test_ddp_two_cpu_processes(tmp_path):
    script = tmp_path / "train_ddp.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    results = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("result_*.json"))]
    assert run.returncode == 0 and len(results) == 2, f"expected one result per rank:\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}"
    for result in results:  # every rank trained every epoch
        assert result["epochs"] == {"fe": 30, "re": 30}
        assert result["asw"]["re"] > result["asw"]["fe"] + 0.2, result
    for kind in ("fe", "re"):  # same weights on both ranks; BatchNorm statistics differ a little (each rank's own last batches)
        assert abs(results[0]["asw"][kind] - results[1]["asw"][kind]) < 0.05, results
