"""Suite-wide switches and fixtures: GPU tests skip cleanly where CUDA is absent; torch stays
single-threaded; daemons get socket directories short enough for ipc://."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# Tiny bf16 matmuls on a busy 2-core machine: a second OpenMP thread only adds waiting.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Every test runs torch single-threaded, whatever the one before it set (OpenMP's second
    thread only adds barrier waits to tiny matmuls: milliseconds on a busy box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run `make gpu-check` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def short_dir():
    """ipc:// paths must stay short (sun_path is 108 bytes): a directory right under /tmp."""
    path = Path(tempfile.mkdtemp(prefix="exd-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
