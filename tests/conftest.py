"""Shared pytest fixtures: where the real datasets live, and skipping cleanly when they are absent."""
import os
from pathlib import Path

import pytest

from scmedal.datasets import DATASETS

REPO = Path(__file__).resolve().parents[1]


def real_data_dir() -> Path:
    "`$SCMEDAL_DATA_DIR`, else the `shared/data` folder beside the repository."
    return Path(os.environ.get("SCMEDAL_DATA_DIR", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir():
    "Folder with the real datasets; tests using it skip when the files are not there."
    folder = real_data_dir()
    missing = [info["filename"] for info in DATASETS.values() if not (folder / info["filename"]).is_file()]
    if missing: pytest.skip(f"real datasets not found in {folder}: {missing}")
    return folder
