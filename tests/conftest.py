import os

import pytest
import torch


def pytest_configure(config):
    # Deterministic, single-process numerics: tests compare numbers.
    torch.use_deterministic_algorithms(False)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
