"""Shared fixtures: tiny models and small data so the suite stays fast on a 2-core CPU."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TINY_ARCH = "timm:resnet18?channels=8,16,32,64&num_classes=10"


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one torch thread is fastest, and on a shared machine far faster than two competing ones;
    the module's tests use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``. Restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_arch() -> str:
    return TINY_ARCH


@pytest.fixture(autouse=True)
def _torch_hub_tmp(tmp_path_factory, monkeypatch):
    """Every test sees an empty torch hub / HF cache unless it fills one itself."""
    hub = tmp_path_factory.mktemp("hub")
    monkeypatch.setenv("TORCH_HOME", str(hub))
    torch.hub.set_dir(str(hub / "hub"))
    yield
