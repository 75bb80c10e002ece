"""Session-wide test setup: one torch thread, and skip GPU tests without a GPU."""

import os

import pytest
import torch

torch.set_num_threads(int(os.environ.get("RAYLANE_TEST_THREADS", "1")))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
