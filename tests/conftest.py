import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FEWSTEP_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    os.environ.setdefault("FEWSTEP_CACHE", str(tmp_path_factory.mktemp("fewstep-cache")))
    # Trainers tune glibc's allocator on the CPU (train.tune_malloc); the long-lived test process keeps its
    # memory lean instead (tests check behaviour, and test_runtime/test_train check the tuning itself).
    os.environ.setdefault("FEWSTEP_TUNE_MALLOC", "0")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield


def shared_archive(name: str) -> Path:
    path = SHARED / name
    if not path.is_file():
        pytest.skip(f"real data {name} not found at {path} (the shared data folder is absent on this machine)")
    return path


@pytest.fixture
def nmnist_root():
    shared_archive("nmnist-small.tar.gz")
    return SHARED


# torch.compile costs seconds per kernel: tests run the eager fused path unless a test asks for it.
os.environ.setdefault("FEWSTEP_COMPILE", "0")
