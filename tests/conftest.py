import os
import shutil

# Without a GPU, Triton kernels run in its interpreter; this must be set before torch imports triton.
if shutil.which("nvidia-smi") is None:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    # Deterministic, single-process numerics: tests compare numbers.
    torch.use_deterministic_algorithms(False)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
