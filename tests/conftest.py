"""Shared test settings: offline hub, few threads, and the real-data folder."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One thread: tiny test tensors run fastest single-threaded (and far faster on a busy machine).
os.environ.setdefault("CMPC_THREADS", "1")

import pytest
import torch

torch.set_num_threads(int(os.environ["CMPC_THREADS"]))

REPO = Path(__file__).resolve().parents[1]
REAL = Path(os.environ.get("CMPC_REAL_DATA", REPO.parent / "shared" / "data" / "real"))


@pytest.fixture(scope="session")
def real_data() -> Path:
    """../shared/data/real, or skip the test with a reason when it is absent."""
    if not REAL.is_dir():
        pytest.skip(f"real data folder {REAL} is absent (set CMPC_REAL_DATA to point at it)")
    return REAL


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny convolutions and searches: two OpenMP threads spin against each other on a shared
    2-core machine and run up to ~100x slower than one. Tests that need more set it themselves."""
    import faiss

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def smoke_demo(tmp_path_factory) -> Path:
    """A folder where `cmpc demo experiments/smoke.json` ran as a user runs it (subprocess).

    Shared by the end-to-end tests that start from a finished smoke run (about 30 s once);
    they may add files but must not change its models or index.
    """
    import shutil
    import subprocess
    import sys

    folder = tmp_path_factory.mktemp("smoke_demo")
    (folder / "experiments").mkdir()
    shutil.copy2(REPO / "experiments" / "smoke.json", folder / "experiments" / "smoke.json")
    # Both cores: the demo is one process and nothing else runs beside it in the suite.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CMPC_THREADS": "2", "PYTHONDONTWRITEBYTECODE": "1"}
    res = subprocess.run([sys.executable, "-m", "cmpc", "demo", "experiments/smoke.json"], cwd=folder, env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    return folder
