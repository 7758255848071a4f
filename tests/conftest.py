"""Shared pytest fixtures: where the real datasets live, and skipping cleanly when they are absent."""
from pathlib import Path

import pytest

from scmedal.datasets import DATASETS, data_dirs


def real_data_dir() -> Path | None:
    "The first of `scmedal.datasets.data_dirs()` (`$SCMEDAL_DATA_DIR`, then the user cache) holding every dataset file."
    return next((folder for folder in data_dirs()
                 if all((folder / info["filename"]).is_file() for info in DATASETS.values())), None)


@pytest.fixture(scope="session")
def data_dir():
    "Folder with the real datasets; tests using it skip when the files are not there (the tests never download)."
    folder = real_data_dir()
    if folder is None:
        pytest.skip(f"real datasets not found in {[str(p) for p in data_dirs()]}: set SCMEDAL_DATA_DIR to their folder")
    return folder
